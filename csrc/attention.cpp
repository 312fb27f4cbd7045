// Paged attention on the CPU: mixed prefill chunks and decodes in one call, OpenMP + SIMD.
//
// Work is split into items of (sequence, query tile, kv heads[, key range]): one kv head
// for a prefill tile, all of them for a decode. For each of its kv heads an item holds
// the query rows (query x head in the kv head's group) of its tile; it walks the
// keys of its range in chunks of kChunk, and keeps a flash-style online softmax.
// Few rows (decodes): S = Q K^T row by row, 16 keys' dot products reduced at once, the
// softmax across keys in SIMD lanes. Many rows (prefill tiles): Q is transposed and S
// laid out key-major so the score GEMM and the softmax run across rows in SIMD lanes.
// Then P V is accumulated per row, each V row loaded once per register block of rows.
// While a chunk is computed, the next chunk's K/V lines are prefetched into L2 a few at a
// time (decodes stream from memory). Long key ranges of few items are split (flash
// decoding) and merged afterwards, so one long sequence still keeps every thread busy.
// The caches hold float32, or bfloat16 (kv_bf16): half the bytes to stream, each key and value
// widened to float32 exactly as it is loaded; the math is float32 either way.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace xllm::XLLM_ISA {
namespace {

constexpr int kChunk = 32;         // keys per online-softmax step
constexpr int kMaxTileRows = 64;   // query rows (queries x heads) per item
constexpr int kDotRowsMax = 8;     // up to this many rows, scores are per-row dot products
constexpr int kMinSplitKeys = 256; // a split part covers at least this many keys
// Below this much work (keys x (rows + 8), about 1.5-3 ns each) one thread does it all:
// waking the team costs more, and on a busy machine a late thread stalls the join. (16 decodes
// of 128 keys, SmolLM2's heads, cost 67,584: two threads took them in 65-73 us, one in 150.)
constexpr int64_t kParallelMinCost = 16000;

struct Item {
  int32_t seq, h0, h1;  // kv heads [h0, h1): all of them for a decode, one for a prefill tile
  int32_t q0, q1;    // query rows of the sequence's chunk, [q0, q1)
  int32_t k0, k1;    // key positions, [k0, k1)
  int64_t partial;   // offset of this part's results in the partial buffer; -1: write out
  int64_t cost;
};

// A query tile whose keys were split into parts; merged after the parallel loop.
struct Split {
  int32_t seq, h0, h1, q0, q1;
  int64_t partial;   // offset of part 0
  int64_t part_size; // floats per part: heads * rows * (head_size + 2)
  int32_t parts;
};

struct Scratch {
  std::vector<float> q, s, acc, m, l, alpha;
  std::vector<const void*> kp, vp;  // slots of the current chunk, the next, the next item's
  std::vector<float> kf, vf;         // a chunk's bfloat16 keys and values of one head, widened
  std::vector<const void*> kfp, vfp;  // their rows, padded as kp
  std::vector<int32_t> pos;
};

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct Geometry {
  int64_t group, row_stride;  // heads per kv head; floats per cache slot (H_kv * D)
};

// Software prefetch of the next chunk's K/V lines into L2, a few lines per key step of
// the current chunk, so that memory streams while the current chunk is computed.
struct Prefetcher {
  const void* const* kp = nullptr;
  const void* const* vp = nullptr;
  int n = 0, j = 0;      // slots to fetch; the next one
  int64_t d0 = 0, d1 = 0, d = 0;  // bytes of a slot to fetch: [d0, d1); the next one
  int per_step = 0;      // lines of K (and of V) per step
  inline void step() {
    for (int i = 0; i < per_step && j < n; ++i) {
      __builtin_prefetch(static_cast<const char*>(kp[j]) + d, 0, 2);
      __builtin_prefetch(static_cast<const char*>(vp[j]) + d, 0, 2);
      d += 64;
      if (d >= d1) {
        d = d0;
        ++j;
      }
    }
  }
};

// Scores of a chunk for few rows (decodes): row-major S[r][j] (row stride kChunk); each
// row's dot products with 16 keys are reduced together. kp is padded to a multiple of 16.
// Every row of a block of 16 keys reads them in L1; bfloat16 keys are widened once for all
// the rows (widening them once per row took more instructions than the dot products).
// KV, here and below: the caches' element type, float or BF16.
template <int DV, typename KV>
inline void scores_dot(const float* qrows, int rows, const void* const* kp, int64_t off, int nk,
                       float* st, Prefetcher& prefetcher) {
  constexpr int D = DV * kLanes;
  Prefetcher pf = prefetcher;
  alignas(64) float wide[std::is_same_v<KV, float> ? 1 : kLanes * D];
  for (int j0 = 0; j0 < nk; j0 += kLanes) {
    const float* keys[kLanes];
    for (int jj = 0; jj < kLanes; ++jj) {
      pf.step();
      const KV* k = static_cast<const KV*>(kp[j0 + jj]) + off;
      if constexpr (std::is_same_v<KV, float>) {
        keys[jj] = k;
      } else {
        for (int v = 0; v < DV; ++v) store(wide + jj * D + v * kLanes, load(k + v * kLanes));
        keys[jj] = wide + jj * D;
      }
    }
    for (int r = 0; r < rows; ++r) {
      const float* q = qrows + r * D;
      VecF dots[kLanes];
      for (int jj = 0; jj < kLanes; ++jj) {
        VecF s = load(q) * load(keys[jj]);
        for (int v = 1; v < DV; ++v) s += load(q + v * kLanes) * load(keys[jj] + v * kLanes);
        dots[jj] = s;
      }
      store(st + r * kChunk + j0, hsum16(dots));
    }
  }
  prefetcher = pf;
}

// Scores of a chunk for many rows: Q is transposed ([d][row]); 4 keys x NRV row vectors,
// written key-major, S[j][r] (key stride rp).
template <int D, int NRV>
inline void scores_rows_block(const float* qt, int rp, const void* const* kp, int64_t off, int jn,
                              float* st) {
  VecF s[4][NRV];
  for (int jj = 0; jj < 4; ++jj)
    for (int i = 0; i < NRV; ++i) s[jj][i] = VecF{};
  const float* k0 = static_cast<const float*>(kp[0]) + off;
  const float* k1 = static_cast<const float*>(kp[1]) + off;
  const float* k2 = static_cast<const float*>(kp[2]) + off;
  const float* k3 = static_cast<const float*>(kp[3]) + off;
  for (int d = 0; d < D; ++d) {
    VecF qv[NRV];
    for (int i = 0; i < NRV; ++i) qv[i] = load(qt + d * rp + i * kLanes);
    const VecF a = splat(k0[d]), b = splat(k1[d]), c = splat(k2[d]), e = splat(k3[d]);
    for (int i = 0; i < NRV; ++i) {
      s[0][i] += a * qv[i];
      s[1][i] += b * qv[i];
      s[2][i] += c * qv[i];
      s[3][i] += e * qv[i];
    }
  }
  for (int jj = 0; jj < jn; ++jj)
    for (int i = 0; i < NRV; ++i) store(st + jj * rp + i * kLanes, s[jj][i]);
}

// Float32 keys only (run_item widens bfloat16 ones first).
template <int DV>
inline void scores_rows(const float* qt, int rp, const void* const* kp, int64_t off, int nk,
                        float* st) {
  constexpr int D = DV * kLanes;
  const int nrv = rp / kLanes;
  for (int jb = 0; jb < nk; jb += 4) {
    const int jn = std::min(4, nk - jb);
    for (int i0 = 0; i0 < nrv; i0 += 4) {
      const float* q = qt + i0 * kLanes;
      float* out = st + jb * rp + i0 * kLanes;
      switch (std::min(4, nrv - i0)) {
        case 1: scores_rows_block<D, 1>(q, rp, kp + jb, off, jn, out); break;
        case 2: scores_rows_block<D, 2>(q, rp, kp + jb, off, jn, out); break;
        case 3: scores_rows_block<D, 3>(q, rp, kp + jb, off, jn, out); break;
        default: scores_rows_block<D, 4>(q, rp, kp + jb, off, jn, out); break;
      }
    }
  }
}

// acc[r] = acc[r] * alpha[r] + sum_j P(r, j) V[j] for RB rows held in registers;
// P(r, j) = p[j * sj + r * sr].
template <int DV, int RB, typename KV>
inline void accumulate_pv_block(float* acc, const float* alpha, const float* p, int sj, int sr,
                                int r0, const void* const* vp, int64_t off, int nk,
                                Prefetcher& prefetcher) {
  constexpr int D = DV * kLanes;
  Prefetcher pf = prefetcher;  // a local copy stays in registers across the loop
  VecF a[RB][DV];
  for (int rr = 0; rr < RB; ++rr) {
    const VecF al = splat(alpha[r0 + rr]);
    for (int v = 0; v < DV; ++v) a[rr][v] = load(acc + (r0 + rr) * D + v * kLanes) * al;
  }
  for (int j = 0; j < nk; ++j) {
    pf.step();
    VecF vv[DV];
    const KV* row = static_cast<const KV*>(vp[j]) + off;
    for (int v = 0; v < DV; ++v) vv[v] = load(row + v * kLanes);
    for (int rr = 0; rr < RB; ++rr) {
      const VecF pj = splat(p[j * sj + (r0 + rr) * sr]);
      for (int v = 0; v < DV; ++v) a[rr][v] += pj * vv[v];
    }
  }
  for (int rr = 0; rr < RB; ++rr)
    for (int v = 0; v < DV; ++v) store(acc + (r0 + rr) * D + v * kLanes, a[rr][v]);
  prefetcher = pf;
}

template <int DV, typename KV>
inline void accumulate_pv(float* acc, const float* alpha, const float* p, int sj, int sr, int rows,
                          const void* const* vp, int64_t off, int nk, Prefetcher& pf) {
  // Rows per register block: as many as fit 16 accumulator registers, at most 4.
  constexpr int RB = DV <= 4 ? 4 : (DV == 5 ? 3 : (DV <= 8 ? 2 : 1));
  for (int r0 = 0; r0 < rows;) {
    const int n = std::min(RB, rows - r0);
    switch (n) {
      case 1: accumulate_pv_block<DV, 1, KV>(acc, alpha, p, sj, sr, r0, vp, off, nk, pf); break;
      case 2:
        accumulate_pv_block<DV, (RB >= 2 ? 2 : 1), KV>(acc, alpha, p, sj, sr, r0, vp, off, nk,
                                                       pf);
        break;
      case 3:
        accumulate_pv_block<DV, (RB >= 3 ? 3 : 1), KV>(acc, alpha, p, sj, sr, r0, vp, off, nk,
                                                       pf);
        break;
      default:
        accumulate_pv_block<DV, RB, KV>(acc, alpha, p, sj, sr, r0, vp, off, nk, pf);
        break;
    }
    r0 += n;
  }
}

// Online softmax step for key-major scores S[j][r], 16 rows per vector; P overwrites S.
inline void softmax_rows(float* st, int rp, int nk, float* m, float* l, float* alpha) {
  for (int r = 0; r < rp; r += kLanes) {
    const VecF mo = load(m + r);
    VecF mc = load(st + r);
    for (int j = 1; j < nk; ++j) mc = vmax(mc, load(st + j * rp + r));
    const VecF mn = vmax(mo, mc);
    const VecF mref = mn == splat(kNegInf) ? VecF{} : mn;
    const VecF al = exp2v(mo - mref);
    VecF sum = VecF{};
    for (int j = 0; j < nk; ++j) {
      const VecF p = exp2v(load(st + j * rp + r) - mref);
      store(st + j * rp + r, p);
      sum += p;
    }
    store(l + r, load(l + r) * al + sum);
    store(m + r, mn);
    store(alpha + r, al);
  }
}

// Online softmax step for row-major scores S[r][j] (row stride kChunk, keys padded with
// -inf up to a multiple of 16); P overwrites S.
inline void softmax_dot(float* st, int rows, int nk, float* m, float* l, float* alpha) {
  const int nv = (nk + kLanes - 1) / kLanes;
  for (int r = 0; r < rows; ++r) {
    float* s = st + r * kChunk;
    VecF mc = load(s);
    for (int v = 1; v < nv; ++v) mc = vmax(mc, load(s + v * kLanes));
    const float mn = std::max(m[r], hmax(mc));
    const float mref = mn == kNegInf ? 0.0f : mn;
    const float al = std::exp2(m[r] - mref);
    VecF sum = VecF{};
    for (int v = 0; v < nv; ++v) {
      const VecF p = exp2v(load(s + v * kLanes) - mref);
      store(s + v * kLanes, p);
      sum += p;
    }
    l[r] = l[r] * al + hsum(sum);
    m[r] = mn;
    alpha[r] = al;
  }
}

// The chunk's keys and values of one kv head (at off in each slot) as float32 rows in sc.kf,
// sc.vf, pointed to by sc.kfp, sc.vfp (padded as gather pads): many query rows read each key
// and value many times, so they are widened once.
template <int DV>
inline void widen(const void* const* kp, const void* const* vp, int64_t off, int nk, Scratch& sc) {
  constexpr int D = DV * kLanes;
  for (int j = 0; j < nk; ++j) {
    const BF16* k = static_cast<const BF16*>(kp[j]) + off;
    const BF16* v = static_cast<const BF16*>(vp[j]) + off;
    for (int d = 0; d < DV; ++d) {
      store(sc.kf.data() + j * D + d * kLanes, load(k + d * kLanes));
      store(sc.vf.data() + j * D + d * kLanes, load(v + d * kLanes));
    }
    sc.kfp[j] = sc.kf.data() + j * D;
    sc.vfp[j] = sc.vf.data() + j * D;
  }
  for (int j = nk; j < kChunk + kLanes; ++j) {
    sc.kfp[j] = sc.kfp[nk - 1];
    sc.vfp[j] = sc.vfp[nk - 1];
  }
}

// The end of an item's keys: its range, cut by the causal mask at its last query.
inline int32_t key_end(const AttentionArgs& a, const Item& it) {
  const int32_t q_len = a.query_start_loc[it.seq + 1] - a.query_start_loc[it.seq];
  const int32_t last = a.seq_lens[it.seq] - q_len + it.q1 - 1;  // position of its last query
  return std::min<int32_t>(it.k1, last + 1);
}

// Slot pointers (all kv heads) of the item's chunk at kc (< kend) into kdst/vdst, padded to
// kChunk + kLanes with the last one; returns the key count.
template <typename KV>
inline int gather(const AttentionArgs& a, const Geometry& g, const Item& it, int32_t kc,
                  int32_t kend, const void** kdst, const void** vdst) {
  const int32_t* bt = a.block_tables + it.seq * a.max_blocks;
  const int32_t bs = static_cast<int32_t>(a.block_size);
  const int nk = std::min<int32_t>(kChunk, kend - kc);
  int32_t bi = kc / bs, off = kc % bs;
  for (int j = 0; j < nk; ++j) {
    const int64_t slot = static_cast<int64_t>(bt[bi]) * bs + off;
    kdst[j] = static_cast<const KV*>(a.k_cache) + slot * g.row_stride;
    vdst[j] = static_cast<const KV*>(a.v_cache) + slot * g.row_stride;
    if (++off == bs) {
      off = 0;
      ++bi;
    }
  }
  for (int j = nk; j < kChunk + kLanes; ++j) kdst[j] = kdst[nk - 1];  // pads key blocks
  return nk;
}

// One item; `after` (or null) is the item this thread runs next, whose first chunk is
// prefetched during this item's last one: short items (decodes of a few hundred keys) would
// otherwise start every one of them cold.
template <int DV, typename KV>
void run_item(const AttentionArgs& a, const Geometry& g, const Item& it, const Item* after,
              Scratch& sc, float* partials) {
  constexpr int D = DV * kLanes;
  const int64_t G = g.group;
  const int32_t start = a.query_start_loc[it.seq];
  const int32_t q_len = a.query_start_loc[it.seq + 1] - start;
  const int32_t seq_len = a.seq_lens[it.seq];
  const int nq = it.q1 - it.q0;
  const int nh = it.h1 - it.h0;
  const int rows = static_cast<int>(nq * G);  // per kv head
  const int rp = static_cast<int>(round_up(rows, kLanes));
  const bool dot = rows <= kDotRowsMax;
  const int64_t qsize = dot ? static_cast<int64_t>(rows) * D : static_cast<int64_t>(D) * rp;
  const int32_t p0 = seq_len - q_len + it.q0;  // position of the tile's first query
  const float qscale = a.scale * kLog2e;       // softmax in base 2

  float* st = sc.s.data();
  int32_t* pos = sc.pos.data();

  // Per kv head hi: queries (pre-scaled; row r is query r / G, head r % G of the group),
  // running max m, sum l, rescale alpha, and the output accumulator.
  for (int hi = 0; hi < nh; ++hi) {
    float* qbuf = sc.q.data() + hi * qsize;
    for (int i = 0; i < nq; ++i) {
      const float* src = a.q + (start + it.q0 + i) * a.q_stride + (it.h0 + hi) * G * D;
      for (int h = 0; h < G; ++h) {
        const int r = static_cast<int>(i * G + h);
        if (dot) {
          for (int d = 0; d < D; ++d) qbuf[r * D + d] = src[h * D + d] * qscale;
        } else {
          for (int d = 0; d < D; ++d) qbuf[d * rp + r] = src[h * D + d] * qscale;
        }
      }
    }
    if (!dot)
      for (int d = 0; d < D; ++d)
        for (int r = rows; r < rp; ++r) qbuf[d * rp + r] = 0.0f;
  }
  std::fill(sc.m.begin(), sc.m.begin() + nh * rp, kNegInf);
  std::fill(sc.l.begin(), sc.l.begin() + nh * rp, 0.0f);
  std::fill(sc.acc.begin(), sc.acc.begin() + static_cast<int64_t>(nh) * rp * D, 0.0f);
  for (int r = 0; r < rp; ++r) pos[r] = r < rows ? p0 + static_cast<int32_t>(r / G) : INT32_MAX;

  const int32_t kend = key_end(a, it);
  const void** kp = sc.kp.data();
  const void** vp = sc.vp.data();
  const void** kp_next = sc.kp.data() + kChunk + kLanes;
  const void** vp_next = sc.vp.data() + kChunk + kLanes;
  int nk_next = it.k0 < kend ? gather<KV>(a, g, it, it.k0, kend, kp_next, vp_next) : 0;
  constexpr int64_t head_bytes = D * sizeof(KV);
  Prefetcher pf;
  pf.d0 = it.h0 * head_bytes;
  pf.d1 = it.h1 * head_bytes;
  int64_t slot_lines = (pf.d1 - pf.d0 + 63) / 64;

  for (int32_t kc = it.k0; kc < kend; kc += kChunk) {
    std::swap(kp, kp_next);
    std::swap(vp, vp_next);
    const int nk = nk_next;
    nk_next = kc + kChunk < kend ? gather<KV>(a, g, it, kc + kChunk, kend, kp_next, vp_next) : 0;
    pf.kp = kp_next;
    pf.vp = vp_next;
    pf.n = nk_next;
    if (nk_next == 0 && after != nullptr) {  // the last chunk: fetch the next item's first
      const int32_t after_end = key_end(a, *after);
      if (after->k0 < after_end) {
        const void** ka = sc.kp.data() + 2 * (kChunk + kLanes);
        const void** va = sc.vp.data() + 2 * (kChunk + kLanes);
        pf.kp = ka;
        pf.vp = va;
        pf.n = gather<KV>(a, g, *after, after->k0, after_end, ka, va);
        pf.d0 = after->h0 * head_bytes;
        pf.d1 = after->h1 * head_bytes;
        slot_lines = (pf.d1 - pf.d0 + 63) / 64;
      }
    }
    pf.j = 0;
    pf.d = pf.d0;
    const int steps = (dot ? 2 : 1) * nh * nk;  // scores_dot and accumulate_pv both step
    pf.per_step = static_cast<int>((pf.n * slot_lines + steps - 1) / steps);
    const bool diagonal = kc + nk - 1 > p0;  // the causal mask cuts this chunk
    for (int hi = 0; hi < nh; ++hi) {
      const float* qbuf = sc.q.data() + hi * qsize;
      float* m = sc.m.data() + hi * rp;
      float* l = sc.l.data() + hi * rp;
      float* alpha = sc.alpha.data() + hi * rp;
      float* acc = sc.acc.data() + static_cast<int64_t>(hi) * rp * D;
      const int64_t off = (it.h0 + hi) * D;
      if (dot) {
        scores_dot<DV, KV>(qbuf, rows, kp, off, nk, st, pf);
        for (int r = 0; r < rows; ++r) {
          float* s = st + r * kChunk;
          const int first_masked = diagonal ? std::max(0, std::min(nk, pos[r] - kc + 1)) : nk;
          for (int j = first_masked; j < round_up(nk, kLanes); ++j) s[j] = kNegInf;
        }
        softmax_dot(st, rows, nk, m, l, alpha);
        accumulate_pv<DV, KV>(acc, alpha, st, 1, kChunk, rows, vp, off, nk, pf);
      } else {
        const void* const* krows = kp;
        const void* const* vrows = vp;
        int64_t roff = off;
        if constexpr (std::is_same_v<KV, BF16>) {
          widen<DV>(kp, vp, off, nk, sc);
          krows = sc.kfp.data();
          vrows = sc.vfp.data();
          roff = 0;
        }
        scores_rows<DV>(qbuf, rp, krows, roff, nk, st);
        if (diagonal) {
          for (int j = 0; j < nk; ++j) {
            const VecI kpos = VecI{} + (kc + j);
            for (int r = 0; r < rp; r += kLanes) {
              const VecI pv = *reinterpret_cast<const VecI*>(pos + r);
              float* sp = st + j * rp + r;
              store(sp, kpos > pv ? splat(kNegInf) : load(sp));
            }
          }
        }
        softmax_rows(st, rp, nk, m, l, alpha);
        accumulate_pv<DV, float>(acc, alpha, st, rp, 1, rows, vrows, roff, nk, pf);
      }
    }
  }

  for (int hi = 0; hi < nh; ++hi) {
    const float* m = sc.m.data() + hi * rp;
    const float* l = sc.l.data() + hi * rp;
    const float* acc = sc.acc.data() + static_cast<int64_t>(hi) * rp * D;
    if (it.partial < 0) {
      for (int r = 0; r < rows; ++r) {
        const int i = static_cast<int>(r / G), h = static_cast<int>(r % G);
        float* dst = a.out + ((start + it.q0 + i) * a.num_heads + (it.h0 + hi) * G + h) * D;
        const VecF inv = splat(1.0f / l[r]);
        for (int v = 0; v < DV; ++v)
          store(dst + v * kLanes, load(acc + r * D + v * kLanes) * inv);
      }
    } else {
      float* dst = partials + it.partial + static_cast<int64_t>(hi) * rows * (D + 2);
      std::copy(m, m + rows, dst);
      std::copy(l, l + rows, dst + rows);
      std::copy(acc, acc + static_cast<int64_t>(rows) * D, dst + 2 * rows);
    }
  }
}

// Any head size: plain loops, one query row at a time (not the fast path).
template <typename KV>
void run_item_scalar(const AttentionArgs& a, const Geometry& g, const Item& it, Scratch& sc,
                     float* partials) {
  const int64_t D = a.head_size, G = g.group;
  const int32_t start = a.query_start_loc[it.seq];
  const int32_t q_len = a.query_start_loc[it.seq + 1] - start;
  const int32_t seq_len = a.seq_lens[it.seq];
  const int32_t p0 = seq_len - q_len + it.q0;
  const int32_t* bt = a.block_tables + it.seq * a.max_blocks;
  const int64_t bs = a.block_size;
  const int nq = it.q1 - it.q0;
  const int64_t rows = nq * G;
  float* acc = sc.acc.data();
  for (int32_t kvh = it.h0; kvh < it.h1; ++kvh) {
    for (int i = 0; i < nq; ++i) {
      const int32_t p = p0 + i;
      for (int64_t h = 0; h < G; ++h) {
        const int64_t r = i * G + h;
        const float* qr = a.q + (start + it.q0 + i) * a.q_stride + (kvh * G + h) * D;
        float mx = kNegInf, sum = 0.0f;
        std::fill(acc, acc + D, 0.0f);
        for (int32_t k = it.k0; k < std::min<int32_t>(it.k1, p + 1); ++k) {
          const int64_t slot = static_cast<int64_t>(bt[k / bs]) * bs + k % bs;
          const KV* kr = static_cast<const KV*>(a.k_cache) + slot * g.row_stride + kvh * D;
          const KV* vr = static_cast<const KV*>(a.v_cache) + slot * g.row_stride + kvh * D;
          float s = 0.0f;
          for (int64_t d = 0; d < D; ++d) s += qr[d] * to_f32(kr[d]);
          s *= a.scale * kLog2e;
          const float mn = std::max(mx, s);
          const float al = std::exp2(mx - mn), w = std::exp2(s - mn);
          sum = sum * al + w;
          for (int64_t d = 0; d < D; ++d) acc[d] = acc[d] * al + w * to_f32(vr[d]);
          mx = mn;
        }
        if (it.partial < 0) {
          float* dst = a.out + ((start + it.q0 + i) * a.num_heads + kvh * G + h) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = acc[d] / sum;
        } else {
          float* dst = partials + it.partial + (kvh - it.h0) * rows * (D + 2);
          dst[r] = mx;
          dst[rows + r] = sum;
          std::copy(acc, acc + D, dst + 2 * rows + r * D);
        }
      }
    }
  }
}

// One item of any head size: the SIMD path for the sizes it is built for, else plain loops.
template <typename KV>
void run_any(const AttentionArgs& a, const Geometry& g, const Item& it, const Item* after,
             Scratch& sc, float* partials) {
  switch (a.head_size) {
    case 32: run_item<2, KV>(a, g, it, after, sc, partials); break;
    case 64: run_item<4, KV>(a, g, it, after, sc, partials); break;
    case 80: run_item<5, KV>(a, g, it, after, sc, partials); break;
    case 96: run_item<6, KV>(a, g, it, after, sc, partials); break;
    case 128: run_item<8, KV>(a, g, it, after, sc, partials); break;
    case 256: run_item<16, KV>(a, g, it, after, sc, partials); break;
    default: run_item_scalar<KV>(a, g, it, sc, partials); break;
  }
}

void merge_split(const AttentionArgs& a, const Geometry& g, const Split& sp,
                 const float* partials) {
  const int64_t D = a.head_size, G = g.group;
  const int64_t rows = (sp.q1 - sp.q0) * G;
  const int32_t start = a.query_start_loc[sp.seq];
  std::vector<float> w(sp.parts);
  for (int32_t kvh = sp.h0; kvh < sp.h1; ++kvh) {
    const float* head = partials + sp.partial + (kvh - sp.h0) * rows * (D + 2);
    for (int64_t r = 0; r < rows; ++r) {
      float mx = kNegInf;
      for (int p = 0; p < sp.parts; ++p) mx = std::max(mx, head[p * sp.part_size + r]);
      float total = 0.0f;
      for (int p = 0; p < sp.parts; ++p) {
        const float* part = head + p * sp.part_size;
        w[p] = mx == kNegInf ? 0.0f : std::exp2(part[r] - mx);
        total += w[p] * part[rows + r];
      }
      const int64_t i = r / G, h = r % G;
      float* dst = a.out + ((start + sp.q0 + i) * a.num_heads + kvh * G + h) * D;
      std::fill(dst, dst + D, 0.0f);
      for (int p = 0; p < sp.parts; ++p) {
        const float* acc = head + p * sp.part_size + 2 * rows + r * D;
        const float c = w[p] / total;
        for (int64_t d = 0; d < D; ++d) dst[d] += c * acc[d];
      }
    }
  }
}

void check_args(const AttentionArgs& a) {
  auto fail = [](const std::string& msg) {
    throw std::invalid_argument("paged_attention: " + msg);
  };
  if (a.num_kv_heads <= 0 || a.num_heads % a.num_kv_heads != 0)
    fail("num_heads must be a multiple of num_kv_heads");
  if (a.head_size <= 0 || a.block_size <= 0) fail("bad head or block size");
  if (a.num_seqs > 0 && a.query_start_loc[0] < 0) fail("query_start_loc[0] < 0");
  for (int64_t b = 0; b < a.num_seqs; ++b) {
    const int64_t start = a.query_start_loc[b], end = a.query_start_loc[b + 1];
    const int64_t seq_len = a.seq_lens[b];
    if (end < start || end > a.num_tokens) fail("query_start_loc out of order or past q");
    if (end == start) continue;
    if (seq_len < end - start) fail("seq_lens shorter than the sequence's query rows");
    const int64_t nblocks = (seq_len + a.block_size - 1) / a.block_size;
    if (nblocks > a.max_blocks) fail("seq_lens exceed the block table");
    const int32_t* bt = a.block_tables + b * a.max_blocks;
    for (int64_t i = 0; i < nblocks; ++i)
      if (bt[i] < 0 || bt[i] >= a.num_blocks) fail("block table entry out of range");
  }
}

}  // namespace

