// AVX2 + FMA quantized kernels, compiled with a target attribute (see qkernels_avx512.cpp).
// A 32-column chunk decodes into four 8-lane vectors: codes 0..7, 8..15, 16..23, 24..31.
// x86 only; elsewhere qkernels.cpp uses the portable kernels.
#if defined(__x86_64__) || defined(__i386__)

// GCC 12 warns that the placeholder operand of unmasked AVX-512 intrinsics (their
// _mm512_undefined_*() argument) is uninitialized when they are inlined into a target-attribute
// function (GCC bug 105593); the warning points into the header, so it is silenced there only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <cstring>
#include <vector>

#include "quant/qkernels_internal.h"

#define QL_AVX2 __attribute__((target("avx2,fma,f16c")))
#define QL_AVX2_INLINE QL_AVX2 inline __attribute__((always_inline))

namespace qalora::qk {
namespace {

QL_AVX2_INLINE __m256i load8_u8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// The 32 codes of one packed chunk as int32 lanes, q[0] = codes 0..7 and so on.
template <int B>
QL_AVX2_INLINE void codes_i32(const uint8_t* p, __m256i (&q)[4]) {
  if constexpr (B == 8) {
    for (int u = 0; u < 4; ++u) q[u] = load8_u8(p + 8 * u);
  } else if constexpr (B == 4) {
    const __m256i b0 = load8_u8(p), b1 = load8_u8(p + 8), f = _mm256_set1_epi32(15);
    q[0] = _mm256_and_si256(b0, f);
    q[1] = _mm256_and_si256(b1, f);
    q[2] = _mm256_srli_epi32(b0, 4);
    q[3] = _mm256_srli_epi32(b1, 4);
  } else {
    // Codes k, k+8, k+16, k+24 sit at shifts 0, 2, 4, 6 of byte k.
    const __m256i b = load8_u8(p), three = _mm256_set1_epi32(3);
    q[0] = _mm256_and_si256(b, three);
    q[1] = _mm256_and_si256(_mm256_srli_epi32(b, 2), three);
    q[2] = _mm256_and_si256(_mm256_srli_epi32(b, 4), three);
    q[3] = _mm256_srli_epi32(b, 6);
    if constexpr (B == 3) {
      // Third bits: bit k of a little-endian uint32, moved to bit 2 of lane k.
      uint32_t h;
      std::memcpy(&h, p + 8, 4);
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i one = _mm256_set1_epi32(1);
      for (int u = 0; u < 4; ++u) {
        const __m256i hv = _mm256_set1_epi32(static_cast<int>((h >> (8 * u)) & 0xFFu));
        const __m256i bit = _mm256_and_si256(_mm256_srlv_epi32(hv, lane), one);
        q[u] = _mm256_or_si256(q[u], _mm256_slli_epi32(bit, 2));
      }
    }
  }
}

template <int B>
QL_AVX2_INLINE void codes_f32(const uint8_t* p, __m256 (&v)[4]) {
  __m256i q[4];
  codes_i32<B>(p, q);
  for (int u = 0; u < 4; ++u) v[u] = _mm256_cvtepi32_ps(q[u]);
}

// 16-entry lookup: two 8-entry permutes on the low 3 bits, blended on bit 3 (moved to the
// sign bit, which blendv reads; higher bits shift out).
QL_AVX2_INLINE __m256 lut16(__m256 lut_lo, __m256 lut_hi, __m256i idx) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, idx),
                          _mm256_permutevar8x32_ps(lut_hi, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// NF4/FP4 values of one chunk (flattened elements e0..e0+31) times their blocks' absmax; a
// block boundary falls inside a chunk only when cols % 32 != 0, and at most once.
QL_AVX2_INLINE void codebook_chunk(const uint8_t* p, __m256 lut_lo, __m256 lut_hi,
                                   const float* absmax, int64_t n_blocks, int64_t e0,
                                   __m256 (&v)[4]) {
  const __m256i b0 = load8_u8(p), b1 = load8_u8(p + 8);
  v[0] = lut16(lut_lo, lut_hi, b0);
  v[1] = lut16(lut_lo, lut_hi, b1);
  v[2] = lut16(lut_lo, lut_hi, _mm256_srli_epi32(b0, 4));
  v[3] = lut16(lut_lo, lut_hi, _mm256_srli_epi32(b1, 4));
  const int64_t blk = e0 / kCodebookBlock, off = e0 % kCodebookBlock;
  const __m256 a0 = _mm256_set1_ps(absmax[blk]);
  if (off <= kCodebookBlock - kQChunk) {
    for (int u = 0; u < 4; ++u) v[u] = _mm256_mul_ps(v[u], a0);
    return;
  }
  // Lanes from `first` on belong to the next block (clamped: past the last block they are
  // padding, multiplied by x = 0).
  const auto first = static_cast<int>(kCodebookBlock - off);
  const __m256 a1 = _mm256_set1_ps(absmax[std::min(blk + 1, n_blocks - 1)]);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int u = 0; u < 4; ++u) {
    const __m256i next = _mm256_cmpgt_epi32(_mm256_add_epi32(lane, _mm256_set1_epi32(8 * u + 1)),
                                            _mm256_set1_epi32(first));
    v[u] = _mm256_mul_ps(v[u], _mm256_blendv_ps(a0, a1, _mm256_castsi256_ps(next)));
  }
}

QL_AVX2_INLINE float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

// acc[t] += s * (q . x_t) over one chunk; x_t = x + t * xs.
template <int B, int NT>
QL_AVX2_INLINE void affine_dot_chunk(const uint8_t* p, const float* x, int64_t xs, float s,
                                     __m256 (&acc)[NT]) {
  __m256 q[4];
  codes_f32<B>(p, q);
  const __m256 sv = _mm256_set1_ps(s);
  for (int t = 0; t < NT; ++t) {
    const float* xt = x + t * xs;
    __m256 d0 = _mm256_mul_ps(q[0], _mm256_loadu_ps(xt));
    __m256 d1 = _mm256_mul_ps(q[1], _mm256_loadu_ps(xt + 8));
    d0 = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(xt + 16), d0);
    d1 = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(xt + 24), d1);
    acc[t] = _mm256_fmadd_ps(sv, _mm256_add_ps(d0, d1), acc[t]);
  }
}

