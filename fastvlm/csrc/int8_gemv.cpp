// Int8 weight-only matrix-vector products for batch-1 decode on x86-64 CPUs.
//
// A decode step multiplies one activation row by every decoder weight, so its speed is the rate
// at which the weights stream from memory. Stored as int8 they are a quarter of the fp32 bytes,
// but ATen's kernel for them (_weight_int8pack_mm) reads about 10 GB/s on a 2-core Xeon where
// fp32 GEMV reads 21, and it rounds the activations to bf16. This kernel keeps the activations in
// fp32 and lays the weight out so that it is read as one forward stream:
//
//   packed[g, c, r, :] = q[8 * g + r, 16 * c : 16 * c + 16]      shape [ceil(N / 8), K / 16, 8, 16]
//
// (the rows past N of the last group are zero and their outputs are not written; K must be a
// multiple of 16, which every Qwen2 width is).
//
// A group of 8 output rows is one contiguous block: each 128-byte step holds the next 16 weights
// of all 8 rows, which are multiplied against the same 16 activations. Software prefetch into L2
// a few kilobytes ahead keeps enough reads in flight for the stream to approach the memory's pace.
// Output n of row m is  scales[n] * sum_k q[n, k] * x[m, k],  accumulated in fp32.
//
// Two instruction sets are compiled into the same library and picked at run time: AVX-512F
// (16 lanes) and AVX2 + FMA (8 lanes). A CPU with neither is reported by int8_gemv_isa() as
// "none", and the Python side then uses ATen's kernel.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>

namespace {

constexpr int64_t kGroupRows = 8;      // output rows per contiguous block
constexpr int64_t kChunk = 16;         // weights of one row per step
constexpr int64_t kRowsPerPass = 3;   // activation rows per pass over a block (AVX-512: 24 accumulators)
constexpr int64_t kPrefetchBytes = 8192;  // how far ahead of the read the prefetch runs (measured: 2-16 KB all pay, T1 beats T0)

enum class Isa { none = 0, avx2 = 1, avx512 = 2 };

Isa detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;
  return Isa::none;
}

// The CPU does not change under a running process: detect once, not on every call.
Isa best_isa() {
  static const Isa detected = detect_isa();
  return detected;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "none";
  }
}

// The 8 dot products of one block with each of ROWS activation rows (x rows are K apart), into
// out[m * stride + r]. Each int8 weight is widened to fp32 once and used for all ROWS rows: the
// widening, not the FMA, is the costly part, so a batch of rows shares it.
template <int ROWS>
__attribute__((target("avx512f"))) void block_dot_avx512(const int8_t* block, const float* x, int64_t K, float* out,
                                                          int64_t stride) {
  __m512 acc[ROWS][kGroupRows];
  for (int m = 0; m < ROWS; ++m)
    for (int r = 0; r < kGroupRows; ++r) acc[m][r] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += kChunk) {
    _mm_prefetch(reinterpret_cast<const char*>(block + kPrefetchBytes), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(block + kPrefetchBytes + 64), _MM_HINT_T1);
    __m512 xv[ROWS];
    for (int m = 0; m < ROWS; ++m) xv[m] = _mm512_loadu_ps(x + m * K + k);
    for (int r = 0; r < kGroupRows; ++r) {
      const __m128i w8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(block + kChunk * r));
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(w8));
      for (int m = 0; m < ROWS; ++m) acc[m][r] = _mm512_fmadd_ps(w, xv[m], acc[m][r]);
    }
    block += kChunk * kGroupRows;
  }
  for (int m = 0; m < ROWS; ++m)
    for (int r = 0; r < kGroupRows; ++r) out[m * stride + r] = _mm512_reduce_add_ps(acc[m][r]);
}

__attribute__((target("avx2,fma"))) float sum_lanes_avx2(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
}

// One activation row at a time: AVX2 has 16 registers, and 8 accumulators plus the operands fill them.
__attribute__((target("avx2,fma"))) void block_dot_avx2(const int8_t* block, const float* x, int64_t K, float* out) {
  __m256 acc[kGroupRows];
  for (int r = 0; r < kGroupRows; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += kChunk) {
    _mm_prefetch(reinterpret_cast<const char*>(block + kPrefetchBytes), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(block + kPrefetchBytes + 64), _MM_HINT_T1);
    const __m256 x_lo = _mm256_loadu_ps(x + k);
    const __m256 x_hi = _mm256_loadu_ps(x + k + 8);
    for (int r = 0; r < kGroupRows; ++r) {
      const int8_t* w = block + kChunk * r;
      const __m256 w_lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w))));
      const __m256 w_hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + 8))));
      acc[r] = _mm256_fmadd_ps(w_hi, x_hi, _mm256_fmadd_ps(w_lo, x_lo, acc[r]));
    }
    block += kChunk * kGroupRows;
  }
  for (int r = 0; r < kGroupRows; ++r) out[r] = sum_lanes_avx2(acc[r]);
}

