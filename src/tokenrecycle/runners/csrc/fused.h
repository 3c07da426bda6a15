// Small per-layer operations of the decoder fused into one pass each (fused.cpp), for the C++ loop
// and the Python loop on the CPU alike, so both still give the same bits.
#pragma once

#include <torch/extension.h>

namespace fused {

// (x + residual, RMSNorm(x + residual)) for rows of x (residual: None adds nothing and the first
// result is x). The sum is rounded to x's dtype, as an addition there would be; the norm is then
// computed in float32: Llama (gemma false) rounds x * rsqrt(mean(x^2) + eps) to x's dtype before
// scaling by the weight, Gemma scales first. weight: float32, the norm's own weight (Gemma: 1 + w).
// x: float32, bfloat16 or float16, contiguous rows.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps, bool gemma);

// Rotary embedding of the queries and keys of qkv, (rows, heads + 2 * kv_heads, head_dim), as
// x * cos + roll(x, head_dim / 2) * signed_sin with each product and the sum rounded to qkv's
// dtype (the three tensor operations this replaces give the same bits); the rotated keys and the
// values are written straight into the caches: segment s's `sizes[s]` rows at slots starts[s]..
// of layer `layer` of keys[s] / values[s], (layers, kv_heads, capacity, head_dim) float32. cos,
// signed_sin: (rows, 1, head_dim) in qkv's dtype. Returns the rotated queries, (rows, heads,
// head_dim) float32, the dtype attention runs in on the CPU.
at::Tensor rotate_into_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& signed_sin, int64_t heads,
                             const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values,
                             const std::vector<int64_t>& starts, const std::vector<int64_t>& sizes, int64_t layer);

}  // namespace fused
