// fastrnn C++ backend: the whole time loop of one RNN layer and direction, forward and backward.
//
// Contract: fastrnn/backends/reference_rnn.py (the plain-PyTorch specification). Shapes:
//   xw [T,B,G] (G = 4H LSTM i,f,g,o | 3H GRU r,z,n | H RNN), w_hh [G,Hr], b_hh [G], h0 [B,Hr],
//   c0 [B,H], w_hr [Hr,H], batch_sizes [T] int64 (descending; active rows are the prefix).
//
// Forward step: for each chunk of hidden units, one small GEMM h_prev W_hh^T[:, chunk] and then
// the gate math of that chunk while its pre-activations are in cache; threads split the chunks,
// so at batch 1 each core keeps its share of W_hh in its own L2 across all steps. The activated
// gates overwrite xw[t] (the op code hands xw over as scratch). Nothing is allocated in the loop.
//
// What is saved for backward (the same as the reference backend):
//   LSTM: h_seq, xw overwritten with the activated gates i,f,g,o, c_seq [T,B,H], hu_seq [T,B,H]
//         (unprojected o*tanh(c), only with w_hr);  GRU: h_seq, xw overwritten with r,z,n,
//         hn_seq [T,B,H] (= W_hn h + b_hn);  RNN: h_seq.
// Rows past batch_sizes[t] are left untouched in the states and are zero in h_seq / grad_xw.
//
// Variants (docs/variants.md; rnn_forward_variant / rnn_backward_variant): separate time loops so
// the plain ones stay exactly as they are, sharing the cell kernels (the LSTM ones through
// compile-time flags). Per step: reset rows reload h0/c0, h_in = h_prev * rec_mask, the chunked
// GEMM; without layer norm the gate math follows per chunk in cache as above, with it each row's
// whole product is normalised first (row statistics span every chunk), then its gate math; a row
// pass handles what needs whole rows (LSTM: layer norm of c, zoneout of c); then zoneout of h.
// Saved: the plain tuple (c_seq = c_t after zoneout), then hw_hat [T,B,G], hw_rstd [T,B] (layer
// norm), c_hat [T,B,H], c_rstd [T,B] (LSTM layer norm), c_new (LSTM) / h_new (RNN) [T,B,H]
// (zoneout): fastrnn.ops.recurrence.saved_layout. GRU reset_after=False runs two products per step
// ([r, z] rows on h_in, then the n rows on r * h_in); its backward also returns u = r * h_in.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "gemm.h"
#include "vec_math.h"

namespace fastrnn {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// Fused cell steps. Each works on one row b and hidden units [j0, j1). The forward ones read the
// input side from xw (torch gate layout, row stride G) and the hidden side from `hs`, which the
// chunked GEMM below lays out gate-major within the chunk: hs[b, ng*j0 + q*w + jj], w = j1 - j0.
// The templates hold the math once; FASTRNN_CLONES wrappers compile the float versions per ISA
// so the loops vectorise.
// ---------------------------------------------------------------------------------------------
using vm::sigmoid;
using vm::tanh;

// (sum_k f(k), sum_k f(k) w[k]), k < n, in 16 independent lanes: vectorises without
// reassociating (no -ffast-math), f evaluated once per k.
template <typename T, typename F>
FASTRNN_INLINE std::pair<T, T> lane_sum2(int64_t n, const F& f, const T* w) {
  constexpr int L = 16;
  T a1[L] = {}, a2[L] = {};
  int64_t k = 0;
  for (; k + L <= n; k += L)
    for (int l = 0; l < L; ++l) {
      const T v = f(k + l);
      a1[l] += v, a2[l] += v * w[k + l];
    }
  T s1 = 0, s2 = 0;
  for (; k < n; ++k) {
    const T v = f(k);
    s1 += v, s2 += v * w[k];
  }
  for (int l = 0; l < L; ++l) s1 += a1[l], s2 += a2[l];
  return {s1, s2};
}

// sum_k f(k), k < n, in 16 independent lanes: vectorises without reassociating (no -ffast-math).
template <typename T, typename F>
FASTRNN_INLINE T lane_sum(int64_t n, const F& f) {
  constexpr int L = 16;
  T acc[L] = {};
  int64_t k = 0;
  for (; k + L <= n; k += L)
    for (int l = 0; l < L; ++l) acc[l] += f(k + l);
  T s = 0;
  for (; k < n; ++k) s += f(k);
  for (int l = 0; l < L; ++l) s += acc[l];
  return s;
}

// Compile-time variant flags of the LSTM kernels (docs/variants.md); 0 is the plain cell and
// compiles to exactly the plain code.
enum VariantFlags : int {
  kPeep = 1,   // peephole: i, f see c_prev, o sees c_new
  kSepC = 2,   // forward: c_new goes to its own buffer; a row pass then updates the state (zoneout, LN)
  kLnC = 4,    // layer norm of c_new before its tanh (forward: the row pass computes hu)
  kZoneC = 8,  // backward: zoneout of the cell state
};

template <typename T>
struct LstmFwd {
  T* gates;        // [B,4H] xw_t in, activated i,f,g,o out (saved for backward)
  const T* hs;     // hidden side h_prev W_hh^T, chunk layout, row stride 4H
  const T* bias;   // [4H] b_hh (zeros when absent)
  T* c;            // [B,H] cell state in/out (kSepC: in only)
  T* hu;           // [B,H] o * tanh(c) out (not with kLnC)
  int64_t H;
  const T* peep = nullptr;  // kPeep: [3,H] rows i, f, o
  T* c_new = nullptr;       // kSepC: [B,H] c_new out
};

template <int F, typename T>
FASTRNN_INLINE void lstm_fwd_rows(const LstmFwd<T>& a, int64_t b, int64_t j0, int64_t j1) {
  constexpr bool peep = F & kPeep, sep = F & kSepC, lnc = F & kLnC;
  static_assert(!lnc || sep, "the layer norm of c needs c_new in its own buffer");
  const int64_t H = a.H, w = j1 - j0;
  T* __restrict gi = a.gates + b * 4 * H + j0;
  T* __restrict gf = gi + H;
  T* __restrict gg = gf + H;
  T* __restrict go = gg + H;
  const T* __restrict si = a.hs + b * 4 * H + 4 * j0;
  const T* __restrict bias = a.bias + j0;
  T* __restrict c = a.c + b * H + j0;
  T* __restrict hu = a.hu + b * H + j0;
  const T* __restrict pi = peep ? a.peep + j0 : nullptr;
  T* __restrict cnew = sep ? a.c_new + b * H + j0 : nullptr;
  FASTRNN_IVDEP
  for (int64_t j = 0; j < w; ++j) {
    const T cp = c[j];
    T pre_i = gi[j] + si[j] + bias[j], pre_f = gf[j] + si[w + j] + bias[H + j];
    if constexpr (peep) pre_i += pi[j] * cp, pre_f += pi[H + j] * cp;
    const T i = sigmoid(pre_i);
    const T f = sigmoid(pre_f);
    const T g = tanh(gg[j] + si[2 * w + j] + bias[2 * H + j]);
    const T cn = f * cp + i * g;
    T pre_o = go[j] + si[3 * w + j] + bias[3 * H + j];
    if constexpr (peep) pre_o += pi[2 * H + j] * cn;
    const T o = sigmoid(pre_o);
    if constexpr (sep) cnew[j] = cn;
    else c[j] = cn;
    if constexpr (!lnc) hu[j] = o * tanh(cn);
    gi[j] = i, gf[j] = f, gg[j] = g, go[j] = o;
  }
}

template <typename T>
struct GruFwd {
  T* xw;          // [B,3H] input side in, activated r,z,n out
  const T* hs;    // hidden side, chunk layout, row stride 3H
  const T* bias;  // [3H]
  const T* h;     // [B,H] h_prev
  T* h_out;       // [B,H] new h
  T* hn;          // [B,H] W_hn h + b_hn out (saved for backward)
  int64_t H;
};

template <typename T>
FASTRNN_INLINE void gru_fwd_rows(const GruFwd<T>& a, int64_t b, int64_t j0, int64_t j1) {
  const int64_t H = a.H, w = j1 - j0;
  T* __restrict xr = a.xw + b * 3 * H + j0;
  const T* __restrict sr = a.hs + b * 3 * H + 3 * j0;
  const T* __restrict bias = a.bias + j0;
  const T* __restrict h = a.h + b * H + j0;
  T* __restrict ho = a.h_out + b * H + j0;
  T* __restrict hn = a.hn + b * H + j0;
  FASTRNN_IVDEP
  for (int64_t j = 0; j < w; ++j) {
    const T r = sigmoid(xr[j] + sr[j] + bias[j]);
    const T z = sigmoid(xr[H + j] + sr[w + j] + bias[H + j]);
    const T hnj = sr[2 * w + j] + bias[2 * H + j];
    const T n = tanh(xr[2 * H + j] + r * hnj);
    ho[j] = (T(1) - z) * n + z * h[j];
    hn[j] = hnj;
    xr[j] = r, xr[H + j] = z, xr[2 * H + j] = n;
  }
}

template <typename T>
struct RnnFwd {
  const T* xw;    // [B,H]
  const T* hs;    // [B,H] (one gate: the chunk layout is the plain layout)
  const T* bias;  // [H]
  T* h_out;       // [B,H]
  int64_t H;
  bool relu;
};

template <typename T>
FASTRNN_INLINE void rnn_fwd_rows(const RnnFwd<T>& a, int64_t b, int64_t j0, int64_t j1) {
  const T* __restrict x = a.xw + b * a.H;
  const T* __restrict s = a.hs + b * a.H;
  const T* __restrict bias = a.bias;
  T* __restrict h = a.h_out + b * a.H;
  if (a.relu) {
    FASTRNN_IVDEP
    for (int64_t j = j0; j < j1; ++j) {
      const T v = x[j] + s[j] + bias[j];
      h[j] = v > T(0) ? v : (v == v ? T(0) : v);  // relu that keeps NaN, as torch does
    }
  } else {
    FASTRNN_IVDEP
    for (int64_t j = j0; j < j1; ++j) h[j] = tanh(x[j] + s[j] + bias[j]);
  }
}

template <typename T>
struct LstmBwd {
  const T* acts;     // [B,4H] activated i,f,g,o of this step
  const T* c;        // [B,H] c_new of this step (= c_t without zoneout)
  const T* dh_a;     // [B,H] gradient reaching o*tanh(c) is dh_a + dh_b
  const T* dh_b;     // row stride ld_b (0: a broadcast zero row)
  T* dc;             // [B,H] in: from step t+1, out: to step t-1
  T* grad;           // [B,4H] pre-activation gradients out
  int64_t H, ld_b;
  const T* peep = nullptr;      // kPeep: [3,H]
  T* acc_peep = nullptr;        // kPeep: [B,3H] per-row running sums of the peephole gradient
  const T* zc = nullptr;        // kZoneC: [B,H] zoneout weights of c at this step
  const T* c_hat = nullptr;     // kLnC: [B,H] normalised c_new, and its [B] rstd
  const T* c_rstd = nullptr;
  const T* lnc_w = nullptr;     // kLnC: [H] gain, bias
  const T* lnc_b = nullptr;
  T* acc_lnc = nullptr;         // kLnC: [B,2H] per-row running sums of the gain and bias gradients
};

// kLnC needs whole rows (j0 = 0, j1 = H): the layer norm's backward takes two row means first.
// The per-row accumulators are owned by the work item of (row, units), so threads never share one.
template <int F, typename T>
FASTRNN_INLINE void lstm_bwd_rows(const LstmBwd<T>& a, const T* c_prev, int64_t b, int64_t j0,
                                  int64_t j1) {
  constexpr bool peep = F & kPeep, zone = F & kZoneC, lnc = F & kLnC;
  const int64_t H = a.H;
  const T* __restrict ai = a.acts + b * 4 * H;
  const T* __restrict c = a.c + b * H;
  const T* __restrict cp = c_prev;
  const T* __restrict da = a.dh_a + b * H;
  const T* __restrict db = a.dh_b + b * a.ld_b;
  T* __restrict dc = a.dc + b * H;
  T* __restrict gr = a.grad + b * 4 * H;
  const T* __restrict pp = peep ? a.peep : nullptr;
  T* __restrict ap = peep ? a.acc_peep + b * 3 * H : nullptr;
  const T* __restrict zc = zone ? a.zc + b * H : nullptr;
  const T* __restrict ch = lnc ? a.c_hat + b * H : nullptr;
  const T* __restrict lw = a.lnc_w;
  const T* __restrict lb = a.lnc_b;
  T* __restrict al = lnc ? a.acc_lnc + b * 2 * H : nullptr;
  T mean_g = 0, mean_gx = 0, rstd = 0;
  if constexpr (lnc) {
    // y = LN(c_new): dc_new = rstd (dy w - mean(dy w) - c_hat mean(dy w c_hat))
    const auto [s1, s2] = lane_sum2<T>(H, [&](int64_t j) {
      const T ty = tanh(lw[j] * ch[j] + lb[j]);
      return (da[j] + db[j]) * ai[3 * H + j] * (T(1) - ty * ty) * lw[j];
    }, ch);
    mean_g = s1 / T(H), mean_gx = s2 / T(H);
    rstd = a.c_rstd[b];
  }
  FASTRNN_IVDEP
  for (int64_t j = j0; j < j1; ++j) {
    const T i = ai[j], f = ai[H + j], g = ai[2 * H + j], o = ai[3 * H + j];
    const T dh = da[j] + db[j];
    T tc, dcn;  // tanh of what o multiplies, and the gradient reaching c_new through it
    if constexpr (lnc) {
      tc = tanh(lw[j] * ch[j] + lb[j]);
      const T dy = dh * o * (T(1) - tc * tc);
      al[j] += dy * ch[j], al[H + j] += dy;
      dcn = rstd * (dy * lw[j] - mean_g - ch[j] * mean_gx);
    } else {
      tc = tanh(c[j]);
      dcn = dh * o * (T(1) - tc * tc);
    }
    const T dc_in = dc[j];
    T dct = (zone ? (T(1) - zc[j]) * dc_in : dc_in) + dcn;
    const T d_o = dh * tc * o * (T(1) - o);
    if constexpr (peep) dct += d_o * pp[2 * H + j];
    const T d_i = dct * g * i * (T(1) - i);
    const T d_f = dct * cp[j] * f * (T(1) - f);
    gr[j] = d_i;
    gr[H + j] = d_f;
    gr[2 * H + j] = dct * i * (T(1) - g * g);
    gr[3 * H + j] = d_o;
    T dcp = dct * f;
    if constexpr (zone) dcp += zc[j] * dc_in;
    if constexpr (peep) {
      dcp += d_i * pp[j] + d_f * pp[H + j];
      ap[j] += d_i * cp[j], ap[H + j] += d_f * cp[j], ap[2 * H + j] += d_o * c[j];
    }
    dc[j] = dcp;
  }
}

template <typename T>
struct GruBwd {
  const T* acts;   // [B,3H] r,z,n
  const T* hn;     // [B,H]
  const T* gh;     // [B,H] gradient from the output at this step
  T* dh;           // [B,H] in: from step t+1; out: the direct part dh*z (the GEMM adds the rest)
  T* grad_x;       // [B,3H] input-side pre-activation gradients
  T* grad_h;       // [B,3H] hidden-side pre-activation gradients
  int64_t H;
};

template <typename T>
FASTRNN_INLINE void gru_bwd_rows(const GruBwd<T>& a, const T* h_prev, int64_t b, int64_t j0,
                                 int64_t j1) {
  const int64_t H = a.H;
  const T* __restrict ac = a.acts + b * 3 * H;
  const T* __restrict hn = a.hn + b * H;
  const T* __restrict gh = a.gh + b * H;
  const T* __restrict hp = h_prev;
  T* __restrict dh = a.dh + b * H;
  T* __restrict gx = a.grad_x + b * 3 * H;
  T* __restrict gw = a.grad_h + b * 3 * H;
  FASTRNN_IVDEP
  for (int64_t j = j0; j < j1; ++j) {
    const T r = ac[j], z = ac[H + j], n = ac[2 * H + j];
    const T d = dh[j] + gh[j];
    const T dn = d * (T(1) - z) * (T(1) - n * n);
    const T dz = d * (hp[j] - n) * z * (T(1) - z);
    const T dr = dn * hn[j] * r * (T(1) - r);
    gx[j] = dr, gx[H + j] = dz, gx[2 * H + j] = dn;
    gw[j] = dr, gw[H + j] = dz, gw[2 * H + j] = dn * r;
    dh[j] = d * z;
  }
}

template <typename T>
struct RnnBwd {
  const T* h;   // [B,H] h_t
  const T* dh;  // [B,H] from step t+1
  const T* gh;  // [B,H] from the output
  T* grad;      // [B,H]
  int64_t H;
  bool relu;
};

template <typename T>
FASTRNN_INLINE void rnn_bwd_rows(const RnnBwd<T>& a, int64_t b, int64_t j0, int64_t j1) {
  const T* __restrict h = a.h + b * a.H;
  const T* __restrict dh = a.dh + b * a.H;
  const T* __restrict gh = a.gh + b * a.H;
  T* __restrict gr = a.grad + b * a.H;
  if (a.relu) {
    FASTRNN_IVDEP
    for (int64_t j = j0; j < j1; ++j) gr[j] = h[j] > T(0) ? dh[j] + gh[j] : T(0);
  } else {
    FASTRNN_IVDEP
    for (int64_t j = j0; j < j1; ++j) gr[j] = (dh[j] + gh[j]) * (T(1) - h[j] * h[j]);
  }
}

// Per-ISA float entry points; `step_rows` overloads pick them (double calls the template).
#define FASTRNN_F32_CLONE(NAME, ARGS)                                                        \
  FASTRNN_CLONES void NAME##_f32(const ARGS<float>& a, int64_t b, int64_t j0, int64_t j1) { \
    NAME(a, b, j0, j1);                                                                      \
  }                                                                                          \
  inline void step_rows(const ARGS<float>& a, int64_t b, int64_t j0, int64_t j1) {           \
    NAME##_f32(a, b, j0, j1);                                                                \
  }                                                                                          \
  inline void step_rows(const ARGS<double>& a, int64_t b, int64_t j0, int64_t j1) {          \
    NAME(a, b, j0, j1);                                                                      \
  }
