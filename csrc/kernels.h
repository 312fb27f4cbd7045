// Declarations of the CPU kernels; module.cpp binds them to Python as xllm._C.
//
// Every kernel takes raw pointers into contiguous float32 / int tensors owned by
// the caller, plus their sizes. They check index values before touching memory
// and throw std::invalid_argument (ValueError in Python) on bad input.
#pragma once

#include <cstdint>

namespace xllm {

struct AttentionArgs {
  const float* q;       // [T, H, D], row t at q + t * q_stride
  int64_t q_stride;     // floats between consecutive tokens of q
  const float* k_cache;  // [num_blocks, block_size, H_kv, D]
  const float* v_cache;
  float* out;           // [T, H, D] contiguous
  const int32_t* query_start_loc;  // [B + 1]
  const int32_t* seq_lens;         // [B]
  const int32_t* block_tables;     // [B, max_blocks]
  int64_t num_tokens, num_seqs, num_heads, num_kv_heads, head_size;
  int64_t num_blocks, block_size, max_blocks;
  float scale;
};

void paged_attention(const AttentionArgs& a);

// key/value: [T, H_kv, D] with token stride *_stride; caches [num_blocks, block_size, H_kv, D].
void write_kv(const float* key, int64_t key_stride, const float* value, int64_t value_stride,
              float* k_cache, float* v_cache, const void* slot_mapping, bool slots_int64,
              int64_t num_tokens, int64_t row_size, int64_t num_slots);

// logits [N, V] row stride ld; outputs values [N, k], indices [N, k], chosen [N].
void topk_logprobs(const float* logits, int64_t ld, int64_t rows, int64_t vocab, int64_t k,
                   const int64_t* token_ids, float* values, int64_t* indices, float* chosen);

// beam_scores [G, W]; cand_* [G, W, C]; outputs [G, K].
void beam_prune(const float* beam_scores, const int64_t* cand_tokens, const float* cand_logprobs,
                int64_t groups, int64_t width, int64_t cands, int64_t num_keep, int64_t* parents,
                int64_t* tokens, float* scores);

// y [M, N] = x [M, K] @ weight [N, K]^T (+ bias [N] when not null), all contiguous.
void linear(const float* x, const float* weight, const float* bias, float* y, int64_t M,
            int64_t N, int64_t K);

}  // namespace xllm
