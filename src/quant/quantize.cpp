// RTN, INT8 and NF4/FP4 quantizers.
#include "qalora/quant/quantize.h"

#include <omp.h>

#if defined(__AVX512F__)
// GCC 12 bug 105593: a false uninitialized warning inside the AVX-512 header (see
// quant/qkernels_avx512.h).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include "qalora/core/error.h"
#include "qalora/core/fp16.h"

namespace qalora {

namespace {

constexpr float kMinFp16Scale = 5.9604645e-8f;  // smallest positive fp16 (subnormal)

// [min(0, w), max(0, w)] over n values `stride` apart, one at a time.
std::pair<float, float> range_of(const float* w, int64_t n, int64_t stride) {
  float lo = 0.0f, hi = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, w[i * stride]);
    hi = std::max(hi, w[i * stride]);
  }
  return {lo, hi};
}

// SPEC §3's min-max parameters from a group's range (lo <= 0 <= hi): the definition the
// vectorised form in rtn_groups_avx512 reproduces bit for bit.
AffineParams params_of_range(float lo, float hi, int bits, bool sym) {
  const float maxq = static_cast<float>((1 << bits) - 1);
  AffineParams p;
  if (sym) {
    hi = std::max(-lo, hi);
    lo = -hi;
  }
  float scale = (hi - lo) / maxq;
  if (!(scale > 0.0f)) scale = 1.0f;
  p.scale = std::max(round_to_fp16(scale), kMinFp16Scale);
  if (!std::isfinite(p.scale))
    fail("weight range [", lo, ", ", hi, "] does not fit an fp16 scale at ", bits, " bits");
  const float zero = sym ? static_cast<float>(1 << (bits - 1)) : std::nearbyint(-lo / p.scale);
  p.offset = round_to_fp16(-p.scale * zero);
  return p;
}

}  // namespace

AffineParams affine_params(const float* w, int64_t n, int64_t stride, int bits, bool sym) {
  float lo = 0.0f, hi = 0.0f;
#if defined(__AVX512F__)
  if (stride == 1) {  // RTN's groups: 16 lanes at a time (GCC leaves the loop below scalar)
    __m512 vlo = _mm512_setzero_ps(), vhi = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
      // The tail's missing lanes read as 0, which the range includes anyway.
      const __m512 x = _mm512_maskz_loadu_ps(
          static_cast<__mmask16>(n - i >= 16 ? 0xFFFF : (1u << (n - i)) - 1), w + i);
      vlo = _mm512_min_ps(vlo, x);
      vhi = _mm512_max_ps(vhi, x);
    }
    // A zero bound is +0, as the scalar loop keeps it whatever the signs of w's zeros.
    lo = _mm512_reduce_min_ps(vlo) + 0.0f;
    hi = _mm512_reduce_max_ps(vhi) + 0.0f;
  } else
#endif
  {
    std::tie(lo, hi) = range_of(w, n, stride);
  }
  return params_of_range(lo, hi, bits, sym);
}

#if defined(__AVX512F__)
namespace {

__m512 negate(__m512 x) {  // -x, as the scalar unary minus (0 - x would keep +0)
  return _mm512_castsi512_ps(
      _mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32(static_cast<int>(0x80000000u))));
}

__m512 round_to_fp16(__m512 x) {  // round to nearest even, as the scalar conversion
  return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// The full groups [0, n) of a row with G % 16 == 0 (RTN's usual 32, 64, 128): affine_params
// and affine_codes of each group, with the parameters of 16 groups computed together in
// vectors (one group at a time, their scalar fp16 roundings were a quarter of a 7B RTN's
// time). The same results bit for bit.
void rtn_groups_avx512(const float* row, int64_t n, int64_t G, int bits, bool sym, float* scales,
                       float* offsets, uint8_t* codes) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512 maxq = _mm512_set1_ps(static_cast<float>((1 << bits) - 1));
  for (int64_t g0 = 0; g0 < n; g0 += 16) {
    const int64_t ng = std::min<int64_t>(16, n - g0);
    const auto live = static_cast<__mmask16>(ng == 16 ? 0xFFFFu : (1u << ng) - 1);
    alignas(64) float lo[16] = {}, hi[16] = {};
    for (int64_t k = 0; k < ng; ++k) {
      const float* w = row + (g0 + k) * G;
      __m512 vlo = zero, vhi = zero;
      for (int64_t i = 0; i < G; i += 16) {
        const __m512 x = _mm512_loadu_ps(w + i);
        vlo = _mm512_min_ps(vlo, x);
        vhi = _mm512_max_ps(vhi, x);
      }
      lo[k] = _mm512_reduce_min_ps(vlo) + 0.0f;  // a zero bound is +0, as in affine_params
      hi[k] = _mm512_reduce_max_ps(vhi) + 0.0f;
    }
    // params_of_range, lane by lane.
    __m512 vlo = _mm512_load_ps(lo), vhi = _mm512_load_ps(hi);
    if (sym) {
      vhi = _mm512_max_ps(vhi, negate(vlo));  // std::max(-lo, hi): -lo unless hi is larger
      vlo = negate(vhi);
    }
    __m512 scale = _mm512_div_ps(_mm512_sub_ps(vhi, vlo), maxq);
    scale = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(scale, zero, _CMP_GT_OQ), _mm512_set1_ps(1.0f),
                                 scale);
    scale = _mm512_max_ps(round_to_fp16(scale), _mm512_set1_ps(kMinFp16Scale));
    const __mmask16 overflow = static_cast<__mmask16>(
        live & _mm512_cmp_ps_mask(scale, _mm512_set1_ps(INFINITY), _CMP_EQ_OQ));
    for (int64_t k = 0; k < ng; ++k)  // the scalar definition names the range in its error
      if (overflow >> k & 1) params_of_range(lo[k], hi[k], bits, sym);
    const __m512 zp = sym ? _mm512_set1_ps(static_cast<float>(1 << (bits - 1)))
                          : _mm512_roundscale_ps(_mm512_div_ps(negate(vlo), scale),
                                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 offset = round_to_fp16(_mm512_mul_ps(negate(scale), zp));
    _mm512_mask_storeu_ps(scales + g0, live, scale);
    _mm512_mask_storeu_ps(offsets + g0, live, offset);
    for (int64_t k = 0; k < ng; ++k)
      affine_codes(row + (g0 + k) * G, G, {scales[g0 + k], offsets[g0 + k]}, bits,
                   codes + (g0 + k) * G);
  }
}

}  // namespace
#endif

