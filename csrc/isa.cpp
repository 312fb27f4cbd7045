// Which instruction-set variant of the SIMD kernels runs (see simd.h), and the calls into it.
//
// By default the best variant that the CPU (and the OS) supports; set_isa picks another, for
// tests and for XLLM_CPU_ISA (module.cpp). This file is baseline code: it runs on every CPU.
#include <atomic>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"

namespace xllm {
namespace {

struct Variant {
  const char* name;
  bool (*supported)();
  decltype(&generic::paged_attention) paged_attention;
  decltype(&generic::topk_logprobs) topk_logprobs;
  decltype(&generic::argmax_rows) argmax_rows;
  decltype(&generic::linear) linear;
  decltype(&generic::quant_linear) quant_linear;
  decltype(&generic::bf16_products) bf16_products;
  decltype(&generic::int8_linear) int8_linear;
  decltype(&generic::int8_products_fast) int8_products_fast;
  decltype(&generic::panel_linear) panel_linear;
  decltype(&generic::dequantize) dequantize;
  decltype(&generic::rms_norm) rms_norm;
  decltype(&generic::silu_mul) silu_mul;
  decltype(&generic::rotary_write_kv) rotary_write_kv;
};

// Slowest first; the features checked are those the pragmas of simd.h switch on.
const Variant kVariants[] = {
    {"generic", [] { return true; }, generic::paged_attention, generic::topk_logprobs,
     generic::argmax_rows, generic::linear,
     generic::quant_linear, generic::bf16_products, generic::int8_linear,
     generic::int8_products_fast, generic::panel_linear, generic::dequantize,
     generic::rms_norm, generic::silu_mul, generic::rotary_write_kv},
#if defined(__x86_64__)
    {"avx2",
     [] {
       __builtin_cpu_init();
       return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
              __builtin_cpu_supports("f16c");
     },
     avx2::paged_attention, avx2::topk_logprobs, avx2::argmax_rows, avx2::linear,
     avx2::quant_linear, avx2::bf16_products, avx2::int8_linear,
     avx2::int8_products_fast, avx2::panel_linear, avx2::dequantize,
     avx2::rms_norm, avx2::silu_mul, avx2::rotary_write_kv},
    {"avx512",
     [] {
       __builtin_cpu_init();
       return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
              __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
     },
     avx512::paged_attention, avx512::topk_logprobs, avx512::argmax_rows, avx512::linear,
     avx512::quant_linear, avx512::bf16_products, avx512::int8_linear,
     avx512::int8_products_fast, avx512::panel_linear, avx512::dequantize,
     avx512::rms_norm, avx512::silu_mul, avx512::rotary_write_kv},
#endif
};

const Variant* best() {
  const Variant* v = std::end(kVariants) - 1;
  while (!v->supported()) --v;
  return v;
}

std::atomic<const Variant*>& current() {
  static std::atomic<const Variant*> variant{best()};
  return variant;
}

const Variant& running() { return *current().load(std::memory_order_relaxed); }

}  // namespace

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const Variant& v : kVariants)
    if (v.supported()) names.emplace_back(v.name);
  return names;
}

void set_isa(const std::string& name) {
  for (const Variant& v : kVariants) {
    if (name == v.name && v.supported()) {
      current().store(&v);
      return;
    }
  }
  std::string runs;
  for (const std::string& s : supported_isas()) runs += (runs.empty() ? "" : ", ") + s;
  throw std::invalid_argument("instruction set '" + name + "' is not one this CPU runs (" +
                              runs + ")");
}

std::string isa() { return running().name; }

void paged_attention(const AttentionArgs& a) { running().paged_attention(a); }

void topk_logprobs(const float* logits, int64_t ld, int64_t rows, int64_t vocab, int64_t k,
                   const int64_t* token_ids, float* values, int64_t* indices, float* chosen) {
  running().topk_logprobs(logits, ld, rows, vocab, k, token_ids, values, indices, chosen);
}

