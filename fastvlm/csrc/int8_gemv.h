// The int8 weight-only matrix product of int8_gemv.cpp, for the other kernels of this library.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace fastvlm {

// y[M, N] = x[M, K] @ (packed int8 weight * scales[:, None]).T in fp32; packed is
// [ceil(N/8), K/16, 8, 16] (fastvlm.linears.pack_rows), x and scales are float32.
at::Tensor int8_packed_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, std::string isa);

}  // namespace fastvlm
