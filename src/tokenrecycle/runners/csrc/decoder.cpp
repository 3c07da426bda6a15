// The fast runner's decoder layers in one C++ call: the same ATen operations, in the same order,
// as FastRunner's Python loop (fast.py), so the results are bit-identical; what goes is the Python
// interpreter between the ~35 operations of each layer, a few ms of every step on a small model.

#include <torch/extension.h>
#include <ATen/core/dispatch/Dispatcher.h>

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

// fast.py's RMSNorm: Llama scales after casting back, Gemma (weight stored as 1 + w, float32) before.
struct Norm {
  std::optional<at::Tensor> weight;
  bool gemma;
  double eps;

  bool present() const { return weight.has_value(); }

  at::Tensor operator()(const at::Tensor& x) const {
    if (gemma) return at::rms_norm(x.to(at::kFloat), {x.size(-1)}, weight, eps).to(x.scalar_type());
    return *weight * at::rms_norm(x.to(at::kFloat), {x.size(-1)}, std::nullopt, eps).to(x.scalar_type());
  }
};

struct Layer {
  Norm attn_norm, q_norm, k_norm, post_attn_norm, mlp_norm, post_mlp_norm;
  Linear qkv, out, gate_up, down;
  int64_t mask;  // which of the step's masks (one per sliding-window width)
  int64_t rope;  // which rotary table
};

at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& signed_sin) {
  return x * cos + x.roll({x.size(-1) / 2}, {-1}) * signed_sin;
}

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
    auto norm = [&](size_t i) { return Norm{norms[i], gemma, norm_eps[i]}; };
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
    for (size_t index = 0; index < layers_.size(); ++index) {
      const Layer& layer = layers_[index];
      auto h = attention(index, layer, layer.attn_norm(x), keys, values, starts, sizes, cos[layer.rope],
                         sin[layer.rope], first_keys, masks, causal, per_segment);
      if (layer.post_attn_norm.present()) h = layer.post_attn_norm(h);
      x = x + h;
      auto gate_up = layer.gate_up(layer.mlp_norm(x)).chunk(2, -1);
      auto act = activation_ == kSilu ? at::silu(gate_up[0]) : at::gelu(gate_up[0], "tanh");
      h = layer.down(act * gate_up[1]);
      if (layer.post_mlp_norm.present()) h = layer.post_mlp_norm(h);
      x = x + h;
    }
    return x;
  }

 private:
  at::Tensor attention(size_t index, const Layer& layer, const at::Tensor& x, const std::vector<at::Tensor>& keys,
                       const std::vector<at::Tensor>& values, const std::vector<int64_t>& starts,
                       const std::vector<int64_t>& sizes, const at::Tensor& cos, const at::Tensor& sin,
                       const std::vector<int64_t>& first_keys, const std::vector<std::optional<at::Tensor>>& masks,
                       const std::vector<bool>& causal, size_t per_segment) const {
    const int64_t n = x.size(0);
    auto qkv = layer.qkv(x).view({n, heads_ + 2 * kv_heads_, head_dim_});
    at::Tensor q, k, v;
    if (!layer.q_norm.present()) {  // rotate queries and keys together
      auto parts = qkv.split_with_sizes({heads_ + kv_heads_, kv_heads_}, 1);
      auto rotated = rotate(parts[0], cos, sin).split_with_sizes({heads_, kv_heads_}, 1);
      q = rotated[0], k = rotated[1], v = parts[1];
    } else {
      auto parts = qkv.split_with_sizes({heads_, kv_heads_, kv_heads_}, 1);
      q = rotate(layer.q_norm(parts[0]), cos, sin), k = rotate(layer.k_norm(parts[1]), cos, sin), v = parts[2];
    }
    // Each sequence attends to its own cache: one attention call per segment, on its rows alone.
    std::vector<at::Tensor> outs;
    int64_t row = 0;
    for (size_t s = 0; s < starts.size(); ++s) {
      const int64_t start = starts[s], size = sizes[s];
      const size_t m = s * per_segment + layer.mask;
      auto layer_keys = keys[s].select(0, index), layer_values = values[s].select(0, index);
      layer_keys.narrow(1, start, size).copy_(k.narrow(0, row, size).transpose(0, 1));
      layer_values.narrow(1, start, size).copy_(v.narrow(0, row, size).transpose(0, 1));
      auto query = q.narrow(0, row, size).transpose(0, 1).unsqueeze(0).to(keys[s].scalar_type());
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
  m.def("qkernel_name", &qmatmul::kernel_name, pybind11::arg("kernel") = 0);
  m.def("qkernels", &qmatmul::available_kernels);
}
