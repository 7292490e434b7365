// Flash attention on CPU: the "cpp" backend's sdpa_forward / sdpa_backward (module fastrnn._C_sdpa).
//
// Contract and equations: fastrnn/backends/reference_sdpa.py. Shapes (all row-major, contiguous
// unless said): q [N, L, E], k [Nk, S, E], v [Nk, S, Ev], out [N, L, Ev], lse [N, L];
// query row n uses key/value row n / G with G = N / Nk (grouped-query attention); the optional
// additive mask `bias` [Nm, L, S] is read through its strides (stride along S is 0 or 1) at row
// rows[n].
//
// Every tile product is a plain row-major C (+)= A B (no transposes), because the fastest GEMM
// on these machines is oneDNN's brgemm micro-kernel (at::native::cpublas::brgemm, JIT AVX-512),
// which takes no transpose flags: measured ~230 GFLOP/s a core on 64 x 256 x 64 tiles where
// MKL's sgemm -- what torch's own CPU flash attention calls -- gets ~95 (MKL's AMD code path).
// So operands that a product needs transposed are packed into panels by the task that uses them:
//   forward   K^T, one [E, bs] panel at a time (tasks sweep the key blocks in their outer loop)
//   backward  per key/value row: Q^T and dO^T of its G query heads as [E, bl] / [Ev, bl] panels,
//             a dQ^T accumulator in the same layout, one K^T panel at a time
// Extra memory per thread: forward O(BL BS + E BS + L); backward O(G L (2E + Ev) + BL BS), plus
// per-chunk dQ^T buffers only when rows are split across threads. Never O(L S). (At B=1, H=8,
// L=S=4096, E=64 peak RSS above the inputs is below torch's flash path both ways; see
// bench/results/attention_cpu.md.)
//
// Forward: one task per batch row n (split into interleaved sets of query blocks when there are
// fewer rows than threads), run in parallel with at::parallel_for. A task sweeps the key blocks
// of BS keys once; for each, every one of its query blocks of BL queries does S = Q K^T (one
// GEMM), scale + mask + causal and the online softmax row by row (vectorised exp), and
// acc = alpha acc + P V (one GEMM, accumulated in `out`). lse is saved for backward.
//
// Backward (FlashAttention-2 order, computed transposed): one task per key/value row (times a
// few key chunks when there are fewer rows than threads). For each key block, all query blocks of
// the G query heads sharing it stream past: S^T = K Q^T, P^T = exp(S^T - lse),
// dV += (P Z)^T dO, dP^T = V dO^T, dS^T = P^T (Z dP^T - D), dK += dS^T Q, dQ^T += K^T dS^T.
// dK/dV of a key block stay in cache for the sweep; dQ^T goes to the task's accumulator, which is
// transposed into grad_q at the task's end (chunk-summed first when a row was split), with the
// `scale` factors of dK and dQ applied once. D = rowsum(dO * out) per task, O(G L).
// Forward and backward are one parallel region each: on a loaded machine every region costs
// milliseconds of waiting for the other threads to be scheduled.
//
// GEMM fallbacks: MKL sgemm_/dgemm_ (exported by libtorch_cpu; -DFASTRNN_MKL) when brgemm is
// unavailable (no AVX-512, oneDNN ukernels not built) and for float64; at::mm otherwise.
//
// Pointwise row math for float is compiled once per ISA (AVX-512, AVX2+FMA, baseline; GCC
// target_clones, picked at load time) with a branch-free exp, because the default build flags
// target plain x86-64. NaN propagates: no -ffast-math, and comparisons keep NaN operands.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "gemm.h"
#include "vec_math.h"

using fastrnn::gemm_block;
using fastrnn::release_gemm;

namespace {

// Tasks are grouped so that each parallel chunk has at least this many multiply-adds: waking
// the thread pool costs more than a tiny problem (microseconds idle, milliseconds when loaded).
constexpr int64_t kMinChunkWork = int64_t(1) << 21;

int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, kMinChunkWork / std::max<int64_t>(1, work_per_task));
}

// GEMMs: csrc/gemm.h (oneDNN brgemm, MKL and ATen fallbacks).