// acc + a[0..n) * b[0..n) lane-wise: the offsets' share of a row's result (see AVX-512).
QL_AVX2_INLINE __m256 fma_tail(const float* a, const float* b, int64_t n, __m256 acc) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  if (i < n) {
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - i)),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    acc = _mm256_fmadd_ps(_mm256_maskload_ps(a + i, m), _mm256_maskload_ps(b + i, m), acc);
  }
  return acc;
}

// y_j = sum_g s[j,g] (q_jg . x_g) + m[j,g] sum(x_g), as in the AVX-512 kernel.
template <int B, int NT>
QL_AVX2 void gemv_affine(const GemvArgs& a, int64_t r0, int64_t r1) {
  const QMatrix& w = *a.w;
  const int64_t L = (w.cols + w.group_size - 1) / w.group_size;
  const int64_t nc = w.padded_cols() / kQChunk, rb = w.row_bytes(), xs = a.x_stride;
  const int64_t cpg = L == 1 ? nc : w.group_size / kQChunk;
  constexpr int64_t CB = chunk_bytes(B);
  for (int64_t j = r0; j < r1; ++j) {
    const uint8_t* p = a.b.codes + j * rb;
    const auto [s, m] = row_params(a.b, j, 1, L);
    __m256 acc0[NT], acc1[NT];
    for (int t = 0; t < NT; ++t) acc0[t] = acc1[t] = _mm256_setzero_ps();
    int64_t g = 0, k = 0, c = 0;
    for (; c + 1 < nc; c += 2) {
      affine_dot_chunk<B, NT>(p + c * CB, a.x + c * kQChunk, xs, s[g], acc0);
      if (++k == cpg) {
        k = 0;
        ++g;
      }
      affine_dot_chunk<B, NT>(p + (c + 1) * CB, a.x + (c + 1) * kQChunk, xs, s[g], acc1);
      if (++k == cpg) {
        k = 0;
        ++g;
      }
    }
    if (c < nc) affine_dot_chunk<B, NT>(p + c * CB, a.x + c * kQChunk, xs, s[g], acc0);
    for (int t = 0; t < NT; ++t)
      a.y[t * w.rows + j] = hsum(fma_tail(m, a.xsum + t * L, L, _mm256_add_ps(acc0[t], acc1[t]))) +
                            (a.bias ? a.bias[j] : 0.0f);
  }
}

