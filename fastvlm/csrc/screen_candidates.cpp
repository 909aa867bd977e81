// The greedy head's candidate rows from its int8 screen, in one call (fastvlm.greedy_head).
//
// A greedy decode step screens all V rows of the LM head with an int8 copy (a = s q x, [B, V]),
// then keeps the rows that can hold some batch row's largest logit. In Python that second part
// is about 20 small ATen ops (abs, amax, isfinite, max, compares, any, nonzero, gathers):
// 0.55-1.2 ms a step on a 2-core Xeon for V = 151,936, up to 5% of an int8 decode step, most of
// it in dispatch and in temporaries as large as the screen's output. This op does the same work
// in two reads of that output (and part of a third), and returns the same rows as GreedyHead's
// Python path (GreedyHead._candidates_by_aten), bit for bit; the tests compare the two with
// torch.equal.
//
// For each batch row b (scale_b = ||x_b|| (1 + 2 u_out) is computed by the caller; row r's
// bound is scale_b * row_bounds[r] + slack_b):
//   1. largest_b = max_r a[b, r] and top_b its FIRST index (torch.max's pick on ties: a later
//      equal value does not replace its running maximum); magnitude_b = max_r |a[b, r]|; and
//      whether the row and x_b are finite. Any non-finite value, or a magnitude past
//      largest_safe (the head's output could overflow its dtype), means "no screen".
//   2. slack_b = c (magnitude_b + scale_b max_row_bound) + tiny, c = u_out + margin;
//      lower_b = largest_b - scale_b row_bounds[top_b] - slack_b (the largest logit is at least
//      this). A row passes the prefilter if for some b a[b, r] >= lower_b - scale_b
//      max_row_bound - slack_b (a superset, with the widest bound); more than max_candidates
//      such rows means "too many" (the caller reads the whole head).
//   3. Of those rows, the candidates are the ones where for some b
//      a[b, r] + scale_b row_bounds[r] + slack_b >= lower_b (each row's own bound), ascending.
//      Like the Python code, a row the prefilter dropped is not tested again: in exact
//      arithmetic the own-bound test implies the prefilter, but the two round differently.
//
// Every value above is fp32 and rounded after each operation, in the order ATen evaluates the
// Python expressions (left to right, each product before its sum), so every compare sees the
// same numbers. The one hazard is a compiler fusing a product and a sum into one FMA (one
// rounding instead of two), which GCC does by default wherever FMA is enabled (the AVX-512
// loops): fp-contract is turned off for this file below.
//
// The reads of the [B, V] output (600 KB a row, still in cache from the int8 kernel):
//   - its maximum, largest |value| and a poison sum (0 * v: NaN once any value is not finite)
//     in one loop, with kLanes independent accumulators of each (a single running maximum
//     would wait on the previous one at every step);
//   - the first index holding the maximum, and the rows passing the prefilter: kLanes values
//     at a time, a vectorized "any of them?" test, and a scalar look only into the chunks
//     where it says yes (almost none: a row has 1-35 candidates out of 151,936).
// Each loop is compiled for AVX-512F, AVX2 and x86-64's baseline (the same source, vectorized by
// the compiler for each width), chosen at run time. One thread: the whole op takes about 30 us
// at batch 1 (AVX-512), too little to share, and a parallel region stalls on a busy core.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_isa.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace {

using fastvlm::Isa;

// What the op found; the caller maps anything but kOk to "read the whole head".
enum Status : int64_t { kOk = 0, kNoScreen = 1, kTooMany = 2 };

// Values per step of the vectorized loops: 4 AVX-512, 8 AVX2 or 16 SSE registers per accumulator.
constexpr int64_t kLanes = 64;

// The maximum, the largest |value| and the poison sum (0 when every value is finite, NaN otherwise) of some values.
struct Stats {
  float max = -std::numeric_limits<float>::infinity();
  float magnitude = 0.0f;
  float poison = 0.0f;
};

// Max and sum are exact and order-free on finite values; a NaN never wins a max (`<` is false),
// but then the poison sum is NaN, whatever the order, and the values are not used.
[[gnu::always_inline]] inline void add_value(Stats& stats, float v) {
  stats.max = stats.max < v ? v : stats.max;
  stats.magnitude = stats.magnitude < std::fabs(v) ? std::fabs(v) : stats.magnitude;
  stats.poison += v * 0.0f;  // 0 * inf and 0 * NaN are NaN, and a NaN stays NaN through every sum
}

