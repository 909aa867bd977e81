// Attention of one new query position over the key/value cache, for batch decode steps.
//
// A decode step attends each of its rows' one new query to every cached position. The work is
// small (FastVLM-0.5B after a 300-token prompt: 14 heads x 300 positions x 64 dims, about half a
// million multiply-adds per layer), but ATen's scaled_dot_product_attention takes 40-60 us a call
// for it on a 2-core Xeon (its flash kernel is built for long queries), about 1 ms a step over 24
// layers, and 150-300 us a call at 2,000 positions. Here the same attention takes 20-25 us at 300
// positions and 110-130 us at 2,000 (fp32 and bf16, 2 threads), in three passes over the cache
// per group of query heads sharing a key/value head:
//
//   1. scores[g, j] = (q_g . k_j) * scale for the query heads g sharing a key/value head, -inf
//      where the mask says not to attend (the key row is widened to fp32 once for all of them);
//   2. p = e^(score - largest score) with a vectorized exp, and their sum;
//   3. out_g = sum_j p[g, j] v_j, accumulated in fp32 and rounded to the query's dtype once.
//
// The (row, key/value head) pairs are shared among the threads. Where there are fewer pairs than
// threads (batch 1 with 2 key/value heads on a machine with more than 2 cores), each pair's
// positions are split into chunks, each chunk gives its largest score, sum of p and unnormalized
// sum of p v, and the chunks are merged (weights e^(largest_c - largest)); so a long cache keeps
// every thread busy, as ATen's attention does over its query heads.
//
// Products and sums are fp32 for every input dtype (fp32, bf16, fp16), with 8-lane AVX2 FMAs
// (head dims are multiples of 8: 64 and 128 in Qwen2). A row whose every position is masked
// gets zeros, as ATen's attention gives. Anything else (another dtype or layout, a float mask, a CPU
// without AVX2, FMA and F16C) goes to ATen's scaled_dot_product_attention with the same
// arguments, so callers need no case analysis. It has no backward: callers keep ATen's attention
// where autograd records. fastvlm.decoding's Python loop and
// decode_layers.cpp both call this function, so their steps stay bit for bit alike.

#include "decode_attention.h"

#include "cpu_isa.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kLanes = 8;              // fp32 lanes of an AVX2 register
constexpr int64_t kHeadsPerPass = 8;       // query heads of one key/value head taken at once (one register each)
constexpr int64_t kSerialWork = int64_t(1) << 17;  // multiply-adds below which one thread does the whole call
constexpr int64_t kMinChunk = 256;         // fewest positions a thread takes when a call's positions are split

// Eight consecutive elements of a row, widened to fp32.
template <typename T>
__m256 load8(const T* p);

template <>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8<float>(const float* p) {
  return _mm256_loadu_ps(p);
}

template <>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8<c10::BFloat16>(const c10::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));  // bf16 is fp32's top half
}

template <>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8<c10::Half>(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Lane g of the result is the sum of the 8 lanes of a[g].
__attribute__((target("avx2,fma,f16c"))) inline __m256 transpose_sum(const __m256* a) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// e^x for x <= 0 (softmax's shifted scores), lane by lane: 2^n e^r with n = round(x / ln 2) and
// |r| <= ln(2) / 2, e^r by its degree-7 Taylor polynomial (truncation below 2^-27 relative there);
// ln 2 split in two so that r is exact. x below -87 gives 0, -inf gives 0 and NaN gives NaN.
__attribute__((target("avx2,fma,f16c"))) inline __m256 exp_nonpositive(__m256 x) {
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);  // this operand order keeps a NaN x NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln 2's first 11 bits: n * it is exact
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);      // the rest of ln 2
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(exponent)));
}

// Element (b, h, j, d) of a [B, H, L, D] tensor with unit stride in d.
struct Layout {
  int64_t batch, head, position;
  static Layout of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }
};

// A task's query heads: [first, first + count) of batch row b, all sharing key/value head kv.
struct Task {
  int64_t b, kv, first, count;
};

