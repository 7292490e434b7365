// Flash attention on CPU: the "cpp" backend's sdpa_forward / sdpa_backward (module fastrnn._C_sdpa).
//
// Contract and equations: fastrnn/backends/reference_sdpa.py. Shapes (all row-major, contiguous
// unless said): q [N, L, E], k [Nk, S, E], v [Nk, S, Ev], out [N, L, Ev], lse [N, L];
// query row n uses key/value row n / G with G = N / Nk (grouped-query attention); the optional
// additive mask `bias` [Nm, L, S] is read through its strides (stride along S is 0 or 1) at row
// rows[n].
//
// Forward: one task per (query row n, block of BL queries), run in parallel with at::parallel_for.
// A task streams key blocks of BS keys: S = scale Q K^T (one GEMM), mask / causal / online
// softmax row by row (vectorised exp), acc = alpha acc + P V (one GEMM, accumulated in `out`).
// Scratch per task: BL x BS scores and 2 BL row statistics. Nothing L x S is stored; lse is saved.
//
// Backward (FlashAttention-2 order): one task per key/value row (times a few key chunks when
// there are fewer rows than threads). For each key block, all query blocks of the G query heads
// that share it stream past: P = exp(S - lse), dV += (P*Z)^T dO, dP = dO V^T,
// dS = P * (Z dP - D), dK += scale dS^T Q, dQ += scale dS K. dK/dV of a key block stay in cache
// for the whole sweep; dQ goes straight into grad_q (or a per-chunk buffer when key chunks split
// a row, summed at the end). D = rowsum(dO * out) is computed first, O(N L).
//
// GEMMs: MKL's sgemm_/dgemm_ (exported by libtorch_cpu when torch is built with MKL, compiled in
// with -DFASTRNN_MKL); otherwise at::addmm_ on views of the same buffers. Inside at::parallel_for
// MKL runs single-threaded, which is what we want: the parallelism is over tasks.
//
// Pointwise row math for float is compiled once per ISA (AVX-512, AVX2+FMA, baseline; GCC
// target_clones, picked at load time) with a branch-free exp, because the default build flags
// target plain x86-64. NaN propagates: no -ffast-math, and comparisons keep NaN operands.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SDPA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SDPA_CLONES
#endif
#define SDPA_INLINE inline __attribute__((always_inline))

#ifdef FASTRNN_MKL
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
}
#endif

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
// Tasks are grouped so that each parallel chunk has at least this many multiply-adds: waking
// the thread pool costs more than a tiny problem (microseconds idle, milliseconds when loaded).
constexpr int64_t kMinChunkWork = int64_t(1) << 21;

int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, kMinChunkWork / std::max<int64_t>(1, work_per_task));
}

// ---- GEMM (column-major BLAS convention) -------------------------------------------------------

