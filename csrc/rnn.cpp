// fastrnn C++ backend: the whole time loop of one RNN layer and direction, forward and backward.
//
// Contract: fastrnn/backends/reference_rnn.py (the plain-PyTorch specification). Shapes:
//   xw [T,B,G] (G = 4H LSTM i,f,g,o | 3H GRU r,z,n | H RNN), w_hh [G,Hr], b_hh [G], h0 [B,Hr],
//   c0 [B,H], w_hr [Hr,H], batch_sizes [T] int64 (descending; active rows are the prefix).
//
// Per step: one GEMM `gates[0:m] += h[0:m] W_hh^T` accumulated in place into xw[t] (the op code
// hands xw over as scratch), then one fused pass over the gates (activations, state update).
// W_hh is packed once per call with MKL's packed-GEMM API (the weight is re-used T times; an
// ordinary sgemm would re-pack it every step). Nothing is allocated inside the time loop.
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

#include "vec_math.h"

namespace fastrnn {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// GEMM: row-major C[M,N] = A[M,K] op(W) + beta C, op(W) = W^T for W [N,K], or W for W [K,N].
// ---------------------------------------------------------------------------------------------
#ifdef FASTRNN_MKL
extern "C" {
// Exported by libtorch_cpu (MKL, LP64 interface). Declared here so no MKL headers are needed.
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*, const int*);
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k);
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha,
                      const float* src, int ld, float* dest);
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a,
                         int lda, const float* b, int ldb, float beta, float* c, int ldc);
}
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;

// Column-major BLAS on row-major data: C^T = op(W)^T A^T.
inline void blas_gemm(char tw, int M, int N, int K, const float* A, int lda, const float* W, int ldw,
                      float beta, float* C, int ldc) {
  const char tn = 'N';
  const float one = 1.f;
  sgemm_(&tw, &tn, &N, &M, &K, &one, W, &ldw, A, &lda, &beta, C, &ldc);
}
inline void blas_gemm(char tw, int M, int N, int K, const double* A, int lda, const double* W,
                      int ldw, double beta, double* C, int ldc) {
  const char tn = 'N';
  const double one = 1.;
  dgemm_(&tw, &tn, &N, &M, &K, &one, W, &ldw, A, &lda, &beta, C, &ldc);
}
#endif

// A weight used as the right operand of many GEMMs with the same shape.
template <typename T>
struct Weight {
  const T* w;
  int64_t N, K;
  bool trans;         // true: W stored [N,K], product A W^T;  false: W stored [K,N], product A W
  int64_t packed_m = -1;
  Tensor packed;      // MKL packed copy of W for products with exactly packed_m rows

  Weight(const Tensor& t, bool transposed)
      : w(t.data_ptr<T>()),
        N(transposed ? t.size(0) : t.size(1)),
        K(transposed ? t.size(1) : t.size(0)),
        trans(transposed) {}

  int64_t ld() const { return trans ? K : N; }

  // Pack for products with m rows (MKL's packed format depends on m). float + MKL only.
  void pack(int64_t m) {
#ifdef FASTRNN_MKL
    if constexpr (std::is_same_v<T, float>) {
      if (m <= 0 || N == 0 || K == 0) return;
      size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, (int)m, (int)N, (int)K);
      packed = at::empty({(int64_t)(bytes / sizeof(float)) + 16}, at::kFloat);
      cblas_sgemm_pack(kRowMajor, kBMatrix, trans ? kTrans : kNoTrans, (int)m, (int)N, (int)K, 1.f,
                       w, (int)ld(), packed.data_ptr<float>());
      packed_m = m;
    }
#endif
  }

  // C[0:m] = A[0:m] op(W) + beta C[0:m]
  void mul(int64_t m, const T* A, int64_t lda, T beta, T* C, int64_t ldc) const {
    if (m <= 0 || N == 0) return;
    if (K == 0) {  // empty reduction: C = beta C
      for (int64_t r = 0; r < m; ++r)
        for (int64_t j = 0; j < N; ++j) C[r * ldc + j] = beta == T(0) ? T(0) : beta * C[r * ldc + j];
      return;
    }
#ifdef FASTRNN_MKL
    if constexpr (std::is_same_v<T, float>) {
      if (m == packed_m) {
        cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, (int)m, (int)N, (int)K, A, (int)lda,
                            packed.data_ptr<float>(), (int)N, beta, C, (int)ldc);
        return;
      }
    }
    blas_gemm(trans ? 'T' : 'N', (int)m, (int)N, (int)K, A, (int)lda, w, (int)ld(), beta, C, (int)ldc);
