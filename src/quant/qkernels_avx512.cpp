// AVX-512 quantized kernels (F, BW, VL, DQ), picked at run time by qkernels.cpp. A 32-column
// chunk decodes into two 16-lane vectors: codes 0..15 and 16..31. x86 only; elsewhere
// qkernels.cpp uses the portable kernels.
#if defined(__x86_64__) || defined(__i386__)

#include "quant/qkernels_avx512.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "quant/qkernels_internal.h"

namespace qalora::qk {
namespace {

// Codes 0..15 (lo) and 16..31 (hi) of one packed chunk as int32 lanes (layouts: qmatrix.h).
template <int B>
QL_AVX512_INLINE void codes_i32(const uint8_t* p, __m512i& lo, __m512i& hi) {
  if constexpr (B == 8) {
    lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    hi = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16)));
  } else if constexpr (B == 4) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo = _mm512_and_si512(b, _mm512_set1_epi32(15));
    hi = _mm512_srli_epi32(b, 4);
  } else {
    // Bytes 0..7 twice, so lanes k and k + 8 see byte k; codes k, k+8, k+16, k+24 sit at
    // shifts 0, 2, 4, 6 of byte k.
    int64_t v;
    std::memcpy(&v, p, 8);
    const __m512i b = _mm512_cvtepu8_epi32(_mm_set1_epi64x(v));
    const __m512i three = _mm512_set1_epi32(3);
    const __m512i sh_lo = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i sh_hi = _mm512_set_epi32(6, 6, 6, 6, 6, 6, 6, 6, 4, 4, 4, 4, 4, 4, 4, 4);
    lo = _mm512_and_si512(_mm512_srlv_epi32(b, sh_lo), three);
    hi = _mm512_and_si512(_mm512_srlv_epi32(b, sh_hi), three);
    if constexpr (B == 3) {
      // The third-bit plane is a lane mask: bit k set adds 4 to code k.
      uint32_t h;
      std::memcpy(&h, p + 8, 4);
      const __m512i four = _mm512_set1_epi32(4);
      lo = _mm512_mask_or_epi32(lo, static_cast<__mmask16>(h & 0xFFFFu), lo, four);
      hi = _mm512_mask_or_epi32(hi, static_cast<__mmask16>(h >> 16), hi, four);
    }
  }
}

template <int B>
QL_AVX512_INLINE void codes_f32(const uint8_t* p, __m512& lo, __m512& hi) {
  if constexpr (B == 4) {
    // A 16-entry table lookup (permutexvar reads the low 4 bits of each lane) turns nibbles
    // into floats in one op each, without the mask and the two int->float conversions.
    const __m512 values = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo = _mm512_permutexvar_ps(b, values);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), values);
  } else {
    __m512i a, b;
    codes_i32<B>(p, a, b);
    lo = _mm512_cvtepi32_ps(a);
    hi = _mm512_cvtepi32_ps(b);
  }
}

// NF4/FP4 values of one chunk times the absmax of each element's block. Chunk elements are
// e0..e0+31 of the flattened weight; a block boundary can fall inside the chunk only when
// cols % 32 != 0, and then at most once (blocks are 64 long).
QL_AVX512_INLINE void codebook_chunk(const uint8_t* p, __m512 lut, const float* absmax,
                                     int64_t n_blocks, int64_t e0, __m512& lo, __m512& hi) {
  // permutexvar reads only the low 4 bits of each index lane, so the low nibble needs no mask.
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm512_permutexvar_ps(b, lut);
  hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), lut);
  const int64_t blk = e0 / kCodebookBlock, off = e0 % kCodebookBlock;
  const __m512 a0 = _mm512_set1_ps(absmax[blk]);
  if (off <= kCodebookBlock - kQChunk) {
    lo = _mm512_mul_ps(lo, a0);
    hi = _mm512_mul_ps(hi, a0);
    return;
  }
  // Lanes from `first` on belong to the next block (clamped: past the last block they are
  // padding, multiplied by x = 0).
  const int first = static_cast<int>(kCodebookBlock - off);  // 1..31
  const __m512 a1 = _mm512_set1_ps(absmax[std::min(blk + 1, n_blocks - 1)]);
  const auto m_lo = static_cast<__mmask16>(first >= 16 ? 0u : (0xFFFFu << first));
  const auto m_hi = static_cast<__mmask16>(0xFFFFu << std::max(first - 16, 0));
  lo = _mm512_mul_ps(lo, _mm512_mask_blend_ps(m_lo, a0, a1));
  hi = _mm512_mul_ps(hi, _mm512_mask_blend_ps(m_hi, a0, a1));
}