// Transposed panels of one row-major [R, C] matrix: block b of rows [r0, r0 + w)
// (w = min(B, R - r0)) becomes the contiguous [C, w] matrix at dst + r0 * C. Same total size as
// src; a panel is one linear stream for the GEMM that reads it.
template <typename T>
void pack_panels(const T* src, int64_t R, int64_t C, int64_t B, T* dst) {
  for (int64_t r0 = 0; r0 < R; r0 += B) {
    const int64_t w = std::min(B, R - r0);
    const T* s = src + r0 * C;
    T* d = dst + r0 * C;
    for (int64_t c = 0; c < C; ++c)  // contiguous writes; the strided reads stay in L1
      for (int64_t r = 0; r < w; ++r) d[c * w + r] = s[r * C + c];
  }
}

// ---- pointwise math ----------------------------------------------------------------------------

// exp: fastrnn::vm::exp (csrc/vec_math.h): exactly 0 below ~-87 (masked scores add nothing), NaN kept.

// Dropout hash (see reference_sdpa.py): 32-bit, wrapping multiplies.
constexpr uint32_t kMix1 = 0x21F0AAADu, kMix2 = 0x735A2D97u;
constexpr uint32_t kMulN = 0x61C88647u, kMulI = 0x165667B1u, kMulJ = 0x27D4EB2Fu;
FASTRNN_INLINE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMix1;
  x ^= x >> 15;
  x *= kMix2;
  return x ^ (x >> 15);
}
FASTRNN_INLINE uint32_t row_key(uint32_t seed, int64_t n, int64_t i) {
  return mix32(mix32(seed ^ (static_cast<uint32_t>(n) * kMulN)) ^ (static_cast<uint32_t>(i) * kMulI));
}

// Row operations on n contiguous elements.
// s = s * scale + b[j * stride]: stride 1 (mask row), 0 (mask broadcast along the row) or any
// (a transposed tile reads the mask down a column)
template <typename T>
FASTRNN_INLINE void scale_bias_t(T* s, T scale, const T* b, int64_t stride, int n) {
  if (!b) {
#pragma omp simd
    for (int j = 0; j < n; ++j) s[j] *= scale;
  } else if (stride == 1) {
#pragma omp simd
    for (int j = 0; j < n; ++j) s[j] = s[j] * scale + b[j];
  } else if (stride == 0) {
    const T c = b[0];
#pragma omp simd
    for (int j = 0; j < n; ++j) s[j] = s[j] * scale + c;
  } else {
    for (int j = 0; j < n; ++j) s[j] = s[j] * scale + b[j * stride];
  }
}
template <typename T>
FASTRNN_INLINE T row_max_t(const T* s, int n) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}
// s <- exp(s - mu); returns the row sum
template <typename T>
FASTRNN_INLINE T exp_sum_t(T* s, T mu, int n) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < n; ++j) {
    const T e = fastrnn::vm::exp(s[j] - mu);
    s[j] = e;
    sum += e;
  }
  return sum;
}
// s <- exp(s - lse), lse per element (a transposed tile: one query per column)
template <typename T>
FASTRNN_INLINE void exp_sub_t(T* s, const T* lse, int n) {
#pragma omp simd
  for (int j = 0; j < n; ++j) s[j] = fastrnn::vm::exp(s[j] - lse[j]);
}
// z[j] = keep / (1 - p) or 0, with hash(keys[j] ^ mul[j]): one of keys / mul is a broadcast row
// key (forward: one query, many keys) or a per-column key (backward: one key, many queries)
template <typename T>
FASTRNN_INLINE void dropout_row_t(T* z, uint32_t key, uint32_t j0, uint32_t thr, T inv, int n) {
#pragma omp simd
  for (int j = 0; j < n; ++j) {
    const uint32_t h = mix32(key ^ ((j0 + uint32_t(j)) * kMulJ));
    z[j] = h >= thr ? inv : T(0);
  }
}
template <typename T>
FASTRNN_INLINE void dropout_col_t(T* z, const uint32_t* keys, uint32_t j, uint32_t thr, T inv, int n) {
  const uint32_t jm = j * kMulJ;
#pragma omp simd
  for (int c = 0; c < n; ++c) {
    const uint32_t h = mix32(keys[c] ^ jm);
    z[c] = h >= thr ? inv : T(0);
  }
}
// ds = p * (z * dp - D), in dp; D per element; z == nullptr: no dropout
template <typename T>
FASTRNN_INLINE void grad_scores_t(T* dp, const T* p, const T* z, const T* D, int n) {
  if (z) {
#pragma omp simd
    for (int j = 0; j < n; ++j) dp[j] = p[j] * (z[j] * dp[j] - D[j]);
  } else {
#pragma omp simd
    for (int j = 0; j < n; ++j) dp[j] = p[j] * (dp[j] - D[j]);
  }
}
template <typename T>
FASTRNN_INLINE void mul_t(T* y, const T* a, const T* b, int n) {
#pragma omp simd
  for (int j = 0; j < n; ++j) y[j] = a[j] * b[j];
}
template <typename T>
FASTRNN_INLINE void scale_t(T* y, T a, int n) {
#pragma omp simd
  for (int j = 0; j < n; ++j) y[j] *= a;
}
template <typename T>
FASTRNN_INLINE T dot_t(const T* a, const T* b, int n) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < n; ++j) sum += a[j] * b[j];
  return sum;
}

