"""The quantised matrix kernel (csrc/qmatmul.cpp) and its weights (runners/quant.py).

Tolerance. The kernel multiplies bf16 inputs by integer weights exactly and sums in float32, then
applies each group's scale and minimum in float32 and rounds once to bf16. Against a float64
product of the same dequantised weights it may differ by the final rounding (half a bf16 step,
2^-8 relative) plus float32 summation error, at most about (k + 2) * 2^-24 * sum |x| |w| (the
reference path sums in another order, so bit equality is not defined between the two). Rows are
independent of each other: a row's result is bit-identical whatever the number of rows in the call.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenrecycle.errors import InvalidOptionError

from tokenrecycle.runners import quant
from tokenrecycle.runners.linear import INT4_GROUP, TorchInt4Linear
from tokenrecycle.runners.native import native_module
from tiny_models import one_thread  # noqa: F401 (a fixture)

ROWS = (1, 2, 3, 8, 16, 17, 32)
SHAPES = [(37, 96), (64, 32), (128, 160)]  # outputs not a multiple of 16, one and several groups


@pytest.fixture(scope="module")
def module():
    built = native_module()
    assert not isinstance(built, str), built
    return built


def bound(x: torch.Tensor, w: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    k = x.shape[1]
    summation = (k + 2) * 2.0**-24 * (x.double().abs() @ w.double().abs().T)
    return 2.0**-8 * reference.abs() * (1 + 2.0**-7) + summation * (1 + 2.0**-7) + 1e-30


def call(module, x, weight: quant.QuantWeight, bias, kernel):
    return module.qlinear(x, weight.packed, weight.scales, weight.mins, weight.n, weight.bits, bias, kernel)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n, k", SHAPES)
def test_every_kernel_is_within_rounding_of_the_float64_product(module, bits, n, k):
    torch.manual_seed(n + k + bits)
    weight = (quant.quantize4 if bits == 4 else quant.quantize8)(torch.randn(n, k))
    dense = quant.dequantize(weight)
    bias = torch.randn(n).bfloat16()
    x = torch.randn(max(ROWS), k).bfloat16()
    reference = x.double() @ dense.double().T + bias.double()
    for kernel in [0, *module.qkernels()]:  # 0: the automatic choice, one kernel for every row count
        full = call(module, x, weight, bias, kernel)
        assert ((full.double() - reference).abs() <= bound(x, dense, reference)).all(), (kernel, bits)
        for rows in ROWS:  # the same bits for a row whatever the rows around it
            assert torch.equal(call(module, x[:rows], weight, bias, kernel), full[:rows]), (kernel, rows)


def test_on_the_4bit_grid_it_agrees_with_torchs_int4_kernel(module):
    """The reference path (torch's int4 kernel, the fallback) and the kernel hold the same weights
    exactly when they lie on the grid; their outputs differ only by summation order."""
    from test_fast_runner import grid_weight

    weight = grid_weight(48, 96)
    ours = quant.quantize4(weight)
    assert torch.equal(quant.dequantize(ours), weight.float())  # the grid, exactly
    x = torch.randn(32, 96).bfloat16()
    reference = x.double() @ weight.double().T
    old = TorchInt4Linear(weight)(x).double()
    for kernel in module.qkernels():
        new = call(module, x, ours, None, kernel).double()
        assert ((new - reference).abs() <= bound(x, weight, reference)).all()
        assert ((new - old).abs() <= 2 * bound(x, weight, reference)).all()


def test_quantisation_error_is_at_most_half_a_step():
    weight = torch.randn(40, 64)
    groups = weight.view(40, 2, 32)
    step4 = (groups.amax(-1) - groups.amin(-1)) / 15
    error4 = (quant.dequantize(quant.quantize4(weight)) - weight).abs().view(40, 2, 32).amax(-1)
    assert (error4 <= step4 / 2 * (1 + 1e-5)).all()
    step8 = groups.abs().amax(-1) / 127
    error8 = (quant.dequantize(quant.quantize8(weight)) - weight).abs().view(40, 2, 32).amax(-1)
    assert (error8 <= step8 / 2 * (1 + 1e-5)).all()


def test_pack_and_unpack_are_inverse():
    rng = np.random.default_rng(0)
    for bits, low, high in ((4, 0, 16), (8, -128, 128)):
        q = torch.from_numpy(rng.integers(low, high, size=(21, 64)))
        scale, minimum = torch.rand(21, 2), torch.randn(21, 2) if bits == 4 else None
        back = quant.unpack(quant.pack(q, scale, minimum, bits))
        assert torch.equal(back[0], q.int()) and torch.equal(back[1], scale)
        assert bits == 8 or torch.equal(back[2], minimum)


# ---- GGUF blocks, loaded as they are -------------------------------------------------------------
def random_blocks(type_name: str, rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Random bytes in GGUF's block layout with finite fp16 scales: any such bytes are valid blocks."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows, k // block, size), dtype=np.uint8)
    halves = {"Q4_0": 1, "Q4_1": 2, "Q4_K": 2, "Q8_0": 1, "Q5_0": 1, "Q6_K": 0}[type_name]
    scales = rng.uniform(-0.1, 0.1, size=(rows, k // block, max(halves, 1))).astype(np.float16).view(np.uint8)
    if type_name == "Q6_K":  # its fp16 scale is last
        data[..., -2:] = scales.reshape(rows, k // block, 2)
    else:
        data[..., : 2 * halves] = scales.reshape(rows, k // block, 2 * halves)
    return data.reshape(rows, -1)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q5_0"])
def test_gguf_blocks_load_exactly(type_name):
    """The kernel's weights dequantise to what gguf's own dequantisation gives, bit for bit."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    rows, k = 19, 512
    data = random_blocks(type_name, rows, k)
    expected = dequantize(data, GGMLQuantizationType[type_name]).reshape(rows, k)
    weight = quant.from_gguf(data, type_name, (rows, k))
    assert weight.bits == (4 if type_name.startswith("Q4") else 8)
    assert np.array_equal(quant.dequantize(weight).numpy(), expected)


def test_gguf_types_without_a_match_are_requantised_to_8_bits():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    data = random_blocks("Q6_K", 7, 256)
    expected = torch.from_numpy(dequantize(data, GGMLQuantizationType.Q6_K).reshape(7, 256))
    weight = quant.from_gguf(data, "Q6_K", (7, 256))
    step = expected.view(7, 8, 32).abs().amax(-1, keepdim=True) / 127
    assert weight.bits == 8
    assert ((quant.dequantize(weight) - expected).view(7, 8, 32).abs() <= step / 2 * (1 + 1e-5)).all()


def test_the_map_check_allows_requantising_but_not_a_wrong_tensor():
    """A requantised Q6_K weight (Qwen2.5's Q4_K_M has some) matches the model's copy of the same
    file; the same weight against other rows does not."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from tokenrecycle.runners.gguf_weights import _check_matches

    data = random_blocks("Q6_K", 32, 256)
    model_copy = torch.from_numpy(dequantize(data, GGMLQuantizationType.Q6_K).reshape(32, 256)).bfloat16()
    weight = quant.from_gguf(data, "Q6_K", (32, 256))
    _check_matches(weight, model_copy, "blk.0.ffn_down.weight", exact=False)
    with pytest.raises(InvalidOptionError, match="does not match"):
        _check_matches(weight, model_copy.roll(1, dims=0), "blk.0.ffn_down.weight", exact=False)
    with pytest.raises(InvalidOptionError, match="does not match"):  # exact types get no slack
        _check_matches(weight, model_copy, "blk.0.ffn_down.weight", exact=True)


def test_int4_group_is_the_kernels():
    assert INT4_GROUP == quant.GROUP


def test_fused_weights_join_exactly():
    rng = np.random.default_rng(1)
    parts = [quant.quantize4(torch.from_numpy(rng.standard_normal((n, 64)).astype(np.float32))) for n in (32, 16, 21)]
    whole_blocks = quant.concat(parts[:2])
    assert torch.equal(quant.dequantize(whole_blocks), torch.cat([quant.dequantize(p) for p in parts[:2]]))
    ragged = quant.concat(parts)
    assert torch.equal(quant.dequantize(ragged), torch.cat([quant.dequantize(p) for p in parts]))
    assert torch.equal(quant.block_rows(ragged, -1), quant.dequantize(ragged)[64:])


def test_the_cpp_and_python_loops_agree_bit_for_bit_on_the_kernel(module, monkeypatch, one_thread):
    from test_fast_runner import assert_the_loops_agree_bit_for_bit
    from tiny_models import build, tiny_configs
    from tokenrecycle.runners.linear import QMATMUL_SWITCH, QuantLinear

    monkeypatch.setenv(QMATMUL_SWITCH, "1")
    runner = assert_the_loops_agree_bit_for_bit(build(tiny_configs()["llama"]).to(torch.bfloat16), "int4", steps=2)
    assert isinstance(runner._layers[0].qkv, QuantLinear)