// acc[.][t] += s * (q . x_t) over one chunk; x_t = x + t * xs. With several tokens acc[0][t]
// takes codes 0..15 and acc[1][t] codes 16..31 (two FMA chains per token).
template <int B, int NT>
QL_AVX512_INLINE void affine_dot_chunk(const uint8_t* p, const float* x, int64_t xs, float s,
                                       __m512 (&acc)[2][NT]) {
  __m512 q0, q1;
  codes_f32<B>(p, q0, q1);
  const __m512 sv = _mm512_set1_ps(s);
  if constexpr (NT == 1) {
    // One token: scale the dot product (3 FP ops per chunk, one chain).
    __m512 d = _mm512_mul_ps(q0, _mm512_loadu_ps(x));
    d = _mm512_fmadd_ps(q1, _mm512_loadu_ps(x + 16), d);
    acc[0][0] = _mm512_fmadd_ps(sv, d, acc[0][0]);
  } else {
    // Several tokens: scale the codes once (2 + 2 NT FP ops instead of 3 NT).
    q0 = _mm512_mul_ps(q0, sv);
    q1 = _mm512_mul_ps(q1, sv);
    for (int t = 0; t < NT; ++t) {
      acc[0][t] = _mm512_fmadd_ps(q0, _mm512_loadu_ps(x + t * xs), acc[0][t]);
      acc[1][t] = _mm512_fmadd_ps(q1, _mm512_loadu_ps(x + t * xs + 16), acc[1][t]);
    }
  }
}

// y_j = sum_g s[j,g] (q_jg . x_g) + m[j,g] sum(x_g): the offsets cost one dot over the groups
// and the codes are multiplied as small integers, never dequantized.
template <int B, int NT>
QL_AVX512 void gemv_affine(const GemvArgs& a, int64_t r0, int64_t r1) {
  const QMatrix& w = *a.w;
  const int64_t L = (w.cols + w.group_size - 1) / w.group_size;
  const int64_t nc = w.padded_cols() / kQChunk, rb = w.row_bytes(), xs = a.x_stride;
  const int64_t cpg = L == 1 ? nc : w.group_size / kQChunk;  // chunks per group
  constexpr int64_t CB = chunk_bytes(B);
  for (int64_t j = r0; j < r1; ++j) {
    prefetch_rows(a, L, j, 1);
    const uint8_t* p = a.b.codes + j * rb;
    const auto [s, m] = row_params(a.b, j, 1, L);
    // Two accumulator sets (even / odd chunks) halve the FMA dependency chains.
    __m512 acc0[2][NT], acc1[2][NT];
    for (int t = 0; t < NT; ++t)
      acc0[0][t] = acc0[1][t] = acc1[0][t] = acc1[1][t] = _mm512_setzero_ps();
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
    for (int t = 0; t < NT; ++t) {
      const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc0[0][t], acc0[1][t]),
                                       _mm512_add_ps(acc1[0][t], acc1[1][t]));
      a.y[t * w.rows + j] =
          _mm512_reduce_add_ps(fma_masked(m, a.xsum + t * L, L, sum)) + (a.bias ? a.bias[j] : 0.0f);
    }
  }
}

// Per-lane lookup of a row's L group parameters by column group: one permute from registers
// for L <= 16 (Lanes = 1) or L <= 32 (Lanes = 2), a gather from memory beyond.
template <int Lanes>
struct GroupLookup {
  __m512 lo, hi;
  const float* p;
  QL_AVX512_INLINE GroupLookup(const float* params, int64_t L) : p(params) {
    if constexpr (Lanes == 1) {
      lo = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << L) - 1), params);
      hi = lo;
    } else if constexpr (Lanes == 2) {
      lo = _mm512_loadu_ps(params);
      hi = _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << (L - 16)) - 1), params + 16);
    } else {
      lo = hi = _mm512_setzero_ps();
    }
  }
  QL_AVX512_INLINE __m512 operator()(__m512i g) const {
    if constexpr (Lanes == 1) return _mm512_permutexvar_ps(g, lo);
    if constexpr (Lanes == 2) return _mm512_permutex2var_ps(lo, g, hi);
    return _mm512_i32gather_ps(g, p, 4);
  }
};

