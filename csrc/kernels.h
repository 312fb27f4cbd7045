// Declarations of the CPU kernels; module.cpp binds them to Python as xllm._C.
//
// Every kernel takes raw pointers into contiguous float32 / int tensors owned by
// the caller, plus their sizes. They check index values before touching memory
// and throw std::invalid_argument (ValueError in Python) on bad input.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace xllm {

// A bfloat16 value, the upper half of a float32's bits: the element of a KV cache of
// `--kv-cache-dtype bfloat16` (the kernels that take caches say so with a kv_bf16 flag).
struct BF16 {
  uint16_t bits;
};

inline float to_f32(float x) { return x; }
inline float to_f32(BF16 x) {
  const uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
// Rounded to nearest even as torch's .to(torch.bfloat16) rounds; NaN to the quiet NaN 0x7FC0.
inline BF16 to_bf16(float x) {
  if (x != x) return {0x7FC0};
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return {static_cast<uint16_t>((u + 0x7FFF + ((u >> 16) & 1)) >> 16)};
}

struct AttentionArgs {
  const float* q;       // [T, H, D], row t at q + t * q_stride
  int64_t q_stride;     // floats between consecutive tokens of q
  const void* k_cache;  // [num_blocks, block_size, H_kv, D], float32 or (kv_bf16) BF16
  const void* v_cache;
  float* out;           // [T, H, D] contiguous
  const int32_t* query_start_loc;  // [B + 1]
  const int32_t* seq_lens;         // [B]
  const int32_t* block_tables;     // [B, max_blocks]
  int64_t num_tokens, num_seqs, num_heads, num_kv_heads, head_size;
  int64_t num_blocks, block_size, max_blocks;
  float scale;
  bool kv_bf16;
};

// The kernels with SIMD code, declared once per instruction-set variant (see simd.h): in
// xllm::generic, and on x86-64 also xllm::avx2 and xllm::avx512. The functions of the same
// names directly in xllm run the variant that isa.cpp picked.
#define XLLM_SIMD_KERNELS                                                                      \
  void paged_attention(const AttentionArgs& a);                                                \
  /* logits [N, V] row stride ld; outputs values [N, k], indices [N, k], chosen [N]. */       \
  void topk_logprobs(const float* logits, int64_t ld, int64_t rows, int64_t vocab, int64_t k,  \
                     const int64_t* token_ids, float* values, int64_t* indices, float* chosen); \
  /* out [N]: the first index of each row's largest logit (of its first NaN, as torch). */     \
  void argmax_rows(const float* logits, int64_t ld, int64_t rows, int64_t vocab, int64_t* out); \
  /* y [M, N] = x [M, K] @ weight [N, K]^T (+ bias [N] when not null), all contiguous. */     \
  void linear(const float* x, const float* weight, const float* bias, float* y, int64_t M,     \
              int64_t N, int64_t K);                                                           \
  /* y [M, N] = x [M, K] @ W^T (+ bias) for W's N quantized rows of row_bytes at weight; */   \
  /* bf16: may round x and W to bfloat16 (products summed in float32) where that is faster. */\
  void quant_linear(const float* x, const uint8_t* weight, int format, int64_t row_bytes,      \
                    const float* bias, float* y, int64_t M, int64_t N, int64_t K, bool bf16);  \
  /* Whether quant_linear with bf16 allowed multiplies M rows of x in bfloat16. */             \
  bool bf16_products(int64_t M);                                                               \
  /* y [M, N] = x [M, K] @ W^T (+ bias) with int8 products (int8_linear.cpp): W's N rows */  \
  /* of format q8_0, q4_0 or q4_1 packed by xllm.ops.quant.pack_int8. */                       \
  void int8_linear(const float* x, const uint8_t* packed, int format, const float* bias,       \
                   float* y, int64_t M, int64_t N, int64_t K);                                 \
  /* Whether int8_linear runs its vectorized tile here (AVX-512 VNNI). */                      \
  bool int8_products_fast();                                                                   \
  /* y [M, N] = x [M, K] @ W^T (+ bias) in float32, W's N rows packed in panels of 32 */      \
  /* (panel_linear.cpp, xllm.ops.panels.pack_panels). */                                       \
  void panel_linear(const float* x, const float* panels, const float* bias, float* y,          \
                    int64_t M, int64_t N, int64_t K);                                          \
  /* out [R, K]: rows[i] (i when rows is null) of W's N rows, dequantized. */                  \
  void dequantize(const uint8_t* weight, int format, int64_t row_bytes, const int64_t* rows,   \
                  int64_t R, int64_t N, float* out, int64_t K);                                                  \
  /* out [T, H] = RMSNorm(x) * weight; with residual (not null): residual += x, then of it. */ \
  void rms_norm(const float* x, int64_t x_stride, float* residual, int64_t residual_stride,    \
                const float* weight, float* out, int64_t T, int64_t H, float eps);             \
  /* out [T, I] = silu(x[:, :I]) * x[:, I:]. */                                                \
  void silu_mul(const float* x, int64_t x_stride, float* out, int64_t T, int64_t I);           \
  /* Rotary (rotate-half) of q and k in qkv [T, (H + 2 Hkv) D] in place, k and v to the cache */ \
  /* (float32, or BF16 with kv_bf16). */                                                       \
  void rotary_write_kv(float* qkv, int64_t stride, const float* cos, const float* sin,         \
                       int64_t T, int64_t H, int64_t Hkv, int64_t D, void* k_cache,            \
                       void* v_cache, bool kv_bf16, const void* slots, bool slots_int64,       \
                       int64_t num_slots);

XLLM_SIMD_KERNELS
namespace generic {
XLLM_SIMD_KERNELS
}  // namespace generic
#if defined(__x86_64__)
namespace avx2 {
XLLM_SIMD_KERNELS
}  // namespace avx2
namespace avx512 {
XLLM_SIMD_KERNELS
}  // namespace avx512
#endif
#undef XLLM_SIMD_KERNELS

// The quantized formats of xllm/ops/quant.py, indexed by the `format` of the kernels above,
// and float32 rows ("f32"), which `xllm.ops.cpu.linear` sends to the same blocked kernel.
struct QuantFormat {
  const char* name;
  int64_t block, block_bytes, row_header;
};
inline constexpr QuantFormat kQuantFormats[] = {
    {"q8_0", 32, 34, 0},    {"q4_0", 32, 18, 0},   {"q4_1", 32, 20, 0},
    {"q4_k", 256, 144, 0},  {"q6_k", 256, 210, 0}, {"int8", 32, 32, 4},
    {"f32", 32, 128, 0},
};
// The positions of the formats in kQuantFormats (the kernels' `format` values).
enum QuantFormatId : int { kQ8_0, kQ4_0, kQ4_1, kQ4_K, kQ6_K, kInt8, kF32 };
// The index of a format's name; std::invalid_argument for an unknown one.
int quant_format(const std::string& name);

// The variants this CPU can run, slowest first ("generic" always).
std::vector<std::string> supported_isas();
// Makes the named variant run from now on; std::invalid_argument if the CPU lacks it.
void set_isa(const std::string& name);
// The variant that runs.
std::string isa();

// key/value: [T, H_kv, D] with token stride *_stride; caches [num_blocks, block_size, H_kv, D],
// float32 or (kv_bf16) BF16.
void write_kv(const float* key, int64_t key_stride, const float* value, int64_t value_stride,
              void* k_cache, void* v_cache, bool kv_bf16, const void* slot_mapping,
              bool slots_int64, int64_t num_tokens, int64_t row_size, int64_t num_slots);

// Caches [num_layers, num_blocks, block_size, H_kv, D] contiguous, of any dtype, block_bytes =
// the bytes of one block; block_mapping [P, 2] (src, dst) int64 or int32: in every layer, block
// dst of both caches becomes a copy of block src (destinations distinct and never a source).
void copy_blocks(void* k_cache, void* v_cache, const void* block_mapping, bool ids_int64,
                 int64_t num_pairs, int64_t num_layers, int64_t num_blocks, int64_t block_bytes);

// beam_scores [G, W]; cand_* [G, W, C]; outputs [G, K].
void beam_prune(const float* beam_scores, const int64_t* cand_tokens, const float* cand_logprobs,
                int64_t groups, int64_t width, int64_t cands, int64_t num_keep, int64_t* parents,
                int64_t* tokens, float* scores);

}  // namespace xllm
