// Linear layers over quantized weights (the formats of xllm/ops/quant.py, GGUF's blocks).
//
// y[M, N] = x[M, K] W[N, K]^T (+ bias) with W's rows kept quantized in memory. Each thread
// owns a range of W's rows (dynamic chunks of tiles, as in linear.cpp). A tile of kNR rows
// is unpacked, 32 weights (one unit) at a time, into float vectors in registers, scaled as
// the format says, and multiplied with float32 activations: the result is the dequantized
// model's product up to float rounding. With at most kMR rows of x the unpacked vectors
// meet x straight away; with more, the tile is unpacked once into a per-thread float
// buffer (L1/L2-sized) and every block of x rows runs over that buffer.
//
// Where the caller allows bfloat16 products (torch's "medium" float32 matmul precision), the
// AVX-512 build on a CPU with AVX-512 BF16 takes them for more rows than one register block:
// x is rounded to bfloat16 once, each tile as it is unpacked into the buffer, and vdpbf16ps
// sums pairs of products into float32 lanes (BF16Products), at twice the FMA's multiply rate.
//
// The vectors here are as wide as the variant's registers (16 floats with AVX-512, 8
// otherwise), unlike simd.h's fixed 16, so that the AVX2 build keeps them in registers.
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"
#include "simd.h"

#if defined(XLLM_ISA_AVX512)
// vdpbf16ps and vcvtne2ps2bf16, in BF16Products only, which runs where has_bf16_dot().
#pragma GCC target("avx512bf16")
#endif

