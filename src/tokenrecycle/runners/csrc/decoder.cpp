// The fast runner's decoder layers in one C++ call: the same operations, in the same order, as
// FastRunner's Python loop (fast.py) on the CPU, so the results are bit-identical; what goes is the
// Python interpreter between the operations of each layer, a few ms of every step on a small model.
// The residual additions with the norms after them, and the rotary embedding with the cache
// writes, run fused (fused.h), as the Python loop runs them where this extension is built.

#include <torch/extension.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "fused.h"
#include "qmatmul.h"

namespace {

enum LinearKind : int64_t { kPlain = 0, kPrepacked = 1, kInt4 = 2, kQuant = 3 };
enum Activation : int64_t { kSilu = 0, kGeluTanh = 1 };
constexpr int64_t kInt4Group = 32;  // linear.py's INT4_GROUP

struct Linear {
  at::Tensor weight;                  // plain, oneDNN-prepacked, int4-packed or quant.py-packed
  std::optional<at::Tensor> bias;
  std::optional<at::Tensor> scales;  // int4: scales and zeros; quant: scales
  std::optional<at::Tensor> mins;    // quant: minimums (4 bits)
  int64_t outputs;                   // quant: output features
  int64_t kind;

  at::Tensor operator()(const at::Tensor& x) const {
    if (kind == kPrepacked) {
      static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
      torch::jit::Stack stack{x, weight, bias.has_value() ? c10::IValue(*bias) : c10::IValue(), std::string("none"),
                              c10::List<std::optional<at::Scalar>>(), c10::IValue()};
      op.callBoxed(&stack);
      return stack[0].toTensor();
    }
    if (kind == kQuant) {
      return qmatmul::linear(x, weight, *scales, mins.has_value() ? *mins : at::Tensor(), outputs, weight.size(2) / 64,
                             bias, qmatmul::kAuto);
    }
    if (kind == kInt4) {
      auto y = at::_weight_int4pack_mm_for_cpu(x, weight, kInt4Group, *scales);
      return bias.has_value() ? y + *bias : y;
    }
    return at::linear(x, weight, bias);
  }
};

// fast.py's RMSNorm, fused with the residual addition before it (fused.h): Llama scales after
// casting back, Gemma (weight stored as 1 + w) before. The weight is kept in float32.
struct Norm {
  std::optional<at::Tensor> weight;
  bool gemma;
  double eps;

  bool present() const { return weight.has_value(); }

  at::Tensor operator()(const at::Tensor& x) const {
    return std::get<1>(fused::add_rms_norm(x.contiguous(), std::nullopt, *weight, eps, gemma));
  }

  // x += residual (when defined), and the norm of the sum.
  at::Tensor add_and_norm(at::Tensor& x, const at::Tensor& residual) const {
    auto [sum, normed] = fused::add_rms_norm(x, residual.defined() ? std::optional<at::Tensor>(residual) : std::nullopt,
                                             *weight, eps, gemma);
    x = sum;
    return normed;
  }
};

struct Layer {
  Norm attn_norm, q_norm, k_norm, post_attn_norm, mlp_norm, post_mlp_norm;
  Linear qkv, out, gate_up, down;
  int64_t mask;  // which of the step's masks (one per sliding-window width)
  int64_t rope;  // which rotary table
};

class Decoder {
 public:
  // Per layer, in order: 4 linears (qkv, out, gate_up, down), each as weight, bias, scales, minimums,
  // output count and kind (linear.py's native_parts); 6 norms (attention, q, k, post-attention, MLP, post-MLP) as weight (None where absent)
  // and epsilon; the layer's mask and rotary-table indices.
  Decoder(std::vector<at::Tensor> weights, std::vector<std::optional<at::Tensor>> biases,
          std::vector<std::optional<at::Tensor>> scales, std::vector<std::optional<at::Tensor>> mins,
          std::vector<int64_t> outputs, std::vector<int64_t> kinds, std::vector<std::optional<at::Tensor>> norms, std::vector<double> norm_eps, std::vector<int64_t> masks,
          std::vector<int64_t> ropes, bool gemma, int64_t heads, int64_t kv_heads, int64_t head_dim, double scale,
          int64_t activation)
      : heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), scale_(scale), activation_(activation) {
    TORCH_CHECK(weights.size() == 4 * masks.size() && norms.size() == 6 * masks.size() && norm_eps.size() == norms.size(),
                "inconsistent layer lists");
    auto linear = [&](size_t i) { return Linear{weights[i], biases[i], scales[i], mins[i], outputs[i], kinds[i]}; };
    auto norm = [&](size_t i) {
      auto weight = norms[i].has_value() ? std::optional<at::Tensor>(norms[i]->to(at::kFloat).contiguous()) : std::nullopt;
      return Norm{weight, gemma, norm_eps[i]};
    };
    for (size_t l = 0; l < masks.size(); ++l) {
      layers_.push_back(Layer{norm(6 * l), norm(6 * l + 1), norm(6 * l + 2), norm(6 * l + 3), norm(6 * l + 4),
                              norm(6 * l + 5), linear(4 * l), linear(4 * l + 1), linear(4 * l + 2),
                              linear(4 * l + 3), masks[l], ropes[l]});
    }
  }

