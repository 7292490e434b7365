// fastrnn C++ backend: the fused attention decoder (Luong global attention with input feeding),
// the whole teacher-forced time loop, forward and backward.
//
// Contract and equations: fastrnn/backends/reference_decoder.py (the plain-PyTorch specification;
// its docstring has every argument and the forward and backward equations followed below).
// Shape letters: T steps, B batch, S memory steps, M memory width, H hidden, G = 4H (LSTM i,f,g,o)
// | 3H (GRU r,z,n), L layers.
//
// Layout. Every tensor is dense row-major (the Python wrapper makes them contiguous; the entry
// points check it). Per step a block of batch rows [b0, b1) is a contiguous [n, X] slice of every
// [.., B, X] tensor (xw[t], out[t], h_n[l], saved gates[t, l], ...), so the step GEMMs read and
// write the outputs in place. Per batch row, keys[b] [S, H], memory[b] [S, M], mask[b] [S].
// Weights are packed once per call into column panels (csrc/gemm.h PackedB):
//   forward  B = W^T:  W_feed^T [H, G], W_in[l]^T [H, G], W_hh[l]^T [H, G], W_q^T [H, H],
//                      W_c^T split into its ctx rows [M, H] and its h rows [H, H] (two GEMMs
//                      instead of concatenating [ctx; h]);
//   backward B = W:    W_c[:, :M] [H, M], W_c[:, M:] [H, H], W_q [H, H], W_hh[l] [G, H],
//                      W_in[l] [G, H], W_feed [G, H] (the input-gradient products), plus W_q^T
//                      for the additive score's recomputed query.
//
// Saved vs recomputed (the same as the reference): saved = gates [T, L, B, 4H] (LSTM activated
// i,f,g,o; GRU activated r,z,n and hn = W_hn h + b_hn), cells [T, L, B, H] (LSTM; GRU [0]),
// hs [T, L, B, H], ctx [T, B, M]. The additive score's q = W_q h + b_q and u = tanh(q + keys_s)
// [S, H] per row are recomputed in backward (u is S times bigger than anything else per step).
//
// Threading. Batch rows are independent (weights shared, read-only), so the batch is split into
// one block of rows per thread and each task runs the *whole* time loop for its rows: no barrier
// per step. Below kMinParallelWork multiply-adds a call everything runs in one task. Each task owns
// its scratch (allocated once), its rows of every output, and its partial grad_v [H] (in double; summed in
// block order at the end). Blocks depend on the thread count, so results with 1 and 2 threads
// may differ in grad_v's summation order (and nowhere else in practice).
//
// Per step and task (n rows): layer 0 gates = xw[t] + feed W_feed^T + h W_hh^T (GEMMs on the n
// rows; b_hh added in the gate math), fused gate math, layers 1.. with W_in; then for the top h:
// (additive) q = h W_q^T + b_q as a GEMM, per row the scores over S keys, the masked softmax (a
// row with no unmasked key gets a = 0, ctx = 0), ctx = a memory, and out = tanh(W_c [ctx; h]) as
// two GEMMs over the n rows. Backward runs the same in reverse (see decoder_backward_task).
//
// FLOPs per step at the benchmark shape (B=32, S=50, H=M=256, G=4H LSTM, L=1, feeding on), per
// batch row: W_feed 2HG = 0.52M, W_hh 2HG = 0.52M, W_c 2(M+H)H = 0.26M, additive W_q 2H^2 = 0.13M,
// scores 2SH = 26k (+ S*H = 12.8k tanh, additive), context 2SM = 26k: ~1.5 MFLOP a row, ~48 MFLOP
// a step, ~2.4 GFLOP for T=50 (GRU: 3/4 of the gate GEMMs, ~1.9 GFLOP). Backward: the same
// products transposed (W_c, W_q, W_hh, W_feed input gradients) plus the recomputed q and u and
// the attention's backward: ~2.5 GFLOP. At ~200 GFLOP/s a core: ~12 ms each, one core.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstring>
#include <vector>

#include "gemm.h"
#include "vec_math.h"

namespace fastrnn {
namespace {

using at::Tensor;
using vm::sigmoid;
using vm::tanh;
using vm::d_sigmoid;
using vm::d_tanh;
using vm::lane_sum;
using OptT = c10::optional<Tensor>;

constexpr int64_t kLSTM = 0, kGRU = 1;
constexpr int64_t kPanel = 256;                    // packed panel width (brgemm's sweet spot)
constexpr int64_t kMinParallelWork = 1 << 22;      // multiply-adds per call below which one task runs

bool has(const OptT& t) { return t.has_value() && t->defined(); }

template <typename T>
const T* cptr(const OptT& t) {
  return has(t) ? t->data_ptr<T>() : nullptr;
}

// C[rows, N] (+)= A[rows, K] B on the calling thread (the tasks already are the parallelism).
template <typename T>
void task_gemm(int64_t rows, const T* A, int64_t lda, const PackedB<T>& B, T* C, int64_t ldc, bool add) {
  for (int64_t p = 0; p < B.panels(); ++p)
    gemm_block<T>(rows, B.width(p), B.K, A, lda, B.panel(p), B.width(p), C + p * B.NB, ldc, add);
}

// A weight every step multiplies by: C[n, N] (+)= A[n, K] op(W), op(W) = W^T for W [N, K]
// (`trans`, the forward products) or W for W [K, N] (the backward ones); ld = W's row stride.
// Packed into brgemm panels once per call when the call has at least kPackRowSteps rows x steps
// (csrc/gemm.h), else read in place.

template <typename T>
struct StepWeight {
  PackedB<T> packed;
  const T* w = nullptr;
  int64_t N = 0, K = 0, ld = 0;
  bool trans = false, pack = false;