#ifdef FASTRNN_MKL
void blas_gemm(char ta, char tb, int m, int n, int k, float alpha, const float* a, int lda,
               const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
void blas_gemm(char ta, char tb, int m, int n, int k, double alpha, const double* a, int lda,
               const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}
constexpr const char* kBlas = "mkl";
#else
// The same call on tensor views of the buffers. A column-major m x k matrix with leading
// dimension ld is the transpose of a row-major [k, m] view with strides (ld, 1).
template <typename T>
at::Tensor colmajor(const T* p, int rows, int cols, int ld) {
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  return at::from_blob(const_cast<T*>(p), {cols, rows}, {ld, 1}, opts).t();
}
template <typename T>
void blas_gemm(char ta, char tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b,
               int ldb, T beta, T* c, int ldc) {
  at::Tensor A = ta == 'N' ? colmajor(a, m, k, lda) : colmajor(a, k, m, lda).t();
  at::Tensor B = tb == 'N' ? colmajor(b, k, n, ldb) : colmajor(b, n, k, ldb).t();
  colmajor(c, m, n, ldc).addmm_(A, B, beta, alpha);  // beta = 0 ignores C's old contents
}
constexpr const char* kBlas = "aten";
#endif

// Row-major helpers on top of it (all matrices row-major with the given leading dims).
// C[m, n] (+)= alpha * A[m, k] B[n, k]^T
template <typename T>
void gemm_abt(int m, int n, int k, T alpha, const T* A, int lda, const T* B, int ldb, T beta, T* C,
              int ldc) {
  blas_gemm('T', 'N', n, m, k, alpha, B, ldb, A, lda, beta, C, ldc);
}
// C[m, n] (+)= alpha * A[m, k] B[k, n]
template <typename T>
void gemm_ab(int m, int n, int k, T alpha, const T* A, int lda, const T* B, int ldb, T beta, T* C,
             int ldc) {
  blas_gemm('N', 'N', n, m, k, alpha, B, ldb, A, lda, beta, C, ldc);
}
// C[m, n] (+)= alpha * A[k, m]^T B[k, n]
template <typename T>
void gemm_atb(int m, int n, int k, T alpha, const T* A, int lda, const T* B, int ldb, T beta, T* C,
              int ldc) {
  blas_gemm('N', 'T', n, m, k, alpha, B, ldb, A, lda, beta, C, ldc);
}

// ---- pointwise math ----------------------------------------------------------------------------

// exp(x) for float: Cody-Waite reduction, degree-6 polynomial (Cephes expf), 2^n assembled in
// the exponent bits with the 1.5 * 2^23 rounding trick (no float->int conversion, so NaN is
// well defined). Max error ~2 ulp. Results below ~1e-38 (x < -87.3) are exactly 0 -- masked
// (-inf) scores must contribute exactly nothing -- and x > 88 gives +inf. NaN stays NaN.
SDPA_INLINE float vexp(float x) {
  float xc = x < -87.0f ? -87.0f : x;  // compares: NaN passes through unchanged
  xc = xc > 88.0f ? 88.0f : xc;
  const float shifted = xc * 1.44269504088896341f + 12582912.f;
  const float n = shifted - 12582912.f;  // round(x / ln 2), in [-126, 127]
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  // the low mantissa bits of `shifted` hold n; shifting them into the exponent field drops the rest
  const uint32_t bits = (__builtin_bit_cast(uint32_t, shifted) + 127u) << 23;
  float y = p * __builtin_bit_cast(float, bits);
  y = x < -87.0f ? 0.f : y;
  return x > 88.0f ? kInf : y;
}
SDPA_INLINE double vexp(double x) { return std::exp(x); }

// Dropout hash (see reference_sdpa.py): 32-bit, wrapping multiplies.
constexpr uint32_t kMix1 = 0x21F0AAADu, kMix2 = 0x735A2D97u;
constexpr uint32_t kMulN = 0x61C88647u, kMulI = 0x165667B1u, kMulJ = 0x27D4EB2Fu;
SDPA_INLINE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMix1;
  x ^= x >> 15;
  x *= kMix2;
  return x ^ (x >> 15);
}
SDPA_INLINE uint32_t row_key(uint32_t seed, int64_t n, int64_t i) {
  return mix32(mix32(seed ^ (static_cast<uint32_t>(n) * kMulN)) ^ (static_cast<uint32_t>(i) * kMulI));
}