struct Shape {
  int64_t batch, heads, kv_heads, group, length, dim;
  int64_t passes() const { return (group + kHeadsPerPass - 1) / kHeadsPerPass; }
  int64_t tasks() const { return batch * kv_heads * passes(); }
  // Task t: pass t % passes() over the group of (row, key/value head) pair t / passes().
  Task task(int64_t t) const {
    const int64_t pass = t % passes(), pair = t / passes(), kv = pair % kv_heads;
    return {pair / kv_heads, kv, kv * group + pass * kHeadsPerPass, std::min(kHeadsPerPass, group - pass * kHeadsPerPass)};
  }
};

// One chunk's partial result for 8 heads: the largest score (-inf: nothing attended in the chunk),
// the sum of p = e^(score - largest), and sum_j p_j v_j, unnormalized, [8][D].
struct Partial {
  float* largest;
  float* total;
  float* sums;
};

// One task: query heads [first, first + count) of batch row b, all sharing key/value head kv, over
// positions [begin, end). scores holds [positions][8]: a position's scores for the 8 heads side by
// side, so that each pass below works on whole registers, one head per lane.
template <typename T>
__attribute__((target("avx2,fma,f16c"))) void attend_chunk(const T* query, Layout q, const T* keys, Layout k,
                                                         const T* values, Layout v, const bool* mask, int64_t mask_batch,
                                                         int64_t mask_position, const Shape& s, float scale, int64_t task,
                                                         int64_t begin, int64_t end, Partial result) {
  const auto [b, kv, first, count] = s.task(task);
  const int64_t D = s.dim, L = end - begin;
  std::vector<float> queries(kHeadsPerPass * D, 0.0f), scores(L * kHeadsPerPass);
  for (int64_t g = 0; g < count; ++g)
    for (int64_t d = 0; d < D; d += kLanes)
      _mm256_storeu_ps(queries.data() + g * D + d, load8(query + b * q.batch + (first + g) * q.head + d));
  const T* key_rows = keys + b * k.batch + kv * k.head + begin * k.position;
  const T* value_rows = values + b * v.batch + kv * v.head + begin * v.position;
  const bool* attend = mask == nullptr ? nullptr : mask + b * mask_batch + begin * mask_position;

  // 1. scores, and their largest per head
  const __m256 scales = _mm256_set1_ps(scale), minus_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 largest = minus_inf;
  for (int64_t j = 0; j < L; ++j) {
    __m256 score = minus_inf;
    if (attend == nullptr || attend[j * mask_position]) {
      __m256 sums[kHeadsPerPass];
      for (int64_t g = 0; g < kHeadsPerPass; ++g) sums[g] = _mm256_setzero_ps();
      const T* key = key_rows + j * k.position;
      for (int64_t d = 0; d < D; d += kLanes) {
        const __m256 key8 = load8(key + d);
        for (int64_t g = 0; g < kHeadsPerPass; ++g)
          sums[g] = _mm256_fmadd_ps(_mm256_loadu_ps(queries.data() + g * D + d), key8, sums[g]);
      }
      score = _mm256_mul_ps(transpose_sum(sums), scales);
      largest = _mm256_max_ps(largest, score);
    }
    _mm256_storeu_ps(scores.data() + j * kHeadsPerPass, score);
  }
  _mm256_storeu_ps(result.largest, largest);
  // 2. p = e^(score - largest) and their sum per head (masked positions: e^-inf = 0; a head with
  // nothing attended here shifts by 0 instead of -inf, so its p are all 0)
  largest = _mm256_blendv_ps(largest, _mm256_setzero_ps(), _mm256_cmp_ps(largest, minus_inf, _CMP_EQ_OQ));
  __m256 total = _mm256_setzero_ps();
  for (int64_t j = 0; j < L; ++j) {
    float* row = scores.data() + j * kHeadsPerPass;
    const __m256 p = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(row), largest));
    _mm256_storeu_ps(row, p);
    total = _mm256_add_ps(total, p);
  }
  _mm256_storeu_ps(result.total, total);
  // 3. sum_j p[j, g] v_j, eight dims of all heads at a time
  for (int64_t d = 0; d < D; d += kLanes) {
    __m256 sums[kHeadsPerPass];
    for (int64_t g = 0; g < kHeadsPerPass; ++g) sums[g] = _mm256_setzero_ps();
    for (int64_t j = 0; j < L; ++j) {
      const __m256 value8 = load8(value_rows + j * v.position + d);
      const float* p = scores.data() + j * kHeadsPerPass;
      for (int64_t g = 0; g < kHeadsPerPass; ++g) sums[g] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + g), value8, sums[g]);
    }
    // a constant count, so that sums[] stays in registers (a run-time index would put it on the stack)
    for (int64_t g = 0; g < kHeadsPerPass; ++g) _mm256_storeu_ps(result.sums + g * D + d, sums[g]);
  }
}

