"""Quantised weights in the layout of the C++ kernel (csrc/qmatmul.cpp): from a float weight, or
straight from a GGUF's blocks.

A weight of n outputs x k inputs is kept as groups of 32 inputs per output, each group with a
float32 scale and minimum: w = q * scale + min, q in 0..15 (4 bits), or w = q * scale, q in
-128..127 (8 bits). GGUF's Q4_0, Q4_1 and Q4_K blocks (and Q8_0, Q5_0 in 8 bits) are such groups,
so they load without dequantising and re-quantising: the kernel runs the very weights llama.cpp
runs (Q4_K's 6-bit sub-scales times its super-block scale are exact in float32). Other GGUF types
(Q5_1, Q5_K, Q6_K, floats) are dequantised by `gguf` and quantised to 8 bits, the nearest format
that loses least of their 5-6 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

GROUP = 32  # inputs per group: a GGUF Q4/Q8 block
BLOCK = 16  # outputs per kernel block


@dataclass
class QuantWeight:
    """What the kernel reads: packed (n/16, k/32, 16*32*bits/8) uint8, scales and mins
    (n/16, k/32, 16) float32 (mins empty for 8 bits), for n outputs x k inputs."""

    packed: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    n: int
    k: int
    bits: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales, self.mins))


def pack(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None, bits: int) -> QuantWeight:
    """q: (n, k) integers (0..15 for 4 bits, -128..127 for 8), scale and minimum: (n, k/32) float."""
    n, k = q.shape
    if k % GROUP:
        raise ValueError(f"quantised weights need input sizes divisible by {GROUP}, got {k}")
    padded = -(-n // BLOCK) * BLOCK
    groups = k // GROUP

    def blocks(t: torch.Tensor) -> torch.Tensor:  # (n, ...) -> padded with zero outputs
        return torch.cat([t, t.new_zeros(padded - n, *t.shape[1:])]) if padded > n else t

    # B-operand rows: row r of a block holds, per output j, inputs 2r and 2r+1 (word 2j + parity).
    rows = blocks(q.to(torch.int32)).view(padded // BLOCK, BLOCK, groups, GROUP // 2, 2).permute(0, 2, 3, 1, 4)
    rows = rows.reshape(padded // BLOCK, groups, GROUP // 2, 2 * BLOCK)
    if bits == 4:
        packed = _plane(rows)
    elif bits == 8:  # two 4-bit planes: q = 16 * high + low, high signed
        packed = np.concatenate([_plane((rows >> 4) & 15), _plane(rows & 15)], axis=-1)
    else:
        raise ValueError(f"quantised weights have 4 or 8 bits, not {bits}")

    def params(t: torch.Tensor) -> torch.Tensor:
        return blocks(t.float()).view(padded // BLOCK, BLOCK, groups).transpose(1, 2).contiguous()

    mins = params(minimum) if bits == 4 else torch.empty(0)
    return QuantWeight(torch.from_numpy(np.ascontiguousarray(packed)), params(scale), mins, n, k, bits)


def _plane(rows: torch.Tensor) -> np.ndarray:
    """(blocks, groups, 16 rows, 32 words) of nibbles as 256 bytes per block: 4 rows per 64 bytes,
    row 4c + j in nibble j of each 16-bit word of chunk c."""
    nibbles = rows.view(*rows.shape[:2], 4, 4, rows.shape[-1])
    words = sum(nibbles[:, :, :, j] << (4 * j) for j in range(4))
    return words.numpy().astype("<u2").view(np.uint8).reshape(*rows.shape[:2], -1)


def _unplane(raw: np.ndarray) -> torch.Tensor:
    words = torch.from_numpy(np.ascontiguousarray(raw).view("<u2").astype(np.int32)).view(*raw.shape[:2], 4, 2 * BLOCK)
    return torch.stack([(words >> (4 * j)) & 15 for j in range(4)], dim=3).view(*raw.shape[:2], GROUP // 2, 2 * BLOCK)


def unpack(weight: QuantWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """q, scale, min as pack() took them (the inverse of pack, for tests and the fallback)."""
    nb, groups, _ = weight.packed.shape
    raw = weight.packed.numpy()
    if weight.bits == 4:
        rows = _unplane(raw)
    else:
        high, low = _unplane(raw[..., :256]), _unplane(raw[..., 256:])
        rows = 16 * torch.where(high < 8, high, high - 16) + low
    q = rows.view(nb, groups, GROUP // 2, BLOCK, 2).permute(0, 3, 1, 2, 4).reshape(nb * BLOCK, groups * GROUP)

    def params(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(nb * BLOCK, groups)[: weight.n]

    return q[: weight.n], params(weight.scales), params(weight.mins) if weight.bits == 4 else None


def dequantize(weight: QuantWeight) -> torch.Tensor:
    """The float32 weights the kernel multiplies by: q * scale + min, one rounding (as gguf's)."""
    q, scale, minimum = unpack(weight)
    w = q.float().view(weight.n, -1, GROUP) * scale[..., None]
    if minimum is not None:
        w = w + minimum[..., None]
    return w.view(weight.n, weight.k)


# ---- from float weights ------------------------------------------------------------------------
def quantize4(weight: torch.Tensor) -> QuantWeight:
    """Min-max 4 bits per group of 32: scale = (max - min) / 15, q = round((w - min) / scale)."""
    n, k = weight.shape
    groups = weight.detach().float().view(n, k // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    q = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32)
    return pack(q.view(n, k), scale, low, 4)


def quantize8(weight: torch.Tensor) -> QuantWeight:
    """Absmax 8 bits per group of 32 (as GGUF's Q8_0): scale = max |w| / 127, q = round(w / scale)."""
    n, k = weight.shape
    groups = weight.detach().float().view(n, k // GROUP, GROUP)
    scale = (groups.abs().amax(-1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = (groups / scale[..., None]).round().clamp(-127, 127).to(torch.int32)
    return pack(q.view(n, k), scale, None, 8)


# ---- from GGUF blocks --------------------------------------------------------------------------
def _half(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """GGUF's 4-bit order: a block's first half in the low nibbles, its second half in the high."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _from_q4_0(blocks: np.ndarray):
    d = _half(blocks[..., 0:2])
    return _nibbles(blocks[..., 2:18]), d, -8 * d, 4  # (q - 8) * d = q * d + (-8 d), exact


def _from_q4_1(blocks: np.ndarray):
    return _nibbles(blocks[..., 4:20]), _half(blocks[..., 0:2]), _half(blocks[..., 2:4]), 4


def _from_q4_k(blocks: np.ndarray):
    """Super-blocks of 256: per 32-group scale d * sc and minimum -dmin * m (6-bit sc, m)."""
    from gguf.quants import Q4_K

    rows, supers, _ = blocks.shape
    flat = blocks.reshape(rows * supers, -1)
    d, dmin = _half(flat[:, 0:2]), _half(flat[:, 2:4])
    sc, m = Q4_K.get_scale_min(flat[:, 4:16])
    qs = flat[:, 16:].reshape(-1, 4, 32)  # 4 chunks of 32 bytes: groups 2c (low nibbles), 2c + 1 (high)
    q = _nibbles(qs).reshape(rows, supers * 8, 32)
    scale = (d[:, None] * sc.astype(np.float32)).reshape(rows, -1)
    minimum = -(dmin[:, None] * m.astype(np.float32)).reshape(rows, -1)
    return q, scale, minimum, 4


def _from_q8_0(blocks: np.ndarray):
    return blocks[..., 2:34].view(np.int8), _half(blocks[..., 0:2]), None, 8


def _from_q5_0(blocks: np.ndarray):
    """(q5 - 16) * d: signed 5-bit integers, exact in 8 bits with the same scale."""
    d = _half(blocks[..., 0:2])
    high = np.ascontiguousarray(blocks[..., 2:6]).view("<u4")
    bits = (high >> np.arange(32, dtype=np.uint32)) & 1
    q = _nibbles(blocks[..., 6:22]).astype(np.int16) | (bits.astype(np.int16) << 4)
    return (q - 16).astype(np.int8), d, None, 8


# GGUF types that map onto the kernel's groups exactly: bytes per block and the decoder.
EXACT = {"Q4_0": (18, _from_q4_0), "Q4_1": (20, _from_q4_1), "Q4_K": (144, _from_q4_k), "Q8_0": (34, _from_q8_0), "Q5_0": (22, _from_q5_0)}


def from_gguf(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> QuantWeight:
    """A GGUF tensor's raw bytes (n rows of bytes, as GGUFReader gives them) in the kernel's
    layout: exactly for the types in EXACT, else dequantised by gguf and quantised to 8 bits."""
    n, k = shape
    if type_name not in EXACT:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as gguf_dequantize

        dense = gguf_dequantize(np.asarray(data), GGMLQuantizationType[type_name]).reshape(n, k)
        return quantize8(torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32)))
    size, decode = EXACT[type_name]
    blocks = np.asarray(data, dtype=np.uint8).reshape(n, -1, size)
    q, scale, minimum, bits = decode(blocks)
    q = torch.from_numpy(np.ascontiguousarray(q).reshape(n, k).astype(np.int32))
    scale = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(n, k // GROUP))
    if minimum is not None:
        minimum = torch.from_numpy(np.ascontiguousarray(minimum, dtype=np.float32).reshape(n, k // GROUP))
    return pack(q, scale, minimum, bits)


# ---- rearranging -------------------------------------------------------------------------------
def block_rows(weight: QuantWeight, block: int) -> torch.Tensor:
    """The dequantised rows of one block of 16 outputs (a cheap look at a large weight)."""
    block = block % weight.packed.shape[0]
    n = min(BLOCK, weight.n - block * BLOCK)
    part = QuantWeight(
        weight.packed[block : block + 1], weight.scales[block : block + 1],
        weight.mins[block : block + 1] if weight.bits == 4 else weight.mins, n, weight.k, weight.bits,
    )  # fmt: skip
    return dequantize(part)


def concat(weights: list[QuantWeight]) -> QuantWeight:
    """Outputs of several weights over the same inputs as one weight (fused q/k/v, gate/up): exact
    where their formats agree; beside 8-bit parts, 4-bit ones are requantised to 8 bits (close to
    exact: 8 bits per group hold a 4-bit group's 16 levels to within half an 8-bit step)."""
    if len(weights) == 1:
        return weights[0]
    bits = {w.bits for w in weights}
    if len(bits) == 1 and all(w.n % BLOCK == 0 for w in weights):  # whole blocks: join as they are
        return QuantWeight(
            torch.cat([w.packed for w in weights]), torch.cat([w.scales for w in weights]),
            torch.cat([w.mins for w in weights]), sum(w.n for w in weights), weights[0].k, weights[0].bits,
        )  # fmt: skip
    if len(bits) > 1:  # mixed formats (a Q4_K_M file): requantise the dequantised 4-bit parts to 8
        weights = [w if w.bits == 8 else quantize8(dequantize(w)) for w in weights]
    parts = [unpack(w) for w in weights]
    minimum = None if weights[0].bits == 8 else torch.cat([p[2] for p in parts])
    return pack(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), minimum, weights[0].bits)
