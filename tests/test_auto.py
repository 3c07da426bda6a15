"""Merged trees, the bandit, and the auto drafter (several drafters, the best mix chosen online)."""

from __future__ import annotations

import numpy as np
import pytest

from tokenrecycle.bandit import UCB
from tokenrecycle.decoding import speculative_decode
from tokenrecycle.drafters import TokenRecyclingDrafter
from tokenrecycle.drafters.auto import AutoDrafter, merge_trees
from tokenrecycle.drafters.lookup import LookupDrafter
from tokenrecycle.drafters.retrieval import RetrievalDrafter
from tokenrecycle.errors import InvalidOptionError
from tokenrecycle.trees import compile_template, tree_from_parents
from tokenrecycle.verify import SamplingVerifier

from enumeration import output_distribution
from fakes import ScriptedRunner, cycle_model, sequential_greedy
from test_sampling import PROMPT, SETTINGS, TOKENS, V, SoftRunner, assert_same, plain_distribution


def test_merge_shares_prefixes_drops_duplicates_and_credits_both():
    a = tree_from_parents([9, 1, 2, 3], [-1, 0, 1, 1])  # 9 -> 1 -> {2, 3}
    b = tree_from_parents([9, 1, 2, 5, 4], [-1, 0, 1, 2, 0])  # 9 -> 1 -> 2 -> 5, 9 -> 4
    tree, origin = merge_trees(9, [a, b], budget=10)
    paths = {tuple(tree.tokens[tree.path_to(i)].tolist()): origin[i] for i in range(len(tree))}
    assert paths == {(9,): 3, (9, 1): 3, (9, 4): 2, (9, 1, 2): 3, (9, 1, 3): 1, (9, 1, 2, 5): 2}
    small, _ = merge_trees(9, [a, b], budget=3)  # level by level, the first tree first
    assert sorted(tuple(small.tokens[small.path_to(i)].tolist()) for i in range(1, len(small))) == [(9, 1), (9, 1, 2), (9, 4)]


def test_the_bandit_settles_on_the_best_arm():
    rng = np.random.default_rng(0)
    means = [0.3, 0.5, 0.8, 0.6]
    bandit = UCB(len(means))
    plays = [0] * len(means)
    for _ in range(3000):
        arm = bandit.choose()
        plays[arm] += 1
        bandit.update(arm, rng.normal(means[arm], 0.2) + 1)  # positive, noisy
    assert plays.index(max(plays)) == 2 and plays[2] > 0.6 * sum(plays)


def auto_drafter(adapt: bool = True, vocab: int = V) -> AutoDrafter:
    drafters = {
        "tr": TokenRecyclingDrafter(vocab, compile_template([(0,), (1,), (0, 0)], 2), topk=2),
        "lookup": LookupDrafter(max_ngram=2, depth=3),
        "retrieval": RetrievalDrafter(),
    }
    arms = [(("tr",), 3), (("lookup",), 4), (("tr", "lookup", "retrieval"), 6)]
    return AutoDrafter(drafters, arms, adapt)


def test_auto_drafting_is_exact_and_credits_the_drafters():
    model = cycle_model(period=5)
    drafter = auto_drafter(vocab=16)
    out = []
    for step in speculative_decode(ScriptedRunner(model, vocab_size=16), drafter, np.array([1, 2, 3, 4, 5, 1]), 80):
        out += step.tokens
    assert out == sequential_greedy(model, [1, 2, 3, 4, 5, 1], 80)
    assert sum(drafter.plays) > 10 and min(drafter.plays) >= 1  # every arm tried
    assert drafter.credit["lookup"] > 0 and drafter.credit["tr"] > 0


@pytest.mark.parametrize("adapt", [False, True])
def test_sampling_with_merged_trees_has_plain_samplings_distribution(adapt):
    prompt = np.concatenate([PROMPT, PROMPT])
    for sampling in SETTINGS[:2]:
        actual = output_distribution(SoftRunner, lambda: auto_drafter(adapt), lambda d: SamplingVerifier(sampling, d), prompt, TOKENS)
        assert_same(actual, plain_distribution(sampling, prompt=prompt))


def test_arms_must_name_known_drafters():
    with pytest.raises(InvalidOptionError):
        AutoDrafter({"tr": LookupDrafter()}, [(("nope",), 4)])


def test_cli_generate_with_each_train_free_drafter(tmp_path, capsys):
    import json

    from tokenrecycle.cli import main
    from tiny_models import save_tiny_llama, smollm2_tokenizer

    model = save_tiny_llama(tmp_path / "model", smollm2_tokenizer(), 2, 9)
    base = ["generate", "--model", model, "--dtype", "float32", "--tree", "tr4", "--max-new-tokens", "16", "--json"]
    outputs = []
    for drafter in ("recycling", "lookup", "retrieval", "merged", "auto"):
        assert main(base + ["--drafter", drafter, "Repeat: one two three one two three"]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["token_ids"])
    assert all(out == outputs[0] for out in outputs)  # greedy: the same tokens whatever drafts them


def test_draft_model_and_train_free_drafter_exclude_each_other(capsys):
    from tokenrecycle.cli import main

    assert main(["generate", "--drafter", "lookup", "--draft", "early-exit:2", "hi"]) == 2
    assert "exclude each other" in capsys.readouterr().err
