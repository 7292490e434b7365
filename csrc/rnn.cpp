// fastrnn C++ backend: the whole time loop of one RNN layer and direction, forward and backward.
//
// Contract: fastrnn/backends/reference_rnn.py (the plain-PyTorch specification; its docstring has
// the forward and backward equations the kernels below follow). Shapes:
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
// Variants (docs/variants.md) run the same two time loops, `forward` and `backward`, and the same
// cell kernels, specialised by compile-time flags (`Flags`; 0 is the plain cell and compiles to
// the plain code). Per step: reset rows reload h0/c0, h_in = h_prev * rec_mask, the chunked GEMM;
// with the layer norm of the hidden product each row's whole product is normalised first (row
// statistics span every chunk), then its gate math; the layer norm of LSTM's c takes a row pass;
// then zoneout of h. Saved: the plain tuple (c_seq = c_t after zoneout), then hw_hat [T,B,G],
// hw_rstd [T,B] (layer norm), c_hat [T,B,H], c_rstd [T,B] (LSTM layer norm), c_new (LSTM) / h_new
// (RNN) [T,B,H] (zoneout): fastrnn.contract.rnn.saved_layout. GRU reset_after=False runs two
// products per step ([r, z] rows on h_in, then the n rows on r * h_in).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
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

bool has(const c10::optional<Tensor>& t) { return t.has_value() && t->defined(); }

template <typename T>
T* ptr(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

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

constexpr double kLnEps = 1e-5;  // fastrnn.contract.rnn.LN_EPS

// (mean, 1 / sqrt(var + eps)) of x[0, n): two passes, no cancellation.
template <typename T>
FASTRNN_INLINE std::pair<T, T> row_stats(const T* x, int64_t n) {
  const T mean = lane_sum<T>(n, [&](int64_t k) { return x[k]; }) / T(n);
  const T sq = lane_sum<T>(n, [&](int64_t k) { return (x[k] - mean) * (x[k] - mean); });
  return {mean, T(1) / std::sqrt(sq / T(n) + T(kLnEps))};
}

// Compile-time variant flags of the time loops and kernels (docs/variants.md). 0 is the plain
// cell and compiles to exactly the plain code; `dispatch` compiles the combinations that occur.
enum Flags : int {
  kVar = 1,      // a variant. Resets and rec_mask are tested at run time within it (each is one [B,Hr]
                 // pass per step: flags would only multiply the instantiations); backward keeps the
                 // gradient of h_new apart from the dh carried to the previous step
  kLn = 2,       // layer norm of the hidden product
  kZone = 4,     // zoneout of h (LSTM: and of c)
  kPeep = 8,     // LSTM peephole: i, f see c_prev, o sees c_new
  kLnC = 16,     // LSTM layer norm of c_new before its tanh
  kBefore = 32,  // GRU reset_after=False: two products per step
  kRZ = 64,      // kernels only, with kBefore: the stage of r and z (see GruFwd, GruBwd)
};

// ---------------------------------------------------------------------------------------------
// Cell kernels: the gate math of one row b and hidden units [j0, j1) (or a whole row), once per
// cell for plain and variants. Each is an argument struct, its `kernel<F>` overload and kFlags,
// the flags it reads (the plain cell and variants that change nothing in it share one copy).
// The forward ones read the input side from xw (torch gate layout, row stride G) and the hidden
// side from `hs`, which the chunked GEMM below lays out gate-major within the chunk:
// hs[b, ng*j0 + q*w + jj], w = j1 - j0.
// ---------------------------------------------------------------------------------------------
template <typename T>
struct LstmFwd {
  using scalar = T;
  static constexpr int kFlags = kPeep | kZone | kLnC;
  T* gates;                 // [B,4H] xw_t in, activated i,f,g,o out (saved for backward)
  const T* hs;              // hidden side h_in W_hh^T (layer norm: normalised), row stride 4H
  const T* bias;            // [4H] b_hh (zeros when absent)
  T* c;                     // [B,H] cell state: c_prev in, c_t out
  T* hu;                    // [B,H] o * tanh(c_new) out (kLnC: LstmLnC writes it)
  int64_t H;
  const T* peep = nullptr;  // kPeep: [3,H] rows i, f, o
  const T* zc = nullptr;    // kZone: [B,H] zoneout weights of c at this step
  T* c_new = nullptr;       // kZone, kLnC: [B,H] c_new out (saved with zoneout)
};

template <int F, typename T>
FASTRNN_INLINE void kernel(const LstmFwd<T>& a, int64_t b, int64_t j0, int64_t j1) {
  constexpr bool peep = F & kPeep, zone = F & kZone, lnc = F & kLnC;
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
  const T* __restrict zc = zone ? a.zc + b * H + j0 : nullptr;
  T* __restrict cnew = zone || lnc ? a.c_new + b * H + j0 : nullptr;
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
    if constexpr (zone || lnc) cnew[j] = cn;
    if constexpr (zone) c[j] = zc[j] * cp + (T(1) - zc[j]) * cn;
    else c[j] = cn;
    if constexpr (!lnc) hu[j] = o * tanh(cn);
    gi[j] = i, gf[j] = f, gg[j] = g, go[j] = o;
  }
}

// GRU. With kBefore (reset_after=False) in two stages, each after its own product: kRZ gives r, z
// and u = r * h_in from the [r, z] rows (hs row stride 2H), the second n and h_new from u W_hn^T
// (row stride H).
template <typename T>
struct GruFwd {
  using scalar = T;
  static constexpr int kFlags = kBefore | kRZ;
  T* xw;                    // [B,3H] input side in, activated r,z,n out
  const T* hs;              // hidden side, chunk layout, row stride 3H (kBefore: see above)
  const T* bias;            // [3H]
  const T* h;               // [B,H] h_prev
  T* h_out;                 // [B,H] h_new
  T* hn;                    // [B,H] the hidden-side n pre-activation out (saved for backward)
  int64_t H;
  const T* h_in = nullptr;  // kBefore: [B,H] h_prev * rec_mask
  T* u = nullptr;           // kBefore: [B,H] r * h_in out
};

template <int F, typename T>
FASTRNN_INLINE void kernel(const GruFwd<T>& a, int64_t b, int64_t j0, int64_t j1) {
  constexpr bool before = F & kBefore, rz = F & kRZ;
  constexpr int64_t ng = !before ? 3 : rz ? 2 : 1;  // gates in this stage's product
  const int64_t H = a.H, w = j1 - j0;
  T* __restrict x = a.xw + b * 3 * H + j0;
  const T* __restrict s = a.hs + b * ng * H + ng * j0;
  const T* __restrict bias = a.bias + j0;
  const T* __restrict h = a.h + b * H + j0;
  const T* __restrict hin = rz ? a.h_in + b * H + j0 : nullptr;
  T* __restrict ho = a.h_out + b * H + j0;
  T* __restrict hn = a.hn + b * H + j0;
  T* __restrict u = rz ? a.u + b * H + j0 : nullptr;
  FASTRNN_IVDEP
  for (int64_t j = 0; j < w; ++j) {
    if constexpr (rz) {
      const T r = sigmoid(x[j] + s[j] + bias[j]);
      x[j] = r, x[H + j] = sigmoid(x[H + j] + s[w + j] + bias[H + j]), u[j] = r * hin[j];
    } else if constexpr (!before) {
      const T r = sigmoid(x[j] + s[j] + bias[j]);
      const T z = sigmoid(x[H + j] + s[w + j] + bias[H + j]);
      const T hnj = s[2 * w + j] + bias[2 * H + j];
      const T n = tanh(x[2 * H + j] + r * hnj);
      ho[j] = (T(1) - z) * n + z * h[j];
      hn[j] = hnj;
      x[j] = r, x[H + j] = z, x[2 * H + j] = n;
    } else {  // after the n rows' product
      const T hnj = s[j] + bias[2 * H + j], z = x[H + j];
      const T n = tanh(x[2 * H + j] + hnj);
      ho[j] = (T(1) - z) * n + z * h[j];
      hn[j] = hnj, x[2 * H + j] = n;
    }
  }
}

template <typename T>
struct RnnFwd {
  using scalar = T;
  static constexpr int kFlags = 0;
  const T* xw;    // [B,H]
  const T* hs;    // [B,H] (one gate: the chunk layout is the plain layout)
  const T* bias;  // [H]
  T* h_out;       // [B,H]
  int64_t H;
  bool relu;
};

