#include "qalora/core/fp16.h"

#include <cstring>
#if defined(__F16C__) || defined(__AVX512F__)
// GCC 12 bug 105593: a false uninitialized warning inside the AVX-512 header (see
// quant/qkernels_avx512.h).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

namespace qalora {

void fp16_to_fp32_row(const uint8_t* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i));
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
#endif
  for (; i < n; ++i) {
    uint16_t h = 0;
    std::memcpy(&h, src + 2 * i, 2);
    dst[i] = fp16_to_fp32(h);
  }
}

void fp32_to_fp16_row(const float* src, uint16_t* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) dst[i] = fp32_to_fp16(src[i]);
}

void bf16_to_fp32_row(const uint8_t* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint16_t h = 0;
    std::memcpy(&h, src + 2 * i, 2);
    dst[i] = bf16_to_fp32(h);
  }
}

float fp16_dot_row(const uint8_t* src, const float* x, int64_t n) {
  int64_t i = 0;
  float acc = 0.0f;
#if defined(__AVX512F__)
  // Two accumulators: the FMA's latency, not the loads, would bound one chain.
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (; i + 32 <= n; i += 32) {
    const auto* h = reinterpret_cast<const __m256i*>(src + 2 * i);
    a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256(h)), _mm512_loadu_ps(x + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256(h + 1)), _mm512_loadu_ps(x + i + 16),
                         a1);
  }
  acc = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(__F16C__) && defined(__FMA__)
  __m256 a0 = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 2 * i));
    a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(h), _mm256_loadu_ps(x + i), a0);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, a0);
  for (float l : lanes) acc += l;
#endif
  for (; i < n; ++i) {
    uint16_t h = 0;
    std::memcpy(&h, src + 2 * i, 2);
    acc += fp16_to_fp32(h) * x[i];
  }
  return acc;
}

float bf16_dot_row(const uint8_t* src, const float* x, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) {
    uint16_t h = 0;
    std::memcpy(&h, src + 2 * i, 2);
    acc += bf16_to_fp32(h) * x[i];
  }
  return acc;
}

}  // namespace qalora