#else
    auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
    Tensor a = at::from_blob(const_cast<T*>(A), {m, K}, {lda, 1}, opts);
    Tensor wt = trans ? at::from_blob(const_cast<T*>(w), {N, K}, {K, 1}, opts).t()
                      : at::from_blob(const_cast<T*>(w), {K, N}, {N, 1}, opts);
    Tensor c = at::from_blob(C, {m, N}, {ldc, 1}, opts);
    if (beta == T(0)) at::mm_out(c, a, wt);
    else c.addmm_(a, wt, beta, 1);
#endif
  }
};

// ---------------------------------------------------------------------------------------------
// Fused cell steps. Each works on one row b and hidden units [j0, j1); the drivers below split
// (rows x hidden chunks) across threads. The templates hold the math once; the FASTRNN_CLONES
// wrappers compile the float versions per ISA so the j-loops vectorise.
// ---------------------------------------------------------------------------------------------
using vm::sigmoid;
using vm::tanh;

template <typename T>
struct LstmFwd {
  T* gates;        // [B,4H] pre-activations in, activated i,f,g,o out
  const T* bias;   // [4H] b_hh (zeros when absent)
  T* c;            // [B,H] cell state in/out
  T* hu;           // [B,H] o * tanh(c) out, row stride ld_hu
  int64_t H, ld_hu;
};

template <typename T>
FASTRNN_INLINE void lstm_fwd_rows(const LstmFwd<T>& a, int64_t b, int64_t j0, int64_t j1) {
  const int64_t H = a.H;
  T* __restrict gi = a.gates + b * 4 * H;
  T* __restrict gf = gi + H;
  T* __restrict gg = gf + H;
  T* __restrict go = gg + H;
  const T* __restrict bias = a.bias;
  T* __restrict c = a.c + b * H;
  T* __restrict hu = a.hu + b * a.ld_hu;
  for (int64_t j = j0; j < j1; ++j) {
    const T i = sigmoid(gi[j] + bias[j]);
    const T f = sigmoid(gf[j] + bias[H + j]);
    const T g = tanh(gg[j] + bias[2 * H + j]);
    const T o = sigmoid(go[j] + bias[3 * H + j]);
    const T cn = f * c[j] + i * g;
    c[j] = cn;
    hu[j] = o * tanh(cn);
    gi[j] = i, gf[j] = f, gg[j] = g, go[j] = o;
  }
}

template <typename T>
struct LstmBwd {
  const T* acts;     // [B,4H] activated i,f,g,o of this step
  const T* c;        // [B,H] c_t
  const T* c_prev;   // row pointers resolved per row by the driver
  const T* dh_a;     // [B,H] gradient reaching o*tanh(c): dh_a + dh_b
  const T* dh_b;     // row stride ld_b (0 for a broadcast zero row)
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
struct GruFwd {
  T* xw;          // [B,3H] input side in, activated r,z,n out
  const T* hw;    // [B,3H] h_prev W_hh^T (no bias)
  const T* bias;  // [3H]
  const T* h;     // [B,H] h_prev
  T* h_out;       // [B,H] new h
  T* hn;          // [B,H] W_hn h + b_hn out (saved for backward)
  int64_t H;
};

template <typename T>
FASTRNN_INLINE void gru_fwd_rows(const GruFwd<T>& a, int64_t b, int64_t j0, int64_t j1) {
  const int64_t H = a.H;
  T* __restrict xr = a.xw + b * 3 * H;
  const T* __restrict hr = a.hw + b * 3 * H;
  const T* __restrict bias = a.bias;
  const T* __restrict h = a.h + b * H;
  T* __restrict ho = a.h_out + b * H;
  T* __restrict hn = a.hn + b * H;
  for (int64_t j = j0; j < j1; ++j) {
    const T r = sigmoid(xr[j] + hr[j] + bias[j]);
    const T z = sigmoid(xr[H + j] + hr[H + j] + bias[H + j]);
    const T hnj = hr[2 * H + j] + bias[2 * H + j];
    const T n = tanh(xr[2 * H + j] + r * hnj);
    ho[j] = (T(1) - z) * n + z * h[j];
    hn[j] = hnj;
    xr[j] = r, xr[H + j] = z, xr[2 * H + j] = n;
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
struct RnnFwd {
  const T* gates;  // [B,H] pre-activations (without b_hh)
  const T* bias;   // [H]
  T* h_out;        // [B,H]
  int64_t H;
  bool relu;
};

template <typename T>
FASTRNN_INLINE void rnn_fwd_rows(const RnnFwd<T>& a, int64_t b, int64_t j0, int64_t j1) {
  const T* __restrict g = a.gates + b * a.H;
  const T* __restrict bias = a.bias;
  T* __restrict h = a.h_out + b * a.H;
  if (a.relu) {
    for (int64_t j = j0; j < j1; ++j) {
      const T x = g[j] + bias[j];
      h[j] = x > T(0) ? x : (x == x ? T(0) : x);  // relu that keeps NaN, as torch does
    }
  } else {
    for (int64_t j = j0; j < j1; ++j) h[j] = tanh(g[j] + bias[j]);
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
    for (int64_t j = j0; j < j1; ++j) gr[j] = h[j] > T(0) ? dh[j] + gh[j] : T(0);
  } else {
    for (int64_t j = j0; j < j1; ++j) gr[j] = (dh[j] + gh[j]) * (T(1) - h[j] * h[j]);
  }
}

// Per-ISA float entry points (the double versions call the templates directly).
#define FASTRNN_ROWS_F32(NAME, ARGS)                                                         \
  FASTRNN_CLONES void NAME##_f32(const ARGS<float>& a, int64_t b, int64_t j0, int64_t j1) { \
    NAME(a, b, j0, j1);                                                                      \
  }                                                                                          \
  inline void NAME##_any(const ARGS<float>& a, int64_t b, int64_t j0, int64_t j1) {          \
    NAME##_f32(a, b, j0, j1);                                                                \
  }                                                                                          \
  inline void NAME##_any(const ARGS<double>& a, int64_t b, int64_t j0, int64_t j1) {         \
    NAME(a, b, j0, j1);                                                                      \
  }
