// Top-k logprobs: fused log-softmax + top-k + the chosen token's logprob, one read per pass;
// and the greedy token of each row (argmax_rows).
//
// A row (or a slice of one, when there are fewer rows than threads) is read twice:
// the first pass finds the maximum and the k + 1 largest logits (ties: lower id),
// the second sums exp(x - max) while the slice is still in cache. Slices are then
// merged per row; the log-softmax itself is never written out.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace xllm::XLLM_ISA {
namespace {

constexpr int64_t kMinSlice = 16384;  // fewest logits per slice when a row is split
// Below this many logits one thread does it all (waking the team costs more).
constexpr int64_t kParallelMinLogits = 200000;

struct Cand {
  float x;
  int64_t id;
};

// Ordering of candidates: larger value first, then lower id (NaN never gets here).
inline bool before(const Cand& a, const Cand& b) {
  return a.x > b.x || (a.x == b.x && a.id < b.id);
}

// Best `cap` candidates, best first. Scanning ids in increasing order, a new value
// enters only when strictly above the current worst.
struct TopList {
  Cand* c;
  int n = 0, cap;
  void push(float x, int64_t id) {
    if (n == cap) {
      if (!(x > c[n - 1].x)) return;
      --n;
    }
    int i = n++;
    while (i > 0 && before(Cand{x, id}, c[i - 1])) {
      c[i] = c[i - 1];
      --i;
    }
    c[i] = Cand{x, id};
  }
  float threshold() const { return n == cap ? c[n - 1].x : kNegInf; }
  bool full() const { return n == cap; }
};

inline bool any_greater(VecF v, VecF t) {
#if defined(XLLM_ISA_AVX512)
  return _mm512_cmp_ps_mask(reinterpret_cast<__m512>(v), reinterpret_cast<__m512>(t),
                            _CMP_GT_OQ) != 0;
#else
  const VecI m = v > t;
  int any = 0;
  for (int i = 0; i < kLanes; ++i) any |= m[i];
  return any != 0;
#endif
}

struct SliceResult {
  float max = kNegInf, sum = 0.0f;
  int n = 0;
};

// Pass 1: maximum and the best `cap` logits of x[v0, v1). Pass 2: sum of exp(x - max).
void scan_slice(const float* x, int64_t v0, int64_t v1, int cap, Cand* cands, SliceResult& res) {
  TopList top{cands, 0, cap};
  int64_t v = v0;
  float mx = kNegInf;
  for (; v < v1 && !top.full(); ++v) {
    top.push(x[v], v);
    mx = std::max(mx, x[v]);
  }
  VecF vmx = splat(mx);
  VecF thr = splat(top.threshold());
  for (; v + 4 * kLanes <= v1; v += 4 * kLanes) {
    const VecF a = load(x + v), b = load(x + v + kLanes);
    const VecF c = load(x + v + 2 * kLanes), d = load(x + v + 3 * kLanes);
    const VecF m4 = vmax(vmax(a, b), vmax(c, d));
    vmx = vmax(vmx, m4);
    if (any_greater(m4, thr)) {
      for (int i = 0; i < 4 * kLanes; ++i) top.push(x[v + i], v + i);
      thr = splat(top.threshold());
    }
  }
  mx = hmax(vmx);
  for (; v < v1; ++v) {
    top.push(x[v], v);
    mx = std::max(mx, x[v]);
  }

  float sum = 0.0f;
  if (mx != kNegInf) {
    // (x - max) first: exact near the maximum, so the maximum itself counts exactly 1.
    const VecF vm = splat(mx);
    const VecF l2e = splat(kLog2e);
    VecF s0 = VecF{}, s1 = VecF{};
    int64_t u = v0;
    for (; u + 2 * kLanes <= v1; u += 2 * kLanes) {
      s0 += exp2v((load(x + u) - vm) * l2e);
      s1 += exp2v((load(x + u + kLanes) - vm) * l2e);
    }
    for (; u + kLanes <= v1; u += kLanes) s0 += exp2v((load(x + u) - vm) * l2e);
    sum = hsum(s0 + s1);
    for (; u < v1; ++u) sum += std::exp(x[u] - mx);
  }
  res.max = mx;
  res.sum = sum;
  res.n = top.n;
}

// Rare fallback when rounding makes distinct logits share a logprob at the k-th place:
// rank every entry by (logprob, id) exactly as a stable sort of the log-softmax would.
void exact_topk(const float* x, int64_t vocab, int64_t k, float mx, float log_sum, float* values,
                int64_t* indices) {
  std::vector<Cand> buf(k);
  TopList top{buf.data(), 0, static_cast<int>(k)};
  for (int64_t v = 0; v < vocab; ++v) top.push((x[v] - mx) - log_sum, v);
  for (int64_t j = 0; j < k; ++j) {
    values[j] = buf[j].x;
    indices[j] = buf[j].id;
  }
}

// The first index of x's largest value, or of its first NaN (torch.argmax's answer): one
// SIMD pass for the maximum (and whether there is a NaN), then the first lane equal to it.
int64_t row_argmax(const float* x, int64_t n) {
  VecF vmx = splat(kNegInf);
  VecI nan{};
  int64_t v = 0;
  for (; v + kLanes <= n; v += kLanes) {
    const VecF a = load(x + v);
    vmx = vmax(vmx, a);
    nan |= a != a;
  }
  float mx = hmax(vmx);
  bool has_nan = false;
  for (int i = 0; i < kLanes; ++i) has_nan |= nan[i] != 0;
  for (int64_t u = v; u < n; ++u) {
    has_nan |= x[u] != x[u];
    mx = std::max(mx, x[u]);
  }
  int64_t u = 0;
  if (has_nan) {
    while (x[u] == x[u]) ++u;
    return u;
  }
  const VecF target = splat(mx);
  for (; u + kLanes <= n; u += kLanes) {
    const VecI hit = load(x + u) == target;
    for (int i = 0; i < kLanes; ++i)
      if (hit[i] != 0) return u + i;
  }
  while (x[u] != mx) ++u;
  return u;
}

}  // namespace

