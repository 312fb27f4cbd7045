// Scatter of new key/value rows into the paged KV cache by slot mapping (negative slot: skipped).
#include <omp.h>

#include <cstring>
#include <stdexcept>

#include "kernels.h"

namespace xllm {

namespace {

template <typename Slot>
void scatter(const float* key, int64_t key_stride, const float* value, int64_t value_stride,
             float* k_cache, float* v_cache, const Slot* slots, int64_t num_tokens,
             int64_t row_size, int64_t num_slots) {
  for (int64_t t = 0; t < num_tokens; ++t)
    if (slots[t] >= num_slots)
      throw std::invalid_argument("write_kv: slot out of range");
  const size_t bytes = static_cast<size_t>(row_size) * sizeof(float);
  // Copies under about 2 MB are not worth waking the team.
#pragma omp parallel for schedule(static) if (num_tokens * row_size >= (1 << 19))
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t s = slots[t];
    if (s < 0) continue;
    std::memcpy(k_cache + s * row_size, key + t * key_stride, bytes);
    std::memcpy(v_cache + s * row_size, value + t * value_stride, bytes);
  }
}

}  // namespace

void write_kv(const float* key, int64_t key_stride, const float* value, int64_t value_stride,
              float* k_cache, float* v_cache, const void* slot_mapping, bool slots_int64,
              int64_t num_tokens, int64_t row_size, int64_t num_slots) {
  if (slots_int64) {
    scatter(key, key_stride, value, value_stride, k_cache, v_cache,
            static_cast<const int64_t*>(slot_mapping), num_tokens, row_size, num_slots);
  } else {
    scatter(key, key_stride, value, value_stride, k_cache, v_cache,
            static_cast<const int32_t*>(slot_mapping), num_tokens, row_size, num_slots);
  }
}

}  // namespace xllm