// ---- int8 activations (int8_gemv_layout in qkernels_internal.h), 2 and 4-bit codes ---------
// Each 64-code vector of the AVX-512 VNNI kernel (and of quantize_activations' layout) is two
// 256-bit halves here: half h holds bytes 32h..32h+31 of it. vpmaddubsw multiplies the codes
// (unsigned) by the int8 activations and adds pairs into int16, which cannot saturate for codes
// below 16 (15 * 127 * 2 < 32767; 8-bit codes could, so they keep the fp32 kernel);
// vpmaddwd by ones then adds pairs of those into the same int32 lanes vpdpbusd fills.

// Half h of the unpacked codes of chunks 2v and 2v + 1 (at p); `half_pair`: chunk 2v is the
// row's last, so only its bytes are read.
template <int B>
QL_AVX2_INLINE __m256i codes_half_u8(const uint8_t* p, int h, bool half_pair) {
  if constexpr (B == 4) {
    // Half 0: the low nibbles of the pair's 32 packed bytes; half 1: the high nibbles.
    const __m256i b =
        half_pair ? _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))
                  : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm256_and_si256(h ? _mm256_srli_epi16(b, 4) : b, _mm256_set1_epi8(0x0F));
  } else {
    static_assert(B == 2, "the AVX2 int8 GEMV takes 2 and 4-bit codes");
    // The pair's 16 packed bytes in both 128-bit lanes, shifted by 0 and 2 (half 0) or 4 and 6
    // bits (half 1); a 32-bit shift then a 2-bit mask per byte leaves each byte's own bits.
    const __m128i b = half_pair ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))
                                : _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m256i shift =
        h ? _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6) : _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_broadcastsi128_si256(b), shift),
                            _mm256_set1_epi8(0x03));
  }
}

QL_AVX2_INLINE __m256 int8_dot(__m256i codes, const int8_t* xq) {
  const __m256i pairs =
      _mm256_maddubs_epi16(codes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq)));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

