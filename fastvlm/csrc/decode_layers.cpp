// Every decoder layer of one Qwen2 decode step, called once from Python instead of layer by layer.
//
// A decode step of FastVLM-0.5B makes about 1,000 small tensor operations around its 168
// weight reads (norms, rotary embedding, the key/value write, attention, residual adds). From
// Python each costs a few microseconds of interpreter and dispatch on top of its work, which
// adds up to about 10 ms a step on a 2-core Xeon: a third of an int8 step. This function makes
// the same calls, in the same order and with the same arguments, as fastvlm.decoding.CachedDecoder's
// Python loop (transformers' Qwen2RMSNorm, rotary embedding and MLP, the linear layers' own forwards,
// and decode_attention.cpp's attention), so its results are bit for bit those of that loop, and only
// the overhead goes. The tests compare the two with torch.equal.
//
// Each linear layer arrives as three tensors (weight, scales, bias) and a kind saying which
// forward it mirrors:
//   kLinear  nn.Linear:              F.linear(x, weight, bias)
//   kMv      fastvlm.linears.GemvLinear (bf16/fp16) where our GEMV kernel cannot run: torch.mv
//            for one row of the weight's dtype, then + bias; F.linear otherwise
//   kFloat16 fastvlm.linears.GemvLinear where it can: our bf16/fp16 kernel (float16_gemv.cpp) for
//            up to float16_max_rows rows of the weight's dtype, then + bias; F.linear otherwise
//   kInt8    fastvlm.linears.Int8WeightOnlyLinear with a packed weight: our int8 kernel on the
//            rows as float32 (scales given as float32), back to x's dtype, then + bias
// Python (fastvlm.decoding.NativeLayers) decides which layers qualify and falls back to its
// own loop for anything else.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "decode_attention.h"
#include "float16_gemv.h"
#include "int8_gemv.h"

namespace {

enum Kind : int64_t { kLinear = 0, kMv = 1, kInt8 = 2, kFloat16 = 3 };

constexpr int64_t kLinearsPerLayer = 7;   // q, k, v, o, gate, up, down
constexpr int64_t kTensorsPerLinear = 3;  // weight (or packed int8 weight), scales (int8 only), bias
constexpr int64_t kTensorsPerLayer = kLinearsPerLayer * kTensorsPerLinear + 2;  // and the two norm weights
enum Slot : int64_t { kQ = 0, kK, kV, kO, kGate, kUp, kDown };

using Tensors = c10::List<std::optional<at::Tensor>>;

at::Tensor with_last_dim(const at::Tensor& like, int64_t last, const at::Tensor& flat) {
  std::vector<int64_t> shape(like.sizes().begin(), like.sizes().end());
  shape.back() = last;
  return flat.reshape(shape);
}

class Layers {
 public:
  Layers(const Tensors& tensors, c10::IntArrayRef kinds, int64_t float16_max_rows)
      : tensors_(tensors), kinds_(kinds), float16_max_rows_(float16_max_rows) {}

  at::Tensor tensor(int64_t layer, int64_t index) const {
    const std::optional<at::Tensor> t = tensors_.get(layer * kTensorsPerLayer + index);
    TORCH_CHECK(t.has_value(), "decode_layers: layer ", layer, " lacks tensor ", index);
    return *t;
  }

  // One linear layer's forward on x, as the module of that kind computes it.
  at::Tensor linear(int64_t layer, Slot slot, const at::Tensor& x) const {
    const int64_t base = layer * kTensorsPerLayer + slot * kTensorsPerLinear;
    const int64_t kind = kinds_[layer * kLinearsPerLayer + slot];
    const at::Tensor weight = tensor(layer, slot * kTensorsPerLinear);
    const std::optional<at::Tensor> scales = tensors_.get(base + 1), bias = tensors_.get(base + 2);
    TORCH_CHECK(kind >= kLinear && kind <= kFloat16, "decode_layers: layer ", layer, " linear ", slot, " has kind ",
                kind, "; expected 0 (F.linear), 1 (torch.mv), 2 (int8) or 3 (bf16/fp16 kernel)");
    TORCH_CHECK(kind != kInt8 || scales.has_value(), "decode_layers: layer ", layer, " linear ", slot,
                " is int8 but has no scales");
    switch (kind) {
      case kMv:
        if (x.numel() == x.size(-1) && x.scalar_type() == weight.scalar_type()) {
          at::Tensor out = at::mv(weight, x.reshape({-1}));
          if (bias.has_value()) out = out + *bias;
          return with_last_dim(x, weight.size(0), out);
        }
        return at::linear(x, weight, bias);
      case kFloat16: {
        const int64_t rows = x.numel() / x.size(-1);
        if (rows <= float16_max_rows_ && x.scalar_type() == weight.scalar_type()) {
          at::Tensor out = fastvlm::float16_mm(x.reshape({rows, x.size(-1)}), weight, "auto");
          if (bias.has_value()) out = out + *bias;
          return with_last_dim(x, weight.size(0), out);
        }
        return at::linear(x, weight, bias);
      }
      case kInt8: {
        const int64_t in = weight.size(1) * fastvlm::kInt8PackChunk, out_features = scales->size(0);
        const at::Tensor flat = x.reshape({x.numel() / in, in}).to(at::kFloat);
        at::Tensor out = with_last_dim(x, out_features, fastvlm::int8_packed_mm(flat, weight, *scales, "auto").to(x.scalar_type()));
        if (bias.has_value()) out = out + bias->to(out.scalar_type());
        return out;
      }
      default:
        return at::linear(x, weight, bias);
    }
  }