namespace xllm::XLLM_ISA {
namespace {

#if defined(XLLM_ISA_AVX512)
constexpr int kW = 16;
#else
constexpr int kW = 8;
#endif
constexpr int kUnit = 32;           // weights unpacked at a time
constexpr int kV = kUnit / kW;      // vectors per unit
constexpr int kNR = 4;              // W rows per tile
constexpr int kMR = kW == 16 ? 4 : 2;  // x rows per register block
constexpr int64_t kPrefetchTiles = 2;  // prefetch distance, in tiles

typedef float VF __attribute__((vector_size(kW * 4)));
typedef float VFU __attribute__((vector_size(kW * 4), aligned(4)));
typedef int32_t VI __attribute__((vector_size(kW * 4)));
typedef uint8_t VB __attribute__((vector_size(kW)));

inline VF loadf(const float* p) { return *reinterpret_cast<const VFU*>(p); }
inline void storef(float* p, VF v) { *reinterpret_cast<VFU*>(p) = v; }
inline VB loadb(const uint8_t* p) {
  VB v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline VF to_float(VB v) { return __builtin_convertvector(__builtin_convertvector(v, VI), VF); }
// kW int8 at p as floats. (GCC turns a signed byte-vector conversion into scalar code;
// flipping the sign bit makes it the unsigned one, q + 128.)
inline VF int8_float(const uint8_t* p) { return to_float(loadb(p) ^ 0x80) - 128.0f; }

// IEEE half (little-endian bytes) to float.
inline float f16(const uint8_t* p) {
  const uint16_t h = p[0] | (uint16_t(p[1]) << 8);
#if defined(XLLM_ISA_AVX512) || defined(XLLM_ISA_AVX2)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t bits;
  if (exp == 0) {
    const float v = static_cast<float>(man) * (1.0f / 16777216.0f);  // subnormal: man * 2^-24
    return sign ? -v : v;
  }
  bits = exp == 31 ? sign | 0x7F800000u | (man << 13) : sign | ((exp + 112) << 23) | (man << 13);
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

inline float f32(const uint8_t* p) {
  float f;
  std::memcpy(&f, p, 4);
  return f;
}

// Q4_0 and Q4_1 blocks of 32 weights: bytes per block, and where the 16 bytes of nibbles start.
constexpr int64_t q4_block_bytes(int f) { return f == kQ4_0 ? 18 : 20; }
constexpr int64_t q4_nibbles_at(int f) { return f == kQ4_0 ? 2 : 4; }

// 32 four-bit weights a * q + c of qs[16] (q of weight j in the low nibble of qs[j], of
// j + 16 in the high one) into w[kV].
inline void unpack_nibbles(const uint8_t* qs, float a, float c, VF* w) {
  for (int v = 0; v < kV; ++v) {
    const int e = v * kW;  // weights e .. e + kW: low nibbles of qs[e..], then high of qs[e - 16..]
    const VB q = e < 16 ? loadb(qs + e) & 0xF : loadb(qs + e - 16) >> 4;
    w[v] = to_float(q) * a + c;
  }
}

#if defined(XLLM_ISA_AVX512)
// The AVX-512 unpacking of the 32-weight formats. Zen 4 runs one 512-bit shuffle per cycle,
// and shuffles (byte widening, lane broadcasts, half conversions) bound these loops, so:
// the four-bit weights come from a 16-entry table looked up by vpermps, which reads only
// each lane's low four bits (one shuffle per 16 weights replaces a mask, a conversion and an
// FMA); and the block's scales, once converted, go through memory, so that broadcasting
// them is a load, not a shuffle.

// The float32 values of the two halves at p (d and m of q4_1), through memory.
inline const float* halves(const uint8_t* p, float* out) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  _mm_storel_pi(reinterpret_cast<__m64*>(out), _mm_cvtph_ps(_mm_cvtsi32_si128(bits)));
  asm volatile("" : : "r"(out) : "memory");  // read them back from memory, as broadcasts
  return out;
}

inline void lookup_nibbles(const uint8_t* qs, __m512 table, VF* w) {
  const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
  w[0] = reinterpret_cast<VF>(_mm512_permutexvar_ps(q, table));
  w[1] = reinterpret_cast<VF>(_mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table));
}

inline __m512 iota16(float first) {
  return _mm512_setr_ps(first, first + 1, first + 2, first + 3, first + 4, first + 5, first + 6,
                        first + 7, first + 8, first + 9, first + 10, first + 11, first + 12,
                        first + 13, first + 14, first + 15);
}

// The 16 values a Q4_0 block (d * (q - 8)) or Q4_1 block (d * q + m) at b gives its nibbles.
template <int F>
inline __m512 q4_table(const uint8_t* b) {
  alignas(8) float dm[2];
  const float* s = halves(b, dm);  // Q4_0: d (and the first two weights' bytes, unused)
  if constexpr (F == kQ4_0) return _mm512_mul_ps(iota16(-8.0f), _mm512_set1_ps(s[0]));
  return _mm512_fmadd_ps(iota16(0.0f), _mm512_set1_ps(s[0]), _mm512_set1_ps(s[1]));
}

inline void unpack_q8_0(const uint8_t* b, VF* w) {
  alignas(8) float dm[2];
  const __m512 d = _mm512_set1_ps(halves(b, dm)[0]);
  for (int v = 0; v < 2; ++v) {
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2 + 16 * v));
    w[v] = reinterpret_cast<VF>(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), d));
  }
}
#endif