// Rows j0..j0+R-1 for NT tokens, as gemv_int8_block of the AVX-512 VNNI kernel.
template <int B, int NT, int R, bool kPerVector>
QL_AVX2_INLINE void gemv_int8_block(const GemvArgs& a, int64_t j0, const __m256 (&second)[2]) {
  const QMatrix& w = *a.w;
  const int64_t L = a.L, nc = w.padded_cols() / kQChunk, rb = w.row_bytes();
  const int64_t nv = (nc + 1) / 2, half = nc % 2 ? nc / 2 : -1;
  const int64_t cpg = L == 1 ? nc : w.group_size / kQChunk;
  const int64_t vpg = L == 1 ? nv : cpg / 2;
  const int64_t ds = a.xq_stride / 4;
  constexpr int64_t VB = 2 * chunk_bytes(B);
  prefetch_rows(a, L, j0, R);
  const RowParams rp = row_params(a.b, j0, R, L);
  __m256 acc[R][NT], grp[R][NT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = grp[r][t] = _mm256_setzero_ps();
  VectorGroups vg{cpg, L - 1};
  for (int64_t v = 0, g = 0, in_group = 0; v < nv; ++v) {
    for (int h = 0; h < 2; ++h) {
      __m256 xd[NT];
      for (int t = 0; t < NT; ++t) xd[t] = _mm256_loadu_ps(a.xd + t * ds + v * 16 + 8 * h);
      for (int r = 0; r < R; ++r) {
        const int64_t j = j0 + r;
        const __m256i q = codes_half_u8<B>(a.b.codes + j * rb + v * VB, h, v == half);
        const float* s = rp.s + r * L;
        for (int t = 0; t < NT; ++t) {
          const __m256 d = int8_dot(q, a.xq + t * a.xq_stride + v * 64 + 32 * h);
          if constexpr (kPerVector) {
            const __m256 scale = _mm256_blendv_ps(_mm256_set1_ps(s[vg.first()]),
                                                  _mm256_set1_ps(s[vg.second()]), second[h]);
            acc[r][t] = _mm256_fmadd_ps(_mm256_mul_ps(d, xd[t]), scale, acc[r][t]);
          } else {
            grp[r][t] = _mm256_fmadd_ps(d, xd[t], grp[r][t]);
          }
        }
      }
    }
    if constexpr (kPerVector) {
      vg.next();
    } else if (++in_group == vpg || v + 1 == nv) {  // the group ends with this vector
      in_group = 0;
      for (int r = 0; r < R; ++r) {
        const __m256 sg = _mm256_set1_ps(rp.s[r * L + g]);
        for (int t = 0; t < NT; ++t) {
          acc[r][t] = _mm256_fmadd_ps(grp[r][t], sg, acc[r][t]);
          grp[r][t] = _mm256_setzero_ps();
        }
      }
      ++g;
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t j = j0 + r;
    for (int t = 0; t < NT; ++t)
      a.y[t * w.rows + j] =
          hsum(fma_tail(rp.m + r * L, a.xsum + t * L, L, acc[r][t])) + (a.bias ? a.bias[j] : 0.0f);
  }
}

// G = 32 with 4-bit codes (QA-LoRA's default and GGUF's block width), shaped like the AVX-512
// VNNI kernel's gemv_int8_g32_row: the int32 dot products of four vectors (eight chunks) are
// summed to one lane per chunk, and eight chunks at a time are scaled and offset from
// contiguous loads of s, m (converted from fp16 in registers), d_c and the group sums. Scaling
// each half vector on its own took eight operations per 32 codes, and the parameters were
// converted a row at a time into a buffer: up to a tenth of a compute-bound AVX2 decode.

// Eight group parameters from i on, n of them live (the rest zero).
QL_AVX2_INLINE __m256 load8_params(const uint8_t* bytes, bool half, int64_t i, int64_t n) {
  const int64_t size = half ? 2 : 4;
  alignas(32) uint8_t tail[32] = {};
  const uint8_t* p = bytes + size * i;
  if (n < 8) p = static_cast<const uint8_t*>(std::memcpy(tail, p, static_cast<size_t>(size * n)));
  if (half) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
}

// The int32 dot products of both halves of one 4-bit vector with the int8 activations at xq:
// lanes 0-3 hold partial sums of the pair's first chunk, lanes 4-7 of its second.
// (A function, not a lambda: a lambda would not carry the target attribute, which a build
// without -march=native needs for the intrinsics.)
QL_AVX2_INLINE __m256i int8_dot_half(__m256i q, const int8_t* x) {
  return _mm256_madd_epi16(
      _mm256_maddubs_epi16(q, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x))),
      _mm256_set1_epi16(1));
}
QL_AVX2_INLINE __m256i int8_dot_vector(__m256i q0, __m256i q1, const int8_t* xq) {
  return _mm256_add_epi32(int8_dot_half(q0, xq), int8_dot_half(q1, xq + 32));
}

