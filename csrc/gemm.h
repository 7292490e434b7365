// GEMM engine shared by the C++ kernels (csrc/rnn.cpp, csrc/sdpa.cpp).
//
// Everything is row-major C[M,N] (+)= A[M,K] B[K,N] with leading dimensions.
// float: oneDNN's brgemm micro-kernel (at::native::cpublas::brgemm, JIT AVX-512/AVX2). On this
// project's AMD EPYC machines it runs at ~165 GFLOP/s a core on strided operands and ~230 on
// packed panels, where MKL's sgemm (torch.mm) gets ~90: MKL takes slower paths on non-Intel
// CPUs. brgemm is single-threaded, so the tiled entry points split products over threads.
// Fallbacks: MKL sgemm_/dgemm_ (exported by libtorch_cpu, -DFASTRNN_MKL), then at::mm on
// borrowed memory. -DFASTRNN_NO_BRGEMM forces the fallbacks (their tests build with it).
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "vec_math.h"

#ifdef FASTRNN_MKL
extern "C" {
// Exported by libtorch_cpu (MKL, LP64 interface). Declared here so no MKL headers are needed.
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*, const int*);
}
#endif

namespace fastrnn {
namespace {

using at::Tensor;

#ifdef FASTRNN_MKL
// Row-major C[M,N] = op(A)[M,K] op(B)[K,N] (+ C if add) through column-major BLAS: the row-major C is
// the column-major C^T, so BLAS computes C^T = op(B)^T op(A)^T. `ta` / `tb`: A / B stored
// transposed (A as [K,M], B as [N,K], row-major, leading dimensions lda / ldb).
template <typename T>
void blas_gemm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
               T* C, int64_t ldc, bool add) {
  const char opa = ta ? 'T' : 'N', opb = tb ? 'T' : 'N';
  const int m_ = (int)N, n_ = (int)M, k_ = (int)K, la = (int)lda, lb = (int)ldb, lc = (int)ldc;
  const T one = 1, beta = add ? 1 : 0;
  if constexpr (std::is_same_v<T, float>)
    sgemm_(&opb, &opa, &m_, &n_, &k_, &one, B, &lb, A, &la, &beta, C, &lc);
  else
    dgemm_(&opb, &opa, &m_, &n_, &k_, &one, B, &lb, A, &la, &beta, C, &lc);
}
#endif


bool brgemm_usable() {
#ifdef FASTRNN_NO_BRGEMM
  return false;
#endif
  // Probe once: brgemm throws where oneDNN's ukernel is not built in or the CPU lacks AVX-512.
  static const bool ok = [] {
    try {
      float a[2] = {1.f, 2.f}, b[2] = {3.f, 4.f}, c[1] = {0.f};
      at::native::cpublas::brgemm(1, 1, 2, 2, 1, 1, false, a, b, c, false);
      at::native::cpublas::brgemm_release(false);
      return c[0] == 11.f;
    } catch (...) {
      return false;
    }
  }();
  return ok;
}

// C[0, 0:N] (+)= a[0:K] B for one row (batch 1: every recurrent step is a GEMV). brgemm's M=1
// kernels reach only 30-50 GFLOP/s here; this streams B once, eight 16-wide accumulators per
// 128-column strip (one broadcast FMA per loaded vector), at about L2 bandwidth. GCC vector
// extensions compile to AVX-512, AVX2 or SSE in the respective clone.
typedef float v16f __attribute__((vector_size(64), aligned(4)));

FASTRNN_CLONES void gemv_f32(int64_t N, int64_t K, const float* a, const float* B, int64_t ldb,
                             float* c, bool add) {
  int64_t n0 = 0;
  for (; n0 + 128 <= N; n0 += 128) {
    v16f acc[8] = {};
    const float* p = B + n0;
    for (int64_t k = 0; k < K; ++k, p += ldb) {
      const float ak = a[k];
      for (int q = 0; q < 8; ++q) acc[q] += ak * *reinterpret_cast<const v16f*>(p + 16 * q);
    }
    for (int q = 0; q < 8; ++q) {
      v16f* out = reinterpret_cast<v16f*>(c + n0 + 16 * q);
      *out = add ? *out + acc[q] : acc[q];
    }
  }
  for (; n0 + 16 <= N; n0 += 16) {
    v16f acc = {};
    const float* p = B + n0;
    for (int64_t k = 0; k < K; ++k, p += ldb) acc += a[k] * *reinterpret_cast<const v16f*>(p);
    v16f* out = reinterpret_cast<v16f*>(c + n0);
    *out = add ? *out + acc : acc;
  }
  for (; n0 < N; ++n0) {
    float acc = 0.f;
    for (int64_t k = 0; k < K; ++k) acc += a[k] * B[k * ldb + n0];
    c[n0] = add ? c[n0] + acc : acc;
  }
}

// One thread: C[M,N] = A B (+ C if add), one library call.
template <typename T>
void gemm_call(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                T* C, int64_t ldc, bool add) {
  if (M <= 0 || N <= 0) return;
  if (K == 0) {
    if (!add)
      for (int64_t r = 0; r < M; ++r) std::fill(C + r * ldc, C + r * ldc + N, T(0));
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    if (M == 1) return gemv_f32(N, K, A, B, ldb, C, add);
    if (brgemm_usable()) {
      at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, false);
      return;
    }
  }
#ifdef FASTRNN_MKL
  return blas_gemm(false, false, M, N, K, A, lda, B, ldb, C, ldc, add);
#endif
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  Tensor a = at::from_blob(const_cast<T*>(A), {M, K}, {lda, 1}, opts);
  Tensor b = at::from_blob(const_cast<T*>(B), {K, N}, {ldb, 1}, opts);
  Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (add) c.addmm_(a, b);
  else at::mm_out(c, a, b);
}