FASTRNN_F32_CLONE(gru_fwd_rows, GruFwd)
FASTRNN_F32_CLONE(rnn_fwd_rows, RnnFwd)
FASTRNN_F32_CLONE(rnn_bwd_rows, RnnBwd)
#undef FASTRNN_F32_CLONE

// The LSTM/GRU backward steps also take the row's previous state.
#define FASTRNN_F32_CLONE_PREV(NAME, ARGS)                                                  \
  FASTRNN_CLONES void NAME##_f32(const ARGS<float>& a, const float* p, int64_t b, int64_t j0, \
                                 int64_t j1) {                                              \
    NAME(a, p, b, j0, j1);                                                                  \
  }                                                                                         \
  inline void step_rows(const ARGS<float>& a, const float* p, int64_t b, int64_t j0,          \
                        int64_t j1) {                                                       \
    NAME##_f32(a, p, b, j0, j1);                                                            \
  }                                                                                         \
  inline void step_rows(const ARGS<double>& a, const double* p, int64_t b, int64_t j0,        \
                        int64_t j1) {                                                       \
    NAME(a, p, b, j0, j1);                                                                  \
  }
FASTRNN_F32_CLONE_PREV(gru_bwd_rows, GruBwd)
#undef FASTRNN_F32_CLONE_PREV

// The LSTM kernels take compile-time variant flags (F = 0: the plain cell); GCC clones templates
// per ISA just as it does plain functions.
template <int F>
FASTRNN_CLONES void lstm_fwd_f32(const LstmFwd<float>& a, int64_t b, int64_t j0, int64_t j1) {
  lstm_fwd_rows<F>(a, b, j0, j1);
}
template <int F>
inline void step_rows(const LstmFwd<float>& a, int64_t b, int64_t j0, int64_t j1) {
  lstm_fwd_f32<F>(a, b, j0, j1);
}
template <int F>
inline void step_rows(const LstmFwd<double>& a, int64_t b, int64_t j0, int64_t j1) {
  lstm_fwd_rows<F>(a, b, j0, j1);
}
template <int F>
FASTRNN_CLONES void lstm_bwd_f32(const LstmBwd<float>& a, const float* p, int64_t b, int64_t j0, int64_t j1) {
  lstm_bwd_rows<F>(a, p, b, j0, j1);
}
template <int F>
inline void step_rows(const LstmBwd<float>& a, const float* p, int64_t b, int64_t j0, int64_t j1) {
  lstm_bwd_f32<F>(a, p, b, j0, j1);
}
template <int F>
inline void step_rows(const LstmBwd<double>& a, const double* p, int64_t b, int64_t j0, int64_t j1) {
  lstm_bwd_rows<F>(a, p, b, j0, j1);
}

// ---------------------------------------------------------------------------------------------
// Variant kernels (docs/variants.md): what the plain kernels above do not cover.
// ---------------------------------------------------------------------------------------------
constexpr double kLnEps = 1e-5;  // fastrnn.ops.recurrence.LN_EPS

// Layer norm of one row of the hidden product, in place in the chunk layout of `fused_step`
// (hs[ng*j0 + q*w + jj] is gate q, unit j0 + jj): hs = LN(hs) * w + b, with w, b and the saved
// hat [G] in torch's gate layout. Mean and variance are two passes (no cancellation).
template <typename T>
FASTRNN_INLINE void ln_hh_row(T* hs, const T* lw, const T* lb, int64_t ng, int64_t H, int64_t CH,
                              T* hat, T* rstd_out) {
  const int64_t G = ng * H;
  const T mean = lane_sum<T>(G, [&](int64_t k) { return hs[k]; }) / T(G);
  const T sq = lane_sum<T>(G, [&](int64_t k) { return (hs[k] - mean) * (hs[k] - mean); });
  const T rstd = T(1) / std::sqrt(sq / T(G) + T(kLnEps));
  if (rstd_out) *rstd_out = rstd;
  for (int64_t j0 = 0; j0 < H; j0 += CH) {
    const int64_t w = std::min(CH, H - j0);
    for (int64_t q = 0; q < ng; ++q) {
      T* __restrict x = hs + ng * j0 + q * w;
      const T* __restrict gw = lw + q * H + j0;
      const T* __restrict gb = lb + q * H + j0;
      if (hat) {
        T* __restrict h = hat + q * H + j0;
        FASTRNN_IVDEP
        for (int64_t jj = 0; jj < w; ++jj) {
          const T v = (x[jj] - mean) * rstd;
          h[jj] = v, x[jj] = v * gw[jj] + gb[jj];
        }
      } else {
        FASTRNN_IVDEP
        for (int64_t jj = 0; jj < w; ++jj) x[jj] = (x[jj] - mean) * rstd * gw[jj] + gb[jj];
      }
    }
  }
}

// Backward of hw = LN(a) w + b for one row (torch layout): da = rstd (g - mean(g) - hat mean(g hat)),
// g = dhw w. `da` may be `dhw` (in place). acc_w, acc_b [G]: the row's running gain/bias sums.
template <typename T>
FASTRNN_INLINE void ln_hh_bwd_row(const T* dhw, const T* hat, T rstd, const T* lw, T* da, T* acc_w,
                                  T* acc_b, int64_t G) {
  const auto [s1, s2] = lane_sum2<T>(G, [&](int64_t k) { return dhw[k] * lw[k]; }, hat);
  const T m1 = s1 / T(G), m2 = s2 / T(G);
  for (int64_t k = 0; k < G; ++k) acc_w[k] += dhw[k] * hat[k], acc_b[k] += dhw[k];
  for (int64_t k = 0; k < G; ++k) da[k] = rstd * (dhw[k] * lw[k] - m1 - hat[k] * m2);
}

// LSTM with kSepC, once the whole row's c_new is known: the layer norm of c_new (kLnC: hu =
// o * tanh(LN(c_new)), saving c_hat and rstd) and the state update c = zc c + (1 - zc) c_new.
template <typename T>
struct LstmState {
  using scalar = T;
  const T* c_new;   // [B,H]
  T* c;             // [B,H] state: c_prev in, c_t out
  const T* gates;   // [B,4H] activated (o read)
  const T* zc;      // [B,H] or null
  const T* lnc_w;   // [H] (kLnC)
  const T* lnc_b;
  T* c_hat;         // [B,H] out (kLnC)
  T* c_rstd;        // [B] out (kLnC) or null
  T* hu;            // [B,H] out (kLnC)
  int64_t H;
};

