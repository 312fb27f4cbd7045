// DecoderStack: every decoder layer of a Llama / Qwen2 model in one call (decoder.cpp).
#pragma once

#include <cstdint>
#include <vector>

#include "kernels.h"

namespace xllm {

// How a linear layer's weights are laid out: N rows of K, quantized (format, row_bytes) or
// float32 (the "f32" format); packed for int8 products (int8_linear), of that format; float32
// packed in panels (panel_linear).
enum class Layout { kRows, kInt8, kPanels };

// One linear layer's weights; bias [N] or null; bf16: bfloat16 products allowed on rows (see
// quant_linear).
struct LinearWeights {
  const void* weight;
  int format;
  int64_t row_bytes;
  const float* bias;
  int64_t n, k;
  bool bf16;
  Layout layout;
};

struct LayerWeights {
  const float* input_norm;  // [hidden]
  LinearWeights qkv, o;
  const float* post_norm;  // [hidden]
  LinearWeights gate_up, down;
};

struct DecoderShape {
  int64_t hidden, heads, kv_heads, head_size, intermediate;
  float eps, scale;
};

// One forward pass's tokens and attention metadata (see xllm/model/context.py).
struct DecoderStep {
  int64_t num_tokens;
  const float* cos;  // [T, head_size / 2]
  const float* sin;
  const void* slots;  // [T] int32 or int64, -1: no KV write
  bool slots_int64;
  const int32_t* query_start_loc;  // [B + 1]
  const int32_t* seq_lens;         // [B]
  const int32_t* block_tables;     // [B, max_blocks]
  int64_t num_seqs, max_blocks, block_size, num_slots;  // num_slots = blocks * block_size
  std::vector<void*> k_caches, v_caches;  // one per layer, float32 or (kv_bf16) BF16
  bool kv_bf16;
};

// Holds raw pointers to the weights (the caller keeps them alive and in place) and a
// workspace sized by the largest step so far; one caller at a time.
class DecoderStack {
 public:
  // Float32 linears run the skinny GEMM up to linear_max_rows rows, the blocked one past it
  // (and always where bfloat16 products are allowed).
  DecoderStack(const DecoderShape& shape, std::vector<LayerWeights> layers,
               int64_t linear_max_rows);
  // out [T, hidden] = the last layer's output plus the residual stream, from x_in [T, hidden].
  void run(const DecoderStep& step, const float* x_in, float* out);

 private:
  void linear(const LinearWeights& w, const float* x, float* y, int64_t M) const;

  DecoderShape shape_;
  std::vector<LayerWeights> layers_;
  int64_t linear_max_rows_;
  int f32_format_;  // quant_format("f32")
  std::vector<float> workspace_;  // residual, x, h, qkv, attention, gate_up, activation
};

}  // namespace xllm