// y_j = sum_i (s[j,g_i] q_ji + m[j,g_i]) x_i for layouts whose groups do not follow chunks
// (g_idx, odd G): the parameters are looked up per lane and the row dequantized in registers.
template <int B, int NT, int Lanes>
QL_AVX512 void gemv_affine_indexed(const GemvArgs& a, int64_t r0, int64_t r1) {
  const QMatrix& w = *a.w;
  const int64_t L = a.L, nc = w.padded_cols() / kQChunk, rb = w.row_bytes(), xs = a.x_stride;
  constexpr int64_t CB = chunk_bytes(B);
  for (int64_t j = r0; j < r1; ++j) {
    const uint8_t* p = a.b.codes + j * rb;
    const RowParams rp = row_params(a.b, j, 1, L);
    const GroupLookup<Lanes> s(rp.s, L), m(rp.m, L);
    __m512 acc0[NT], acc1[NT];
    for (int t = 0; t < NT; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
    for (int64_t c = 0; c < nc; ++c) {
      __m512 q0, q1;
      codes_f32<B>(p + c * CB, q0, q1);
      const __m512i g0 = _mm512_loadu_si512(a.groups + c * kQChunk);
      const __m512i g1 = _mm512_loadu_si512(a.groups + c * kQChunk + 16);
      const __m512 w0 = _mm512_fmadd_ps(q0, s(g0), m(g0)), w1 = _mm512_fmadd_ps(q1, s(g1), m(g1));
      const float* x = a.x + c * kQChunk;
      for (int t = 0; t < NT; ++t) {
        acc0[t] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + t * xs), acc0[t]);
        acc1[t] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + t * xs + 16), acc1[t]);
      }
    }
    for (int t = 0; t < NT; ++t)
      a.y[t * w.rows + j] =
          _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t])) + (a.bias ? a.bias[j] : 0.0f);
  }
}

template <int NT>
QL_AVX512_INLINE void codebook_dot_chunk(const uint8_t* p, __m512 lut, const float* absmax,
                                         int64_t nb, int64_t e0, const float* x, int64_t xs,
                                         __m512 (&acc)[NT]) {
  __m512 v0, v1;
  codebook_chunk(p, lut, absmax, nb, e0, v0, v1);
  for (int t = 0; t < NT; ++t) {
    acc[t] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(x + t * xs), acc[t]);
    acc[t] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(x + t * xs + 16), acc[t]);
  }
}

template <int NT>
QL_AVX512 void gemv_codebook(const GemvArgs& a, int64_t r0, int64_t r1) {
  const QMatrix& w = *a.w;
  const __m512 lut = _mm512_loadu_ps(codebook(w.type));
  const int64_t nc = w.padded_cols() / kQChunk, rb = w.row_bytes(), xs = a.x_stride;
  const int64_t nb = w.n_blocks();
  constexpr int64_t CB = chunk_bytes(4);
  for (int64_t j = r0; j < r1; ++j) {
    const uint8_t* p = a.b.codes + j * rb;
    const int64_t e = j * w.cols;
    __m512 acc0[NT], acc1[NT];
    for (int t = 0; t < NT; ++t) acc0[t] = acc1[t] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 1 < nc; c += 2) {
      codebook_dot_chunk<NT>(p + c * CB, lut, w.absmax.data(), nb, e + c * kQChunk,
                             a.x + c * kQChunk, xs, acc0);
      codebook_dot_chunk<NT>(p + (c + 1) * CB, lut, w.absmax.data(), nb, e + (c + 1) * kQChunk,
                             a.x + (c + 1) * kQChunk, xs, acc1);
    }
    if (c < nc)
      codebook_dot_chunk<NT>(p + c * CB, lut, w.absmax.data(), nb, e + c * kQChunk,
                             a.x + c * kQChunk, xs, acc0);
    for (int t = 0; t < NT; ++t)
      a.y[t * w.rows + j] =
          _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t])) + (a.bias ? a.bias[j] : 0.0f);
  }
}

template <int B, int NT>
QL_AVX512 void gemv_affine_nt(const GemvArgs& a, int64_t r0, int64_t r1) {
  if (!a.groups) return gemv_affine<B, NT>(a, r0, r1);
  if (a.L <= 16) return gemv_affine_indexed<B, NT, 1>(a, r0, r1);
  if (a.L <= 32) return gemv_affine_indexed<B, NT, 2>(a, r0, r1);
  gemv_affine_indexed<B, NT, 0>(a, r0, r1);
}

template <int B>
QL_AVX512 void gemv_affine_any(const GemvArgs& a, int64_t r0, int64_t r1) {
  with_tokens(a.T, [&](auto nt) { gemv_affine_nt<B, decltype(nt)::value>(a, r0, r1); });
}