template <int F, typename T>
FASTRNN_INLINE void lstm_state_row(const LstmState<T>& a, int64_t b) {
  constexpr bool lnc = F & kLnC, zone = F & kZoneC;
  const int64_t H = a.H;
  const T* __restrict cn = a.c_new + b * H;
  T* __restrict c = a.c + b * H;
  if constexpr (lnc) {
    const T mean = lane_sum<T>(H, [&](int64_t j) { return cn[j]; }) / T(H);
    const T sq = lane_sum<T>(H, [&](int64_t j) { return (cn[j] - mean) * (cn[j] - mean); });
    const T rstd = T(1) / std::sqrt(sq / T(H) + T(kLnEps));
    if (a.c_rstd) a.c_rstd[b] = rstd;
    const T* __restrict o = a.gates + b * 4 * H + 3 * H;
    const T* __restrict lw = a.lnc_w;
    const T* __restrict lb = a.lnc_b;
    T* __restrict ch = a.c_hat + b * H;
    T* __restrict hu = a.hu + b * H;
    FASTRNN_IVDEP
    for (int64_t j = 0; j < H; ++j) {
      const T v = (cn[j] - mean) * rstd;
      ch[j] = v, hu[j] = o[j] * tanh(v * lw[j] + lb[j]);
    }
  }
  if constexpr (zone) {
    const T* __restrict z = a.zc + b * H;
    FASTRNN_IVDEP
    for (int64_t j = 0; j < H; ++j) c[j] = z[j] * c[j] + (T(1) - z[j]) * cn[j];
  } else {
    std::memcpy(c, cn, sizeof(T) * H);
  }
}

// GRU reset_after=False, forward: r, z from the first product (chunk layout of the [r, z] rows,
// row stride 2H), and u = r * h_in, the left operand of the second product.
template <typename T>
struct GruRzFwd {
  using scalar = T;
  T* xw;            // [B,3H] x_r, x_z in, activated r, z out
  const T* hs;      // [B,2H] h_in W_h{r,z}^T, chunk layout
  const T* bias;    // [3H]
  const T* h_in;    // [B,H]
  T* u;             // [B,H] r * h_in out
  int64_t H;
};

template <typename T>
FASTRNN_INLINE void gru_rz_rows(const GruRzFwd<T>& a, int64_t b, int64_t j0, int64_t j1) {
  const int64_t H = a.H, w = j1 - j0;
  T* __restrict xr = a.xw + b * 3 * H + j0;
  const T* __restrict sr = a.hs + b * 2 * H + 2 * j0;
  const T* __restrict bias = a.bias + j0;
  const T* __restrict hin = a.h_in + b * H + j0;
  T* __restrict u = a.u + b * H + j0;
  FASTRNN_IVDEP
  for (int64_t j = 0; j < w; ++j) {
    const T r = sigmoid(xr[j] + sr[j] + bias[j]);
    const T z = sigmoid(xr[H + j] + sr[w + j] + bias[H + j]);
    xr[j] = r, xr[H + j] = z, u[j] = r * hin[j];
  }
}

// ... then n from the second product u W_hn^T (plain layout, row stride H).
template <typename T>
struct GruNFwd {
  using scalar = T;
  T* xw;            // [B,3H] z read, x_n in, activated n out
  const T* hs;      // [B,H] u W_hn^T
  const T* bias;    // [3H]
  const T* h;       // [B,H] h_prev
  T* h_out;         // [B,H] h_new
  T* hn;            // [B,H] u W_hn^T + b_hn out (saved)
  int64_t H;
};

template <typename T>
FASTRNN_INLINE void gru_n_rows(const GruNFwd<T>& a, int64_t b, int64_t j0, int64_t j1) {
  const int64_t H = a.H;
  T* __restrict x = a.xw + b * 3 * H;
  const T* __restrict s = a.hs + b * H;
  const T* __restrict bias = a.bias + 2 * H;
  const T* __restrict h = a.h + b * H;
  T* __restrict ho = a.h_out + b * H;
  T* __restrict hn = a.hn + b * H;
  FASTRNN_IVDEP
  for (int64_t j = j0; j < j1; ++j) {
    const T hnj = s[j] + bias[j], z = x[H + j];
    const T n = tanh(x[2 * H + j] + hnj);
    ho[j] = (T(1) - z) * n + z * h[j];
    hn[j] = hnj, x[2 * H + j] = n;
  }
}

// GRU reset_after=False, backward, first half: dz, dn (= the gradient of the product u W_hn^T);
// `d` holds dh_new in and its direct part d * z out.
template <typename T>
struct GruNBwd {
  using scalar = T;
  const T* acts;    // [B,3H] r, z, n
  T* d;             // [B,H]
  T* grad_x;        // [B,3H]
  T* grad_h;        // [B,3H]
  int64_t H;
};

template <typename T>
FASTRNN_INLINE void gru_n_bwd_rows(const GruNBwd<T>& a, const T* h_prev, int64_t b, int64_t j0, int64_t j1) {
  const int64_t H = a.H;
  const T* __restrict ac = a.acts + b * 3 * H;
  const T* __restrict hp = h_prev;
  T* __restrict d = a.d + b * H;
  T* __restrict gx = a.grad_x + b * 3 * H;
  T* __restrict gw = a.grad_h + b * 3 * H;
  FASTRNN_IVDEP
  for (int64_t j = j0; j < j1; ++j) {
    const T z = ac[H + j], n = ac[2 * H + j], dj = d[j];
    const T dn = dj * (T(1) - z) * (T(1) - n * n);
    const T dz = dj * (hp[j] - n) * z * (T(1) - z);
    gx[H + j] = dz, gx[2 * H + j] = dn;
    gw[H + j] = dz, gw[2 * H + j] = dn;
    d[j] = dj * z;
  }
}

// ... second half, once du = dn W_hn is known: dr, the h_in part du * r (in place in du) and
// u = r * h_in for the op code's dW_hn.
template <typename T>
struct GruRBwd {
  using scalar = T;
  const T* acts;    // [B,3H]
  const T* mask;    // [B,H] rec_mask (ones when absent)
  T* du;            // [B,H]
  T* grad_x;        // [B,3H]
  T* grad_h;        // [B,3H]
  T* u;             // [B,H] out
  int64_t H;
};

template <typename T>
FASTRNN_INLINE void gru_r_bwd_rows(const GruRBwd<T>& a, const T* h_prev, int64_t b, int64_t j0, int64_t j1) {
  const int64_t H = a.H;
  const T* __restrict ac = a.acts + b * 3 * H;
  const T* __restrict hp = h_prev;
  const T* __restrict mk = a.mask + b * H;
  T* __restrict du = a.du + b * H;
  T* __restrict gx = a.grad_x + b * 3 * H;
  T* __restrict gw = a.grad_h + b * 3 * H;
  T* __restrict u = a.u + b * H;
  FASTRNN_IVDEP
  for (int64_t j = j0; j < j1; ++j) {
    const T r = ac[j], hin = hp[j] * mk[j], duj = du[j];
    const T dr = duj * hin * r * (T(1) - r);
    gx[j] = dr, gw[j] = dr;
    du[j] = duj * r, u[j] = r * hin;
  }
}

// Per-ISA float entry points of the variant kernels (double calls the template).
template <typename T> FASTRNN_INLINE void vk(const GruRzFwd<T>& a, int64_t b, int64_t j0, int64_t j1) { gru_rz_rows(a, b, j0, j1); }
template <typename T> FASTRNN_INLINE void vk(const GruNFwd<T>& a, int64_t b, int64_t j0, int64_t j1) { gru_n_rows(a, b, j0, j1); }
template <typename T> FASTRNN_INLINE void vk(const GruNBwd<T>& a, const T* p, int64_t b, int64_t j0, int64_t j1) { gru_n_bwd_rows(a, p, b, j0, j1); }
template <typename T> FASTRNN_INLINE void vk(const GruRBwd<T>& a, const T* p, int64_t b, int64_t j0, int64_t j1) { gru_r_bwd_rows(a, p, b, j0, j1); }

FASTRNN_CLONES void vk_f32(const GruRzFwd<float>& a, int64_t b, int64_t j0, int64_t j1) { vk(a, b, j0, j1); }
FASTRNN_CLONES void vk_f32(const GruNFwd<float>& a, int64_t b, int64_t j0, int64_t j1) { vk(a, b, j0, j1); }
FASTRNN_CLONES void vk_f32(const GruNBwd<float>& a, const float* p, int64_t b, int64_t j0, int64_t j1) { vk(a, p, b, j0, j1); }
FASTRNN_CLONES void vk_f32(const GruRBwd<float>& a, const float* p, int64_t b, int64_t j0, int64_t j1) { vk(a, p, b, j0, j1); }
template <int F>
FASTRNN_CLONES void vk_state_f32(const LstmState<float>& a, int64_t b) { lstm_state_row<F>(a, b); }
FASTRNN_CLONES void ln_row(float* hs, const float* lw, const float* lb, int64_t ng, int64_t H, int64_t CH,
                           float* hat, float* rstd) {
  ln_hh_row(hs, lw, lb, ng, H, CH, hat, rstd);
}
inline void ln_row(double* hs, const double* lw, const double* lb, int64_t ng, int64_t H, int64_t CH,
                   double* hat, double* rstd) {
  ln_hh_row(hs, lw, lb, ng, H, CH, hat, rstd);
}
FASTRNN_CLONES void ln_bwd_row(const float* dhw, const float* hat, float rstd, const float* lw, float* da,
                               float* acc_w, float* acc_b, int64_t G) {
  ln_hh_bwd_row(dhw, hat, rstd, lw, da, acc_w, acc_b, G);
}
inline void ln_bwd_row(const double* dhw, const double* hat, double rstd, const double* lw, double* da,
                       double* acc_w, double* acc_b, int64_t G) {
  ln_hh_bwd_row(dhw, hat, rstd, lw, da, acc_w, acc_b, G);
}
template <typename A, typename... R>
inline void vrows(const A& a, R... r) {
  if constexpr (std::is_same_v<typename A::scalar, float>) vk_f32(a, r...);
  else vk(a, r...);
}
template <int F, typename T>
inline void state_row(const LstmState<T>& a, int64_t b) {
  if constexpr (std::is_same_v<T, float>) vk_state_f32<F>(a, b);
  else lstm_state_row<F>(a, b);
}


// The recurrent weight as the forward step uses it: B = W_hh^T [Hr, ng*H] packed so that the
// panel of each chunk of hidden units [j0, j0+w) holds that chunk's gate columns gate-major
// (packed column ng*j0 + q*w + jj is W_hh row q*H + j0 + jj). One GEMM per chunk then yields
// exactly the pre-activations that chunk's gate math needs, and each thread keeps its panels
// in its own cache across all steps (at batch 1 the weights never leave L2).
template <typename T>
struct ChunkedWeight {
  int64_t ng, H, Hr, CH;
  PackedB<T> B;

  static int64_t chunk_width(int64_t ng, int64_t H) {
    // panels of ~256 columns (brgemm's sweet spot) and at least two chunks for two threads
    const int64_t by_panel = (256 / ng + 15) / 16 * 16;
    const int64_t by_threads = ((H + 1) / 2 + 15) / 16 * 16;
    return std::max<int64_t>(16, std::min(by_panel, by_threads));
  }
  ChunkedWeight(const Tensor& w_hh, int64_t ng_, int64_t H_)
      : ng(ng_), H(H_), Hr(w_hh.size(1)), CH(chunk_width(ng_, H_)) {
    B.K = Hr, B.N = ng * H, B.NB = ng * CH;
    B.buf = at::empty({std::max<int64_t>(1, Hr * ng * H)}, w_hh.options());
    const T* w = w_hh.data_ptr<T>();
    at::parallel_for(0, B.panels(), 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t j0 = c * CH, wd = std::min(CH, H - j0), ld = ng * wd;
        T* dst = const_cast<T*>(B.panel(c));
        for (int64_t k0 = 0; k0 < Hr; k0 += 16) {  // blocked as in PackedB: both sides cache-friendly
          const int64_t k1 = std::min(Hr, k0 + 16);
          for (int64_t q = 0; q < ng; ++q)
            for (int64_t jj = 0; jj < wd; ++jj) {
              const T* src = w + (q * H + j0 + jj) * Hr;  // W_hh row = column of W_hh^T
              for (int64_t k = k0; k < k1; ++k) dst[k * ld + q * wd + jj] = src[k];
            }
        }
      }
    });
  }
  int64_t chunks() const { return B.panels(); }
};

// One forward step: per chunk, hs[0:m, chunk] = h_prev[0:m] W_hh^T[:, chunk] then the gate math
// for rows [0, m) of that chunk, while its pre-activations are still in cache. Threads split
// the chunks when the step is big enough to pay for waking them.
template <typename T, typename Rows>
void fused_step(const ChunkedWeight<T>& W, int64_t m, const T* h_prev, T* hs, const Rows& rows) {
  const int64_t G = W.ng * W.H, nch = W.chunks();
  auto work = [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t j0 = c * W.CH, j1 = std::min(W.H, j0 + W.CH);
      gemm_block(m, W.B.width(c), W.Hr, h_prev, W.Hr, W.B.panel(c), W.B.width(c), hs + W.ng * j0, G, false);
      for (int64_t b = 0; b < m; ++b) rows(b, j0, j1);
    }
    release_gemm();
  };
  if (nch > 1 && at::get_num_threads() > 1 && m * G * W.Hr >= (1 << 16))
    at::parallel_for(0, nch, 1, work);
  else
    work(0, nch);
}