 private:
  const Tensors& tensors_;
  c10::IntArrayRef kinds_;
  int64_t float16_max_rows_;
};

// transformers' Qwen2RMSNorm.
at::Tensor rms_norm(const at::Tensor& hidden, const at::Tensor& weight, double eps) {
  const at::Tensor h = hidden.to(at::kFloat);
  const at::Tensor variance = h.pow(2).mean(-1, /*keepdim=*/true);
  return weight * (h * at::rsqrt(variance + eps)).to(hidden.scalar_type());
}

// transformers' rotate_half and apply_rotary_pos_emb (cos and sin already unsqueezed over heads).
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  const at::Tensor rotated = at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

// hidden [B, 1, H] through every layer; keys[i] and values[i] [B, kv_heads, capacity, head_dim]
// hold `length` cached positions, and this step's key and value go into column `length`.
at::Tensor decode_layers(const at::Tensor& hidden_in, const at::Tensor& cos_in, const at::Tensor& sin_in,
                         const std::optional<at::Tensor>& mask, at::TensorList keys, at::TensorList values,
                         int64_t length, const Tensors& tensors, c10::IntArrayRef kinds, c10::ArrayRef<double> eps,
                         int64_t heads, int64_t kv_heads, int64_t head_dim, c10::ArrayRef<double> scaling,
                         int64_t float16_max_rows, bool native_attention) {
  const int64_t layers = static_cast<int64_t>(keys.size());
  TORCH_CHECK(static_cast<int64_t>(values.size()) == layers, "decode_layers: ", keys.size(), " key buffers but ",
              values.size(), " value buffers");
  TORCH_CHECK(static_cast<int64_t>(tensors.size()) == layers * kTensorsPerLayer, "decode_layers: expected ",
              layers * kTensorsPerLayer, " tensors for ", layers, " layers, got ", tensors.size());
  TORCH_CHECK(static_cast<int64_t>(kinds.size()) == layers * kLinearsPerLayer, "decode_layers: expected ",
              layers * kLinearsPerLayer, " linear kinds, got ", kinds.size());
  TORCH_CHECK(static_cast<int64_t>(eps.size()) == 2 * layers, "decode_layers: expected ", 2 * layers,
              " norm epsilons, got ", eps.size());
  TORCH_CHECK(static_cast<int64_t>(scaling.size()) == layers, "decode_layers: expected ", layers,
              " attention scalings, got ", scaling.size());
  TORCH_CHECK(hidden_in.dim() == 3 && hidden_in.size(1) == 1, "decode_layers: hidden must be [B, 1, H], got ",
              hidden_in.sizes());
  for (int64_t i = 0; i < layers; ++i)
    TORCH_CHECK(keys[i].size(2) > length && values[i].size(2) > length, "decode_layers: layer ", i,
                "'s buffers hold ", keys[i].size(2), " positions, no room for position ", length);

  const Layers weights(tensors, kinds, float16_max_rows);
  const int64_t batch = hidden_in.size(0), end = length + 1;
  const at::Tensor cos = cos_in.unsqueeze(1), sin = sin_in.unsqueeze(1);
  at::Tensor hidden = hidden_in;
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor x = rms_norm(hidden, weights.tensor(i, kTensorsPerLayer - 2), eps[2 * i]);
    const at::Tensor query = weights.linear(i, kQ, x).view({batch, 1, heads, head_dim}).transpose(1, 2);
    const at::Tensor key = weights.linear(i, kK, x).view({batch, 1, kv_heads, head_dim}).transpose(1, 2);
    const at::Tensor value = weights.linear(i, kV, x).view({batch, 1, kv_heads, head_dim}).transpose(1, 2);
    keys[i].slice(2, length, end).copy_(rotate(key, cos, sin));
    values[i].slice(2, length, end).copy_(value);
    const at::Tensor attended = fastvlm::decode_attention(rotate(query, cos, sin), keys[i].slice(2, 0, end),
                                                         values[i].slice(2, 0, end), mask, scaling[i],
                                                         native_attention);
    hidden = hidden + weights.linear(i, kO, attended.transpose(1, 2).reshape({batch, 1, heads * head_dim}));
    const at::Tensor y = rms_norm(hidden, weights.tensor(i, kTensorsPerLayer - 1), eps[2 * i + 1]);
    hidden = hidden + weights.linear(i, kDown, at::silu(weights.linear(i, kGate, y)) * weights.linear(i, kUp, y));
  }
  return hidden;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastvlm_native, m) {
  m.def(
      "decode_layers(Tensor hidden, Tensor cos, Tensor sin, Tensor? mask, Tensor(a!)[] keys, Tensor(b!)[] values, int length, "
      "Tensor?[] tensors, int[] kinds, float[] eps, int heads, int kv_heads, int head_dim, float[] scaling, "
      "int float16_max_rows, bool native_attention) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastvlm_native, CPU, m) { m.impl("decode_layers", decode_layers); }