FASTRNN_ROWS_F32(lstm_fwd_rows, LstmFwd)
FASTRNN_ROWS_F32(gru_fwd_rows, GruFwd)
FASTRNN_ROWS_F32(rnn_fwd_rows, RnnFwd)
FASTRNN_ROWS_F32(rnn_bwd_rows, RnnBwd)
#undef FASTRNN_ROWS_F32

// The backward steps take the previous state's row pointer too.
FASTRNN_CLONES void lstm_bwd_rows_f32(const LstmBwd<float>& a, const float* cp, int64_t b,
                                      int64_t j0, int64_t j1) {
  lstm_bwd_rows(a, cp, b, j0, j1);
}
inline void lstm_bwd_rows_any(const LstmBwd<float>& a, const float* cp, int64_t b, int64_t j0, int64_t j1) {
  lstm_bwd_rows_f32(a, cp, b, j0, j1);
}
inline void lstm_bwd_rows_any(const LstmBwd<double>& a, const double* cp, int64_t b, int64_t j0, int64_t j1) {
  lstm_bwd_rows(a, cp, b, j0, j1);
}
FASTRNN_CLONES void gru_bwd_rows_f32(const GruBwd<float>& a, const float* hp, int64_t b, int64_t j0,
                                     int64_t j1) {
  gru_bwd_rows(a, hp, b, j0, j1);
}
inline void gru_bwd_rows_any(const GruBwd<float>& a, const float* hp, int64_t b, int64_t j0, int64_t j1) {
  gru_bwd_rows_f32(a, hp, b, j0, j1);
}
inline void gru_bwd_rows_any(const GruBwd<double>& a, const double* hp, int64_t b, int64_t j0, int64_t j1) {
  gru_bwd_rows(a, hp, b, j0, j1);
}

