"""Draft-model drafters on a real (tiny, random) model: derived drafts (early exit, int4) and a
model of its own with the same tokenizer; greedy stays exact, seeded sampling repeats."""

from __future__ import annotations

import json

import pytest


from tokenrecycle import Generator, InvalidOptionError

from tokenrecycle.sampling import Sampling

from tiny_models import one_thread, save_tiny_pair  # noqa: F401  (tiny models: one thread is fastest)

PROMPTS = ["Write a short poem about the sea.", "def add(a, b):"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_tiny_pair(tmp_path_factory.mktemp("draft_models"), target_layers=3, seeds=(5, 6))


@pytest.fixture(scope="module")
def generator(models):
    return Generator(models[0], dtype="float32", tree="none")


@pytest.fixture(scope="module")
def plain(generator):
    return {prompt: generator.generate_with_transformers(prompt, max_new_tokens=24).token_ids for prompt in PROMPTS}


@pytest.mark.parametrize(
    "draft, shape",
    [("early-exit:1", "1,1,1"), ("early-exit:1", "chain"), ("early-exit:1", "2,2,1"), ("early-exit:2", "3,1"), ("own", "chain")],
)
def test_greedy_with_a_draft_model_is_exact(generator, models, plain, draft, shape):
    drafter = generator.build_drafter("draft-model", draft=models[1] if draft == "own" else draft, draft_shape=shape)
    for prompt in PROMPTS:
        assert generator.generate(prompt, max_new_tokens=24, drafter=drafter).token_ids == plain[prompt]


def test_the_full_depth_early_exit_is_accepted_every_time(generator):
    drafter = generator.build_drafter("draft-model", draft="early-exit:3", draft_shape="1,1,1")  # the target itself
    result = generator.generate(PROMPTS[0], max_new_tokens=33, drafter=drafter)
    assert result.accepted_lengths[1:] == [4] * 8


def test_seeded_sampling_with_a_draft_model_repeats(generator):
    sampling = Sampling(temperature=0.8, seed=7)
    drafter = generator.build_drafter("draft-model", draft="early-exit:2", draft_shape="2,1")
    first = generator.generate(PROMPTS[0], max_new_tokens=24, drafter=drafter, sampling=sampling)
    again = generator.generate(PROMPTS[0], max_new_tokens=24, drafter=drafter, sampling=sampling)
    assert first.token_ids == again.token_ids


@pytest.mark.parametrize("draft, message", [("early-exit:x", "layer count"), ("early-exit:9", "1 to 3 layers"), ("int4", "bfloat16")])
def test_bad_drafts_are_refused(generator, draft, message):
    with pytest.raises(InvalidOptionError, match=message):
        generator.build_drafter("draft-model", draft=draft)


def test_cli_generate_with_a_draft_model(models, capsys):
    from tokenrecycle.cli import main

    base = ["generate", "--model", models[0], "--dtype", "float32", "--tree", "none", "--max-new-tokens", "12", "--json"]
    assert main(base + ["--draft", "early-exit:1", "hi"]) == 0
    chain = json.loads(capsys.readouterr().out)
    assert main(base + ["--draft", "early-exit:2", "--draft-shape", "2,1", "hi"]) == 0
    tree = json.loads(capsys.readouterr().out)
    assert chain["token_ids"] == tree["token_ids"] and chain["draft"] == "early-exit:1"
    assert main(base + ["--draft", "early-exit:1", "--draft-shape", "wide", "hi"]) == 2
    assert "draft shape must be chain" in capsys.readouterr().err
    assert main(base + ["--draft", "early-exit:2", "--draft-shape", "beam:3,2", "hi"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == chain["token_ids"]
    assert main(base + ["--draft", "early-exit:1", "--temperature", "0.8", "--seed", "3", "hi"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(base + ["--draft", "early-exit:1", "--temperature", "0.8", "--seed", "3", "hi"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == first["token_ids"]
    assert first["sampling"]["temperature"] == 0.8