[[gnu::always_inline]] inline Stats row_stats_impl(const float* p, int64_t n) {
  float top[kLanes], magnitude[kLanes], poison[kLanes];  // kept in vector registers
  for (int64_t j = 0; j < kLanes; ++j) {
    top[j] = -std::numeric_limits<float>::infinity();
    magnitude[j] = poison[j] = 0.0f;
  }
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const float v = p[i + j], size = std::fabs(v);
      top[j] = top[j] < v ? v : top[j];
      magnitude[j] = magnitude[j] < size ? size : magnitude[j];
      poison[j] += v * 0.0f;
    }
  }
  Stats stats;
  for (int64_t j = 0; j < kLanes; ++j) {
    stats.max = stats.max < top[j] ? top[j] : stats.max;
    stats.magnitude = stats.magnitude < magnitude[j] ? magnitude[j] : stats.magnitude;
    stats.poison += poison[j];
  }
  for (; i < n; ++i) add_value(stats, p[i]);
  return stats;
}

// The first index whose value equals `value` (== takes -0 and +0 as equal, as torch.max's
// running maximum does), or n.
[[gnu::always_inline]] inline int64_t first_equal_impl(const float* p, int64_t n, float value) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    int hit = 0;
    for (int64_t j = 0; j < kLanes; ++j) hit |= p[i + j] == value;
    if (hit) break;
  }
  for (; i < n; ++i)
    if (p[i] == value) return i;
  return n;
}

// The first row r from `from` on with a[b, r] >= thresholds[b] for some batch row b, or V.
[[gnu::always_inline]] inline int64_t next_reaching_impl(const float* a, int64_t B, int64_t V,
                                                         const float* thresholds, int64_t from) {
  int64_t r = from;
  for (; r + kLanes <= V; r += kLanes) {
    int hit = 0;
    for (int64_t b = 0; b < B; ++b) {
      const float* row = a + b * V + r;
      const float threshold = thresholds[b];
      for (int64_t j = 0; j < kLanes; ++j) hit |= row[j] >= threshold;
    }
    if (hit) break;
  }
  for (; r < V; ++r)
    for (int64_t b = 0; b < B; ++b)
      if (a[b * V + r] >= thresholds[b]) return r;
  return V;
}

// The loops, compiled once per instruction set.
struct Loops {
  Stats (*row_stats)(const float*, int64_t);
  int64_t (*first_equal)(const float*, int64_t, float);
  int64_t (*next_reaching)(const float*, int64_t, int64_t, const float*, int64_t);
};

#define FASTVLM_SCREEN_LOOPS(name, attribute)                                                                     \
  attribute Stats row_stats_##name(const float* p, int64_t n) { return row_stats_impl(p, n); }                     \
  attribute int64_t first_equal_##name(const float* p, int64_t n, float value) {                                  \
    return first_equal_impl(p, n, value);                                                                          \
  }                                                                                                                \
  attribute int64_t next_reaching_##name(const float* a, int64_t B, int64_t V, const float* t, int64_t from) {    \
    return next_reaching_impl(a, B, V, t, from);                                                                   \
  }                                                                                                                \
  constexpr Loops loops_##name = {row_stats_##name, first_equal_##name, next_reaching_##name};

FASTVLM_SCREEN_LOOPS(avx512, __attribute__((target("avx512f,prefer-vector-width=512"))))
FASTVLM_SCREEN_LOOPS(avx2, __attribute__((target("avx2"))))
FASTVLM_SCREEN_LOOPS(baseline, )
#undef FASTVLM_SCREEN_LOOPS

// The loops for an instruction set: "auto" (the best here), "avx512", "avx2" or "baseline" (x86-64's SSE2).
Loops loops_for(const std::string& isa) {
  if (isa == "baseline") return loops_baseline;
  Isa chosen = fastvlm::resolve_isa(isa, "screen_candidates");
  if (isa == "auto") chosen = fastvlm::best_float_isa();
  switch (chosen) {
    case Isa::vnni:
    case Isa::avx512: return loops_avx512;
    case Isa::avx2: return loops_avx2;
    default: return loops_baseline;
  }
}

// Whether every value of an fp32 tensor (x: [B, H], small) is finite.
bool all_finite(const at::Tensor& x) {
  const float* p = x.data_ptr<float>();
  float poison = 0.0f;
  for (int64_t i = 0; i < x.numel(); ++i) poison += p[i] * 0.0f;
  return poison == 0.0f;
}

// One batch row's numbers for steps 2 and 3, each in fp32 in the Python code's order of operations.
struct RowBound {
  float scale, slack, lower, prefilter;
};

