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
// Output n of row m is  scales[n] * sum_k q[n, k] * x[m, k].
//
// Widening each weight to fp32 for an FMA costs three instructions per 16 weights, enough to hold
// the stream about 25% below the pace of a plain read. On CPUs with AVX-512 VNNI the products are
// taken in integers instead, exactly: each activation row is written as a 28-bit fixed-point
// integer (scaled by its largest magnitude) made non-negative by an offset of 2^27, split into
// four base-128 digits, and vpdpbusd multiplies 64 weights by 64 digits and sums them in int32
// lanes in one instruction (5 per 64 weights with the row sums the offset needs, against 12).
// The digit sums are combined in double, exactly (integers below 2^53), and scaled once at the
// end, so what rounds is the activation, to 28 bits of its row's largest magnitude (finer than
// fp32's own 24 bits for every value within 16x of that largest one), and the two float64
// multiplications by the scales and the conversion to fp32; the fp32-FMA paths round at every
// step and are, measured against float64, a few times less exact. Rows holding inf or NaN, and
// rows wider than kVnniMaxK, take the AVX-512 FMA path (which propagates inf and NaN).
//
// Three instruction sets are compiled into the same library and picked at run time: AVX-512 VNNI,
// AVX-512F (16 fp32 lanes) and AVX2 + FMA (8 lanes; detected with F16C, see cpu_isa.h). A CPU with none is reported by
// int8_gemv_isa() as "none", and the Python side then uses ATen's kernel.

#include "int8_gemv.h"

#include "cpu_isa.h"

#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace {

constexpr int64_t kGroupRows = 8;      // output rows per contiguous block
constexpr int64_t kChunk = fastvlm::kInt8PackChunk;  // weights of one row per step
constexpr int64_t kRowsPerPass = 3;   // activation rows per pass over a block (AVX-512: 24 accumulators)
constexpr int64_t kPrefetchBytes = 8192;  // how far ahead of the read the prefetch runs (measured: 2-16 KB all pay, T1 beats T0)

constexpr int64_t kDigits = 4;         // base-128 digits per activation (VNNI path)
constexpr int64_t kDigitBits = 7;
constexpr int64_t kOffset = int64_t(1) << (kDigits * kDigitBits - 1);  // 2^27: every activation made non-negative
// Widest row the VNNI path takes: a row's digit sum, 127 * 127 * K at most, must fit int32 (the
// four lanes of a row are added in int32), which holds to K = 133,143; every Qwen2 width is far below.
constexpr int64_t kVnniMaxK = int64_t(1) << 17;

using fastvlm::Isa;
using fastvlm::best_isa;
using fastvlm::isa_name;

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
  for (int r = 0; r < kGroupRows; ++r) out[r] = fastvlm::sum_lanes_avx2(acc[r]);
}

// One activation row as kDigits planes of K base-128 digits (most significant first) of
// round(x / scale) + kOffset, with scale = max |x| / (kOffset - 1), so every value is in
// [1, 2^28 - 1]. Returns the scale, or 0 when the row holds inf or NaN (it then keeps the fp32 path).
__attribute__((target("avx512f,avx512dq"))) double split_row(const float* row, int64_t K, uint8_t* planes) {
  __m512 largest = _mm512_setzero_ps();
  __mmask16 not_a_number = 0;
  for (int64_t k = 0; k < K; k += kChunk) {
    const __m512 v = _mm512_loadu_ps(row + k);
    largest = _mm512_max_ps(largest, _mm512_abs_ps(v));
    not_a_number |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  }
  const float top = _mm512_reduce_max_ps(largest);
  if (not_a_number || !std::isfinite(top)) return 0.0;
  const double scale = top > 0.0f ? double(top) / double(kOffset - 1) : 1.0;
  const __m512d inverse = _mm512_set1_pd(1.0 / scale);
  const __m512i offset = _mm512_set1_epi64(kOffset), digit = _mm512_set1_epi64(127);
  for (int64_t k = 0; k < K; k += 8) {
    const __m512d v = _mm512_mul_pd(_mm512_cvtps_pd(_mm256_loadu_ps(row + k)), inverse);
    __m512i value = _mm512_add_epi64(_mm512_cvtpd_epi64(v), offset);  // rounded to nearest
    for (int64_t d = kDigits - 1; d >= 0; --d, value = _mm512_srli_epi64(value, kDigitBits))
      _mm_storel_epi64(reinterpret_cast<__m128i*>(planes + d * K + k), _mm512_cvtepi64_epi8(_mm512_and_si512(value, digit)));
  }
  return scale;
}

// The four row sums of a 4-row accumulator (row r's sum spread over the int32 lanes of 128-bit
// chunk r), as doubles: exact, since every sum here is an integer below 2^53.
__attribute__((target("avx512f"))) inline __m256d row_totals(__m512i acc) {
  acc = _mm512_add_epi32(acc, _mm512_shuffle_epi32(acc, _MM_PERM_BADC));
  acc = _mm512_add_epi32(acc, _mm512_shuffle_epi32(acc, _MM_PERM_CDAB));
  const __m512i first_lanes = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
  return _mm256_cvtepi32_pd(_mm512_castsi512_si128(_mm512_permutexvar_epi32(first_lanes, acc)));
}