uint8_t affine_code(float w, const AffineParams& p, int bits) {
  const float q = std::nearbyint((w - p.offset) / p.scale);
  return static_cast<uint8_t>(std::clamp(q, 0.0f, static_cast<float>((1 << bits) - 1)));
}

void affine_codes(const float* w, int64_t n, const AffineParams& p, int bits, uint8_t* codes) {
  int64_t i = 0;
#if defined(__AVX512F__)
  // The same steps as affine_code, 16 at a time (GCC 12 leaves that loop scalar): a division,
  // round half to even (nearbyint's default), the clamp, then int32 -> uint8.
  const __m512 offset = _mm512_set1_ps(p.offset), scale = _mm512_set1_ps(p.scale);
  const __m512 maxq = _mm512_set1_ps(static_cast<float>((1 << bits) - 1));
  for (; i + 16 <= n; i += 16) {
    __m512 q = _mm512_div_ps(_mm512_sub_ps(_mm512_loadu_ps(w + i), offset), scale);
    q = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(_mm512_max_ps(q, _mm512_setzero_ps()), maxq);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(codes + i),
                     _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q)));
  }
#endif
  for (; i < n; ++i) codes[i] = affine_code(w[i], p, bits);
}

int64_t resolve_group_size(int64_t group_size, int64_t cols) {
  if (group_size == -1) return cols;
  if (group_size < 1) fail("group size is ", group_size, ", expected -1 (per channel) or >= 1");
  return std::min(group_size, cols);
}

int64_t first_non_finite(const float* row, int64_t cols) {
  float sum = 0.0f;  // nan or inf anywhere in the row makes the sum nan
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < cols; ++i) sum += row[i] * 0.0f;
  if (sum == 0.0f) return -1;
  for (int64_t i = 0; i < cols; ++i)
    if (!std::isfinite(row[i])) return i;
  return -1;
}

void check_finite(const float* w, int64_t rows, int64_t cols, std::string_view name) {
  int64_t bad_row = rows;
#pragma omp parallel for schedule(static) reduction(min : bad_row)
  for (int64_t j = 0; j < rows; ++j)
    if (first_non_finite(w + j * cols, cols) >= 0) bad_row = std::min(bad_row, j);
  if (bad_row == rows) return;
  const int64_t i = first_non_finite(w + bad_row * cols, cols);
  fail(name, ": weight [", bad_row, ", ", i, "] is ", w[bad_row * cols + i],
       ", expected a finite value");
}

namespace {

// Row j of an fp32 matrix.
WeightRows fp32_rows(const float* w, int64_t cols) {
  return [w, cols](int64_t j, float*) { return w + j * cols; };
}

}  // namespace

QMatrix quantize_rtn(const float* w, int64_t rows, int64_t cols, int bits, int64_t group_size,
                     bool sym) {
  return quantize_rtn(fp32_rows(w, cols), rows, cols, bits, group_size, sym);
}

