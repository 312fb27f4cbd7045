// One instruction-set variant of the SIMD kernels: 16-lane float vectors (GCC vector
// extensions) and the few vector maths the kernels need.
//
// attention.cpp, linear.cpp and topk.cpp are compiled once per variant (setup.py): with
// XLLM_ISA_AVX512 or XLLM_ISA_AVX2 defined (x86-64 only), or neither for the portable
// baseline; isa.cpp picks one at run time. Each variant's code lives in its own namespace,
// xllm::XLLM_ISA, so that no inline function is shared between variants. The instruction
// set is switched on by the pragma below, not by -m flags: the standard library, included
// before this header (include it last), stays baseline code, since the linker keeps one
// copy of each std template instantiation and that copy must run on every CPU.
// A vector is one AVX-512 register. Without AVX-512, GCC has no machine mode for 64-byte
// vectors and keeps them in memory: the AVX2 and baseline variants are correct, but 4 to 20
// times slower than AVX-512 (they need a lane width of their own to be fast).
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#if defined(XLLM_ISA_AVX512) || defined(XLLM_ISA_AVX2)
#include <immintrin.h>
#endif

// The feature lists match the run-time checks in isa.cpp.
#if defined(XLLM_ISA_AVX512)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512dq,avx512vl")
#define XLLM_ISA avx512
#elif defined(XLLM_ISA_AVX2)
#pragma GCC target("avx2,fma,f16c")
#define XLLM_ISA avx2
#else
#define XLLM_ISA generic
#endif

// GCC 12 takes the deliberately undefined registers of its AVX-512 intrinsics (`__Y = __Y`)
// for uninitialized variables once they are inlined under a target pragma (the baseline build
// of this same code still gets the warning).
#if defined(XLLM_ISA_AVX512)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace xllm::XLLM_ISA {

constexpr int kLanes = 16;

typedef float VecF __attribute__((vector_size(64)));
typedef int32_t VecI __attribute__((vector_size(64)));
// Same vectors with 4-byte alignment: loads and stores at any float address.
typedef float VecFU __attribute__((vector_size(64), aligned(4)));

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

inline VecF load(const float* p) { return *reinterpret_cast<const VecFU*>(p); }
inline void store(float* p, VecF v) { *reinterpret_cast<VecFU*>(p) = v; }

// 16 bfloat16 values (BF16, kernels.h) at any 2-byte address, widened to float32 exactly on load
// and rounded as to_bf16 rounds on store.
typedef uint16_t VecH __attribute__((vector_size(32), aligned(2)));
typedef uint32_t VecU __attribute__((vector_size(64)));
// On AVX-512 the widening and narrowing are one instruction each (GCC splits the generic
// conversions into 256-bit halves: three times the instructions in the decode attention loop).
inline VecF load(const BF16* p) {
#if defined(XLLM_ISA_AVX512)
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return reinterpret_cast<VecF>(_mm512_slli_epi32(w, 16));
#else
  return reinterpret_cast<VecF>(__builtin_convertvector(*reinterpret_cast<const VecH*>(p), VecU)
                                << 16);
#endif
}
inline void store(BF16* p, VecF v) {
  const VecU u = reinterpret_cast<VecU>(v);
  const VecU nan = reinterpret_cast<VecU>(v != v);
  const VecU r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16 & ~nan) | (nan & 0x7FC0);
#if defined(XLLM_ISA_AVX512)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtepi32_epi16(reinterpret_cast<__m512i>(r)));
#else
  *reinterpret_cast<VecH*>(p) = __builtin_convertvector(r, VecH);
#endif
}
inline VecF splat(float x) { return VecF{} + x; }
inline VecF vmax(VecF a, VecF b) { return a > b ? a : b; }
inline VecF vmin(VecF a, VecF b) { return a < b ? a : b; }

inline float hsum(VecF v) {
#if defined(XLLM_ISA_AVX512)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#else
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
#endif
}

inline float hmax(VecF v) {
#if defined(XLLM_ISA_AVX512)
  return _mm512_reduce_max_ps(reinterpret_cast<__m512>(v));
#else
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
#endif
}

