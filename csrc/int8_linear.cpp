// Linear layers with int8 products (`--matmul-precision low`), as llama.cpp multiplies its
// 4- and 8-bit formats: x is rounded to int8 per block of 32 values (scale amax / 127), and
// each block's integer dot products with W's own integer weights are summed exactly, then
// scaled by both blocks' scales. W comes as xllm.ops.quant.pack_int8 packs Q4_0, Q4_1 and
// Q8_0 rows (xllm's int8 rows as Q8_0): panels of 16 rows, block by block, so that one
// 64-byte load holds 4 consecutive weights of each of the 16 rows (the operand of vpdpbusd)
// and the 16 sums land in the lanes of one vector, the rows' outputs (no horizontal sums).
// Weights are unsigned, with a zero point the x side folds in (its per-block sums times -zero
// start each block's sum); Q4_1's per-block minimum m adds m * d_x * sum(q_x).
//
// With AVX-512 VNNI, vpdpbusd multiplies 64 byte pairs per instruction, twice the pairs of
// vdpbf16ps: the tile below. Elsewhere a portable loop computes the same sums and scalings in
// the same order, so every variant gives the same floats.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "kernels.h"
#include "simd.h"

#if defined(XLLM_ISA_AVX512)
#pragma GCC target("avx512vnni")
#endif

namespace xllm::XLLM_ISA {
namespace {

constexpr int kPanel = 16;  // W rows per panel
constexpr int kBlock = 32;  // values per block

// Bytes of one panel's block: the weights, then d[16] (and Q4_1's m[16]) as float32.
constexpr int64_t weight_bytes(int f) { return f == kQ8_0 ? 512 : 256; }
constexpr int64_t block_bytes(int f) { return weight_bytes(f) + (f == kQ4_1 ? 128 : 64); }
constexpr int32_t zero_point(int f) { return f == kQ8_0 ? 128 : f == kQ4_0 ? 8 : 0; }

// Row j's weight k (< 32) of a panel's block at w.
inline int32_t packed_weight(int f, const uint8_t* w, int j, int k) {
  if (f == kQ8_0) return w[64 * (k / 4) + 4 * j + k % 4];
  const int c = (k % 16) / 4;
  const uint8_t byte = w[64 * c + 4 * j + k % 4];
  return k < 16 ? byte & 0xF : byte >> 4;
}

inline float load_f32(const uint8_t* p) {
  float f;
  std::memcpy(&f, p, 4);
  return f;
}

// Values of x from which both threads round it (a serial rounding of 64 x 1,536 took 8.6% of
// a down projection's time, the other thread waiting).
constexpr int64_t kParallelQuantize = 1 << 14;

// x [M, K] rounded per block (to nearest, ties to even): q [M, K], d [M, B] (amax / 127) and
// c [M, B]: -zero * sum(q) as int32 where the format has a zero point, d * sum(q) as float
// bits for Q4_1.
void quantize_x(const float* x, int64_t M, int64_t K, int f, int8_t* q, float* d, int32_t* c) {
  const int64_t B = K / kBlock, blocks = M * B;
#pragma omp parallel for schedule(static) \
    if (omp_get_max_threads() > 1 && M * K >= kParallelQuantize)
  for (int64_t i = 0; i < blocks; ++i) {
    const float* xb = x + i * kBlock;
    int8_t* qb = q + i * kBlock;
#if defined(XLLM_ISA_AVX512)
    const __m512 lo = _mm512_loadu_ps(xb), hi = _mm512_loadu_ps(xb + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv));  // to nearest even
    const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtepi32_epi8(qlo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtepi32_epi8(qhi));
    const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
#else
    float amax = 0.0f;
    for (int k = 0; k < kBlock; ++k) amax = std::max(amax, std::fabs(xb[k]));
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t sum = 0;
    for (int k = 0; k < kBlock; ++k) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(xb[k] * inv));
      qb[k] = static_cast<int8_t>(v);
      sum += v;
    }
#endif
    d[i] = amax / 127.0f;
    if (f == kQ4_1) {
      const float s = d[i] * static_cast<float>(sum);
      std::memcpy(&c[i], &s, 4);
    } else {
      c[i] = -zero_point(f) * sum;
    }
  }
}