void argmax_rows(const float* logits, int64_t ld, int64_t rows, int64_t vocab, int64_t* out) {
  running().argmax_rows(logits, ld, rows, vocab, out);
}

void linear(const float* x, const float* weight, const float* bias, float* y, int64_t M,
            int64_t N, int64_t K) {
  running().linear(x, weight, bias, y, M, N, K);
}

void rms_norm(const float* x, int64_t x_stride, float* residual, int64_t residual_stride,
              const float* weight, float* out, int64_t T, int64_t H, float eps) {
  running().rms_norm(x, x_stride, residual, residual_stride, weight, out, T, H, eps);
}

void silu_mul(const float* x, int64_t x_stride, float* out, int64_t T, int64_t I) {
  running().silu_mul(x, x_stride, out, T, I);
}

void rotary_write_kv(float* qkv, int64_t stride, const float* cos, const float* sin, int64_t T,
                     int64_t H, int64_t Hkv, int64_t D, void* k_cache, void* v_cache,
                     bool kv_bf16, const void* slots, bool slots_int64, int64_t num_slots) {
  running().rotary_write_kv(qkv, stride, cos, sin, T, H, Hkv, D, k_cache, v_cache, kv_bf16,
                            slots, slots_int64, num_slots);
}

int quant_format(const std::string& name) {
  for (int i = 0; i < static_cast<int>(std::size(kQuantFormats)); ++i)
    if (name == kQuantFormats[i].name) return i;
  throw std::invalid_argument("unknown quantized format '" + name + "'");
}

namespace {

// Checks that N rows of row_bytes hold K weights of the format.
void check_rows(int format, int64_t row_bytes, int64_t N, int64_t K) {
  if (format < 0 || format >= static_cast<int>(std::size(kQuantFormats)))
    throw std::invalid_argument("unknown quantized format");
  const QuantFormat& f = kQuantFormats[format];
  if (N < 0 || K < 0 || K % f.block != 0 || row_bytes != f.row_header + K / f.block * f.block_bytes)
    throw std::invalid_argument(std::string("quantized rows of ") + std::to_string(row_bytes) +
                                " bytes do not hold K = " + std::to_string(K) + " " + f.name +
                                " weights");
}

}  // namespace

void quant_linear(const float* x, const uint8_t* weight, int format, int64_t row_bytes,
                  const float* bias, float* y, int64_t M, int64_t N, int64_t K, bool bf16) {
  check_rows(format, row_bytes, N, K);
  if (M < 0) throw std::invalid_argument("quant_linear: negative size");
  if (K == 0) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) y[m * N + n] = bias != nullptr ? bias[n] : 0.0f;
    return;
  }
  running().quant_linear(x, weight, format, row_bytes, bias, y, M, N, K, bf16);
}

void int8_linear(const float* x, const uint8_t* packed, int format, const float* bias, float* y,
                 int64_t M, int64_t N, int64_t K) {
  running().int8_linear(x, packed, format, bias, y, M, N, K);
}

bool int8_products_fast() { return running().int8_products_fast(); }

void panel_linear(const float* x, const float* panels, const float* bias, float* y, int64_t M,
                  int64_t N, int64_t K) {
  if (M < 0 || N < 0 || K < 0) throw std::invalid_argument("panel_linear: negative size");
  running().panel_linear(x, panels, bias, y, M, N, K);
}

bool bf16_products(int64_t M) { return running().bf16_products(M); }

void dequantize(const uint8_t* weight, int format, int64_t row_bytes, const int64_t* rows,
                int64_t R, int64_t N, float* out, int64_t K) {
  check_rows(format, row_bytes, N, K);
  if (rows != nullptr)
    for (int64_t i = 0; i < R; ++i)
      if (rows[i] < 0 || rows[i] >= N)
        throw std::invalid_argument("row " + std::to_string(rows[i]) + " is outside 0.." +
                                    std::to_string(N - 1));
  running().dequantize(weight, format, row_bytes, rows, R, N, out, K);
}

}  // namespace xllm