template <int NT>
QL_AVX2_INLINE void gemv_int8_g32_row(const GemvArgs& a, int64_t j) {
  const QMatrix& w = *a.w;
  const int64_t nc = w.padded_cols() / kQChunk, dcs = a.xq_stride / kQChunk;
  const int64_t nv = (nc + 1) / 2, half = nc % 2 ? nc / 2 : -1;  // vector `half` has one chunk
  constexpr int64_t VB = 2 * chunk_bytes(4);
  const uint8_t* p = a.b.codes + j * w.row_bytes();
  prefetch_rows(a, nc, j, 1);
  // hadd leaves the first chunks of the four vectors in lanes 0-3, their second in 4-7.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t v0 = 0; v0 < nv; v0 += 4) {
    __m256i dot[NT][4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      const int64_t v = v0 + k;
      if (v >= nv) {  // past the row's end (last block only): zero
        for (int t = 0; t < NT; ++t) dot[t][k] = _mm256_setzero_si256();
        continue;
      }
      const __m256i q0 = codes_half_u8<4>(p + v * VB, 0, v == half);
      const __m256i q1 = codes_half_u8<4>(p + v * VB, 1, v == half);
      for (int t = 0; t < NT; ++t)
        dot[t][k] = int8_dot_vector(q0, q1, a.xq + t * a.xq_stride + v * 64);
    }
    const int64_t c0 = 2 * v0, live = std::min<int64_t>(8, nc - c0);
    const __m256 sv = load8_params(a.b.scales, a.b.scales_half, j * nc + c0, live);
    const __m256 mv = load8_params(a.b.offsets, a.b.offsets_half, j * nc + c0, live);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(live)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int t = 0; t < NT; ++t) {
      const __m256i sums =
          _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(_mm256_hadd_epi32(dot[t][0], dot[t][1]),
                                                        _mm256_hadd_epi32(dot[t][2], dot[t][3])),
                                      order);
      const __m256 dc = _mm256_maskload_ps(a.xdc + t * dcs + c0, mask);
      const __m256 xs = _mm256_maskload_ps(a.xsum + t * nc + c0, mask);
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(sv, dc), acc[t]);
      acc[t] = _mm256_fmadd_ps(mv, xs, acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) a.y[t * w.rows + j] = hsum(acc[t]) + (a.bias ? a.bias[j] : 0.0f);
}

template <int NT>
QL_AVX2 void gemv_int8_g32(const GemvArgs& a, int64_t r0, int64_t r1) {
  for (int64_t j = r0; j < r1; ++j) gemv_int8_g32_row<NT>(a, j);
}

template <int B, int NT, bool kPerVector>
QL_AVX2 void gemv_int8(const GemvArgs& a, int64_t r0, int64_t r1) {
  // Rows per block: two streams of codes read closer to the memory bandwidth than four (a 7B
  // layer, AVX2 forced on Zen 4: 0.69 of a pure read at G = 32 against 0.59, with prefetch).
  constexpr int R = NT <= 2 ? 2 : 1;
  // The `second` lanes of each half as blend masks (all ones where set).
  const unsigned lanes = int8_second_chunk_lanes(B);
  __m256 second[2];
  for (int h = 0; h < 2; ++h) {
    alignas(32) int32_t m[8];
    for (int l = 0; l < 8; ++l) m[l] = (lanes >> (8 * h + l) & 1u) ? -1 : 0;
    second[h] = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(m)));
  }
  int64_t j = r0;
  for (; j + R <= r1; j += R) gemv_int8_block<B, NT, R, kPerVector>(a, j, second);
  for (; j < r1; ++j) gemv_int8_block<B, NT, 1, kPerVector>(a, j, second);
}

template <int B>
QL_AVX2 void gemv_int8_bits(const GemvArgs& a, int64_t r0, int64_t r1) {
  if constexpr (B == 4)
    if (a.w->group_size == kQChunk) {
      return with_tokens(a.T, [&](auto nt) { gemv_int8_g32<decltype(nt)::value>(a, r0, r1); });
    }
  const int64_t cpg = a.w->group_size / kQChunk;
  const bool per_vector = !(a.L == 1 || cpg % 2 == 0);
  with_tokens(a.T, [&](auto nt) {
    constexpr int NT = decltype(nt)::value;
    per_vector ? gemv_int8<B, NT, true>(a, r0, r1) : gemv_int8<B, NT, false>(a, r0, r1);
  });
}

QL_AVX2 void gemv_int8_rows(const GemvArgs& a, int64_t r0, int64_t r1) {
  if (a.w->bits == 2) return gemv_int8_bits<2>(a, r0, r1);
  gemv_int8_bits<4>(a, r0, r1);
}

