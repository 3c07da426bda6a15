"""Fixed-shape tree steps for the fast runner, and their CUDA graphs.

A CUDA graph replays a recorded list of kernels on the same memory, so every shape in a step must
be fixed. A fixed step pads the tree to the next of STEP_SIZES (pad nodes see only themselves and
nothing sees them), attends over the slot's whole cache with a mask built on the device from the
cache length and the tree's ancestor matrix, and writes its keys and values at cache slots
start..start+size-1 (past the committed rows: a pending step's slots). Its inputs travel in one
buffer per step (tokens, depths, the cache length, the ancestor matrix), so a step is one copy
to the device, one graph launch, and the logits.

The step itself is plain torch on any device: on the CPU it runs eagerly (the tests run it
there); capturing it into a graph is the only CUDA-specific part (StepGraphs).
"""

from __future__ import annotations

import os
from bisect import bisect_left
from dataclasses import dataclass
from typing import Callable, Hashable

import numpy as np
import torch

from ..devices import host_buffer
from ..trees import DraftTree

GRAPHS_SWITCH = "TOKENRECYCLE_CUDA_GRAPHS"  # 0: fixed steps run eagerly on a GPU too


def graphs_wanted() -> bool:
    return os.environ.get(GRAPHS_SWITCH, "1") != "0"


# Padded tree sizes, one graph each per slot: every size the tuner measures (1..128), and a few
# between where trees often fall (tr48, tr80), so padding wastes little.
STEP_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128)


def step_size(nodes: int) -> int | None:
    """The padded size a tree of `nodes` nodes runs at, or None when it is larger than any."""
    index = bisect_left(STEP_SIZES, nodes)
    return STEP_SIZES[index] if index < len(STEP_SIZES) else None


def input_length(size: int) -> int:
    """Entries of a step's input buffer: tokens, depths, the cache length, the ancestor matrix."""
    return 2 * size + 1 + size * size


def pack_step(tree: DraftTree, start: int, size: int, out: np.ndarray) -> int:
    """Write one step's inputs into `out` (pure but for `out`); the entries used.

    Pad nodes have token 0 and depth 0 and are their own only ancestor, so their attention row is
    never empty; no real node has a pad among its ancestors, so pads change no real logit."""
    n = len(tree)
    tokens, depths = out[:size], out[size : 2 * size]
    tokens[:n], tokens[n:] = tree.tokens, 0
    depths[:n], depths[n:] = tree.depths, 0
    out[2 * size] = start
    ancestors = out[2 * size + 1 : input_length(size)].reshape(size, size)
    ancestors[:] = np.eye(size, dtype=out.dtype)
    ancestors[:n, :n] = tree.ancestor_mask
    return input_length(size)


def unpack_step(buffer: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views of a packed step on the device: tokens, depths, the cache length (0-d), ancestors."""
    tokens = buffer[:size].long()
    depths = buffer[size : 2 * size].long()
    start = buffer[2 * size].long()
    ancestors = buffer[2 * size + 1 : input_length(size)].view(size, size).bool()
    return tokens, depths, start, ancestors


def fixed_visibility(ancestors: torch.Tensor, depths: torch.Tensor, start: torch.Tensor, capacity: int,
                     window: int | None) -> torch.Tensor:  # fmt: skip
    """(size, capacity) bool over every cache slot, on the device (no host values: capturable).

    Slot j < start holds committed position j; slot start + i holds tree node i at position
    start + depth[i]; later slots are not visible. As tree_visibility: a node sees committed keys
    and its ancestors, and on a sliding-window layer only keys less than `window` positions back."""
    size = ancestors.shape[0]
    slots = torch.arange(capacity, device=ancestors.device)
    offset = slots - start  # a slot's node index in the tree (negative: committed)
    node = offset.clamp(0, size - 1)
    in_tree = (offset >= 0) & (offset < size)
    visible = (offset < 0)[None, :] | (in_tree[None, :] & ancestors[:, node])
    if window is not None:
        key_positions = torch.where(offset < 0, slots, start + depths[node])
        visible &= (start + depths)[:, None] - key_positions[None, :] < window
    return visible


def fixed_bias(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive attention mask (as runners.base.additive_mask) made on the device."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, torch.finfo(dtype).min)


class StagedInputs:
    """The device buffer fixed steps read their inputs from, and where the host writes them: the
    buffer itself on the CPU; on a GPU a page-locked copy sent with one asynchronous transfer
    (the next write waits for that transfer, never for the step's kernels)."""

    def __init__(self, length: int, device: torch.device):
        self.device_buffer = torch.zeros(length, dtype=torch.int32, device=device)
        self._staged = device.type == "cuda"
        self._host = host_buffer(length, torch.int32, device) if self._staged else self.device_buffer
        self._sent = torch.cuda.Event() if device.type == "cuda" else None

    def write(self, fill: Callable[[np.ndarray], int]) -> None:
        """`fill(host array)` writes the inputs and says how many entries it used."""
        if self._sent is not None:
            self._sent.synchronize()  # the last transfer has left the host buffer
        used = fill(self._host.numpy())
        if self._staged:
            self.device_buffer[:used].copy_(self._host[:used], non_blocking=True)
            if self._sent is not None:
                self._sent.record()


@dataclass
class _Graph:
    graph: object  # torch.cuda.CUDAGraph
    output: torch.Tensor
    signature: Hashable


class StepGraphs:
    """One CUDA graph per (slot, padded size), captured on first use and replayed after.

    A graph reads and writes the memory it was captured with, so each carries a signature of
    what it captured (the slot's cache tensors, the rotary tables): when that memory changes (a
    cache grew) the graph is captured again. All graphs share one memory pool: they run one at
    a time, and each output stays alive until its graph is captured again."""

    def __init__(self, device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.device = device
        self._pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[Hashable, _Graph] = {}
        self.captures = 0  # how many graphs were captured (tests and the bench read it)

    def run(self, key: Hashable, signature: Hashable, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The step's output by graph replay (captured first if need be). The output's memory is
        reused by the next replay of the same graph: callers copy what they keep."""
        with torch.cuda.device(self.device):
            entry = self._graphs.get(key)
            if entry is None or entry.signature != signature:
                self._graphs.pop(key, None)  # its memory goes back to the pool before the new capture
                entry = self._graphs[key] = self._capture(step, signature)
            entry.graph.replay()
            return entry.output

    def _capture(self, step: Callable[[], torch.Tensor], signature: Hashable) -> _Graph:
        # A first run outside the capture, on a side stream as torch asks, does the one-off work
        # (library handles, kernel choice) that must not be recorded.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = step()
        self.captures += 1
        return _Graph(graph, output, signature)
