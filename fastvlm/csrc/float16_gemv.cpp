// Matrix-vector products with 16-bit float weights (bf16 or fp16) for decode on x86-64 CPUs.
//
// A decode step multiplies a few activation rows by every decoder weight, so its speed is the
// rate at which the weights stream from memory, and 16-bit weights should halve the fp32 step.
// ATen does not get there on every CPU: F.linear with one bf16 row takes a GEMM path no faster
// than fp32, and torch.mv's reduced-precision kernel reads 8-9 GB/s on a 2-core Xeon without AMX
// where fp32 GEMV reads 28 (measured with torch 2.13). This kernel reads the weight in its own
// row-major [N, K] layout (so the module's parameter and state dict are unchanged):
//
//   y[m, n] = sum_k float(w[n, k]) * float(x[m, k])      accumulated in fp32, rounded to x's dtype
//
// Eight output rows are read side by side, 16 weights of each per step; every weight is widened
// to fp32 once (a shift for bf16, vcvtph2ps for fp16) and used for up to three activation rows
// (AVX-512; AVX2 takes one at a time). The product of two 16-bit floats is exact in fp32, so the
// only roundings are the accumulation's (16 or 8 lanes per output row, summed at the end) and the
// final conversion, as in ATen's kernels,
// which sum in another order: results agree with torch.mv to fp32 rounding, not bit for bit.
//
// Two instruction sets are compiled in and chosen at run time: AVX-512F (16 lanes) and
// AVX2 + FMA + F16C (8 lanes). K must be a multiple of 16 (every Qwen2 width is); the caller
// (fastvlm.linears.GemvLinear) sends anything else to ATen.

#include "float16_gemv.h"

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

constexpr int64_t kRows = 8;           // output rows read side by side
constexpr int64_t kStep = fastvlm::kFloat16Step;  // weights of each row per step
constexpr int64_t kActivationRows = 3; // activation rows per pass (AVX-512: 24 accumulators)
constexpr int64_t kMinTaskBytes = 64 * 1024;  // weight bytes per thread at least

// 16 weights at p widened to fp32.
template <typename T>
__attribute__((target("avx512f"))) inline __m512 load16_avx512(const uint16_t* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  if constexpr (std::is_same_v<T, at::BFloat16>)
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
  else
    return _mm512_cvtph_ps(raw);
}

// 8 weights at p widened to fp32.
template <typename T>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8_avx2(const uint16_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if constexpr (std::is_same_v<T, at::BFloat16>)
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
  else
    return _mm256_cvtph_ps(raw);
}

// What to prefetch while a group is read: the next group's bytes (none: nothing), taken in order,
// as many per step as the step reads.
struct Ahead {
  const char* next = nullptr;
  int64_t bytes = 0;

  // The span [from, from + size) of the next group, clipped to it, into L2.
  void fetch(int64_t from, int64_t size) const {
    for (int64_t offset = from; offset < std::min(from + size, bytes); offset += 64)
      _mm_prefetch(next + offset, _MM_HINT_T1);
  }
};

// out[m * stride + r] = dot(weight row r, x row m) for the ROWS_OUT rows at w (K apart) and the
// ROWS activation rows at x (K apart). The rows are read side by side, so the hardware sees
// ROWS_OUT short streams; a software prefetch of the next group (ahead), as many bytes per step
// as the step reads, keeps one long stream in flight instead (measured: 19 -> 26 GB/s at K = 896).
template <typename T, int ROWS_OUT, int ROWS>
__attribute__((target("avx512f"))) void rows_dot_avx512(const uint16_t* w, const float* x, int64_t K, float* out,
                                                         int64_t stride, const Ahead& ahead) {
  __m512 acc[ROWS][ROWS_OUT];
  for (int m = 0; m < ROWS; ++m)
    for (int r = 0; r < ROWS_OUT; ++r) acc[m][r] = _mm512_setzero_ps();
  constexpr int64_t kStepBytes = ROWS_OUT * kStep * 2;
  for (int64_t k = 0; k < K; k += kStep) {
    ahead.fetch(k / kStep * kStepBytes, kStepBytes);
    __m512 xv[ROWS];
    for (int m = 0; m < ROWS; ++m) xv[m] = _mm512_loadu_ps(x + m * K + k);
    for (int r = 0; r < ROWS_OUT; ++r) {
      const __m512 wv = load16_avx512<T>(w + r * K + k);
      for (int m = 0; m < ROWS; ++m) acc[m][r] = _mm512_fmadd_ps(wv, xv[m], acc[m][r]);
    }
  }
  for (int m = 0; m < ROWS; ++m)
    for (int r = 0; r < ROWS_OUT; ++r) out[m * stride + r] = _mm512_reduce_add_ps(acc[m][r]);
}

