// A Llama / Qwen2 decoder's layers in one call: the kernels of a layer run back to back on
// workspace buffers, with no Python, no tensor allocation and no GIL between them.
//
// The order of operations is the one of xllm/model/llama.py (the residual stream carried
// between layers and added inside the next norm), so the hidden states equal those of the
// layer-by-layer path bit for bit.
#include "decoder.h"

#include <cstring>
#include <stdexcept>

namespace xllm {

DecoderStack::DecoderStack(const DecoderShape& shape, std::vector<LayerWeights> layers,
                           int64_t linear_max_rows)
    : shape_(shape),
      layers_(std::move(layers)),
      linear_max_rows_(linear_max_rows),
      f32_format_(quant_format("f32")) {
  const int64_t qkv = (shape.heads + 2 * shape.kv_heads) * shape.head_size;
  const int64_t attn = shape.heads * shape.head_size;
  const auto check = [&](const LinearWeights& w, int64_t n, int64_t k, const char* name) {
    if (w.n != n || w.k != k || w.weight == nullptr)
      throw std::invalid_argument(std::string("decoder stack: bad ") + name + " weights");
  };
  for (const LayerWeights& l : layers_) {
    check(l.qkv, qkv, shape.hidden, "qkv_proj");
    check(l.o, shape.hidden, attn, "o_proj");
    check(l.gate_up, 2 * shape.intermediate, shape.hidden, "gate_up_proj");
    check(l.down, shape.hidden, shape.intermediate, "down_proj");
  }
}

void DecoderStack::linear(const LinearWeights& w, const float* x, float* y, int64_t M) const {
  if (w.layout == Layout::kInt8)
    int8_linear(x, static_cast<const uint8_t*>(w.weight), w.format, w.bias, y, M, w.n, w.k);
  else if (w.layout == Layout::kPanels)
    panel_linear(x, static_cast<const float*>(w.weight), w.bias, y, M, w.n, w.k);
  else if (w.format == f32_format_ && M <= linear_max_rows_ && !w.bf16)
    xllm::linear(x, static_cast<const float*>(w.weight), w.bias, y, M, w.n, w.k);
  else
    quant_linear(x, static_cast<const uint8_t*>(w.weight), w.format, w.row_bytes, w.bias, y, M,
                 w.n, w.k, w.bf16);
}

void DecoderStack::run(const DecoderStep& s, const float* x_in, float* out) {
  if (s.k_caches.size() != layers_.size() || s.v_caches.size() != layers_.size())
    throw std::invalid_argument("decoder stack: one K and one V cache per layer");
  const int64_t T = s.num_tokens, H = shape_.hidden, D = shape_.head_size;
  if (T == 0) return;
  const int64_t qkv_n = (shape_.heads + 2 * shape_.kv_heads) * D;
  const int64_t attn_n = shape_.heads * D, I = shape_.intermediate;
  const size_t need = static_cast<size_t>(T * (3 * H + qkv_n + attn_n + 3 * I));
  if (workspace_.size() < need) workspace_.resize(need);
  float* residual = workspace_.data();
  float* x = residual + T * H;
  float* h = x + T * H;
  float* qkv = h + T * H;
  float* attn = qkv + T * qkv_n;
  float* gate_up = attn + T * attn_n;
  float* act = gate_up + T * 2 * I;

  std::memcpy(residual, x_in, sizeof(float) * T * H);
  for (size_t l = 0; l < layers_.size(); ++l) {
    const LayerWeights& w = layers_[l];
    if (l == 0)
      rms_norm(residual, H, nullptr, 0, w.input_norm, h, T, H, shape_.eps);
    else
      rms_norm(x, H, residual, H, w.input_norm, h, T, H, shape_.eps);
    linear(w.qkv, h, qkv, T);
    rotary_write_kv(qkv, qkv_n, s.cos, s.sin, T, shape_.heads, shape_.kv_heads, D,
                    s.k_caches[l], s.v_caches[l], s.kv_bf16, s.slots, s.slots_int64,
                    s.num_slots);
    const AttentionArgs a{qkv,           qkv_n,         s.k_caches[l],   s.v_caches[l],
                          attn,          s.query_start_loc, s.seq_lens,  s.block_tables,
                          T,             s.num_seqs,    shape_.heads,    shape_.kv_heads,
                          D,             s.num_slots / s.block_size,     s.block_size,
                          s.max_blocks,  shape_.scale,  s.kv_bf16};
    paged_attention(a);
    linear(w.o, attn, x, T);
    rms_norm(x, H, residual, H, w.post_norm, h, T, H, shape_.eps);
    linear(w.gate_up, h, gate_up, T);
    silu_mul(gate_up, 2 * I, act, T, I);
    linear(w.down, act, x, T);
  }
  for (int64_t i = 0; i < T * H; ++i) out[i] = x[i] + residual[i];
}

}  // namespace xllm