  StepWeight() = default;
  StepWeight(const T* w_, int64_t N_, int64_t K_, int64_t ld_, bool trans_, bool pack_, const at::TensorOptions& o)
      : w(w_), N(N_), K(K_), ld(ld_), trans(trans_), pack(pack_) {
    if (!pack) return;
    packed = trans ? PackedB<T>(K, N, kPanel, o, [w = w_, ld = ld_](int64_t k, int64_t n) { return w[n * ld + k]; })
                   : PackedB<T>::rows(w_, K, N, ld_, kPanel, o);
  }
  void apply(int64_t n, const T* A, int64_t lda, T* C, int64_t ldc, bool add) const {
    if (pack) return task_gemm<T>(n, A, lda, packed, C, ldc, add);
    if (trans) return dot_rows<T>(n, N, K, A, lda, w, ld, C, ldc, add);
    gemm_call<T>(n, N, K, A, lda, w, ld, C, ldc, add);  // W [K, N] row-major as it is (M = 1: gemv)
  }
};

// Each of the n rows of dst [n, N] = src [N] (a bias broadcast before a GEMM adds onto it).
template <typename T>
void fill_rows(T* dst, const T* src, int64_t n, int64_t N) {
  for (int64_t r = 0; r < n; ++r) std::memcpy(dst + r * N, src, sizeof(T) * N);
}



// ---------------------------------------------------------------------------------------------
// Cell gate math, one row of H units; forward and backward of each cell side by side.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Lstm {
  // a [4H] = gi + W_hh h (b_hh not yet added); c [H] c_prev in, c_t out; h [H] out;
  // gates [4H] activated i, f, g, o out.
  static FASTRNN_CLONES void forward(const T* __restrict a, const T* __restrict bh, T* __restrict c,
                                     T* __restrict h, T* __restrict gates, int64_t H) {
    FASTRNN_IVDEP
    for (int64_t j = 0; j < H; ++j) {
      const T i = sigmoid(a[j] + bh[j]), f = sigmoid(a[H + j] + bh[H + j]);
      const T g = tanh(a[2 * H + j] + bh[2 * H + j]), o = sigmoid(a[3 * H + j] + bh[3 * H + j]);
      const T cn = f * c[j] + i * g;
      c[j] = cn;
      h[j] = o * tanh(cn);
      gates[j] = i, gates[H + j] = f, gates[2 * H + j] = g, gates[3 * H + j] = o;
    }
  }
  // dh_rec [H] + din [H] = dh_l; gates [4H] saved; c [H] = c_t, c_prev [H]; dc [H] dc_rec in,
  // dc_rec (= dc f) out; d [4H] out (grad_gi = grad_gh).
  static FASTRNN_CLONES void backward(const T* __restrict dh_rec, const T* __restrict din,
                                      const T* __restrict gates, const T* __restrict c,
                                      const T* __restrict c_prev, T* __restrict dc, T* __restrict d, int64_t H) {
    FASTRNN_IVDEP
    for (int64_t j = 0; j < H; ++j) {
      const T i = gates[j], f = gates[H + j], g = gates[2 * H + j], o = gates[3 * H + j];
      const T dh = dh_rec[j] + din[j];
      const T tc = tanh(c[j]);
      const T dcj = dc[j] + dh * o * d_tanh(tc);
      d[j] = dcj * g * d_sigmoid(i);
      d[H + j] = dcj * c_prev[j] * d_sigmoid(f);
      d[2 * H + j] = dcj * i * d_tanh(g);
      d[3 * H + j] = dh * tc * d_sigmoid(o);
      dc[j] = dcj * f;
    }
  }
};

template <typename T>
struct Gru {
  // gi [3H] input side, gh [3H] = W_hh h (b_hh not yet added); h [H] h_prev in, h_t out;
  // gates [4H] r, z, n, hn out.
  static FASTRNN_CLONES void forward(const T* __restrict gi, const T* __restrict gh, const T* __restrict bh,
                                     T* __restrict h, T* __restrict gates, int64_t H) {
    FASTRNN_IVDEP
    for (int64_t j = 0; j < H; ++j) {
      const T r = sigmoid(gi[j] + gh[j] + bh[j]);
      const T z = sigmoid(gi[H + j] + gh[H + j] + bh[H + j]);
      const T hn = gh[2 * H + j] + bh[2 * H + j];
      const T nn = tanh(gi[2 * H + j] + r * hn);
      h[j] = (T(1) - z) * nn + z * h[j];
      gates[j] = r, gates[H + j] = z, gates[2 * H + j] = nn, gates[3 * H + j] = hn;
    }
  }
  // dh_rec [H] in (dh_l z out, the GEMM then adds grad_gh W_hh), din [H], gates [4H] saved,
  // h_prev [H]; dgi, dgh [3H] out.
  static FASTRNN_CLONES void backward(T* __restrict dh_rec, const T* __restrict din, const T* __restrict gates,
                                      const T* __restrict h_prev, T* __restrict dgi, T* __restrict dgh,
                                      int64_t H) {
    FASTRNN_IVDEP
    for (int64_t j = 0; j < H; ++j) {
      const T r = gates[j], z = gates[H + j], nn = gates[2 * H + j], hn = gates[3 * H + j];
      const T dh = dh_rec[j] + din[j];
      const T dn = dh * (T(1) - z) * d_tanh(nn);
      const T dz = dh * (h_prev[j] - nn) * d_sigmoid(z);
      const T dr = dn * hn * d_sigmoid(r);
      dgi[j] = dr, dgi[H + j] = dz, dgi[2 * H + j] = dn;
      dgh[j] = dr, dgh[H + j] = dz, dgh[2 * H + j] = dn * r;
      dh_rec[j] = dh * z;
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Attention of one batch row.
// ---------------------------------------------------------------------------------------------
// e [S] = h . keys_s (bilinear) or v . tanh(q + keys_s) (additive: q given, v non-null).
template <typename T>
FASTRNN_CLONES void scores_row(const T* __restrict hq, const T* __restrict keys, const T* __restrict v,
                               T* __restrict e, int64_t S, int64_t H) {
  for (int64_t s = 0; s < S; ++s) {
    const T* __restrict k = keys + s * H;
    e[s] = v ? lane_sum<T>(H, [&](int64_t j) { return v[j] * tanh(hq[j] + k[j]); })
             : lane_sum<T>(H, [&](int64_t j) { return hq[j] * k[j]; });
  }
}

// a [S] = masked softmax of e (mask null: all attend; a row with nothing unmasked: zeros, as the
// reference's rule), then ctx [M] = sum_s a_s memory_s.
template <typename T>
FASTRNN_CLONES void softmax_context_row(const T* __restrict e, const bool* __restrict mask,
                                        const T* __restrict memory, T* __restrict a, T* __restrict ctx,
                                        int64_t S, int64_t M) {
  const T ninf = -std::numeric_limits<T>::infinity();
  T mx = ninf;
  for (int64_t s = 0; s < S; ++s)
    if (!mask || mask[s]) mx = std::max(mx, e[s]);
  const T sub = std::isfinite(mx) ? mx : T(0);  // as the reference: subtract only a finite max
  T total = 0;
  for (int64_t s = 0; s < S; ++s) {
    const T w = (!mask || mask[s]) ? vm::exp(e[s] - sub) : T(0);
    a[s] = w;
    total += w;
  }
  const T inv = T(1) / (total > 0 ? total : T(1));
  for (int64_t s = 0; s < S; ++s) a[s] *= inv;
  std::fill(ctx, ctx + M, T(0));
  for (int64_t s = 0; s < S; ++s) {
    const T as = a[s];
    const T* __restrict m = memory + s * M;
    FASTRNN_IVDEP
    for (int64_t k = 0; k < M; ++k) ctx[k] += as * m[k];
  }
}

// Backward of one row's attention. dctx [M] in; a [S], grad_attn [S]; gm [S, M] grad_memory
// (+=); da [S] scratch. Bilinear (v null): dh [H] += sum_s de_s keys_s, gk [S, H] += de_s h.
// Additive: u_s = tanh(q + keys_s) recomputed, gv [H] = sum_s de_s u_s (this row's share, written:
// the caller sums the T*B shares in double), dp = de_s v (1 - u_s^2), gk += dp, dq [H] = sum_s dp
// (written).
template <typename T>
FASTRNN_CLONES void attention_backward_row(const T* __restrict dctx, const T* __restrict a,
                                           const T* __restrict gattn, const T* __restrict memory,
                                           const T* __restrict keys, const T* __restrict hq,
                                           const T* __restrict v, T* __restrict gm, T* __restrict gk,
                                           T* __restrict dh, T* __restrict gv, T* __restrict dq,
                                           T* __restrict da, int64_t S, int64_t M, int64_t H) {
  T dot = 0;
  for (int64_t s = 0; s < S; ++s) {
    const T as = a[s];
    const T* __restrict m = memory + s * M;
    T* __restrict g = gm + s * M;
    FASTRNN_IVDEP
    for (int64_t k = 0; k < M; ++k) g[k] += as * dctx[k];
    da[s] = lane_sum<T>(M, [&](int64_t k) { return dctx[k] * m[k]; }) + gattn[s];
    dot += as * da[s];
  }
  if (v) std::fill(dq, dq + H, T(0)), std::fill(gv, gv + H, T(0));
  for (int64_t s = 0; s < S; ++s) {
    const T de = a[s] * (da[s] - dot);
    const T* __restrict k = keys + s * H;
    T* __restrict g = gk + s * H;
    if (v) {
      FASTRNN_IVDEP
      for (int64_t j = 0; j < H; ++j) {
        const T u = tanh(hq[j] + k[j]);
        gv[j] += de * u;
        const T dp = de * v[j] * d_tanh(u);
        dq[j] += dp;
        g[j] += dp;
      }
    } else {
      FASTRNN_IVDEP
      for (int64_t j = 0; j < H; ++j) {
        dh[j] += de * k[j];
        g[j] += de * hq[j];
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Arguments: raw pointers into the checked tensors and the dimensions.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Args {
  int64_t cell, T_, B, S, M, H, L, G;
  const T *xw, *keys, *memory, *h0, *c0, *feed0, *drop;
  const bool* mask;
  const T *w_feed, *w_in, *b_in, *w_hh, *b_hh, *w_q, *b_q, *v, *w_c;
  int64_t ld_feed;  // w_feed's row stride (>= H: the module passes a column slice of weight_ih_l0)
};

// Row blocks: one per thread, or one in all for a small problem (the tasks start once per call,
// so the threshold is on the whole call's work). Returns the block size.
int64_t block_rows(int64_t T, int64_t B, int64_t work_per_row_step) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || B <= 1 || T * B * work_per_row_step < kMinParallelWork) return B;
  const int64_t nblk = std::min<int64_t>(threads, B);
  return (B + nblk - 1) / nblk;
}

// Runs body(blk, b0, b1) over row blocks of `rows` rows, each block a task.
template <typename F>
void over_blocks(int64_t B, int64_t rows, const F& body) {
  const int64_t nblk = (B + rows - 1) / rows;
  auto run = [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) body(k, k * rows, std::min(B, (k + 1) * rows));
    release_gemm();  // brgemm's per-thread kernel state
  };
  if (nblk == 1) run(0, 1);
  else at::parallel_for(0, nblk, 1, run);
}

int64_t work_per_row_step(int64_t G, int64_t H, int64_t M, int64_t S, int64_t L, bool additive) {
  return L * 2 * G * H + (M + H) * H + (additive ? H * H : 0) + S * (H + M);
}

template <typename T>
struct FwdWeights {
  StepWeight<T> feed, q, c_ctx, c_h;
  std::vector<StepWeight<T>> in, hh;  // in: layers 1..L-1

  FwdWeights(const Args<T>& a, const at::TensorOptions& o) {
    const int64_t G = a.G, H = a.H, M = a.M;
    const bool pack = a.T_ * a.B >= kPackRowSteps;
    if (a.w_feed) feed = StepWeight<T>(a.w_feed, G, H, a.ld_feed, true, pack, o);
    for (int64_t l = 0; l < a.L; ++l) hh.emplace_back(a.w_hh + l * G * H, G, H, H, true, pack, o);
    for (int64_t l = 0; l + 1 < a.L; ++l) in.emplace_back(a.w_in + l * G * H, G, H, H, true, pack, o);
    if (a.v) q = StepWeight<T>(a.w_q, H, H, H, true, pack, o);
    // W_c [H, M + H]: its columns [0, M) multiply ctx, [M, M + H) multiply h (no concatenation)
    c_ctx = StepWeight<T>(a.w_c, H, M, M + H, true, pack, o);
    c_h = StepWeight<T>(a.w_c + M, H, H, M + H, true, pack, o);
  }
};

template <typename T>
std::vector<Tensor> forward_impl(const Args<T>& a, bool training, const at::TensorOptions& opts) {
  const int64_t T_ = a.T_, B = a.B, S = a.S, M = a.M, H = a.H, L = a.L, G = a.G;
  const bool lstm = a.cell == kLSTM;
  Tensor out = at::empty({T_, B, H}, opts), attn = at::empty({T_, B, S}, opts);
  Tensor h_n = at::empty({L, B, H}, opts), c_n = lstm ? at::empty({L, B, H}, opts) : Tensor();
  Tensor gates, cells, hs, ctx;
  if (training) {
    gates = at::empty({T_, L, B, 4 * H}, opts);
    cells = lstm ? at::empty({T_, L, B, H}, opts) : at::empty({0}, opts);
    hs = at::empty({T_, L, B, H}, opts);
    ctx = at::empty({T_, B, M}, opts);
  }
  const FwdWeights<T> w(a, opts);  // packed once per call (threaded over panels, before the row tasks)

  T* po = out.data_ptr<T>();
  T* pa = attn.data_ptr<T>();
  T* phn = h_n.data_ptr<T>();
  T* pcn = lstm ? c_n.data_ptr<T>() : nullptr;
  T* pg = training ? gates.data_ptr<T>() : nullptr;
  T* pc = training && lstm ? cells.data_ptr<T>() : nullptr;
  T* phs = training ? hs.data_ptr<T>() : nullptr;
  T* pctx = training ? ctx.data_ptr<T>() : nullptr;
  std::memcpy(phn, a.h0, sizeof(T) * L * B * H);
  if (lstm) std::memcpy(pcn, a.c0, sizeof(T) * L * B * H);

  const int64_t rows = block_rows(T_, B, work_per_row_step(G, H, M, S, L, a.v != nullptr));
  over_blocks(B, rows, [&](int64_t, int64_t b0, int64_t b1) {
    const int64_t n = b1 - b0;
    // task scratch: gate pre-activations (gi; GRU also gh), the layer input, q, scores, and the
    // gates / context when not saving them
    std::vector<T> gi(n * G), gh(lstm ? 0 : n * G), in(L > 1 ? n * H : 0), q(a.v ? n * H : 0), e(S),
        gscr(training ? 0 : n * 4 * H), cscr(training ? 0 : n * M);
    for (int64_t t = 0; t < T_; ++t) {
      for (int64_t l = 0; l < L; ++l) {
        T* h = phn + (l * B + b0) * H;  // [n, H] h_{l,t-1} in, h_{l,t} out
        T* c = lstm ? pcn + (l * B + b0) * H : nullptr;
        if (l == 0) {
          std::memcpy(gi.data(), a.xw + (t * B + b0) * G, sizeof(T) * n * G);
          if (a.w_feed) {
            const T* feed = t == 0 ? a.feed0 + b0 * H : po + ((t - 1) * B + b0) * H;
            w.feed.apply(n, feed, H, gi.data(), G, true);
          }
        } else {
          fill_rows(gi.data(), a.b_in + (l - 1) * G, n, G);
          const T* below = phn + ((l - 1) * B + b0) * H;
          if (a.drop) {
            const T* dr = a.drop + ((t * (L - 1) + l - 1) * B + b0) * H;
            for (int64_t k = 0; k < n * H; ++k) in[k] = below[k] * dr[k];
            below = in.data();
          }
          w.in[l - 1].apply(n, below, H, gi.data(), G, true);
        }
        T* gsave = training ? pg + ((t * L + l) * B + b0) * 4 * H : gscr.data();
        const T* bh = a.b_hh + l * G;
        if (lstm) {
          w.hh[l].apply(n, h, H, gi.data(), G, true);
          for (int64_t r = 0; r < n; ++r)
            Lstm<T>::forward(gi.data() + r * G, bh, c + r * H, h + r * H, gsave + r * 4 * H, H);
        } else {
          w.hh[l].apply(n, h, H, gh.data(), G, false);
          for (int64_t r = 0; r < n; ++r)
            Gru<T>::forward(gi.data() + r * G, gh.data() + r * G, bh, h + r * H, gsave + r * 4 * H, H);
        }
        if (training) {
          std::memcpy(phs + ((t * L + l) * B + b0) * H, h, sizeof(T) * n * H);
          if (lstm) std::memcpy(pc + ((t * L + l) * B + b0) * H, c, sizeof(T) * n * H);
        }
      }
      // attention of the top state
      const T* top = phn + ((L - 1) * B + b0) * H;
      if (a.v) {
        fill_rows(q.data(), a.b_q, n, H);
        w.q.apply(n, top, H, q.data(), H, true);
      }
      T* cx = training ? pctx + (t * B + b0) * M : cscr.data();
      for (int64_t r = 0; r < n; ++r) {
        const int64_t b = b0 + r;
        scores_row<T>(a.v ? q.data() + r * H : top + r * H, a.keys + b * S * H, a.v, e.data(), S, H);
        softmax_context_row<T>(e.data(), a.mask ? a.mask + b * S : nullptr, a.memory + b * S * M,
                               pa + (t * B + b) * S, cx + r * M, S, M);
      }
      // out_t = tanh(ctx W_c[:, :M]^T + h W_c[:, M:]^T), written in place into out[t]
      T* o = po + (t * B + b0) * H;
      w.c_ctx.apply(n, cx, M, o, H, false);
      w.c_h.apply(n, top, H, o, H, true);
      for (int64_t k = 0; k < n * H; ++k) o[k] = tanh(o[k]);
    }
  });
  return {out, attn, h_n, c_n, gates, cells, hs, ctx};
}

template <typename T>
struct BwdWeights {
  StepWeight<T> feed, q, qt, c_ctx, c_h;
  std::vector<StepWeight<T>> in, hh;

  BwdWeights(const Args<T>& a, const at::TensorOptions& o) {
    const int64_t G = a.G, H = a.H, M = a.M;
    const bool pack = a.T_ * a.B >= kPackRowSteps;
    if (a.w_feed) feed = StepWeight<T>(a.w_feed, H, G, a.ld_feed, false, pack, o);
    for (int64_t l = 0; l < a.L; ++l) hh.emplace_back(a.w_hh + l * G * H, H, G, H, false, pack, o);
    for (int64_t l = 0; l + 1 < a.L; ++l) in.emplace_back(a.w_in + l * G * H, H, G, H, false, pack, o);
    if (a.v) {
      q = StepWeight<T>(a.w_q, H, H, H, false, pack, o);
      qt = StepWeight<T>(a.w_q, H, H, H, true, pack, o);  // the recomputed query
    }
    c_ctx = StepWeight<T>(a.w_c, M, H, M + H, false, pack, o);
    c_h = StepWeight<T>(a.w_c + M, H, H, M + H, false, pack, o);
  }
};

template <typename T>
std::vector<Tensor> backward_impl(const Args<T>& a, const T* grad_out, const T* grad_attn, const T* grad_h_n,
                                  const T* grad_c_n, const T* out, const T* attn, const T* sg, const T* scells,
                                  const T* shs, const T* sctx, const at::TensorOptions& opts) {
  const int64_t T_ = a.T_, B = a.B, S = a.S, M = a.M, H = a.H, L = a.L, G = a.G;
  const bool lstm = a.cell == kLSTM;
  (void)sctx;  // the weight gradient of W_c is the op layer's
  Tensor grad_gi = at::empty({T_, L, B, G}, opts);
  Tensor grad_gh = lstm ? grad_gi : at::empty({T_, L, B, G}, opts);
  Tensor grad_opre = at::empty({T_, B, H}, opts);
  Tensor grad_q = a.v ? at::empty({T_, B, H}, opts) : Tensor();
  Tensor grad_keys = at::zeros({B, S, H}, opts), grad_memory = at::zeros({B, S, M}, opts);
  Tensor grad_h0 = at::empty({L, B, H}, opts), grad_c0 = lstm ? at::empty({L, B, H}, opts) : Tensor();
  Tensor grad_feed0 = at::zeros({B, H}, opts);

  const BwdWeights<T> w(a, opts);

  T* pgi = grad_gi.data_ptr<T>();
  T* pgh = grad_gh.data_ptr<T>();
  T* pop = grad_opre.data_ptr<T>();
  T* pq = a.v ? grad_q.data_ptr<T>() : nullptr;
  T* pk = grad_keys.data_ptr<T>();
  T* pm = grad_memory.data_ptr<T>();
  T* ph0 = grad_h0.data_ptr<T>();  // dh_rec while running
  T* pc0 = lstm ? grad_c0.data_ptr<T>() : nullptr;  // dc_rec while running
  T* pf0 = grad_feed0.data_ptr<T>();  // dfeed while running
  std::memcpy(ph0, grad_h_n, sizeof(T) * L * B * H);
  if (lstm) std::memcpy(pc0, grad_c_n, sizeof(T) * L * B * H);

  const int64_t rows = block_rows(T_, B, work_per_row_step(G, H, M, S, L, a.v != nullptr));
  const int64_t nblk = (B + rows - 1) / rows;
  // per-block grad_v, summed in double: float32 running sums over T*B*S terms would lose digits
  std::vector<double> gv_parts(a.v ? nblk * H : 0, 0.0);

  over_blocks(B, rows, [&](int64_t blk, int64_t b0, int64_t b1) {
    const int64_t n = b1 - b0;
    std::vector<T> dctx(n * M), dh(n * H), din(n * H), q(a.v ? n * H : 0), da(S), gv(a.v ? H : 0);
    double* gv_acc = a.v ? gv_parts.data() + blk * H : nullptr;
    T* dfeed = pf0 + b0 * H;  // [n, H]
    for (int64_t t = T_ - 1; t >= 0; --t) {
      // attentional output: dopre = (grad_out + dfeed) (1 - out^2)  -> grad_opre[t]
      T* dopre = pop + (t * B + b0) * H;
      {
        const T* go = grad_out + (t * B + b0) * H;
        const T* ot = out + (t * B + b0) * H;
        for (int64_t k = 0; k < n * H; ++k) dopre[k] = (go[k] + dfeed[k]) * d_tanh(ot[k]);
      }
      // [dctx; dh] = dopre W_c
      w.c_ctx.apply(n, dopre, H, dctx.data(), M, false);
      w.c_h.apply(n, dopre, H, dh.data(), H, false);
      const T* top = shs + ((t * L + L - 1) * B + b0) * H;
      T* dq = a.v ? pq + (t * B + b0) * H : nullptr;
      if (a.v) {  // recompute q = W_q h + b_q
        fill_rows(q.data(), a.b_q, n, H);
        w.qt.apply(n, top, H, q.data(), H, true);
      }
      for (int64_t r = 0; r < n; ++r) {
        const int64_t b = b0 + r;
        attention_backward_row<T>(dctx.data() + r * M, attn + (t * B + b) * S, grad_attn + (t * B + b) * S,
                                  a.memory + b * S * M, a.keys + b * S * H, a.v ? q.data() + r * H : top + r * H,
                                  a.v, pm + b * S * M, pk + b * S * H, dh.data() + r * H, gv.data(),
                                  a.v ? dq + r * H : nullptr, da.data(), S, M, H);
        if (a.v)
          for (int64_t j = 0; j < H; ++j) gv_acc[j] += gv[j];
      }
      if (a.v) w.q.apply(n, dq, H, dh.data(), H, true);  // dh += dq W_q
      // the layers, top down; din = the gradient arriving from above (the attention at the top)
      const T* dabove = dh.data();
      for (int64_t l = L - 1; l >= 0; --l) {
        T* dh_rec = ph0 + (l * B + b0) * H;
        const T* g = sg + ((t * L + l) * B + b0) * 4 * H;
        T* dgi = pgi + ((t * L + l) * B + b0) * G;
        if (lstm) {
          T* dc = pc0 + (l * B + b0) * H;
          const T* c = scells + ((t * L + l) * B + b0) * H;
          const T* c_prev = t > 0 ? scells + (((t - 1) * L + l) * B + b0) * H : a.c0 + (l * B + b0) * H;
          for (int64_t r = 0; r < n; ++r)
            Lstm<T>::backward(dh_rec + r * H, dabove + r * H, g + r * 4 * H, c + r * H, c_prev + r * H, dc + r * H,
                              dgi + r * G, H);
          w.hh[l].apply(n, dgi, G, dh_rec, H, false);  // dh_rec = grad_gh W_hh
        } else {
          T* dgh = pgh + ((t * L + l) * B + b0) * G;
          const T* h_prev = t > 0 ? shs + (((t - 1) * L + l) * B + b0) * H : a.h0 + (l * B + b0) * H;
          for (int64_t r = 0; r < n; ++r)
            Gru<T>::backward(dh_rec + r * H, dabove + r * H, g + r * 4 * H, h_prev + r * H, dgi + r * G,
                             dgh + r * G, H);
          w.hh[l].apply(n, dgh, G, dh_rec, H, true);  // dh_rec = dh z + grad_gh W_hh
        }
        if (l > 0) {  // din = (grad_gi W_in[l-1]) * drop[t, l-1]
          w.in[l - 1].apply(n, dgi, G, din.data(), H, false);
          if (a.drop) {
            const T* dr = a.drop + ((t * (L - 1) + l - 1) * B + b0) * H;
            for (int64_t k = 0; k < n * H; ++k) din[k] *= dr[k];
          }
          dabove = din.data();
        }
      }
      // dfeed = grad_gi[t, 0] W_feed (stays 0 without input feeding)
      if (a.w_feed) w.feed.apply(n, pgi + (t * L * B + b0) * G, G, dfeed, H, false);
    }
  });

  Tensor grad_v;
  if (a.v) {
    grad_v = at::empty({H}, opts);
    T* pv = grad_v.data_ptr<T>();
    for (int64_t j = 0; j < H; ++j) {
      double sum = 0;
      for (int64_t k = 0; k < nblk; ++k) sum += gv_parts[k * H + j];
      pv[j] = T(sum);
    }
  }
  return {grad_gi, grad_gh, grad_opre, grad_q, grad_v, grad_keys, grad_memory, grad_h0, grad_c0, grad_feed0};
}

// ---------------------------------------------------------------------------------------------
// Entry-point checks: every size, dtype, device and layout the loops rely on (they index raw
// pointers), so that a direct call of the extension with bad tensors raises instead of reading
// or writing out of bounds. The Python layer checks the same first (fastrnn/contract/decoder.py).
// ---------------------------------------------------------------------------------------------
void need(const Tensor& t, at::IntArrayRef shape, const char* name, at::ScalarType dtype) {
  TORCH_CHECK(t.defined(), "fastrnn cpp decoder: ", name, " is missing");
  TORCH_CHECK(t.device().is_cpu(), "fastrnn cpp decoder: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "fastrnn cpp decoder: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "fastrnn cpp decoder: ", name, " has shape ", t.sizes(), ", expected ", shape);
  TORCH_CHECK(t.is_contiguous(), "fastrnn cpp decoder: ", name, " must be contiguous");
}

void need_opt(const OptT& t, at::IntArrayRef shape, const char* name, at::ScalarType dtype) {
  if (has(t)) need(*t, shape, name, dtype);
}

// A matrix whose rows may be strided (w_feed: a column slice of weight_ih_l0): unit stride along a
// row, rows at least a row apart (no overlap; a view's elements all lie in its storage).
void need_rows(const OptT& t, at::IntArrayRef shape, const char* name, at::ScalarType dtype) {
  if (!has(t)) return;
  TORCH_CHECK(t->device().is_cpu(), "fastrnn cpp decoder: ", name, " must be a CPU tensor");
  TORCH_CHECK(t->scalar_type() == dtype, "fastrnn cpp decoder: ", name, " must be ", dtype, ", got ",
              t->scalar_type());
  TORCH_CHECK(t->sizes() == shape && t->stride(1) == 1 && t->stride(0) >= shape[1],
              "fastrnn cpp decoder: ", name, " must be [", shape[0], ", ", shape[1],
              "] with unit column stride and row stride >= ", shape[1], ", got sizes ", t->sizes(), " strides ",
              t->strides());
}

struct Dims {
  int64_t T, B, S, M, H, L, G;
};

Dims check_forward_args(int64_t cell, const Tensor& xw, const Tensor& keys, const Tensor& memory, const OptT& mask,
                        const OptT& w_feed, const Tensor& w_in, const Tensor& b_in, const Tensor& w_hh,
                        const Tensor& b_hh, const OptT& w_q, const OptT& b_q, const OptT& v, const Tensor& w_c,
                        const Tensor& h0, const OptT& c0, const Tensor& feed0, const OptT& drop) {
  TORCH_CHECK(cell == kLSTM || cell == kGRU, "fastrnn cpp decoder: unknown cell code ", cell, " (0 LSTM, 1 GRU)");
  TORCH_CHECK(xw.defined() && xw.dim() == 3, "fastrnn cpp decoder: xw must be 3-D [T, B, G]");
  TORCH_CHECK(h0.defined() && h0.dim() == 3, "fastrnn cpp decoder: h0 must be 3-D [L, B, H]");
  TORCH_CHECK(memory.defined() && memory.dim() == 3, "fastrnn cpp decoder: memory must be 3-D [B, S, M]");
  const auto dt = xw.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "fastrnn cpp decoder: float32 or float64 only, got ", dt);
  Dims d;
  d.T = xw.size(0), d.B = xw.size(1), d.L = h0.size(0), d.H = h0.size(2), d.S = memory.size(1),
  d.M = memory.size(2), d.G = (cell == kLSTM ? 4 : 3) * d.H;
  TORCH_CHECK(std::min({d.T, d.B, d.S, d.M, d.H, d.L}) >= 1, "fastrnn cpp decoder: T, B, S, M, H, L must be >= 1");
  need(xw, {d.T, d.B, d.G}, "xw", dt);
  need(h0, {d.L, d.B, d.H}, "h0", dt);
  need(memory, {d.B, d.S, d.M}, "memory", dt);
  need(keys, {d.B, d.S, d.H}, "keys", dt);
  need(feed0, {d.B, d.H}, "feed0", dt);
  TORCH_CHECK(has(c0) == (cell == kLSTM), "fastrnn cpp decoder: c0 must be given for LSTM and None for GRU");
  need_opt(c0, {d.L, d.B, d.H}, "c0", dt);
  need_opt(mask, {d.B, d.S}, "mask", at::kBool);
  need_opt(drop, {d.T, d.L - 1, d.B, d.H}, "drop", dt);
  need_rows(w_feed, {d.G, d.H}, "w_feed", dt);
  need(w_in, {d.L - 1, d.G, d.H}, "w_in", dt);
  need(b_in, {d.L - 1, d.G}, "b_in", dt);
  need(w_hh, {d.L, d.G, d.H}, "w_hh", dt);
  need(b_hh, {d.L, d.G}, "b_hh", dt);
  TORCH_CHECK(has(w_q) == has(v) && has(b_q) == has(v),
              "fastrnn cpp decoder: w_q, b_q and v are given together (additive score) or not at all");
  need_opt(w_q, {d.H, d.H}, "w_q", dt);
  need_opt(b_q, {d.H}, "b_q", dt);
  need_opt(v, {d.H}, "v", dt);
  need(w_c, {d.H, d.M + d.H}, "w_c", dt);
  return d;
}

template <typename T>
Args<T> make_args(int64_t cell, const Dims& d, const Tensor& xw, const Tensor& keys, const Tensor& memory,
                  const OptT& mask, const OptT& w_feed, const Tensor& w_in, const Tensor& b_in, const Tensor& w_hh,
                  const Tensor& b_hh, const OptT& w_q, const OptT& b_q, const OptT& v, const Tensor& w_c,
                  const Tensor& h0, const OptT& c0, const Tensor& feed0, const OptT& drop) {
  return Args<T>{cell, d.T, d.B, d.S, d.M, d.H, d.L, d.G,
                 xw.data_ptr<T>(), keys.data_ptr<T>(), memory.data_ptr<T>(), h0.data_ptr<T>(), cptr<T>(c0),
                 feed0.data_ptr<T>(), cptr<T>(drop), has(mask) ? mask->data_ptr<bool>() : nullptr,
                 cptr<T>(w_feed), w_in.data_ptr<T>(), b_in.data_ptr<T>(), w_hh.data_ptr<T>(), b_hh.data_ptr<T>(),
                 cptr<T>(w_q), cptr<T>(b_q), cptr<T>(v), w_c.data_ptr<T>(), has(w_feed) ? w_feed->stride(0) : d.H};
}

// -> [out [T,B,H], attn [T,B,S], h_n [L,B,H], c_n [L,B,H] | undefined, then (training) gates
// [T,L,B,4H], cells [T,L,B,H] | [0], hs [T,L,B,H], ctx [T,B,M] (undefined when not training)]
std::vector<Tensor> decoder_forward(int64_t cell, Tensor xw, Tensor keys, Tensor memory, OptT mask, OptT w_feed,
                                    Tensor w_in, Tensor b_in, Tensor w_hh, Tensor b_hh, OptT w_q, OptT b_q, OptT v,
                                    Tensor w_c, Tensor h0, OptT c0, Tensor feed0, OptT drop, bool training) {
  const Dims d = check_forward_args(cell, xw, keys, memory, mask, w_feed, w_in, b_in, w_hh, b_hh, w_q, b_q, v, w_c,
                                    h0, c0, feed0, drop);
  std::vector<Tensor> res;
  AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "fastrnn_decoder_forward", [&] {
    const auto a = make_args<scalar_t>(cell, d, xw, keys, memory, mask, w_feed, w_in, b_in, w_hh, b_hh, w_q, b_q,
                                       v, w_c, h0, c0, feed0, drop);
    res = forward_impl<scalar_t>(a, training, xw.options());
  });
  return res;
}

// -> [grad_gi, grad_gh (LSTM: the same tensor), grad_opre, grad_q | undefined, grad_v | undefined,
// grad_keys, grad_memory, grad_h0, grad_c0 | undefined, grad_feed0]
std::vector<Tensor> decoder_backward(int64_t cell, Tensor grad_out, Tensor grad_attn, Tensor grad_h_n, OptT grad_c_n,
                                     Tensor xw, Tensor keys, Tensor memory, OptT mask, OptT w_feed, Tensor w_in,
                                     Tensor b_in, Tensor w_hh, Tensor b_hh, OptT w_q, OptT b_q, OptT v, Tensor w_c,
                                     Tensor h0, OptT c0, Tensor feed0, OptT drop, Tensor out, Tensor attn,
                                     std::vector<Tensor> saved) {
  const Dims d = check_forward_args(cell, xw, keys, memory, mask, w_feed, w_in, b_in, w_hh, b_hh, w_q, b_q, v, w_c,
                                    h0, c0, feed0, drop);
  const auto dt = xw.scalar_type();
  const bool lstm = cell == kLSTM;
  need(grad_out, {d.T, d.B, d.H}, "grad_out", dt);
  need(grad_attn, {d.T, d.B, d.S}, "grad_attn", dt);
  need(grad_h_n, {d.L, d.B, d.H}, "grad_h_n", dt);
  TORCH_CHECK(has(grad_c_n) == lstm, "fastrnn cpp decoder: grad_c_n must be given for LSTM and None for GRU");
  need_opt(grad_c_n, {d.L, d.B, d.H}, "grad_c_n", dt);
  need(out, {d.T, d.B, d.H}, "out", dt);
  need(attn, {d.T, d.B, d.S}, "attn", dt);
  TORCH_CHECK(saved.size() == 4, "fastrnn cpp decoder: saved must be the 4 tensors a training forward returned");
  need(saved[0], {d.T, d.L, d.B, 4 * d.H}, "saved gates", dt);
  if (lstm) need(saved[1], {d.T, d.L, d.B, d.H}, "saved cells", dt);
  need(saved[2], {d.T, d.L, d.B, d.H}, "saved hs", dt);
  need(saved[3], {d.T, d.B, d.M}, "saved ctx", dt);
  std::vector<Tensor> res;
  AT_DISPATCH_FLOATING_TYPES(dt, "fastrnn_decoder_backward", [&] {
    using T = scalar_t;
    const auto a = make_args<T>(cell, d, xw, keys, memory, mask, w_feed, w_in, b_in, w_hh, b_hh, w_q, b_q, v, w_c,
                                h0, c0, feed0, drop);
    res = backward_impl<T>(a, grad_out.data_ptr<T>(), grad_attn.data_ptr<T>(), grad_h_n.data_ptr<T>(),
                           cptr<T>(grad_c_n), out.data_ptr<T>(), attn.data_ptr<T>(), saved[0].data_ptr<T>(),
                           lstm ? saved[1].data_ptr<T>() : nullptr, saved[2].data_ptr<T>(), saved[3].data_ptr<T>(),
                           xw.options());
  });
  return res;
}

}  // namespace
}  // namespace fastrnn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastrnn C++ attention-decoder kernels (see csrc/decoder.cpp)";
  // The kernels touch no Python objects: let other Python threads run meanwhile, as torch's ops do.
  using nogil = py::call_guard<py::gil_scoped_release>;
  m.def("decoder_forward", &fastrnn::decoder_forward, nogil(),
        "(cell 0 LSTM | 1 GRU, xw, keys, memory, mask, w_feed, w_in, b_in, w_hh, b_hh, w_q, b_q, v, w_c, h0, c0, "
        "feed0, drop, training) -> [out, attn, h_n, c_n, gates, cells, hs, ctx]");
  m.def("decoder_backward", &fastrnn::decoder_backward, nogil(),
        "(cell, grad_out, grad_attn, grad_h_n, grad_c_n, <the forward's tensor arguments>, out, attn, saved) -> "
        "[grad_gi, grad_gh, grad_opre, grad_q, grad_v, grad_keys, grad_memory, grad_h0, grad_c0, grad_feed0]");
  m.def("gemm_engine", &fastrnn::gemm_engine, "which GEMM the kernels use");
}