template <int F, typename T>
FASTRNN_INLINE void kernel(const RnnFwd<T>& a, int64_t b, int64_t j0, int64_t j1) {
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

// Layer norm of row b of the hidden product, in place in the chunk layout of `fused_step`
// (hs[ng*j0 + q*w + jj] is gate q, unit j0 + jj): hs = LN(hs) * w + b, with w, b and the saved
// hat in torch's gate layout.
template <typename T>
struct LnHh {
  using scalar = T;
  static constexpr int kFlags = 0;
  T* hs;                 // [B,G]
  const T *lw, *lb;      // [G]
  T* hat;                // [B,G] out, or null (not training)
  T* rstd;               // [B] out, or null
  int64_t ng, H, CH;
};

template <int F, typename T>
FASTRNN_INLINE void kernel(const LnHh<T>& a, int64_t b) {
  const int64_t G = a.ng * a.H;
  T* hs = a.hs + b * G;
  const auto [mean, rstd] = row_stats(hs, G);
  if (a.rstd) a.rstd[b] = rstd;
  for (int64_t j0 = 0; j0 < a.H; j0 += a.CH) {
    const int64_t w = std::min(a.CH, a.H - j0);
    for (int64_t q = 0; q < a.ng; ++q) {
      T* __restrict x = hs + a.ng * j0 + q * w;
      const T* __restrict gw = a.lw + q * a.H + j0;
      const T* __restrict gb = a.lb + q * a.H + j0;
      if (a.hat) {
        T* __restrict h = a.hat + b * G + q * a.H + j0;
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

// LSTM's layer norm of c (kLnC), once row b's c_new is complete: hu = o * tanh(LN(c_new)).
template <typename T>
struct LstmLnC {
  using scalar = T;
  static constexpr int kFlags = 0;
  const T* c_new;    // [B,H]
  const T* gates;    // [B,4H] activated (o read)
  const T *lw, *lb;  // [H]
  T* c_hat;          // [B,H] out
  T* rstd;           // [B] out, or null (not training)
  T* hu;             // [B,H] out
  int64_t H;
};

template <int F, typename T>
FASTRNN_INLINE void kernel(const LstmLnC<T>& a, int64_t b) {
  const int64_t H = a.H;
  const T* __restrict cn = a.c_new + b * H;
  const auto [mean, rstd] = row_stats(cn, H);
  if (a.rstd) a.rstd[b] = rstd;
  const T* __restrict o = a.gates + b * 4 * H + 3 * H;
  const T* __restrict lw = a.lw;
  const T* __restrict lb = a.lb;
  T* __restrict ch = a.c_hat + b * H;
  T* __restrict hu = a.hu + b * H;
  FASTRNN_IVDEP
  for (int64_t j = 0; j < H; ++j) {
    const T v = (cn[j] - mean) * rstd;
    ch[j] = v, hu[j] = o[j] * tanh(v * lw[j] + lb[j]);
  }
}

template <typename T>
struct LstmBwd {
  using scalar = T;
  static constexpr int kFlags = kPeep | kZone | kLnC;
  const T* acts;             // [B,4H] activated i,f,g,o of this step
  const T* c;                // [B,H] c_new of this step (= c_t without zoneout)
  const T* dh_a;             // [B,H] the gradient reaching hu = o*tanh(.) is dh_a + dh_b
  const T* dh_b;             // row stride ld_b (0: a broadcast zero row)
  T* dc;                     // [B,H] in: from step t+1, out: to step t-1
  T* grad;                   // [B,4H] pre-activation gradients out
  int64_t H, ld_b;
  const T* peep = nullptr;   // kPeep: [3,H]
  T* acc_peep = nullptr;     // kPeep: [B,3H] per-row running sums of the peephole gradient
  const T* zc = nullptr;     // kZone: [B,H] zoneout weights of c at this step
  const T* c_hat = nullptr;  // kLnC: [B,H] normalised c_new, and its [B] rstd
  const T* c_rstd = nullptr;
  const T* lnc_w = nullptr;  // kLnC: [H] gain, bias
  const T* lnc_b = nullptr;
  T* acc_lnc = nullptr;      // kLnC: [B,2H] per-row running sums of the gain and bias gradients
};

// kLnC needs whole rows (j0 = 0, j1 = H): the layer norm's backward takes two row means first.
// The per-row accumulators are owned by the work item of (row, units), so threads never share one.
template <int F, typename T>
FASTRNN_INLINE void kernel(const LstmBwd<T>& a, const T* c_prev, int64_t b, int64_t j0, int64_t j1) {
  constexpr bool peep = F & kPeep, zone = F & kZone, lnc = F & kLnC;
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
      return (da[j] + db[j]) * ai[3 * H + j] * d_tanh(tanh(lw[j] * ch[j] + lb[j])) * lw[j];
    }, ch);
    mean_g = s1 / T(H), mean_gx = s2 / T(H);
    rstd = a.c_rstd[b];
  }
  FASTRNN_IVDEP
  for (int64_t j = j0; j < j1; ++j) {
    const T i = ai[j], f = ai[H + j], g = ai[2 * H + j], o = ai[3 * H + j];
    const T dhu = da[j] + db[j];
    T ty, dcn;  // tanh(y), y = c_new (or LN(c_new)), and the gradient reaching c_new through it
    if constexpr (lnc) {
      ty = tanh(lw[j] * ch[j] + lb[j]);
      const T dy = dhu * o * d_tanh(ty);
      al[j] += dy * ch[j], al[H + j] += dy;
      dcn = rstd * (dy * lw[j] - mean_g - ch[j] * mean_gx);
    } else {
      ty = tanh(c[j]);
      dcn = dhu * o * d_tanh(ty);
    }
    const T dc_in = dc[j];
    T dct = (zone ? (T(1) - zc[j]) * dc_in : dc_in) + dcn;  // all that reaches c_new
    const T d_o = dhu * ty * d_sigmoid(o);
    if constexpr (peep) dct += d_o * pp[2 * H + j];
    const T d_i = dct * g * d_sigmoid(i);
    const T d_f = dct * cp[j] * d_sigmoid(f);
    gr[j] = d_i, gr[H + j] = d_f, gr[2 * H + j] = dct * i * d_tanh(g), gr[3 * H + j] = d_o;
    T dcp = dct * f;
    if constexpr (zone) dcp += zc[j] * dc_in;
    if constexpr (peep) {
      dcp += d_i * pp[j] + d_f * pp[H + j];
      ap[j] += d_i * cp[j], ap[H + j] += d_f * cp[j], ap[2 * H + j] += d_o * c[j];
    }
    dc[j] = dcp;
  }
}

// GRU. With kBefore (reset_after=False) in two stages: d_z and d_n, then (once du = d_n W_hn is
// known) kRZ: d_r and the h_in part du * r, in place in du.
template <typename T>
struct GruBwd {
  using scalar = T;
  static constexpr int kFlags = kBefore | kRZ;
  const T* acts;            // [B,3H] r,z,n
  const T* hn;              // [B,H] the hidden-side n pre-activation
  const T* gh;              // [B,H] gradient from the output at this step
  T* dh;                    // [B,H] in: from step t+1; out: the direct part dh*z (the GEMM adds the rest)
  T* grad_x;                // [B,3H] input-side pre-activation gradients
  T* grad_h;                // [B,3H] hidden-side pre-activation gradients
  int64_t H;
  const T* mask = nullptr;  // kRZ: [B,H] rec_mask (ones when absent)
  T* du = nullptr;          // kRZ: [B,H] d_n W_hn in, du * r out
};

template <int F, typename T>
FASTRNN_INLINE void kernel(const GruBwd<T>& a, const T* h_prev, int64_t b, int64_t j0, int64_t j1) {
  constexpr bool before = F & kBefore, rz = F & kRZ;
  const int64_t H = a.H;
  const T* __restrict ac = a.acts + b * 3 * H;
  const T* __restrict hn = a.hn + b * H;
  const T* __restrict gh = a.gh + b * H;
  const T* __restrict hp = h_prev;
  const T* __restrict mk = rz ? a.mask + b * H : nullptr;
  T* __restrict dh = a.dh + b * H;
  T* __restrict du = rz ? a.du + b * H : nullptr;
  T* __restrict gx = a.grad_x + b * 3 * H;
  T* __restrict gw = a.grad_h + b * 3 * H;
  FASTRNN_IVDEP
  for (int64_t j = j0; j < j1; ++j) {
    const T r = ac[j], z = ac[H + j], n = ac[2 * H + j];
    if constexpr (rz) {
      const T dr = du[j] * (hp[j] * mk[j]) * d_sigmoid(r);
      gx[j] = dr, gw[j] = dr, du[j] *= r;
    } else {
      const T d = dh[j] + gh[j];
      const T dn = d * (T(1) - z) * d_tanh(n);
      const T dz = d * (hp[j] - n) * d_sigmoid(z);
      gx[H + j] = dz, gx[2 * H + j] = dn, gw[H + j] = dz;
      if constexpr (before) {
        gw[2 * H + j] = dn;
      } else {
        const T dr = dn * hn[j] * d_sigmoid(r);
        gx[j] = dr, gw[j] = dr, gw[2 * H + j] = dn * r;
      }
      dh[j] = d * z;
    }
  }
}

template <typename T>
struct RnnBwd {
  using scalar = T;
  static constexpr int kFlags = 0;
  const T* h;   // [B,H] h_t (zoneout: h_new)
  const T* dh;  // [B,H] from step t+1
  const T* gh;  // [B,H] from the output
  T* grad;      // [B,H]
  int64_t H;
  bool relu;
};

template <int F, typename T>
FASTRNN_INLINE void kernel(const RnnBwd<T>& a, int64_t b, int64_t j0, int64_t j1) {
  const T* __restrict h = a.h + b * a.H;
  const T* __restrict dh = a.dh + b * a.H;
  const T* __restrict gh = a.gh + b * a.H;
  T* __restrict gr = a.grad + b * a.H;
  if (a.relu) {
    FASTRNN_IVDEP
    for (int64_t j = j0; j < j1; ++j) gr[j] = h[j] > T(0) ? dh[j] + gh[j] : T(0);
  } else {
    FASTRNN_IVDEP
    for (int64_t j = j0; j < j1; ++j) gr[j] = (dh[j] + gh[j]) * d_tanh(h[j]);
  }
}

// Backward of hw = LN(a) w + b for row b (torch layout): da = rstd (g - mean(g) - hat mean(g hat)),
// g = dhw w. `da` may be `dhw` (in place).
template <typename T>
struct LnHhBwd {
  using scalar = T;
  static constexpr int kFlags = 0;
  const T* dhw;   // [B,G] the gradient reaching hw
  const T* hat;   // [B,G] and rstd [B], saved by the forward
  const T* rstd;
  const T* lw;    // [G]
  T* da;          // [B,G] out
  T* acc;         // [B,2G] per-row running sums of the gain and bias gradients
  int64_t G;
};

template <int F, typename T>
FASTRNN_INLINE void kernel(const LnHhBwd<T>& a, int64_t b) {
  const int64_t G = a.G;
  const T* dhw = a.dhw + b * G;
  const T* hat = a.hat + b * G;
  const T* lw = a.lw;
  T* da = a.da + b * G;
  T* acc = a.acc + b * 2 * G;
  const auto [s1, s2] = lane_sum2<T>(G, [&](int64_t k) { return dhw[k] * lw[k]; }, hat);
  const T m1 = s1 / T(G), m2 = s2 / T(G), rstd = a.rstd[b];
  for (int64_t k = 0; k < G; ++k) acc[k] += dhw[k] * hat[k], acc[G + k] += dhw[k];
  for (int64_t k = 0; k < G; ++k) da[k] = rstd * (dhw[k] * lw[k] - m1 - hat[k] * m2);
}

// kernel<F>(k, args...): float through one FASTRNN_CLONES copy per kernel and flags (compiled per
// ISA and picked at load time, so the loops vectorise; GCC clones templates as it does plain
// functions), double directly.
template <int F, typename K, typename... A>
FASTRNN_CLONES void run_f32(const K& k, A... a) {
  kernel<F>(k, a...);
}
template <int F, typename K, typename... A>
FASTRNN_INLINE void run(const K& k, A... a) {
  if constexpr (std::is_same_v<typename K::scalar, float>) run_f32<F & K::kFlags>(k, a...);
  else kernel<F & K::kFlags>(k, a...);
}

// The recurrent weight as the forward step uses it: B = W_hh^T [Hr, ng*H] packed so that the
// panel of each chunk of hidden units [j0, j0+w) holds that chunk's gate columns gate-major
// (packed column ng*j0 + q*w + jj is W_hh row q*H + j0 + jj). One GEMM per chunk then yields
// exactly the pre-activations that chunk's gate math needs, and each thread keeps its panels
// in its own cache across all steps (at batch 1 the weights never leave L2).
//
// A call with fewer rows x steps than kPackRowSteps (a cell step at batch 1-8) reads W_hh in place
// instead (`raw`): one chunk of all H units, whose gate-major layout is torch's gate layout, so the
// product is one dot_rows call into hs [m, G] and the cell kernels run unchanged.
//
// A bfloat16 W_hh (float32 loops of a bfloat16 call, see `Low`) is packed into bf16 VNNI panels
// of the same chunk layout (`L`); each step's left operand h_prev is rounded to bf16 into `a16`
// [B, even(Hr)] once, before the chunks' products. A small call reads it in place (`raw16`,
// low_dot_rows: float32 h_prev, bf16 weights converted on the fly).
template <typename T>
struct ChunkedWeight {
  int64_t ng, H, Hr, CH;
  PackedB<T> B;
  const T* raw = nullptr;  // W_hh read in place (not packed)
  const bf16* raw16 = nullptr;  // bf16 W_hh read in place (a small call: low_dot_rows)
  bool low = false;
  PackedLow L;
  Tensor a16;  // the step's left operand in bf16: [rows, even(Hr)] bf16 (packed), [rows, Hr] float (raw16)

  static int64_t chunk_width(int64_t ng, int64_t H) {
    // panels of ~256 columns (brgemm's sweet spot) and at least two chunks for two threads
    const int64_t by_panel = (256 / ng + 15) / 16 * 16;
    const int64_t by_threads = ((H + 1) / 2 + 15) / 16 * 16;
    return std::max<int64_t>(16, std::min(by_panel, by_threads));
  }
  ChunkedWeight(const Tensor& w_hh, int64_t ng_, int64_t H_, bool pack, int64_t rows)
      : ng(ng_), H(H_), Hr(w_hh.size(1)), CH(pack ? chunk_width(ng_, H_) : H_) {
    B.K = Hr, B.N = ng * H, B.NB = ng * CH;
    if (w_hh.scalar_type() == at::kBFloat16 && !pack) {
      raw16 = w_hh.data_ptr<bf16>();
      a16 = at::empty({rows, Hr}, w_hh.options().dtype(at::kFloat));
      return;
    }
    if (w_hh.scalar_type() == at::kBFloat16) {
      low = true;
      L = PackedLow(Hr, ng * H, ng * CH);
      a16 = at::empty({rows, L.Kp}, w_hh.options());
      const bf16* w = w_hh.data_ptr<bf16>();
      at::parallel_for(0, L.panels(), 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t j0 = c * CH, wd = std::min(CH, H - j0);
          // packed column q*wd + jj of the chunk is W_hh row q*H + j0 + jj
          PackedLow::fill_cols(L.panel(c), Hr, ng * wd, [&](int64_t n) { return w + (n / wd * H + j0 + n % wd) * Hr; });
        }
      });
      return;
    }
    if (!pack) {
      raw = w_hh.data_ptr<T>();
      return;
    }
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

  // hs[0:m, chunk c's columns] (row stride G) = h_prev[0:m] W_hh^T[:, chunk c]; `a` is h_prev
  // for float / double, a16 (filled by `round`) for bf16
  void product(int64_t c, int64_t m, const void* a, T* hs, int64_t G) const {
    const int64_t j0 = c * CH;
    if constexpr (std::is_same_v<T, float>)
      if (low)
        return gemm_low_call(m, L.width(c), L.Kp, (const bf16*)a, L.Kp, L.panel(c), hs + ng * j0, G, false);
    gemm_block(m, B.width(c), Hr, (const T*)a, Hr, B.panel(c), B.width(c), hs + ng * j0, G, false);
  }
  // the left operand of this step's products: h_prev, or h_prev in bf16
  const void* operand(int64_t m, const T* h_prev) const {
    if constexpr (std::is_same_v<T, float>)
      if (raw16) {
        round_low_rows(m, Hr, h_prev, Hr, a16.data_ptr<float>());
        return a16.data_ptr<float>();
      }
    if (!low) return h_prev;
    to_low_rows(m, Hr, h_prev, Hr, a16.data_ptr<bf16>());
    return a16.data_ptr<bf16>();
  }
  void release() const {
    if (low) release_low();
    else release_gemm();
  }
};

// One forward step: per chunk, hs[0:m, chunk] = h_prev[0:m] W_hh^T[:, chunk] then the gate math
// for rows [0, m) of that chunk, while its pre-activations are still in cache. Threads split
// the chunks when the step is big enough to pay for waking them.
template <typename T, typename Rows>
void fused_step(const ChunkedWeight<T>& W, int64_t m, const T* h_prev, T* hs, const Rows& rows) {
  const int64_t G = W.ng * W.H, nch = W.chunks();
  if (W.raw || W.raw16) {
    if constexpr (std::is_same_v<T, float>)
      if (W.raw16) low_dot_rows(m, G, W.Hr, (const float*)W.operand(m, h_prev), W.Hr, W.raw16, W.Hr, hs, G, false);
    if (W.raw) dot_rows<T>(m, G, W.Hr, h_prev, W.Hr, W.raw, W.Hr, hs, G, false);
    for (int64_t b = 0; b < m; ++b) rows(b, 0, W.H);
    return;
  }
  const void* a = W.operand(m, h_prev);
  auto work = [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t j0 = c * W.CH, j1 = std::min(W.H, j0 + W.CH);
      W.product(c, m, a, hs, G);
      for (int64_t b = 0; b < m; ++b) rows(b, j0, j1);
    }
    W.release();
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

// The right operand B [K, N] (row-major, row stride ld) of a backward per-step product: packed
// once per call (threads over panels), or read in place by a call with fewer rows x steps than
// kPackRowSteps (csrc/gemm.h).
// A bfloat16 B (W_hh of a bfloat16 call) is packed into bf16 VNNI panels and each product's left
// operand rounded to bf16 into `a16` [rows, even(K)] first; in a small call it is read in place
// (low_axpy_rows).
template <typename T>
struct StepOperand {
  const T* b = nullptr;
  const bf16* b16 = nullptr;
  int64_t K, N, ld;
  c10::optional<PackedB<T>> packed;
  c10::optional<PackedLow> low;
  Tensor a16;

  // B: a [K, N] view with unit column stride (row stride ld)
  StepOperand(const Tensor& B, bool pack, int64_t rows, const at::TensorOptions& o)
      : K(B.size(0)), N(B.size(1)), ld(B.stride(0)) {
    if (B.scalar_type() == at::kBFloat16 && !pack) {
      b16 = B.data_ptr<bf16>();
      a16 = at::empty({rows, K}, B.options().dtype(at::kFloat));  // the left operand's bf16 values
      return;
    }
    if (B.scalar_type() == at::kBFloat16) {
      low.emplace(PackedLow::rows(B.data_ptr<bf16>(), K, N, ld, panel_width(N)));
      a16 = at::empty({rows, low->Kp}, B.options());
      return;
    }
    b = B.data_ptr<T>();
    if (pack) packed.emplace(PackedB<T>::rows(b, K, N, ld, panel_width(N), o));
  }
  // C[m, N] (+)= A[m, K] B
  void mul(int64_t m, const T* A, int64_t lda, T* C, int64_t ldc, bool add) const {
    if constexpr (std::is_same_v<T, float>) {
      if (b16) {
        round_low_rows(m, K, A, lda, a16.data_ptr<float>());
        return low_axpy_rows(m, N, K, a16.data_ptr<float>(), K, b16, ld, C, ldc, add);
      }
      if (low) {
        to_low_rows(m, K, A, lda, a16.data_ptr<bf16>());
        return gemm_low(m, a16.data_ptr<bf16>(), low->Kp, *low, C, ldc, add);
      }
    }
    if (packed) return gemm_packed(m, A, lda, *packed, C, ldc, add);
    gemm_call(m, N, K, A, lda, b, ld, C, ldc, add);
    release_gemm();
  }
};

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

// The variant's tensors (docs/variants.md, fastrnn.contract.rnn.Variant), checked by make_var.
template <typename T>
struct Var {
  const T *ln_w = nullptr, *ln_b = nullptr;    // [G]
  const T *lnc_w = nullptr, *lnc_b = nullptr;  // [H]
  const T* peep = nullptr;                     // [3,H]
  const T* mask = nullptr;                     // [B,Hr]
  const T *zh = nullptr, *zc = nullptr;        // [T,B,Hr], [T,B,H]
  const bool* reset = nullptr;                 // [T,B]
  int flags = 0;                               // Flags; 0: the plain cell
};

// Step t's slice of a [T,...] buffer, or the one slice of a [1,...] scratch buffer; null if undefined.
template <typename T>
T* step_slice(const Tensor& x, int64_t t) {
  return x.defined() ? x.data_ptr<T>() + (x.size(0) > 1 ? t * x.stride(0) : 0) : nullptr;
}

// One forward step of the cell kernel `k`: hs = h_in W^T and the gate math per chunk while the
// chunk is in cache (fused_step). With the layer norm of the hidden product (kLn), whose row
// statistics span every chunk, all products first, then per row: normalise, gate math of every
// chunk. Then LSTM's layer norm of c (kLnC), once a row's c_new is complete.
template <int F, typename T, typename K>
void step(const ChunkedWeight<T>& W, int64_t m, const T* h_in, T* hs, const K& k, const LnHh<T>& ln,
          const LstmLnC<T>& lnc) {
  if constexpr (F & kLn) fused_step(W, m, h_in, hs, [](int64_t, int64_t, int64_t) {});
  else fused_step(W, m, h_in, hs, [&](int64_t b, int64_t j0, int64_t j1) { run<F>(k, b, j0, j1); });
  if constexpr (F & (kLn | kLnC)) {
    at::parallel_for(0, m, std::max<int64_t>(1, 4096 / (W.ng * W.H)), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        if constexpr (F & kLn) {
          run<F>(ln, b);
          for (int64_t j0 = 0; j0 < W.H; j0 += W.CH) run<F>(k, b, j0, std::min(W.H, j0 + W.CH));
        }
        if constexpr (F & kLnC) run<F>(lnc, b);
      }
    });
  }
}

