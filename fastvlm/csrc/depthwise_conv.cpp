// Depthwise convolutions on channels-last fp32 maps, for the fused FastViTHD tower on x86-64 CPUs.
//
// FastViTHD mixes tokens with depthwise k x k convolutions (RepMixer 3x3, ConvFFN 7x7, RepCPE
// 7x7) and downsamples with a strided 7x7 one whose channel multiplier is 2. They are 2% of the
// tower's FLOPs but were 9% of its time at 1024 px on a 2-core Xeon (torch 2.13): oneDNN ran the
// 7x7 over a 64 x 64 x 384 map at 87 GFLOP/s, against the 300 its matmuls reach, and a multiplier
// of 2 needs the input copied with every channel repeated first (fastvlm.vision.kernels).
//
// A depthwise conv is a sum of k*k products per output value with no reuse across channels, so
// this kernel reuses along the row instead: for each output row and block of 16 (AVX-512) or 8
// (AVX2) channels, a strip of 8 (AVX2: 4) neighbouring outputs is accumulated in registers; each
// input vector of a kernel row is loaded once and multiplied into every output of the strip it
// touches, with the kernel row's weights held in registers (AVX-512; AVX2's 16 registers read
// them from L1 instead). The weights are re-laid out per call as [k][k][channels] (tens of KB)
// so one vector load reads a tap of a channel block. Borders read zeros (padding k / 2); the
// channels past the last full block are masked. Inside the tower most maps arrive from memory
// rather than cache, so the gain there is smaller than alone (README: 1.01-1.07x per call).
//
//   y[n, oh, ow, c] = bias[c] + sum_{i,j} w[c, i, j] * x[n, oh*s + i - k/2, ow*s + j - k/2, c / m]
//
// with m = 1 or 2 (the channel multiplier: output channel c reads input channel c / m) and stride
// s = 1 or 2. Sums are in the taps' order (row by row) in fp32 with fused multiply-adds, so
// results agree with oneDNN's and ATen's to fp32 rounding, not bit for bit. An optional GELU is
// applied to each output row by ATen's own kernel while the row is in cache.
//
// Kernel sides 3, 5 and 7 are compiled in; the caller (fastvlm.vision.kernels) sends others to torch.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_isa.h"