// A task's output from its chunks' partial results: with m the largest score over all chunks and
// w_c = e^(largest_c - m), out_g = sum_c w_c sums_c / sum_c w_c total_c, rounded to T once. One
// chunk gives w = 1 exactly. A head with nothing attended anywhere gets 0, as ATen's attention gives.
template <typename T>
__attribute__((target("avx2,fma,f16c"))) void merge_chunks(const float* largest, const float* total, const float* sums,
                                                         int64_t chunks, const Shape& s, int64_t task, T* out) {
  const auto [b, kv, first, count] = s.task(task);
  const int64_t D = s.dim;
  const __m256 minus_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 best = minus_inf;
  for (int64_t c = 0; c < chunks; ++c) best = _mm256_max_ps(best, _mm256_loadu_ps(largest + c * kHeadsPerPass));
  best = _mm256_blendv_ps(best, _mm256_setzero_ps(), _mm256_cmp_ps(best, minus_inf, _CMP_EQ_OQ));
  alignas(32) float weights[kHeadsPerPass];
  __m256 sum_of_totals = _mm256_setzero_ps();
  std::vector<float> merged(kHeadsPerPass * D, 0.0f);
  for (int64_t c = 0; c < chunks; ++c) {
    const __m256 w = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(largest + c * kHeadsPerPass), best));
    sum_of_totals = _mm256_fmadd_ps(w, _mm256_loadu_ps(total + c * kHeadsPerPass), sum_of_totals);
    _mm256_store_ps(weights, w);
    const float* chunk = sums + c * kHeadsPerPass * D;
    for (int64_t i = 0; i < kHeadsPerPass * D; i += kLanes) {
      const __m256 weight = _mm256_set1_ps(weights[i / D]);
      _mm256_storeu_ps(merged.data() + i, _mm256_fmadd_ps(weight, _mm256_loadu_ps(chunk + i), _mm256_loadu_ps(merged.data() + i)));
    }
  }
  alignas(32) float totals[kHeadsPerPass];  // 1 for a head with nothing attended: 0 / 1 = 0
  const __m256 nothing = _mm256_cmp_ps(sum_of_totals, _mm256_setzero_ps(), _CMP_EQ_OQ);
  _mm256_store_ps(totals, _mm256_blendv_ps(sum_of_totals, _mm256_set1_ps(1.0f), nothing));
  for (int64_t g = 0; g < count; ++g) {
    T* row = out + (b * s.heads + first + g) * D;  // out is [B, heads, 1, D], contiguous
    for (int64_t d = 0; d < D; ++d) row[d] = static_cast<T>(merged[g * D + d] / totals[g]);
  }
}

// How many chunks each task's positions are split into: one, unless there are fewer tasks than
// threads; then enough to give every thread work, at least kMinChunk positions each.
int64_t chunks_per_task(const Shape& s) {
  const int64_t tasks = s.tasks(), threads = at::get_num_threads();
  if (tasks >= threads) return 1;
  return std::max<int64_t>(1, std::min((threads + tasks - 1) / tasks, s.length / kMinChunk));
}

template <typename T>
at::Tensor attend(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                  const std::optional<at::Tensor>& mask, double scale, const Shape& s) {
  at::Tensor out = at::empty({s.batch, s.heads, 1, s.dim}, query.options());
  const T* q = query.data_ptr<T>();
  const T* k = keys.data_ptr<T>();
  const T* v = values.data_ptr<T>();
  const bool* m = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
  const int64_t mask_batch = m != nullptr && mask->size(0) > 1 ? mask->stride(0) : 0;
  const int64_t mask_position = m != nullptr ? mask->stride(3) : 0;
  const Layout q_layout = Layout::of(query), k_layout = Layout::of(keys), v_layout = Layout::of(values);
  const int64_t tasks = s.tasks(), chunks = chunks_per_task(s), items = tasks * chunks;
  std::vector<float> largest(items * kHeadsPerPass), total(items * kHeadsPerPass), sums(items * kHeadsPerPass * s.dim);
  const int64_t grain = 2 * s.heads * s.batch * s.length * s.dim < kSerialWork ? items : 1;
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t task = item / chunks, c = item % chunks;
      const Partial result{largest.data() + item * kHeadsPerPass, total.data() + item * kHeadsPerPass,
                           sums.data() + item * kHeadsPerPass * s.dim};
      attend_chunk(q, q_layout, k, k_layout, v, v_layout, m, mask_batch, mask_position, s, static_cast<float>(scale),
                   task, s.length * c / chunks, s.length * (c + 1) / chunks, result);
    }
  });
  T* o = out.data_ptr<T>();
  for (int64_t task = 0; task < tasks; ++task)
    merge_chunks(largest.data() + task * chunks * kHeadsPerPass, total.data() + task * chunks * kHeadsPerPass,
                 sums.data() + task * chunks * kHeadsPerPass * s.dim, chunks, s, task, o);
  return out;
}