// One activation row: AVX2's 16 registers hold 8 accumulators and the operands.
template <typename T, int ROWS_OUT>
__attribute__((target("avx2,fma,f16c"))) void rows_dot_avx2(const uint16_t* w, const float* x, int64_t K, float* out,
                                                             const Ahead& ahead) {
  __m256 acc[ROWS_OUT];
  for (int r = 0; r < ROWS_OUT; ++r) acc[r] = _mm256_setzero_ps();
  constexpr int64_t kStepBytes = ROWS_OUT * 8 * 2;
  for (int64_t k = 0; k < K; k += 8) {
    ahead.fetch(k / 8 * kStepBytes, kStepBytes);
    const __m256 xv = _mm256_loadu_ps(x + k);
    for (int r = 0; r < ROWS_OUT; ++r) acc[r] = _mm256_fmadd_ps(load8_avx2<T>(w + r * K + k), xv, acc[r]);
  }
  for (int r = 0; r < ROWS_OUT; ++r) out[r] = fastvlm::sum_lanes_avx2(acc[r]);
}

// rows (< kRows at the end of the weight, else kRows) output rows at w against activation row(s);
// the first pass over them prefetches the next group (ahead), the others find it in cache.
template <typename T>
void group_avx512(const uint16_t* w, int64_t rows, const float* x, int64_t M, int64_t K, float* sums,
                  const Ahead& ahead) {
  const Ahead none;
  for (int64_t m = 0; m < M;) {
    const int64_t pass = std::min(kActivationRows, M - m);
    const Ahead& fetch = m == 0 ? ahead : none;
    float* out = sums + m * kRows;
    const float* xm = x + m * K;
    if (rows == kRows) {
      if (pass == 3) rows_dot_avx512<T, kRows, 3>(w, xm, K, out, kRows, fetch);
      else if (pass == 2) rows_dot_avx512<T, kRows, 2>(w, xm, K, out, kRows, fetch);
      else rows_dot_avx512<T, kRows, 1>(w, xm, K, out, kRows, fetch);
    } else {  // the last group: nothing after it
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < pass; ++i) rows_dot_avx512<T, 1, 1>(w + r * K, xm + i * K, K, out + i * kRows + r, 1, none);
    }
    m += pass;
  }
}

template <typename T>
void group_avx2(const uint16_t* w, int64_t rows, const float* x, int64_t M, int64_t K, float* sums,
                const Ahead& ahead) {
  const Ahead none;
  for (int64_t m = 0; m < M; ++m) {
    if (rows == kRows) rows_dot_avx2<T, kRows>(w, x + m * K, K, sums + m * kRows, m == 0 ? ahead : none);
    else
      for (int64_t r = 0; r < rows; ++r) rows_dot_avx2<T, 1>(w + r * K, x + m * K, K, sums + m * kRows + r, none);
  }
}