void argmax_rows(const float* logits, int64_t ld, int64_t rows, int64_t vocab, int64_t* out) {
  if (vocab < 1) throw std::invalid_argument("argmax_rows: empty rows");
  const bool parallel = omp_get_max_threads() > 1 && rows > 1 && rows * vocab >= kParallelMinLogits;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t r = 0; r < rows; ++r) out[r] = row_argmax(logits + r * ld, vocab);
}

void topk_logprobs(const float* logits, int64_t ld, int64_t rows, int64_t vocab, int64_t k,
                   const int64_t* token_ids, float* values, int64_t* indices, float* chosen) {
  if (k < 1 || k > vocab) throw std::invalid_argument("topk_logprobs: k must be in 1..vocab");
  for (int64_t r = 0; r < rows; ++r)
    if (token_ids[r] < 0 || token_ids[r] >= vocab)
      throw std::invalid_argument("topk_logprobs: token id out of range");
  if (rows == 0) return;
  const int threads = omp_get_max_threads();
  const int cap = static_cast<int>(std::min<int64_t>(k + 1, vocab));
  const bool parallel = threads > 1 && rows * vocab >= kParallelMinLogits;
  int64_t slices = 1;
  if (parallel && rows < threads) slices = std::max<int64_t>(1, std::min<int64_t>(
      (threads + rows - 1) / rows, vocab / kMinSlice));
  const int64_t slice_len = (vocab + slices - 1) / slices;
  const int64_t work = rows * slices;
  std::vector<SliceResult> res(work);
  std::vector<Cand> cands(work * cap);

#pragma omp parallel if (parallel)
  {
#pragma omp for schedule(dynamic, 1)
    for (int64_t w = 0; w < work; ++w) {
      const int64_t r = w / slices, s = w % slices;
      const int64_t v0 = s * slice_len, v1 = std::min(vocab, v0 + slice_len);
      scan_slice(logits + r * ld, v0, v1, cap, cands.data() + w * cap, res[w]);
    }
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float* x = logits + r * ld;
      // Merge the slices: global max, rescaled sums, best candidates.
      float mx = kNegInf;
      for (int64_t s = 0; s < slices; ++s) mx = std::max(mx, res[r * slices + s].max);
      float sum = 0.0f;
      std::vector<Cand> all;
      for (int64_t s = 0; s < slices; ++s) {
        const SliceResult& sr = res[r * slices + s];
        if (sr.sum > 0.0f) sum += sr.sum * std::exp(sr.max - mx);
        const Cand* c = cands.data() + (r * slices + s) * cap;
        all.insert(all.end(), c, c + sr.n);
      }
      std::sort(all.begin(), all.end(), before);
      all.resize(std::min<size_t>(all.size(), cap));
      const float log_sum = std::log(sum);
      // Logprobs as torch computes them: (x - max) - log(sum(exp(x - max))).
      std::vector<Cand> lp(all.size());
      for (size_t j = 0; j < all.size(); ++j) lp[j] = Cand{(all[j].x - mx) - log_sum, all[j].id};
      float* out_v = values + r * k;
      int64_t* out_i = indices + r * k;
      // Rounding can give distinct logits one logprob. If such a tie group reaches past
      // the k-th place, lower ids outside the candidates may belong in: rank exactly.
      bool boundary_tie = false;
      if (static_cast<int64_t>(lp.size()) > k && lp[k].x == lp[k - 1].x) {
        int64_t j0 = k - 1;
        while (j0 > 0 && lp[j0 - 1].x == lp[k].x) --j0;
        boundary_tie = all[j0].x != all[k].x;
      }
      if (boundary_tie) {
        exact_topk(x, vocab, k, mx, log_sum, out_v, out_i);
      } else {
        lp.resize(k);
        std::stable_sort(lp.begin(), lp.end(), before);
        for (int64_t j = 0; j < k; ++j) {
          out_v[j] = lp[j].x;
          out_i[j] = lp[j].id;
        }
      }
      chosen[r] = (x[token_ids[r]] - mx) - log_sum;
    }
  }
}

}  // namespace xllm::XLLM_ISA