// y[m, n] for n in [n0, n1), every m < M: the portable loop.
void rows_portable(int f, const uint8_t* w, const int8_t* q, const float* d, const int32_t* c,
                   const float* bias, float* y, int64_t M, int64_t N, int64_t K, int64_t n0,
                   int64_t n1) {
  const int64_t B = K / kBlock, bb = block_bytes(f);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* panel = w + (n / kPanel) * B * bb;
    const int j = static_cast<int>(n % kPanel);
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.0f;
      for (int64_t b = 0; b < B; ++b) {
        const uint8_t* wb = panel + b * bb;
        const int8_t* xb = q + m * K + b * kBlock;
        int32_t s = f == kQ4_1 ? 0 : c[m * B + b];
        for (int k = 0; k < kBlock; ++k) s += packed_weight(f, wb, j, k) * xb[k];
        const float dw = load_f32(wb + weight_bytes(f) + 4 * j);
        acc = std::fma(static_cast<float>(s), dw * d[m * B + b], acc);
        if (f == kQ4_1) {
          float cm;
          std::memcpy(&cm, &c[m * B + b], 4);
          acc = std::fma(load_f32(wb + weight_bytes(f) + 64 + 4 * j), cm, acc);
        }
      }
      y[m * N + n] = acc + (bias != nullptr ? bias[n] : 0.0f);
    }
  }
}

#if defined(XLLM_ISA_AVX512)
bool has_vnni() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni");
  }();
  return has;
}

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// Blocks ahead that a one-row tile fetches (decoding one sequence of the default model,
// alternating builds: 165 and 172 tokens/s without, 182 and 194 with).
constexpr int64_t kPrefetchBlocks = 8;

// MR rows of x (q at q, stride K) against NV panels (the first at w, panel_bytes apart): y
// [MR, 16 NV] at y (stride ldy), its last panel's first `last` rows only.
template <int F, int MR, int NV>
void tile(const uint8_t* w, int64_t panel_bytes, const int8_t* q, const float* d,
          const int32_t* c, int64_t K, const float* bias, float* y, int64_t ldy, int last) {
  constexpr int64_t bb = block_bytes(F), wbytes = weight_bytes(F);
  const int64_t B = K / kBlock;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* wb = w + b * bb;
    const int8_t* xb = q + b * kBlock;
    if constexpr (MR == 1) {  // one row of x: W streams from memory, bound by its latency
      for (int v = 0; v < NV; ++v)
        for (int64_t l = 0; l < bb; l += 64)
          __builtin_prefetch(wb + v * panel_bytes + kPrefetchBlocks * bb + l, 0, 2);
    }
    __m512i s[MR][NV];
    for (int m = 0; m < MR; ++m) {
      const __m512i init =
          F == kQ4_1 ? _mm512_setzero_si512() : _mm512_set1_epi32(c[m * B + b]);
      for (int v = 0; v < NV; ++v) s[m][v] = init;
    }
    if constexpr (F == kQ8_0) {
      for (int g = 0; g < 8; ++g) {
        __m512i wv[NV];
        for (int v = 0; v < NV; ++v)
          wv[v] = _mm512_loadu_si512(wb + v * panel_bytes + 64 * g);
        for (int m = 0; m < MR; ++m) {
          const __m512i xg = bcast4(xb + m * K + 4 * g);
          for (int v = 0; v < NV; ++v) s[m][v] = _mm512_dpbusd_epi32(s[m][v], wv[v], xg);
        }
      }
    } else {
      for (int g = 0; g < 4; ++g) {
        __m512i lo[NV], hi[NV];
        for (int v = 0; v < NV; ++v) {
          const __m512i raw = _mm512_loadu_si512(wb + v * panel_bytes + 64 * g);
          lo[v] = _mm512_and_si512(raw, nibble);
          hi[v] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble);
        }
        for (int m = 0; m < MR; ++m) {
          const __m512i xl = bcast4(xb + m * K + 4 * g), xh = bcast4(xb + m * K + 16 + 4 * g);
          for (int v = 0; v < NV; ++v) {
            s[m][v] = _mm512_dpbusd_epi32(s[m][v], lo[v], xl);
            s[m][v] = _mm512_dpbusd_epi32(s[m][v], hi[v], xh);
          }
        }
      }
    }
    __m512 dw[NV];
    for (int v = 0; v < NV; ++v)
      dw[v] = _mm512_loadu_ps(reinterpret_cast<const float*>(wb + v * panel_bytes + wbytes));
    for (int m = 0; m < MR; ++m) {
      const __m512 dx = _mm512_set1_ps(d[m * B + b]);
      for (int v = 0; v < NV; ++v)
        acc[m][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[m][v]), _mm512_mul_ps(dw[v], dx),
                                    acc[m][v]);
    }
    if constexpr (F == kQ4_1) {
      __m512 mw[NV];
      for (int v = 0; v < NV; ++v)
        mw[v] = _mm512_loadu_ps(reinterpret_cast<const float*>(wb + v * panel_bytes + wbytes + 64));
      for (int m = 0; m < MR; ++m) {
        float cm;
        std::memcpy(&cm, &c[m * B + b], 4);
        const __m512 cv = _mm512_set1_ps(cm);
        for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_fmadd_ps(mw[v], cv, acc[m][v]);
      }
    }
  }
  for (int v = 0; v < NV; ++v) {
    const __mmask16 keep = v < NV - 1 ? __mmask16(0xFFFF) : __mmask16((1u << last) - 1);
    const __m512 bv = bias != nullptr ? _mm512_maskz_loadu_ps(keep, bias + 16 * v)
                                      : _mm512_setzero_ps();
    for (int m = 0; m < MR; ++m)
      _mm512_mask_storeu_ps(y + m * ldy + 16 * v, keep, _mm512_add_ps(acc[m][v], bv));
  }
}

