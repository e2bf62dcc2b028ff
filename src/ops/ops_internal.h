// Internal to the ops kernels: the vectorizable exp that the forward (ops.cpp) and backward
// (ops_backward.cpp) kernels share for softmax and the SiLU.
#pragma once

#include <bit>
#include <cstdint>

namespace qalora::ops {

// exp(x) without a library call, so that loops over it vectorize (a call to expf costs ~20
// cycles per element: most of a decode step's attention and SwiGLU). x = n ln2 + r with
// |r| <= ln2 / 2 (ln2 split in two for an exact product), exp(r) from Cephes' degree-5
// polynomial, times 2^n built in the exponent bits. x is clamped to [-87, 88], where 2^n
// stays a normal float (below, the result is exp(-87) ~ 1.6e-38 instead of smaller); NaN
// stays NaN. n is read from the bits of the rounding sum, not converted from float, so NaN
// needs no special case.
inline float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + kRound;
  const float n = t - kRound;
  const int32_t n_int = std::bit_cast<int32_t>(t) - std::bit_cast<int32_t>(kRound);
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return (p * r * r + r + 1.0f) * std::bit_cast<float>((n_int + 127) << 23);
}

// The largest of s[0..n) (-inf when n = 0). std::max_element compiles to a scalar loop with a
// branch per element; this one vectorizes, which softmax over long rows (attention, a
// 49152-entry vocabulary) notices.
inline float max_value(const float* s, int64_t n) {
  float mx = -__builtin_inff();
#pragma omp simd reduction(max : mx)
  for (int64_t p = 0; p < n; ++p) mx = s[p] > mx ? s[p] : mx;
  return mx;
}

// s[0..n) = exp(s - mx), returning their sum.
inline float exp_shifted(float* s, int64_t n, float mx) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t p = 0; p < n; ++p) {
    s[p] = exp_approx(s[p] - mx);
    sum += s[p];
  }
  return sum;
}

// Rotates each adjacent pair (x[2i], x[2i+1]) of every head of x [T, H, Hd] by `sign` times
// the angle of its position and pair: +1 is RoPE, -1 its inverse and transpose. Token t sits at
// positions[t], or at pos0 + t when `positions` is null.
inline void rotate_pairs(float* x, int64_t T, int64_t H, int64_t Hd, int64_t pos0,
                         const int64_t* positions, const float* cos_table, const float* sin_table,
                         float sign) {
  const int64_t half = Hd / 2;
#pragma omp parallel for collapse(2) if (T * H > 64)
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t h = 0; h < H; ++h) {
      float* v = x + (t * H + h) * Hd;
      const int64_t pos = positions != nullptr ? positions[t] : pos0 + t;
      const float* c = cos_table + pos * half;
      const float* s = sin_table + pos * half;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[2 * i], b = v[2 * i + 1], sn = sign * s[i];
        v[2 * i] = a * c[i] - b * sn;
        v[2 * i + 1] = a * sn + b * c[i];
      }
    }
  }
}

}  // namespace qalora::ops