// dst = z prev + (1 - z) next over rows [0, m) of K units: zoneout of a state.
template <typename T>
void zoneout_mix(int64_t m, int64_t K, const T* z, const T* prev, const T* next, T* dst) {
  for (int64_t i = 0; i < m * K; ++i) dst[i] = z[i] * prev[i] + (T(1) - z[i]) * next[i];
}

// ---------------------------------------------------------------------------------------------
// Forward of cell C (kRNNTanh: both RNN cells, `relu` picks) with flags F. Returns {h_seq, h_T,
// c_T, *saved} (the saved layout above).
// ---------------------------------------------------------------------------------------------
template <int C, int F, typename T>
std::vector<Tensor> forward(Tensor xw, const Tensor& w_hh, const c10::optional<Tensor>& b_hh, const Tensor& h0,
                            const c10::optional<Tensor>& c0, const c10::optional<Tensor>& w_hr, const Steps& s,
                            bool training, bool relu, const Var<T>& v) {
  constexpr bool lstm = C == kLSTM, gru = C == kGRU, var = F & kVar, ln = F & kLn, zone = F & kZone;
  constexpr bool lnc = F & kLnC, before = F & kBefore;
  constexpr int64_t ng = lstm ? 4 : gru ? 3 : 1;
  const int64_t B = s.B, G = xw.size(2), H = G / ng, Hr = h0.size(1);
  const bool proj = has(w_hr);
  auto opts = xw.options();
  // [T,B,K] when saved (zeros when packed), else one [1,B,K] slice of scratch for every step
  auto seq = [&](bool save, int64_t K) { return save ? new_seq(s, K, opts) : at::empty({1, B, K}, opts); };
  auto slice = [](const Tensor& x, int64_t t) { return step_slice<T>(x, t); };
  const Tensor bias = bias_or_zeros(b_hh, G, opts);
  Tensor h_seq = new_seq(s, Hr, opts), h = h0.clone(), hs = at::empty({B, G}, opts);
  Tensor c = lstm ? c0->clone() : Tensor(), c_seq = lstm && training ? new_seq(s, H, opts) : Tensor();
  // o*tanh(c) lands in h_seq directly without a projection; with one it needs its own buffer
  Tensor hu_seq = proj ? seq(training, H) : Tensor(), hn_seq = gru ? seq(training, H) : Tensor();
  Tensor c_new = lstm && (zone || lnc) ? seq(training && zone, H) : Tensor();
  Tensor c_hat = lnc ? seq(training, H) : Tensor(), c_rstd = lnc && training ? at::zeros({s.T, B}, opts) : Tensor();
  Tensor hw_hat = ln && training ? new_seq(s, G, opts) : Tensor();
  Tensor hw_rstd = ln && training ? at::zeros({s.T, B}, opts) : Tensor();
  // zoneout: h_new before the mix (RNN saves it: the activation's derivative needs it)
  Tensor h_new = zone ? seq(training && !lstm && !gru, Hr) : Tensor();
  Tensor h_in = var && v.mask ? at::empty({B, Hr}, opts) : Tensor();  // h_prev * rec_mask
  Tensor u = before ? at::empty({B, H}, opts) : Tensor();               // r * h_in
  T *xw_p = xw.data_ptr<T>(), *hs_p = hs.data_ptr<T>(), *hseq_p = h_seq.data_ptr<T>(), *h_p = h.data_ptr<T>();
  T* c_p = ptr<T>(c);
  const T* bias_p = bias.data_ptr<T>();
  const bool pack = s.T * B >= kPackRowSteps;
  const ChunkedWeight<T> W(before ? w_hh.narrow(0, 0, 2 * H) : w_hh, before ? 2 : ng, H, pack, B);
  c10::optional<ChunkedWeight<T>> Wn;  // kBefore: the n rows, on u
  if constexpr (before) Wn.emplace(w_hh.narrow(0, 2 * H, H), 1, H, pack, B);
  c10::optional<PackedB<T>> P;  // W_hr^T [H, Hr]
  if (proj) P.emplace(PackedB<T>::transposed(w_hr->data_ptr<T>(), Hr, H, panel_width(Hr), opts));

  for (int64_t k = 0; k < s.T; ++k) {
    const int64_t t = s.at(k), m = s.rows(t);
    if (m == 0) continue;
    const T* hi = h_p;  // the step's left operand h_in
    if constexpr (var) {
      for (int64_t b = 0; v.reset && b < m; ++b)
        if (v.reset[t * B + b]) {
          std::memcpy(h_p + b * Hr, h0.data_ptr<T>() + b * Hr, sizeof(T) * Hr);
          if constexpr (lstm) std::memcpy(c_p + b * H, c0->data_ptr<T>() + b * H, sizeof(T) * H);
        }
      if (v.mask) {
        T* p = h_in.data_ptr<T>();
        for (int64_t i = 0; i < m * Hr; ++i) p[i] = h_p[i] * v.mask[i];
        hi = p;
      }
    }
    T* h_t = hseq_p + t * B * Hr;
    T* hnew = zone ? slice(h_new, t) : h_t;
    T* xw_t = xw_p + t * B * G;
    const LnHh<T> lnh{hs_p, v.ln_w, v.ln_b, slice(hw_hat, t), slice(hw_rstd, t), ng, H, W.CH};
    if constexpr (lstm) {
      T* hu = proj ? slice(hu_seq, t) : hnew;
      const LstmFwd<T> a{xw_t, hs_p, bias_p, c_p, hu, H, v.peep, zone ? v.zc + t * B * H : nullptr,
                         slice(c_new, t)};
      step<F>(W, m, hi, hs_p, a, lnh, {a.c_new, xw_t, v.lnc_w, v.lnc_b, slice(c_hat, t), slice(c_rstd, t), hu, H});
      if (proj) gemm_packed(m, (const T*)hu, H, *P, hnew, Hr, false);
    } else if constexpr (gru) {
      const GruFwd<T> a{xw_t, hs_p, bias_p, h_p, hnew, slice(hn_seq, t), H, hi, ptr<T>(u)};
      if constexpr (before) {  // [r, z] rows on h_in, then the n rows on u = r * h_in
        step<F | kRZ>(W, m, hi, hs_p, a, lnh, {});
        step<F>(*Wn, m, (const T*)a.u, hs_p, a, lnh, {});
      } else {
        step<F>(W, m, hi, hs_p, a, lnh, {});
      }
    } else {
      step<F>(W, m, hi, hs_p, RnnFwd<T>{xw_t, hs_p, bias_p, hnew, H, relu}, lnh, {});
    }
    if constexpr (zone) zoneout_mix(m, Hr, v.zh + t * B * Hr, (const T*)h_p, (const T*)hnew, h_t);
    std::memcpy(h_p, h_t, sizeof(T) * m * Hr);
    if (lstm && training) std::memcpy(slice(c_seq, t), c_p, sizeof(T) * m * H);
  }
  std::vector<Tensor> out = {h_seq, h, c};
  if (!training) return out;
  out.push_back(h_seq);
  if (lstm) out.insert(out.end(), {xw, c_seq});
  if (proj) out.push_back(hu_seq);
  if (gru) out.insert(out.end(), {xw, hn_seq});
  if (ln) out.insert(out.end(), {hw_hat, hw_rstd});
  if (lnc) out.insert(out.end(), {c_hat, c_rstd});
  if (zone && !gru) out.push_back(lstm ? c_new : h_new);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Backward: visits the steps in the opposite order; dh/dc carry the gradient w.r.t. the state.
// Per step: the gate gradients (threads over rows x hidden chunks), then one GEMM
// dh[0:m] (+)= grad_gates[0:m] W_hh. Returns {grad_xw, grad_hw, grad_h0, grad_c0, grad_hproj};
// grad_hproj [T,B,Hr] (with w_hr) is the total gradient reaching each projected output (the op code
// forms dW_hr = grad_hproj^T hu_seq). A variant keeps the gradient reaching h_new (dnew) apart:
// dnew = (1 - zh) (dh + grad_h_seq[t]), the zoneout part zh (...) stays in dh; the cell's gate
// gradients; the layer norm's backward turns the gradient of hw into that of the raw product
// (grad_hw); dg = grad_hw W_hh; then dh_prev = dh + (GRU: dnew z) + rec_mask dg, which a reset row
// hands to grad_h0 instead (and likewise dc to grad_c0). It appends the gradients of the variant's
// parameters: ln_hh_weight, ln_hh_bias, ln_c_weight, ln_c_bias, peephole.
// ---------------------------------------------------------------------------------------------
template <int C, int F, typename T>
std::vector<Tensor> backward(const Tensor& grad_h_seq, const Tensor& grad_h_T, const c10::optional<Tensor>& grad_c_T,
                             const Tensor& w_hh, const c10::optional<Tensor>& w_hr, const Tensor& h0,
                             const c10::optional<Tensor>& c0, const Steps& s, const std::vector<Tensor>& saved,
                             bool relu, const Var<T>& v) {
  constexpr bool lstm = C == kLSTM, gru = C == kGRU, var = F & kVar, ln = F & kLn, zone = F & kZone;
  constexpr bool lnc = F & kLnC, before = F & kBefore;
  constexpr int64_t ng = lstm ? 4 : gru ? 3 : 1;
  const Tensor& h_seq = saved.at(0);
  const int64_t B = s.B, Hr = h_seq.size(2), G = w_hh.size(0), H = G / ng;
  const bool proj = has(w_hr);
  auto opts = h_seq.options();
  size_t idx = lstm ? 3 + proj : gru ? 3 : 1;  // the saved layout of `forward`
  Tensor hw_hat, hw_rstd, c_hat, c_rstd, new_saved;
  if (ln) hw_hat = saved.at(idx), hw_rstd = saved.at(idx + 1), idx += 2;
  if (lnc) c_hat = saved.at(idx), c_rstd = saved.at(idx + 1), idx += 2;
  if (zone && !gru) new_saved = saved.at(idx);  // LSTM c_new, RNN h_new
  Tensor grad_xw = new_seq(s, G, opts);
  Tensor grad_hw = gru || ln ? new_seq(s, G, opts) : grad_xw;
  Tensor dh = grad_h_T.clone(), dc = lstm ? grad_c_T->clone() : Tensor();
  Tensor dnew = var ? at::empty({B, Hr}, opts) : Tensor(), dg = var ? at::empty({B, Hr}, opts) : Tensor();
  Tensor zeros = at::zeros({var ? B : 1, H}, opts);  // a zero gradient: rows of stride 0, or var's [B,H]
  Tensor gh0 = var && v.reset ? at::zeros_like(h0) : Tensor();  // what reset rows hand to h0, c0
  Tensor gc0 = lstm && var && v.reset ? at::zeros_like(*c0) : Tensor();
  Tensor acc_ln = ln ? at::zeros({B, 2 * G}, opts) : Tensor(), acc_lnc = lnc ? at::zeros({B, 2 * H}, opts) : Tensor();
  Tensor acc_peep = F & kPeep ? at::zeros({B, 3 * H}, opts) : Tensor();
  Tensor grad_hproj = proj ? new_seq(s, Hr, opts) : Tensor(), dhu = proj ? at::empty({B, H}, opts) : Tensor();
  const Tensor ones = before && !v.mask ? at::ones({B, H}, opts) : Tensor();
  // dh_in = grad_hw W_hh: W_hh [G, Hr] is the right operand as it is, packed once (kBefore: the
  // [r, z] rows; the n rows apart, Wn)
  const bool pack = s.T * B >= kPackRowSteps;
  const StepOperand<T> W(before ? w_hh.narrow(0, 0, 2 * H) : w_hh, pack, B, opts);
  c10::optional<StepOperand<T>> Wn, P;  // P: dhu = grad_hproj W_hr, W_hr [Hr, H]
  if (before) Wn.emplace(w_hh.narrow(0, 2 * H, H), pack, B, opts);
  if (proj) P.emplace(*w_hr, pack, B, opts);
  T *dh_p = dh.data_ptr<T>(), *dc_p = ptr<T>(dc), *dnew_p = ptr<T>(dnew), *dg_p = ptr<T>(dg);
  T *gx_p = grad_xw.data_ptr<T>(), *gw_p = grad_hw.data_ptr<T>();
  const T *gh_p = grad_h_seq.data_ptr<T>(), *hs_p = h_seq.data_ptr<T>(), *h0_p = h0.data_ptr<T>();
  const T *c0_p = lstm ? c0->data_ptr<T>() : nullptr, *zeros_p = zeros.data_ptr<T>();
  const T* acts_p = lstm || gru ? saved.at(1).data_ptr<T>() : nullptr;
  const T* st_p = lstm || gru ? saved.at(2).data_ptr<T>() : nullptr;  // LSTM c_seq, GRU hn_seq
  const T* new_p = ptr<T>(new_saved);
  // row b's state before step t (a reset row's: the initial state)
  auto prev = [&](const T* seq, const T* init, int64_t t, int64_t b, int64_t K) {
    if constexpr (var)
      if (v.reset && v.reset[t * B + b]) return init + b * K;
    return s.prev_row(seq, init, t, b, K);
  };

  for (int64_t k = s.T - 1; k >= 0; --k) {
    const int64_t t = s.at(k), m = s.rows(t);
    if (m == 0) continue;
    T *gx = gx_p + t * B * G, *gw = gw_p + t * B * G;
    const T* gh = gh_p + t * B * Hr;
    if constexpr (var) {
      const T* z = zone ? v.zh + t * B * Hr : nullptr;
      for (int64_t i = 0; i < m * Hr; ++i) {
        const T tot = dh_p[i] + gh[i];
        dnew_p[i] = zone ? (T(1) - z[i]) * tot : tot, dh_p[i] = zone ? z[i] * tot : T(0);
      }
    }
    // the gradient reaching h_new: var's dnew, or the plain cell's dh (+ gh, which the kernels add)
    T* d = var ? dnew_p : dh_p;
    const T* dgh = var ? zeros_p : gh;
    if constexpr (lstm) {
      const T *dh_a = d, *dh_b = dgh;
      int64_t ld_b = var ? 0 : Hr;
      if (proj) {
        T* gp = grad_hproj.data_ptr<T>() + t * B * Hr;
        for (int64_t i = 0; i < m * Hr; ++i) gp[i] = var ? d[i] : d[i] + gh[i];
        P->mul(m, gp, Hr, dhu.data_ptr<T>(), H, false);
        dh_a = dhu.data_ptr<T>(), dh_b = zeros_p, ld_b = 0;
      }
      const LstmBwd<T> a{acts_p + t * B * G, (zone ? new_p : st_p) + t * B * H, dh_a, dh_b, dc_p, gx, H, ld_b,
                         v.peep, ptr<T>(acc_peep), zone ? v.zc + t * B * H : nullptr, step_slice<T>(c_hat, t),
                         step_slice<T>(c_rstd, t), v.lnc_w, v.lnc_b, ptr<T>(acc_lnc)};
      auto rows = [&](int64_t b, int64_t j0, int64_t j1) { run<F>(a, prev(st_p, c0_p, t, b, H), b, j0, j1); };
      if constexpr (lnc) {  // whole rows: the layer norm's backward takes two row means first
        at::parallel_for(0, m, std::max<int64_t>(1, 2048 / H), [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) rows(b, 0, H);
        });
      } else {
        for_rows(m, H, rows);
      }
    } else if constexpr (gru) {
      const GruBwd<T> a{acts_p + t * B * G, st_p + t * B * H, dgh, d, gx, gw, H, v.mask ? v.mask : ptr<T>(ones),
                        dg_p};
      for_rows(m, H, [&](int64_t b, int64_t j0, int64_t j1) { run<F>(a, prev(hs_p, h0_p, t, b, H), b, j0, j1); });
      if constexpr (before) {  // du = d_n W_hn into dg, then d_r and du * r; below dg += [d_r, d_z] W_h{r,z}
        Wn->mul(m, gw + 2 * H, G, dg_p, H, false);
        for_rows(m, H, [&](int64_t b, int64_t j0, int64_t j1) {
          run<F | kRZ>(a, prev(hs_p, h0_p, t, b, H), b, j0, j1);
        });
      }
    } else {
      const RnnBwd<T> a{(zone ? new_p : hs_p) + t * B * H, d, dgh, gx, H, relu};
      for_rows(m, H, [&](int64_t b, int64_t j0, int64_t j1) { run<F>(a, b, j0, j1); });
    }
    if constexpr (!var) {
      W.mul(m, gw, G, dh_p, Hr, gru);  // GRU: onto the direct part dh z
    } else {
      if constexpr (ln) {
        const LnHhBwd<T> a{gru ? gw : gx, hw_hat.data_ptr<T>() + t * B * G, hw_rstd.data_ptr<T>() + t * B, v.ln_w,
                           gw, acc_ln.data_ptr<T>(), G};
        at::parallel_for(0, m, std::max<int64_t>(1, 4096 / G), [&](int64_t b0, int64_t b1) {
          for (int64_t b = b0; b < b1; ++b) run<F>(a, b);
        });
      }
      W.mul(m, gw, G, dg_p, Hr, before);
      for (int64_t b = 0; b < m; ++b) {  // dh_prev = dh + (GRU: dnew, now dh_new z) + rec_mask dg; resets
        T* dhb = dh_p + b * Hr;
        const T *g = dg_p + b * Hr, *dn = dnew_p + b * Hr, *mk = v.mask ? v.mask + b * Hr : nullptr;
        for (int64_t j = 0; j < Hr; ++j) dhb[j] += (gru ? dn[j] : T(0)) + (mk ? mk[j] * g[j] : g[j]);
        if (v.reset && v.reset[t * B + b]) {
          T* g0 = gh0.data_ptr<T>() + b * Hr;
          for (int64_t j = 0; j < Hr; ++j) g0[j] += dhb[j], dhb[j] = T(0);
          if constexpr (lstm) {
            T* gc = gc0.data_ptr<T>() + b * H;
            for (int64_t j = 0; j < H; ++j) gc[j] += dc_p[b * H + j], dc_p[b * H + j] = T(0);
          }
        }
      }
    }
  }
  std::vector<Tensor> out = {grad_xw, grad_hw, gh0.defined() ? dh + gh0 : dh, gc0.defined() ? dc + gc0 : dc,
                             grad_hproj};
  if (!var) return out;
  auto halves = [&](const Tensor& acc, int64_t n) {  // the per-row sums of (gain, bias) gradients
    const Tensor sum = acc.defined() ? acc.sum(0) : Tensor();
    out.push_back(acc.defined() ? sum.narrow(0, 0, n) : sum);
    out.push_back(acc.defined() ? sum.narrow(0, n, n) : sum);
  };
  halves(acc_ln, G), halves(acc_lnc, H);
  out.push_back(acc_peep.defined() ? acc_peep.sum(0).view({3, H}) : Tensor());
  return out;
}