// The 8 exact integer dot products of one block with each of ROWS digit rows (planes of row m at
// digits + m * kDigits * K), offset removed: out[m * kGroupRows + r] = sum_k q[r, k] * round(x[m, k] / scale).
// A 64-byte load holds 16 weights of 4 rows; vpdpbusd sums each row's products into the 4 int32
// lanes of its 128-bit chunk (their sum at most 127 * 127 * K, within int32 for K <= kVnniMaxK).
template <int ROWS>
__attribute__((target("avx512f,avx512vnni,fma"))) void block_dot_vnni(const int8_t* block, const uint8_t* digits, int64_t K,
                                                                double* out) {
  __m512i acc[ROWS][2][kDigits], row_sums[2];
  const __m512i ones = _mm512_set1_epi8(1);
  for (int h = 0; h < 2; ++h) {
    row_sums[h] = _mm512_setzero_si512();
    for (int m = 0; m < ROWS; ++m)
      for (int d = 0; d < kDigits; ++d) acc[m][h][d] = _mm512_setzero_si512();
  }
  for (int64_t k = 0; k < K; k += kChunk) {
    _mm_prefetch(reinterpret_cast<const char*>(block + kPrefetchBytes), _MM_HINT_T1);
    _mm_prefetch(reinterpret_cast<const char*>(block + kPrefetchBytes + 64), _MM_HINT_T1);
    const __m512i w[2] = {_mm512_loadu_si512(block), _mm512_loadu_si512(block + 64)};  // rows 0-3, rows 4-7
    for (int m = 0; m < ROWS; ++m)
      for (int d = 0; d < kDigits; ++d) {
        const uint8_t* plane = digits + (m * kDigits + d) * K + k;
        const __m512i x = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(plane)));
        for (int h = 0; h < 2; ++h) acc[m][h][d] = _mm512_dpbusd_epi32(acc[m][h][d], x, w[h]);
      }
    for (int h = 0; h < 2; ++h) row_sums[h] = _mm512_dpbusd_epi32(row_sums[h], ones, w[h]);
    block += kChunk * kGroupRows;
  }
  const __m256d base = _mm256_set1_pd(double(int64_t(1) << kDigitBits)), offset = _mm256_set1_pd(double(kOffset));
  for (int h = 0; h < 2; ++h) {
    const __m256d offsets = _mm256_mul_pd(row_totals(row_sums[h]), offset);
    for (int m = 0; m < ROWS; ++m) {
      __m256d total = row_totals(acc[m][h][0]);
      for (int d = 1; d < kDigits; ++d) total = _mm256_fmadd_pd(total, base, row_totals(acc[m][h][d]));
      _mm256_storeu_pd(out + m * kGroupRows + 4 * h, _mm256_sub_pd(total, offsets));
    }
  }
}

at::Tensor packed_mm_fma(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, Isa chosen);

// The VNNI path of int8_packed_mm (inputs checked and contiguous; K a multiple of 16).
at::Tensor packed_mm_vnni(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales) {
  const int64_t groups = packed.size(0), K = packed.size(1) * kChunk, N = scales.size(0), M = x.size(0);
  std::vector<uint8_t> digits(M * kDigits * K);
  std::vector<double> row_scale(M);
  for (int64_t m = 0; m < M; ++m) row_scale[m] = split_row(x.data_ptr<float>() + m * K, K, digits.data() + m * kDigits * K);
  at::Tensor y = at::empty({M, N}, x.options());
  const int8_t* qp = packed.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
    double sums[2 * kGroupRows];
    for (int64_t g = begin; g < end; ++g) {
      const int8_t* block = qp + g * kGroupRows * K;
      const int64_t rows = std::min(kGroupRows, N - g * kGroupRows);
      for (int64_t m = 0; m < M;) {  // two activation rows per pass (18 accumulators), then one
        const int64_t pass = std::min<int64_t>(2, M - m);
        const uint8_t* planes = digits.data() + m * kDigits * K;
        if (pass == 2) block_dot_vnni<2>(block, planes, K, sums);
        else block_dot_vnni<1>(block, planes, K, sums);
        for (int64_t i = 0; i < pass; ++i)
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t n = g * kGroupRows + r;
            yp[(m + i) * N + n] = float(sums[i * kGroupRows + r] * row_scale[m + i] * sp[n]);
          }
        m += pass;
      }
    }
  });
  for (int64_t m = 0; m < M; ++m)  // rows with inf or NaN: the fp32 path propagates them
    if (row_scale[m] == 0.0) y[m].copy_(packed_mm_fma(x.slice(0, m, m + 1), packed, scales, Isa::avx512)[0]);
  return y;
}

// The fp32-FMA paths of int8_packed_mm (inputs checked and contiguous).
at::Tensor packed_mm_fma(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales, Isa chosen) {
  const int64_t groups = packed.size(0), K = packed.size(1) * kChunk, N = scales.size(0), M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = packed.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
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

namespace fastvlm {

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
  const Isa chosen = fastvlm::resolve_isa(isa, "int8_gemv");
  TORCH_CHECK(chosen != Isa::none, "int8_packed_mm: this CPU has neither AVX-512F nor AVX2+FMA+F16C");
  const at::Tensor xc = x.contiguous(), pc = packed.contiguous(), sc = scales.contiguous();
  if (chosen != Isa::vnni) return packed_mm_fma(xc, pc, sc, chosen);
  return K <= kVnniMaxK ? packed_mm_vnni(xc, pc, sc) : packed_mm_fma(xc, pc, sc, Isa::avx512);
}

}  // namespace fastvlm

TORCH_LIBRARY(fastvlm_native, m) {
  m.def("int8_packed_mm(Tensor x, Tensor packed, Tensor scales, str isa='auto') -> Tensor");
  m.def("int8_gemv_isa() -> str", &int8_gemv_isa);
}

TORCH_LIBRARY_IMPL(fastvlm_native, CPU, m) { m.impl("int8_packed_mm", fastvlm::int8_packed_mm); }
