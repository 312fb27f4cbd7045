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
  decltype(&generic::linear) linear;
};

// Slowest first; the features checked are those the pragmas of simd.h switch on.
const Variant kVariants[] = {
    {"generic", [] { return true; }, generic::paged_attention, generic::topk_logprobs,
     generic::linear},
#if defined(__x86_64__)
    {"avx2",
     [] {
       __builtin_cpu_init();
       return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
     },
     avx2::paged_attention, avx2::topk_logprobs, avx2::linear},
    {"avx512",
     [] {
       __builtin_cpu_init();
       return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
              __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
              __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
     },
     avx512::paged_attention, avx512::topk_logprobs, avx512::linear},
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

void linear(const float* x, const float* weight, const float* bias, float* y, int64_t M,
            int64_t N, int64_t K) {
  running().linear(x, weight, bias, y, M, N, K);
}

}  // namespace xllm