// f(b, j0, j1) over rows [0, m) x hidden units [0, H) in chunks, threaded when big enough.
template <typename F>
void for_rows(int64_t m, int64_t H, const F& f) {
  constexpr int64_t kChunk = 256;     // hidden units per work item
  constexpr int64_t kMinWork = 8192;  // elements per thread before parallelism pays
  const int64_t nch = (H + kChunk - 1) / kChunk;
  const int64_t grain = std::max<int64_t>(1, kMinWork / std::min(H, kChunk));
  at::parallel_for(0, m * nch, grain, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t b = k / nch, j0 = (k % nch) * kChunk;
      f(b, j0, std::min(H, j0 + kChunk));
    }
  });
}

// Time-step bookkeeping for a direction and optional packed batch sizes.
struct Steps {
  int64_t T, B;
  bool reverse;
  const int64_t* bs;  // null: every row active
  int64_t at(int64_t k) const { return reverse ? T - 1 - k : k; }  // k-th step in forward order
  int64_t rows(int64_t t) const { return bs ? bs[t] : B; }
  // Row b's state before step t: seq[previous step] if b was active then, else init.
  template <typename T_>
  const T_* prev_row(const T_* seq, const T_* init, int64_t t, int64_t b, int64_t K) const {
    const int64_t p = reverse ? t + 1 : t - 1;
    return (p >= 0 && p < T && b < rows(p)) ? seq + (p * B + b) * K : init + b * K;
  }
};

Steps make_steps(const Tensor& seq, bool reverse, const c10::optional<Tensor>& batch_sizes) {
  const int64_t* bs = nullptr;
  if (batch_sizes.has_value() && batch_sizes->defined()) {
    TORCH_CHECK(batch_sizes->device().is_cpu() && batch_sizes->dtype() == at::kLong && batch_sizes->dim() == 1 &&
                    batch_sizes->is_contiguous() && batch_sizes->numel() == seq.size(0),
                "fastrnn cpp backend: batch_sizes must be a contiguous 1-D int64 CPU tensor with one entry per "
                "time step (T = ", seq.size(0), "), got ", batch_sizes->sizes(), " ", batch_sizes->dtype(), " on ",
                batch_sizes->device());
    bs = batch_sizes->data_ptr<int64_t>();
    // the loops touch rows [0, bs[t]) of [B]-row buffers and rely on rows only finishing
    for (int64_t t = 0; t < seq.size(0); ++t)
      TORCH_CHECK(bs[t] >= 0 && bs[t] <= seq.size(1) && (t == 0 || bs[t] <= bs[t - 1]),
                  "fastrnn cpp backend: batch_sizes must be non-increasing, in [0, B = ", seq.size(1),
                  "]; batch_sizes[", t, "] = ", bs[t]);
  }
  return Steps{seq.size(0), seq.size(1), reverse, bs};
}

Tensor new_seq(const Steps& s, int64_t K, const at::TensorOptions& opts) {
  // zeros when packed: rows past batch_sizes[t] must read as zero
  return s.bs ? at::zeros({s.T, s.B, K}, opts) : at::empty({s.T, s.B, K}, opts);
}

Tensor bias_or_zeros(const c10::optional<Tensor>& b, int64_t G, const at::TensorOptions& opts) {
  return (b.has_value() && b->defined()) ? b->contiguous() : at::zeros({G}, opts);
}

enum Cell : int64_t { kLSTM = 0, kGRU = 1, kRNNTanh = 2, kRNNRelu = 3 };

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
template <typename T>
std::vector<Tensor> forward_impl(int64_t cell, Tensor xw, const Tensor& w_hh,
                                 const c10::optional<Tensor>& b_hh, const Tensor& h0,
                                 const c10::optional<Tensor>& c0, const c10::optional<Tensor>& w_hr,
                                 const c10::optional<Tensor>& batch_sizes, bool reverse, bool training) {
  const Steps s = make_steps(xw, reverse, batch_sizes);
  const int64_t B = s.B, G = xw.size(2), Hr = h0.size(1);
  const bool proj = w_hr.has_value() && w_hr->defined();
  const int64_t ng = cell == kLSTM ? 4 : cell == kGRU ? 3 : 1, H = G / ng;
  auto opts = xw.options();
  const Tensor bias = bias_or_zeros(b_hh, G, opts);
  Tensor h_seq = new_seq(s, Hr, opts);
  Tensor h = h0.clone();
  Tensor hs = at::empty({B, G}, opts);  // hidden-side pre-activations of one step
  T* xw_p = xw.data_ptr<T>();
  T* hs_p = hs.data_ptr<T>();
  T* hseq_p = h_seq.data_ptr<T>();
  T* h_p = h.data_ptr<T>();
  const T* bias_p = bias.data_ptr<T>();
  const ChunkedWeight<T> W(w_hh, ng, H);
  std::vector<Tensor> out;

  if (cell == kLSTM) {
    Tensor c = c0->clone();
    Tensor c_seq = training ? new_seq(s, H, opts) : Tensor();
    // o*tanh(c) lands in h_seq directly without a projection; with one it needs its own buffer
    Tensor hu_seq = proj ? (training ? new_seq(s, H, opts) : at::empty({1, B, H}, opts)) : Tensor();
    c10::optional<PackedB<T>> P;  // W_hr^T [H, Hr]
    if (proj) P.emplace(PackedB<T>::transposed(w_hr->data_ptr<T>(), Hr, H, panel_width(Hr), opts));
    for (int64_t k = 0; k < s.T; ++k) {
      const int64_t t = s.at(k), m = s.rows(t);
      if (m == 0) continue;
      T* h_t = hseq_p + t * B * Hr;
      T* hu = proj ? hu_seq.data_ptr<T>() + (training ? t * B * H : 0) : h_t;
      const LstmFwd<T> a{xw_p + t * B * G, hs_p, bias_p, c.data_ptr<T>(), hu, H};
      fused_step(W, m, h_p, hs_p, [&](int64_t b, int64_t j0, int64_t j1) { step_rows<0>(a, b, j0, j1); });
      if (proj) gemm_packed(m, (const T*)hu, H, *P, h_t, Hr, false);
      std::memcpy(h_p, h_t, sizeof(T) * m * Hr);
      if (training) std::memcpy(c_seq.data_ptr<T>() + t * B * H, c.data_ptr<T>(), sizeof(T) * m * H);
    }
    out = {h_seq, h, c};
    if (training) {
      out.insert(out.end(), {h_seq, xw, c_seq});
      if (proj) out.push_back(hu_seq);
    }
  } else if (cell == kGRU) {
    Tensor hn_seq = training ? new_seq(s, H, opts) : at::empty({1, B, H}, opts);
    for (int64_t k = 0; k < s.T; ++k) {
      const int64_t t = s.at(k), m = s.rows(t);
      if (m == 0) continue;
      T* h_t = hseq_p + t * B * H;
      const GruFwd<T> a{xw_p + t * B * G, hs_p, bias_p, h_p, h_t,
                        hn_seq.data_ptr<T>() + (training ? t * B * H : 0), H};
      fused_step(W, m, h_p, hs_p, [&](int64_t b, int64_t j0, int64_t j1) { step_rows(a, b, j0, j1); });
      std::memcpy(h_p, h_t, sizeof(T) * m * H);
    }
    out = {h_seq, h, Tensor()};
    if (training) out.insert(out.end(), {h_seq, xw, hn_seq});
  } else {
    for (int64_t k = 0; k < s.T; ++k) {
      const int64_t t = s.at(k), m = s.rows(t);
      if (m == 0) continue;
      T* h_t = hseq_p + t * B * H;
      const RnnFwd<T> a{xw_p + t * B * G, hs_p, bias_p, h_t, H, cell == kRNNRelu};
      fused_step(W, m, h_p, hs_p, [&](int64_t b, int64_t j0, int64_t j1) { step_rows(a, b, j0, j1); });
      std::memcpy(h_p, h_t, sizeof(T) * m * H);
    }
    out = {h_seq, h, Tensor()};
    if (training) out.push_back(h_seq);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Backward: visits the steps in the opposite order; dh/dc carry the gradient w.r.t. the state.
// Per step: the gate gradients (threads over rows x hidden chunks), then one GEMM
// dh[0:m] (+)= grad_gates[0:m] W_hh. Returns {grad_xw, grad_hw, grad_h0, grad_c0, grad_hproj};
// grad_hproj [T,B,Hr] (with w_hr) is the total gradient reaching each projected output, for
// grad_w_hr = grad_hproj^T hu_seq.
// ---------------------------------------------------------------------------------------------
template <typename T>
std::vector<Tensor> backward_impl(int64_t cell, const Tensor& grad_h_seq, const Tensor& grad_h_T,
                                  const c10::optional<Tensor>& grad_c_T, const Tensor& w_hh,
                                  const c10::optional<Tensor>& w_hr, const Tensor& h0,
                                  const c10::optional<Tensor>& c0,
                                  const c10::optional<Tensor>& batch_sizes, bool reverse,
                                  const std::vector<Tensor>& saved) {
  const Tensor& h_seq = saved.at(0);
  const Steps s = make_steps(h_seq, reverse, batch_sizes);
  const int64_t B = s.B, Hr = h_seq.size(2), G = w_hh.size(0);
  const bool proj = w_hr.has_value() && w_hr->defined();
  const int64_t H = cell == kLSTM ? G / 4 : cell == kGRU ? G / 3 : G;
  auto opts = h_seq.options();
  Tensor grad_xw = new_seq(s, G, opts);
  Tensor dh = grad_h_T.clone();
  T* dh_p = dh.data_ptr<T>();
  T* gx_p = grad_xw.data_ptr<T>();
  const T* gh_p = grad_h_seq.data_ptr<T>();
  const T* hs_p = h_seq.data_ptr<T>();
  // dh_prev = grad_gates W_hh: W_hh [G, Hr] is the right operand as it is, packed once
  const PackedB<T> W = PackedB<T>::rows(w_hh.data_ptr<T>(), G, Hr, Hr, panel_width(Hr), opts);

  if (cell == kLSTM) {
    const Tensor &acts = saved.at(1), &c_seq = saved.at(2);
    Tensor dc = grad_c_T->clone();
    Tensor grad_hproj, dhu;
    c10::optional<PackedB<T>> P;  // dhu = grad_hproj W_hr, W_hr [Hr, H]
    if (proj) {
      grad_hproj = new_seq(s, Hr, opts);
      dhu = at::empty({B, H}, opts);
      P.emplace(PackedB<T>::rows(w_hr->data_ptr<T>(), Hr, H, H, panel_width(H), opts));
    }
    const Tensor zero_row = at::zeros({H}, opts);
    const T* c0_p = c0->data_ptr<T>();
    const T* cs_p = c_seq.data_ptr<T>();
    for (int64_t k = s.T - 1; k >= 0; --k) {
      const int64_t t = s.at(k), m = s.rows(t);
      if (m == 0) continue;
      const T *dh_a = dh_p, *dh_b = gh_p + t * B * Hr;
      int64_t ld_b = Hr;
      if (proj) {
        T* gp = grad_hproj.data_ptr<T>() + t * B * Hr;
        for (int64_t i = 0; i < m * Hr; ++i) gp[i] = dh_p[i] + dh_b[i];
        gemm_packed(m, (const T*)gp, Hr, *P, dhu.data_ptr<T>(), H, false);
        dh_a = dhu.data_ptr<T>(), dh_b = zero_row.data_ptr<T>(), ld_b = 0;
      }
      const LstmBwd<T> a{acts.data_ptr<T>() + t * B * G, cs_p + t * B * H, dh_a, dh_b,
                         dc.data_ptr<T>(), gx_p + t * B * G, H, ld_b};
      for_rows(m, H, [&](int64_t b, int64_t j0, int64_t j1) {
        step_rows<0>(a, s.prev_row(cs_p, c0_p, t, b, H), b, j0, j1);
      });
      gemm_packed(m, (const T*)(gx_p + t * B * G), G, W, dh_p, Hr, false);
    }
    return {grad_xw, grad_xw, dh, dc, grad_hproj};
  }
  if (cell == kGRU) {
    const Tensor &acts = saved.at(1), &hn_seq = saved.at(2);
    Tensor grad_hw = new_seq(s, G, opts);
    T* gw_p = grad_hw.data_ptr<T>();
    const T* h0_p = h0.data_ptr<T>();
    for (int64_t k = s.T - 1; k >= 0; --k) {
      const int64_t t = s.at(k), m = s.rows(t);
      if (m == 0) continue;
      const GruBwd<T> a{acts.data_ptr<T>() + t * B * G, hn_seq.data_ptr<T>() + t * B * H,
                        gh_p + t * B * H, dh_p, gx_p + t * B * G, gw_p + t * B * G, H};
      for_rows(m, H, [&](int64_t b, int64_t j0, int64_t j1) {
        step_rows(a, s.prev_row(hs_p, h0_p, t, b, H), b, j0, j1);
      });
      gemm_packed(m, (const T*)(gw_p + t * B * G), G, W, dh_p, H, true);
    }
    return {grad_xw, grad_hw, dh, Tensor(), Tensor()};
  }
  for (int64_t k = s.T - 1; k >= 0; --k) {
    const int64_t t = s.at(k), m = s.rows(t);
    if (m == 0) continue;
    const RnnBwd<T> a{hs_p + t * B * H, dh_p, gh_p + t * B * H, gx_p + t * B * G, H, cell == kRNNRelu};
    for_rows(m, H, [&](int64_t b, int64_t j0, int64_t j1) { step_rows(a, b, j0, j1); });
    gemm_packed(m, (const T*)(gx_p + t * B * G), G, W, dh_p, H, false);
  }
  return {grad_xw, grad_xw, dh, Tensor(), Tensor()};
}

// ---------------------------------------------------------------------------------------------
// Variants: the same time loops with the options of docs/variants.md. Kept apart from the plain
// loops above so that `variant=None` runs exactly the plain code; the cell kernels are shared
// (the LSTM ones through compile-time flags).
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Var {
  const T *ln_w = nullptr, *ln_b = nullptr;    // [G]
  const T *lnc_w = nullptr, *lnc_b = nullptr;  // [H]
  const T* peep = nullptr;                     // [3,H]
  const T* mask = nullptr;                     // [B,Hr]
  const T *zh = nullptr, *zc = nullptr;        // [T,B,Hr], [T,B,H]
  const bool* reset = nullptr;                 // [T,B]
  bool reset_after = true;
};

// fn(std::integral_constant<int, F>()) for the runtime flags F, one of Fs: compile-time LSTM
// flags, instantiated only for the combinations that can occur.
template <int... Fs, typename Fn>
void with_flags(int flags, const Fn& fn) {
  const bool done = ((flags == Fs ? (fn(std::integral_constant<int, Fs>()), true) : false) || ...);
  TORCH_CHECK(done, "fastrnn: unsupported LSTM variant flags ", flags);
}

// One variant forward step: hs = h_in W^T per chunk, then either the gate math per chunk while the
// chunk is in cache (no layer norm), or, with the layer norm of the hidden product (which needs
// each row's whole product), per row: normalise, gate math of all chunks. Then row_end(b) for
// what needs a whole row of gates (LSTM state update, layer norm of c).
template <typename T, typename Rows, typename RowEnd>
void variant_step(const ChunkedWeight<T>& W, int64_t m, const T* h_in, T* hs, const T* ln_w,
                  const T* ln_b, T* hat, T* rstd, const Rows& rows, bool has_end, const RowEnd& row_end) {
  const int64_t G = W.ng * W.H, nch = W.chunks();
  const bool par = nch > 1 && at::get_num_threads() > 1 && m * G * W.Hr >= (1 << 16);
  if (!ln_w) {
    fused_step(W, m, h_in, hs, rows);
    if (!has_end) return;
  } else {
    auto gemm_work = [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        gemm_block(m, W.B.width(c), W.Hr, h_in, W.Hr, W.B.panel(c), W.B.width(c), hs + W.ng * c * W.CH, G, false);
      release_gemm();
    };
    if (par) at::parallel_for(0, nch, 1, gemm_work);
    else gemm_work(0, nch);
  }
  at::parallel_for(0, m, std::max<int64_t>(1, 4096 / G), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      if (ln_w) {
        ln_row(hs + b * G, ln_w, ln_b, W.ng, W.H, W.CH, hat ? hat + b * G : nullptr, rstd ? rstd + b : nullptr);
        for (int64_t j0 = 0; j0 < W.H; j0 += W.CH) rows(b, j0, std::min(W.H, j0 + W.CH));
      }
      if (has_end) row_end(b);
    }
  });
}