namespace {

using fastvlm::Isa;

// Where one output row of one image reads and writes.
struct Row {
  const float* x;    // input image [H][W][Cin]
  int64_t H, W, Cin;
  const float* w;    // weights [k][k][Cpad]
  const float* bias; // [Cpad] (zeros where the conv has none)
  int64_t Cpad;
  float* y;          // output row [Wo][Cout]
  int64_t Wo, Cout;
  int64_t oh;
};

// One output row: strips of STRIP neighbouring outputs, then the last outputs one by one; each
// over every block of LANES channels in turn, so that a strip's outputs are written, and its
// inputs read, in address order. strip(width, checked, ow, c0, lanes) computes one block of
// one strip, width an std::integral_constant; checked says that some of its taps fall outside
// the map (they read zero).
template <int K, int S, int STRIP, int LANES, typename Strip>
void walk_row(const Row& r, Strip strip) {
  constexpr int P = K / 2;
  // outputs whose taps all fall inside the map: ow*S - P >= 0 and ow*S - P + K - 1 < W
  const int64_t inner_begin = std::min<int64_t>(r.Wo, (P + S - 1) / S);
  const int64_t inner_end = r.W - K + P < 0 ? inner_begin
                                            : std::max(inner_begin, std::min<int64_t>(r.Wo, (r.W - K + P) / S + 1));
  const auto blocks = [&](auto width, bool checked, int64_t ow) {
    for (int64_t c0 = 0; c0 < r.Cout; c0 += LANES) strip(width, checked, ow, c0, std::min<int64_t>(LANES, r.Cout - c0));
  };
  int64_t ow = 0;
  for (; ow + STRIP <= r.Wo; ow += STRIP)
    blocks(std::integral_constant<int, STRIP>{}, ow < inner_begin || ow + STRIP > inner_end, ow);
  for (; ow < r.Wo; ++ow) blocks(std::integral_constant<int, 1>{}, true, ow);
}

// ---------------------------------------------------------------------------- AVX-512

// The input vector feeding output channels c0..c0+15 at p (p points at input channel c0 / M);
// in_mask: the input channels there that exist.
template <int M>
__attribute__((target("avx512f"))) inline __m512 input16(const float* p, __mmask16 in_mask) {
  if constexpr (M == 1) {
    return _mm512_maskz_loadu_ps(in_mask, p);
  } else {  // channels c0 / 2 .. c0 / 2 + 7, each twice
    const __m256 v = _mm512_castps512_ps256(_mm512_maskz_loadu_ps(in_mask, p));
    const __m512i twice = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    return _mm512_permutexvar_ps(twice, _mm512_castps256_ps512(v));
  }
}

// STRIP outputs ow0 .. ow0+STRIP-1 of channel block c0 (lanes under mask). CHECK: some input
// column of the strip lies outside the map (the taps there read zero).
template <int K, int S, int M, int STRIP, bool CHECK>
__attribute__((target("avx512f"))) void strip_avx512(const Row& r, int64_t ow0, int64_t c0, __mmask16 mask,
                                                      __mmask16 in_mask) {
  constexpr int P = K / 2;
  const __m512 b = _mm512_loadu_ps(r.bias + c0);
  __m512 acc[STRIP];
  #pragma GCC unroll 32
  for (int o = 0; o < STRIP; ++o) acc[o] = b;
  const int64_t col0 = ow0 * S - P;  // input column of tap j = 0 of the strip's first output
  #pragma GCC unroll 8
  for (int i = 0; i < K; ++i) {
    const int64_t ih = r.oh * S + i - P;
    if (ih < 0 || ih >= r.H) continue;
    const float* line = r.x + ih * r.W * r.Cin + c0 / M;
    __m512 w[K];
    #pragma GCC unroll 32
    for (int j = 0; j < K; ++j) w[j] = _mm512_loadu_ps(r.w + (i * K + j) * r.Cpad + c0);
    // input column col0 + t feeds output o through tap j = t - o*S
    #pragma GCC unroll 32
    for (int t = 0; t < (STRIP - 1) * S + K; ++t) {
      const int64_t col = col0 + t;
      if (CHECK && (col < 0 || col >= r.W)) continue;
      const __m512 v = input16<M>(line + col * r.Cin, in_mask);
      #pragma GCC unroll 32
      for (int o = 0; o < STRIP; ++o) {
        const int j = t - o * S;
        if (j >= 0 && j < K) acc[o] = _mm512_fmadd_ps(v, w[j], acc[o]);
      }
    }
  }
  #pragma GCC unroll 32
  for (int o = 0; o < STRIP; ++o) _mm512_mask_storeu_ps(r.y + (ow0 + o) * r.Cout + c0, mask, acc[o]);
}

template <int K, int S, int M>
void row_avx512(const Row& r) {
  walk_row<K, S, 8, 16>(r, [&](auto width, bool checked, int64_t ow, int64_t c0, int64_t lanes) {
    constexpr int kWidth = decltype(width)::value;
    const __mmask16 mask = static_cast<__mmask16>((1u << lanes) - 1u);
    const __mmask16 in_mask = static_cast<__mmask16>((1u << ((lanes + M - 1) / M)) - 1u);
    if (checked) strip_avx512<K, S, M, kWidth, true>(r, ow, c0, mask, in_mask);
    else strip_avx512<K, S, M, kWidth, false>(r, ow, c0, mask, in_mask);
  });
}

// ---------------------------------------------------------------------------- AVX2

__attribute__((target("avx2,fma"))) inline __m256i lane_mask8(int64_t lanes) {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(lanes)), index);
}

