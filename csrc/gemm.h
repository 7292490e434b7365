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

#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

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

// tile(r0, rows, p) for every tile of C [M, panels]: row blocks of 256 x B's column panels, threaded
// over the tiles when there are several and the product has at least `min_work` multiply-adds;
// done() after each task's tiles (its thread's GEMM release). gemm_packed and gemm_low.
template <typename Tile, typename Done>
void for_tiles(int64_t M, int64_t panels, int64_t work, int64_t min_work, const Tile& tile, const Done& done) {
  constexpr int64_t MB = 256;
  const int64_t tiles = (M + MB - 1) / MB * panels;
  auto run = [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t r0 = (k / panels) * MB;
      tile(r0, std::min(MB, M - r0), k % panels);
    }
    done();
  };
  if (tiles > 1 && at::get_num_threads() > 1 && work >= min_work)
    at::parallel_for(0, tiles, 1, run);
  else
    run(0, tiles);
}

// C[M,N] (+)= A[M,K] B (+ bias[N] broadcast over rows) with B packed; threads over
// (row blocks x panels). The bias is written into each C tile just before its GEMM, while the
// tile is in cache, instead of in a separate pass over all of C.
template <typename T>
void gemm_packed(int64_t M, const T* A, int64_t lda, const PackedB<T>& B, T* C, int64_t ldc, bool add,
                 const T* bias = nullptr) {
  if (M <= 0 || B.N == 0) return;
  for_tiles(M, B.panels(), M * B.N * B.K, 1 << 16, [&](int64_t r0, int64_t rows, int64_t p) {
    const int64_t w = B.width(p);
    T* c = C + r0 * ldc + p * B.NB;
    if (bias)
      for (int64_t r = 0; r < rows; ++r) std::memcpy(c + r * ldc, bias + p * B.NB, sizeof(T) * w);
    gemm_block(rows, w, B.K, A + r0 * lda, lda, B.panel(p), w, c, ldc, add || bias);
  }, [] { release_gemm(); });
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


// ---------------------------------------------------------------------------------------------
// bfloat16 operands, float32 accumulation: oneDNN's brgemm bf16 x bf16 -> f32 micro-kernels (AMX
// tiles where the CPU has them, else AVX512_BF16's vdpbf16ps). brgemm wants B in VNNI layout:
// pairs of K rows interleaved, element (k, n) of a [K, w] panel at (k/2)*2w + 2n + k%2. K must be
// even (an odd K raised SIGILL on AMX here), so both operands are zero-padded to Kp = even(K).
// ---------------------------------------------------------------------------------------------
using bf16 = at::BFloat16;

inline int64_t even(int64_t k) { return (k + 1) & ~int64_t(1); }

// float -> bf16, round to nearest even (c10::BFloat16's rounding; NaN stays NaN), branch-free so that
// the conversion loops vectorise: c10's constructor is scalar code, ~4 ns an element, which made
// rounding h_prev [32, 256] each step cost about what the step's GEMM does.
FASTRNN_INLINE bf16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return bf16((f != f) ? uint16_t(0x7FC0) : uint16_t(r), bf16::from_bits());
}
FASTRNN_INLINE bf16 to_bf16(bf16 v) { return v; }
FASTRNN_INLINE uint32_t low_bits(float f) { return to_bf16(f).x; }
FASTRNN_INLINE uint32_t low_bits(bf16 v) { return v.x; }
// bf16 bits -> float (exact): the conversion the loops below vectorise
FASTRNN_INLINE float from_low(uint16_t v) {
  const uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float -> the nearest bf16 value, held in a float; rows [m, K] (row stride ld) into dst [m, K]
FASTRNN_INLINE float round_low(float f) { return from_low(uint16_t(low_bits(f))); }
FASTRNN_CLONES inline void round_low_rows(int64_t m, int64_t K, const float* __restrict src, int64_t ld,
                                          float* __restrict dst) {
  for (int64_t r = 0; r < m; ++r)
    for (int64_t k = 0; k < K; ++k) dst[r * K + k] = round_low(src[r * ld + k]);
}

// Small calls (fewer rows x steps than kPackRowSteps) read bf16 weights in place, converted on
// the fly, as the float32 ones do (dot_rows, gemm_call): VNNI-packing W_ih and W_hh every call
// cost a 256-wide bf16 LSTM cell step ~300 us, 4x torch's whole step. The same arithmetic as the
// packed products but for the order of the sums when the caller hands A already rounded to bf16
// values (round_low_rows; the packed path rounds its left operand too): exact products, float32
// accumulation.
//
// C[n, N] (+)= A[n, K] W^T for W [N, K] bf16 (row stride ld): one dot product per output
FASTRNN_CLONES inline void low_dot_rows(int64_t n, int64_t N, int64_t K, const float* __restrict A, int64_t lda,
                                        const bf16* W, int64_t ld, float* __restrict C, int64_t ldc, bool add) {
  const uint16_t* __restrict w = reinterpret_cast<const uint16_t*>(W);
  constexpr int L = 16;
  for (int64_t j = 0; j < N; ++j) {
    const uint16_t* __restrict wj = w + j * ld;
    int64_t r = 0;
    for (; r + 4 <= n; r += 4) {  // four rows per pass: each 16-wide block of the weight row converted once
      const float *__restrict a0 = A + r * lda, *__restrict a1 = a0 + lda, *__restrict a2 = a1 + lda,
                  *__restrict a3 = a2 + lda;
      float s0[L] = {}, s1[L] = {}, s2[L] = {}, s3[L] = {};
      int64_t k = 0;
      for (; k + L <= K; k += L)
        for (int l = 0; l < L; ++l) {
          const float wv = from_low(wj[k + l]);
          s0[l] += a0[k + l] * wv, s1[l] += a1[k + l] * wv, s2[l] += a2[k + l] * wv, s3[l] += a3[k + l] * wv;
        }
      float t[4] = {};
      for (; k < K; ++k) {
        const float wv = from_low(wj[k]);
        t[0] += a0[k] * wv, t[1] += a1[k] * wv, t[2] += a2[k] * wv, t[3] += a3[k] * wv;
      }
      for (int l = 0; l < L; ++l) t[0] += s0[l], t[1] += s1[l], t[2] += s2[l], t[3] += s3[l];
      for (int q = 0; q < 4; ++q) {
        float* c = C + (r + q) * ldc + j;
        *c = add ? *c + t[q] : t[q];
      }
    }
    for (; r < n; ++r) {
      const float* __restrict a = A + r * lda;
      const float acc = vm::lane_sum<float>(K, [&](int64_t k) { return a[k] * from_low(wj[k]); });
      C[r * ldc + j] = add ? C[r * ldc + j] + acc : acc;
    }
  }
}

// C[n, N] (+)= A[n, K] B for B [K, N] bf16 (row stride ld): each row of B read once and added,
// scaled, into every row of C (which stays in cache: n is small)
FASTRNN_CLONES inline void low_axpy_rows(int64_t n, int64_t N, int64_t K, const float* __restrict A, int64_t lda,
                                         const bf16* B, int64_t ld, float* __restrict C, int64_t ldc, bool add) {
  const uint16_t* __restrict b = reinterpret_cast<const uint16_t*>(B);
  if (!add)
    for (int64_t r = 0; r < n; ++r) std::fill(C + r * ldc, C + r * ldc + N, 0.0f);
  for (int64_t k = 0; k < K; ++k) {
    const uint16_t* __restrict bk = b + k * ld;
    for (int64_t r = 0; r < n; ++r) {
      const float a = A[r * lda + k];
      float* __restrict c = C + r * ldc;
      FASTRNN_IVDEP
      for (int64_t j = 0; j < N; ++j) c[j] += a * from_low(bk[j]);
    }
  }
}

// d[2n] = r0[n], d[2n + 1] = r1[n] in bf16 (r1 null: 0), n < w: two rows of a VNNI panel, stored
// as one 32-bit word per pair so that the loop vectorises (a uint16 interleave did not: the
// packing ran scalar at 4x the GEMM's own time for a [3200, 1024] weight gradient operand)
template <typename S>
FASTRNN_CLONES void interleave_low(int64_t w, const S* __restrict r0, const S* __restrict r1, bf16* d) {
  typedef uint32_t __attribute__((may_alias)) word;
  word* __restrict d32 = reinterpret_cast<word*>(d);  // 4-byte aligned: an even row of a panel
  if (r1)
    for (int64_t n = 0; n < w; ++n) d32[n] = low_bits(r0[n]) | (low_bits(r1[n]) << 16);
  else
    for (int64_t n = 0; n < w; ++n) d32[n] = low_bits(r0[n]);
}

// dst [c1 - c0, rows r0..r1) of a transpose: dst[c * Rp + r] = src[r * C + c] in bf16
template <typename S>
FASTRNN_CLONES void transpose_low_block(const S* __restrict src, int64_t C, int64_t r0, int64_t r1, int64_t c0,
                                        int64_t c1, bf16* __restrict dst, int64_t Rp) {
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t r = r0; r < r1; ++r) dst[c * Rp + r] = to_bf16(src[r * C + c]);
}