// Per-lane lookup of a row's L group parameters by column group: from registers for L <= 8
// (Tables = 1: one permute) or L <= 16 (Tables = 2: two permutes and a blend, as lut16), a
// gather from memory beyond (slow on some CPUs, but only for many small groups).
template <int Tables>
struct GroupLookup {
  __m256 lo, hi;
  const float* p;
  QL_AVX2_INLINE GroupLookup(const float* params, int64_t L) : p(params) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    lo = hi = _mm256_setzero_ps();
    if constexpr (Tables >= 1)
      lo = _mm256_maskload_ps(params,
                              _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(L)), lane));
    if constexpr (Tables == 2)
      hi = _mm256_maskload_ps(params + 8,
                              _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(L - 8)), lane));
  }
  QL_AVX2_INLINE __m256 operator()(__m256i g) const {
    if constexpr (Tables == 1) return _mm256_permutevar8x32_ps(lo, g);
    if constexpr (Tables == 2) return lut16(lo, hi, g);
    return _mm256_i32gather_ps(p, g, 4);
  }
};

// y_j = sum_i (s[j,g_i] q_ji + m[j,g_i]) x_i for layouts whose groups do not follow chunks.
template <int B, int NT, int Tables>
QL_AVX2 void gemv_affine_indexed(const GemvArgs& a, int64_t r0, int64_t r1) {
  const QMatrix& w = *a.w;
  const int64_t L = a.L, nc = w.padded_cols() / kQChunk, rb = w.row_bytes(), xs = a.x_stride;
  constexpr int64_t CB = chunk_bytes(B);
  for (int64_t j = r0; j < r1; ++j) {
    const uint8_t* p = a.b.codes + j * rb;
    const RowParams rp = row_params(a.b, j, 1, L);
    const GroupLookup<Tables> s(rp.s, L), m(rp.m, L);
    __m256 acc0[NT], acc1[NT];
    for (int t = 0; t < NT; ++t) acc0[t] = acc1[t] = _mm256_setzero_ps();
    for (int64_t c = 0; c < nc; ++c) {
      __m256 q[4];
      codes_f32<B>(p + c * CB, q);
      for (int u = 0; u < 4; ++u) {
        const __m256i g =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.groups + c * kQChunk + 8 * u));
        q[u] = _mm256_fmadd_ps(q[u], s(g), m(g));
      }
      const float* x = a.x + c * kQChunk;
      for (int t = 0; t < NT; ++t) {
        acc0[t] = _mm256_fmadd_ps(q[0], _mm256_loadu_ps(x + t * xs), acc0[t]);
        acc1[t] = _mm256_fmadd_ps(q[1], _mm256_loadu_ps(x + t * xs + 8), acc1[t]);
        acc0[t] = _mm256_fmadd_ps(q[2], _mm256_loadu_ps(x + t * xs + 16), acc0[t]);
        acc1[t] = _mm256_fmadd_ps(q[3], _mm256_loadu_ps(x + t * xs + 24), acc1[t]);
      }
    }
    for (int t = 0; t < NT; ++t)
      a.y[t * w.rows + j] = hsum(_mm256_add_ps(acc0[t], acc1[t])) + (a.bias ? a.bias[j] : 0.0f);
  }
}