QMatrix quantize_rtn(const WeightRows& row_of, int64_t rows, int64_t cols, int bits,
                     int64_t group_size, bool sym) {
  QMatrix q = make_affine(rows, cols, bits, resolve_group_size(group_size, cols));
  const int64_t G = q.group_size, L = q.n_groups();
  float* const scales = q.scales.writable();
  float* const offsets = q.offsets.writable();
  ParallelErrors errors;  // a range no fp16 scale holds
#pragma omp parallel
  {
    std::vector<uint8_t> codes(static_cast<size_t>(cols));
    std::vector<float> scratch(static_cast<size_t>(cols));
#pragma omp for schedule(static)
    for (int64_t j = 0; j < rows; ++j)
      errors.capture([&] {
        const float* row = row_of(j, scratch.data());
        int64_t g = 0;
#if defined(__AVX512F__)
        if (G % 16 == 0) {
          g = cols / G;  // the full groups; a shorter last one goes below
          rtn_groups_avx512(row, g, G, bits, sym, scales + j * L, offsets + j * L, codes.data());
        }
#endif
        for (; g < L; ++g) {
          const int64_t i0 = g * G, i1 = std::min(cols, i0 + G);
          const AffineParams p = affine_params(row + i0, i1 - i0, 1, bits, sym);
          scales[j * L + g] = p.scale;
          offsets[j * L + g] = p.offset;
          affine_codes(row + i0, i1 - i0, p, bits, codes.data() + i0);
        }
        pack_row(codes.data(), cols, bits, q.row_codes(j));
      });
  }
  errors.rethrow();
  q.compact_params();
  return q;
}

QMatrix quantize_rtn_ref(const float* w, int64_t rows, int64_t cols, int bits, int64_t group_size,
                         bool sym) {
  QMatrix q = make_affine(rows, cols, bits, resolve_group_size(group_size, cols));
  const int64_t G = q.group_size, L = q.n_groups();
  float* const scales = q.scales.writable();
  float* const offsets = q.offsets.writable();
  std::vector<uint8_t> codes(static_cast<size_t>(cols));
  for (int64_t j = 0; j < rows; ++j) {
    const float* row = w + j * cols;
    for (int64_t g = 0; g < L; ++g) {
      const int64_t i0 = g * G, i1 = std::min(cols, i0 + G);
      const auto [lo, hi] = range_of(row + i0, i1 - i0, 1);
      const AffineParams p = params_of_range(lo, hi, bits, sym);
      scales[j * L + g] = p.scale;
      offsets[j * L + g] = p.offset;
      for (int64_t i = i0; i < i1; ++i)
        codes[static_cast<size_t>(i)] = affine_code(row[i], p, bits);
    }
    pack_row(codes.data(), cols, bits, q.row_codes(j));
  }
  q.compact_params();
  return q;
}

QMatrix quantize_int8(const float* w, int64_t rows, int64_t cols) {
  return quantize_int8(fp32_rows(w, cols), rows, cols);
}

QMatrix quantize_int8(const WeightRows& row_of, int64_t rows, int64_t cols) {
  QMatrix q = make_affine(rows, cols, 8, cols);
  float* const scales = q.scales.writable();
  float* const offsets = q.offsets.writable();
#pragma omp parallel
  {
    std::vector<uint8_t> codes(static_cast<size_t>(cols));
    std::vector<float> scratch(static_cast<size_t>(cols));
#pragma omp for schedule(static)
    for (int64_t j = 0; j < rows; ++j) {
      const float* row = row_of(j, scratch.data());
      float amax = 0.0f;
      for (int64_t i = 0; i < cols; ++i) amax = std::max(amax, std::fabs(row[i]));
      AffineParams p;
      p.scale = amax > 0.0f ? round_to_fp16(amax / 127.0f) : 1.0f;
      p.offset = -128.0f * p.scale;  // exact: a power-of-two multiple of an fp16 value
      scales[j] = p.scale;
      offsets[j] = p.offset;
      affine_codes(row, cols, p, 8, codes.data());
      pack_row(codes.data(), cols, 8, q.row_codes(j));
    }
  }
  q.compact_params();
  return q;
}

// Index of the codebook value nearest to v.
static uint8_t nearest_code(const float* book, float v) {
  int best = 0;
  for (int c = 1; c < 16; ++c)
    if (std::fabs(book[c] - v) < std::fabs(book[best] - v)) best = c;
  return static_cast<uint8_t>(best);
}

QMatrix quantize_codebook(QuantType type, const float* w, int64_t rows, int64_t cols,
                          bool double_quant) {
  QMatrix q = make_codebook(type, rows, cols);
  const int64_t n = rows * cols, B = q.group_size;
  for (int64_t b = 0; b < q.n_blocks(); ++b) {
    float amax = 0.0f;
    for (int64_t e = b * B; e < std::min(n, (b + 1) * B); ++e) amax = std::max(amax, std::fabs(w[e]));
    q.absmax[b] = amax;
  }
  if (double_quant) {
    q.absmax_dq = double_quantize(q.absmax);
    q.absmax = double_dequantize(q.absmax_dq);
  }
  const float* book = codebook(type);
#pragma omp parallel
  {
    std::vector<uint8_t> codes(static_cast<size_t>(cols));
#pragma omp for schedule(static)
    for (int64_t j = 0; j < rows; ++j) {
      for (int64_t i = 0; i < cols; ++i) {
        const float a = q.absmax[(j * cols + i) / B];
        codes[i] = nearest_code(book, a != 0.0f ? w[j * cols + i] / a : 0.0f);
      }
      pack_row(codes.data(), cols, 4, q.row_codes(j));
    }
  }
  return q;
}

}  // namespace qalora