// dst[0:n] = bf16(src[0:n])
template <typename S>
FASTRNN_CLONES void to_low_n(int64_t n, const S* __restrict src, bf16* __restrict dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_bf16(src[i]);
}

// Whether bf16 GEMMs run here (probed once): oneDNN's bf16 brgemm needs AVX512_BF16 (vdpbf16ps) or
// AMX. torch's could_pack(kBFloat16) answers for AMX alone (its packed layout), but our own VNNI
// panels serve the AVX512_BF16 kernels too (Zen 4/5: about 3x the float32 GEMM's rate, measured).
// AMX tiles need the kernel's per-process permission, which oneDNN's own primitives request but its
// micro-kernels do not: without it the first tile instruction is SIGILL. The request is harmless
// where AMX is absent. The probe's product then checks that the kernel really runs.
inline bool low_gemm_usable() {
#ifdef FASTRNN_NO_BRGEMM
  return false;
#endif
  static const bool ok = [] {
#if defined(__linux__) && defined(__x86_64__)
    syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */);
#endif
    try {
#if defined(__GNUC__) && defined(__x86_64__)
      if (!__builtin_cpu_supports("avx512bf16") && !__builtin_cpu_supports("amx-bf16")) return false;
#else
      return false;
#endif
      bf16 a[2] = {1.f, 2.f}, b[32];
      for (int n = 0; n < 16; ++n) b[2 * n] = 3.f, b[2 * n + 1] = 4.f;  // B [2, 16] in VNNI
      float c[16] = {};
      at::native::cpublas::brgemm(1, 16, 2, 2, 16, 16, false, a, b, c, true);
      at::native::cpublas::brgemm_release(true);
      return c[0] == 11.f && c[15] == 11.f;
    } catch (...) {
      return false;
    }
  }();
  return ok;
}