// The input vector feeding output channels c0..c0+7 (lanes of them) at p (input channel c0 / M).
template <int M>
__attribute__((target("avx2,fma"))) inline __m256 input8(const float* p, int64_t lanes) {
  if constexpr (M == 1) {
    return _mm256_maskload_ps(p, lane_mask8(lanes));
  } else {  // channels c0 / 2 .. c0 / 2 + 3, each twice
    const __m256 v = _mm256_maskload_ps(p, lane_mask8((lanes + 1) / 2));
    return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3));
  }
}

template <int K, int S, int M, int STRIP, bool CHECK>
__attribute__((target("avx2,fma"))) void strip_avx2(const Row& r, int64_t ow0, int64_t c0, int64_t lanes) {
  constexpr int P = K / 2;
  const __m256i store_mask = lane_mask8(lanes);
  const __m256 b = _mm256_loadu_ps(r.bias + c0);
  __m256 acc[STRIP];
  #pragma GCC unroll 32
  for (int o = 0; o < STRIP; ++o) acc[o] = b;
  const int64_t col0 = ow0 * S - P;
  #pragma GCC unroll 8
  for (int i = 0; i < K; ++i) {
    const int64_t ih = r.oh * S + i - P;
    if (ih < 0 || ih >= r.H) continue;
    const float* line = r.x + ih * r.W * r.Cin + c0 / M;
    const float* taps = r.w + i * K * r.Cpad + c0;
    #pragma GCC unroll 32
    for (int t = 0; t < (STRIP - 1) * S + K; ++t) {
      const int64_t col = col0 + t;
      if (CHECK && (col < 0 || col >= r.W)) continue;
      const __m256 v = input8<M>(line + col * r.Cin, lanes);
      #pragma GCC unroll 32
      for (int o = 0; o < STRIP; ++o) {
        const int j = t - o * S;
        if (j >= 0 && j < K) acc[o] = _mm256_fmadd_ps(v, _mm256_loadu_ps(taps + j * r.Cpad), acc[o]);
      }
    }
  }
  #pragma GCC unroll 32
  for (int o = 0; o < STRIP; ++o) _mm256_maskstore_ps(r.y + (ow0 + o) * r.Cout + c0, store_mask, acc[o]);
}

template <int K, int S, int M>
void row_avx2(const Row& r) {
  walk_row<K, S, 4, 8>(r, [&](auto width, bool checked, int64_t ow, int64_t c0, int64_t lanes) {
    constexpr int kWidth = decltype(width)::value;
    if (checked) strip_avx2<K, S, M, kWidth, true>(r, ow, c0, lanes);
    else strip_avx2<K, S, M, kWidth, false>(r, ow, c0, lanes);
  });
}

// ---------------------------------------------------------------------------- dispatch

using RowFn = void (*)(const Row&);

template <int K, int S, int M>
RowFn pick(Isa isa) {
  return isa == Isa::avx2 ? &row_avx2<K, S, M> : &row_avx512<K, S, M>;
}

template <int K>
RowFn pick(Isa isa, int64_t stride, int64_t multiplier) {
  if (stride == 1) return multiplier == 1 ? pick<K, 1, 1>(isa) : pick<K, 1, 2>(isa);
  return multiplier == 1 ? pick<K, 2, 1>(isa) : pick<K, 2, 2>(isa);
}

RowFn pick(Isa isa, int64_t kernel, int64_t stride, int64_t multiplier) {
  switch (kernel) {
    case 3: return pick<3>(isa, stride, multiplier);
    case 5: return pick<5>(isa, stride, multiplier);
    default: return pick<7>(isa, stride, multiplier);
  }
}

}  // namespace