// r[i] = sum of the lanes of v[i], for 16 vectors at once; only the first N are read, the
// others taken as zeros (lane i of r depends on v[i] alone, in the same order for any N).
template <int N = kLanes>
inline VecF hsum16(const VecF* v) {
  static_assert(0 < N && N <= kLanes, "1 to 16 vectors");
#if defined(XLLM_ISA_AVX512)
  // Transpose-and-add in three steps; inputs are taken in the order that makes the
  // result land in natural order (the last step leaves lane 4k + m holding input 4m + k).
  const auto in = [v](int i) { return i < N ? reinterpret_cast<__m512>(v[i]) : __m512{}; };
  __m512 w[8], z[4];
  for (int i = 0; i < 8; ++i) {
    const int a = ((2 * i) % 4) * 4 + (2 * i) / 4, b = ((2 * i + 1) % 4) * 4 + (2 * i + 1) / 4;
    const __m512 x = in(a), y = in(b);
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(x, y, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int i = 0; i < 4; ++i)
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 u01 = _mm512_add_ps(_mm512_unpacklo_ps(z[0], z[1]), _mm512_unpackhi_ps(z[0], z[1]));
  const __m512 u23 = _mm512_add_ps(_mm512_unpacklo_ps(z[2], z[3]), _mm512_unpackhi_ps(z[2], z[3]));
  return reinterpret_cast<VecF>(
      _mm512_add_ps(_mm512_shuffle_ps(u01, u23, _MM_SHUFFLE(1, 0, 1, 0)),
                    _mm512_shuffle_ps(u01, u23, _MM_SHUFFLE(3, 2, 3, 2))));
#else
  VecF r{};
  for (int i = 0; i < N; ++i) r[i] = hsum(v[i]);
  return r;
#endif
}

// Fetches the cache lines [next, end) into L2, per_step of them per step().
struct Prefetch {
  const char* next;
  const char* end;
  int per_step;
  void step() {
    for (int i = 0; i < per_step && next < end; ++i, next += 64) __builtin_prefetch(next, 0, 2);
  }
};

// Below this many multiply-adds one thread does a whole GEMM (waking the team costs more;
// measured break-even ~70k, e.g. M = 1, K = 576, N = 128).
constexpr int64_t kParallelMinWork = 1 << 16;

// fn(n0, n1) over the W rows [0, N) of a GEMM of `work` multiply-adds, in chunks of whole
// tiles of `tile` rows (the last chunk also takes the rows past the last whole tile), handed
// out dynamically: a thread that loses its core for a while (the HTTP thread, the client)
// no longer holds the others up at the join.
template <typename Fn>
inline void for_row_chunks(int64_t N, int64_t tile, int64_t work, Fn fn) {
  constexpr int64_t kChunksPerThread = 8;
  const int64_t tiles = N / tile;
  const bool parallel = omp_get_max_threads() > 1 && tiles > 1 && work >= kParallelMinWork;
  const int64_t threads = parallel ? omp_get_max_threads() : 1;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(tiles, threads * kChunksPerThread));
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t n0 = tiles * c / chunks * tile;
    const int64_t n1 = c == chunks - 1 ? N : tiles * (c + 1) / chunks * tile;
    fn(n0, n1);
  }
}

// 2^x per lane, relative error about 2e-7; exactly 0 for x <= -127 (and for -inf).
inline VecF exp2v(VecF x) {
  x = vmin(vmax(x, splat(-127.0f)), splat(127.0f));
  // Round to nearest integer with the 1.5 * 2^23 trick; n lands in the low mantissa bits.
  const VecF magic = splat(12582912.0f);
  VecF t = x + magic;
  VecF n = t - magic;
  VecF r = x - n;  // in [-0.5, 0.5]
  VecI ni = reinterpret_cast<VecI>(t) - 0x4B400000;
  VecF scale = reinterpret_cast<VecF>((ni + 127) << 23);
  // Taylor series of e^(r ln 2) to degree 7.
  const float c1 = kLn2, c2 = c1 * kLn2 / 2, c3 = c2 * kLn2 / 3, c4 = c3 * kLn2 / 4;
  const float c5 = c4 * kLn2 / 5, c6 = c5 * kLn2 / 6, c7 = c6 * kLn2 / 7;
  VecF p = splat(c7);
  p = p * r + c6;
  p = p * r + c5;
  p = p * r + c4;
  p = p * r + c3;
  p = p * r + c2;
  p = p * r + c1;
  p = p * r + 1.0f;
  return p * scale;
}

}  // namespace xllm::XLLM_ISA