// Unit u (weights 32u .. 32u + 31) of a row, dequantized into w[kV].
template <int F>
inline void unpack(const uint8_t* row, int64_t u, VF* w) {
  if constexpr (F == kQ8_0) {
#if defined(XLLM_ISA_AVX512)
    unpack_q8_0(row + u * 34, w);
#else
    const uint8_t* b = row + u * 34;
    const float d = f16(b);
    for (int v = 0; v < kV; ++v) w[v] = int8_float(b + 2 + v * kW) * d;
#endif
  } else if constexpr (F == kQ4_0 || F == kQ4_1) {
    const uint8_t* b = row + u * q4_block_bytes(F);
#if defined(XLLM_ISA_AVX512)
    lookup_nibbles(b + q4_nibbles_at(F), q4_table<F>(b), w);
#else
    const float d = f16(b);
    unpack_nibbles(b + q4_nibbles_at(F), d, F == kQ4_0 ? -8.0f * d : f16(b + 2), w);
#endif
  } else if constexpr (F == kQ4_K) {
    const uint8_t* b = row + (u >> 3) * 144;
    const int j = static_cast<int>(u & 7);
    const uint8_t* s = b + 4;
    int sc, mn;
    if (j < 4) {
      sc = s[j] & 63;
      mn = s[j + 4] & 63;
    } else {
      sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
      mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
    const float a = f16(b) * sc, c = -f16(b + 2) * mn;
    const uint8_t* qs = b + 16 + (j >> 1) * 32;  // sub-blocks 2i and 2i + 1: nibbles of 32 bytes
    for (int v = 0; v < kV; ++v) {
      const VB raw = loadb(qs + v * kW);
      const VB q = (j & 1) ? raw >> 4 : raw & 0xF;
      w[v] = to_float(q) * a + c;
    }
  } else if constexpr (F == kQ6_K) {
    const uint8_t* b = row + (u >> 3) * 210;
    const int j = static_cast<int>(u & 7), h = j >> 2, r = j & 3;
    const uint8_t* ql = b + 64 * h + 32 * (r & 1);
    const uint8_t* qh = b + 128 + 32 * h;
    const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
    const float d = f16(b + 208);
    for (int v = 0; v < kV; ++v) {
      const VB low = (r >> 1) ? loadb(ql + v * kW) >> 4 : loadb(ql + v * kW) & 0xF;
      const VB high = (loadb(qh + v * kW) >> (2 * r)) & 3;
      const VI q = __builtin_convertvector(low | (high << 4), VI) - 32;
      w[v] = __builtin_convertvector(q, VF) * (d * scales[2 * j + (v * kW) / 16]);
    }
  } else if constexpr (F == kF32) {
    const float* p = reinterpret_cast<const float*>(row) + u * kUnit;
    for (int v = 0; v < kV; ++v) w[v] = loadf(p + v * kW);
  } else {
    static_assert(F == kInt8, "one branch per format");
    const float scale = f32(row);
    for (int v = 0; v < kV; ++v) w[v] = int8_float(row + 4 + u * 32 + v * kW) * scale;
  }
}

// r[i] = the sum of v[i]'s lanes, i < N. Always inlined (GCC stopped inlining it once the
// tile became a template over its products), and for N <= 4 v (the tile's accumulators) is
// never handed on by address: GCC would then keep them in memory for the whole loop, one
// load and one store per multiply-add (the one-row tile lost about 15% to it).
template <int N>
[[gnu::always_inline]] inline void hsums(const VF* v, float* r) {
#if defined(XLLM_ISA_AVX512)
  if constexpr (N <= 4) {
    for (int i = 0; i < N; ++i) r[i] = _mm512_reduce_add_ps(reinterpret_cast<__m512>(v[i]));
  } else {
    const VecF s = hsum16<N>(reinterpret_cast<const VecF*>(v));
    for (int i = 0; i < N; ++i) r[i] = s[i];
  }
#else
  for (int i = 0; i < N; ++i) {
    float t = 0.0f;
    for (int l = 0; l < kW; ++l) t += v[i][l];
    r[i] = t;
  }
#endif
}

// How a tile multiplies a unit of W with a unit of x (32 consecutive k), into one float
// vector of partial sums per (W row, x row); the lanes are summed at the end (hsums).
// X is the element of x and of the unpacked-tile buffer.
struct F32Products {
  using X = float;
  struct Unit {
    VF v[kV];
  };
  template <int F>
  static void unpack_into(const uint8_t* row, int64_t u, Unit& w) {
    unpack<F>(row, u, w.v);
  }
  static Unit load(const float* p) {
    Unit u;
    for (int v = 0; v < kV; ++v) u.v[v] = loadf(p + v * kW);
    return u;
  }
  static void store(float* p, const Unit& u) {
    for (int v = 0; v < kV; ++v) storef(p + v * kW, u.v[v]);
  }
  static void madd(VF& acc, const Unit& w, const Unit& x) {
    for (int v = 0; v < kV; ++v) acc += w.v[v] * x.v[v];
  }
};

#if defined(XLLM_ISA_AVX512)
// A Q4_0 or Q4_1 block (at b) as 32 bfloat16 weights: the block's 16 values d * q + m are
// rounded once into both halves of a 32-entry word table (vpermw reads five index bits, so the
// high nibble sitting above a low one does not matter) and looked up by the 32 nibbles. The
// same values as unpacking to float32 and rounding each weight, with one 32-lane word lookup
// instead of two 16-lane float lookups.
template <int F>
inline __m512bh unpack_q4_bf16(const uint8_t* b) {
  const __m512 t = q4_table<F>(b);
  const __m512i table = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(t, t));
  const __m256i q = _mm256_cvtepu8_epi16(
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + q4_nibbles_at(F))));
  const __m512i idx =
      _mm512_inserti64x4(_mm512_castsi256_si512(q), _mm256_srli_epi16(q, 4), 1);
  return reinterpret_cast<__m512bh>(_mm512_permutexvar_epi16(idx, table));
}