void paged_attention(const AttentionArgs& a) {
  check_args(a);
  const Geometry g{a.num_heads / a.num_kv_heads, a.num_kv_heads * a.head_size};
  const int64_t G = g.group, D = a.head_size;
  const int64_t tile_q = std::max<int64_t>(1, kMaxTileRows / G);
  const int32_t num_kv_heads = static_cast<int32_t>(a.num_kv_heads);

  // Rows of q that belong to no sequence come back as zeros.
  if (a.num_seqs == 0 || a.query_start_loc[0] > 0 ||
      a.query_start_loc[a.num_seqs] < a.num_tokens) {
    std::vector<char> covered(a.num_tokens, 0);
    for (int64_t b = 0; b < a.num_seqs; ++b)
      for (int64_t t = a.query_start_loc[b]; t < a.query_start_loc[b + 1]; ++t) covered[t] = 1;
    for (int64_t t = 0; t < a.num_tokens; ++t)
      if (!covered[t])
        std::fill(a.out + t * a.num_heads * D, a.out + (t + 1) * a.num_heads * D, 0.0f);
  }

  std::vector<Item> items;
  int64_t total = 0;
  for (int64_t b = 0; b < a.num_seqs; ++b) {
    const int32_t q_len = a.query_start_loc[b + 1] - a.query_start_loc[b];
    if (q_len == 0) continue;
    const int32_t seq_len = a.seq_lens[b];
    const int64_t ntiles = (q_len + tile_q - 1) / tile_q;
    const int32_t tq = static_cast<int32_t>((q_len + ntiles - 1) / ntiles);
    for (int32_t q0 = 0; q0 < q_len; q0 += tq) {
      const int32_t q1 = std::min(q_len, q0 + tq);
      const int32_t keys = seq_len - q_len + q1;
      const int64_t rows = (q1 - q0) * G;
      // Decodes take all kv heads at once: each cache slot is then read whole, in one go.
      const int32_t heads_per_item = rows <= kDotRowsMax || q1 - q0 == 1 ? num_kv_heads : 1;
      const int64_t cost = static_cast<int64_t>(keys) * (rows + 8) * heads_per_item;
      for (int32_t h = 0; h < num_kv_heads; h += heads_per_item) {
        items.push_back({static_cast<int32_t>(b), h, h + heads_per_item, q0, q1, 0, keys, -1,
                         cost});
        total += cost;
      }
    }
  }
  if (items.empty()) return;

  // Flash decoding: split the biggest items so every thread gets a fair share.
  const int threads = omp_get_max_threads();
  const bool parallel = threads > 1 && total >= kParallelMinCost;
  std::vector<Split> splits;
  int64_t partial_size = 0;
  if (parallel) {
    const int64_t target = std::max<int64_t>(1, total / (threads * 4));
    const size_t n = items.size();
    for (size_t idx = 0; idx < n; ++idx) {
      const Item it = items[idx];
      const int32_t keys = it.k1 - it.k0;
      int64_t parts = std::min<int64_t>((it.cost + target - 1) / target, keys / kMinSplitKeys);
      if (it.cost <= 2 * target || parts < 2) continue;
      const int64_t rows = (it.q1 - it.q0) * G;
      const int64_t part_size = (it.h1 - it.h0) * rows * (D + 2);
      const int32_t step = static_cast<int32_t>(round_up((keys + parts - 1) / parts, kChunk));
      parts = (keys + step - 1) / step;
      splits.push_back({it.seq, it.h0, it.h1, it.q0, it.q1, partial_size, part_size,
                        static_cast<int32_t>(parts)});
      for (int64_t p = 0; p < parts; ++p) {
        Item part = it;
        part.k0 = it.k0 + static_cast<int32_t>(p * step);
        part.k1 = std::min(it.k1, part.k0 + step);
        part.partial = partial_size + p * part_size;
        part.cost = it.cost * (part.k1 - part.k0) / keys;
        if (p == 0) items[idx] = part; else items.push_back(part);
      }
      partial_size += parts * part_size;
    }
  }
  std::vector<float> partials(partial_size);
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& x, const Item& y) { return x.cost > y.cost; });

  // Rows per kv head of any item, padded; an item holds at most num_kv_heads of them.
  const int64_t max_rows = round_up(std::max<int64_t>(tile_q * G, G), kLanes);
  const int64_t state = num_kv_heads * max_rows;
  const int64_t nitems = static_cast<int64_t>(items.size());
  std::atomic<int64_t> next{0};