// The flag sets that can occur for cell C (the combinations the entry points accept); only these
// are compiled. kRZ is the kernels' own.
template <int C>
constexpr bool valid(int F) {
  if (F == 0) return true;  // plain
  if (!(F & kVar) || ((F & kLnC) && !(F & kLn))) return false;
  if (C == kLSTM) return !(F & kBefore);
  if (F & (kPeep | kLnC)) return false;
  return C == kGRU ? !((F & kBefore) && (F & kLn)) : !(F & kBefore);
}

// fn(cell, flags) with both as std::integral_constant, for the runtime cell and flags. The RNN
// cells share one instantiation (C = kRNNTanh; the kernels take relu at run time).
template <typename Fn>
std::vector<Tensor> dispatch(int64_t cell, int flags, const Fn& fn) {
  std::vector<Tensor> out;
  auto for_cell = [&]<int C>(std::integral_constant<int, C> c) {
    auto one = [&]<int F>(std::integral_constant<int, F> f) {
      if constexpr (valid<C>(F)) {
        if (flags == F) {
          out = fn(c, f);
          return true;
        }
      }
      return false;
    };
    const bool done = [&]<int... Fs>(std::integer_sequence<int, Fs...>) {
      return (one(std::integral_constant<int, Fs>()) || ...);
    }(std::make_integer_sequence<int, kRZ>());
    TORCH_CHECK(done, "fastrnn cpp backend: unsupported variant flags ", flags, " for cell ", cell);
  };
  if (cell == kLSTM) for_cell(std::integral_constant<int, kLSTM>());
  else if (cell == kGRU) for_cell(std::integral_constant<int, kGRU>());
  else for_cell(std::integral_constant<int, kRNNTanh>());
  return out;
}