// Bfloat16 products with AVX-512 BF16: a unit is one vector of 32 bfloat16 values, and
// vdpbf16ps adds the products of each pair of lanes into one float32 lane (twice the multiply
// rate of float32 FMAs). Runs only where the CPU reports avx512_bf16 (has_bf16_dot).
struct BF16Products {
  using X = uint16_t;
  struct Unit {
    __m512bh v;
  };
  static Unit from(const VF* w) {
    return {_mm512_cvtne2ps_pbh(reinterpret_cast<__m512>(w[1]), reinterpret_cast<__m512>(w[0]))};
  }
  template <int F>
  static void unpack_into(const uint8_t* row, int64_t u, Unit& w) {
    if constexpr (F == kQ4_0 || F == kQ4_1) {
      w = {unpack_q4_bf16<F>(row + u * q4_block_bytes(F))};
    } else {
      VF t[kV];
      unpack<F>(row, u, t);
      w = from(t);
    }
  }
  static Unit load(const uint16_t* p) {
    return {reinterpret_cast<__m512bh>(_mm512_loadu_si512(p))};
  }
  static void store(uint16_t* p, const Unit& u) {
    _mm512_storeu_si512(p, reinterpret_cast<__m512i>(u.v));
  }
  static void madd(VF& acc, const Unit& w, const Unit& x) {
    acc = reinterpret_cast<VF>(_mm512_dpbf16_ps(reinterpret_cast<__m512>(acc), w.v, x.v));
  }
};

bool has_bf16_dot() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16");
  }();
  return has;
}
#endif

// y[m, r] for NR W rows whose units come from `get(r, u, unit)` and MR x rows at x (stride K);
// one pf.step() per unit.
template <typename P, int NR, int MR, typename Get>
inline void tile(const Get& get, const typename P::X* x, int64_t K, const float* bias, float* y,
                 int64_t N, Prefetch pf) {
  // Zeros from a register: GCC otherwise clears the array with rep stos (~8% of a
  // bfloat16 tile) and loads it back.
  VF zero = VF{};
#if defined(XLLM_ISA_AVX512)
  asm("" : "+v"(zero));
#endif
  VF acc[NR * MR];
  for (int i = 0; i < NR * MR; ++i) acc[i] = zero;
  const int64_t units = K / kUnit;
  for (int64_t u = 0; u < units; ++u) {
    pf.step();
    typename P::Unit w[NR];
    for (int r = 0; r < NR; ++r) get(r, u, w[r]);
    for (int m = 0; m < MR; ++m) {
      const typename P::Unit xu = P::load(x + m * K + u * kUnit);
      for (int r = 0; r < NR; ++r) P::madd(acc[r * MR + m], w[r], xu);
    }
  }
  float s[NR * MR];
  hsums<NR * MR>(acc, s);
  for (int r = 0; r < NR; ++r) {
    const float b = bias != nullptr ? bias[r] : 0.0f;
    for (int m = 0; m < MR; ++m) y[m * N + r] = s[r * MR + m] + b;
  }
}

template <typename P, int NR, typename Get>
void tile_rows(int mr, const Get& get, const typename P::X* x, int64_t K, const float* bias,
               float* y, int64_t N, Prefetch pf) {
  switch (mr) {
    case 1: tile<P, NR, 1>(get, x, K, bias, y, N, pf); break;
#if defined(XLLM_ISA_AVX512)
    case 2: tile<P, NR, 2>(get, x, K, bias, y, N, pf); break;
    case 3: tile<P, NR, 3>(get, x, K, bias, y, N, pf); break;
    default: tile<P, NR, 4>(get, x, K, bias, y, N, pf); break;
#else
    default: tile<P, NR, 2>(get, x, K, bias, y, N, pf); break;
#endif
  }
}