// Calls with fewer rows x steps than this read their weights in place instead of packing them
// (packing reads and rewrites the whole matrix: at T = B = 1, a decoding step, packing the ~2.5 MB
// of a 256-wide decoder's weights took ~0.8 ms, most of the step; a 64-wide LSTM cell step at batch
// 2 spent half its ~25 us packing W_hh and W_ih).
constexpr int64_t kPackRowSteps = 16;

// C[n, N] (+)= A[n, K] W^T for W [N, K] read in place (row stride ld): one dot product per output,
// for calls too small to repay packing.
template <typename T>
FASTRNN_CLONES void dot_rows(int64_t n, int64_t N, int64_t K, const T* __restrict A, int64_t lda,
                             const T* __restrict W, int64_t ld, T* __restrict C, int64_t ldc, bool add) {
#ifdef FASTRNN_MKL
  return blas_gemm(false, true, n, N, K, A, lda, W, ld, C, ldc, add);  // MKL's GEMV path at n = 1
#endif
  for (int64_t r = 0; r < n; ++r) {
    const T* __restrict a = A + r * lda;
    T* __restrict c = C + r * ldc;
    for (int64_t j = 0; j < N; ++j) {
      const T* __restrict wj = W + j * ld;
      const T acc = vm::lane_sum<T>(K, [&](int64_t k) { return a[k] * wj[k]; });
      c[j] = add ? c[j] + acc : acc;
    }
  }
}

// C[M, N] (+)= A^T B for A [K, M], B [K, N] row-major with few rows K (a weight gradient of a
// small call: K = batch rows), without transposed copies: MKL's GEMM on the operands as they lie
// (~2x the rank-1 loop below, which is the build without MKL).
template <typename T>
FASTRNN_CLONES void gemm_tn_rows(int64_t M, int64_t N, int64_t K, const T* __restrict A, const T* __restrict B,
                                 T* __restrict C, bool add) {
#ifdef FASTRNN_MKL
  return blas_gemm(true, false, M, N, K, A, M, B, N, C, N, add);
#endif
  for (int64_t m = 0; m < M; ++m) {
    T* __restrict c = C + m * N;
    if (!add) std::fill(c, c + N, T(0));
    for (int64_t k = 0; k < K; ++k) {
      const T a = A[k * M + m];
      const T* __restrict b = B + k * N;
      FASTRNN_IVDEP for (int64_t n = 0; n < N; ++n) c[n] += a * b[n];
    }
  }
}

// One thread, K split into blocks so the slice of B a call streams through stays in L2.
template <typename T>
void gemm_block(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb,
                T* C, int64_t ldc, bool add) {
  constexpr int64_t KB = 256;
  if (K <= KB) return gemm_call(M, N, K, A, lda, B, ldb, C, ldc, add);
  for (int64_t k0 = 0; k0 < K; k0 += KB)
    gemm_call(M, N, std::min(KB, K - k0), A + k0, lda, B + k0 * ldb, ldb, C, ldc, add || k0 > 0);
}

void release_gemm() {
  if (brgemm_usable()) at::native::cpublas::brgemm_release(false);
}

// A right operand B [K,N] re-used by many products, stored as column panels: panel p holds
// columns [p*NB, p*NB + width) as a contiguous [K, width] block. brgemm on contiguous panels
// 64-256 wide runs ~15% faster than on the strided matrix (and 1.5x at M=1) because each
// panel is one linear stream that stays in L2. `src(k, n)` reads the logical B[k, n].
template <typename T>
struct PackedB {
  int64_t K = 0, N = 0, NB = 0;
  Tensor buf;

