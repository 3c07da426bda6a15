"""The decoding loop on a scripted model: exactness, limits and EOS inside an accepted path."""

import numpy as np
import pytest

from fakes import CharTokenizer, ScriptedRunner, as_array, cycle_model, sequential_greedy
from fakes import decode_alone
from tokenrecycle.drafters import TokenRecyclingDrafter
from tokenrecycle.trees.templates import TEMPLATES
from tokenrecycle.text import OutputAssembler
from tokenrecycle.trees.choice import resolve_tree

V = 16


def run(runner, drafter, prompt, max_new):
    return [step.tokens for step in decode_alone(runner, drafter, as_array(prompt), max_new)]


def make(template="tr16", model=None, max_context=512):
    runner = ScriptedRunner(model or cycle_model(), vocab_size=V, max_context=max_context)
    choice = resolve_tree(template, 8)
    drafter = TokenRecyclingDrafter(V, choice.template, topk=8, budget=choice.budget)
    return runner, drafter


@pytest.mark.parametrize("template", sorted(TEMPLATES) + ["dyn1", "dyn8", "dyn32"])
@pytest.mark.parametrize("max_new", [1, 2, 7, 30])
def test_equals_sequential_greedy_and_never_overshoots(template, max_new):
    runner, drafter = make(template)
    for _ in range(2):  # the second request runs on a hot table
        steps = run(runner, drafter, [1, 2, 3], max_new)
        tokens = [t for step in steps for t in step]
        assert tokens == sequential_greedy(runner.next_token, [1, 2, 3], max_new)
        assert len(tokens) == max_new


def test_hot_table_accepts_long_paths_on_repetitive_text():
    runner, drafter = make("tr16")
    run(runner, drafter, [1, 2, 3], 30)
    steps = run(runner, drafter, [1, 2, 3], 30)
    assert max(len(s) for s in steps) == 6  # depth-5 tree fully accepted plus the bonus token
    assert len(steps) < 10


def test_trees_are_cut_to_the_tokens_still_wanted():
    runner, drafter = make("tr80")
    run(runner, drafter, [1, 2, 3], 40)
    runner.forward_sizes.clear()
    steps = run(runner, drafter, [1, 2, 3], 4)
    assert sum(map(len, steps)) == 4
    # after the prefill's token, 3 are wanted: a tree deeper than 2 would be wasted work
    assert all(size <= 1 + 8 + 21 for size in runner.forward_sizes)


def test_context_limit_bounds_the_tree_depth():
    runner, drafter = make("tr80", max_context=20)
    run(runner, drafter, [1, 2, 3], 17)
    steps = run(runner, drafter, [1, 2, 3], 17)
    assert sum(map(len, steps)) == 17 and runner.cache_length(0) <= 20  # the one slot both runs used


def test_eos_inside_an_accepted_path_ends_the_output_there():
    eos = 4
    runner, drafter = make("tr16")  # the cycle 1 2 3 4 5 contains token 4: our EOS
    run(runner, drafter, [1, 2, 3, 4, 5], 30)  # warm the table on the cycle
    steps = decode_alone(runner, drafter, as_array([5, 1]), 30)
    tokenizer = CharTokenizer([str(i) for i in range(V)])
    assembler = OutputAssembler(tokenizer, eos_ids={eos}, stop_strings=[], max_new_tokens=30)
    step_sizes = []
    for step in steps:
        step_sizes.append(len(step.tokens))
        assembler.add(step.tokens)
        if assembler.done:
            break
    assert assembler.tokens == sequential_greedy(runner.next_token, [5, 1], 30, eos=eos) == [2, 3, 4]
    assert assembler.stop_reason == "eos"
    assert step_sizes[-1] > len(assembler.tokens) - sum(step_sizes[:-1])  # the step went past EOS; output did not