// Rows [n0, n1) of W against all M rows of x. While a tile's units are multiplied (in the
// first block of x rows), the bytes of the tile kPrefetchTiles ahead are fetched into L2.
template <int F, typename P>
void rows_range(const typename P::X* x, const uint8_t* w, int64_t row_bytes, const float* bias,
                float* y, int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  using X = typename P::X;
  const int64_t blocks = (M + kMR - 1) / kMR;
  const int64_t units = K / kUnit;
  const int per_unit = static_cast<int>((kNR * row_bytes / 64 + units - 1) / units);
  thread_local std::vector<X> buffer;
  if (blocks > 1) buffer.resize(static_cast<size_t>(kNR * K));
  X* buf = buffer.data();
  // The tiles before the prefetch distance, all requested at once: a range starts cold, and
  // loaded on demand its first rows would wait for memory one line after another.
  const char* head = reinterpret_cast<const char*>(w + n0 * row_bytes);
  const char* head_end = reinterpret_cast<const char*>(
      w + std::min(n0 + kPrefetchTiles * kNR, n1) * row_bytes);
  Prefetch{head, head_end, static_cast<int>((head_end - head + 63) / 64)}.step();
  for (int64_t n = n0; n < n1;) {
    const int nr = n + kNR <= n1 ? kNR : 1;
    const uint8_t* wt = w + n * row_bytes;
    const float* bt = bias != nullptr ? bias + n : nullptr;
    const int64_t ahead = std::min(n + kPrefetchTiles * kNR, n1);
    const char* fetch = reinterpret_cast<const char*>(w + ahead * row_bytes);
    const char* fetch_end = reinterpret_cast<const char*>(w + std::min(ahead + kNR, n1) * row_bytes);
    Prefetch pf{fetch, fetch_end, per_unit}, none{nullptr, nullptr, 0};
    auto direct = [wt, row_bytes](int r, int64_t u, typename P::Unit& out) {
      P::template unpack_into<F>(wt + r * row_bytes, u, out);
    };
    auto buffered = [buf, K](int r, int64_t u, typename P::Unit& out) {
      out = P::load(buf + r * K + u * kUnit);
    };
    if (blocks > 1) {
      for (int r = 0; r < nr; ++r) {
        for (int64_t u = 0; u < units; ++u) {
          if (r == 0) pf.step();
          typename P::Unit out;
          P::template unpack_into<F>(wt + r * row_bytes, u, out);
          P::store(buf + r * K + u * kUnit, out);
        }
      }
    }
    for (int64_t b = 0, m = 0; b < blocks; ++b) {
      const int mr = static_cast<int>((M - m) / (blocks - b));
      const X* xb = x + m * K;
      float* yb = y + m * N + n;
      if (blocks > 1) {
        if (nr == kNR) tile_rows<P, kNR>(mr, buffered, xb, K, bt, yb, N, none);
        else tile_rows<P, 1>(mr, buffered, xb, K, bt, yb, N, none);
      } else {
        if (nr == kNR) tile_rows<P, kNR>(mr, direct, xb, K, bt, yb, N, pf);
        else tile_rows<P, 1>(mr, direct, xb, K, bt, yb, N, none);
      }
      m += mr;
    }
    n += nr;
  }
}

template <int F, typename P>
void linear_format(const typename P::X* x, const uint8_t* w, int64_t row_bytes,
                   const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  for_row_chunks(N, kNR, M * N * K, [&](int64_t n0, int64_t n1) {
    rows_range<F, P>(x, w, row_bytes, bias, y, M, N, K, n0, n1);
  });
}

template <int F>
void dequantize_format(const uint8_t* w, int64_t row_bytes, const int64_t* rows, int64_t R,
                       float* out, int64_t K) {
  const bool parallel = omp_get_max_threads() > 1 && R * K >= kParallelMinWork;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t i = 0; i < R; ++i) {
    const uint8_t* row = w + (rows != nullptr ? rows[i] : i) * row_bytes;
    for (int64_t u = 0; u < K / kUnit; ++u) {
      VF v[kV];
      unpack<F>(row, u, v);
      for (int j = 0; j < kV; ++j) storef(out + i * K + u * kUnit + j * kW, v[j]);
    }
  }
}

