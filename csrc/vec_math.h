// Branch-free elementwise math that GCC auto-vectorises, plus runtime ISA dispatch.
//
// The default extension flags target baseline x86-64 (SSE2), so at::vec and libm calls run
// scalar. Functions marked FASTRNN_CLONES are compiled once per ISA (AVX-512, AVX2+FMA,
// baseline) and the loader picks the best at run time (GCC target_clones / ifunc).
// Everything here propagates NaN like libm (no -ffast-math: comparisons keep NaN operands).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTRNN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTRNN_CLONES
#endif
#define FASTRNN_INLINE inline __attribute__((always_inline))
// The step kernels read and write through several pointers into distinct buffers; GCC ignores
// __restrict on local pointers and gives up on the run-time alias checks, so say it outright.
#define FASTRNN_IVDEP _Pragma("GCC ivdep")

namespace fastrnn {
namespace vm {

// exp for float: Cody-Waite reduction to r in [-ln2/2, ln2/2], degree-6 polynomial (Cephes expf
// coefficients), 2^n assembled in the exponent bits with the 1.5 * 2^23 rounding trick (no
// float->int conversion, so NaN is well defined). Max error ~2 ulp. Results below ~1e-38
// (x < -87) are exactly 0 -- a masked (-inf) attention score must contribute exactly nothing --
// and x > 88 gives +inf. NaN stays NaN (all clamps are compares, which keep a NaN operand).
FASTRNN_INLINE float exp(float x) {
  float xc = x < -87.0f ? -87.0f : x;
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
  const float y = p * __builtin_bit_cast(float, bits);
  return x < -87.0f ? 0.f : (x > 88.0f ? __builtin_inff() : y);
}

FASTRNN_INLINE double exp(double x) { return std::exp(x); }

template <typename T>
FASTRNN_INLINE T sigmoid(T x) {
  return T(1) / (T(1) + vm::exp(-x));
}

// tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|) <= 1: no overflow for any x.
// |x| and the sign transfer are bit operations: fabs/copysign block AVX2 vectorisation in GCC.
FASTRNN_INLINE float tanh(float x) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, x);
  const float e = vm::exp(-2.f * __builtin_bit_cast(float, bits & 0x7fffffffu));
  const float r = (1.f - e) / (1.f + e);
  return __builtin_bit_cast(float, __builtin_bit_cast(uint32_t, r) | (bits & 0x80000000u));
}

FASTRNN_INLINE double tanh(double x) { return std::tanh(x); }

// The activations' derivatives through their outputs, as the references' backwards write them.
template <typename T>
FASTRNN_INLINE T d_sigmoid(T s) {  // s = sigmoid(x)
  return s * (T(1) - s);
}
template <typename T>
FASTRNN_INLINE T d_tanh(T t) {  // t = tanh(x)
  return T(1) - t * t;
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

}  // namespace vm
}  // namespace fastrnn