template <int NT>
QL_AVX2 void gemv_codebook(const GemvArgs& a, int64_t r0, int64_t r1) {
  const QMatrix& w = *a.w;
  const float* book = codebook(w.type);
  const __m256 lut_lo = _mm256_loadu_ps(book), lut_hi = _mm256_loadu_ps(book + 8);
  const int64_t nc = w.padded_cols() / kQChunk, rb = w.row_bytes(), xs = a.x_stride;
  const int64_t nb = w.n_blocks();
  for (int64_t j = r0; j < r1; ++j) {
    const uint8_t* p = a.b.codes + j * rb;
    __m256 acc0[NT], acc1[NT];
    for (int t = 0; t < NT; ++t) acc0[t] = acc1[t] = _mm256_setzero_ps();
    for (int64_t c = 0; c < nc; ++c) {
      __m256 v[4];
      codebook_chunk(p + c * chunk_bytes(4), lut_lo, lut_hi, w.absmax.data(), nb,
                     j * w.cols + c * kQChunk, v);
      for (int t = 0; t < NT; ++t) {
        const float* xt = a.x + t * xs + c * kQChunk;
        acc0[t] = _mm256_fmadd_ps(v[0], _mm256_loadu_ps(xt), acc0[t]);
        acc1[t] = _mm256_fmadd_ps(v[1], _mm256_loadu_ps(xt + 8), acc1[t]);
        acc0[t] = _mm256_fmadd_ps(v[2], _mm256_loadu_ps(xt + 16), acc0[t]);
        acc1[t] = _mm256_fmadd_ps(v[3], _mm256_loadu_ps(xt + 24), acc1[t]);
      }
    }
    for (int t = 0; t < NT; ++t)
      a.y[t * w.rows + j] = hsum(_mm256_add_ps(acc0[t], acc1[t])) + (a.bias ? a.bias[j] : 0.0f);
  }
}

template <int B, int NT>
QL_AVX2 void gemv_affine_nt(const GemvArgs& a, int64_t r0, int64_t r1) {
  if (!a.groups) return gemv_affine<B, NT>(a, r0, r1);
  if (a.L <= 8) return gemv_affine_indexed<B, NT, 1>(a, r0, r1);
  if (a.L <= 16) return gemv_affine_indexed<B, NT, 2>(a, r0, r1);
  gemv_affine_indexed<B, NT, 0>(a, r0, r1);
}

template <int B>
QL_AVX2 void gemv_affine_any(const GemvArgs& a, int64_t r0, int64_t r1) {
  with_tokens(a.T, [&](auto nt) { gemv_affine_nt<B, decltype(nt)::value>(a, r0, r1); });
}

QL_AVX2 void gemv_rows(const GemvArgs& a, int64_t r0, int64_t r1) {
  if (a.w->type != QuantType::Affine) {
    return with_tokens(a.T, [&](auto nt) { gemv_codebook<decltype(nt)::value>(a, r0, r1); });
  }
  switch (a.w->bits) {
    case 2:
      return gemv_affine_any<2>(a, r0, r1);
    case 3:
      return gemv_affine_any<3>(a, r0, r1);
    case 4:
      return gemv_affine_any<4>(a, r0, r1);
    default:
      return gemv_affine_any<8>(a, r0, r1);
  }
}

// Stores the first n (1..32) of 32 values.
QL_AVX2_INLINE void store_chunk(float* o, const __m256 (&v)[4], int64_t n) {
  if (n >= kQChunk) {
    for (int u = 0; u < 4; ++u) _mm256_storeu_ps(o + 8 * u, v[u]);
    return;
  }
  alignas(32) float tmp[kQChunk];
  for (int u = 0; u < 4; ++u) _mm256_store_ps(tmp + 8 * u, v[u]);
  std::memcpy(o, tmp, static_cast<size_t>(n) * sizeof(float));
}

// Affine rows whose groups start on chunk boundaries: one scale and offset per chunk.
template <int B>
QL_AVX2 void dequant_affine(const QMatrix& w, int64_t r0, int64_t r1, float* out) {
  const int64_t L = (w.cols + w.group_size - 1) / w.group_size, I = w.cols;
  const int64_t nc = w.padded_cols() / kQChunk, rb = w.row_bytes();
  const int64_t cpg = L == 1 ? nc : w.group_size / kQChunk;
  constexpr int64_t CB = chunk_bytes(B);
  for (int64_t j = r0; j < r1; ++j) {
    const uint8_t* p = w.codes.data() + j * rb;
    float* o = out + (j - r0) * I;
    const auto [s, m] = row_params(w, j, 1, L);
    int64_t g = 0, k = 0;
    for (int64_t c = 0; c < nc; ++c) {
      __m256 q[4];
      codes_f32<B>(p + c * CB, q);
      const __m256 sv = _mm256_set1_ps(s[g]), mv = _mm256_set1_ps(m[g]);
      for (int u = 0; u < 4; ++u) q[u] = _mm256_fmadd_ps(q[u], sv, mv);
      store_chunk(o + c * kQChunk, q, I - c * kQChunk);
      if (++k == cpg) {
        k = 0;
        ++g;
      }
    }
  }
}

