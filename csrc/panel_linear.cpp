// Float32 GEMM y[M, N] = x[M, K] W[N, K]^T (+ bias[N]) on W packed in panels
// (xllm.ops.panels.pack_panels): panel p holds W rows 32p .. 32p + 31 column by column,
// [K, 32], the rows past N zero.
//
// A tile is kMR rows of x against the 32 columns of a panel, in registers: each step over k
// loads the panel's 32 weights of that k once and multiplies them with each x row's value,
// broadcast. Every output sums blocks of kDepth k, each one chain of fused multiply-adds in
// order (then + bias), so the AVX2 and AVX-512 variants give the same floats. There is no
// horizontal sum at the end, unlike the dot-product tiles of linear.cpp: with the weights
// in cache, M = 16 to 256 of SmolLM2's shapes run at 200-227 GFLOP/s on 2 Zen 4 cores (the
// FMA peak measured is 230) against 190-210 there, and prefill-sized M (512, 2048) at 205-210
// against 186-188; streamed from memory, 30 layers at M = 16 take 21.5 ms against 25.4. The
// AVX2 variant, whose 8-lane registers this file uses (linear.cpp's 16-lane vectors are split
// by GCC and kept in memory there), runs at 138-167 GFLOP/s from M = 16 against 23-24.
//
// Threads own ranges of panels. Within a range the x rows go in chunks of kChunkRows, which
// stay in L2 while every panel of the range passes over them.
#include <algorithm>

#include "kernels.h"
#include "simd.h"

namespace xllm::XLLM_ISA {
namespace {

constexpr int kPanel = 32;  // W rows per panel: xllm.ops.panels.PANEL
constexpr int64_t kChunkRows = 60;  // whole register blocks of every variant
// k per chain of FMAs: a long chain's rounding errors grow with its length (one chain over
// all of K put a tiny model's logprobs 1.3e-4 from transformers'; the test allows 1e-4).
// Totals in registers cost ~1%, against ~15% for adding each block's sums into y.
constexpr int64_t kDepth = 64;

// A vector of columns: one register of the variant, kVecs of them per tile row.
#if defined(XLLM_ISA_AVX512)
using Col = __m512;
constexpr int kColLanes = 16, kMR = 6;  // 12 accumulators and 12 totals of 32 registers
inline Col col_load(const float* p) { return _mm512_loadu_ps(p); }
inline Col col_splat(float v) { return _mm512_set1_ps(v); }
inline Col col_zero() { return _mm512_setzero_ps(); }
inline Col col_fma(Col a, Col b, Col c) { return _mm512_fmadd_ps(a, b, c); }
inline void col_store(float* p, Col v) { _mm512_storeu_ps(p, v); }
#elif defined(XLLM_ISA_AVX2)
using Col = __m256;
constexpr int kColLanes = 8, kMR = 3;  // 6 accumulators and 6 totals of 16 registers
inline Col col_load(const float* p) { return _mm256_loadu_ps(p); }
inline Col col_splat(float v) { return _mm256_set1_ps(v); }
inline Col col_zero() { return _mm256_setzero_ps(); }
inline Col col_fma(Col a, Col b, Col c) { return _mm256_fmadd_ps(a, b, c); }
inline void col_store(float* p, Col v) { _mm256_storeu_ps(p, v); }
#else
typedef float Col __attribute__((vector_size(16)));
typedef float ColU __attribute__((vector_size(16), aligned(4)));
constexpr int kColLanes = 4, kMR = 2;
inline Col col_load(const float* p) { return *reinterpret_cast<const ColU*>(p); }
inline Col col_splat(float v) { return Col{} + v; }
inline Col col_zero() { return Col{}; }
inline Col col_fma(Col a, Col b, Col c) { return a * b + c; }
inline void col_store(float* p, Col v) { *reinterpret_cast<ColU*>(p) = v; }
#endif
constexpr int kVecs = 2;                     // vectors of columns per tile row
constexpr int kCols = kVecs * kColLanes;     // columns per tile: a panel in kPanel / kCols
static_assert(kPanel % kCols == 0, "a panel splits into whole tiles");

// y[m * ldy + c0 + c] (+ bias[c0 + c] when not null), c < kCols, for MR rows of x (stride K)
// and the columns c0 + c of the panel at w ([K, kPanel]). Each block of kDepth k is one chain
// of FMAs from zero, added to the total of the blocks before it; both stay in registers.
template <int MR>
inline void tile(const float* x, int64_t K, const float* w, int c0, float* y, int64_t ldy,
                 const float* bias) {
  const float* rows[MR];
  for (int m = 0; m < MR; ++m) rows[m] = x + m * K;
  Col total[MR][kVecs];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < kVecs; ++v) total[m][v] = col_zero();
  for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
    const int64_t k1 = std::min(K, k0 + kDepth);
    Col acc[MR][kVecs];
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < kVecs; ++v) acc[m][v] = col_zero();
#pragma GCC unroll 2
    for (int64_t k = k0; k < k1; ++k) {
      Col wv[kVecs];
      for (int v = 0; v < kVecs; ++v) wv[v] = col_load(w + k * kPanel + c0 + v * kColLanes);
      for (int m = 0; m < MR; ++m) {
        const Col b = col_splat(rows[m][k]);
        for (int v = 0; v < kVecs; ++v) acc[m][v] = col_fma(b, wv[v], acc[m][v]);
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < kVecs; ++v) total[m][v] = k0 == 0 ? acc[m][v] : total[m][v] + acc[m][v];
  }
  for (int m = 0; m < MR; ++m) {
    for (int v = 0; v < kVecs; ++v) {
      const Col sum = bias != nullptr ? total[m][v] + col_load(bias + c0 + v * kColLanes)
                                      : total[m][v];
      col_store(y + m * ldy + c0 + v * kColLanes, sum);
    }
  }
}

