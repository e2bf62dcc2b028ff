

// AVX-512 VNNI decode GEMV on int8 activations (the formula and its error bound:
// int8_gemv_layout in qkernels_internal.h). One 512-bit vector holds the 64 codes of two
// chunks as bytes, and vpdpbusd multiplies them (unsigned) with 64 int8 activations (signed),
// summing each four into an int32 lane: a vector of 4-bit codes costs one load, one shift, one
// mask and one dot product, where the fp32 kernel needs a lookup and an FMA per 16 codes.
// Compiled with a target attribute like qkernels_avx512.cpp; picked at run time.
#if defined(__x86_64__) || defined(__i386__)

#include <algorithm>

#include "quant/qkernels_avx512.h"
#include "quant/qkernels_internal.h"

#define QL_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#define QL_VNNI_INLINE QL_VNNI inline __attribute__((always_inline))

namespace qalora::qk {
namespace {

// The codes of chunks 2v and 2v + 1 (at p) as 64 bytes in int8_lane_order(B). `half`: chunk
// 2v is the row's last, so only its bytes are read and the second chunk's codes are zero.
template <int B>
QL_VNNI_INLINE __m512i codes_u8(const uint8_t* p, bool half) {
  if constexpr (B == 8) {
    return half ? _mm512_maskz_loadu_epi8(0xFFFFFFFFull, p) : _mm512_loadu_si512(p);
  } else if constexpr (B == 4) {
    // The 32 packed bytes in both halves; the upper half shifted down to the high nibbles.
    const __m256i b = half ? _mm256_maskz_loadu_epi8(0xFFFFu, p)
                           : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m512i shift = _mm512_set_epi64(0x0004000400040004, 0x0004000400040004,
                                           0x0004000400040004, 0x0004000400040004, 0, 0, 0, 0);
    return _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i64x4(b), shift),
                            _mm512_set1_epi8(0x0F));
  } else {
    static_assert(B == 2, "the int8 GEMV takes 2, 4 and 8-bit codes");
    // The 16 packed bytes in all four 128-bit lanes, shifted by 0, 2, 4 and 6 bits.
    const __m128i b = half ? _mm_maskz_loadu_epi8(0xFFu, p)
                           : _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m512i shift =
        _mm512_set_epi64(0x0006000600060006, 0x0006000600060006, 0x0004000400040004,
                         0x0004000400040004, 0x0002000200020002, 0x0002000200020002, 0, 0);
    return _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i32x4(b), shift),
                            _mm512_set1_epi8(0x03));
  }
}

// Rows j0..j0+R-1 of y for NT tokens. Two rows at a time share the activation loads and the
// group bookkeeping, which at 576 columns (9 vectors a row) cost more than the codes; more
// rows (streams of codes) lowered the share of the read bandwidth a 7B layer reaches.
// kPerVector: each vector is scaled on its own, per lane where its two chunks lie in
// different groups (G = 32, 96, ...); otherwise (G a multiple of 64, or one group per row)
// a group's vectors are summed unscaled and the sum scaled once.
template <int B, int NT, int R, bool kPerVector>
QL_VNNI_INLINE void gemv_int8_block(const GemvArgs& a, int64_t j0, __mmask16 second) {
  const QMatrix& w = *a.w;
  const int64_t L = a.L, nc = w.padded_cols() / kQChunk, rb = w.row_bytes();
  const int64_t nv = (nc + 1) / 2, half = nc % 2 ? nc / 2 : -1;  // vector `half` has one chunk
  const int64_t cpg = L == 1 ? nc : w.group_size / kQChunk;      // chunks per group
  const int64_t ds = a.xq_stride / 4;
  constexpr int64_t VB = 2 * chunk_bytes(B);
  const uint8_t* p[R];
  const float* s[R];
  const RowParams rp = row_params(a.b, j0, R, L);
  for (int r = 0; r < R; ++r) {
    p[r] = a.b.codes + (j0 + r) * rb;
    s[r] = rp.s + r * L;
  }
  prefetch_rows(a, L, j0, R);
  __m512 acc[R][NT], grp[R][NT];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = grp[r][t] = _mm512_setzero_ps();
  VectorGroups vg{cpg, L - 1};
  const int64_t vpg = L == 1 ? nv : cpg / 2;  // !kPerVector: vectors per group
  for (int64_t v = 0, g = 0, in_group = 0; v < nv; ++v) {
    __m512i xq[NT];
    __m512 xd[NT];
    for (int t = 0; t < NT; ++t) {
      xq[t] = _mm512_loadu_si512(a.xq + t * a.xq_stride + v * 64);
      xd[t] = _mm512_loadu_ps(a.xd + t * ds + v * 16);
    }
    for (int r = 0; r < R; ++r) {
      const __m512i q = codes_u8<B>(p[r] + v * VB, v == half);
      if constexpr (kPerVector) {
        const __m512 scale = _mm512_mask_blend_ps(second, _mm512_set1_ps(s[r][vg.first()]),
                                                  _mm512_set1_ps(s[r][vg.second()]));
        for (int t = 0; t < NT; ++t) {
          const __m512 dot =
              _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q, xq[t]));
          acc[r][t] = _mm512_fmadd_ps(_mm512_mul_ps(dot, xd[t]), scale, acc[r][t]);
        }
      } else {
        for (int t = 0; t < NT; ++t) {
          const __m512 dot =
              _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), q, xq[t]));
          grp[r][t] = _mm512_fmadd_ps(dot, xd[t], grp[r][t]);
        }
      }
    }
    if constexpr (kPerVector) {
      vg.next();
    } else if (++in_group == vpg || v + 1 == nv) {  // the group ends with this vector
      in_group = 0;
      for (int r = 0; r < R; ++r) {
        const __m512 sg = _mm512_set1_ps(s[r][g]);
        for (int t = 0; t < NT; ++t) {
          acc[r][t] = _mm512_fmadd_ps(grp[r][t], sg, acc[r][t]);
          grp[r][t] = _mm512_setzero_ps();
        }
      }
      ++g;
    }
  }
  for (int r = 0; r < R; ++r) {
    const int64_t j = j0 + r;
    for (int t = 0; t < NT; ++t)
      // The offsets' share, m . sum(x_g), folded into the vector before the one reduction.
      a.y[t * w.rows + j] =
          _mm512_reduce_add_ps(fma_masked(rp.m + r * L, a.xsum + t * L, L, acc[r][t])) +
          (a.bias ? a.bias[j] : 0.0f);
  }
}