// Any other affine layout: parameters looked up per column group.
template <int B, int Tables>
QL_AVX2 void dequant_affine_indexed(const QMatrix& w, int64_t L, const int32_t* groups, int64_t r0,
                                    int64_t r1, float* out) {
  const int64_t I = w.cols, nc = w.padded_cols() / kQChunk, rb = w.row_bytes();
  constexpr int64_t CB = chunk_bytes(B);
  for (int64_t j = r0; j < r1; ++j) {
    const uint8_t* p = w.codes.data() + j * rb;
    const RowParams rp = row_params(w, j, 1, L);
    const GroupLookup<Tables> s(rp.s, L), m(rp.m, L);
    for (int64_t c = 0; c < nc; ++c) {
      __m256 q[4];
      codes_f32<B>(p + c * CB, q);
      for (int u = 0; u < 4; ++u) {
        const __m256i g =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(groups + c * kQChunk + 8 * u));
        q[u] = _mm256_fmadd_ps(q[u], s(g), m(g));
      }
      store_chunk(out + (j - r0) * I + c * kQChunk, q, I - c * kQChunk);
    }
  }
}

template <int B>
QL_AVX2 void dequant_affine_any(const QMatrix& w, int64_t r0, int64_t r1, float* out) {
  if (affine_chunk_aligned(w)) return dequant_affine<B>(w, r0, r1, out);
  thread_local std::vector<int32_t> buf;
  const int32_t* groups = column_groups(w, buf);
  const int64_t L = w.n_groups();
  if (L <= 8) return dequant_affine_indexed<B, 1>(w, L, groups, r0, r1, out);
  if (L <= 16) return dequant_affine_indexed<B, 2>(w, L, groups, r0, r1, out);
  dequant_affine_indexed<B, 0>(w, L, groups, r0, r1, out);
}

QL_AVX2 void dequant_codebook(const QMatrix& w, int64_t r0, int64_t r1, float* out) {
  const float* book = codebook(w.type);
  const __m256 lut_lo = _mm256_loadu_ps(book), lut_hi = _mm256_loadu_ps(book + 8);
  const int64_t I = w.cols, nc = w.padded_cols() / kQChunk, rb = w.row_bytes();
  const int64_t nb = w.n_blocks();
  for (int64_t j = r0; j < r1; ++j) {
    const uint8_t* p = w.codes.data() + j * rb;
    float* o = out + (j - r0) * I;
    for (int64_t c = 0; c < nc; ++c) {
      __m256 v[4];
      codebook_chunk(p + c * chunk_bytes(4), lut_lo, lut_hi, w.absmax.data(), nb,
                     j * I + c * kQChunk, v);
      store_chunk(o + c * kQChunk, v, I - c * kQChunk);
    }
  }
}

QL_AVX2 void dequant_rows(const QMatrix& w, int64_t r0, int64_t r1, float* out) {
  if (w.type != QuantType::Affine) return dequant_codebook(w, r0, r1, out);
  switch (w.bits) {
    case 2:
      return dequant_affine_any<2>(w, r0, r1, out);
    case 3:
      return dequant_affine_any<3>(w, r0, r1, out);
    case 4:
      return dequant_affine_any<4>(w, r0, r1, out);
    default:
      return dequant_affine_any<8>(w, r0, r1, out);
  }
}

QL_AVX2 float dot(const float* a, const float* b, int64_t n) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    for (int u = 0; u < 4; ++u)
      acc[u] =
          _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8 * u), _mm256_loadu_ps(b + i + 8 * u), acc[u]);
  for (; i + 8 <= n; i += 8)
    acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc[0]);
  float s = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

const KernelTable kAvx2Table = {Isa::Avx2,    gemv_rows, gemv_int8_rows, (1u << 2) | (1u << 4),
                                dequant_rows, dot};

}  // namespace qalora::qk

#endif  // x86