// ---------------------------------------------------------------------------------------------
// Entry-point checks: every size, dtype, device and layout the loops rely on (they index raw
// pointers), so that a direct call of the extension with bad tensors raises instead of reading
// or writing out of bounds. The Python layers check the same first (fastrnn/contract/checks.py).
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

// The backward's arguments and `saved` against what `forward` saves for
// these flags (the layout of fastrnn.contract.rnn.saved_layout).
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

// The variant's arguments as the entry points receive them.
struct VarArgs {
  c10::optional<Tensor> ln_w, ln_b, lnc_w, lnc_b, peep, mask, zh, zc, reset;
  bool reset_after;
};

// Checks the variant tensors (docs/variants.md, fastrnn.contract.rnn.Variant) and the combinations
// the loops are compiled for (check_variant's), and points a Var at them.
template <typename T>
Var<T> make_var(const Tensor& ref, int64_t cell, int64_t steps, int64_t B, int64_t G, int64_t Hr, const VarArgs& a) {
  check_inputs(ref, {a.ln_w, a.ln_b, a.lnc_w, a.lnc_b, a.peep, a.mask, a.zh, a.zc});
  const int64_t H = cell == kLSTM ? G / 4 : cell == kGRU ? G / 3 : G;
  auto check = [](const c10::optional<Tensor>& t, int64_t n, const char* what) {
    TORCH_CHECK(!has(t) || t->numel() == n, "fastrnn cpp backend: ", what, " has ", t->numel(),
                " elements, expected ", n);
  };
  TORCH_CHECK(has(a.ln_w) == has(a.ln_b) && has(a.lnc_w) == has(a.lnc_b),
              "fastrnn cpp backend: a layer norm needs both its weight and its bias");
  TORCH_CHECK(cell == kLSTM || (!has(a.lnc_w) && !has(a.peep) && !has(a.zc)),
              "fastrnn cpp backend: ln_c, peephole and zoneout_c are LSTM options");
  TORCH_CHECK(!has(a.lnc_w) || has(a.ln_w), "fastrnn cpp backend: ln_c comes with the hidden-product layer norm");
  TORCH_CHECK(cell != kLSTM || has(a.zh) == has(a.zc), "fastrnn cpp backend: LSTM zoneout needs both zh and zc");
  TORCH_CHECK(a.reset_after || cell == kGRU, "fastrnn cpp backend: reset_after=False is a GRU option");
  TORCH_CHECK(a.reset_after || !has(a.ln_w),
              "fastrnn cpp backend: layer norm with reset_after=False is not defined (docs/variants.md)");
  check(a.ln_w, G, "ln_hh_weight"), check(a.ln_b, G, "ln_hh_bias"), check(a.lnc_w, H, "ln_c_weight");
  check(a.lnc_b, H, "ln_c_bias"), check(a.peep, 3 * H, "peephole"), check(a.mask, B * Hr, "rec_mask");
  check(a.zh, steps * B * Hr, "zoneout_h"), check(a.zc, steps * B * H, "zoneout_c");
  if (has(a.reset))
    TORCH_CHECK(a.reset->scalar_type() == at::kBool && a.reset->is_contiguous() && a.reset->numel() == steps * B &&
                    a.reset->device().is_cpu(),
                "fastrnn cpp backend: reset must be a contiguous [T, B] bool CPU tensor");
  auto p = [](const c10::optional<Tensor>& t) { return has(t) ? t->data_ptr<T>() : nullptr; };
  Var<T> v;
  v.ln_w = p(a.ln_w), v.ln_b = p(a.ln_b), v.lnc_w = p(a.lnc_w), v.lnc_b = p(a.lnc_b), v.peep = p(a.peep);
  v.mask = p(a.mask), v.zh = p(a.zh), v.zc = p(a.zc);
  v.reset = has(a.reset) ? a.reset->data_ptr<bool>() : nullptr;
  v.flags = kVar | (v.ln_w ? kLn : 0) | (v.zh ? kZone : 0) | (v.peep ? kPeep : 0) | (v.lnc_w ? kLnC : 0) |
            (a.reset_after ? 0 : kBefore);
  return v;
}

// A bfloat16 call (W_hh in bf16) runs the float32 loops: W_hh's products in bf16 with float32
// accumulation (ChunkedWeight, StepOperand), states, gate math and saved tensors in float32. The
// entry points read the other bf16 inputs (xw may come in float32: the op's input projection
// accumulates in it) in float32 and return the outputs a caller sees in bf16; what only the
// backward reads stays float32 (fastrnn/backends/cpp_rnn.py: saved_layout).
struct Low {
  bool on;
  explicit Low(const Tensor& w_hh) : on(w_hh.scalar_type() == at::kBFloat16) {}
  Tensor up(const Tensor& t) const { return on && t.defined() && t.scalar_type() == at::kBFloat16 ? t.to(at::kFloat) : t; }
  c10::optional<Tensor> up(const c10::optional<Tensor>& t) const {
    return has(t) ? c10::optional<Tensor>(up(*t)) : t;
  }
  VarArgs up(const VarArgs& a) const {
    return VarArgs{up(a.ln_w), up(a.ln_b), up(a.lnc_w), up(a.lnc_b), up(a.peep), up(a.mask), up(a.zh), up(a.zc),
                   a.reset, a.reset_after};
  }
  void down(std::vector<Tensor>& out, std::initializer_list<size_t> which) const {
    for (size_t k : which)
      if (on && k < out.size() && out[k].defined()) out[k] = out[k].to(at::kBFloat16);
  }
};

