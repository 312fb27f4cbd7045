// Beam pruning: per beam group, the best continuations by summed score, deterministic ties.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <vector>

#include "kernels.h"

namespace xllm {

void beam_prune(const float* beam_scores, const int64_t* cand_tokens, const float* cand_logprobs,
                int64_t groups, int64_t width, int64_t cands, int64_t num_keep, int64_t* parents,
                int64_t* tokens, float* scores) {
  const int64_t n = width * cands;
  if (num_keep < 0 || num_keep > n) throw std::invalid_argument("beam_prune: num_keep > W * C");
#pragma omp parallel if (groups * n >= 32768)
  {
    std::vector<float> s(n);
    std::vector<int32_t> order(n);
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t* tok = cand_tokens + g * n;
      for (int64_t i = 0; i < n; ++i) {
        // Same float32 sum as the reference: beam score + candidate logprob.
        s[i] = beam_scores[g * width + i / cands] + cand_logprobs[g * n + i];
        order[i] = static_cast<int32_t>(i);
      }
      // Best first: higher score (NaN above all, as torch sorts), then lower beam, then
      // lower token id, then the earlier candidate.
      auto better = [&](int32_t a, int32_t b) {
        const bool na = std::isnan(s[a]), nb = std::isnan(s[b]);
        if (na != nb) return na;
        if (!na && s[a] != s[b]) return s[a] > s[b];
        const int64_t pa = a / cands, pb = b / cands;
        if (pa != pb) return pa < pb;
        if (tok[a] != tok[b]) return tok[a] < tok[b];
        return a < b;
      };
      std::partial_sort(order.begin(), order.begin() + num_keep, order.end(), better);
      for (int64_t j = 0; j < num_keep; ++j) {
        const int32_t i = order[j];
        parents[g * num_keep + j] = i / cands;
        tokens[g * num_keep + j] = tok[i];
        scores[g * num_keep + j] = s[i];
      }
    }
  }
}

}  // namespace xllm