// float: one clone per ISA; double: the plain template (double is for gradcheck, not speed).
#define SDPA_ROW_OPS(T, ATTR)                                                                        \
  ATTR void scale_bias(T* s, T sc, const T* b, int64_t st, int n) { scale_bias_t(s, sc, b, st, n); } \
  ATTR T row_max(const T* s, int n) { return row_max_t(s, n); }                                      \
  ATTR T exp_sum(T* s, T mu, int n) { return exp_sum_t(s, mu, n); }                                  \
  ATTR void exp_sub(T* s, const T* lse, int n) { exp_sub_t(s, lse, n); }                             \
  ATTR void dropout_row(T* z, uint32_t key, uint32_t j0, uint32_t thr, T inv, int n) {               \
    dropout_row_t(z, key, j0, thr, inv, n);                                                          \
  }                                                                                                  \
  ATTR void dropout_col(T* z, const uint32_t* keys, uint32_t j, uint32_t thr, T inv, int n) {        \
    dropout_col_t(z, keys, j, thr, inv, n);                                                          \
  }                                                                                                  \
  ATTR void grad_scores(T* dp, const T* p, const T* z, const T* D, int n) {                          \
    grad_scores_t(dp, p, z, D, n);                                                                   \
  }                                                                                                  \
  ATTR void mul(T* y, const T* a, const T* b, int n) { mul_t(y, a, b, n); }                          \
  ATTR void scale(T* y, T a, int n) { scale_t(y, a, n); }                                            \
  ATTR T dot(const T* a, const T* b, int n) { return dot_t(a, b, n); }
SDPA_ROW_OPS(float, FASTRNN_CLONES)
SDPA_ROW_OPS(double, )
#undef SDPA_ROW_OPS

// ---- problem description shared by forward and backward ----------------------------------------

struct Problem {
  int64_t N, Nk, G, L, S, E, Ev;
  int64_t BL, BS;  // block sizes (queries, keys)
  bool causal;
  const void* bias;  // nullptr: no mask
  int64_t bias_sN, bias_sL, bias_sS;
  const int64_t* rows;
  bool dropout;
  uint32_t seed, threshold;
  double inv_keep, scale;
};

// Tile of query rows [i0, i0 + bl) of batch row n against keys [j0, j0 + bs), in s [bl, bs]:
// s = scale * Q K^T + bias, causal entries -inf. kt: the packed [E, bs] panel of K^T.
template <typename T>
void scores(const Problem& P, const T* Qb, const T* kt, int64_t n, int64_t i0, int bl, int64_t j0,
            int bs, T* s) {
  gemm_block<T>(bl, bs, P.E, Qb, P.E, kt, bs, s, bs, false);
  const T* bias = static_cast<const T*>(P.bias);
  for (int r = 0; r < bl; ++r) {
    T* srow = s + int64_t(r) * bs;
    const int64_t i = i0 + r;
    scale_bias(srow, T(P.scale), bias ? bias + P.rows[n] * P.bias_sN + i * P.bias_sL + j0 * P.bias_sS : nullptr,
               P.bias_sS, bs);
    if (P.causal) {  // top-left aligned: key j is visible to query i iff j <= i
      for (int64_t j = std::max<int64_t>(0, i - j0 + 1); j < bs; ++j) srow[j] = -std::numeric_limits<T>::infinity();
    }
  }
}