inline void release_low() { at::native::cpublas::brgemm_release(true); }

// dst [m, Kp] bf16 (zero-padded) = src [m, K] (row stride ld), float or bf16.
template <typename S>
void to_low_rows(int64_t m, int64_t K, const S* src, int64_t ld, bf16* dst) {
  const int64_t Kp = even(K);
  for (int64_t r = 0; r < m; ++r) {
    to_low_n(K, src + r * ld, dst + r * Kp);
    if (Kp != K) dst[r * Kp + K] = bf16(0.f);
  }
}

// dst [C, Rp] bf16 = src [R, C]^T (row stride C), zero-padded to Rp = even(R); cache-blocked.
template <typename S>
void to_low_t(const S* src, int64_t R, int64_t C, bf16* dst) {
  constexpr int64_t kb = 32;
  const int64_t Rp = even(R);
  at::parallel_for(0, (C + kb - 1) / kb, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t c0 = b0 * kb; c0 < std::min(C, b1 * kb); c0 += kb) {
      const int64_t c1 = std::min(C, c0 + kb);
      for (int64_t r0 = 0; r0 < R; r0 += kb) {
        const int64_t r1 = std::min(R, r0 + kb);
        transpose_low_block(src, C, r0, r1, c0, c1, dst, Rp);
      }
      if (Rp != R)
        for (int64_t c = c0; c < c1; ++c) dst[c * Rp + R] = bf16(0.f);
    }
  });
}

// A right operand B [K, N] in bf16 VNNI column panels (panel p: columns [p*NB, p*NB + width)),
// packed once per call from float or bf16, by rows (B row-major) or by columns (B = W^T for a
// row-major W, whose rows are B's columns).
struct PackedLow {
  int64_t K = 0, Kp = 0, N = 0, NB = 0;
  Tensor buf;