// ATen's attention with the same arguments (the shared key/value heads repeated before torch 2.5).
at::Tensor aten_attention(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                          const std::optional<at::Tensor>& mask, double scale) {
  const bool share_kv_heads = keys.dim() == 4 && query.dim() == 4 && keys.size(1) != query.size(1);
#if FASTVLM_SDPA_GQA
  return at::scaled_dot_product_attention(query, keys, values, mask, 0.0, /*is_causal=*/false, scale, share_kv_heads);
#else
  if (share_kv_heads) {
    const int64_t groups = query.size(1) / keys.size(1);
    return at::scaled_dot_product_attention(query, keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1),
                                            mask, 0.0, /*is_causal=*/false, scale);
  }
  return at::scaled_dot_product_attention(query, keys, values, mask, 0.0, /*is_causal=*/false, scale);
#endif
}

// Whether the kernel takes these inputs (see the header): else ATen's attention runs.
bool kernel_takes(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                  const std::optional<at::Tensor>& mask) {
  if (fastvlm::best_isa() == fastvlm::Isa::none) return false;
  if (query.dim() != 4 || keys.dim() != 4 || values.dim() != 4 || query.size(2) != 1) return false;
  const at::ScalarType dtype = query.scalar_type();
  if ((dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf) || keys.scalar_type() != dtype ||
      values.scalar_type() != dtype)
    return false;
  if (!query.device().is_cpu() || !keys.device().is_cpu() || !values.device().is_cpu()) return false;
  const int64_t batch = query.size(0), heads = query.size(1), kv_heads = keys.size(1), dim = query.size(3);
  if (keys.sizes() != values.sizes() || keys.size(0) != batch || keys.size(3) != dim || kv_heads == 0 ||
      heads % kv_heads != 0 || keys.size(2) == 0 || batch == 0)
    return false;
  if (dim % kLanes != 0 || query.stride(3) != 1 || keys.stride(3) != 1 || values.stride(3) != 1)
    return false;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    if (m.scalar_type() != at::kBool || !m.device().is_cpu() || m.dim() != 4 || m.size(1) != 1 || m.size(2) != 1 ||
        m.size(3) != keys.size(2) || (m.size(0) != batch && m.size(0) != 1))
      return false;
  }
  return true;
}

}  // namespace

namespace fastvlm {

at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& keys, const at::Tensor& values,
                            const std::optional<at::Tensor>& mask, double scale, bool kernel) {
  if (!kernel || !kernel_takes(query, keys, values, mask)) return aten_attention(query, keys, values, mask, scale);
  const int64_t heads = query.size(1), kv_heads = keys.size(1);
  const Shape shape{query.size(0), heads, kv_heads, heads / kv_heads, keys.size(2), query.size(3)};
  switch (query.scalar_type()) {
    case at::kBFloat16: return attend<c10::BFloat16>(query, keys, values, mask, scale, shape);
    case at::kHalf: return attend<c10::Half>(query, keys, values, mask, scale, shape);
    default: return attend<float>(query, keys, values, mask, scale, shape);
  }
}

}  // namespace fastvlm

TORCH_LIBRARY_FRAGMENT(fastvlm_native, m) {
  m.def("decode_attention(Tensor query, Tensor keys, Tensor values, Tensor? mask, float scale, bool kernel=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastvlm_native, CPU, m) { m.impl("decode_attention", fastvlm::decode_attention); }
