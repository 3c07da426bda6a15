// Fused per-row operations (fused.h): one pass over each row instead of a handful of tensor
// operations, each of which costs a few microseconds of dispatch and allocation on its own, most
// of a small model's step on the CPU when the tree is small.

#include "fused.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>

// Plain loops over float32 rows, which GCC vectorises at -O3 (the extension builds at -O2).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("O3")
#endif

namespace fused {
namespace {

constexpr int64_t kLanes = 16;             // partial sums: a vectorisable reduction without -ffast-math
constexpr int64_t kGrainValues = 1 << 15;  // values per thread before at::parallel_for splits rows

// Conversions written as bit operations the compiler can vectorise; the same rounding (to nearest,
// ties to even) as c10::BFloat16 and torch's kernels.
inline float widen(float v) { return v; }
inline float widen(c10::Half v) { return static_cast<float>(v); }
inline float widen(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

template <typename T>
T round_to(float v);
template <>
inline float round_to<float>(float v) { return v; }
template <>
inline c10::Half round_to<c10::Half>(float v) { return static_cast<c10::Half>(v); }
template <>
inline c10::BFloat16 round_to<c10::BFloat16>(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const bool nan = (bits & 0x7fffffffu) > 0x7f800000u;
  return c10::BFloat16(static_cast<uint16_t>(nan ? 0x7fc0u : rounded), c10::BFloat16::from_bits());
}

// One row: sum = x + residual rounded to T (or x), out = the norm of sum. `work`: d floats.
template <typename T>
void add_norm_row(const T* x, const T* residual, T* sum, T* out, const float* weight, int64_t d, float eps, bool gemma,
                  float* work) {
  if (residual != nullptr) {
    for (int64_t i = 0; i < d; ++i) sum[i] = round_to<T>(widen(x[i]) + widen(residual[i]));
    x = sum;
  }
  for (int64_t i = 0; i < d; ++i) work[i] = widen(x[i]);
  float lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += work[i + l] * work[i + l];
  for (; i < d; ++i) lanes[0] += work[i] * work[i];
  float squares = 0.0f;
  for (float lane : lanes) squares += lane;
  const float scale = 1.0f / std::sqrt(squares / static_cast<float>(d) + eps);
  if (gemma) {
    for (int64_t j = 0; j < d; ++j) out[j] = round_to<T>(work[j] * scale * weight[j]);
  } else {
    for (int64_t j = 0; j < d; ++j) out[j] = round_to<T>(widen(round_to<T>(work[j] * scale)) * weight[j]);
  }
}

// One head of one row rotated: x * cos + roll(x, d / 2) * signed_sin, each step rounded to T.
template <typename T>
void rotate_head(const T* x, const T* cos, const T* signed_sin, float* to, int64_t half) {
  auto term = [](T a, T b) { return widen(round_to<T>(widen(a) * widen(b))); };
  for (int64_t j = 0; j < half; ++j)
    to[j] = widen(round_to<T>(term(x[j], cos[j]) + term(x[j + half], signed_sin[j])));
  for (int64_t j = half; j < 2 * half; ++j)
    to[j] = widen(round_to<T>(term(x[j], cos[j]) + term(x[j - half], signed_sin[j])));
}

template <typename F>
void for_dtype(at::ScalarType dtype, const char* what, F&& body) {
  switch (dtype) {
    case at::kFloat: return body(float{});
    case at::kBFloat16: return body(c10::BFloat16{});
    case at::kHalf: return body(c10::Half{});
    default: TORCH_CHECK(false, what, ": float32, bfloat16 or float16 only, got ", dtype);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                                const at::Tensor& weight, double eps, bool gemma) {
  const int64_t d = x.size(-1);
  TORCH_CHECK(x.is_contiguous() && weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == d,
              "add_rms_norm: contiguous rows and a float32 weight of their width");
  TORCH_CHECK(!residual.has_value() || (residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type()),
              "add_rms_norm: the residual has the rows' shape and dtype");
  const at::Tensor added = residual.has_value() ? residual->contiguous() : at::Tensor();
  at::Tensor sum = residual.has_value() ? at::empty_like(x) : x;
  at::Tensor out = at::empty_like(x);
  const int64_t rows = d ? x.numel() / d : 0;
  for_dtype(x.scalar_type(), "add_rms_norm", [&](auto tag) {
    using T = decltype(tag);
    const T* source = x.const_data_ptr<T>();
    const T* extra = residual.has_value() ? added.const_data_ptr<T>() : nullptr;
    T* sums = sum.data_ptr<T>();
    T* outs = out.data_ptr<T>();
    const float* w = weight.const_data_ptr<float>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainValues / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
      std::vector<float> work(d);
      for (int64_t r = begin; r < end; ++r)
        add_norm_row<T>(source + r * d, extra ? extra + r * d : nullptr, sums + r * d, outs + r * d, w, d,
                        static_cast<float>(eps), gemma, work.data());
    });
  });
  return {sum, out};
}

at::Tensor rotate_into_cache(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& signed_sin, int64_t heads,
                             const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values,
                             const std::vector<int64_t>& starts, const std::vector<int64_t>& sizes, int64_t layer) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.is_contiguous(), "rotate_into_cache: qkv is (rows, heads, head_dim), contiguous");
  const int64_t rows = qkv.size(0), all_heads = qkv.size(1), d = qkv.size(2), half = d / 2;
  const int64_t kv_heads = (all_heads - heads) / 2;
  TORCH_CHECK(d % 2 == 0 && heads + 2 * kv_heads == all_heads, "rotate_into_cache: heads + 2 kv_heads of even width");
  TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && signed_sin.scalar_type() == qkv.scalar_type() &&
                  cos.size(0) == rows && signed_sin.size(0) == rows && cos.size(-1) == d && signed_sin.size(-1) == d &&
                  cos.stride(-1) == 1 && signed_sin.stride(-1) == 1,
              "rotate_into_cache: a rotary row per row, in qkv's dtype");
  TORCH_CHECK(keys.size() == starts.size() && values.size() == starts.size() && sizes.size() == starts.size(),
              "rotate_into_cache: a cache, start and size per segment");
  int64_t total = 0;
  for (size_t s = 0; s < keys.size(); ++s) {
    for (const at::Tensor* cache : {&keys[s], &values[s]})
      TORCH_CHECK(cache->scalar_type() == at::kFloat && cache->dim() == 4 && cache->size(1) == kv_heads &&
                      cache->size(3) == d && cache->stride(3) == 1 && starts[s] >= 0 &&
                      starts[s] + sizes[s] <= cache->size(2) && layer >= 0 && layer < cache->size(0),
                  "rotate_into_cache: float32 caches (layers, kv_heads, capacity, head_dim) with room for the rows");
    total += sizes[s];
  }
  TORCH_CHECK(total == rows, "rotate_into_cache: the segments' sizes add up to the rows");
  at::Tensor queries = at::empty({rows, heads, d}, qkv.options().dtype(at::kFloat));
  // Each row's segment and slot in that segment's cache.
  std::vector<int64_t> segment_of(rows), slot_of(rows);
  for (int64_t s = 0, row = 0; s < static_cast<int64_t>(starts.size()); ++s)
    for (int64_t i = 0; i < sizes[s]; ++i, ++row) segment_of[row] = s, slot_of[row] = starts[s] + i;
  for_dtype(qkv.scalar_type(), "rotate_into_cache", [&](auto tag) {
    using T = decltype(tag);
    float* q_out = queries.data_ptr<float>();
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainValues / (all_heads * d)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* row = qkv.const_data_ptr<T>() + r * all_heads * d;
        const T* c = cos.const_data_ptr<T>() + r * cos.stride(0);
        const T* s = signed_sin.const_data_ptr<T>() + r * signed_sin.stride(0);
        const at::Tensor& k_cache = keys[segment_of[r]];
        const at::Tensor& v_cache = values[segment_of[r]];
        for (int64_t h = 0; h < heads + kv_heads; ++h) {
          const T* x = row + h * d;
          float* to = h < heads ? q_out + (r * heads + h) * d
                                : k_cache.data_ptr<float>() + layer * k_cache.stride(0) + (h - heads) * k_cache.stride(1) +
                                      slot_of[r] * k_cache.stride(2);
          rotate_head<T>(x, c, s, to, half);
        }
        for (int64_t h = 0; h < kv_heads; ++h) {
          const T* x = row + (heads + kv_heads + h) * d;
          float* to = v_cache.data_ptr<float>() + layer * v_cache.stride(0) + h * v_cache.stride(1) + slot_of[r] * v_cache.stride(2);
          for (int64_t j = 0; j < d; ++j) to[j] = widen(x[j]);
        }
      }
    });
  });
  return queries;
}

}  // namespace fused
