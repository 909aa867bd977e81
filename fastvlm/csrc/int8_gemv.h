// The int8 weight-only matrix product of int8_gemv.cpp, for the other kernels of this library.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace fastvlm {

// Weights of one row per step of the packed layout: the packed weight's last dimension, K / its second.
constexpr int64_t kInt8PackChunk = 16;

// y[M, N] = x[M, K] @ (packed int8 weight * scales[:, None]).T in fp32; packed is
// [ceil(N/8), K/16, 8, 16] (fastvlm.linears.pack_rows), x and scales are float32.
at::Tensor int8_packed_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, std::string isa);

}  // namespace fastvlm