// dst = z prev + (1 - z) next over rows [0, m) of K units: zoneout of a state.
template <typename T>
void zoneout_mix(int64_t m, int64_t K, const T* z, const T* prev, const T* next, T* dst) {
  for (int64_t i = 0; i < m * K; ++i) dst[i] = z[i] * prev[i] + (T(1) - z[i]) * next[i];
}

template <typename T>
std::vector<Tensor> forward_variant_impl(int64_t cell, Tensor xw, const Tensor& w_hh,
                                         const c10::optional<Tensor>& b_hh, const Tensor& h0,
                                         const c10::optional<Tensor>& c0, const c10::optional<Tensor>& w_hr,
                                         const c10::optional<Tensor>& batch_sizes, bool reverse,
                                         bool training, const Var<T>& v) {
  const Steps s = make_steps(xw, reverse, batch_sizes);
  const int64_t B = s.B, G = xw.size(2), Hr = h0.size(1);
  const bool proj = w_hr.has_value() && w_hr->defined();
  const int64_t ng = cell == kLSTM ? 4 : cell == kGRU ? 3 : 1, H = G / ng;
  const bool lstm = cell == kLSTM, gru_before = cell == kGRU && !v.reset_after;
  const bool ln = v.ln_w, lnc = lstm && v.lnc_w, zone_c = lstm && v.zc;
  auto opts = xw.options();
  const Tensor bias = bias_or_zeros(b_hh, G, opts);
  Tensor h_seq = new_seq(s, Hr, opts);
  Tensor h = h0.clone();
  Tensor hs = at::empty({B, G}, opts);
  Tensor hin = v.mask ? at::empty({B, Hr}, opts) : Tensor();   // h_prev * rec_mask
  Tensor hnew = v.zh ? at::empty({B, Hr}, opts) : Tensor();    // h_new before zoneout
  T* xw_p = xw.data_ptr<T>();
  T* hs_p = hs.data_ptr<T>();
  T* hseq_p = h_seq.data_ptr<T>();
  T* h_p = h.data_ptr<T>();
  const T* h0_p = h0.data_ptr<T>();
  const T* bias_p = bias.data_ptr<T>();
  Tensor hw_hat, hw_rstd;  // saved layer-norm statistics of the hidden product
  if (ln && training) hw_hat = new_seq(s, G, opts), hw_rstd = at::zeros({s.T, B}, opts);
  // The step's left operand: h_prev (after reset) times the dropout mask.
  auto begin_step = [&](int64_t t, int64_t m, T* c_p, const T* c0_p) -> const T* {
    if (v.reset)
      for (int64_t b = 0; b < m; ++b)
        if (v.reset[t * B + b]) {
          std::memcpy(h_p + b * Hr, h0_p + b * Hr, sizeof(T) * Hr);
          if (c_p) std::memcpy(c_p + b * H, c0_p + b * H, sizeof(T) * H);
        }
    if (!v.mask) return h_p;
    T* hi = hin.data_ptr<T>();
    for (int64_t i = 0; i < m * Hr; ++i) hi[i] = h_p[i] * v.mask[i];
    return hi;
  };
  // h_t = zh h_prev + (1 - zh) h_new into h_seq[t], then the running state.
  auto end_step = [&](int64_t t, int64_t m, const T* h_new) {
    T* h_t = hseq_p + t * B * Hr;
    if (v.zh) zoneout_mix(m, Hr, v.zh + t * B * Hr, (const T*)h_p, h_new, h_t);
    std::memcpy(h_p, h_t, sizeof(T) * m * Hr);
  };
  auto hat_at = [&](int64_t t) { return hw_hat.defined() ? hw_hat.data_ptr<T>() + t * B * G : nullptr; };
  auto rstd_at = [&](int64_t t) { return hw_rstd.defined() ? hw_rstd.data_ptr<T>() + t * B : nullptr; };
  std::vector<Tensor> out, extra;

  if (lstm) {
    Tensor c = c0->clone();
    T* c_p = c.data_ptr<T>();
    const T* c0_p = c0->data_ptr<T>();
    Tensor c_seq = training ? new_seq(s, H, opts) : Tensor();
    Tensor hu_seq = proj ? (training ? new_seq(s, H, opts) : at::empty({1, B, H}, opts)) : Tensor();
    const bool sep = zone_c || lnc;
    // c_new: saved with zoneout (c_seq holds c_t), else scratch; c_hat, c_rstd saved with LN of c
    const bool save_cnew = training && (v.zh || v.zc);
    Tensor cnew_seq = save_cnew ? new_seq(s, H, opts) : (sep ? at::empty({1, B, H}, opts) : Tensor());
    Tensor c_hat = lnc ? (training ? new_seq(s, H, opts) : at::empty({1, B, H}, opts)) : Tensor();
    Tensor c_rstd = lnc && training ? at::zeros({s.T, B}, opts) : Tensor();
    c10::optional<PackedB<T>> P;
    if (proj) P.emplace(PackedB<T>::transposed(w_hr->data_ptr<T>(), Hr, H, panel_width(Hr), opts));
    const ChunkedWeight<T> W(w_hh, ng, H);
    const int flags = (v.peep ? kPeep : 0) | (sep ? kSepC : 0) | (lnc ? kLnC : 0);
    const int state_flags = (lnc ? kLnC : 0) | (zone_c ? kZoneC : 0);
    for (int64_t k = 0; k < s.T; ++k) {
      const int64_t t = s.at(k), m = s.rows(t);
      if (m == 0) continue;
      const T* h_in = begin_step(t, m, c_p, c0_p);
      T* h_t = hseq_p + t * B * Hr;
      T* h_new = v.zh ? hnew.data_ptr<T>() : h_t;
      T* hu = proj ? hu_seq.data_ptr<T>() + (training ? t * B * H : 0) : h_new;
      T* cn = sep ? cnew_seq.data_ptr<T>() + (save_cnew ? t * B * H : 0) : nullptr;
      LstmFwd<T> a{xw_p + t * B * G, hs_p, bias_p, c_p, hu, H};
      a.peep = v.peep, a.c_new = cn;
      const LstmState<T> st{cn, c_p, a.gates, v.zc ? v.zc + t * B * H : nullptr, v.lnc_w, v.lnc_b,
                            lnc ? c_hat.data_ptr<T>() + (training ? t * B * H : 0) : nullptr,
                            c_rstd.defined() ? c_rstd.data_ptr<T>() + t * B : nullptr, hu, H};
      auto row_end = [&](int64_t b) {
        switch (state_flags) {
          case 0: return state_row<0>(st, b);
          case kLnC: return state_row<kLnC>(st, b);
          case kZoneC: return state_row<kZoneC>(st, b);
          default: return state_row<kLnC | kZoneC>(st, b);
        }
      };
      with_flags<0, kPeep, kSepC, kSepC | kPeep, kSepC | kLnC, kSepC | kLnC | kPeep>(flags, [&](auto fc) {
        constexpr int F = decltype(fc)::value;
        variant_step(W, m, h_in, hs_p, v.ln_w, v.ln_b, hat_at(t), rstd_at(t),
                     [&](int64_t b, int64_t j0, int64_t j1) { step_rows<F>(a, b, j0, j1); }, sep, row_end);
      });
      if (proj) gemm_packed(m, (const T*)hu, H, *P, h_new, Hr, false);
      end_step(t, m, h_new);
      if (training) std::memcpy(c_seq.data_ptr<T>() + t * B * H, c_p, sizeof(T) * m * H);
    }
    out = {h_seq, h, c};
    if (training) {
      out.insert(out.end(), {h_seq, xw, c_seq});
      if (proj) out.push_back(hu_seq);
      if (ln) out.insert(out.end(), {hw_hat, hw_rstd});
      if (lnc) out.insert(out.end(), {c_hat, c_rstd});
      if (save_cnew) out.push_back(cnew_seq);
    }
    return out;
  }

  if (cell == kGRU) {
    Tensor hn_seq = training ? new_seq(s, H, opts) : at::empty({1, B, H}, opts);
    if (gru_before) {
      // two products per step: [r, z] rows of W_hh on h_in, then the n rows on u = r * h_in
      const ChunkedWeight<T> Wrz(w_hh.narrow(0, 0, 2 * H), 2, H), Wn(w_hh.narrow(0, 2 * H, H), 1, H);
      Tensor u = at::empty({B, H}, opts);
      for (int64_t k = 0; k < s.T; ++k) {
        const int64_t t = s.at(k), m = s.rows(t);
        if (m == 0) continue;
        const T* h_in = begin_step(t, m, nullptr, nullptr);
        T* h_new = v.zh ? hnew.data_ptr<T>() : hseq_p + t * B * H;
        const GruRzFwd<T> a{xw_p + t * B * G, hs_p, bias_p, h_in, u.data_ptr<T>(), H};
        fused_step(Wrz, m, h_in, hs_p, [&](int64_t b, int64_t j0, int64_t j1) { vrows(a, b, j0, j1); });
        const GruNFwd<T> n{xw_p + t * B * G, hs_p, bias_p, h_p, h_new,
                           hn_seq.data_ptr<T>() + (training ? t * B * H : 0), H};
        fused_step(Wn, m, (const T*)u.data_ptr<T>(), hs_p, [&](int64_t b, int64_t j0, int64_t j1) { vrows(n, b, j0, j1); });
        end_step(t, m, h_new);
      }
    } else {
      const ChunkedWeight<T> W(w_hh, ng, H);
      for (int64_t k = 0; k < s.T; ++k) {
        const int64_t t = s.at(k), m = s.rows(t);
        if (m == 0) continue;
        const T* h_in = begin_step(t, m, nullptr, nullptr);
        T* h_new = v.zh ? hnew.data_ptr<T>() : hseq_p + t * B * H;
        const GruFwd<T> a{xw_p + t * B * G, hs_p, bias_p, h_p, h_new,
                          hn_seq.data_ptr<T>() + (training ? t * B * H : 0), H};
        variant_step(W, m, h_in, hs_p, v.ln_w, v.ln_b, hat_at(t), rstd_at(t),
                     [&](int64_t b, int64_t j0, int64_t j1) { step_rows(a, b, j0, j1); }, false, [](int64_t) {});
        end_step(t, m, h_new);
      }
    }
    out = {h_seq, h, Tensor()};
    if (training) {
      out.insert(out.end(), {h_seq, xw, hn_seq});
      if (ln) out.insert(out.end(), {hw_hat, hw_rstd});
    }
    return out;
  }

  // RNN: with zoneout, h_new is saved (the activation's derivative needs it)
  Tensor hnew_seq = v.zh && training ? new_seq(s, H, opts) : Tensor();
  const ChunkedWeight<T> W(w_hh, ng, H);
  for (int64_t k = 0; k < s.T; ++k) {
    const int64_t t = s.at(k), m = s.rows(t);
    if (m == 0) continue;
    const T* h_in = begin_step(t, m, nullptr, nullptr);
    T* h_new = !v.zh ? hseq_p + t * B * H : hnew_seq.defined() ? hnew_seq.data_ptr<T>() + t * B * H : hnew.data_ptr<T>();
    const RnnFwd<T> a{xw_p + t * B * G, hs_p, bias_p, h_new, H, cell == kRNNRelu};
    variant_step(W, m, h_in, hs_p, v.ln_w, v.ln_b, hat_at(t), rstd_at(t),
                 [&](int64_t b, int64_t j0, int64_t j1) { step_rows(a, b, j0, j1); }, false, [](int64_t) {});
    end_step(t, m, h_new);
  }
  out = {h_seq, h, Tensor()};
  if (training) {
    out.push_back(h_seq);
    if (ln) out.insert(out.end(), {hw_hat, hw_rstd});
    if (v.zh) out.push_back(hnew_seq);
  }
  return out;
}