#pragma omp parallel if (parallel)
  {
    thread_local Scratch sc;
    if (static_cast<int64_t>(sc.q.size()) < state * D) {
      sc.q.resize(state * D);
      sc.acc.resize(state * D);
    }
    if (static_cast<int64_t>(sc.s.size()) < kChunk * max_rows) sc.s.resize(kChunk * max_rows);
    if (static_cast<int64_t>(sc.m.size()) < state) {
      sc.m.resize(state);
      sc.l.resize(state);
      sc.alpha.resize(state);
    }
    if (static_cast<int64_t>(sc.pos.size()) < max_rows) sc.pos.resize(max_rows);
    sc.kp.resize(3 * (kChunk + kLanes));  // this chunk, the next, the next item's first
    sc.vp.resize(3 * (kChunk + kLanes));
    if (a.kv_bf16 && static_cast<int64_t>(sc.kf.size()) < kChunk * D) {
      sc.kf.resize(kChunk * D);
      sc.vf.resize(kChunk * D);
      sc.kfp.resize(kChunk + kLanes);
      sc.vfp.resize(kChunk + kLanes);
    }
    // Items handed out one at a time (as schedule(dynamic, 1)), each thread taking its next
    // one before it runs the current, so that it knows what to prefetch.
    for (int64_t i = next.fetch_add(1); i < nitems;) {
      const int64_t j = next.fetch_add(1);
      const Item& it = items[i];
      const Item* after = j < nitems ? &items[j] : nullptr;
      if (a.kv_bf16)
        run_any<BF16>(a, g, it, after, sc, partials.data());
      else
        run_any<float>(a, g, it, after, sc, partials.data());
      i = j;
    }
  }
  if (!splits.empty()) {
    const int64_t nsplits = static_cast<int64_t>(splits.size());
#pragma omp parallel for schedule(dynamic, 1) if (parallel && nsplits > 1)
    for (int64_t s = 0; s < nsplits; ++s) merge_split(a, g, splits[s], partials.data());
  }
}

}  // namespace xllm::XLLM_ISA