// Row operations; `bs` is the length of the row (<= block size).
template <typename T>
SDPA_INLINE void add_bias_t(T* s, const T* b, int64_t stride, int bs) {
  if (stride == 1) {
#pragma omp simd
    for (int j = 0; j < bs; ++j) s[j] += b[j];
  } else {
    const T c = b[0];
#pragma omp simd
    for (int j = 0; j < bs; ++j) s[j] += c;
  }
}
template <typename T>
SDPA_INLINE T row_max_t(const T* s, int bs) {
  T m = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : m)
  for (int j = 0; j < bs; ++j) m = s[j] > m ? s[j] : m;
  return m;
}
// s <- exp(s - mu); returns the row sum
template <typename T>
SDPA_INLINE T exp_sum_t(T* s, T mu, int bs) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < bs; ++j) {
    const T e = vexp(s[j] - mu);
    s[j] = e;
    sum += e;
  }
  return sum;
}
// s <- exp(s - lse)
template <typename T>
SDPA_INLINE void exp_sub_t(T* s, T lse, int bs) {
#pragma omp simd
  for (int j = 0; j < bs; ++j) s[j] = vexp(s[j] - lse);
}
// z[j] = keep(key, j0 + j) / (1 - p) or 0
template <typename T>
SDPA_INLINE void dropout_scale_t(T* z, uint32_t key, int64_t j0, uint32_t threshold, T inv_keep, int bs) {
#pragma omp simd
  for (int j = 0; j < bs; ++j) {
    const uint32_t h = mix32(key ^ (static_cast<uint32_t>(j0 + j) * kMulJ));
    z[j] = h >= threshold ? inv_keep : T(0);
  }
}
// ds = p * (z * dp - D), in dp; with z == nullptr no dropout
template <typename T>
SDPA_INLINE void grad_scores_t(T* dp, const T* p, const T* z, T D, int bs) {
  if (z) {
#pragma omp simd
    for (int j = 0; j < bs; ++j) dp[j] = p[j] * (z[j] * dp[j] - D);
  } else {
#pragma omp simd
    for (int j = 0; j < bs; ++j) dp[j] = p[j] * (dp[j] - D);
  }
}
template <typename T>
SDPA_INLINE void mul_t(T* y, const T* a, const T* b, int bs) {
#pragma omp simd
  for (int j = 0; j < bs; ++j) y[j] = a[j] * b[j];
}
template <typename T>
SDPA_INLINE void scale_t(T* y, T a, int bs) {
#pragma omp simd
  for (int j = 0; j < bs; ++j) y[j] *= a;
}
template <typename T>
SDPA_INLINE T dot_t(const T* a, const T* b, int bs) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < bs; ++j) sum += a[j] * b[j];
  return sum;
}

// float: one clone per ISA; double: the plain template (double is for gradcheck, not speed).
SDPA_CLONES void add_bias(float* s, const float* b, int64_t st, int bs) { add_bias_t(s, b, st, bs); }
SDPA_CLONES float row_max(const float* s, int bs) { return row_max_t(s, bs); }
SDPA_CLONES float exp_sum(float* s, float mu, int bs) { return exp_sum_t(s, mu, bs); }
SDPA_CLONES void exp_sub(float* s, float lse, int bs) { exp_sub_t(s, lse, bs); }
SDPA_CLONES void dropout_scale(float* z, uint32_t key, int64_t j0, uint32_t thr, float inv, int bs) {
  dropout_scale_t(z, key, j0, thr, inv, bs);
}
SDPA_CLONES void grad_scores(float* dp, const float* p, const float* z, float D, int bs) {
  grad_scores_t(dp, p, z, D, bs);
}
SDPA_CLONES void mul(float* y, const float* a, const float* b, int bs) { mul_t(y, a, b, bs); }
SDPA_CLONES void scale(float* y, float a, int bs) { scale_t(y, a, bs); }
SDPA_CLONES float dot(const float* a, const float* b, int bs) { return dot_t(a, b, bs); }
void add_bias(double* s, const double* b, int64_t st, int bs) { add_bias_t(s, b, st, bs); }
double row_max(const double* s, int bs) { return row_max_t(s, bs); }
double exp_sum(double* s, double mu, int bs) { return exp_sum_t(s, mu, bs); }
void exp_sub(double* s, double lse, int bs) { exp_sub_t(s, lse, bs); }
void dropout_scale(double* z, uint32_t key, int64_t j0, uint32_t thr, double inv, int bs) {
  dropout_scale_t(z, key, j0, thr, inv, bs);
}
void grad_scores(double* dp, const double* p, const double* z, double D, int bs) {
  grad_scores_t(dp, p, z, D, bs);
}
void mul(double* y, const double* a, const double* b, int bs) { mul_t(y, a, b, bs); }
void scale(double* y, double a, int bs) { scale_t(y, a, bs); }
double dot(const double* a, const double* b, int bs) { return dot_t(a, b, bs); }

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