// Variant backward. Per step: dh_new = (1 - zh) (dh + grad_h_seq[t]) and the zoneout part zh (...)
// kept in dh; the cell's gate gradients; the layer norm's backward turning the gradient of hw into
// that of the raw product (grad_hw); dg = grad_hw W_hh; then dh_prev = dh + (GRU: dh_new z) +
// rec_mask dg, which a reset row hands to grad_h0 instead (and likewise dc to grad_c0).
// Returns {grad_xw, grad_hw, grad_h0, grad_c0, grad_hproj, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b,
// peephole, u_seq}: u_seq [T,B,H] = r * h_in (GRU reset_after=False) for dW_hn = grad_hw[..., 2H:]^T u.
template <typename T>
std::vector<Tensor> backward_variant_impl(int64_t cell, const Tensor& grad_h_seq, const Tensor& grad_h_T,
                                          const c10::optional<Tensor>& grad_c_T, const Tensor& w_hh,
                                          const c10::optional<Tensor>& w_hr, const Tensor& h0,
                                          const c10::optional<Tensor>& c0,
                                          const c10::optional<Tensor>& batch_sizes, bool reverse,
                                          const std::vector<Tensor>& saved, const Var<T>& v) {
  const Tensor& h_seq = saved.at(0);
  const Steps s = make_steps(h_seq, reverse, batch_sizes);
  const int64_t B = s.B, Hr = h_seq.size(2), G = w_hh.size(0);
  const bool proj = w_hr.has_value() && w_hr->defined();
  const int64_t H = cell == kLSTM ? G / 4 : cell == kGRU ? G / 3 : G;
  const bool lstm = cell == kLSTM, gru = cell == kGRU, gru_before = gru && !v.reset_after;
  const bool ln = v.ln_w, lnc = lstm && v.lnc_w;
  auto opts = h_seq.options();
  // the saved layout of forward_variant_impl
  size_t idx = lstm ? 3 + proj : gru ? 3 : 1;
  Tensor hw_hat, hw_rstd, c_hat, c_rstd, new_saved;
  if (ln) hw_hat = saved.at(idx), hw_rstd = saved.at(idx + 1), idx += 2;
  if (lnc) c_hat = saved.at(idx), c_rstd = saved.at(idx + 1), idx += 2;
  if ((lstm && (v.zh || v.zc)) || (!lstm && !gru && v.zh)) new_saved = saved.at(idx++);

  Tensor grad_xw = new_seq(s, G, opts);
  Tensor grad_hw = (gru || ln) ? new_seq(s, G, opts) : grad_xw;
  Tensor dh = grad_h_T.clone();
  Tensor dnew = at::empty({B, Hr}, opts), dg = at::empty({B, Hr}, opts), zeros = at::zeros({B, H}, opts);
  Tensor gh0 = v.reset ? at::zeros_like(h0) : Tensor();
  Tensor acc_ln = ln ? at::zeros({B, 2 * G}, opts) : Tensor();
  T* dh_p = dh.data_ptr<T>();
  T* dnew_p = dnew.data_ptr<T>();
  T* dg_p = dg.data_ptr<T>();
  T* gx_p = grad_xw.data_ptr<T>();
  T* gw_p = grad_hw.data_ptr<T>();
  const T* gh_p = grad_h_seq.data_ptr<T>();
  const T* hs_p = h_seq.data_ptr<T>();
  const T* h0_p = h0.data_ptr<T>();
  const T* zeros_p = zeros.data_ptr<T>();
  auto h_prev = [&](int64_t t, int64_t b) -> const T* {
    return (v.reset && v.reset[t * B + b]) ? h0_p + b * Hr : s.prev_row(hs_p, h0_p, t, b, Hr);
  };
  auto pre = [&](int64_t t, int64_t m) {
    const T* gh = gh_p + t * B * Hr;
    if (v.zh) {
      const T* z = v.zh + t * B * Hr;
      for (int64_t i = 0; i < m * Hr; ++i) {
        const T tot = dh_p[i] + gh[i];
        dnew_p[i] = (T(1) - z[i]) * tot, dh_p[i] = z[i] * tot;
      }
    } else {
      for (int64_t i = 0; i < m * Hr; ++i) dnew_p[i] = dh_p[i] + gh[i], dh_p[i] = T(0);
    }
  };
  auto ln_bwd = [&](int64_t t, int64_t m) {
    if (!ln) return;
    const T* dhw = (gru ? gw_p : gx_p) + t * B * G;
    at::parallel_for(0, m, std::max<int64_t>(1, 4096 / G), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        ln_bwd_row(dhw + b * G, hw_hat.data_ptr<T>() + (t * B + b) * G, hw_rstd.data_ptr<T>()[t * B + b],
                   v.ln_w, gw_p + (t * B + b) * G, acc_ln.data_ptr<T>() + b * 2 * G,
                   acc_ln.data_ptr<T>() + b * 2 * G + G, G);
    });
  };
  auto post = [&](int64_t t, int64_t m, bool add_dnew, T* dc_p, T* gc0_p) {
    for (int64_t b = 0; b < m; ++b) {
      T* d = dh_p + b * Hr;
      const T* g = dg_p + b * Hr;
      const T* dn = dnew_p + b * Hr;
      const T* mk = v.mask ? v.mask + b * Hr : nullptr;
      for (int64_t j = 0; j < Hr; ++j) d[j] += (add_dnew ? dn[j] : T(0)) + (mk ? mk[j] * g[j] : g[j]);
      if (v.reset && v.reset[t * B + b]) {
        T* g0 = gh0.data_ptr<T>() + b * Hr;
        for (int64_t j = 0; j < Hr; ++j) g0[j] += d[j], d[j] = T(0);
        if (dc_p)
          for (int64_t j = 0; j < H; ++j) gc0_p[b * H + j] += dc_p[b * H + j], dc_p[b * H + j] = T(0);
      }
    }
  };
  auto grads = [&](std::vector<Tensor> out) {
    const Tensor none;
    if (ln) {
      const Tensor sum = acc_ln.sum(0);
      out.insert(out.end(), {sum.narrow(0, 0, G), sum.narrow(0, G, G)});
    } else {
      out.insert(out.end(), {none, none});
    }
    return out;
  };

  if (lstm) {
    const Tensor &acts = saved.at(1), &c_seq = saved.at(2);
    Tensor dc = grad_c_T->clone();
    Tensor gc0 = v.reset ? at::zeros_like(*c0) : Tensor();
    Tensor grad_hproj, dhu;
    c10::optional<PackedB<T>> P;
    if (proj) {
      grad_hproj = new_seq(s, Hr, opts);
      dhu = at::empty({B, H}, opts);
      P.emplace(PackedB<T>::rows(w_hr->data_ptr<T>(), Hr, H, H, panel_width(H), opts));
    }
    Tensor acc_peep = v.peep ? at::zeros({B, 3 * H}, opts) : Tensor();
    Tensor acc_lnc = lnc ? at::zeros({B, 2 * H}, opts) : Tensor();
    const PackedB<T> W = PackedB<T>::rows(w_hh.data_ptr<T>(), G, Hr, Hr, panel_width(Hr), opts);
    const T* c0_p = c0->data_ptr<T>();
    const T* cs_p = c_seq.data_ptr<T>();
    const T* cn_p = new_saved.defined() ? new_saved.data_ptr<T>() : cs_p;  // c_new
    T* dc_p = dc.data_ptr<T>();
    const int flags = (v.peep ? kPeep : 0) | (lnc ? kLnC : 0) | (v.zc ? kZoneC : 0);
    for (int64_t k = s.T - 1; k >= 0; --k) {
      const int64_t t = s.at(k), m = s.rows(t);
      if (m == 0) continue;
      pre(t, m);
      const T* dh_a = dnew_p;
      if (proj) {
        std::memcpy(grad_hproj.data_ptr<T>() + t * B * Hr, dnew_p, sizeof(T) * m * Hr);
        gemm_packed(m, (const T*)dnew_p, Hr, *P, dhu.data_ptr<T>(), H, false);
        dh_a = dhu.data_ptr<T>();
      }
      LstmBwd<T> a{acts.data_ptr<T>() + t * B * G, cn_p + t * B * H, dh_a, zeros_p, dc_p, gx_p + t * B * G, H, 0};
      a.peep = v.peep, a.acc_peep = v.peep ? acc_peep.data_ptr<T>() : nullptr;
      a.zc = v.zc ? v.zc + t * B * H : nullptr;
      if (lnc) {
        a.c_hat = c_hat.data_ptr<T>() + t * B * H, a.c_rstd = c_rstd.data_ptr<T>() + t * B;
        a.lnc_w = v.lnc_w, a.lnc_b = v.lnc_b, a.acc_lnc = acc_lnc.data_ptr<T>();
      }
      auto c_prev = [&](int64_t b) {
        return (v.reset && v.reset[t * B + b]) ? c0_p + b * H : s.prev_row(cs_p, c0_p, t, b, H);
      };
      with_flags<0, kPeep, kLnC, kLnC | kPeep, kZoneC, kZoneC | kPeep, kZoneC | kLnC, kZoneC | kLnC | kPeep>(
          flags, [&](auto fc) {
            constexpr int F = decltype(fc)::value;
            if constexpr (F & kLnC) {  // whole rows: the layer norm's backward needs row means
              at::parallel_for(0, m, std::max<int64_t>(1, 2048 / H), [&](int64_t b0, int64_t b1) {
                for (int64_t b = b0; b < b1; ++b) step_rows<F>(a, c_prev(b), b, 0, H);
              });
            } else {
              for_rows(m, H, [&](int64_t b, int64_t j0, int64_t j1) { step_rows<F>(a, c_prev(b), b, j0, j1); });
            }
          });
      ln_bwd(t, m);
      gemm_packed(m, (const T*)(gw_p + t * B * G), G, W, dg_p, Hr, false);
      post(t, m, false, dc_p, v.reset ? gc0.data_ptr<T>() : nullptr);
    }
    std::vector<Tensor> out = grads({grad_xw, grad_hw, v.reset ? dh + gh0 : dh, v.reset ? dc + gc0 : dc, grad_hproj});
    if (lnc) {
      const Tensor sum = acc_lnc.sum(0);
      out.insert(out.end(), {sum.narrow(0, 0, H), sum.narrow(0, H, H)});
    } else {
      out.insert(out.end(), {Tensor(), Tensor()});
    }
    out.push_back(v.peep ? acc_peep.sum(0).view({3, H}) : Tensor());
    out.push_back(Tensor());
    return out;
  }

  if (gru) {
    const Tensor &acts = saved.at(1), &hn_seq = saved.at(2);
    Tensor u_seq;
    if (gru_before) {
      u_seq = new_seq(s, H, opts);
      const T* w = w_hh.data_ptr<T>();
      const PackedB<T> Wn = PackedB<T>::rows(w + 2 * H * H, H, H, H, panel_width(H), opts);
      const PackedB<T> Wrz = PackedB<T>::rows(w, 2 * H, H, H, panel_width(H), opts);
      const Tensor ones = v.mask ? Tensor() : at::ones({B, H}, opts);
      for (int64_t k = s.T - 1; k >= 0; --k) {
        const int64_t t = s.at(k), m = s.rows(t);
        if (m == 0) continue;
        pre(t, m);
        const T* ac = acts.data_ptr<T>() + t * B * G;
        T *gx = gx_p + t * B * G, *gw = gw_p + t * B * G;
        const GruNBwd<T> a{ac, dnew_p, gx, gw, H};
        for_rows(m, H, [&](int64_t b, int64_t j0, int64_t j1) { vrows(a, h_prev(t, b), b, j0, j1); });
        gemm_packed(m, (const T*)(gw + 2 * H), G, Wn, dg_p, H, false);
        const GruRBwd<T> r{ac, v.mask ? v.mask : ones.data_ptr<T>(), dg_p, gx, gw, u_seq.data_ptr<T>() + t * B * H, H};
        for_rows(m, H, [&](int64_t b, int64_t j0, int64_t j1) { vrows(r, h_prev(t, b), b, j0, j1); });
        gemm_packed(m, (const T*)gw, G, Wrz, dg_p, H, true);
        post(t, m, true, nullptr, nullptr);
      }
    } else {
      const PackedB<T> W = PackedB<T>::rows(w_hh.data_ptr<T>(), G, Hr, Hr, panel_width(Hr), opts);
      for (int64_t k = s.T - 1; k >= 0; --k) {
        const int64_t t = s.at(k), m = s.rows(t);
        if (m == 0) continue;
        pre(t, m);
        const GruBwd<T> a{acts.data_ptr<T>() + t * B * G, hn_seq.data_ptr<T>() + t * B * H, zeros_p, dnew_p,
                          gx_p + t * B * G, gw_p + t * B * G, H};
        for_rows(m, H, [&](int64_t b, int64_t j0, int64_t j1) { step_rows(a, h_prev(t, b), b, j0, j1); });
        ln_bwd(t, m);
        gemm_packed(m, (const T*)(gw_p + t * B * G), G, W, dg_p, H, false);
        post(t, m, true, nullptr, nullptr);
      }
    }
    std::vector<Tensor> out = grads({grad_xw, grad_hw, v.reset ? dh + gh0 : dh, Tensor(), Tensor()});
    out.insert(out.end(), {Tensor(), Tensor(), Tensor(), u_seq});
    return out;
  }

  const PackedB<T> W = PackedB<T>::rows(w_hh.data_ptr<T>(), G, Hr, Hr, panel_width(Hr), opts);
  const T* hn_p = new_saved.defined() ? new_saved.data_ptr<T>() : hs_p;  // h_new
  for (int64_t k = s.T - 1; k >= 0; --k) {
    const int64_t t = s.at(k), m = s.rows(t);
    if (m == 0) continue;
    pre(t, m);
    const RnnBwd<T> a{hn_p + t * B * H, dnew_p, zeros_p, gx_p + t * B * G, H, cell == kRNNRelu};
    for_rows(m, H, [&](int64_t b, int64_t j0, int64_t j1) { step_rows(a, b, j0, j1); });
    ln_bwd(t, m);
    gemm_packed(m, (const T*)(gw_p + t * B * G), G, W, dg_p, H, false);
    post(t, m, false, nullptr, nullptr);
  }
  std::vector<Tensor> out = grads({grad_xw, grad_hw, v.reset ? dh + gh0 : dh, Tensor(), Tensor()});
  out.insert(out.end(), {Tensor(), Tensor(), Tensor(), Tensor()});
  return out;
}