Isa resolve(const std::string& isa) {
  const Isa available = best_isa();
  if (isa == "auto") return available;
  const Isa wanted = isa == "avx512" ? Isa::avx512 : isa == "avx2" ? Isa::avx2 : Isa::none;
  TORCH_CHECK(wanted != Isa::none, "int8_gemv: unknown instruction set '", isa, "'; expected auto, avx512 or avx2");
  TORCH_CHECK(static_cast<int>(wanted) <= static_cast<int>(available), "int8_gemv: this CPU has no ", isa,
              " (best available: ", isa_name(available), ")");
  return wanted;
}

// y[M, N] = x[M, K] @ dequantized(packed, scales).T, in fp32.
at::Tensor int8_packed_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, std::string isa) {
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu() && scales.device().is_cpu(),
              "int8_packed_mm: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2, "int8_packed_mm: x must be 2-D float32, got ",
              x.scalar_type(), " with ", x.dim(), " dims");
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 4 && packed.size(2) == kGroupRows &&
                  packed.size(3) == kChunk,
              "int8_packed_mm: packed must be int8 [ceil(N/8), K/16, 8, 16], got ", packed.scalar_type(), " ",
              packed.sizes());
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 1,
              "int8_packed_mm: scales must be 1-D float32, got ", scales.scalar_type(), " ", scales.sizes());
  const int64_t groups = packed.size(0), K = packed.size(1) * kChunk, N = scales.size(0), M = x.size(0);
  TORCH_CHECK(groups == (N + kGroupRows - 1) / kGroupRows, "int8_packed_mm: ", N, " scales need ",
              (N + kGroupRows - 1) / kGroupRows, " row groups, the packed weight has ", groups);
  TORCH_CHECK(x.size(1) == K, "int8_packed_mm: x has ", x.size(1), " columns, the weight ", K);
  const Isa chosen = resolve(isa);
  TORCH_CHECK(chosen != Isa::none, "int8_packed_mm: this CPU has neither AVX-512F nor AVX2+FMA");

  const at::Tensor xc = x.contiguous(), pc = packed.contiguous(), sc = scales.contiguous();
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = xc.data_ptr<float>();
  const int8_t* qp = pc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // 16 blocks (128 rows) per task at least: a k or v projection of 128 rows stays on one thread.
  at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
    float sums[kRowsPerPass * kGroupRows];
    for (int64_t g = begin; g < end; ++g) {
      const int8_t* block = qp + g * kGroupRows * K;
      const int64_t rows = std::min(kGroupRows, N - g * kGroupRows);
      for (int64_t m = 0; m < M;) {  // the block stays in L1/L2 across the passes over the rows of x
        const int64_t pass = chosen == Isa::avx512 ? std::min<int64_t>(kRowsPerPass, M - m) : 1;
        const float* xm = xp + m * K;
        if (chosen == Isa::avx2) block_dot_avx2(block, xm, K, sums);
        else if (pass == 3) block_dot_avx512<3>(block, xm, K, sums, kGroupRows);
        else if (pass == 2) block_dot_avx512<2>(block, xm, K, sums, kGroupRows);
        else block_dot_avx512<1>(block, xm, K, sums, kGroupRows);
        for (int64_t i = 0; i < pass; ++i)
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t n = g * kGroupRows + r;
            yp[(m + i) * N + n] = sums[i * kGroupRows + r] * sp[n];
          }
        m += pass;
      }
    }
  });
  return y;
}

std::string int8_gemv_isa() { return isa_name(best_isa()); }

}  // namespace

TORCH_LIBRARY(fastvlm_native, m) {
  m.def("int8_packed_mm(Tensor x, Tensor packed, Tensor scales, str isa='auto') -> Tensor");
  m.def("int8_gemv_isa() -> str", &int8_gemv_isa);
}

TORCH_LIBRARY_IMPL(fastvlm_native, CPU, m) { m.impl("int8_packed_mm", int8_packed_mm); }