// Scores of query rows [i0, i0 + bl) of batch row n against keys [j0, j0 + bs) after mask and
// causal masking, in s [bl, bs]. Returns nothing; rows fully hidden by causality become -inf.
template <typename T>
void masked_scores(const Problem& P, const T* Qb, const T* Kb, int64_t n, int64_t i0, int bl,
                   int64_t j0, int bs, T* s) {
  gemm_abt<T>(bl, bs, P.E, T(P.scale), Qb, P.E, Kb, P.E, T(0), s, bs);
  const T* bias = static_cast<const T*>(P.bias);
  for (int r = 0; r < bl; ++r) {
    T* srow = s + int64_t(r) * bs;
    const int64_t i = i0 + r;
    if (bias) add_bias(srow, bias + P.rows[n] * P.bias_sN + i * P.bias_sL + j0 * P.bias_sS, P.bias_sS, bs);
    if (P.causal) {  // top-left aligned: key j is visible to query i iff j <= i
      const int64_t first_hidden = std::max<int64_t>(0, i - j0 + 1);
      for (int64_t j = first_hidden; j < bs; ++j) srow[j] = -std::numeric_limits<T>::infinity();
    }
  }
}

template <typename T>
void forward_impl(const Problem& P, const T* q, const T* k, const T* v, T* out, T* lse) {
  const int64_t nqb = (P.L + P.BL - 1) / P.BL;
  const T inf = std::numeric_limits<T>::infinity();
  const int64_t grain = grain_for(P.BL * P.S * (P.E + P.Ev));
  at::parallel_for(0, P.N * nqb, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> sbuf(P.BL * P.BS), zbuf(P.dropout ? P.BS : 0), m(P.BL), l(P.BL);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / nqb, i0 = (task % nqb) * P.BL, kv = n / P.G;
      const int bl = static_cast<int>(std::min(P.BL, P.L - i0));
      const T* Qb = q + (n * P.L + i0) * P.E;
      T* Ob = out + (n * P.L + i0) * P.Ev;  // the accumulator
      std::fill(Ob, Ob + int64_t(bl) * P.Ev, T(0));
      std::fill(m.begin(), m.end(), -inf);
      std::fill(l.begin(), l.end(), T(0));
      const int64_t s_end = P.causal ? std::min(P.S, i0 + bl) : P.S;  // later keys: all hidden
      for (int64_t j0 = 0; j0 < s_end; j0 += P.BS) {
        const int bs = static_cast<int>(std::min(P.BS, s_end - j0));
        T* s = sbuf.data();
        masked_scores<T>(P, Qb, k + (kv * P.S + j0) * P.E, n, i0, bl, j0, bs, s);
        // -- online softmax, row by row --
        for (int r = 0; r < bl; ++r) {
          T* srow = s + int64_t(r) * bs;
          const T m_new = std::max(m[r], row_max(srow, bs));
          const T mu = m_new == -inf ? T(0) : m_new;  // nothing visible yet: every exp is 0
          const T alpha = vexp(m[r] - mu);
          l[r] = alpha * l[r] + exp_sum(srow, mu, bs);
          if (P.dropout) {  // P * Z for the values; l keeps the undropped sum
            dropout_scale(zbuf.data(), row_key(P.seed, n, i0 + r), j0, P.threshold, T(P.inv_keep), bs);
            mul(srow, srow, zbuf.data(), bs);
          }
          if (!(alpha == T(1))) scale(Ob + int64_t(r) * P.Ev, alpha, static_cast<int>(P.Ev));
          m[r] = m_new;
        }
        // -- acc += P V --
        gemm_ab<T>(bl, static_cast<int>(P.Ev), bs, T(1), s, bs, v + (kv * P.S + j0) * P.Ev,
                   static_cast<int>(P.Ev), T(1), Ob, static_cast<int>(P.Ev));
      }
      for (int r = 0; r < bl; ++r) {
        T* orow = Ob + int64_t(r) * P.Ev;
        if (l[r] == T(0)) {  // no visible key: zeros, as torch
          std::fill(orow, orow + P.Ev, T(0));
          lse[n * P.L + i0 + r] = inf;
        } else {
          scale(orow, T(1) / l[r], static_cast<int>(P.Ev));
          lse[n * P.L + i0 + r] = m[r] + std::log(l[r]);
        }
      }
    }
  });
}