  PackedB() = default;
  template <typename Src>
  PackedB(int64_t K_, int64_t N_, int64_t NB_, const at::TensorOptions& opts, const Src& src)
      : K(K_), N(N_), NB(std::max<int64_t>(1, NB_)) {
    buf = at::empty({std::max<int64_t>(1, K * N)}, opts);
    T* out = buf.data_ptr<T>();
    at::parallel_for(0, panels(), 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * NB, w = width(p);
        T* dst = out + n0 * K;
        // 16 rows of k at a time: a transposed source is then read in 64-byte runs and the 16
        // destination lines being filled stay in L1 (row- or column-at-a-time is ~5x slower)
        for (int64_t k0 = 0; k0 < K; k0 += 16) {
          const int64_t k1 = std::min(K, k0 + 16);
          for (int64_t n = 0; n < w; ++n)
            for (int64_t k = k0; k < k1; ++k) dst[k * w + n] = src(k, n0 + n);
        }
      }
    });
  }
  int64_t panels() const { return (N + NB - 1) / NB; }
  int64_t width(int64_t p) const { return std::min(NB, N - p * NB); }
  const T* panel(int64_t p) const { return buf.data_ptr<T>() + p * NB * K; }

  // B given row-major [K, N] (ldb), or as W [N, K] row-major with B = W^T.
  static PackedB rows(const T* b, int64_t K, int64_t N, int64_t ldb, int64_t NB, const at::TensorOptions& o) {
    return PackedB(K, N, NB, o, [=](int64_t k, int64_t n) { return b[k * ldb + n]; });
  }
  static PackedB transposed(const T* w, int64_t N, int64_t K, int64_t NB, const at::TensorOptions& o) {
    return PackedB(K, N, NB, o, [=](int64_t k, int64_t n) { return w[n * K + k]; });
  }
};

// Panel width for a product with N columns: wide enough for brgemm to run at full speed, narrow
// enough that every thread gets a panel.
inline int64_t panel_width(int64_t N, int64_t M = 1) {
  if (M > 256) return 256;  // many row blocks already feed every thread
  const int64_t threads = at::get_num_threads();
  const int64_t per_thread = (N + threads - 1) / threads;
  return std::clamp<int64_t>((per_thread + 15) / 16 * 16, 16, 256);
}

// C[M,N] (+)= A[M,K] B (+ bias[N] broadcast over rows) with B packed; threads over
// (row blocks x panels). The bias is written into each C tile just before its GEMM, while the
// tile is in cache, instead of in a separate pass over all of C.
template <typename T>
void gemm_packed(int64_t M, const T* A, int64_t lda, const PackedB<T>& B, T* C, int64_t ldc, bool add,
                 const T* bias = nullptr) {
  if (M <= 0 || B.N == 0) return;
  constexpr int64_t MB = 256;
  const int64_t tm = (M + MB - 1) / MB, tn = B.panels();
  auto work = [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r0 = (k / tn) * MB, p = k % tn, rows = std::min(MB, M - r0), w = B.width(p);
      T* c = C + r0 * ldc + p * B.NB;
      if (bias)
        for (int64_t r = 0; r < rows; ++r) std::memcpy(c + r * ldc, bias + p * B.NB, sizeof(T) * w);
      gemm_block(rows, w, B.K, A + r0 * lda, lda, B.panel(p), w, c, ldc, add || bias);
    }
    release_gemm();
  };
  if (tm * tn > 1 && at::get_num_threads() > 1 && M * B.N * B.K >= (1 << 16))
    at::parallel_for(0, tm * tn, 1, work);
  else
    work(0, tm * tn);
}

// C[M,N] (+)= A B split into (row block x column block) tiles: cache blocking, and the unit
// of work for the threads.
template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
          int64_t ldc, bool add) {
  const int64_t threads = at::get_num_threads();
  if (M * N * K < (1 << 17)) {
    gemm_block(M, N, K, A, lda, B, ldb, C, ldc, add);
    release_gemm();
    return;
  }
  // 256 x 256 tiles (K blocked at 256 in gemm_block): measured best for the strided weight-
  // gradient GEMMs here (K = T*B), ~220 GFLOP/s a core against ~160 with 256 x 512 x 512.
  const int64_t MB = 256;
  const int64_t tm = (M + MB - 1) / MB;
  const int64_t NB = std::clamp<int64_t>(((N + 2 * threads - 1) / (2 * threads) + 15) / 16 * 16, 64, 256);
  const int64_t tn = (N + NB - 1) / NB;
  at::parallel_for(0, tm * tn, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r0 = (k / tn) * MB, c0 = (k % tn) * NB;
      gemm_block(std::min(MB, M - r0), std::min(NB, N - c0), K, A + r0 * lda, lda, B + c0, ldb,
                 C + r0 * ldc + c0, ldc, add);
    }
    release_gemm();
  });
}

// dst[C,R] = src[R,C]^T, cache-blocked (torch's generic strided copy is ~5x slower).
template <typename T>
void transpose(const T* src, int64_t R, int64_t C, T* dst) {
  constexpr int64_t kb = 32;
  const int64_t rb = (R + kb - 1) / kb;
  at::parallel_for(0, rb, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t bi = b0; bi < b1; ++bi) {
      const int64_t r0 = bi * kb, r1 = std::min(R, r0 + kb);
      for (int64_t c0 = 0; c0 < C; c0 += kb) {
        const int64_t c1 = std::min(C, c0 + kb);
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t r = r0; r < r1; ++r) dst[c * R + r] = src[r * C + c];
      }
    }
  });
}

// Which GEMM the kernels use (reported by `python -m fastrnn info`).
inline std::string gemm_engine() {
  if (brgemm_usable()) return "onednn-brgemm";
#ifdef FASTRNN_MKL
  return "mkl";
#else
  return "aten";
#endif
}

}  // namespace
}  // namespace fastrnn
