// The 16-bit float (bf16 or fp16) weight GEMV of float16_gemv.cpp, for the other kernels of this library.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace fastvlm {

// Weights of one row per step: the weight's width must be a multiple of this.
constexpr int64_t kFloat16Step = 16;

// y[M, N] = x[M, K] @ weight[N, K].T with fp32 accumulation, in the weight's dtype (bf16 or
// fp16; x in the same dtype). isa: "auto", "avx512" or "avx2" ("vnni" is taken as "avx512").
at::Tensor float16_mm(const at::Tensor& x, const at::Tensor& weight, const std::string& isa);

}  // namespace fastvlm