template <typename T>
void backward_impl(const Problem& P, const T* dout, const T* q, const T* k, const T* v, const T* out,
                   const T* lse, T* dq, T* dk, T* dv) {
  const int64_t nqb = (P.L + P.BL - 1) / P.BL, nkb = (P.S + P.BS - 1) / P.BS;
  const int E = static_cast<int>(P.E), Ev = static_cast<int>(P.Ev);
  // D_i = dO_i . out_i
  std::vector<T> D(P.N * P.L);
  at::parallel_for(0, P.N * P.L, grain_for(P.Ev), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) D[r] = dot(dout + r * P.Ev, out + r * P.Ev, Ev);
  });
  // Split each key/value row into `chunks` interleaved sets of key blocks when there are fewer
  // rows than threads; each chunk then owns a private dQ for the row's G query heads.
  const int64_t threads = at::get_num_threads();
  const int64_t chunks = std::min<int64_t>(nkb, std::max<int64_t>(1, (threads + P.Nk - 1) / P.Nk));
  const int64_t rowq = P.G * P.L * P.E;  // dQ elements of one key/value row's query heads
  std::vector<T> dq_part(chunks > 1 ? P.Nk * chunks * rowq : 0, T(0));
  const int64_t grain = grain_for(P.G * P.L * P.S * (2 * P.E + 3 * P.Ev) / chunks);
  at::parallel_for(0, P.Nk * chunks, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> pbuf(P.BL * P.BS), dpbuf(P.BL * P.BS), zbuf(P.dropout ? P.BL * P.BS : 0),
        pzbuf(P.dropout ? P.BL * P.BS : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t kv = task / chunks, c = task % chunks;
      T* dq_row = chunks > 1 ? dq_part.data() + task * rowq : dq + kv * rowq;
      for (int64_t jb = c; jb < nkb; jb += chunks) {
        const int64_t j0 = jb * P.BS;
        const int bs = static_cast<int>(std::min(P.BS, P.S - j0));
        const T* Kb = k + (kv * P.S + j0) * P.E;
        const T* Vb = v + (kv * P.S + j0) * P.Ev;
        T* dKb = dk + (kv * P.S + j0) * P.E;
        T* dVb = dv + (kv * P.S + j0) * P.Ev;
        for (int64_t g = 0; g < P.G; ++g) {
          const int64_t n = kv * P.G + g;
          // causal: query blocks that end before key j0 see none of these keys
          for (int64_t ib = P.causal ? j0 / P.BL : 0; ib < nqb; ++ib) {
            const int64_t i0 = ib * P.BL;
            const int bl = static_cast<int>(std::min(P.BL, P.L - i0));
            const T* Qb = q + (n * P.L + i0) * P.E;
            const T* dOb = dout + (n * P.L + i0) * P.Ev;
            T* p = pbuf.data();
            T* dp = dpbuf.data();
            // -- recompute P = exp(S - lse) --
            masked_scores<T>(P, Qb, Kb, n, i0, bl, j0, bs, p);
            for (int r = 0; r < bl; ++r) exp_sub(p + int64_t(r) * bs, lse[n * P.L + i0 + r], bs);
            const T* pz = p;
            T* z = nullptr;
            if (P.dropout) {  // the same mask bits as forward, regenerated
              z = zbuf.data();
              for (int r = 0; r < bl; ++r) {
                dropout_scale(z + int64_t(r) * bs, row_key(P.seed, n, i0 + r), j0, P.threshold,
                              T(P.inv_keep), bs);
              }
              mul(pzbuf.data(), p, z, bl * bs);
              pz = pzbuf.data();
            }
            // -- dV += (P Z)^T dO;  dP = dO V^T --
            gemm_atb<T>(bs, Ev, bl, T(1), pz, bs, dOb, Ev, T(1), dVb, Ev);
            gemm_abt<T>(bl, bs, Ev, T(1), dOb, Ev, Vb, Ev, T(0), dp, bs);
            // -- dS = P (Z dP - D) --
            for (int r = 0; r < bl; ++r) {
              const int64_t o = int64_t(r) * bs;
              grad_scores(dp + o, p + o, z ? z + o : nullptr, D[n * P.L + i0 + r], bs);
            }
            // -- dK += scale dS^T Q;  dQ += scale dS K --
            gemm_atb<T>(bs, E, bl, T(P.scale), dp, bs, Qb, E, T(1), dKb, E);
            gemm_ab<T>(bl, E, bs, T(P.scale), dp, bs, Kb, E, T(1), dq_row + (g * P.L + i0) * P.E, E);
          }
        }
      }
    }
  });
  if (chunks > 1) {
    at::parallel_for(0, P.Nk, grain_for(rowq * chunks), [&](int64_t begin, int64_t end) {
      for (int64_t kv = begin; kv < end; ++kv) {
        T* dst = dq + kv * rowq;
        for (int64_t c = 0; c < chunks; ++c) {
          const T* src = dq_part.data() + (kv * chunks + c) * rowq;
          for (int64_t x = 0; x < rowq; ++x) dst[x] += src[x];
        }
      }
    });
  }
}

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& rows,
                     double scale, bool causal, double dropout_p, int64_t seed, int64_t block_l,
                     int64_t block_s) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "sdpa: q, k, v must be 3-D");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "sdpa: q, k, v must be contiguous");
  TORCH_CHECK(q.device().is_cpu(), "sdpa: the cpp backend runs on CPU");
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
  P.G = P.N / P.Nk;
  P.BL = std::min<int64_t>(block_l, std::max<int64_t>(P.L, 1));
  P.BS = std::min<int64_t>(block_s, std::max<int64_t>(P.S, 1));
  P.causal = causal;
  P.bias = nullptr;
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(rows.has_value(), "sdpa: a mask needs its rows");
    TORCH_CHECK(b.dim() == 3 && b.size(1) == P.L && b.size(2) == P.S, "sdpa: bias must be [Nm, L, S]");
    TORCH_CHECK(b.scalar_type() == q.scalar_type(), "sdpa: bias dtype must match q");
    TORCH_CHECK(b.stride(2) == 0 || b.stride(2) == 1, "sdpa: bias stride along S must be 0 or 1");
    TORCH_CHECK(rows->scalar_type() == at::kLong && rows->is_contiguous() && rows->numel() == P.N,
                "sdpa: rows must be a contiguous int64 [N]");
    P.bias = b.data_ptr();
    P.bias_sN = b.stride(0);
    P.bias_sL = b.stride(1);
    P.bias_sS = b.stride(2);
    P.rows = rows->data_ptr<int64_t>();
  }
  P.dropout = dropout_p > 0;
  TORCH_CHECK(dropout_p < 1, "sdpa: dropout_p must be < 1 here (the op layer handles p >= 1)");
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
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.size(0) == P.N && out.size(1) == P.L &&
                  out.size(2) == P.Ev && lse.numel() == P.N * P.L,
              "sdpa: grad_out / out / lse shapes");
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "fastrnn_sdpa_backward", [&] {
    backward_impl<scalar_t>(P, grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                            v.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                            dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>());
  });
  return {dq, dk, dv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastrnn flash attention on CPU (contract: fastrnn/backends/reference_sdpa.py)";
  m.attr("blas") = kBlas;
  m.def("sdpa_forward", &sdpa_forward, "-> [out [N, L, Ev], lse [N, L]]", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("bias"), py::arg("rows"), py::arg("scale"), py::arg("causal"),
        py::arg("dropout_p"), py::arg("seed"), py::arg("block_l"), py::arg("block_s"));
  m.def("sdpa_backward", &sdpa_backward, "-> [grad_q, grad_k, grad_v]", py::arg("grad_out"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("bias"),
        py::arg("rows"), py::arg("scale"), py::arg("causal"), py::arg("dropout_p"), py::arg("seed"),
        py::arg("block_l"), py::arg("block_s"));
}