  PackedLow() = default;
  PackedLow(int64_t K_, int64_t N_, int64_t NB_) : K(K_), Kp(even(K_)), N(N_), NB(std::max<int64_t>(1, NB_)) {
    buf = at::empty({std::max<int64_t>(1, Kp * N)}, at::TensorOptions().dtype(at::kBFloat16));
  }
  int64_t panels() const { return (N + NB - 1) / NB; }
  int64_t width(int64_t p) const { return std::min(NB, N - p * NB); }
  bf16* panel(int64_t p) const { return buf.data_ptr<bf16>() + p * NB * Kp; }

  // panel column n (of w) <- col(n)[0:K], a contiguous source column; the pad row zero
  template <typename Col>
  static void fill_cols(bf16* dst, int64_t K, int64_t w, const Col& col) {
    for (int64_t k0 = 0; k0 < K; k0 += 16) {  // 16 k at a time: the destination lines stay in L1
      const int64_t k1 = std::min(K, k0 + 16);
      for (int64_t n = 0; n < w; ++n) {
        const auto* s = col(n);
        for (int64_t k = k0; k < k1; ++k) dst[(k >> 1) * 2 * w + 2 * n + (k & 1)] = to_bf16(s[k]);
      }
    }
    if (K & 1)
      for (int64_t n = 0; n < w; ++n) dst[(K >> 1) * 2 * w + 2 * n + 1] = bf16(0.f);
  }
  // B row-major [K, N] with row stride ld
  template <typename S>
  static PackedLow rows(const S* b, int64_t K, int64_t N, int64_t ld, int64_t NB) {
    PackedLow P(K, N, NB);
    at::parallel_for(0, P.panels(), 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n0 = p * P.NB, w = P.width(p);
        bf16* dst = P.panel(p);
        for (int64_t k = 0; k < P.Kp; k += 2)
          interleave_low(w, b + k * ld + n0, k + 1 < K ? b + (k + 1) * ld + n0 : nullptr, dst + k * w);
      }
    });
    return P;
  }
  // B = W^T for W [N, K] row-major
  template <typename S>
  static PackedLow transposed(const S* w, int64_t N, int64_t K, int64_t NB) {
    PackedLow P(K, N, NB);
    at::parallel_for(0, P.panels(), 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        fill_cols(P.panel(p), K, P.width(p), [&](int64_t n) { return w + (p * P.NB + n) * K; });
    });
    return P;
  }
};

// C[m, w] (+)= A[m, Kp] P (one panel), one thread; K blocked so A's and B's slices stay in L2.
inline void gemm_low_call(int64_t m, int64_t w, int64_t Kp, const bf16* A, int64_t lda, const bf16* B, float* C,
                          int64_t ldc, bool add) {
  constexpr int64_t KB = 512;
  for (int64_t k0 = 0; k0 < Kp; k0 += KB)
    at::native::cpublas::brgemm(m, w, std::min(KB, Kp - k0), lda, w, ldc, add || k0 > 0, A + k0, B + k0 * w, C,
                                true);
}

// c[r, 0:w] += v[0:w] for r < rows (row stride ldc)
template <typename T>
FASTRNN_CLONES void add_rows(int64_t rows, int64_t w, const T* v, T* c, int64_t ldc) {
  for (int64_t r = 0; r < rows; ++r) {
    T* __restrict cr = c + r * ldc;
    const T* __restrict vr = v;
    for (int64_t j = 0; j < w; ++j) cr[j] += vr[j];
  }
}

// C[M,N] (+)= A[M,Kp] B (+ bias[N] broadcast over rows), bf16 A and B, float C; tiles and threads
// as gemm_packed, threaded from 4x its work (a bf16 product runs ~2.5x faster; not tuned further).
inline void gemm_low(int64_t M, const bf16* A, int64_t lda, const PackedLow& B, float* C, int64_t ldc, bool add,
                     const float* bias = nullptr) {
  if (M <= 0 || B.N == 0) return;
  for_tiles(M, B.panels(), M * B.N * B.K, 1 << 18, [&](int64_t r0, int64_t rows, int64_t p) {
    const int64_t w = B.width(p);
    float* c = C + r0 * ldc + p * B.NB;
    gemm_low_call(rows, w, B.Kp, A + r0 * lda, lda, B.panel(p), c, ldc, add);
    // the bias onto the tile while it is in cache: C initialised with it and accumulated onto
    // cost 0.8 ms over no bias on a [3200, 256] x [256, 1024] projection, this 0.15 ms (Zen 5)
    if (bias) add_rows(rows, w, bias + p * B.NB, c, ldc);
  }, [] { release_low(); });
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