bool has(const c10::optional<Tensor>& t) { return t.has_value() && t->defined(); }

// ---------------------------------------------------------------------------------------------
// Entry-point checks: every size, dtype, device and layout the loops rely on (they index raw
// pointers), so that a direct call of the extension with bad tensors raises instead of reading
// or writing out of bounds. The Python layers check the same first (fastrnn/ops/checks.py).
// ---------------------------------------------------------------------------------------------
int64_t gates_of(int64_t cell) {
  TORCH_CHECK(cell >= kLSTM && cell <= kRNNRelu, "fastrnn cpp backend: unknown cell code ", cell,
              " (0 LSTM, 1 GRU, 2 RNN tanh, 3 RNN relu)");
  return cell == kLSTM ? 4 : cell == kGRU ? 3 : 1;
}

void check_shape(const Tensor& t, at::IntArrayRef want, const char* name) {
  TORCH_CHECK(t.sizes() == want, "fastrnn cpp backend: ", name, " has shape ", t.sizes(), ", expected ", want);
}

struct Dims {
  int64_t T, B, G, H, Hr;
};

// w_hh [G, Hr], h0 [B, Hr], c0 [B, H] (LSTM), w_hr [Hr, H] (LSTM; without it Hr = H), batch_sizes
// against T and B (make_steps checks its entries).
Dims check_recurrence(int64_t cell, int64_t T, int64_t B, const Tensor& w_hh, const Tensor& h0,
                      const c10::optional<Tensor>& c0, const c10::optional<Tensor>& w_hr) {
  const int64_t ng = gates_of(cell);
  TORCH_CHECK(w_hh.dim() == 2, "fastrnn cpp backend: w_hh must be 2-D [G, Hr], got ", w_hh.sizes());
  const int64_t G = w_hh.size(0), Hr = w_hh.size(1), H = G / ng;
  TORCH_CHECK(G > 0 && G % ng == 0 && Hr > 0, "fastrnn cpp backend: w_hh has shape ", w_hh.sizes(),
              "; G must be a positive multiple of ", ng, " and Hr positive");
  if (has(w_hr)) {
    TORCH_CHECK(cell == kLSTM, "fastrnn cpp backend: w_hr (projection) is an LSTM option");
    check_shape(*w_hr, {Hr, H}, "w_hr");
  } else {
    TORCH_CHECK(Hr == H, "fastrnn cpp backend: w_hh has shape ", w_hh.sizes(), "; without w_hr it must be [G, H = G/",
                ng, " = ", H, "]");
  }
  check_shape(h0, {B, Hr}, "h0");
  if (cell == kLSTM) {
    TORCH_CHECK(has(c0), "LSTM needs c0");
    check_shape(*c0, {B, H}, "c0");
  }
  return Dims{T, B, G, H, Hr};
}

Dims check_forward(int64_t cell, const Tensor& xw, const Tensor& w_hh, const c10::optional<Tensor>& b_hh,
                   const Tensor& h0, const c10::optional<Tensor>& c0, const c10::optional<Tensor>& w_hr) {
  TORCH_CHECK(xw.dim() == 3, "fastrnn cpp backend: xw must be 3-D [T, B, G], got ", xw.sizes());
  const Dims d = check_recurrence(cell, xw.size(0), xw.size(1), w_hh, h0, c0, w_hr);
  check_shape(xw, {d.T, d.B, d.G}, "xw");
  if (has(b_hh)) check_shape(*b_hh, {d.G}, "b_hh");
  return d;
}

// The backward's arguments and `saved` against what forward_impl / forward_variant_impl save for
// these flags (the layout of fastrnn.ops.recurrence.saved_layout).
Dims check_backward(int64_t cell, const Tensor& grad_h_seq, const Tensor& grad_h_T,
                    const c10::optional<Tensor>& grad_c_T, const Tensor& w_hh, const c10::optional<Tensor>& w_hr,
                    const Tensor& h0, const c10::optional<Tensor>& c0, const std::vector<Tensor>& saved, bool ln,
                    bool ln_c, bool zoneout_h, bool zoneout_c) {
  TORCH_CHECK(!saved.empty(), "rnn_backward needs the tensors saved by a training forward");
  const Tensor& h_seq = saved[0];
  TORCH_CHECK(h_seq.dim() == 3, "fastrnn cpp backend: saved[0] (h_seq) must be 3-D [T, B, Hr], got ", h_seq.sizes());
  const Dims d = check_recurrence(cell, h_seq.size(0), h_seq.size(1), w_hh, h0, c0, w_hr);
  const int64_t T = d.T, B = d.B, G = d.G, H = d.H, Hr = d.Hr;
  check_shape(grad_h_seq, {T, B, Hr}, "grad_h_seq");
  check_shape(grad_h_T, {B, Hr}, "grad_h_T");
  const bool lstm = cell == kLSTM, gru = cell == kGRU;
  if (lstm) {
    TORCH_CHECK(has(grad_c_T), "fastrnn cpp backend: LSTM backward needs grad_c_T");
    check_shape(*grad_c_T, {B, H}, "grad_c_T");
  }
  std::vector<std::vector<int64_t>> want = {{T, B, Hr}};
  if (lstm || gru) want.insert(want.end(), {{T, B, G}, {T, B, H}});
  if (lstm && has(w_hr)) want.push_back({T, B, H});
  if (ln) want.insert(want.end(), {{T, B, G}, {T, B}});
  if (lstm && ln_c) want.insert(want.end(), {{T, B, H}, {T, B}});
  if ((lstm && (zoneout_h || zoneout_c)) || (!lstm && !gru && zoneout_h)) want.push_back({T, B, H});
  TORCH_CHECK(saved.size() == want.size(), "fastrnn cpp backend: saved holds ", saved.size(),
              " tensors, expected ", want.size(), " (what the forward of the same configuration saves)");
  for (size_t k = 0; k < saved.size(); ++k) {
    const Tensor& t = saved[k];
    TORCH_CHECK(t.defined() && t.device().is_cpu() && t.scalar_type() == grad_h_seq.scalar_type() &&
                    t.is_contiguous(),
                "fastrnn cpp backend: saved[", k, "] must be a contiguous CPU ", grad_h_seq.scalar_type(), " tensor");
    TORCH_CHECK(t.sizes() == at::IntArrayRef(want[k]), "fastrnn cpp backend: saved[", k, "] has shape ", t.sizes(),
                ", expected ", at::IntArrayRef(want[k]));
  }
  return d;
}

void check_inputs(const Tensor& ref, std::initializer_list<c10::optional<Tensor>> ts) {
  TORCH_CHECK(ref.device().is_cpu(), "fastrnn cpp backend: tensors must be on the CPU");
  TORCH_CHECK(ref.scalar_type() == at::kFloat || ref.scalar_type() == at::kDouble,
              "fastrnn cpp backend: float32 or float64 only, got ", ref.scalar_type());
  for (const auto& t : ts) {
    if (!t.has_value() || !t->defined()) continue;
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == ref.scalar_type(),
                "fastrnn cpp backend: every tensor must be a CPU ", ref.scalar_type(), " tensor");
    TORCH_CHECK(t->is_contiguous(), "fastrnn cpp backend: tensors must be contiguous");
  }
}