namespace fastvlm {

at::Tensor depthwise_conv2d(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            int64_t stride, bool gelu, const std::string& isa) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "depthwise_conv2d: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "depthwise_conv2d: float32 input and weight only, got ", x.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK(x.dim() == 4, "depthwise_conv2d: x must be [N, C, H, W], got ", x.dim(), " dims");
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == 1 && weight.size(2) == weight.size(3),
              "depthwise_conv2d: the weight must be [C_out, 1, k, k], got ", weight.sizes());
  const int64_t K = weight.size(2), Cin = x.size(1), Cout = weight.size(0);
  TORCH_CHECK(K == 3 || K == 5 || K == 7, "depthwise_conv2d: kernel side ", K, " is not compiled in (3, 5 or 7)");
  TORCH_CHECK(stride == 1 || stride == 2, "depthwise_conv2d: stride must be 1 or 2, got ", stride);
  TORCH_CHECK(Cin > 0 && x.size(2) > 0 && x.size(3) > 0, "depthwise_conv2d: x must have channels and pixels, got ",
              x.sizes());
  TORCH_CHECK(Cout == Cin || Cout == 2 * Cin, "depthwise_conv2d: ", Cout, " output channels from ", Cin,
              " inputs; expected a channel multiplier of 1 or 2");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == Cout && bias->scalar_type() == at::kFloat,
                "depthwise_conv2d: the bias must be float32 [", Cout, "], got ", bias->sizes());
  const Isa chosen = resolve_isa(isa, "depthwise_conv2d");
  TORCH_CHECK(chosen != Isa::none, "depthwise_conv2d: this CPU has neither AVX-512F nor AVX2+FMA+F16C");

  const int64_t N = x.size(0), H = x.size(2), W = x.size(3), P = K / 2;
  const int64_t Ho = (H + 2 * P - K) / stride + 1, Wo = (W + 2 * P - K) / stride + 1;
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  // [C_out, 1, k, k] -> [k, k, Cpad], zero-padded to whole vectors, and the bias likewise
  const int64_t Cpad = (Cout + 15) / 16 * 16;
  std::vector<float> taps(K * K * Cpad, 0.0f), shift(Cpad, 0.0f);
  const at::Tensor wc = weight.contiguous();
  const float* wp = wc.data_ptr<float>();
  for (int64_t t = 0; t < K * K; ++t)
    for (int64_t c = 0; c < Cout; ++c) taps[t * Cpad + c] = wp[c * K * K + t];
  if (bias.has_value()) {
    const at::Tensor bc = bias->contiguous();
    std::copy(bc.data_ptr<float>(), bc.data_ptr<float>() + Cout, shift.begin());
  }

  at::Tensor y = at::empty({N, Cout, Ho, Wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const float* xp = xc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const RowFn row = pick(chosen, K, stride, Cout / Cin);
  at::parallel_for(0, N * Ho, 1, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const int64_t n = index / Ho, oh = index % Ho;
      float* out = yp + (n * Ho + oh) * Wo * Cout;
      row(Row{xp + n * H * W * Cin, H, W, Cin, taps.data(), shift.data(), Cpad, out, Wo, Cout, oh});
      if (gelu) {
        at::Tensor row_out = at::from_blob(out, {Wo * Cout}, at::TensorOptions().dtype(at::kFloat));
        at::gelu_(row_out);
      }
    }
  });
  return y;
}

}  // namespace fastvlm

// The instruction set depthwise_conv2d runs here: "avx512", "avx2" or "none".
std::string depthwise_conv_isa() { return fastvlm::isa_name(fastvlm::best_float_isa()); }

TORCH_LIBRARY_FRAGMENT(fastvlm_native, m) {
  m.def("depthwise_conv2d(Tensor x, Tensor weight, Tensor? bias, int stride=1, bool gelu=False, str isa='auto') -> Tensor");
  m.def("depthwise_conv_isa() -> str", &depthwise_conv_isa);
}

TORCH_LIBRARY_IMPL(fastvlm_native, CPU, m) { m.impl("depthwise_conv2d", fastvlm::depthwise_conv2d); }