// W_hh: a CPU tensor of ref's dtype, or bf16 with a float32 ref (a bf16 call, see Low).
void check_w_hh(const Tensor& w_hh, const Tensor& ref) {
  const bool low = w_hh.scalar_type() == at::kBFloat16 && ref.scalar_type() == at::kFloat;
  TORCH_CHECK(w_hh.device().is_cpu() && (w_hh.scalar_type() == ref.scalar_type() || low),
              "fastrnn cpp backend: every tensor must be a CPU ", ref.scalar_type(), " tensor");
  TORCH_CHECK(w_hh.is_contiguous(), "fastrnn cpp backend: tensors must be contiguous");
  TORCH_CHECK(!low || low_gemm_usable(), "fastrnn cpp backend: bfloat16 needs oneDNN's bf16 brgemm, which this "
              "CPU or build does not have (AVX512_BF16 or AMX)");
}

// The entry points: every check first, then the loops. `va` null: the plain cell.
std::vector<Tensor> forward_entry(int64_t cell, const Tensor& xw, const Tensor& w_hh, const c10::optional<Tensor>& b_hh,
                                  const Tensor& h0, const c10::optional<Tensor>& c0,
                                  const c10::optional<Tensor>& w_hr, const c10::optional<Tensor>& batch_sizes,
                                  bool reverse, bool training, const VarArgs* va) {
  check_inputs(xw, {xw, b_hh, h0, c0, w_hr});
  check_w_hh(w_hh, xw);
  check_forward(cell, xw, w_hh, b_hh, h0, c0, w_hr);
  return AT_DISPATCH_FLOATING_TYPES(xw.scalar_type(), "fastrnn_rnn_forward", [&] {
    const auto v = va ? make_var<scalar_t>(xw, cell, xw.size(0), xw.size(1), xw.size(2), h0.size(1), *va)
                      : Var<scalar_t>();
    const Steps s = make_steps(xw, reverse, batch_sizes);
    return dispatch(cell, v.flags, [&](auto c, auto f) {
      return forward<decltype(c)::value, decltype(f)::value>(xw, w_hh, b_hh, h0, c0, w_hr, s, training,
                                                             cell == kRNNRelu, v);
    });
  });
}

std::vector<Tensor> backward_entry(int64_t cell, const Tensor& grad_h_seq, const Tensor& grad_h_T,
                                   const c10::optional<Tensor>& grad_c_T, const Tensor& w_hh,
                                   const c10::optional<Tensor>& w_hr, const Tensor& h0,
                                   const c10::optional<Tensor>& c0, const c10::optional<Tensor>& batch_sizes,
                                   bool reverse, const std::vector<Tensor>& saved, const VarArgs* va) {
  check_inputs(grad_h_seq, {grad_h_seq, grad_h_T, grad_c_T, w_hr, h0, c0});
  check_w_hh(w_hh, grad_h_seq);
  check_backward(cell, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0, saved, va && has(va->ln_w),
                 va && has(va->lnc_w), va && has(va->zh), va && has(va->zc));
  return AT_DISPATCH_FLOATING_TYPES(grad_h_seq.scalar_type(), "fastrnn_rnn_backward", [&] {
    const auto v = va ? make_var<scalar_t>(grad_h_seq, cell, grad_h_seq.size(0), grad_h_seq.size(1), w_hh.size(0),
                                           grad_h_seq.size(2), *va)
                      : Var<scalar_t>();
    const Steps s = make_steps(saved[0], reverse, batch_sizes);
    return dispatch(cell, v.flags, [&](auto c, auto f) {
      return backward<decltype(c)::value, decltype(f)::value>(grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0, s,
                                                              saved, cell == kRNNRelu, v);
    });
  });
}

// The forward's outputs of a bf16 call: h_seq (also saved[0]), h_T, c_T in bf16.
std::vector<Tensor> low_outputs(const Low& low, std::vector<Tensor>& out) {
  low.down(out, {0, 1, 2});
  if (low.on && out.size() > 3) out[3] = out[0];
  return out;
}

std::vector<Tensor> rnn_forward(int64_t cell, Tensor xw, Tensor w_hh, c10::optional<Tensor> b_hh,
                                Tensor h0, c10::optional<Tensor> c0, c10::optional<Tensor> w_hr,
                                c10::optional<Tensor> batch_sizes, bool reverse, bool training) {
  const Low low(w_hh);
  auto out = forward_entry(cell, low.up(xw), w_hh, low.up(b_hh), low.up(h0), low.up(c0), low.up(w_hr), batch_sizes,
                           reverse, training, nullptr);
  return low_outputs(low, out);
}

std::vector<Tensor> rnn_backward(int64_t cell, Tensor grad_h_seq, Tensor grad_h_T,
                                 c10::optional<Tensor> grad_c_T, Tensor w_hh,
                                 c10::optional<Tensor> w_hr, Tensor h0, c10::optional<Tensor> c0,
                                 c10::optional<Tensor> batch_sizes, bool reverse,
                                 std::vector<Tensor> saved) {
  const Low low(w_hh);
  if (!saved.empty()) saved[0] = low.up(saved[0]);
  auto out = backward_entry(cell, low.up(grad_h_seq), low.up(grad_h_T), low.up(grad_c_T), w_hh, low.up(w_hr),
                            low.up(h0), low.up(c0), batch_sizes, reverse, saved, nullptr);
  low.down(out, {2, 3});  // grad_h0, grad_c0; grad_xw, grad_hw, grad_hproj feed the op's float32 GEMMs
  return out;
}

std::vector<Tensor> rnn_forward_variant(int64_t cell, Tensor xw, Tensor w_hh, c10::optional<Tensor> b_hh,
                                        Tensor h0, c10::optional<Tensor> c0, c10::optional<Tensor> w_hr,
                                        c10::optional<Tensor> batch_sizes, bool reverse, bool training,
                                        c10::optional<Tensor> ln_w, c10::optional<Tensor> ln_b,
                                        c10::optional<Tensor> lnc_w, c10::optional<Tensor> lnc_b,
                                        c10::optional<Tensor> peep, c10::optional<Tensor> mask,
                                        c10::optional<Tensor> zh, c10::optional<Tensor> zc,
                                        c10::optional<Tensor> reset, bool reset_after) {
  const Low low(w_hh);
  const VarArgs va = low.up(VarArgs{ln_w, ln_b, lnc_w, lnc_b, peep, mask, zh, zc, reset, reset_after});
  auto out = forward_entry(cell, low.up(xw), w_hh, low.up(b_hh), low.up(h0), low.up(c0), low.up(w_hr), batch_sizes,
                           reverse, training, &va);
  return low_outputs(low, out);
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
  const Low low(w_hh);
  const VarArgs va = low.up(VarArgs{ln_w, ln_b, lnc_w, lnc_b, peep, mask, zh, zc, reset, reset_after});
  if (!saved.empty()) saved[0] = low.up(saved[0]);
  auto out = backward_entry(cell, low.up(grad_h_seq), low.up(grad_h_T), low.up(grad_c_T), w_hh, low.up(w_hr),
                            low.up(h0), low.up(c0), batch_sizes, reverse, saved, &va);
  low.down(out, {2, 3, 5, 6, 7, 8, 9});  // the states' and the variant parameters' gradients
  return out;
}

// ---------------------------------------------------------------------------------------------
// The big GEMMs of the op code (input projection, input and weight gradients), on the same
// GEMM as the recurrence. 2-D contiguous float32/float64 tensors; or bfloat16 products (an
// operand in bf16, the other bf16 or float32): the float32 operand rounded to bf16, float32
// accumulation and result (what a bf16 call's op code wants: xw and the gate gradients stay
// float32 until the parameter gradients are cast to the parameters' dtype).
// ---------------------------------------------------------------------------------------------
void check_mat(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous() && t.device().is_cpu(), name,
              " must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || t.scalar_type() == at::kBFloat16,
              name, " must be float32, float64 or bfloat16");
}

// Whether a product of a and b is a bf16 one (either bf16, the other bf16 or float32); raises
// for other mixes.
bool low_product(const Tensor& a, const Tensor& b, const char* what) {
  const auto ta = a.scalar_type(), tb = b.scalar_type();
  const bool low = ta == at::kBFloat16 || tb == at::kBFloat16;
  TORCH_CHECK(ta == tb || (low && (ta == at::kFloat || tb == at::kFloat)), what,
              ": dtype mismatch (", ta, ", ", tb, ")");
  TORCH_CHECK(!low || low_gemm_usable(), what, ": bfloat16 needs oneDNN's bf16 brgemm (AVX512_BF16 or AMX)");
  return low;
}

// t's values rounded to bf16, as float32 (a small call's operands: what the packed product reads)
Tensor low_values(const Tensor& t) { return t.to(at::kBFloat16).to(at::kFloat); }

// f(pointer) for a float32 or bf16 tensor
template <typename F>
void with_data(const Tensor& t, const F& f) {
  if (t.scalar_type() == at::kBFloat16) f((const bf16*)t.data_ptr<bf16>());
  else f((const float*)t.data_ptr<float>());
}

// t [M, K] as a bf16 [M, even(K)] left operand (t itself when it already is one)
Tensor low_rows(const Tensor& t) {
  const int64_t M = t.size(0), K = t.size(1);
  if (t.scalar_type() == at::kBFloat16 && even(K) == K) return t;
  Tensor out = at::empty({M, even(K)}, t.options().dtype(at::kBFloat16));
  with_data(t, [&](auto p) { to_low_rows(M, K, p, K, out.data_ptr<bf16>()); });
  return out;
}

// t [K, M]^T as a bf16 [M, even(K)] left operand
Tensor low_t(const Tensor& t) {
  const int64_t K = t.size(0), M = t.size(1);
  Tensor out = at::empty({M, even(K)}, t.options().dtype(at::kBFloat16));
  with_data(t, [&](auto p) { to_low_t(p, K, M, out.data_ptr<bf16>()); });
  return out;
}

// b [K, N] as VNNI panels
PackedLow low_right(const Tensor& b, int64_t M) {
  PackedLow P;
  with_data(b, [&](auto p) { P = PackedLow::rows(p, b.size(0), b.size(1), b.size(1), panel_width(b.size(1), M)); });
  return P;
}

// out [M, N] float32 = A [M, Kp] (bf16) B
Tensor low_mm(const Tensor& A, const PackedLow& B, const Tensor& bias = Tensor()) {
  Tensor out = at::empty({A.size(0), B.N}, A.options().dtype(at::kFloat));
  gemm_low(A.size(0), A.data_ptr<bf16>(), A.size(1), B, out.data_ptr<float>(), B.N, false,
           bias.defined() ? bias.data_ptr<float>() : nullptr);
  return out;
}

// out [N,G] = x [N,I] w^T (w [G,I]) + b [G] (b may be null). Few rows: w read in place.
template <typename T>
void linear_into(int64_t N, int64_t I, int64_t G, const T* x, const T* w, const T* b, T* out, const at::TensorOptions& o) {
  if (N < kPackRowSteps) {
    for (int64_t r = 0; b && r < N; ++r) std::memcpy(out + r * G, b, sizeof(T) * G);
    return dot_rows<T>(N, G, I, x, I, w, I, out, G, b != nullptr);
  }
  const auto wt = PackedB<T>::transposed(w, G, I, panel_width(G, N), o);
  gemm_packed<T>(N, x, I, wt, out, G, false, b);
}