// Run f(b, j0, j1) over rows [0, m) x hidden units [0, H) in chunks; threads only when the step
// is big enough to pay for waking them (small steps are latency-bound: stay on this thread).
template <typename F>
void for_rows(int64_t m, int64_t H, const F& f) {
  constexpr int64_t kChunk = 256;    // hidden units per work item
  constexpr int64_t kMinWork = 8192; // elements per thread before parallelism pays
  const int64_t nch = (H + kChunk - 1) / kChunk;
  const int64_t items = m * nch;
  const int64_t grain = std::max<int64_t>(1, kMinWork / std::min(H, kChunk));
  at::parallel_for(0, items, grain, [&](int64_t k0, int64_t k1) {
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
  // Step the forward pass visited just before t, or -1.
  int64_t prev(int64_t t) const {
    const int64_t p = reverse ? t + 1 : t - 1;
    return (p < 0 || p >= T) ? -1 : p;
  }
  // Row b's state before step t: seq[prev(t)] if b was active then, else init.
  template <typename T_>
  const T_* prev_row(const T_* seq, const T_* init, int64_t t, int64_t b, int64_t K) const {
    const int64_t p = prev(t);
    return (p >= 0 && b < rows(p)) ? seq + (p * B + b) * K : init + b * K;
  }
};

Steps make_steps(const Tensor& xw, bool reverse, const c10::optional<Tensor>& batch_sizes) {
  const int64_t* bs = nullptr;
  if (batch_sizes.has_value() && batch_sizes->defined()) {
    TORCH_CHECK(batch_sizes->dtype() == at::kLong && batch_sizes->is_contiguous() &&
                    batch_sizes->numel() == xw.size(0),
                "batch_sizes must be a contiguous int64 tensor with one entry per time step");
    bs = batch_sizes->data_ptr<int64_t>();
    for (int64_t t = 0; t < xw.size(0); ++t)
      TORCH_CHECK(bs[t] >= 0 && bs[t] <= xw.size(1) && (t == 0 || bs[t] <= bs[t - 1]),
                  "batch_sizes must be descending and at most the batch size");
  }
  return Steps{xw.size(0), xw.size(1), reverse, bs};
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
  const int64_t H = cell == kLSTM ? G / 4 : cell == kGRU ? G / 3 : G;
  auto opts = xw.options();
  const Tensor bias = bias_or_zeros(b_hh, G, opts);
  Tensor h_seq = new_seq(s, Hr, opts);
  Tensor h = h0.clone();
  T* xw_p = xw.data_ptr<T>();
  T* hs_p = h_seq.data_ptr<T>();
  T* h_p = h.data_ptr<T>();
  const T* bias_p = bias.data_ptr<T>();

  Weight<T> W(w_hh, /*transposed=*/true);
  if (!s.bs) W.pack(B);  // packed sequences change m per step: plain GEMM then
  std::vector<Tensor> out;

  if (cell == kLSTM) {
    Tensor c = c0->clone();
    Tensor c_seq = training ? new_seq(s, H, opts) : Tensor();
    // o*tanh(c) lands in h_seq directly without a projection; with one it needs its own buffer
    Tensor hu_seq = proj ? (training ? new_seq(s, H, opts) : at::empty({1, B, H}, opts)) : Tensor();
    c10::optional<Weight<T>> P;
    if (proj) {
      P.emplace(*w_hr, true);
      if (!s.bs) P->pack(B);
    }
    for (int64_t k = 0; k < s.T; ++k) {
      const int64_t t = s.at(k), m = s.rows(t);
      if (m == 0) continue;
      T* g = xw_p + t * B * G;
      T* h_t = hs_p + t * B * Hr;
      W.mul(m, h_p, Hr, T(1), g, G);
      T* hu = proj ? hu_seq.data_ptr<T>() + (training ? t * B * H : 0) : h_t;
      LstmFwd<T> a{g, bias_p, c.data_ptr<T>(), hu, H, H};
      for_rows(m, H, [&](int64_t b, int64_t j0, int64_t j1) { lstm_fwd_rows_any(a, b, j0, j1); });
      if (proj) P->mul(m, hu, H, T(0), h_t, Hr);
      std::memcpy(h_p, h_t, sizeof(T) * m * Hr);
      if (training) std::memcpy(c_seq.data_ptr<T>() + t * B * H, c.data_ptr<T>(), sizeof(T) * m * H);
    }
    out = {h_seq, h, c};
    if (training) {
      out.insert(out.end(), {h_seq, xw, c_seq});
      if (proj) out.push_back(hu_seq);
    }
  } else if (cell == kGRU) {
    Tensor hw = at::empty({B, G}, opts);
    Tensor hn_seq = training ? new_seq(s, H, opts) : at::empty({1, B, H}, opts);
    for (int64_t k = 0; k < s.T; ++k) {
      const int64_t t = s.at(k), m = s.rows(t);
      if (m == 0) continue;
      T* h_t = hs_p + t * B * H;
      W.mul(m, h_p, H, T(0), hw.data_ptr<T>(), G);
      GruFwd<T> a{xw_p + t * B * G, hw.data_ptr<T>(), bias_p, h_p, h_t,
                  hn_seq.data_ptr<T>() + (training ? t * B * H : 0), H};
      for_rows(m, H, [&](int64_t b, int64_t j0, int64_t j1) { gru_fwd_rows_any(a, b, j0, j1); });
      std::memcpy(h_p, h_t, sizeof(T) * m * H);
    }
    out = {h_seq, h, Tensor()};
    if (training) out.insert(out.end(), {h_seq, xw, hn_seq});
  } else {
    for (int64_t k = 0; k < s.T; ++k) {
      const int64_t t = s.at(k), m = s.rows(t);
      if (m == 0) continue;
      T* g = xw_p + t * B * G;
      T* h_t = hs_p + t * B * H;
      W.mul(m, h_p, H, T(1), g, G);
      RnnFwd<T> a{g, bias_p, h_t, H, cell == kRNNRelu};
      for_rows(m, H, [&](int64_t b, int64_t j0, int64_t j1) { rnn_fwd_rows_any(a, b, j0, j1); });
      std::memcpy(h_p, h_t, sizeof(T) * m * H);
    }
    out = {h_seq, h, Tensor()};
    if (training) out.push_back(h_seq);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Backward: visits the steps in the opposite order; dh/dc carry the gradient w.r.t. the state.
// Returns {grad_xw, grad_hw, grad_h0, grad_c0, grad_hproj}; grad_hproj [T,B,Hr] (with w_hr) is
// the total gradient reaching each projected output, for grad_w_hr = grad_hproj^T hu_seq.
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

  Weight<T> W(w_hh, /*transposed=*/false);  // dh_prev = grad_gates W_hh
  if (!s.bs) W.pack(B);

  if (cell == kLSTM) {
    const Tensor &acts = saved.at(1), &c_seq = saved.at(2);
    Tensor dc = grad_c_T->clone();
    Tensor grad_hproj, dhu;
    c10::optional<Weight<T>> P;
    if (proj) {
      grad_hproj = new_seq(s, Hr, opts);
      dhu = at::empty({B, H}, opts);
      P.emplace(*w_hr, false);  // dhu = grad_hproj W_hr
      if (!s.bs) P->pack(B);
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
        P->mul(m, gp, Hr, T(0), dhu.data_ptr<T>(), H);
        dh_a = dhu.data_ptr<T>(), dh_b = zero_row.data_ptr<T>(), ld_b = 0;
      }
      LstmBwd<T> a{acts.data_ptr<T>() + t * B * G, cs_p + t * B * H, nullptr, dh_a, dh_b,
                   dc.data_ptr<T>(), gx_p + t * B * G, H, ld_b};
      for_rows(m, H, [&](int64_t b, int64_t j0, int64_t j1) {
        lstm_bwd_rows_any(a, s.prev_row(cs_p, c0_p, t, b, H), b, j0, j1);
      });
      W.mul(m, gx_p + t * B * G, G, T(0), dh_p, Hr);
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
      GruBwd<T> a{acts.data_ptr<T>() + t * B * G, hn_seq.data_ptr<T>() + t * B * H, gh_p + t * B * H,
                  dh_p, gx_p + t * B * G, gw_p + t * B * G, H};
      for_rows(m, H, [&](int64_t b, int64_t j0, int64_t j1) {
        gru_bwd_rows_any(a, s.prev_row(hs_p, h0_p, t, b, H), b, j0, j1);
      });
      W.mul(m, gw_p + t * B * G, G, T(1), dh_p, H);
    }
    return {grad_xw, grad_hw, dh, Tensor(), Tensor()};
  }
  for (int64_t k = s.T - 1; k >= 0; --k) {
    const int64_t t = s.at(k), m = s.rows(t);
    if (m == 0) continue;
    RnnBwd<T> a{hs_p + t * B * H, dh_p, gh_p + t * B * H, gx_p + t * B * G, H, cell == kRNNRelu};
    for_rows(m, H, [&](int64_t b, int64_t j0, int64_t j1) { rnn_bwd_rows_any(a, b, j0, j1); });
    W.mul(m, gx_p + t * B * G, G, T(0), dh_p, H);
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

}  // namespace
}  // namespace fastrnn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastrnn C++ recurrence kernels (see csrc/rnn.cpp)";
  m.def("rnn_forward", &fastrnn::rnn_forward,
        "One layer/direction forward: (cell, xw, w_hh, b_hh, h0, c0, w_hr, batch_sizes, reverse, "
        "training) -> [h_seq, h_T, c_T, *saved]");
  m.def("rnn_backward", &fastrnn::rnn_backward,
        "One layer/direction backward: -> [grad_xw, grad_hw, grad_h0, grad_c0, grad_hproj]");
#ifdef FASTRNN_MKL
  m.attr("blas") = "mkl (packed sgemm for the recurrent weight)";
#else
  m.attr("blas") = "at::mm";
#endif
}