// G = 32 (QA-LoRA's default and GGUF's block width): every chunk has a scale of its own, and
// scaling each vector as above costs five FP operations per 64 codes, more than unpacking
// them. Here the int32 dot products of eight vectors are summed down to one lane per chunk (a
// transpose-and-add tree, under three operations per vector), and sixteen chunks at a time are
// scaled and offset from contiguous loads of s, m, d_c and the group sums.

// Step 1 of the tree, per 128-bit quarter: lanes (a0 + a2, b0 + b2, a1 + a3, b1 + b3).
QL_VNNI_INLINE __m512i sum_pairs(__m512i a, __m512i b) {
  return _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
}
// Step 2: from the steps 1 of vectors (0, 1) and (2, 3), lane 4q + i = the sum of vector i's
// quarter q.
QL_VNNI_INLINE __m512i sum_quads(__m512i a, __m512i b) {
  return _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
}
// Step 3: from the steps 2 of vectors 0-3 and 4-7, the 16 chunk sums in chunk order. A
// vector's quarters hold chunks (first, second, first, second) for B = 4 and (first, first,
// second, second) for B = 8 (int8_lane_order).
template <int B>
QL_VNNI_INLINE __m512i chunk_sums(__m512i u0, __m512i u1) {
  static_assert(B == 4 || B == 8, "2-bit vectors mix both chunks within a quarter");
  constexpr int kFirst = B == 4 ? _MM_SHUFFLE(1, 0, 1, 0) : _MM_SHUFFLE(2, 0, 2, 0);
  constexpr int kSecond = B == 4 ? _MM_SHUFFLE(3, 2, 3, 2) : _MM_SHUFFLE(3, 1, 3, 1);
  // Quarters: first chunks of vectors 0-3, second chunks of 0-3, then the same for 4-7.
  const __m512i z =
      _mm512_add_epi32(_mm512_shuffle_i32x4(u0, u1, kFirst), _mm512_shuffle_i32x4(u0, u1, kSecond));
  // Chunk c = 2k + h (vector k, half h) sits in lane 8 (k / 4) + 4 h + k % 4.
  const __m512i order = _mm512_set_epi32(15, 11, 14, 10, 13, 9, 12, 8, 7, 3, 6, 2, 5, 1, 4, 0);
  return _mm512_permutexvar_epi32(order, z);
}

// 16 group parameters from i on (lanes outside `live` zero), converted in registers from fp16.
QL_VNNI_INLINE __m512 load_params(const uint8_t* bytes, bool half, int64_t i, __mmask16 live) {
  if (half) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, bytes + 2 * i));
  return _mm512_maskz_loadu_ps(live, reinterpret_cast<const float*>(bytes) + i);
}