template <typename T>
at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, Isa isa) {
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0), groups = (N + kRows - 1) / kRows;
  // x widened here and y written in T directly: no tensor made for either (a step makes 169 of these calls)
  const at::Tensor xc = x.contiguous();
  const T* xp = xc.data_ptr<T>();
  std::vector<float> xf(M * K);
  for (int64_t i = 0; i < M * K; ++i) xf[i] = static_cast<float>(xp[i]);
  at::Tensor y = at::empty({M, N}, x.options());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  T* yp = y.data_ptr<T>();
  // Tasks of 64 KB of weights at least: a 128 x 896 k or v projection (229 KB) is still split between
  // two threads (measured: 15 -> 11 us), where waking a thread for less costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, kMinTaskBytes / (kRows * K * int64_t(sizeof(uint16_t))));
  at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> sums(M * kRows);
    for (int64_t g = begin; g < end; ++g) {
      const int64_t rows = std::min(kRows, N - g * kRows);
      const uint16_t* w = wp + g * kRows * K;
      Ahead ahead;  // the next group, if any: its rows (the last group may have fewer than kRows) as bytes
      if (g + 1 < groups) {
        ahead.next = reinterpret_cast<const char*>(w + kRows * K);
        ahead.bytes = std::min(kRows, N - (g + 1) * kRows) * K * int64_t(sizeof(uint16_t));
      }
      if (isa == Isa::avx2) group_avx2<T>(w, rows, xf.data(), M, K, sums.data(), ahead);
      else group_avx512<T>(w, rows, xf.data(), M, K, sums.data(), ahead);
      for (int64_t m = 0; m < M; ++m)
        for (int64_t r = 0; r < rows; ++r) yp[m * N + g * kRows + r] = T(sums[m * kRows + r]);  // round to nearest even
    }
  });
  return y;
}

}  // namespace

namespace fastvlm {

at::Tensor float16_mm(const at::Tensor& x, const at::Tensor& weight, const std::string& isa) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "float16_mm: CPU tensors only");
  const auto dtype = weight.scalar_type();
  TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "float16_mm: the weight must be bfloat16 or float16, got ",
              dtype);
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "float16_mm: the weight must be a contiguous 2-D [N, K], got ",
              weight.sizes(), weight.is_contiguous() ? "" : " (not contiguous)");
  TORCH_CHECK(x.dim() == 2, "float16_mm: x must be 2-D [M, K], got ", x.dim(), " dims");
  TORCH_CHECK(x.scalar_type() == dtype, "float16_mm: x must have the weight's dtype ", dtype, ", got ", x.scalar_type());
  const int64_t K = weight.size(1);
  TORCH_CHECK(x.size(1) == K, "float16_mm: x has ", x.size(1), " columns, the weight ", K);
  TORCH_CHECK(K % kStep == 0 && K > 0, "float16_mm: the weight's width (", K, ") must be a positive multiple of ",
              kStep);
  Isa chosen = resolve_isa(isa, "float16_mm");
  if (chosen == Isa::vnni) chosen = Isa::avx512;  // integer dot products do not apply to float weights
  TORCH_CHECK(chosen == Isa::avx512 || chosen == Isa::avx2, "float16_mm: this CPU has neither AVX-512F nor AVX2+FMA+F16C");
  return dtype == at::kBFloat16 ? gemv<at::BFloat16>(x, weight, chosen) : gemv<at::Half>(x, weight, chosen);
}

}  // namespace fastvlm

// The instruction set float16_mm runs here: "avx512", "avx2" or "none" (VNNI adds nothing for float weights).
std::string float16_gemv_isa() { return fastvlm::isa_name(fastvlm::best_float_isa()); }

TORCH_LIBRARY_FRAGMENT(fastvlm_native, m) {
  m.def("float16_mm(Tensor x, Tensor weight, str isa='auto') -> Tensor");
  m.def("float16_gemv_isa() -> str", &float16_gemv_isa);
}

TORCH_LIBRARY_IMPL(fastvlm_native, CPU, m) { m.impl("float16_mm", fastvlm::float16_mm); }
