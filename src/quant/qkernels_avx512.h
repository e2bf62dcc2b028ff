// Shared by the AVX-512 kernel files: the intrinsics header, the target attribute the kernels
// are compiled with (rather than the build's -march, so that a portable build still carries
// them), and small helpers. x86 only.
#pragma once

// GCC 12 warns that the placeholder operand of unmasked AVX-512 intrinsics (their
// _mm512_undefined_*() argument) is uninitialized when they are inlined into a target-attribute
// function (GCC bug 105593); the warning points into the header, so it is silenced there only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <cstdint>

#include "qalora/quant/qmatrix.h"

#define QL_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define QL_AVX512_INLINE QL_AVX512 inline __attribute__((always_inline))

namespace qalora::qk {

// acc + a[0..n) * b[0..n) lane-wise (masked tail): the offsets' share of a row's result, folded
// into its vector accumulator so one reduction serves both (a scalar loop over 48 groups
// cost as much as the codes at G = 32).
QL_AVX512_INLINE __m512 fma_masked(const float* a, const float* b, int64_t n, __m512 acc) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  if (i < n) {
    const auto m = static_cast<__mmask16>((1u << (n - i)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return acc;
}

}  // namespace qalora::qk