QL_AVX512 void gemv_rows(const GemvArgs& a, int64_t r0, int64_t r1) {
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

// Stores the first n (1..32) of 32 values; masked lanes are neither written nor faulted.
QL_AVX512_INLINE void store_chunk(float* o, __m512 lo, __m512 hi, int64_t n) {
  if (n >= kQChunk) {
    _mm512_storeu_ps(o, lo);
    _mm512_storeu_ps(o + 16, hi);
    return;
  }
  const auto m_lo = static_cast<__mmask16>(n >= 16 ? 0xFFFFu : (1u << n) - 1);
  const auto m_hi = static_cast<__mmask16>(n > 16 ? (1u << (n - 16)) - 1 : 0u);
  _mm512_mask_storeu_ps(o, m_lo, lo);
  _mm512_mask_storeu_ps(o + 16, m_hi, hi);
}

// Affine rows whose groups start on chunk boundaries: one scale and offset per chunk.
template <int B>
QL_AVX512 void dequant_affine(const QMatrix& w, int64_t r0, int64_t r1, float* out) {
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
      __m512 q0, q1;
      codes_f32<B>(p + c * CB, q0, q1);
      const __m512 sv = _mm512_set1_ps(s[g]), mv = _mm512_set1_ps(m[g]);
      store_chunk(o + c * kQChunk, _mm512_fmadd_ps(q0, sv, mv), _mm512_fmadd_ps(q1, sv, mv),
                  I - c * kQChunk);
      if (++k == cpg) {
        k = 0;
        ++g;
      }
    }
  }
}

// Affine rows with any other group layout (g_idx, or groups not aligned to chunks): the
// group of every column comes from `groups` (padded to whole chunks).
template <int B, int Lanes>
QL_AVX512 void dequant_affine_indexed(const QMatrix& w, int64_t L, const int32_t* groups,
                                      int64_t r0, int64_t r1, float* out) {
  const int64_t I = w.cols, nc = w.padded_cols() / kQChunk, rb = w.row_bytes();
  constexpr int64_t CB = chunk_bytes(B);
  for (int64_t j = r0; j < r1; ++j) {
    const uint8_t* p = w.codes.data() + j * rb;
    float* o = out + (j - r0) * I;
    const RowParams rp = row_params(w, j, 1, L);
    const GroupLookup<Lanes> s(rp.s, L), m(rp.m, L);
    for (int64_t c = 0; c < nc; ++c) {
      __m512 q0, q1;
      codes_f32<B>(p + c * CB, q0, q1);
      const __m512i g0 = _mm512_loadu_si512(groups + c * kQChunk);
      const __m512i g1 = _mm512_loadu_si512(groups + c * kQChunk + 16);
      store_chunk(o + c * kQChunk, _mm512_fmadd_ps(q0, s(g0), m(g0)),
                  _mm512_fmadd_ps(q1, s(g1), m(g1)), I - c * kQChunk);
    }
  }
}

template <int B>
QL_AVX512 void dequant_affine_any(const QMatrix& w, int64_t r0, int64_t r1, float* out) {
  if (affine_chunk_aligned(w)) return dequant_affine<B>(w, r0, r1, out);
  thread_local std::vector<int32_t> buf;
  const int32_t* groups = column_groups(w, buf);
  const int64_t L = w.n_groups();
  if (L <= 16) return dequant_affine_indexed<B, 1>(w, L, groups, r0, r1, out);
  if (L <= 32) return dequant_affine_indexed<B, 2>(w, L, groups, r0, r1, out);
  dequant_affine_indexed<B, 0>(w, L, groups, r0, r1, out);
}

QL_AVX512 void dequant_codebook(const QMatrix& w, int64_t r0, int64_t r1, float* out) {
  const __m512 lut = _mm512_loadu_ps(codebook(w.type));
  const int64_t I = w.cols, nc = w.padded_cols() / kQChunk, rb = w.row_bytes();
  const int64_t nb = w.n_blocks();
  for (int64_t j = r0; j < r1; ++j) {
    const uint8_t* p = w.codes.data() + j * rb;
    float* o = out + (j - r0) * I;
    for (int64_t c = 0; c < nc; ++c) {
      __m512 v0, v1;
      codebook_chunk(p + c * chunk_bytes(4), lut, w.absmax.data(), nb, j * I + c * kQChunk, v0, v1);
      store_chunk(o + c * kQChunk, v0, v1, I - c * kQChunk);
    }
  }
}

QL_AVX512 void dequant_rows(const QMatrix& w, int64_t r0, int64_t r1, float* out) {
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

QL_AVX512 float dot(const float* a, const float* b, int64_t n) {
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                   _mm512_setzero_ps()};
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    for (int u = 0; u < 4; ++u)
      acc[u] =
          _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16 * u), _mm512_loadu_ps(b + i + 16 * u), acc[u]);
  for (; i < n; i += 16) {
    const auto m = static_cast<__mmask16>(n - i >= 16 ? 0xFFFFu : (1u << (n - i)) - 1);
    acc[0] =
        _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc[0]);
  }
  return _mm512_reduce_add_ps(
      _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
}

}  // namespace

const KernelTable kAvx512Table = {Isa::Avx512, gemv_rows, nullptr, 0, dequant_rows, dot};
const KernelTable kAvx512VnniTable = {Isa::Avx512Vnni, gemv_rows,    gemv_int8_rows_avx512vnni,
                                      kInt8Bits248,    dequant_rows, dot};

}  // namespace qalora::qk

#endif  // x86