template <template <int> class Call, typename... Args>
void dispatch(int format, Args... args) {
  switch (format) {
    case kQ8_0: Call<kQ8_0>::run(args...); break;
    case kQ4_0: Call<kQ4_0>::run(args...); break;
    case kQ4_1: Call<kQ4_1>::run(args...); break;
    case kQ4_K: Call<kQ4_K>::run(args...); break;
    case kQ6_K: Call<kQ6_K>::run(args...); break;
    case kInt8: Call<kInt8>::run(args...); break;
    case kF32: Call<kF32>::run(args...); break;
    default: throw std::invalid_argument("unknown quantized format");
  }
}

template <typename P>
struct Linear {
  template <int F>
  struct Format {
    template <typename... Args>
    static void run(Args... args) { linear_format<F, P>(args...); }
  };
};

template <int F>
struct Dequantize {
  template <typename... Args>
  static void run(Args... args) { dequantize_format<F>(args...); }
};

}  // namespace

constexpr int64_t kChunkBytes = 512 << 10;  // bytes of x rows per pass over W
constexpr int64_t kBf16ParallelMin = 1 << 18;  // x values from which both threads round x

namespace {

// x [M, K] in passes of rows, each over all of W, with products P; xp: x as P takes it.
template <typename P>
void linear_rows(const typename P::X* xp, const uint8_t* weight, int format, int64_t row_bytes,
                 const float* bias, float* y, int64_t M, int64_t N, int64_t K) {
  // Rows of x per pass over W: as many as stay in L2 while every tile of W meets them (each
  // pass unpacks W again, a small cost next to the multiplies of that many rows).
  const int64_t chunk =
      std::max<int64_t>(16, kChunkBytes / (K * int64_t{sizeof(*xp)}) / kMR * kMR);
  for (int64_t m = 0; m < M; m += chunk)
    dispatch<Linear<P>::template Format>(format, xp + m * K, weight, row_bytes, bias, y + m * N,
                                         std::min(chunk, M - m), N, K);
}

}  // namespace

bool bf16_products(int64_t M) {
#if defined(XLLM_ISA_AVX512)
  // Only where they are faster: with AVX-512 BF16, and more x rows than one register block
  // (with fewer, unpacking the weights bounds the time, not the multiplies: 0.7x at M = 1,
  // 1.4x at M = 8 on Q4_1).
  return M > kMR && has_bf16_dot();
#else
  (void)M;
  return false;
#endif
}

void quant_linear(const float* x, const uint8_t* weight, int format, int64_t row_bytes,
                  const float* bias, float* y, int64_t M, int64_t N, int64_t K, bool bf16) {
  if (M == 0 || N == 0) return;
#if defined(XLLM_ISA_AVX512)
  if (bf16 && bf16_products(M)) {
    thread_local std::vector<uint16_t> halves;
    halves.resize(static_cast<size_t>(M * K));
    uint16_t* h = halves.data();
    const int64_t units = M * K / kUnit;
    // A prefill's x is worth both threads (one thread took 2.5% of a served c=64 run here).
#pragma omp parallel for schedule(static) if (omp_get_max_threads() > 1 && M * K >= kBf16ParallelMin)
    for (int64_t u = 0; u < units; ++u)
      BF16Products::store(h + u * kUnit, BF16Products::from(F32Products::load(x + u * kUnit).v));
    return linear_rows<BF16Products>(halves.data(), weight, format, row_bytes, bias, y, M, N, K);
  }
#endif
  linear_rows<F32Products>(x, weight, format, row_bytes, bias, y, M, N, K);
}

void dequantize(const uint8_t* weight, int format, int64_t row_bytes, const int64_t* rows,
                int64_t R, int64_t /*N*/, float* out, int64_t K) {
  if (R == 0 || K == 0) return;
  dispatch<Dequantize>(format, weight, row_bytes, rows, R, out, K);
}

}  // namespace xllm::XLLM_ISA