  // x: (rows, hidden) embeddings of the tree tokens of one or more sequences, concatenated.
  // Segment s holds sizes[s] rows written at cache slots starts[s].. of keys[s] / values[s], its
  // own cache. cos, sin: per rotary table, (rows, 1, head_dim) rows for the tokens' positions.
  // Per segment and mask (segment-major): the first visible slot, the additive mask (None: none)
  // and whether plain causal attention does instead. The linear layers see all rows at once.
  at::Tensor forward(at::Tensor x, std::vector<at::Tensor> keys, std::vector<at::Tensor> values,
                     std::vector<int64_t> starts, std::vector<int64_t> sizes, std::vector<at::Tensor> cos,
                     std::vector<at::Tensor> sin, std::vector<int64_t> first_keys,
                     std::vector<std::optional<at::Tensor>> masks, std::vector<bool> causal) const {
    c10::InferenceMode guard;
    const size_t segments = starts.size();
    TORCH_CHECK(keys.size() == segments && values.size() == segments && sizes.size() == segments &&
                    first_keys.size() == masks.size() && causal.size() == masks.size() &&
                    masks.size() % std::max<size_t>(segments, 1) == 0,
                "inconsistent segment lists");
    const size_t per_segment = segments ? masks.size() / segments : 0;
    at::Tensor pending;  // the last sublayer's output: added to x by the next norm
    for (size_t index = 0; index < layers_.size(); ++index) {
      const Layer& layer = layers_[index];
      auto h = attention(index, layer, layer.attn_norm.add_and_norm(x, pending), keys, values, starts, sizes,
                         cos[layer.rope], sin[layer.rope], first_keys, masks, causal, per_segment);
      if (layer.post_attn_norm.present()) h = layer.post_attn_norm(h);
      auto gate_up = layer.gate_up(layer.mlp_norm.add_and_norm(x, h)).chunk(2, -1);
      auto act = activation_ == kSilu ? at::silu(gate_up[0]) : at::gelu(gate_up[0], "tanh");
      pending = layer.down(act * gate_up[1]);
      if (layer.post_mlp_norm.present()) pending = layer.post_mlp_norm(pending);
    }
    return pending.defined() ? x + pending : x;
  }

 private:
  at::Tensor attention(size_t index, const Layer& layer, const at::Tensor& x, const std::vector<at::Tensor>& keys,
                       const std::vector<at::Tensor>& values, const std::vector<int64_t>& starts,
                       const std::vector<int64_t>& sizes, const at::Tensor& cos, const at::Tensor& sin,
                       const std::vector<int64_t>& first_keys, const std::vector<std::optional<at::Tensor>>& masks,
                       const std::vector<bool>& causal, size_t per_segment) const {
    const int64_t n = x.size(0);
    auto qkv = layer.qkv(x).view({n, heads_ + 2 * kv_heads_, head_dim_});
    if (layer.q_norm.present()) {
      auto parts = qkv.split_with_sizes({heads_, kv_heads_, kv_heads_}, 1);
      qkv = at::cat({layer.q_norm(parts[0]), layer.k_norm(parts[1]), parts[2]}, 1);
    }
    // Rotated keys and the values go straight into each segment's cache.
    auto q = fused::rotate_into_cache(qkv, cos, sin, heads_, keys, values, starts, sizes, index);
    // Each sequence attends to its own cache: one attention call per segment, on its rows alone.
    std::vector<at::Tensor> outs;
    int64_t row = 0;
    for (size_t s = 0; s < starts.size(); ++s) {
      const int64_t start = starts[s], size = sizes[s];
      const size_t m = s * per_segment + layer.mask;
      auto layer_keys = keys[s].select(0, index), layer_values = values[s].select(0, index);
      auto query = q.narrow(0, row, size).transpose(0, 1).unsqueeze(0);
      auto visible = start + size - first_keys[m];
      auto out = at::scaled_dot_product_attention(query, layer_keys.narrow(1, first_keys[m], visible).unsqueeze(0),
                                                  layer_values.narrow(1, first_keys[m], visible).unsqueeze(0),
                                                  masks[m], 0.0, causal[m], scale_, true);
      outs.push_back(out[0].transpose(0, 1).reshape({size, -1}));
      row += size;
    }
    auto joined = outs.size() == 1 ? outs[0] : at::cat(outs, 0);
    return layer.out(joined.to(x.scalar_type()));
  }

  std::vector<Layer> layers_;
  int64_t heads_, kv_heads_, head_dim_;
  double scale_;
  int64_t activation_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Decoder>(m, "Decoder")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<std::optional<at::Tensor>>,
                          std::vector<std::optional<at::Tensor>>, std::vector<std::optional<at::Tensor>>,
                          std::vector<int64_t>, std::vector<int64_t>, std::vector<std::optional<at::Tensor>>,
                          std::vector<double>, std::vector<int64_t>,
                          std::vector<int64_t>, bool, int64_t, int64_t, int64_t, double, int64_t>())
      .def("forward", &Decoder::forward);
  // The quantised matrix kernel on its own, for linear.py's Python loop and the tests.
  m.def("qlinear", &qmatmul::linear, "y = x @ W.T + bias for quant.py-packed W", pybind11::arg("x"),
        pybind11::arg("packed"), pybind11::arg("scales"), pybind11::arg("mins"), pybind11::arg("n"),
        pybind11::arg("bits"), pybind11::arg("bias"), pybind11::arg("kernel") = 0);
  // The fused per-layer operations, for fast.py's Python loop on the CPU (the same bits as here).
  m.def("add_rms_norm", &fused::add_rms_norm, pybind11::arg("x"), pybind11::arg("residual"), pybind11::arg("weight"),
        pybind11::arg("eps"), pybind11::arg("gemma"));
  m.def("rotate_into_cache", &fused::rotate_into_cache, pybind11::arg("qkv"), pybind11::arg("cos"),
        pybind11::arg("signed_sin"), pybind11::arg("heads"), pybind11::arg("keys"), pybind11::arg("values"),
        pybind11::arg("starts"), pybind11::arg("sizes"), pybind11::arg("layer"));
  m.def("qkernel_name", &qmatmul::kernel_name, pybind11::arg("kernel") = 0);
  m.def("qkernels", &qmatmul::available_kernels);
}
