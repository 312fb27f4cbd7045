// Scatter of new key/value rows into the paged KV cache by slot mapping (negative slot: skipped;
// float32 rows, rounded to bfloat16 for a bfloat16 cache), and copy-on-write of whole blocks in
// every layer of the stacked caches.
#include <omp.h>

#include <cstring>
#include <stdexcept>

#include "kernels.h"

namespace xllm {

namespace {

// One row of row_size floats into the cache's element type.
inline void put_row(float* dst, const float* src, int64_t row_size) {
  std::memcpy(dst, src, static_cast<size_t>(row_size) * sizeof(float));
}
inline void put_row(BF16* dst, const float* src, int64_t row_size) {
  for (int64_t i = 0; i < row_size; ++i) dst[i] = to_bf16(src[i]);
}

template <typename KV, typename Slot>
void scatter(const float* key, int64_t key_stride, const float* value, int64_t value_stride,
             KV* k_cache, KV* v_cache, const Slot* slots, int64_t num_tokens, int64_t row_size,
             int64_t num_slots) {
  for (int64_t t = 0; t < num_tokens; ++t)
    if (slots[t] >= num_slots)
      throw std::invalid_argument("write_kv: slot out of range");
  // Copies under about 2 MB are not worth waking the team.
#pragma omp parallel for schedule(static) if (num_tokens * row_size >= (1 << 19))
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t s = slots[t];
    if (s < 0) continue;
    put_row(k_cache + s * row_size, key + t * key_stride, row_size);
    put_row(v_cache + s * row_size, value + t * value_stride, row_size);
  }
}

template <typename KV>
void scatter_slots(const float* key, int64_t key_stride, const float* value,
                   int64_t value_stride, KV* k_cache, KV* v_cache, const void* slot_mapping,
                   bool slots_int64, int64_t num_tokens, int64_t row_size, int64_t num_slots) {
  if (slots_int64)
    scatter(key, key_stride, value, value_stride, k_cache, v_cache,
            static_cast<const int64_t*>(slot_mapping), num_tokens, row_size, num_slots);
  else
    scatter(key, key_stride, value, value_stride, k_cache, v_cache,
            static_cast<const int32_t*>(slot_mapping), num_tokens, row_size, num_slots);
}

template <typename Id>
void copy_pairs(char* k_cache, char* v_cache, const Id* pairs, int64_t num_pairs,
                int64_t num_layers, int64_t num_blocks, int64_t block_bytes) {
  for (int64_t i = 0; i < 2 * num_pairs; ++i)
    if (pairs[i] < 0 || pairs[i] >= num_blocks)
      throw std::invalid_argument("copy_blocks: block id out of range");
  const size_t bytes = static_cast<size_t>(block_bytes);
  const int64_t layer_bytes = num_blocks * block_bytes;
  const int64_t copies = num_layers * num_pairs;
  // As in scatter: copies under about 2 MB per cache run on one thread.
#pragma omp parallel for schedule(static) if (copies * block_bytes >= (1 << 21))
  for (int64_t c = 0; c < copies; ++c) {
    const int64_t layer = c / num_pairs, p = c % num_pairs;
    const int64_t src = layer * layer_bytes + static_cast<int64_t>(pairs[2 * p]) * block_bytes;
    const int64_t dst = layer * layer_bytes + static_cast<int64_t>(pairs[2 * p + 1]) * block_bytes;
    std::memcpy(k_cache + dst, k_cache + src, bytes);
    std::memcpy(v_cache + dst, v_cache + src, bytes);
  }
}

}  // namespace

void write_kv(const float* key, int64_t key_stride, const float* value, int64_t value_stride,
              void* k_cache, void* v_cache, bool kv_bf16, const void* slot_mapping,
              bool slots_int64, int64_t num_tokens, int64_t row_size, int64_t num_slots) {
  if (kv_bf16)
    scatter_slots(key, key_stride, value, value_stride, static_cast<BF16*>(k_cache),
                  static_cast<BF16*>(v_cache), slot_mapping, slots_int64, num_tokens, row_size,
                  num_slots);
  else
    scatter_slots(key, key_stride, value, value_stride, static_cast<float*>(k_cache),
                  static_cast<float*>(v_cache), slot_mapping, slots_int64, num_tokens, row_size,
                  num_slots);
}

void copy_blocks(void* k_cache, void* v_cache, const void* block_mapping, bool ids_int64,
                 int64_t num_pairs, int64_t num_layers, int64_t num_blocks, int64_t block_bytes) {
  char* k = static_cast<char*>(k_cache);
  char* v = static_cast<char*>(v_cache);
  if (ids_int64) {
    copy_pairs(k, v, static_cast<const int64_t*>(block_mapping), num_pairs, num_layers,
               num_blocks, block_bytes);
  } else {
    copy_pairs(k, v, static_cast<const int32_t*>(block_mapping), num_pairs, num_layers,
               num_blocks, block_bytes);
  }
}

}  // namespace xllm