// The same tile transposed, st [bs, bl] (row = key, column = query): st = scale * K Q^T + bias.
// qt: the packed [E, bl] panel of Q^T.
template <typename T>
void scores_transposed(const Problem& P, const T* Kb, const T* qt, int64_t n, int64_t i0, int bl,
                       int64_t j0, int bs, T* st) {
  gemm_block<T>(bs, bl, P.E, Kb, P.E, qt, bl, st, bl, false);
  const T* bias = static_cast<const T*>(P.bias);
  for (int r = 0; r < bs; ++r) {
    T* srow = st + int64_t(r) * bl;
    const int64_t j = j0 + r;
    scale_bias(srow, T(P.scale), bias ? bias + P.rows[n] * P.bias_sN + i0 * P.bias_sL + j * P.bias_sS : nullptr,
               P.bias_sL, bl);
    if (P.causal) {  // queries i < j do not see key j
      const int64_t hidden = std::min<int64_t>(bl, std::max<int64_t>(0, j - i0));
      for (int64_t c = 0; c < hidden; ++c) srow[c] = -std::numeric_limits<T>::infinity();
    }
  }
}

template <typename T>
void forward_impl(const Problem& P, const T* q, const T* k, const T* v, T* out, T* lse) {
  const int64_t nqb = (P.L + P.BL - 1) / P.BL;
  const T inf = std::numeric_limits<T>::infinity();
  // Tasks: a batch row's query blocks, split `splits` ways (interleaved, which balances causal
  // work) only when there are fewer rows than threads. A task sweeps the key blocks once, outer:
  // each K^T panel is packed once per task into an [E, BS] buffer and used by every query block
  // of the task, whose running max / sum live in O(L) row arrays and whose accumulators are
  // their rows of `out`. So the extra memory is O(BL BS + E BS + L) per thread.
  const int64_t threads = at::get_num_threads();
  const int64_t splits = std::min<int64_t>(nqb, std::max<int64_t>(1, (threads + P.N - 1) / P.N));
  const int64_t grain = grain_for(P.L * P.S * (P.E + P.Ev) / splits);
  at::parallel_for(0, P.N * splits, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> sbuf(P.BL * P.BS), zbuf(P.dropout ? P.BS : 0), kt(P.E * P.BS), m(P.L), l(P.L);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / splits, c = task % splits, kv = n / P.G;
      int64_t last_row = -1;
      for (int64_t ib = c; ib < nqb; ib += splits) {
        const int64_t i0 = ib * P.BL, bl = std::min(P.BL, P.L - i0);
        std::fill(out + (n * P.L + i0) * P.Ev, out + (n * P.L + i0 + bl) * P.Ev, T(0));
        std::fill(m.begin() + i0, m.begin() + i0 + bl, -inf);
        std::fill(l.begin() + i0, l.begin() + i0 + bl, T(0));
        last_row = i0 + bl - 1;
      }
      const int64_t s_end = P.causal ? std::min(P.S, last_row + 1) : P.S;  // later keys: hidden
      for (int64_t j0 = 0; j0 < s_end; j0 += P.BS) {
        const int bs = static_cast<int>(std::min(P.BS, P.S - j0));
        pack_panels(k + (kv * P.S + j0) * P.E, int64_t(bs), P.E, int64_t(bs), kt.data());
        const T* Vb = v + (kv * P.S + j0) * P.Ev;
        for (int64_t ib = c; ib < nqb; ib += splits) {
          const int64_t i0 = ib * P.BL;
          const int bl = static_cast<int>(std::min(P.BL, P.L - i0));
          if (P.causal && j0 > i0 + bl - 1) continue;  // every row of the block is before j0
          T* Ob = out + (n * P.L + i0) * P.Ev;
          T* s = sbuf.data();
          scores<T>(P, q + (n * P.L + i0) * P.E, kt.data(), n, i0, bl, j0, bs, s);
          // -- online softmax, row by row --
          for (int r = 0; r < bl; ++r) {
            T* srow = s + int64_t(r) * bs;
            T& mi = m[i0 + r];
            const T m_new = std::max(mi, row_max(srow, bs));
            const T mu = m_new == -inf ? T(0) : m_new;  // nothing visible yet: every exp is 0
            const T alpha = fastrnn::vm::exp(mi - mu);
            l[i0 + r] = alpha * l[i0 + r] + exp_sum(srow, mu, bs);
            if (P.dropout) {  // values see P * Z; l keeps the undropped sum
              dropout_row(zbuf.data(), row_key(P.seed, n, i0 + r), uint32_t(j0), P.threshold, T(P.inv_keep), bs);
              mul(srow, srow, zbuf.data(), bs);
            }
            if (!(alpha == T(1))) scale(Ob + int64_t(r) * P.Ev, alpha, static_cast<int>(P.Ev));
            mi = m_new;
          }
          // -- acc += P V --
          gemm_block<T>(bl, P.Ev, bs, s, bs, Vb, P.Ev, Ob, P.Ev, true);
        }
      }
      for (int64_t ib = c; ib < nqb; ib += splits) {
        const int64_t i0 = ib * P.BL, bl = std::min(P.BL, P.L - i0);
        for (int64_t i = i0; i < i0 + bl; ++i) {
          T* orow = out + (n * P.L + i) * P.Ev;
          if (l[i] == T(0)) {  // no visible key: zeros, as torch
            std::fill(orow, orow + P.Ev, T(0));
            lse[n * P.L + i] = inf;
          } else {
            scale(orow, T(1) / l[i], static_cast<int>(P.Ev));
            lse[n * P.L + i] = m[i] + std::log(l[i]);
          }
        }
      }
    }
    release_gemm();
  });
}

