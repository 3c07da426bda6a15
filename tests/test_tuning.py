"""tokenrecycle tune and --tree auto on a tiny random model: profiles, caching, invalidation, exactness."""

from __future__ import annotations

import json

import pytest
import torch


from tokenrecycle import Generator
from tokenrecycle.cli import main
from tokenrecycle.drafters import AdaptiveTreeDrafter
from tokenrecycle.request import RequestSettings
from tokenrecycle.trees import compile_template
from tokenrecycle.tuning import ProfileKey, load_profile, read_profile

from tiny_models import one_thread, save_tiny_llama, smollm2_tokenizer  # noqa: F401  (tiny models: one thread is fastest)

PROMPTS = ["Write a short poem about the sea.", "Count from one to ten.", "def add(a, b):"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "model", smollm2_tokenizer(), 2, 3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Profiles go to a cache of their own (the converted SmolLM2 stays where it is)."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("cache")
        patch.setenv("TOKENRECYCLE_CACHE", str(path))
        yield path


@pytest.fixture(scope="module")
def tuned(tiny_model, cache):
    generator = Generator(tiny_model, dtype="float32")
    assert generator.engine.tree.name == "tr4" and "no tuning profile" in generator.engine.tree.reason
    profile = generator.tune(seconds=3)
    return generator, profile


def test_tuning_saves_a_readable_profile_and_uses_its_tree(tuned):
    generator, profile = tuned
    path = ProfileKey(**profile.key).path
    data = json.loads(path.read_text())
    assert set(data) >= {"key", "chosen_tree", "cost_ms", "acceptance"}
    assert data["key"]["dtype"] == "float32" and data["key"]["runner"] == "fast"
    assert set(data["cost_ms"]) == {"256", "1024"}
    assert data["acceptance"] and all(0 <= v["rate"] <= 1 and v["visits"] >= 10 for v in data["acceptance"].values())
    assert generator.engine.tree.name == "auto" and "tuned on this machine" in generator.engine.tree.reason
    assert set(generator.engine.tree.template.paths[1:]) == set(profile.plan.paths)
    compile_template(list(profile.plan.paths), 8)  # a valid template


def test_a_new_generator_finds_the_profile(tuned, tiny_model):
    _, profile = tuned
    again = Generator(tiny_model, dtype="float32")
    assert again.engine.tree.name == "auto"
    assert load_profile(again.engine.profile_key).plan == profile.plan


def test_profiles_are_invalidated_by_what_they_depend_on(tuned, tiny_model, monkeypatch):
    generator, profile = tuned
    threads = torch.get_num_threads()
    with monkeypatch.context() as patch:
        patch.setattr(torch, "get_num_threads", lambda: threads + 1)
        other = ProfileKey.of(generator.engine.loaded.path, generator.runner, "float32", None, 8)
        assert other.to_json() != profile.key and load_profile(other) is None
    assert Generator(tiny_model, dtype="float32", runner="hf").engine.tree.name == "tr4"  # another runner: not tuned
    key = generator.engine.profile_key
    path = key.path
    saved = path.read_text()
    path.write_text(saved[:-20])  # damaged: the static tree, and a line that says why
    assert load_profile(key) is None and "cannot be read" in read_profile(key)[1]
    damaged = Generator(tiny_model, dtype="float32")
    assert damaged.engine.tree.name == "tr4" and "cannot be read" in damaged.engine.tree.problem
    stale = json.loads(saved)
    stale["key"]["version"] = 0
    path.write_text(json.dumps(stale))
    assert load_profile(key) is None
    path.write_text(saved)  # the other tests use it


def test_auto_tree_is_lossless(tuned):
    generator, _ = tuned
    for prompt in PROMPTS:
        ours = generator.generate(prompt, max_new_tokens=24)
        assert ours.token_ids == generator.generate_with_transformers(prompt, max_new_tokens=24).token_ids


def test_cli_tune_and_show(tiny_model, cache, capsys):
    assert main(["tune", "--model", tiny_model, "--dtype", "float32", "--runner", "hf", "--show"]) == 2
    assert "no tuning profile" in capsys.readouterr().err
    assert main(["tune", "--model", tiny_model, "--dtype", "float32", "--runner", "hf", "--seconds", "2"]) == 0
    out = capsys.readouterr().out
    assert "chosen tree:" in out and "forward ms by tree tokens" in out
    assert main(["tune", "--model", tiny_model, "--dtype", "float32", "--runner", "hf", "--show"]) == 0
    assert capsys.readouterr().out == out


def test_cli_generate_tunes_on_first_use_unless_told_not_to(tiny_model, cache, capsys):
    base = ["generate", "--model", tiny_model, "--dtype", "float32", "--topk", "4", "--max-new-tokens", "8", "--json", "hi"]
    assert main(base + ["--no-tune"]) == 0
    assert json.loads(capsys.readouterr().out)["tree"] == "tr4"
    assert main(base + ["--tune-seconds", "2"]) == 0
    captured = capsys.readouterr()
    assert "tuning once" in captured.err and json.loads(captured.out)["tree"] == "auto"
    assert main(base + ["--tune-seconds", "0"]) == 0  # a profile exists now: no tuning, no error


def test_adaptive_tree_starts_from_the_profile_and_is_lossless(tuned, tiny_model):
    _, profile = tuned
    generator = Generator(tiny_model, dtype="float32", tree="adaptive")
    engine = generator.engine
    assert engine.tree.name == "adaptive" and isinstance(engine.recycling, AdaptiveTreeDrafter)
    assert set(engine.recycling.template.paths[1:]) == set(profile.plan.paths)
    assert engine.recycling_drafter(tree=[]).template.num_nodes == 0  # an empty tree stays empty
    assert isinstance(engine.recycling_drafter(), AdaptiveTreeDrafter)
    recycling = RequestSettings(drafter="recycling")
    alone = engine.submit(PROMPTS[0], recycling)
    assert alone.drafter is engine.recycling  # one request at a time: the engine's own, hot table
    assert engine.submit(PROMPTS[1], recycling).drafter is not engine.recycling  # a second at once: its own
    while not engine.idle:
        engine.step()
    for prompt in PROMPTS:
        ours = generator.generate(prompt, max_new_tokens=24)
        assert ours.token_ids == generator.generate_with_transformers(prompt, max_new_tokens=24).token_ids


def test_bench_compares_the_profiles_predictions_with_measurements(tuned, tiny_model, tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("\n".join(json.dumps({"question_id": i, "category": "c", "turns": [p]}) for i, p in enumerate(PROMPTS)))
    args = ["bench", "--model", tiny_model, "--dtype", "float32", "--methods", "ar,plain,tr", "--trees", "auto,tr2,adaptive"]
    assert main(args + ["--questions", str(questions), "--max-new-tokens", "16", "--no-cost-curve", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "Trees: predicted by the tuning profile and measured" in report
    assert "| tr@auto |" in report and "| tr@tr2 | 2 | 1 |" in report
    assert "| tr@adaptive |" in report  # measured, but no fixed tree to predict
    assert (tmp_path / "trees_float32.png").is_file()
    results = json.loads((tmp_path / "results.json").read_text())
    section = results["sections"][0]
    assert section["profile"]["chosen_tree"]["nodes"] == len(section["methods"]["tr@auto"]["settings"]["paths"])
    assert all(r["status"] == "ok" for r in section["records"])