// Row j of y for NT tokens, G = 32. One row at a time: on a 7B layer streamed from memory,
// one stream of codes reached 85% of the read bandwidth where four rows at a time (four
// streams) reached 65%.
template <int B, int NT>
QL_VNNI_INLINE void gemv_int8_g32_row(const GemvArgs& a, int64_t j) {
  const QMatrix& w = *a.w;
  const int64_t nc = w.padded_cols() / kQChunk, dcs = a.xq_stride / kQChunk;
  const int64_t nv = (nc + 1) / 2, half = nc % 2 ? nc / 2 : -1;  // vector `half` has one chunk
  constexpr int64_t VB = 2 * chunk_bytes(B);
  const uint8_t* p = a.b.codes + j * w.row_bytes();
  prefetch_rows(a, nc, j, 1);
  __m512 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t v0 = 0; v0 < nv; v0 += 8) {
    // Vectors past the row's end (last block only) count as zero.
    const int64_t n_vec = std::min<int64_t>(8, nv - v0);
    __m512i pairs[NT], quads[2][NT];
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k) {
      const int64_t v = v0 + k;
      const __m512i q = k < n_vec ? codes_u8<B>(p + v * VB, v == half) : _mm512_setzero_si512();
      for (int t = 0; t < NT; ++t) {
        const __m512i xq = k < n_vec ? _mm512_loadu_si512(a.xq + t * a.xq_stride + v * 64)
                                     : _mm512_setzero_si512();
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, xq);
        if (k % 2 == 0) {
          pairs[t] = dot;
        } else if (k % 4 == 1) {
          quads[k / 4][t] = sum_pairs(pairs[t], dot);
        } else {
          quads[k / 4][t] = sum_quads(quads[k / 4][t], sum_pairs(pairs[t], dot));
        }
      }
    }
    const int64_t c0 = 2 * v0;
    const auto live = static_cast<__mmask16>(nc - c0 >= 16 ? 0xFFFFu : (1u << (nc - c0)) - 1);
    const __m512 sv = load_params(a.b.scales, a.b.scales_half, j * nc + c0, live);
    const __m512 mv = load_params(a.b.offsets, a.b.offsets_half, j * nc + c0, live);
    for (int t = 0; t < NT; ++t) {
      const __m512 dc = _mm512_maskz_loadu_ps(live, a.xdc + t * dcs + c0);
      const __m512 xs = _mm512_maskz_loadu_ps(live, a.xsum + t * nc + c0);
      const __m512 dots = _mm512_cvtepi32_ps(chunk_sums<B>(quads[0][t], quads[1][t]));
      acc[t] = _mm512_fmadd_ps(dots, _mm512_mul_ps(sv, dc), acc[t]);
      acc[t] = _mm512_fmadd_ps(mv, xs, acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t)
    a.y[t * w.rows + j] = _mm512_reduce_add_ps(acc[t]) + (a.bias ? a.bias[j] : 0.0f);
}

template <int B, int NT>
QL_VNNI void gemv_int8_g32(const GemvArgs& a, int64_t r0, int64_t r1) {
  for (int64_t j = r0; j < r1; ++j) gemv_int8_g32_row<B, NT>(a, j);
}

template <int B, int NT, bool kPerVector>
QL_VNNI void gemv_int8(const GemvArgs& a, int64_t r0, int64_t r1) {
  constexpr int R = 2;  // rows per block (gemv_int8_block)
  const auto second = static_cast<__mmask16>(int8_second_chunk_lanes(B));
  int64_t j = r0;
  for (; j + R <= r1; j += R) gemv_int8_block<B, NT, R, kPerVector>(a, j, second);
  for (; j < r1; ++j) gemv_int8_block<B, NT, 1, kPerVector>(a, j, second);
}

template <int B, int NT>
QL_VNNI void gemv_int8_nt(const GemvArgs& a, int64_t r0, int64_t r1) {
  // Whole vectors per group: groups of an even number of chunks, or one group per row.
  const int64_t cpg = a.w->group_size / kQChunk;
  if constexpr (B != 2)
    if (a.w->group_size == kQChunk) return gemv_int8_g32<B, NT>(a, r0, r1);
  if (a.L == 1 || cpg % 2 == 0) return gemv_int8<B, NT, false>(a, r0, r1);
  gemv_int8<B, NT, true>(a, r0, r1);
}

template <int B>
QL_VNNI void gemv_int8_bits(const GemvArgs& a, int64_t r0, int64_t r1) {
  with_tokens(a.T, [&](auto nt) { gemv_int8_nt<B, decltype(nt)::value>(a, r0, r1); });
}

}  // namespace

QL_VNNI void gemv_int8_rows_avx512vnni(const GemvArgs& a, int64_t r0, int64_t r1) {
  switch (a.w->bits) {
    case 2:
      return gemv_int8_bits<2>(a, r0, r1);
    case 4:
      return gemv_int8_bits<4>(a, r0, r1);
    default:
      return gemv_int8_bits<8>(a, r0, r1);
  }
}

}  // namespace qalora::qk

#endif  // x86