// grad_q rows of key/value row kv's G query heads = scale * dQ^T, transposed back from panels.
template <typename T>
void unpack_dq(const Problem& P, const T* dqt, int64_t kv, T* dq) {
  for (int64_t g = 0; g < P.G; ++g) {
    const int64_t n = kv * P.G + g;
    for (int64_t i0 = 0; i0 < P.L; i0 += P.BL) {
      const int64_t bl = std::min(P.BL, P.L - i0);
      const T* src = dqt + (g * P.L + i0) * P.E;
      T* d = dq + (n * P.L + i0) * P.E;
      for (int64_t r = 0; r < bl; ++r)
        for (int64_t e = 0; e < P.E; ++e) d[r * P.E + e] = T(P.scale) * src[e * bl + r];
    }
  }
}

template <typename T>
void backward_impl(const Problem& P, const T* dout, const T* q, const T* k, const T* v, const T* out,
                   const T* lse, T* dq, T* dk, T* dv) {
  const int64_t nqb = (P.L + P.BL - 1) / P.BL, nkb = (P.S + P.BS - 1) / P.BS;
  // One task per key/value row; rows are split into `chunks` interleaved sets of key blocks only
  // when there are fewer rows than threads. Everything runs in one parallel region (on a loaded
  // machine each region costs milliseconds of waiting for the other threads): a task packs what
  // it needs itself -- Q^T and dO^T panels and D for its G query heads, one K^T panel at a time --
  // and, when it owns the whole row, writes grad_q at its end. dq/dk/dv arrive uninitialised.
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::min<int64_t>(nkb, std::max<int64_t>(1, (threads + P.Nk - 1) / P.Nk));
  const int64_t rowq = P.G * P.L * P.E;  // dQ elements of one key/value row's query heads
  std::vector<T> dqt_chunks(chunks > 1 ? P.Nk * chunks * rowq : 0);  // per-chunk dQ^T
  const int64_t grain = grain_for(P.G * P.L * P.S * (2 * P.E + 3 * P.Ev) / chunks);
  at::parallel_for(0, P.Nk * chunks, grain, [&](int64_t begin, int64_t end) {
    const int64_t tile = P.BL * P.BS;
    std::vector<T> pbuf(tile), dpbuf(tile), zbuf(P.dropout ? tile : 0), pzbuf(P.dropout ? tile : 0);
    std::vector<T> kt(P.E * P.BS), qt(rowq), dot_(P.G * P.L * P.Ev), D(P.G * P.L);
    std::vector<T> dqt_own(chunks > 1 ? 0 : rowq);
    std::vector<uint32_t> keys(P.dropout ? P.BL : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t kv = task / chunks, c = task % chunks, n0 = kv * P.G;
      // -- per task: Q^T / dO^T panels, D_i = dO_i . out_i, zeroed dQ^T --
      for (int64_t g = 0; g < P.G; ++g) {
        pack_panels(q + (n0 + g) * P.L * P.E, P.L, P.E, P.BL, qt.data() + g * P.L * P.E);
        pack_panels(dout + (n0 + g) * P.L * P.Ev, P.L, P.Ev, P.BL, dot_.data() + g * P.L * P.Ev);
      }
      for (int64_t r = 0; r < P.G * P.L; ++r)
        D[r] = dot(dout + (n0 * P.L + r) * P.Ev, out + (n0 * P.L + r) * P.Ev, int(P.Ev));
      T* dqt = chunks > 1 ? dqt_chunks.data() + task * rowq : dqt_own.data();
      std::fill(dqt, dqt + rowq, T(0));
      for (int64_t jb = c; jb < nkb; jb += chunks) {
        const int64_t j0 = jb * P.BS;
        const int bs = static_cast<int>(std::min(P.BS, P.S - j0));
        const T* Kb = k + (kv * P.S + j0) * P.E;
        const T* Vb = v + (kv * P.S + j0) * P.Ev;
        T* dKb = dk + (kv * P.S + j0) * P.E;
        T* dVb = dv + (kv * P.S + j0) * P.Ev;
        std::fill(dKb, dKb + int64_t(bs) * P.E, T(0));
        std::fill(dVb, dVb + int64_t(bs) * P.Ev, T(0));
        pack_panels(Kb, int64_t(bs), P.E, int64_t(bs), kt.data());
        for (int64_t g = 0; g < P.G; ++g) {
          const int64_t n = n0 + g;
          // causal: query blocks that end before key j0 see none of these keys
          for (int64_t ib = P.causal ? j0 / P.BL : 0; ib < nqb; ++ib) {
            const int64_t i0 = ib * P.BL;
            const int bl = static_cast<int>(std::min(P.BL, P.L - i0));
            const int64_t row0 = n * P.L + i0, grow0 = g * P.L + i0;
            T* pt = pbuf.data();
            T* dpt = dpbuf.data();
            // -- recompute P^T = exp(S^T - lse) --
            scores_transposed<T>(P, Kb, qt.data() + grow0 * P.E, n, i0, bl, j0, bs, pt);
            for (int r = 0; r < bs; ++r) exp_sub(pt + int64_t(r) * bl, lse + row0, bl);
            const T* pzt = pt;
            T* zt = nullptr;
            if (P.dropout) {  // the same mask bits as forward, regenerated
              zt = zbuf.data();
              for (int cc = 0; cc < bl; ++cc) keys[cc] = row_key(P.seed, n, i0 + cc);
              for (int r = 0; r < bs; ++r)
                dropout_col(zt + int64_t(r) * bl, keys.data(), uint32_t(j0 + r), P.threshold, T(P.inv_keep), bl);
              mul(pzbuf.data(), pt, zt, bs * bl);
              pzt = pzbuf.data();
            }
            // -- dV += (P Z)^T dO;  dP^T = V dO^T --
            gemm_block<T>(bs, P.Ev, bl, pzt, bl, dout + row0 * P.Ev, P.Ev, dVb, P.Ev, true);
            gemm_block<T>(bs, bl, P.Ev, Vb, P.Ev, dot_.data() + grow0 * P.Ev, bl, dpt, bl, false);
            // -- dS^T = P^T (Z dP^T - D) --
            for (int r = 0; r < bs; ++r) {
              const int64_t o = int64_t(r) * bl;
              grad_scores(dpt + o, pt + o, zt ? zt + o : nullptr, D.data() + grow0, bl);
            }
            // -- dK += dS^T Q;  dQ^T += K^T dS^T  (scale applied once at the end) --
            gemm_block<T>(bs, P.E, bl, dpt, bl, q + row0 * P.E, P.E, dKb, P.E, true);
            gemm_block<T>(P.E, bl, bs, kt.data(), bs, dpt, bl, dqt + grow0 * P.E, bl, true);
          }
        }
        scale(dKb, T(P.scale), bs * static_cast<int>(P.E));
      }
      if (chunks == 1) unpack_dq(P, dqt, kv, dq);
    }
    release_gemm();
  });
  if (chunks > 1) {  // sum the chunks' dQ^T (few rows: this is the small-batch case)
    at::parallel_for(0, P.Nk, 1, [&](int64_t begin, int64_t end) {
      for (int64_t kv = begin; kv < end; ++kv) {
        T* acc = dqt_chunks.data() + kv * chunks * rowq;
        for (int64_t c = 1; c < chunks; ++c) {
          const T* src = acc + c * rowq;
          for (int64_t x = 0; x < rowq; ++x) acc[x] += src[x];
        }
        unpack_dq(P, acc, kv, dq);
      }
    });
  }
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& rows,
                     double scale, bool causal, double dropout_p, int64_t seed, int64_t block_l,
                     int64_t block_s) {
  // Every size, stride, dtype and index the kernels rely on (they index raw pointers): a direct
  // call with bad tensors raises instead of reading out of bounds (fastrnn/contract/checks.py checks
  // the same first on the Python side).
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "sdpa: q, k, v must be 3-D");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "sdpa: q, k, v must be contiguous");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "sdpa: the cpp backend runs on CPU");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "sdpa: dtypes differ");
  TORCH_CHECK(block_l > 0 && block_s > 0, "sdpa: block sizes must be positive");
  Problem P{};
  P.N = q.size(0);
  P.L = q.size(1);
  P.E = q.size(2);
  P.Nk = k.size(0);
  P.S = k.size(1);
  P.Ev = v.size(2);
  TORCH_CHECK(P.Nk > 0 && P.N % P.Nk == 0, "sdpa: N must be a multiple of Nk");
  TORCH_CHECK(k.size(2) == P.E && v.size(0) == P.Nk && v.size(1) == P.S, "sdpa: k, v shapes");
  // the tiles divide by L and S: empty problems belong to the reference backend (the op layer sends them there)
  TORCH_CHECK(P.L > 0 && P.S > 0, "sdpa: L and S must be positive (empty problems go to the reference backend), ",
              "got L = ", P.L, ", S = ", P.S);
  P.G = P.N / P.Nk;
  P.BL = std::min<int64_t>(block_l, std::max<int64_t>(P.L, 1));
  P.BS = std::min<int64_t>(block_s, std::max<int64_t>(P.S, 1));
  P.causal = causal;
  P.bias = nullptr;
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(rows.has_value(), "sdpa: a mask needs its rows");
    TORCH_CHECK(b.dim() == 3 && b.size(0) > 0 && b.size(1) == P.L && b.size(2) == P.S,
                "sdpa: bias must be [Nm, L, S] with Nm >= 1, got ", b.sizes());
    TORCH_CHECK(b.device().is_cpu(), "sdpa: bias must be on the CPU");
    TORCH_CHECK(b.scalar_type() == q.scalar_type(), "sdpa: bias dtype must match q");
    TORCH_CHECK(b.stride(2) == 0 || b.stride(2) == 1, "sdpa: bias stride along S must be 0 or 1");
    TORCH_CHECK(b.stride(0) >= 0 && b.stride(1) >= 0, "sdpa: bias strides must be non-negative");
    TORCH_CHECK(rows->scalar_type() == at::kLong && rows->is_contiguous() && rows->dim() == 1 &&
                    rows->numel() == P.N && rows->device().is_cpu(),
                "sdpa: rows must be a contiguous int64 CPU tensor [N]");
    const int64_t* r = rows->data_ptr<int64_t>();
    for (int64_t n = 0; n < P.N; ++n)  // query row n reads bias[rows[n]]
      TORCH_CHECK(r[n] >= 0 && r[n] < b.size(0), "sdpa: rows[", n, "] = ", r[n], " is out of range for a mask of ",
                  b.size(0), " rows");
    P.bias = b.data_ptr();
    P.bias_sN = b.stride(0);
    P.bias_sL = b.stride(1);
    P.bias_sS = b.stride(2);
    P.rows = rows->data_ptr<int64_t>();
  }
  P.dropout = dropout_p > 0;
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1,
              "sdpa: dropout_p must be in [0, 1) here (the op layer handles p >= 1, p < 0 and NaN), got ", dropout_p);
  P.seed = static_cast<uint32_t>(seed);
  P.threshold = static_cast<uint32_t>(dropout_p * 4294967296.0);  // floor, as the reference
  P.inv_keep = P.dropout ? 1.0 / (1.0 - dropout_p) : 1.0;
  P.scale = scale;
  return P;
}