// out [M,N] = a [M,K] b [K,N]. Few rows: b read in place.
template <typename T>
void mm_into(int64_t M, int64_t K, int64_t N, const T* a, const T* b, T* out, const at::TensorOptions& o) {
  if (M < kPackRowSteps) {
    gemm_call<T>(M, N, K, a, K, b, N, out, N, false);
    return release_gemm();
  }
  const auto bp = PackedB<T>::rows(b, K, N, N, panel_width(N, M), o);
  gemm_packed<T>(M, a, K, bp, out, N, false);
}

// out [M,N] = a^T b for a [K,M], b [K,N] (weight gradients: K = T*B rows). Few rows: gemm_tn_rows
// on the operands as they lie. Else transposes the smaller operand: with a the gate gradients (M = G) and b the
// inputs (N = I), b^T a then ^T is cheaper.
template <typename T>
void mm_tn_into(int64_t K, int64_t M, int64_t N, const T* a, const T* b, T* out, const at::TensorOptions& o) {
  if (K < kPackRowSteps) return gemm_tn_rows<T>(M, N, K, a, b, out, false);
  if (M >= N) {
    Tensor bt = at::empty({N, K}, o), ct = at::empty({N, M}, o);
    transpose(b, K, N, bt.data_ptr<T>());
    gemm<T>(N, M, K, bt.data_ptr<T>(), K, a, M, ct.data_ptr<T>(), M, false);
    transpose(ct.data_ptr<T>(), N, M, out);
  } else {
    Tensor at_ = at::empty({M, K}, o);
    transpose(a, K, M, at_.data_ptr<T>());
    gemm<T>(M, N, K, at_.data_ptr<T>(), K, b, N, out, N, false);
  }
}

// x [N,I] w [G,I] b [G] -> x w^T + b [N,G]
Tensor linear(Tensor x, Tensor w, c10::optional<Tensor> b) {
  check_mat(x, "x"), check_mat(w, "w");
  TORCH_CHECK(x.size(1) == w.size(1), "linear: shape mismatch");
  const int64_t N = x.size(0), I = x.size(1), G = w.size(0);
  const bool has_b = b.has_value() && b->defined();
  if (low_product(x, w, "linear")) {
    TORCH_CHECK(!has_b || (b->numel() == G && b->device().is_cpu() && b->is_floating_point()),
                "linear: b must be a floating CPU tensor of G = ", G, " elements");
    if (N < kPackRowSteps) {  // a small call: weights in place (low_dot_rows)
      const Tensor xf = low_values(x), wf = w.scalar_type() == at::kFloat ? low_values(w) : Tensor();
      Tensor out = at::empty({N, G}, x.options().dtype(at::kFloat));
      if (wf.defined()) linear_into<float>(N, I, G, xf.data_ptr<float>(), wf.data_ptr<float>(), nullptr,
                                           out.data_ptr<float>(), out.options());
      else low_dot_rows(N, G, I, xf.data_ptr<float>(), I, w.data_ptr<bf16>(), I, out.data_ptr<float>(), G, false);
      return has_b ? out.add_(b->to(at::kFloat)) : out;
    }
    PackedLow wt;
    with_data(w, [&](auto p) { wt = PackedLow::transposed(p, G, I, panel_width(G, N)); });
    return low_mm(low_rows(x), wt, has_b ? b->to(at::kFloat).contiguous() : Tensor());
  }
  TORCH_CHECK(!has_b || (b->numel() == G && b->scalar_type() == x.scalar_type() && b->device().is_cpu()),
              "linear: b must be a CPU tensor of G = ", G, " elements and x's dtype");
  Tensor out = at::empty({N, G}, x.options());
  const Tensor bc = has_b ? b->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastrnn_linear", [&] {
    linear_into<scalar_t>(N, I, G, x.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(),
                          has_b ? bc.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), x.options());
  });
  return out;
}

// a [M,K] b [K,N] -> a b
Tensor mm(Tensor a, Tensor b) {
  check_mat(a, "a"), check_mat(b, "b");
  TORCH_CHECK(a.size(1) == b.size(0), "mm: shape mismatch");
  if (low_product(a, b, "mm")) {
    if (a.size(0) < kPackRowSteps) {  // a small call: b in place (low_axpy_rows)
      const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
      const Tensor af = low_values(a);
      if (b.scalar_type() == at::kFloat) return fastrnn::mm(af, low_values(b));
      Tensor out = at::empty({M, N}, af.options());
      low_axpy_rows(M, N, K, af.data_ptr<float>(), K, b.data_ptr<bf16>(), N, out.data_ptr<float>(), N, false);
      return out;
    }
    return low_mm(low_rows(a), low_right(b, a.size(0)));
  }
  Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "fastrnn_mm", [&] {
    mm_into<scalar_t>(a.size(0), a.size(1), b.size(1), a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                      out.data_ptr<scalar_t>(), a.options());
  });
  return out;
}

// a [K,M] b [K,N] -> a^T b [M,N]
Tensor mm_tn(Tensor a, Tensor b) {
  check_mat(a, "a"), check_mat(b, "b");
  TORCH_CHECK(a.size(0) == b.size(0), "mm_tn: shape mismatch");
  if (low_product(a, b, "mm_tn")) {  // as mm_tn_into: the operand with fewer columns is transposed
    if (a.size(0) < kPackRowSteps) return fastrnn::mm_tn(low_values(a), low_values(b));  // a small call's few rows
    if (a.size(1) < b.size(1)) return low_mm(low_t(a), low_right(b, a.size(1)));
    const Tensor ct = low_mm(low_t(b), low_right(a, b.size(1)));  // (a^T b)^T [N, M]
    Tensor out = at::empty({a.size(1), b.size(1)}, ct.options());
    transpose(ct.data_ptr<float>(), ct.size(0), ct.size(1), out.data_ptr<float>());
    return out;
  }
  Tensor out = at::empty({a.size(1), b.size(1)}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "fastrnn_mm_tn", [&] {
    mm_tn_into<scalar_t>(a.size(0), a.size(1), b.size(1), a.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                         out.data_ptr<scalar_t>(), a.options());
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// One step of a plain cell with its input projection, forward and backward, each in one call: the
// eager path of small calls (fastrnn/ops/small_calls.py; LSTMCell / GRUCell / RNNCell steps at batch
// 1-8 spent most of their time in Python glue and in crossings between it and three kernels).
// The same kernels as the layer at T = 1: xw = x W_ih^T + b_ih, then `forward` / `backward`.
// ---------------------------------------------------------------------------------------------

// Whether (x [B,I], h [B,H], c [B,H] (LSTM) | none, w_ih [G,I], w_hh [G,H], b_ih, b_hh [G] | none)
// is a well-formed plain step this path runs: one dtype (float32 / float64, or bfloat16 where the
// bf16 GEMMs run), CPU, contiguous, every size positive. Anything else is the general path's
// (which checks it and raises torch's errors, or handles it: other dtypes, strides, devices,
// empty batches).
bool plain_step(int64_t cell, const Tensor& x, const Tensor& h, const c10::optional<Tensor>& c, const Tensor& w_ih,
                const Tensor& w_hh, const c10::optional<Tensor>& b_ih, const c10::optional<Tensor>& b_hh) {
  if (cell < kLSTM || cell > kRNNRelu || !x.defined() || !h.defined() || !w_ih.defined() || !w_hh.defined() ||
      x.dim() != 2 || w_ih.dim() != 2 || w_hh.dim() != 2 || h.dim() != 2)
    return false;
  const auto dt = x.scalar_type();
  if (dt != at::kFloat && dt != at::kDouble && !(dt == at::kBFloat16 && low_gemm_usable())) return false;
  const int64_t ng = cell == kLSTM ? 4 : cell == kGRU ? 3 : 1, B = x.size(0), I = x.size(1), H = w_hh.size(1);
  const int64_t G = ng * H;
  // dense CPU memory that holds the values as they are: no lazy negation or conjugation bit, no
  // zero tensor, no Python dispatch (a subclass or mode must see the op); then shape, dtype, layout
  const auto odd = c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::ZeroTensor});
  auto ok = [&](const Tensor& t, at::IntArrayRef shape) {
    return t.layout() == at::kStrided && t.device().is_cpu() && !t.is_neg() && !t.is_conj() &&
           !t.key_set().has_any(odd) && t.sizes() == shape && t.scalar_type() == dt && t.is_contiguous();
  };
  if (B <= 0 || I <= 0 || H <= 0 || has(c) != (cell == kLSTM)) return false;
  return ok(x, {B, I}) && ok(h, {B, H}) && (!has(c) || ok(*c, {B, H})) && ok(w_ih, {G, I}) && ok(w_hh, {G, H}) &&
         (!has(b_ih) || ok(*b_ih, {G})) && (!has(b_hh) || ok(*b_hh, {G}));
}

// One plain step (plain_step holds): [h', c' (LSTM) | undefined] and, when training, the tensors
// `backward` needs: the layer's saved tuple at T = 1 (h_seq [1,B,H], gates [1,B,G], ...).
std::vector<Tensor> step_forward(int64_t cell, const Tensor& x, const Tensor& h, const c10::optional<Tensor>& c,
                                 const Tensor& w_ih, const Tensor& w_hh, const c10::optional<Tensor>& b_ih,
                                 const c10::optional<Tensor>& b_hh, bool training) {
  const int64_t B = x.size(0), I = x.size(1), G = w_ih.size(0);
  if (x.scalar_type() == at::kBFloat16) {
    // what the general path computes for a bf16 layer at T = 1 (rnn_forward above, the op's
    // `linear`): xw in float32 from bf16 operands, the float32 loop with W_hh's product in bf16,
    // h' and c' in bf16; the saved tuple stays float32 but for h_seq, which that path saves
    // rounded to bf16 (low_outputs) and its backward reads back in float32
    const Low low(w_hh);
    const Tensor xw = fastrnn::linear(x, w_ih, b_ih).view({1, B, G});
    std::vector<Tensor> out = forward_entry(cell, xw, w_hh, low.up(b_hh), low.up(h), low.up(c), c10::nullopt,
                                            c10::nullopt, false, training, nullptr);
    low.down(out, {1, 2});
    if (out.size() > 3) out[3] = low_values(out[3]);
    out.erase(out.begin());
    return out;
  }
  Tensor xw = at::empty({1, B, G}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastrnn_cell_forward", [&] {
    linear_into<scalar_t>(B, I, G, x.data_ptr<scalar_t>(), w_ih.data_ptr<scalar_t>(),
                          has(b_ih) ? b_ih->data_ptr<scalar_t>() : nullptr, xw.data_ptr<scalar_t>(), x.options());
  });
  std::vector<Tensor> out = forward_entry(cell, xw, w_hh, b_hh, h, c, c10::nullopt, c10::nullopt, false, training,
                                          nullptr);
  out.erase(out.begin());  // h_seq: h' is out[1]; in training the saved tuple repeats it
  return out;
}

// -> [] when not plain_step; else step_forward's result.
std::vector<Tensor> cell_forward(int64_t cell, Tensor x, Tensor h, c10::optional<Tensor> c, Tensor w_ih, Tensor w_hh,
                                 c10::optional<Tensor> b_ih, c10::optional<Tensor> b_hh, bool training) {
  if (!plain_step(cell, x, h, c, w_ih, w_hh, b_ih, b_hh)) return {};
  return step_forward(cell, x, h, c, w_ih, w_hh, b_ih, b_hh, training);
}

