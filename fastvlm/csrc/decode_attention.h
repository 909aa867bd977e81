// Attention of one new query position over a key/value cache (decode_attention.cpp).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastvlm {

// query [B, heads, 1, D]; keys, values [B, kv_heads, L, D] (views of the cache buffers, the last
// dimension contiguous); mask [B, 1, 1, L] bool (true: attend) or none. Returns [B, heads, 1, D] in
// the query's dtype: softmax(q k^T * scale) v, each group of heads / kv_heads query heads sharing
// one key/value head. Cases the kernel does not take, and every case when `kernel` is false, go to
// ATen's scaled_dot_product_attention.
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                            const std::optional<at::Tensor>& mask, double scale, bool kernel = true);

}  // namespace fastvlm