std::vector<at::Tensor> sdpa_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const c10::optional<at::Tensor>& bias,
                                     const c10::optional<at::Tensor>& rows, double scale, bool causal,
                                     double dropout_p, int64_t seed, int64_t block_l, int64_t block_s) {
  const Problem P = make_problem(q, k, v, bias, rows, scale, causal, dropout_p, seed, block_l, block_s);
  at::Tensor out = at::empty({P.N, P.L, P.Ev}, q.options());
  at::Tensor lse = at::empty({P.N, P.L}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fastrnn_sdpa_forward", [&] {
    forward_impl<scalar_t>(P, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                           out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>());
  });
  return {out, lse};
}

std::vector<at::Tensor> sdpa_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                      const c10::optional<at::Tensor>& bias,
                                      const c10::optional<at::Tensor>& rows, double scale, bool causal,
                                      double dropout_p, int64_t seed, int64_t block_l, int64_t block_s) {
  const Problem P = make_problem(q, k, v, bias, rows, scale, causal, dropout_p, seed, block_l, block_s);
  TORCH_CHECK(grad_out.is_contiguous() && out.is_contiguous() && lse.is_contiguous(),
              "sdpa: grad_out, out, lse must be contiguous");
  TORCH_CHECK(grad_out.device().is_cpu() && out.device().is_cpu() && lse.device().is_cpu(),
              "sdpa: grad_out, out, lse must be on the CPU");
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type() &&
                  lse.scalar_type() == q.scalar_type(),
              "sdpa: grad_out, out, lse must have q's dtype");
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.size(0) == P.N && out.size(1) == P.L &&
                  out.size(2) == P.Ev && lse.numel() == P.N * P.L,
              "sdpa: grad_out / out / lse shapes");
  // every element is written by backward_impl (zeroing here would add parallel regions)
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fastrnn_sdpa_backward", [&] {
    backward_impl<scalar_t>(P, grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                            v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                            dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The kernels run without the GIL (arguments are converted before, results after).
  m.doc() = "fastrnn flash attention on CPU (contract: fastrnn/backends/reference_sdpa.py)";
  m.attr("blas") = fastrnn::gemm_engine();
  m.def("sdpa_forward", &sdpa_forward, "-> [out [N, L, Ev], lse [N, L]]", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("bias"), py::arg("rows"), py::arg("scale"), py::arg("causal"),
        py::arg("dropout_p"), py::arg("seed"), py::arg("block_l"), py::arg("block_s"),
        py::call_guard<py::gil_scoped_release>());
  m.def("sdpa_backward", &sdpa_backward, "-> [grad_q, grad_k, grad_v]", py::arg("grad_out"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("bias"),
        py::arg("rows"), py::arg("scale"), py::arg("causal"), py::arg("dropout_p"), py::arg("seed"),
        py::arg("block_l"), py::arg("block_s"), py::call_guard<py::gil_scoped_release>());
}