// cell_backward of a bf16 step: what the general path computes for a bf16 layer at T = 1
// (rnn_backward above, then the op's float32-returning `mm` / `mm_tn` on the bf16 operands and
// the bias sums in float32), every gradient cast to bf16 at the end as the op does.
std::vector<Tensor> low_step_backward(int64_t cell, const c10::optional<Tensor>& grad_h,
                                      const c10::optional<Tensor>& grad_c, const Tensor& x, const Tensor& h,
                                      const c10::optional<Tensor>& c, const Tensor& w_ih, const Tensor& w_hh,
                                      const std::vector<Tensor>& saved, const std::vector<bool>& needs) {
  const int64_t B = x.size(0), G = w_ih.size(0), H = h.size(1);
  const auto f32 = x.options().dtype(at::kFloat);
  auto grad = [&](const c10::optional<Tensor>& g) { return has(g) ? g->to(at::kFloat).contiguous() : at::zeros({B, H}, f32); };
  const Low low(w_hh);
  std::vector<Tensor> r = backward_entry(cell, grad(grad_h).view({1, B, H}), at::zeros({B, H}, f32),
                                         cell == kLSTM ? c10::optional<Tensor>(grad(grad_c)) : c10::nullopt, w_hh,
                                         c10::nullopt, low.up(h), low.up(c), c10::nullopt, false, saved, nullptr);
  const Tensor gx = r[0].view({B, G}), gw = r[1].view({B, G});
  std::vector<Tensor> out(7);
  out[1] = r[2];
  if (cell == kLSTM) out[2] = r[3];
  if (needs[0]) out[0] = fastrnn::mm(gx, w_ih);  // qualified: at::mm is found by argument lookup
  if (needs[3]) out[3] = fastrnn::mm_tn(gx, x);
  if (needs[4]) out[4] = fastrnn::mm_tn(gw, h);
  if (needs[5]) out[5] = gx.sum(0);
  if (needs[6]) out[6] = gw.sum(0);
  for (Tensor& t : out)
    if (t.defined()) t = t.to(at::kBFloat16);
  return out;
}

// Gradients of one plain step, from what cell_forward saved: grad_h, grad_c [B,H] (undefined:
// zero) -> [dx, dh, dc, dW_ih, dW_hh, db_ih, db_hh], each undefined unless its `needs` entry is set.
std::vector<Tensor> cell_backward(int64_t cell, c10::optional<Tensor> grad_h, c10::optional<Tensor> grad_c, Tensor x,
                                  Tensor h, c10::optional<Tensor> c, Tensor w_ih, Tensor w_hh,
                                  std::vector<Tensor> saved, std::vector<bool> needs) {
  TORCH_CHECK(plain_step(cell, x, h, c, w_ih, w_hh, c10::nullopt, c10::nullopt),
              "fastrnn cpp backend: cell_backward needs the arguments of a plain cell_forward step");
  TORCH_CHECK(needs.size() == 7, "fastrnn cpp backend: cell_backward needs 7 flags, got ", needs.size());
  const int64_t B = x.size(0), I = x.size(1), G = w_ih.size(0), H = h.size(1);
  if (x.scalar_type() == at::kBFloat16) return low_step_backward(cell, grad_h, grad_c, x, h, c, w_ih, w_hh, saved, needs);
  auto grad = [&](const c10::optional<Tensor>& g) { return has(g) ? g->contiguous() : at::zeros({B, H}, x.options()); };
  const Tensor zeros = at::zeros({B, H}, x.options());
  std::vector<Tensor> r = backward_entry(cell, grad(grad_h).view({1, B, H}), zeros,
                                         cell == kLSTM ? c10::optional<Tensor>(grad(grad_c)) : c10::nullopt, w_hh,
                                         c10::nullopt, h, c, c10::nullopt, false, saved, nullptr);
  const Tensor &gx = r[0], &gw = r[1];  // [1,B,G] each (the same tensor but for GRU)
  std::vector<Tensor> out(7);
  out[1] = r[2];
  if (cell == kLSTM) out[2] = r[3];
  auto o = x.options();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fastrnn_cell_backward", [&] {
    using T = scalar_t;
    const T *gx_p = gx.data_ptr<T>(), *gw_p = gw.data_ptr<T>();
    if (needs[0]) {
      out[0] = at::empty({B, I}, o);
      mm_into<T>(B, G, I, gx_p, w_ih.data_ptr<T>(), out[0].data_ptr<T>(), o);
    }
    if (needs[3]) {
      out[3] = at::empty({G, I}, o);
      mm_tn_into<T>(B, G, I, gx_p, x.data_ptr<T>(), out[3].data_ptr<T>(), o);
    }
    if (needs[4]) {
      out[4] = at::empty({G, H}, o);
      mm_tn_into<T>(B, G, H, gw_p, h.data_ptr<T>(), out[4].data_ptr<T>(), o);
    }
    // the bias gradients as the layer op forms them (gx.sum(0)): the same numbers as the general path
    if (needs[5]) out[5] = gx.view({B, G}).sum(0);
    if (needs[6]) out[6] = gw.view({B, G}).sum(0);
  });
  return out;
}

// The autograd node of a step (cell_step below): forward and backward in C++, so that a small
// training step crosses into Python only for the user's own code. With create_graph=True the
// backward must build a graph, which these kernels do not: it calls the Python function
// registered here (fastrnn/ops/small_calls.py, the reference equations under autograd).
PyObject* g_create_graph_backward = nullptr;  // a strong reference, never dropped: it lives as long
                                              // as the extension, past the interpreter's teardown

void set_create_graph_backward(py::object fn) {
  PyObject* old = g_create_graph_backward;
  g_create_graph_backward = fn.inc_ref().ptr();
  Py_XDECREF(old);
}

const char* cell_name(int64_t cell) {
  static const char* names[] = {"lstm", "gru", "rnn_tanh", "rnn_relu"};
  return names[cell];
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct CellStep : public torch::autograd::Function<CellStep> {
  // Arguments as cell_step's; returns [h'] or, for LSTM, [h', c'].
  static variable_list forward(AutogradContext* ctx, int64_t cell, const Tensor& x, const Tensor& h,
                               const c10::optional<Tensor>& c, const Tensor& w_ih, const Tensor& w_hh,
                               const c10::optional<Tensor>& b_ih, const c10::optional<Tensor>& b_hh) {
    std::vector<Tensor> out = step_forward(cell, x, h, c, w_ih, w_hh, b_ih, b_hh, true);
    ctx->saved_data["cell"] = cell;
    variable_list keep = {x, h, has(c) ? *c : Tensor(), w_ih, w_hh, has(b_ih) ? *b_ih : Tensor(),
                          has(b_hh) ? *b_hh : Tensor()};
    keep.insert(keep.end(), out.begin() + 2, out.end());
    ctx->save_for_backward(keep);
    if (cell == kLSTM) return {out[0], out[1]};
    return {out[0]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const int64_t cell = ctx->saved_data["cell"].toInt();
    variable_list v = ctx->get_saved_variables();  // x, h, c, w_ih, w_hh, b_ih, b_hh (undefined if absent), saved
    // needs_input_grad counts the tensor arguments that were defined: x, h, [c], w_ih, w_hh, [b_ih], [b_hh]
    std::vector<bool> needs(7, false);
    for (int64_t k = 0, edge = 0; k < 7; ++k)
      if (v[k].defined()) needs[k] = ctx->needs_input_grad(edge++);
    const Tensor grad_h = grads[0], grad_c = cell == kLSTM ? grads[1] : Tensor();
    auto opt = [](const Tensor& t) { return t.defined() ? c10::optional<Tensor>(t) : c10::nullopt; };
    std::vector<Tensor> g;
    if (at::GradMode::is_enabled()) {  // create_graph=True
      TORCH_CHECK(g_create_graph_backward, "fastrnn cpp backend: no create_graph backward registered");
      py::gil_scoped_acquire gil;
      py::object r = py::reinterpret_borrow<py::object>(g_create_graph_backward)(
          cell_name(cell), v[0], v[1], opt(v[2]), v[3], v[4], opt(v[5]), opt(v[6]), needs, opt(grad_h), opt(grad_c));
      for (py::handle t : r) g.push_back(t.is_none() ? Tensor() : t.cast<Tensor>());
      TORCH_CHECK(g.size() == 7, "fastrnn: the create_graph backward must return 7 gradients");
    } else {
      RECORD_USER_SCOPE(std::string("fastrnn::") + cell_name(cell) + "_cell_bwd[cpp]");
      g = cell_backward(cell, opt(grad_h), opt(grad_c), v[0], v[1], opt(v[2]), v[3], v[4],
                        std::vector<Tensor>(v.begin() + 7, v.end()), needs);
    }
    variable_list out = {Tensor()};  // cell
    out.insert(out.end(), g.begin(), g.end());
    return out;
  }
};

// One plain step with autograd: [] when not plain_step (the caller's general path then runs the
// call), else [h', c' (LSTM) | undefined]. The outputs carry a CellStep node when grad mode is on
// and an argument requires grad.
std::vector<Tensor> cell_step(int64_t cell, Tensor x, Tensor h, c10::optional<Tensor> c, Tensor w_ih, Tensor w_hh,
                              c10::optional<Tensor> b_ih, c10::optional<Tensor> b_hh) {
  if (!plain_step(cell, x, h, c, w_ih, w_hh, b_ih, b_hh)) return {};
  auto rg = [](const c10::optional<Tensor>& t) { return has(t) && t->requires_grad(); };
  const bool grad = at::GradMode::is_enabled() && (w_ih.requires_grad() || w_hh.requires_grad() ||
                                                   x.requires_grad() || h.requires_grad() || rg(c) || rg(b_ih) ||
                                                   rg(b_hh));
  if (!grad) {
    std::vector<Tensor> out = step_forward(cell, x, h, c, w_ih, w_hh, b_ih, b_hh, false);
    return {out[0], out[1]};
  }
  variable_list out = CellStep::apply(cell, x, h, c, w_ih, w_hh, b_ih, b_hh);
  if (out.size() == 1) out.emplace_back();
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
        "grad_hproj, ln_hh_weight, ln_hh_bias, ln_c_weight, ln_c_bias, peephole]");
  m.def("linear", &fastrnn::linear, nogil(), "x [N,I], w [G,I], b [G] -> x w^T + b");
  m.def("mm", &fastrnn::mm, nogil(), "a [M,K], b [K,N] -> a b");
  m.def("mm_tn", &fastrnn::mm_tn, nogil(), "a [K,M], b [K,N] -> a^T b");
  m.def("cell_forward", &fastrnn::cell_forward, nogil(),
        "One plain cell step with its input projection: (cell, x, h, c, w_ih, w_hh, b_ih, b_hh, training) -> "
        "[] (not a plain step: the general path's) | [h', c', *saved]");
  m.def("cell_backward", &fastrnn::cell_backward, nogil(),
        "(cell, grad_h, grad_c, x, h, c, w_ih, w_hh, saved, needs[7]) -> [dx, dh, dc, dW_ih, dW_hh, db_ih, db_hh]");
  m.def("cell_step", &fastrnn::cell_step, nogil(),
        "cell_forward with its autograd node: (cell, x, h, c, w_ih, w_hh, b_ih, b_hh) -> [] | [h', c']");
  m.def("set_create_graph_backward", &fastrnn::set_create_graph_backward,
        "fn(cell, x, h, c, w_ih, w_hh, b_ih, b_hh, needs, grad_h, grad_c) -> 7 gradients, for create_graph=True");
  m.def("gemm_engine", &fastrnn::gemm_engine, "which GEMM the kernels use");
  m.def("low_gemm", &fastrnn::low_gemm_usable, "whether bfloat16 GEMMs (oneDNN brgemm) run on this CPU");
}
