// Weight-only quantised matrix products for a few rows (qmatmul.cpp); quant.py lays the weights out.
#pragma once

#include <torch/extension.h>

namespace qmatmul {

// The kernels, best first; kAuto picks the best one this CPU (and OS) can run.
enum Kernel : int64_t { kAuto = 0, kAmx = 1, kAvx512 = 2, kGeneric = 3 };

// y = x @ W.T (+ bias), x: (rows, k) bfloat16, W: (n, k) as quant.py packs it: `bits` 4 or 8 per
// weight in groups of 32 inputs, w = q * scale + min per group (4 bits: q in 0..15; 8 bits: signed,
// min unused). packed: (n/16, k/32, 16*32*bits/8) bytes, scales and mins: (n/16, k/32, 16) float.
// With an explicit kernel, each row's result is the same whatever the number of rows.
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& mins,
                  int64_t n, int64_t bits, const std::optional<at::Tensor>& bias, int64_t kernel);

// What a kernel (kAuto: the choice for this CPU) runs here, as a name.
std::string kernel_name(int64_t kernel);

// The kernels this machine can run.
std::vector<int64_t> available_kernels();

}  // namespace qmatmul
