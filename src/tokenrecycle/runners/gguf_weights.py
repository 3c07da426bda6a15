"""A model's linear weights read from its GGUF file into the quantised kernel's format, as the file
stores them (quant.from_gguf): `--quantize gguf` then runs the weights llama.cpp runs.

transformers names the model's parameters; its own GGUF loader's name map says which GGUF tensor
each one came from, and Llama's q/k rows are put back in transformers' order as that loader does
(rows only move, so the groups stay exact). Every weight is checked against the model's own copy
(the same file, dequantised by transformers): a mismatch means the map is wrong, and loading stops.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import InvalidOptionError
from . import quant


def read_gguf_weights(path: Path, model: torch.nn.Module) -> dict[str, quant.QuantWeight]:
    """{parameter name: weight} for the model's 2-D weights stored in the GGUF at path."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    if Path(path).suffix != ".gguf":
        raise InvalidOptionError(f"quantize=gguf needs a model loaded from a .gguf file, not {Path(path).name}")
    names = get_gguf_hf_weights_map(_Flat(model), TensorProcessor())
    params = dict(model.named_parameters(remove_duplicate=False))
    weights = {}
    for tensor in GGUFReader(path).tensors:
        name = names.get(tensor.name)
        if name is None or name not in params or len(tensor.shape) != 2:
            continue
        k, n = (int(size) for size in tensor.shape)  # GGUF lists the inner (input) size first
        data, order = tensor.data, _row_order(model.config, tensor.name, n)
        if order is not None:  # whole rows of blocks move: exact
            data = data.reshape(n, -1)[order]
        weight = quant.from_gguf(data, tensor.tensor_type.name, (n, k))
        _check_matches(weight, params[name], tensor.name, exact=tensor.tensor_type.name in quant.EXACT)
        weights[name] = weight
    return weights


class _Flat:
    """The model as transformers' GGUF name map sees it, without submodules: the full parameter
    names already map, and its recursion into every submodule builds the map hundreds of times."""

    def __init__(self, model: torch.nn.Module):
        self.config, self._model = model.config, model

    def state_dict(self) -> dict:
        return self._model.state_dict()

    def named_children(self) -> list:
        return []


def _row_order(config, gguf_name: str, rows: int) -> np.ndarray | None:
    """llama.cpp stores Llama's q and k projections with each head's rows interleaved for its
    rotary kernel; transformers' loader undoes it (LlamaTensorProcessor), and so do we."""
    if config.model_type not in ("llama", "mistral") or not (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        return None
    heads = config.num_attention_heads if ".attn_q." in gguf_name else config.num_key_value_heads
    half = rows // heads // 2
    return np.arange(rows).reshape(heads, half, 2).swapaxes(1, 2).reshape(rows)


def _check_matches(weight: quant.QuantWeight, param: torch.Tensor, name: str, exact: bool) -> None:
    """The first and last block of 16 rows against the model's copy: a wrong tensor or row order
    shows there (a head's q/k rows span 64 or more), and checking all would cost seconds. Types
    requantised to 8 bits (Q6_K, ...) may be off by half an 8-bit step, far below a weight's size."""
    first, last = quant.block_rows(weight, 0), quant.block_rows(weight, -1)
    rows = len(first)
    theirs = param.detach()
    ours = torch.cat([first, last]).to(param.dtype).float()
    expected = torch.cat([theirs[:rows], theirs[(weight.n - 1) // quant.BLOCK * quant.BLOCK :]]).float()
    step = 0.0 if exact else float(weight.scales[[0, -1]].max())
    if param.shape != (weight.n, weight.k) or not torch.allclose(ours, expected, rtol=2**-7, atol=1e-6 + step / 2):
        raise InvalidOptionError(f"GGUF tensor {name} does not match the model's weight; quantize=gguf cannot map this model")
