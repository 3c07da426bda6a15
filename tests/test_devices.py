"""--device: parsing, errors (here, a CPU-only torch), and the fixed-step pieces a GPU runs, on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from tokenrecycle.cli import main
from tokenrecycle.devices import resolve_device
from tokenrecycle.errors import InvalidOptionError
from tokenrecycle.runners import FastRunner
from tokenrecycle.runners.fixed_step import STEP_SIZES, StepGraphs, fixed_visibility, pack_step, step_size, unpack_step
from tokenrecycle.trees import DraftTree, tree_from_parents, tree_visibility
from tiny_models import build, one_thread, tiny_configs  # noqa: F401


def test_cpu_and_auto_resolve_here():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    expected = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == expected == resolve_device(None)
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "cuda:-1", "mps", "", "cpu:0"])
def test_unknown_specs_are_refused_in_one_line(spec):
    with pytest.raises(InvalidOptionError, match="device must be auto, cpu, cuda or cuda:N") as error:
        resolve_device(spec)
    assert "\n" not in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_is_refused(spec):
    with pytest.raises(InvalidOptionError, match=f"device {spec}: this torch sees no CUDA GPU"):
        resolve_device(spec)


def test_a_gpu_index_beyond_the_count_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(InvalidOptionError, match=r"this machine has 2 CUDA devices \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--device", "cuda", "Hello"],
        ["tune", "--device", "cuda:1"],
        ["bench", "--device", "cuda", "--methods", "ar"],
        ["serve", "--device", "cuda", "--port", "0"],
        ["generate", "--device", "tpu", "Hello"],
    ],
)
def test_cli_refuses_a_device_in_one_line_before_loading(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokenrecycle: error: device ") and err.count("\n") == 1, err


def test_cpu_only_options_follow_the_device():
    """On the CPU the fast runner keeps its eager steps; graphs are refused there."""
    model = build(tiny_configs()["llama"])
    assert FastRunner(model, native=False).loop.value == "Python loop"
    assert FastRunner(model, fixed_steps=True).loop.value == "Python loop"  # fixed steps run eagerly here
    with pytest.raises(InvalidOptionError, match="CUDA graphs need a CUDA device, not cpu"):
        FastRunner(model, graphs=True)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        StepGraphs(torch.device("cpu"))


# ---- the fixed step's pure parts -------------------------------------------------------------------
def test_step_sizes_cover_every_tree_up_to_128():
    assert [step_size(n) for n in (1, 2, 3, 17, 33, 49, 81, 97, 128)] == [1, 2, 4, 32, 48, 64, 96, 128, 128]
    assert step_size(129) is None and STEP_SIZES[-1] == 128


def random_tree(rng, n: int) -> DraftTree:
    parents = [-1] + [int(rng.integers(0, i)) for i in range(1, n)]
    return tree_from_parents(rng.integers(0, 100, size=n), parents)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 20), start=st.integers(0, 40), window=st.sampled_from([None, 1, 2, 3, 5, 9]))
def test_fixed_visibility_is_tree_visibility_over_the_whole_cache(seed, n, start, window):
    """Over the slots a step can see (committed, then the tree) the device-built mask is
    tree_visibility; pads, and slots after the tree, are seen by nothing but pads themselves."""
    rng = np.random.default_rng(seed)
    tree = random_tree(rng, n)
    size = step_size(n)
    capacity = start + size + 7
    buffer = np.zeros(2 * size + 1 + size * size, dtype=np.int32)
    pack_step(tree, start, size, buffer)
    tokens, depths, begin, ancestors = unpack_step(torch.from_numpy(buffer), size)
    assert tokens[:n].tolist() == tree.tokens.tolist() and int(begin) == start
    visible = fixed_visibility(ancestors, depths, begin, capacity, window).numpy()
    assert visible[:n, : start + n].tolist() == tree_visibility(tree, start, window).tolist()
    assert not visible[:n, start + n :].any()  # no real node sees a pad or an unused slot
    pads = np.arange(n, size)
    assert visible[pads, start + pads].all()  # a pad sees itself: no empty softmax row


# ---- on a GPU (marked cuda: skipped here, run by scripts/gpu_check.sh) -----------------------------
@pytest.mark.cuda
def test_the_fast_runner_replays_cuda_graphs():
    """On CUDA the fast runner's steps are graph replays (one capture per slot and size), equal to
    the same fixed steps run eagerly, and the CPU-only parts are off."""
    from tokenrecycle.runners import Loop
    from tokenrecycle.trees import chain_tree

    model = build(tiny_configs()["qwen2"]).to("cuda")  # sliding and full layers, biases
    graphs, eager = FastRunner(model, max_slots=1), FastRunner(model, graphs=False, max_slots=1)
    assert graphs.loop is Loop.CUDA_GRAPHS and graphs.loop_note is None and eager.loop is Loop.PYTHON
    with pytest.raises(InvalidOptionError, match="the C++ loop runs on the CPU"):
        FastRunner(model, native=True)
    rng = np.random.default_rng(0)
    for runner in (graphs, eager):
        runner.allocate()
        runner.prefill(0, np.arange(20) % 256)
    for n in (1, 5, 7, 1, 30, 5):  # sizes 1, 8, 8, 1, 32, 8: three graphs
        tree = random_tree(rng, n)
        a, b = graphs.forward_tree(0, tree), eager.forward_tree(0, tree)
        assert a.device.type == "cuda" and (a - b).abs().max().item() < 1e-5, n
        path = tree.path_to(int(rng.integers(0, n)))
        graphs.commit(0, path)
        eager.commit(0, path)
    assert graphs._graphs.captures == 3
    chunk = chain_tree(np.arange(40) % 256)  # a prompt chunk runs as a fixed step too
    assert (graphs.forward_tree(0, chunk) - eager.forward_tree(0, chunk)).abs().max().item() < 1e-5