template <int F, int NV>
void tile_rows(int mr, const uint8_t* w, int64_t panel_bytes, const int8_t* q, const float* d,
               const int32_t* c, int64_t K, const float* bias, float* y, int64_t ldy, int last) {
  switch (mr) {
    case 1: tile<F, 1, NV>(w, panel_bytes, q, d, c, K, bias, y, ldy, last); break;
    case 2: tile<F, 2, NV>(w, panel_bytes, q, d, c, K, bias, y, ldy, last); break;
    case 3: tile<F, 3, NV>(w, panel_bytes, q, d, c, K, bias, y, ldy, last); break;
    default: tile<F, 4, NV>(w, panel_bytes, q, d, c, K, bias, y, ldy, last); break;
  }
}

constexpr int kMR = 4;  // x rows per tile
constexpr int kNV = 2;  // panels per tile

// Panels [p0, p1) against all M rows of x: two panels at a time, every block of x rows over
// them while they sit in L1.
template <int F>
void panels_vnni(const uint8_t* w, const int8_t* q, const float* d, const int32_t* c,
                 const float* bias, float* y, int64_t M, int64_t N, int64_t K, int64_t p0,
                 int64_t p1) {
  const int64_t B = K / kBlock, panel_bytes = B * block_bytes(F);
  const int64_t blocks = (M + kMR - 1) / kMR;
  for (int64_t p = p0; p < p1;) {
    const int nv = p + kNV <= p1 ? kNV : 1;
    const int64_t n = p * kPanel;
    const int last = static_cast<int>(std::min<int64_t>(kPanel, N - (p + nv - 1) * kPanel));
    const uint8_t* wp = w + p * panel_bytes;
    const float* bp = bias != nullptr ? bias + n : nullptr;
    for (int64_t blk = 0, m = 0; blk < blocks; ++blk) {
      const int mr = static_cast<int>((M - m) / (blocks - blk));
      const int8_t* qm = q + m * K;
      const float* dm = d + m * B;
      const int32_t* cm = c + m * B;
      if (nv == kNV)
        tile_rows<F, kNV>(mr, wp, panel_bytes, qm, dm, cm, K, bp, y + m * N + n, N, last);
      else
        tile_rows<F, 1>(mr, wp, panel_bytes, qm, dm, cm, K, bp, y + m * N + n, N, last);
      m += mr;
    }
    p += nv;
  }
}
#endif

}  // namespace

bool int8_products_fast() {
#if defined(XLLM_ISA_AVX512)
  return has_vnni();
#else
  return false;
#endif
}

void int8_linear(const float* x, const uint8_t* packed, int format, const float* bias, float* y,
                 int64_t M, int64_t N, int64_t K) {
  if (format != kQ8_0 && format != kQ4_0 && format != kQ4_1)
    throw std::invalid_argument("int8 products take q8_0, q4_0 or q4_1 weights");
  if (K % kBlock != 0) throw std::invalid_argument("int8 products need K a multiple of 32");
  if (M == 0 || N == 0) return;
  const int64_t B = K / kBlock;
  thread_local std::vector<int8_t> qbuf;
  thread_local std::vector<float> dbuf;
  thread_local std::vector<int32_t> cbuf;
  qbuf.resize(static_cast<size_t>(M * K));
  dbuf.resize(static_cast<size_t>(M * B));
  cbuf.resize(static_cast<size_t>(M * B));
  int8_t* q = qbuf.data();
  float* d = dbuf.data();
  int32_t* c = cbuf.data();
  quantize_x(x, M, K, format, q, d, c);
  const int64_t panels = (N + kPanel - 1) / kPanel;
#if defined(XLLM_ISA_AVX512)
  if (has_vnni()) {
    for_row_chunks(panels, kNV, M * N * K, [&](int64_t p0, int64_t p1) {
      switch (format) {
        case kQ8_0: panels_vnni<kQ8_0>(packed, q, d, c, bias, y, M, N, K, p0, p1); break;
        case kQ4_0: panels_vnni<kQ4_0>(packed, q, d, c, bias, y, M, N, K, p0, p1); break;
        default: panels_vnni<kQ4_1>(packed, q, d, c, bias, y, M, N, K, p0, p1); break;
      }
    });
    return;
  }
#endif
  for_row_chunks(panels, 1, M * N * K, [&](int64_t p0, int64_t p1) {
    rows_portable(format, packed, q, d, c, bias, y, M, N, K, p0 * kPanel,
                  std::min(N, p1 * kPanel));
  });
}

}  // namespace xllm::XLLM_ISA
