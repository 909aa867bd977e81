// The x86-64 instruction sets our kernels are compiled for, and the one this CPU runs best.
#pragma once

#include <c10/util/Exception.h>
#include <immintrin.h>

#include <string>

namespace fastvlm {

// Ordered: each level includes the ones below it.
//   vnni    AVX-512F, DQ and VNNI (int8 products in integers)
//   avx512  AVX-512F
//   avx2    AVX2, FMA and F16C
enum class Isa { none = 0, avx2 = 1, avx512 = 2, vnni = 3 };

inline Isa detect_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni"))
    return Isa::vnni;
  if (__builtin_cpu_supports("avx512f")) return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::avx2;
  return Isa::none;
}

// The CPU does not change under a running process: detect once, not on every call.
inline Isa best_isa() {
  static const Isa detected = detect_isa();
  return detected;
}

// The best level for float kernels: VNNI's integer dot products add nothing to them.
inline Isa best_float_isa() {
  const Isa best = best_isa();
  return best == Isa::vnni ? Isa::avx512 : best;
}

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::vnni: return "vnni";
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "none";
  }
}

// The instruction set an op was asked for ("auto": the best here), checked against this CPU.
inline Isa resolve_isa(const std::string& isa, const char* op) {
  const Isa available = best_isa();
  if (isa == "auto") return available;
  const Isa wanted = isa == "vnni" ? Isa::vnni : isa == "avx512" ? Isa::avx512 : isa == "avx2" ? Isa::avx2 : Isa::none;
  TORCH_CHECK(wanted != Isa::none, op, ": unknown instruction set '", isa, "'; expected auto, vnni, avx512 or avx2");
  TORCH_CHECK(static_cast<int>(wanted) <= static_cast<int>(available), op, ": this CPU has no ", isa,
              " (best available: ", isa_name(available), ")");
  return wanted;
}

// The sum of the 8 fp32 lanes of an AVX register.
__attribute__((target("avx2,fma"))) inline float sum_lanes_avx2(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
}

}  // namespace fastvlm
