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

// Decode streams every weight from memory once per token; the hardware prefetcher restarts
// cold at every GEMV call, so the kernels ask for rows 8 KB of codes ahead of use (a distance
// in bytes: 24 rows ahead, once best at 576 columns, overran the L1 cache at 4096), and for
// those rows' scales and offsets too, which sit in arrays of their own and otherwise missed
// the cache on every row (a quarter of the 7B decode's time waited on the offsets' loads).
inline constexpr int64_t kPrefetchBytes = 8192;
// The cache lines of bytes [begin, min(end, size)) of data.
QL_AVX512_INLINE void prefetch_range(const void* data, int64_t begin, int64_t end, int64_t size) {
  const auto* bytes = static_cast<const char*>(data);
  const auto first = reinterpret_cast<uintptr_t>(bytes + begin) & ~uintptr_t{63};
  const auto last = reinterpret_cast<uintptr_t>(bytes + std::min(end, size));
  for (uintptr_t b = first; b < last; b += 64)
    _mm_prefetch(reinterpret_cast<const char*>(b), _MM_HINT_T0);
}
QL_AVX512_INLINE void prefetch_rows(const QMatrix& w, int64_t row, int64_t n) {
  const int64_t rb = w.row_bytes();
  row += std::max<int64_t>(1, kPrefetchBytes / rb);
  prefetch_range(w.codes.data(), row * rb, (row + n) * rb, static_cast<int64_t>(w.codes.size()));
  if (w.scales.empty()) return;
  const int64_t pb = static_cast<int64_t>(w.scales.size() / w.rows * sizeof(float));
  const int64_t size = static_cast<int64_t>(w.scales.size() * sizeof(float));
  prefetch_range(w.scales.data(), row * pb, (row + n) * pb, size);
  prefetch_range(w.offsets.data(), row * pb, (row + n) * pb, size);
}

}  // namespace qalora::qk
