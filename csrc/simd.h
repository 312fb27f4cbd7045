// 16-lane float vectors (GCC vector extensions) and the few vector maths the kernels need.
//
// The same code compiles to one AVX-512 register, two AVX2 registers or four SSE
// registers, whichever -march allows.
#pragma once

#include <cstdint>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace xllm {

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
inline VecF splat(float x) { return VecF{} + x; }
inline VecF vmax(VecF a, VecF b) { return a > b ? a : b; }
inline VecF vmin(VecF a, VecF b) { return a < b ? a : b; }

inline float hsum(VecF v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
#else
  float s = 0.0f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
#endif
}

inline float hmax(VecF v) {
#if defined(__AVX512F__)
  return _mm512_reduce_max_ps(reinterpret_cast<__m512>(v));
#else
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
#endif
}

// r[i] = sum of the lanes of v[i], for 16 vectors at once.
inline VecF hsum16(const VecF* v) {
#if defined(__AVX512F__)
  // Transpose-and-add in three steps; inputs are taken in the order that makes the
  // result land in natural order (the last step leaves lane 4k + m holding input 4m + k).
  __m512 w[8], z[4];
  for (int i = 0; i < 8; ++i) {
    const int a = ((2 * i) % 4) * 4 + (2 * i) / 4, b = ((2 * i + 1) % 4) * 4 + (2 * i + 1) / 4;
    const __m512 x = reinterpret_cast<__m512>(v[a]), y = reinterpret_cast<__m512>(v[b]);
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
  VecF r;
  for (int i = 0; i < kLanes; ++i) r[i] = hsum(v[i]);
  return r;
#endif
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

}  // namespace xllm