std::vector<Tensor> rnn_forward(int64_t cell, Tensor xw, Tensor w_hh, c10::optional<Tensor> b_hh,
                                Tensor h0, c10::optional<Tensor> c0, c10::optional<Tensor> w_hr,
                                c10::optional<Tensor> batch_sizes, bool reverse, bool training) {
  check_inputs(xw, {xw, w_hh, b_hh, h0, c0, w_hr});
  check_forward(cell, xw, w_hh, b_hh, h0, c0, w_hr);
  return AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "fastrnn_rnn_forward", [&] {
    return forward_impl<scalar_t>(cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, training);
  });
}

std::vector<Tensor> rnn_backward(int64_t cell, Tensor grad_h_seq, Tensor grad_h_T,
                                 c10::optional<Tensor> grad_c_T, Tensor w_hh,
                                 c10::optional<Tensor> w_hr, Tensor h0, c10::optional<Tensor> c0,
                                 c10::optional<Tensor> batch_sizes, bool reverse,
                                 std::vector<Tensor> saved) {
  check_inputs(grad_h_seq, {grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0});
  check_backward(cell, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0, saved, false, false, false, false);
  return AT_DISPATCH_FLOATING_TYPES(grad_h_seq.scalar_type(), "fastrnn_rnn_backward", [&] {
    return backward_impl<scalar_t>(cell, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0,
                                   batch_sizes, reverse, saved);
  });
}

// Checks the variant tensors (docs/variants.md, fastrnn.ops.recurrence.Variant) and points a Var at them.
template <typename T>
Var<T> make_var(const Tensor& ref, int64_t cell, int64_t steps, int64_t B, int64_t G, int64_t Hr,
                const c10::optional<Tensor>& ln_w, const c10::optional<Tensor>& ln_b,
                const c10::optional<Tensor>& lnc_w, const c10::optional<Tensor>& lnc_b,
                const c10::optional<Tensor>& peep, const c10::optional<Tensor>& mask,
                const c10::optional<Tensor>& zh, const c10::optional<Tensor>& zc,
                const c10::optional<Tensor>& reset, bool reset_after) {
  check_inputs(ref, {ln_w, ln_b, lnc_w, lnc_b, peep, mask, zh, zc});
  const int64_t H = cell == kLSTM ? G / 4 : cell == kGRU ? G / 3 : G;
  auto check = [](const c10::optional<Tensor>& t, int64_t n, const char* what) {
    TORCH_CHECK(!has(t) || t->numel() == n, "fastrnn cpp backend: ", what, " has ", t->numel(),
                " elements, expected ", n);
  };
  TORCH_CHECK(has(ln_w) == has(ln_b) && has(lnc_w) == has(lnc_b),
              "fastrnn cpp backend: a layer norm needs both its weight and its bias");
  TORCH_CHECK(cell == kLSTM || (!has(lnc_w) && !has(peep) && !has(zc)),
              "fastrnn cpp backend: ln_c, peephole and zoneout_c are LSTM options");
  TORCH_CHECK(reset_after || cell == kGRU, "fastrnn cpp backend: reset_after=False is a GRU option");
  TORCH_CHECK(reset_after || !has(ln_w),
              "fastrnn cpp backend: layer norm with reset_after=False is not defined (docs/variants.md)");
  check(ln_w, G, "ln_hh_weight"), check(ln_b, G, "ln_hh_bias"), check(lnc_w, H, "ln_c_weight");
  check(lnc_b, H, "ln_c_bias"), check(peep, 3 * H, "peephole"), check(mask, B * Hr, "rec_mask");
  check(zh, steps * B * Hr, "zoneout_h"), check(zc, steps * B * H, "zoneout_c");
  if (has(reset))
    TORCH_CHECK(reset->scalar_type() == at::kBool && reset->is_contiguous() && reset->numel() == steps * B &&
                    reset->device().is_cpu(),
                "fastrnn cpp backend: reset must be a contiguous [T, B] bool CPU tensor");
  auto p = [](const c10::optional<Tensor>& t) { return has(t) ? t->data_ptr<T>() : nullptr; };
  Var<T> v;
  v.ln_w = p(ln_w), v.ln_b = p(ln_b), v.lnc_w = p(lnc_w), v.lnc_b = p(lnc_b), v.peep = p(peep);
  v.mask = p(mask), v.zh = p(zh), v.zc = p(zc);
  v.reset = has(reset) ? reset->data_ptr<bool>() : nullptr;
  v.reset_after = reset_after;
  return v;
}

std::vector<Tensor> rnn_forward_variant(int64_t cell, Tensor xw, Tensor w_hh, c10::optional<Tensor> b_hh,
                                        Tensor h0, c10::optional<Tensor> c0, c10::optional<Tensor> w_hr,
                                        c10::optional<Tensor> batch_sizes, bool reverse, bool training,
                                        c10::optional<Tensor> ln_w, c10::optional<Tensor> ln_b,
                                        c10::optional<Tensor> lnc_w, c10::optional<Tensor> lnc_b,
                                        c10::optional<Tensor> peep, c10::optional<Tensor> mask,
                                        c10::optional<Tensor> zh, c10::optional<Tensor> zc,
                                        c10::optional<Tensor> reset, bool reset_after) {
  check_inputs(xw, {xw, w_hh, b_hh, h0, c0, w_hr});
  check_forward(cell, xw, w_hh, b_hh, h0, c0, w_hr);
  return AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "fastrnn_rnn_forward_variant", [&] {
    const auto v = make_var<scalar_t>(xw, cell, xw.size(0), xw.size(1), xw.size(2), h0.size(1), ln_w, ln_b,
                                      lnc_w, lnc_b, peep, mask, zh, zc, reset, reset_after);
    return forward_variant_impl<scalar_t>(cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, training, v);
  });
}

std::vector<Tensor> rnn_backward_variant(int64_t cell, Tensor grad_h_seq, Tensor grad_h_T,
                                         c10::optional<Tensor> grad_c_T, Tensor w_hh,
                                         c10::optional<Tensor> w_hr, Tensor h0, c10::optional<Tensor> c0,
                                         c10::optional<Tensor> batch_sizes, bool reverse,
                                         std::vector<Tensor> saved, c10::optional<Tensor> ln_w,
                                         c10::optional<Tensor> ln_b, c10::optional<Tensor> lnc_w,
                                         c10::optional<Tensor> lnc_b, c10::optional<Tensor> peep,
                                         c10::optional<Tensor> mask, c10::optional<Tensor> zh,
                                         c10::optional<Tensor> zc, c10::optional<Tensor> reset,
                                         bool reset_after) {
  check_inputs(grad_h_seq, {grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0});
  check_backward(cell, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0, saved, has(ln_w), has(lnc_w), has(zh),
                 has(zc));
  return AT_DISPATCH_FLOATING_TYPES(grad_h_seq.scalar_type(), "fastrnn_rnn_backward_variant", [&] {
    const auto v = make_var<scalar_t>(grad_h_seq, cell, grad_h_seq.size(0), grad_h_seq.size(1), w_hh.size(0),
                                      grad_h_seq.size(2), ln_w, ln_b, lnc_w, lnc_b, peep, mask, zh, zc, reset,
                                      reset_after);
    return backward_variant_impl<scalar_t>(cell, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0,
                                           batch_sizes, reverse, saved, v);
  });
}

// ---------------------------------------------------------------------------------------------
// The big GEMMs of the op code (input projection, input and weight gradients), on the same
// GEMM as the recurrence. 2-D contiguous float32/float64 tensors.
// ---------------------------------------------------------------------------------------------
void check_mat(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64");
}

// x [N,I] w [G,I] b [G] -> x w^T + b [N,G]
Tensor linear(Tensor x, Tensor w, c10::optional<Tensor> b) {
  check_mat(x, "x"), check_mat(w, "w");
  TORCH_CHECK(x.size(1) == w.size(1) && w.scalar_type() == x.scalar_type(), "linear: shape/dtype mismatch");
  const int64_t N = x.size(0), I = x.size(1), G = w.size(0);
  const bool has_b = b.has_value() && b->defined();
  TORCH_CHECK(!has_b || (b->numel() == G && b->scalar_type() == x.scalar_type() && b->device().is_cpu()),
              "linear: b must be a CPU tensor of G = ", G, " elements and x's dtype");
  Tensor out = at::empty({N, G}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastrnn_linear", [&] {
    const auto wt = PackedB<scalar_t>::transposed(w.data_ptr<scalar_t>(), G, I, panel_width(G, N), w.options());
    gemm_packed<scalar_t>(N, x.data_ptr<scalar_t>(), I, wt, out.data_ptr<scalar_t>(), G, false,
                          has_b ? b->contiguous().data_ptr<scalar_t>() : nullptr);
  });
  return out;
}

// a [M,K] b [K,N] -> a b
Tensor mm(Tensor a, Tensor b) {
  check_mat(a, "a"), check_mat(b, "b");
  TORCH_CHECK(a.size(1) == b.size(0) && a.scalar_type() == b.scalar_type(), "mm: shape/dtype mismatch");
  Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "fastrnn_mm", [&] {
    const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
    const auto bp = PackedB<scalar_t>::rows(b.data_ptr<scalar_t>(), K, N, N, panel_width(N, M), b.options());
    gemm_packed<scalar_t>(M, a.data_ptr<scalar_t>(), K, bp, out.data_ptr<scalar_t>(), N, false);
  });
  return out;
}

// a [K,M] b [K,N] -> a^T b [M,N] (weight gradients: K = T*B rows). Transposes the smaller
// operand: with a the gate gradients (M = G) and b the inputs (N = I), b^T a then ^T is cheaper.
Tensor mm_tn(Tensor a, Tensor b) {
  check_mat(a, "a"), check_mat(b, "b");
  TORCH_CHECK(a.size(0) == b.size(0) && a.scalar_type() == b.scalar_type(), "mm_tn: shape/dtype mismatch");
  const int64_t K = a.size(0), M = a.size(1), N = b.size(1);
  Tensor out = at::empty({M, N}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "fastrnn_mm_tn", [&] {
    using T = scalar_t;
    if (M >= N) {
      Tensor bt = at::empty({N, K}, a.options()), ct = at::empty({N, M}, a.options());
      transpose(b.data_ptr<T>(), K, N, bt.data_ptr<T>());
      gemm<T>(N, M, K, bt.data_ptr<T>(), K, a.data_ptr<T>(), M, ct.data_ptr<T>(), M, false);
      transpose(ct.data_ptr<T>(), N, M, out.data_ptr<T>());
    } else {
      Tensor at_ = at::empty({M, K}, a.options());
      transpose(a.data_ptr<T>(), K, M, at_.data_ptr<T>());
      gemm<T>(M, N, K, at_.data_ptr<T>(), K, b.data_ptr<T>(), N, out.data_ptr<T>(), N, false);
    }
  });
  return out;
}


}  // namespace
}  // namespace fastrnn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastrnn C++ recurrence kernels (see csrc/rnn.cpp)";
  // The kernels touch no Python objects: let other Python threads run meanwhile, as torch's ops do.
  using nogil = py::call_guard<py::gil_scoped_release>;
  m.def("rnn_forward", &fastrnn::rnn_forward, nogil(),
        "One layer/direction forward: (cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, "
        "training) -> [h_seq, h_T, c_T, *saved]");
  m.def("rnn_backward", &fastrnn::rnn_backward, nogil(),
        "One layer/direction backward: -> [grad_xw, grad_hw, grad_h0, grad_c0, grad_hproj]");
  m.def("rnn_forward_variant", &fastrnn::rnn_forward_variant, nogil(),
        "rnn_forward with the variant tensors (ln_hh_weight, ln_hh_bias, ln_c_weight, ln_c_bias, "
        "peephole, rec_mask, zoneout_h, zoneout_c, reset, reset_after) appended");
  m.def("rnn_backward_variant", &fastrnn::rnn_backward_variant, nogil(),
        "rnn_backward with the variant tensors appended -> [grad_xw, grad_hw, grad_h0, grad_c0, "
        "grad_hproj, ln_hh_weight, ln_hh_bias, ln_c_weight, ln_c_bias, peephole, u_seq]");
  m.def("linear", &fastrnn::linear, nogil(), "x [N,I], w [G,I], b [G] -> x w^T + b");
  m.def("mm", &fastrnn::mm, nogil(), "a [M,K], b [K,N] -> a b");
  m.def("mm_tn", &fastrnn::mm_tn, nogil(), "a [K,M], b [K,N] -> a^T b");
  m.def("gemm_engine", &fastrnn::gemm_engine, "which GEMM the kernels use");
}
