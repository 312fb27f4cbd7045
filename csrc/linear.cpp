// Skinny GEMM y[M, N] = x[M, K] W[N, K]^T (+ bias[N]) in float32, for decode-sized M.
//
// Every output is a dot product over K, which is contiguous in both x and W. Each
// thread owns one contiguous range of W rows (a static split), so W streams from memory
// exactly once. A tile of kNR W rows meets blocks of up to kMR x rows: kNR * MR
// accumulators of 16 lanes run over K, every W and x vector loaded once per step
// (W from L1, x from L1/L2), and the 16 dot products are summed with the hsum16
// transpose. While the x blocks work on a tile, the lines of the tile kPrefetchTiles
// ahead are prefetched into L2, spread evenly over the blocks' 16-float steps, so that
// memory keeps streaming while the cores compute (without it M = 1 reaches ~60% of the
// bandwidth; prefetching all in the first block is ~7% slower at M = 16). A K that is
// not a multiple of 16 ends with one masked step; N rows past the last full tile are
// done one at a time, by the last thread.
#include <omp.h>

#include <algorithm>
#include <stdexcept>

#include "kernels.h"
#include "simd.h"

namespace xllm::XLLM_ISA {
namespace {

constexpr int kNR = 4;              // W rows per tile
constexpr int kMR = 4;              // most x rows per register block (kNR * kMR accumulators)
constexpr int64_t kPrefetchTiles = 2;  // prefetch distance, in tiles

inline VecF fmadd(VecF a, VecF b, VecF c) {
#if defined(XLLM_ISA_AVX512)
  return reinterpret_cast<VecF>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a),
                                                reinterpret_cast<__m512>(b),
                                                reinterpret_cast<__m512>(c)));
#else
  return a * b + c;
#endif
}

// Keeps v in a register. GCC would otherwise fold its load into every FMA that uses it,
// loading the vector kNR (or MR) times per step instead of once; loads, not FMAs, would
// then bound the loop (about 50 instead of 88 GFLOP/s per Zen 4 core).
inline void in_register(VecF& v) {
#if defined(XLLM_ISA_AVX512)
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// The first n (0 < n < 16) floats at p, zeros after; reads nothing past p + n.
inline VecF load_head(const float* p, int n) {
#if defined(XLLM_ISA_AVX512)
  return reinterpret_cast<VecF>(_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p));
#else
  VecF v{};
  for (int i = 0; i < n; ++i) v[i] = p[i];
  return v;
#endif
}

inline const char* bytes(const float* p) { return reinterpret_cast<const char*>(p); }

// y[m, r] (row stride N) for the NR W rows at w and the MR x rows at x, over all of K;
// one pf.step() per 16-float step.
template <int NR, int MR>
void tile(const float* x, const float* w, int64_t K, const float* bias, float* y, int64_t N,
          Prefetch& pf_state) {
  Prefetch pf = pf_state;
  constexpr int kAcc = NR * MR;
  static_assert(kAcc <= kLanes, "one hsum16 per tile");
  VecF acc[kAcc];
  // Unrolled: as a loop, the zeroing would become a memset, which generic tuning expands
  // to `rep stos` (that alone cost M = 1 about 15% on Zen 3).
#pragma GCC unroll 16
  for (int i = 0; i < kAcc; ++i) acc[i] = VecF{};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    pf.step();
    VecF wv[NR];
    for (int r = 0; r < NR; ++r) {
      wv[r] = load(w + r * K + k);
      in_register(wv[r]);
    }
    for (int m = 0; m < MR; ++m) {
      VecF xv = load(x + m * K + k);
      in_register(xv);
      for (int r = 0; r < NR; ++r) acc[r * MR + m] = fmadd(wv[r], xv, acc[r * MR + m]);
    }
  }
  if (k < K) {
    const int n = static_cast<int>(K - k);
    VecF wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = load_head(w + r * K + k, n);
    for (int m = 0; m < MR; ++m) {
      const VecF xv = load_head(x + m * K + k, n);
      for (int r = 0; r < NR; ++r) acc[r * MR + m] = fmadd(wv[r], xv, acc[r * MR + m]);
    }
  }
  pf_state = pf;
  const VecF s = hsum16<kAcc>(acc);
  for (int r = 0; r < NR; ++r) {
    const float b = bias != nullptr ? bias[r] : 0.0f;
    for (int m = 0; m < MR; ++m) y[m * N + r] = s[r * MR + m] + b;
  }
}

template <int NR>
void tile_rows(int mr, const float* x, const float* w, int64_t K, const float* bias, float* y,
               int64_t N, Prefetch& pf) {
  static_assert(kMR == 4, "one case per block height");
  switch (mr) {
    case 1: tile<NR, 1>(x, w, K, bias, y, N, pf); break;
    case 2: tile<NR, 2>(x, w, K, bias, y, N, pf); break;
    case 3: tile<NR, 3>(x, w, K, bias, y, N, pf); break;
    default: tile<NR, 4>(x, w, K, bias, y, N, pf); break;
  }
}

// Rows [n0, n1) of W against all of x: tiles of kNR rows, then single rows for the
// rest; x in ceil(M / kMR) blocks of balanced heights (17 rows: 3, 3, 3, 4, 4).
void rows_range(const float* x, const float* w, const float* bias, float* y, int64_t M,
                int64_t N, int64_t K, int64_t n0, int64_t n1) {
  const int64_t blocks = (M + kMR - 1) / kMR;
  const int per_step = static_cast<int>((kNR + blocks - 1) / blocks);  // lines per step
  Prefetch none{nullptr, nullptr, 0};
  for (int64_t n = n0; n < n1;) {
    const float* wt = w + n * K;
    const float* bt = bias != nullptr ? bias + n : nullptr;
    if (n + kNR <= n1) {
      const int64_t ahead = std::min(n + kPrefetchTiles * kNR, n1);  // W rows to fetch
      const int64_t ahead_end = std::min(ahead + kNR, n1);
      Prefetch pf{bytes(w + ahead * K), bytes(w + ahead_end * K), per_step};
      for (int64_t b = 0, m = 0; b < blocks; ++b) {
        const int mr = static_cast<int>((M - m) / (blocks - b));
        tile_rows<kNR>(mr, x + m * K, wt, K, bt, y + m * N + n, N, pf);
        m += mr;
      }
      n += kNR;
    } else {
      for (int64_t b = 0, m = 0; b < blocks; ++b) {
        const int mr = static_cast<int>((M - m) / (blocks - b));
        tile_rows<1>(mr, x + m * K, wt, K, bt, y + m * N + n, N, none);
        m += mr;
      }
      n += 1;
    }
  }
}

}  // namespace

void linear(const float* x, const float* weight, const float* bias, float* y, int64_t M,
            int64_t N, int64_t K) {
  if (M < 0 || N < 0 || K < 0) throw std::invalid_argument("linear: negative size");
  if (M == 0 || N == 0) return;
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) y[m * N + n] = bias != nullptr ? bias[n] : 0.0f;
    return;
  }
  for_row_chunks(N, kNR, M * N * K, [&](int64_t n0, int64_t n1) {
    rows_range(x, weight, bias, y, M, N, K, n0, n1);
  });
}

}  // namespace xllm::XLLM_ISA
