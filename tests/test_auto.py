"""Merged trees, the bandit, and the auto drafter (several drafters, the best mix chosen online)."""

from __future__ import annotations

import numpy as np
import pytest

from tokenrecycle.bandit import ContextualBandit, ThompsonSampling
from fakes import decode_alone
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
    small, origin = merge_trees(9, [a, b], budget=3)  # in turns, each tree in its own order
    paths = {tuple(small.tokens[small.path_to(i)].tolist()): origin[i] for i in range(1, len(small))}
    assert paths == {(9, 1): 3, (9, 1, 2): 3, (9, 1, 3): 1}  # b's 1 and 2 were free; then a's 3


def test_a_single_tree_is_cut_in_its_own_order():
    branches = tree_from_parents([9, 1, 2, 3, 4, 5], [-1, 0, 1, 2, 0, 4])  # a long branch first
    cut, origin = merge_trees(9, [branches], budget=3)
    assert cut.tokens.tolist() == [9, 1, 2, 3] and origin == [1, 1, 1, 1]


@pytest.mark.parametrize("seed", range(5))
def test_thompson_sampling_settles_on_the_best_arm(seed):
    rng = np.random.default_rng(seed)
    means = [30.0, 50.0, 58.0, 55.0]  # tokens/s-like rewards, close arms, noisy
    bandit = ThompsonSampling(len(means), rng=np.random.default_rng(seed))
    plays = [0] * len(means)
    for _ in range(3000):
        arm = bandit.choose()
        plays[arm] += 1
        bandit.update(arm, rng.normal(means[arm], 20.0))
    assert plays.index(max(plays)) == 2 and plays[2] > 0.6 * sum(plays)
    assert plays[0] < 0.02 * sum(plays)  # the clearly bad arm is dropped early


def test_a_fading_bandit_follows_a_change_of_best_arm():
    rng = np.random.default_rng(1)
    bandit = ThompsonSampling(2, fading=0.99, rng=rng)
    for means in ([60.0, 40.0], [40.0, 60.0]):
        late = [0, 0]
        for step in range(2000):
            arm = bandit.choose()
            bandit.update(arm, rng.normal(means[arm], 10.0))
            late[arm] += step >= 1500
        assert late[int(np.argmax(means))] > 0.8 * sum(late)


def test_the_contextual_bandit_learns_the_best_arm_per_context():
    rng = np.random.default_rng(2)
    best = {(0,): 0, (3,): 2}  # e.g. recycling without a match, copying after a long one
    bandit = ContextualBandit(3)
    late = {context: [0, 0, 0] for context in best}
    for step in range(4000):
        context = ((0,), (3,))[step % 2]
        arm = bandit.choose(context)
        bandit.update(context, arm, rng.normal(60.0 if arm == best[context] else 45.0, 15.0))
        late[context][arm] += step >= 3000
    for context, arm in best.items():
        assert late[context][arm] > 0.8 * sum(late[context])


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
    for step in decode_alone(ScriptedRunner(model, vocab_size=16), drafter, np.array([1, 2, 3, 4, 5, 1]), 80):
        out += step.tokens
    assert out == sequential_greedy(model, [1, 2, 3, 4, 5, 1], 80)
    assert sum(drafter.plays) > 10 and min(drafter.plays) >= 1  # every arm tried
    assert drafter.credit["lookup"] > 0 and drafter.credit["tr"] > 0
    contexts = drafter.bandit.by_context
    assert len(contexts) > 1  # retrieval matches more of the text as it repeats
    favourites = drafter.favourites()  # e.g. {"tr=0 lookup=2 retrieval=1": "lookup/4 30/41"}
    assert len(favourites) == len(contexts) and all(label.startswith("tr=0 lookup=") for label in favourites)
    assert sum(int(text.split()[-1].split("/")[1]) for text in favourites.values()) == sum(drafter.plays)


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
