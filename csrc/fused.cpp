// Small fused steps of a decoder layer: RMSNorm with the residual add, SiLU-and-multiply, and
// the rotary embedding of q and k fused with the write of k and v into the paged cache.
//
// Each is one pass over its rows (torch would take several ops and temporaries); rows are
// split among threads only when there are enough of them (prefill), since waking the team
// costs more than a decode step's rows.
#include <omp.h>

#include <cmath>
#include <cstring>
#include <stdexcept>

#include "kernels.h"
#include "simd.h"

namespace xllm::XLLM_ISA {
namespace {

constexpr int64_t kParallelMinFloats = 1 << 16;

// The first n (n < 16) floats at p as a vector, zeros after.
inline VecF load_part(const float* p, int64_t n) {
  VecF v{};
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
}

inline void store_part(float* p, VecF v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) p[i] = v[i];
}

// n floats from src to a cache row: copied, or rounded to bfloat16.
inline void put_row(float* dst, const float* src, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}
inline void put_row(BF16* dst, const float* src, int64_t n) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) store(dst + i, load(src + i));
  for (; i < n; ++i) dst[i] = to_bf16(src[i]);
}

template <typename KV, typename Slot>
void rotary_rows(float* qkv, int64_t stride, const float* cos, const float* sin, int64_t T,
                 int64_t H, int64_t Hkv, int64_t D, KV* k_cache, KV* v_cache, const Slot* slots,
                 int64_t num_slots) {
  for (int64_t t = 0; t < T; ++t)
    if (slots[t] >= num_slots) throw std::invalid_argument("rotary_write_kv: slot out of range");
  const int64_t half = D / 2, row = Hkv * D;
#pragma omp parallel for schedule(static) if (T * (H + 2 * Hkv) * D >= kParallelMinFloats)
  for (int64_t t = 0; t < T; ++t) {
    float* x = qkv + t * stride;
    const float* c = cos + t * half;
    const float* s = sin + t * half;
    for (int64_t h = 0; h < H + Hkv; ++h) {
      float* a = x + h * D;
      float* b = a + half;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = a[i], x2 = b[i];
        a[i] = x1 * c[i] - x2 * s[i];
        b[i] = x2 * c[i] + x1 * s[i];
      }
    }
    const int64_t slot = slots[t];
    if (slot < 0) continue;
    put_row(k_cache + slot * row, x + H * D, row);
    put_row(v_cache + slot * row, x + (H + Hkv) * D, row);
  }
}

template <typename KV>
void rotary_slots(float* qkv, int64_t stride, const float* cos, const float* sin, int64_t T,
                  int64_t H, int64_t Hkv, int64_t D, KV* k_cache, KV* v_cache, const void* slots,
                  bool slots_int64, int64_t num_slots) {
  if (slots_int64)
    rotary_rows(qkv, stride, cos, sin, T, H, Hkv, D, k_cache, v_cache,
                static_cast<const int64_t*>(slots), num_slots);
  else
    rotary_rows(qkv, stride, cos, sin, T, H, Hkv, D, k_cache, v_cache,
                static_cast<const int32_t*>(slots), num_slots);
}

}  // namespace

void rms_norm(const float* x, int64_t x_stride, float* residual, int64_t residual_stride,
              const float* weight, float* out, int64_t T, int64_t H, float eps) {
#pragma omp parallel for schedule(static) if (T * H >= kParallelMinFloats)
  for (int64_t t = 0; t < T; ++t) {
    const float* in = x + t * x_stride;
    float* res = residual != nullptr ? residual + t * residual_stride : nullptr;
    const float* src = in;
    VecF sq{};
    int64_t i = 0;
    if (res != nullptr) {
      for (; i + kLanes <= H; i += kLanes) {
        const VecF v = load(res + i) + load(in + i);
        store(res + i, v);
        sq += v * v;
      }
      if (i < H) {
        const VecF v = load_part(res + i, H - i) + load_part(in + i, H - i);
        store_part(res + i, v, H - i);
        sq += v * v;
      }
      src = res;
    } else {
      for (; i + kLanes <= H; i += kLanes) {
        const VecF v = load(in + i);
        sq += v * v;
      }
      if (i < H) {
        const VecF v = load_part(in + i, H - i);
        sq += v * v;
      }
    }
    const float scale = 1.0f / std::sqrt(hsum(sq) / static_cast<float>(H) + eps);
    float* o = out + t * H;
    for (i = 0; i + kLanes <= H; i += kLanes) store(o + i, load(src + i) * scale * load(weight + i));
    if (i < H)
      store_part(o + i, load_part(src + i, H - i) * scale * load_part(weight + i, H - i), H - i);
  }
}

void silu_mul(const float* x, int64_t x_stride, float* out, int64_t T, int64_t I) {
#pragma omp parallel for schedule(static) if (T * I >= kParallelMinFloats)
  for (int64_t t = 0; t < T; ++t) {
    const float* gate = x + t * x_stride;
    const float* up = gate + I;
    float* o = out + t * I;
    // silu(g) = g / (1 + e^-g) = g / (1 + 2^(-g log2 e))
    int64_t i = 0;
    for (; i + kLanes <= I; i += kLanes) {
      const VecF g = load(gate + i);
      store(o + i, g / (1.0f + exp2v(g * -kLog2e)) * load(up + i));
    }
    for (; i < I; ++i) o[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
  }
}

void rotary_write_kv(float* qkv, int64_t stride, const float* cos, const float* sin, int64_t T,
                     int64_t H, int64_t Hkv, int64_t D, void* k_cache, void* v_cache,
                     bool kv_bf16, const void* slots, bool slots_int64, int64_t num_slots) {
  if (kv_bf16)
    rotary_slots(qkv, stride, cos, sin, T, H, Hkv, D, static_cast<BF16*>(k_cache),
                 static_cast<BF16*>(v_cache), slots, slots_int64, num_slots);
  else
    rotary_slots(qkv, stride, cos, sin, T, H, Hkv, D, static_cast<float*>(k_cache),
                 static_cast<float*>(v_cache), slots, slots_int64, num_slots);
}

}  // namespace xllm::XLLM_ISA
