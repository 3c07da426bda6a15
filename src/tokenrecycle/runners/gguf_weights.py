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
    names = get_gguf_hf_weights_map(model, TensorProcessor())
    params = dict(model.named_parameters(remove_duplicate=False))
    weights = {}
    for tensor in GGUFReader(path).tensors:
        name = names.get(tensor.name)
        if name is None or name not in params or len(tensor.shape) != 2:
            continue
        k, n = (int(size) for size in tensor.shape)  # GGUF lists the inner (input) size first
        weight = quant.from_gguf(tensor.data, tensor.tensor_type.name, (n, k))
        order = _row_order(model.config, tensor.name, n)
        if order is not None:
            weight = quant.take_rows(weight, order)
        _check_matches(weight, params[name], tensor.name)
        weights[name] = weight
    return weights


def _row_order(config, gguf_name: str, rows: int) -> np.ndarray | None:
    """llama.cpp stores Llama's q and k projections with each head's rows interleaved for its
    rotary kernel; transformers' loader undoes it (LlamaTensorProcessor), and so do we."""
    if config.model_type not in ("llama", "mistral") or not (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        return None
    heads = config.num_attention_heads if ".attn_q." in gguf_name else config.num_key_value_heads
    half = rows // heads // 2
    return np.arange(rows).reshape(heads, half, 2).swapaxes(1, 2).reshape(rows)


def _check_matches(weight: quant.QuantWeight, param: torch.Tensor, name: str) -> None:
    ours = quant.dequantize(weight)
    theirs = param.detach().float()
    if ours.shape != theirs.shape or not torch.allclose(ours.to(param.dtype).float(), theirs, rtol=2**-7, atol=1e-6):
        raise InvalidOptionError(f"GGUF tensor {name} does not match the model's weight; quantize=gguf cannot map this model")