// The tile of mr (1 to kMR) rows.
void rows_tile(int mr, const float* x, int64_t K, const float* w, int c0, float* y,
               int64_t ldy, const float* bias) {
  switch (mr) {
    case 1: tile<1>(x, K, w, c0, y, ldy, bias); break;
#if defined(XLLM_ISA_AVX512) || defined(XLLM_ISA_AVX2)
    case 2: tile<2>(x, K, w, c0, y, ldy, bias); break;
#endif
#if defined(XLLM_ISA_AVX512)
    case 3: tile<3>(x, K, w, c0, y, ldy, bias); break;
    case 4: tile<4>(x, K, w, c0, y, ldy, bias); break;
    case 5: tile<5>(x, K, w, c0, y, ldy, bias); break;
#endif
    default: tile<kMR>(x, K, w, c0, y, ldy, bias); break;
  }
}

// A full panel's tiles write into y; the last panel, of fewer columns, into a buffer first.
void panels_range(const float* x, const float* panels, const float* bias, float* y, int64_t M,
                  int64_t N, int64_t K, int64_t p0, int64_t p1) {
  float out[kMR][kPanel];
  for (int64_t r0 = 0; r0 < M; r0 += kChunkRows) {
    const int64_t r1 = std::min(M, r0 + kChunkRows);
    for (int64_t p = p0; p < p1; ++p) {
      const float* panel = panels + p * K * kPanel;
      const int64_t n0 = p * kPanel;
      const int cols = static_cast<int>(std::min<int64_t>(kPanel, N - n0));
      const float* b = bias != nullptr ? bias + n0 : nullptr;
      for (int64_t m = r0; m < r1; m += kMR) {
        const int mr = static_cast<int>(std::min<int64_t>(kMR, r1 - m));
        if (cols == kPanel) {
          for (int c = 0; c < kPanel; c += kCols)
            rows_tile(mr, x + m * K, K, panel, c, y + m * N + n0, N, b);
          continue;
        }
        for (int c = 0; c < kPanel; c += kCols)
          rows_tile(mr, x + m * K, K, panel, c, out[0], kPanel, nullptr);
        for (int r = 0; r < mr; ++r)
          for (int c = 0; c < cols; ++c)
            y[(m + r) * N + n0 + c] = b != nullptr ? out[r][c] + b[c] : out[r][c];
      }
    }
  }
}

}  // namespace

void panel_linear(const float* x, const float* panels, const float* bias, float* y, int64_t M,
                  int64_t N, int64_t K) {
  const int64_t num_panels = (N + kPanel - 1) / kPanel;
  for_row_chunks(num_panels, 1, M * N * K, [&](int64_t p0, int64_t p1) {
    panels_range(x, panels, bias, y, M, N, K, p0, p1);
  });
}

}  // namespace xllm::XLLM_ISA