RowBound row_bound(const Stats& stats, float largest, int64_t top, float scale, const float* row_bounds,
                   float roundoff_plus_margin, float max_row_bound, float tiny) {
  RowBound bound;
  bound.scale = scale;
  const float widest = scale * max_row_bound;
  bound.slack = roundoff_plus_margin * (stats.magnitude + widest) + tiny;
  bound.lower = (largest - scale * row_bounds[top]) - bound.slack;
  bound.prefilter = (bound.lower - widest) - bound.slack;
  return bound;
}

// Step 3 for one prefiltered row r: whether its own bound reaches some batch row's lower bound.
bool own_bound_reaches(const float* a, int64_t V, const std::vector<RowBound>& bounds, const float* row_bounds,
                       int64_t r) {
  for (size_t b = 0; b < bounds.size(); ++b) {
    const RowBound& bound = bounds[b];
    if ((a[b * V + r] + bound.scale * row_bounds[r]) + bound.slack >= bound.lower) return true;
  }
  return false;
}

std::tuple<at::Tensor, int64_t> screen_candidates(const at::Tensor& screened_in, const at::Tensor& x_in,
                                                  const at::Tensor& row_bounds_in, const at::Tensor& scale_in,
                                                  double roundoff_plus_margin, double max_row_bound, double tiny,
                                                  double largest_safe, int64_t max_candidates,
                                                  const std::string& isa) {
  TORCH_CHECK(screened_in.dim() == 2 && x_in.dim() == 2 && screened_in.size(0) == x_in.size(0),
              "screen_candidates: expected screened [B, V] and x [B, H]");
  const int64_t B = screened_in.size(0), V = screened_in.size(1);
  TORCH_CHECK(row_bounds_in.dim() == 1 && row_bounds_in.size(0) == V, "screen_candidates: row_bounds must be [V]");
  TORCH_CHECK(scale_in.numel() == B, "screen_candidates: scale must hold one value per batch row");
  for (const at::Tensor* t : {&screened_in, &x_in, &row_bounds_in, &scale_in})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "screen_candidates: expected CPU fp32 tensors");
  const Loops loops = loops_for(isa);
  const at::Tensor screened = screened_in.contiguous(), x = x_in.contiguous();
  const at::Tensor row_bounds = row_bounds_in.contiguous(), scale = scale_in.contiguous();
  const at::Tensor none = at::empty({0}, screened.options().dtype(at::kLong));
  if (B == 0 || V == 0 || !all_finite(x)) return {none, kNoScreen};

  const float* a = screened.data_ptr<float>();
  const float* rb = row_bounds.data_ptr<float>();
  std::vector<Stats> stats(B);
  for (int64_t b = 0; b < B; ++b) {  // step 1, every row before any bound: a non-finite row anywhere stops it
    stats[b] = loops.row_stats(a + b * V, V);
    // the Python code compares max |a| (an fp32) with largest_safe as Python floats: doubles
    if (stats[b].poison != 0.0f || static_cast<double>(stats[b].magnitude) > largest_safe) return {none, kNoScreen};
  }
  std::vector<RowBound> bounds(B);
  std::vector<float> prefilter(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t top = loops.first_equal(a + b * V, V, stats[b].max);
    bounds[b] = row_bound(stats[b], a[b * V + top], top, scale.data_ptr<float>()[b], rb,
                          static_cast<float>(roundoff_plus_margin), static_cast<float>(max_row_bound),
                          static_cast<float>(tiny));
    prefilter[b] = bounds[b].prefilter;
  }
  std::vector<int64_t> ids;
  int64_t prefiltered = 0;
  for (int64_t r = loops.next_reaching(a, B, V, prefilter.data(), 0); r < V;
       r = loops.next_reaching(a, B, V, prefilter.data(), r + 1)) {
    if (++prefiltered > max_candidates) return {none, kTooMany};
    if (own_bound_reaches(a, V, bounds, rb, r)) ids.push_back(r);
  }
  at::Tensor out = at::empty({static_cast<int64_t>(ids.size())}, none.options());
  std::copy(ids.begin(), ids.end(), out.data_ptr<int64_t>());
  return {out, kOk};
}

// The loops "auto" picks here: "avx512", "avx2" or "baseline".
std::string screen_candidates_isa() {
  const Isa best = fastvlm::best_float_isa();
  return best == Isa::none ? "baseline" : fastvlm::isa_name(best);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastvlm_native, m) {
  m.def(
      "screen_candidates(Tensor screened, Tensor x, Tensor row_bounds, Tensor scale, float roundoff_plus_margin, "
      "float max_row_bound, float tiny, float largest_safe, int max_candidates, str isa='auto') -> (Tensor, int)");
  m.def("screen_candidates_isa() -> str", &screen_candidates_isa);
}

TORCH_LIBRARY_IMPL(fastvlm_native, CPU, m) { m.impl("screen_candidates", screen_candidates); }
