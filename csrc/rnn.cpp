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

template <typename T>
struct LstmFwd {
  T* gates;        // [B,4H] xw_t in, activated i,f,g,o out (saved for backward)
  const T* hs;     // hidden side h_prev W_hh^T, chunk layout, row stride 4H
  const T* bias;   // [4H] b_hh (zeros when absent)
  T* c;            // [B,H] cell state in/out
  T* hu;           // [B,H] o * tanh(c) out
  int64_t H;
};

template <typename T>
FASTRNN_INLINE void lstm_fwd_rows(const LstmFwd<T>& a, int64_t b, int64_t j0, int64_t j1) {
  const int64_t H = a.H, w = j1 - j0;
  T* __restrict gi = a.gates + b * 4 * H + j0;
  T* __restrict gf = gi + H;
  T* __restrict gg = gf + H;
  T* __restrict go = gg + H;
  const T* __restrict si = a.hs + b * 4 * H + 4 * j0;
  const T* __restrict bias = a.bias + j0;
  T* __restrict c = a.c + b * H + j0;
  T* __restrict hu = a.hu + b * H + j0;
  FASTRNN_IVDEP
  for (int64_t j = 0; j < w; ++j) {
    const T i = sigmoid(gi[j] + si[j] + bias[j]);
    const T f = sigmoid(gf[j] + si[w + j] + bias[H + j]);
    const T g = tanh(gg[j] + si[2 * w + j] + bias[2 * H + j]);
    const T o = sigmoid(go[j] + si[3 * w + j] + bias[3 * H + j]);
    const T cn = f * c[j] + i * g;
    c[j] = cn;
    hu[j] = o * tanh(cn);
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
  const T* c;        // [B,H] c_t
  const T* dh_a;     // [B,H] gradient reaching o*tanh(c) is dh_a + dh_b
  const T* dh_b;     // row stride ld_b (0: a broadcast zero row)
  T* dc;             // [B,H] in: from step t+1, out: to step t-1
  T* grad;           // [B,4H] pre-activation gradients out
  int64_t H, ld_b;
};

template <typename T>
FASTRNN_INLINE void lstm_bwd_rows(const LstmBwd<T>& a, const T* c_prev, int64_t b, int64_t j0,
                                  int64_t j1) {
  const int64_t H = a.H;
  const T* __restrict ai = a.acts + b * 4 * H;
  const T* __restrict c = a.c + b * H;
  const T* __restrict cp = c_prev;
  const T* __restrict da = a.dh_a + b * H;
  const T* __restrict db = a.dh_b + b * a.ld_b;
  T* __restrict dc = a.dc + b * H;
  T* __restrict gr = a.grad + b * 4 * H;
  FASTRNN_IVDEP
  for (int64_t j = j0; j < j1; ++j) {
    const T i = ai[j], f = ai[H + j], g = ai[2 * H + j], o = ai[3 * H + j];
    const T tc = tanh(c[j]);
    const T dh = da[j] + db[j];
    const T dct = dc[j] + dh * o * (T(1) - tc * tc);
    gr[j] = dct * g * i * (T(1) - i);
    gr[H + j] = dct * cp[j] * f * (T(1) - f);
    gr[2 * H + j] = dct * i * (T(1) - g * g);
    gr[3 * H + j] = dh * tc * o * (T(1) - o);
    dc[j] = dct * f;
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
FASTRNN_F32_CLONE(lstm_fwd_rows, LstmFwd)
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
FASTRNN_F32_CLONE_PREV(lstm_bwd_rows, LstmBwd)
FASTRNN_F32_CLONE_PREV(gru_bwd_rows, GruBwd)
#undef FASTRNN_F32_CLONE_PREV

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
    TORCH_CHECK(batch_sizes->dtype() == at::kLong && batch_sizes->is_contiguous() &&
                    batch_sizes->numel() == seq.size(0),
                "batch_sizes must be a contiguous int64 tensor with one entry per time step");
    bs = batch_sizes->data_ptr<int64_t>();
    for (int64_t t = 0; t < seq.size(0); ++t)
      TORCH_CHECK(bs[t] >= 0 && bs[t] <= seq.size(1) && (t == 0 || bs[t] <= bs[t - 1]),
                  "batch_sizes must be descending and at most the batch size");
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
      fused_step(W, m, h_p, hs_p, [&](int64_t b, int64_t j0, int64_t j1) { step_rows(a, b, j0, j1); });
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
        step_rows(a, s.prev_row(cs_p, c0_p, t, b, H), b, j0, j1);
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
  TORCH_CHECK(cell != kLSTM || (c0.has_value() && c0->defined()), "LSTM needs c0");
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
  TORCH_CHECK(!saved.empty(), "rnn_backward needs the tensors saved by a training forward");
  return AT_DISPATCH_FLOATING_TYPES(grad_h_seq.scalar_type(), "fastrnn_rnn_backward", [&] {
    return backward_impl<scalar_t>(cell, grad_h_seq, grad_h_T, grad_c_T, w_hh, w_hr, h0, c0,
                                   batch_sizes, reverse, saved);
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
  m.def("linear", &fastrnn::linear, nogil(), "x [N,I], w [G,I], b [G] -> x w^T + b");
  m.def("mm", &fastrnn::mm, nogil(), "a [M,K], b [K,N] -> a b");
  m.def("mm_tn", &fastrnn::mm_tn, nogil(), "a [K,M], b [K,N] -> a^T b");
  m.def("gemm_engine", &fastrnn::gemm_engine, "which GEMM the kernels use");
}
