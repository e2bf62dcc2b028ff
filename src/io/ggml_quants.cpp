// Reference ggml block formats: type table, dequantizers and round-to-nearest quantizers.
// Plain scalar code; each block is copied out of the source with memcpy so that callers may pass
// any byte offset of a mapped file.

// Results must match ggml's and gguf-py's reference code bit for bit, which evaluate d*q + m as
// two rounded operations; fusing them into one FMA (GCC's default for C++ with -march=native)
// would change the last bit.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <type_traits>

#include "qalora/core/error.h"
#include "qalora/core/fp16.h"
#include "qalora/io/gguf.h"

namespace qalora {
namespace {

constexpr int kQK = 32;    // elements per block of the legacy formats
constexpr int kQKK = 256;  // elements per super-block of the K formats
constexpr int kSub = kQKK / kQK;  // 32-element sub-blocks per super-block

struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[kQK / 2];
};
struct BlockQ4_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qs[kQK / 2];
};
struct BlockQ5_0 {
  uint16_t d;
  uint8_t qh[4];
  uint8_t qs[kQK / 2];
};
struct BlockQ5_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qh[4];
  uint8_t qs[kQK / 2];
};
struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[kQK];
};
struct BlockQ2_K {
  uint8_t scales[kQKK / 16];  // low nibble: scale, high nibble: min, per 16 elements
  uint8_t qs[kQKK / 4];
  uint16_t d;
  uint16_t dmin;
};
struct BlockQ3_K {
  uint8_t hmask[kQKK / 8];
  uint8_t qs[kQKK / 4];
  uint8_t scales[12];  // 16 six-bit scales
  uint16_t d;
};
struct BlockQ4_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];  // 8 six-bit scales and 8 six-bit mins
  uint8_t qs[kQKK / 2];
};
struct BlockQ5_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];
  uint8_t qh[kQKK / 8];
  uint8_t qs[kQKK / 2];
};
struct BlockQ6_K {
  uint8_t ql[kQKK / 2];
  uint8_t qh[kQKK / 4];
  int8_t scales[kQKK / 16];
  uint16_t d;
};
struct BlockQ8_K {
  float d;
  int8_t qs[kQKK];
  int16_t bsums[kQKK / 16];  // used by ggml's dot products only
};

static_assert(sizeof(BlockQ4_0) == 18);
static_assert(sizeof(BlockQ4_1) == 20);
static_assert(sizeof(BlockQ5_0) == 22);
static_assert(sizeof(BlockQ5_1) == 24);
static_assert(sizeof(BlockQ8_0) == 34);
static_assert(sizeof(BlockQ2_K) == 84);
static_assert(sizeof(BlockQ3_K) == 110);
static_assert(sizeof(BlockQ4_K) == 144);
static_assert(sizeof(BlockQ5_K) == 176);
static_assert(sizeof(BlockQ6_K) == 210);
static_assert(sizeof(BlockQ8_K) == 292);

float h2f(uint16_t h) {
  return fp16_to_fp32(h);
}

void dequant(const BlockQ4_0& b, float* y) {
  const float d = h2f(b.d);
  for (int j = 0; j < kQK / 2; ++j) {
    y[j] = static_cast<float>((b.qs[j] & 0xf) - 8) * d;
    y[j + kQK / 2] = static_cast<float>((b.qs[j] >> 4) - 8) * d;
  }
}

void dequant(const BlockQ4_1& b, float* y) {
  const float d = h2f(b.d), m = h2f(b.m);
  for (int j = 0; j < kQK / 2; ++j) {
    y[j] = static_cast<float>(b.qs[j] & 0xf) * d + m;
    y[j + kQK / 2] = static_cast<float>(b.qs[j] >> 4) * d + m;
  }
}

// Fifth bits: bit j of the little-endian u32 qh belongs to element j.
uint32_t fifth_bits(const uint8_t (&qh)[4]) {
  return static_cast<uint32_t>(qh[0]) | static_cast<uint32_t>(qh[1]) << 8 |
         static_cast<uint32_t>(qh[2]) << 16 | static_cast<uint32_t>(qh[3]) << 24;
}

void dequant(const BlockQ5_0& b, float* y) {
  const float d = h2f(b.d);
  const uint32_t qh = fifth_bits(b.qh);
  for (int j = 0; j < kQK / 2; ++j) {
    const int lo = static_cast<int>((b.qs[j] & 0xf) | ((qh >> j) & 1u) << 4);
    const int hi = static_cast<int>((b.qs[j] >> 4) | ((qh >> (j + 16)) & 1u) << 4);
    y[j] = static_cast<float>(lo - 16) * d;
    y[j + kQK / 2] = static_cast<float>(hi - 16) * d;
  }
}

void dequant(const BlockQ5_1& b, float* y) {
  const float d = h2f(b.d), m = h2f(b.m);
  const uint32_t qh = fifth_bits(b.qh);
  for (int j = 0; j < kQK / 2; ++j) {
    const uint32_t lo = (b.qs[j] & 0xfu) | ((qh >> j) & 1u) << 4;
    const uint32_t hi = (b.qs[j] >> 4u) | ((qh >> (j + 16)) & 1u) << 4;
    y[j] = static_cast<float>(lo) * d + m;
    y[j + kQK / 2] = static_cast<float>(hi) * d + m;
  }
}

void dequant(const BlockQ8_0& b, float* y) {
  const float d = h2f(b.d);
  for (int j = 0; j < kQK; ++j) y[j] = static_cast<float>(b.qs[j]) * d;
}

// Q2_K: element e takes 2 bits from qs[(e/128)*32 + e%32] at bit 2*((e/32)%4); scale/min e/16.
void dequant(const BlockQ2_K& b, float* y) {
  const float d = h2f(b.d), dmin = h2f(b.dmin);
  for (int e = 0; e < kQKK; ++e) {
    const uint8_t sc = b.scales[e / 16];
    const float dl = d * static_cast<float>(sc & 0xf);
    const float ml = dmin * static_cast<float>(sc >> 4);
    const int q = (b.qs[(e / 128) * 32 + e % 32] >> (2 * ((e / 32) % 4))) & 3;
    y[e] = dl * static_cast<float>(q) - ml;
  }
}

// Q3_K scale s (0..15): low 4 bits in nibble s/8 of scales[s%8], high 2 bits at bit 2*(s/4) of
// scales[8 + s%4]; stored with an offset of 32.
int q3k_scale(const uint8_t (&scales)[12], int s) {
  const int lo = (scales[s % 8] >> (4 * (s / 8))) & 0xf;
  const int hi = (scales[8 + s % 4] >> (2 * (s / 4))) & 3;
  return (lo | hi << 4) - 32;
}

// Q3_K: low 2 bits laid out as in Q2_K; bit e/32 of hmask[e%32] clear means "subtract 4".
void dequant(const BlockQ3_K& b, float* y) {
  const float d = h2f(b.d);
  for (int e = 0; e < kQKK; ++e) {
    const float dl = d * static_cast<float>(q3k_scale(b.scales, e / 16));
    const int low = (b.qs[(e / 128) * 32 + e % 32] >> (2 * ((e / 32) % 4))) & 3;
    const int high = (b.hmask[e % 32] >> (e / 32)) & 1;
    y[e] = dl * static_cast<float>(low - (high ? 0 : 4));
  }
}

// Q4_K/Q5_K sub-block j (0..7, 32 elements each): six-bit scale and min packed in 12 bytes.
void k4_scale_min(const uint8_t (&s)[12], int j, int& scale, int& min) {
  if (j < 4) {
    scale = s[j] & 63;
    min = s[j + 4] & 63;
  } else {
    scale = (s[j + 4] & 0xf) | (s[j - 4] >> 6) << 4;
    min = (s[j + 4] >> 4) | (s[j] >> 6) << 4;
  }
}

// Q4_K: element e is nibble (e/32)%2 of qs[(e/64)*32 + e%32]. Q5_K adds a fifth bit: bit j
// of qh[l] for element 32*j + l (qh null for Q4_K).
void dequant_k4(uint16_t d16, uint16_t dmin16, const uint8_t (&scales)[12], const uint8_t* qs,
                const uint8_t* qh, float* y) {
  const float d = h2f(d16), dmin = h2f(dmin16);
  for (int j = 0; j < kQKK / 32; ++j) {
    int sc = 0, mn = 0;
    k4_scale_min(scales, j, sc, mn);
    const float dl = d * static_cast<float>(sc), ml = dmin * static_cast<float>(mn);
    const uint8_t* q = qs + (j / 2) * 32;
    const int shift = 4 * (j % 2);
    for (int l = 0; l < 32; ++l) {
      const int high = qh != nullptr ? ((qh[l] >> j) & 1) << 4 : 0;
      y[j * 32 + l] = dl * static_cast<float>(((q[l] >> shift) & 0xf) | high) - ml;
    }
  }
}

void dequant(const BlockQ4_K& b, float* y) { dequant_k4(b.d, b.dmin, b.scales, b.qs, nullptr, y); }
void dequant(const BlockQ5_K& b, float* y) { dequant_k4(b.d, b.dmin, b.scales, b.qs, b.qh, y); }

// Q6_K: element e = 128*h + 32*k + l takes its low nibble from ql[64*h + 32*(k%2) + l]
// (nibble k/2) and its high 2 bits from qh[32*h + l] at bit 2*k; signed scale per 16 elements.
void dequant(const BlockQ6_K& b, float* y) {
  const float d = h2f(b.d);
  for (int e = 0; e < kQKK; ++e) {
    const int h = e / 128, k = (e % 128) / 32, l = e % 32;
    const int lo = (b.ql[64 * h + 32 * (k % 2) + l] >> (4 * (k / 2))) & 0xf;
    const int hi = (b.qh[32 * h + l] >> (2 * k)) & 3;
    const float dl = d * static_cast<float>(b.scales[e / 16]);
    y[e] = dl * static_cast<float>((lo | hi << 4) - 32);
  }
}

void dequant(const BlockQ8_K& b, float* y) {
  for (int j = 0; j < kQKK; ++j) y[j] = b.d * static_cast<float>(b.qs[j]);
}

template <typename Block>
void dequant_blocks(const void* src, float* dst, int64_t n, int64_t block_size) {
  const auto* p = static_cast<const uint8_t*>(src);
  Block b;
  for (int64_t i = 0; i < n / block_size; ++i) {
    std::memcpy(&b, p + i * static_cast<int64_t>(sizeof(Block)), sizeof(Block));
    dequant(b, dst + i * block_size);
  }
}

void check_finite(GgmlType type, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    QL_CHECK(std::isfinite(x[i]), "quantize to ", ggml_type_name(type), ": element ", i,
             ": expected a finite value, got ", x[i]);
}

// ggml truncates after adding 0.5 (or 8.5). The clamps only matter when the scale is so small
// (subnormal) that its inverse overflows to infinity; they keep the conversion defined.
uint8_t trunc_code(float v, int max_code) {
  if (!(v > 0.0f)) return 0;
  return v >= static_cast<float>(max_code) ? static_cast<uint8_t>(max_code)
                                           : static_cast<uint8_t>(v);
}

int8_t round_code(float v) {
  if (std::isnan(v)) return 0;
  return static_cast<int8_t>(std::clamp(std::round(v), -127.0f, 127.0f));
}

BlockQ8_0 quant_q8_0(const float* x) {
  float amax = 0.0f;
  for (int j = 0; j < kQK; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  BlockQ8_0 b{};
  b.d = fp32_to_fp16(d);
  for (int j = 0; j < kQK; ++j) b.qs[j] = round_code(x[j] * id);
  return b;
}

// Q4_0: the value of largest magnitude (keeping its sign, first one on ties) maps to code 0.
BlockQ4_0 quant_q4_0(const float* x) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < kQK; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  const float d = max / -8.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  BlockQ4_0 b{};
  b.d = fp32_to_fp16(d);
  for (int j = 0; j < kQK / 2; ++j) {
    const uint8_t lo = trunc_code(x[j] * id + 8.5f, 15);
    const uint8_t hi = trunc_code(x[j + kQK / 2] * id + 8.5f, 15);
    b.qs[j] = static_cast<uint8_t>(lo | hi << 4);
  }
  return b;
}

BlockQ4_1 quant_q4_1(const float* x) {
  float min = x[0], max = x[0];
  for (int j = 1; j < kQK; ++j) {
    min = std::min(min, x[j]);
    max = std::max(max, x[j]);
  }
  const float d = (max - min) / 15.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  BlockQ4_1 b{};
  b.d = fp32_to_fp16(d);
  b.m = fp32_to_fp16(min);
  for (int j = 0; j < kQK / 2; ++j) {
    const uint8_t lo = trunc_code((x[j] - min) * id + 0.5f, 15);
    const uint8_t hi = trunc_code((x[j + kQK / 2] - min) * id + 0.5f, 15);
    b.qs[j] = static_cast<uint8_t>(lo | hi << 4);
  }
  return b;
}

template <typename Block, Block (*Quant)(const float*)>
void quant_blocks(const float* src, void* dst, int64_t n) {
  auto* p = static_cast<uint8_t*>(dst);
  for (int64_t i = 0; i < n / kQK; ++i) {
    const Block b = Quant(src + i * kQK);
    std::memcpy(p + i * static_cast<int64_t>(sizeof(Block)), &b, sizeof(Block));
  }
}

void check_multiple(GgmlType type, int64_t n, const char* what) {
  const GgmlTypeTraits* t = ggml_type_traits(static_cast<uint32_t>(type));
  QL_CHECK(t != nullptr, what, ": unknown ggml type ", static_cast<uint32_t>(type));
  QL_CHECK(n >= 0 && n % t->block_size == 0, what, " ", t->name, ": element count: expected a ",
           "multiple of the block size ", t->block_size, ", got ", n);
}

}  // namespace

const GgmlTypeTraits* ggml_type_traits(uint32_t type) {
  static const GgmlTypeTraits kF32{"F32", 1, 4, true, true};
  static const GgmlTypeTraits kF16{"F16", 1, 2, true, true};
  static const GgmlTypeTraits kBF16{"BF16", 1, 2, true, true};
  static const GgmlTypeTraits kQ4_0{"Q4_0", kQK, sizeof(BlockQ4_0), true, true};
  static const GgmlTypeTraits kQ4_1{"Q4_1", kQK, sizeof(BlockQ4_1), true, true};
  static const GgmlTypeTraits kQ5_0{"Q5_0", kQK, sizeof(BlockQ5_0), true, false};
  static const GgmlTypeTraits kQ5_1{"Q5_1", kQK, sizeof(BlockQ5_1), true, false};
  static const GgmlTypeTraits kQ8_0{"Q8_0", kQK, sizeof(BlockQ8_0), true, true};
  // Q8_1 (fp16 d, fp16 sum, 32 x int8) only appears as a ggml matmul intermediate.
  static const GgmlTypeTraits kQ8_1{"Q8_1", kQK, 36, false, false};
  static const GgmlTypeTraits kQ2_K{"Q2_K", kQKK, sizeof(BlockQ2_K), true, false};
  static const GgmlTypeTraits kQ3_K{"Q3_K", kQKK, sizeof(BlockQ3_K), true, false};
  static const GgmlTypeTraits kQ4_K{"Q4_K", kQKK, sizeof(BlockQ4_K), true, false};
  static const GgmlTypeTraits kQ5_K{"Q5_K", kQKK, sizeof(BlockQ5_K), true, false};
  static const GgmlTypeTraits kQ6_K{"Q6_K", kQKK, sizeof(BlockQ6_K), true, false};
  static const GgmlTypeTraits kQ8_K{"Q8_K", kQKK, sizeof(BlockQ8_K), true, false};
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::F32:
      return &kF32;
    case GgmlType::F16:
      return &kF16;
    case GgmlType::BF16:
      return &kBF16;
    case GgmlType::Q4_0:
      return &kQ4_0;
    case GgmlType::Q4_1:
      return &kQ4_1;
    case GgmlType::Q5_0:
      return &kQ5_0;
    case GgmlType::Q5_1:
      return &kQ5_1;
    case GgmlType::Q8_0:
      return &kQ8_0;
    case GgmlType::Q8_1:
      return &kQ8_1;
    case GgmlType::Q2_K:
      return &kQ2_K;
    case GgmlType::Q3_K:
      return &kQ3_K;
    case GgmlType::Q4_K:
      return &kQ4_K;
    case GgmlType::Q5_K:
      return &kQ5_K;
    case GgmlType::Q6_K:
      return &kQ6_K;
    case GgmlType::Q8_K:
      return &kQ8_K;
  }
  return nullptr;
}

const char* ggml_type_name(GgmlType type) {
  const GgmlTypeTraits* t = ggml_type_traits(static_cast<uint32_t>(type));
  return t != nullptr ? t->name : "unknown";
}

size_t ggml_row_bytes(GgmlType type, int64_t n) {
  check_multiple(type, n, "ggml_row_bytes");
  const GgmlTypeTraits* t = ggml_type_traits(static_cast<uint32_t>(type));
  return static_cast<size_t>(n / t->block_size) * t->block_bytes;
}

void dequantize_row(GgmlType type, const void* src, float* dst, int64_t n) {
  check_multiple(type, n, "dequantize_row");
  const auto* p = static_cast<const uint8_t*>(src);
  switch (type) {
    case GgmlType::F32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case GgmlType::F16:
      return fp16_to_fp32_row(p, dst, n);
    case GgmlType::BF16:
      return bf16_to_fp32_row(p, dst, n);
    case GgmlType::Q4_0:
      return dequant_blocks<BlockQ4_0>(src, dst, n, kQK);
    case GgmlType::Q4_1:
      return dequant_blocks<BlockQ4_1>(src, dst, n, kQK);
    case GgmlType::Q5_0:
      return dequant_blocks<BlockQ5_0>(src, dst, n, kQK);
    case GgmlType::Q5_1:
      return dequant_blocks<BlockQ5_1>(src, dst, n, kQK);
    case GgmlType::Q8_0:
      return dequant_blocks<BlockQ8_0>(src, dst, n, kQK);
    case GgmlType::Q2_K:
      return dequant_blocks<BlockQ2_K>(src, dst, n, kQKK);
    case GgmlType::Q3_K:
      return dequant_blocks<BlockQ3_K>(src, dst, n, kQKK);
    case GgmlType::Q4_K:
      return dequant_blocks<BlockQ4_K>(src, dst, n, kQKK);
    case GgmlType::Q5_K:
      return dequant_blocks<BlockQ5_K>(src, dst, n, kQKK);
    case GgmlType::Q6_K:
      return dequant_blocks<BlockQ6_K>(src, dst, n, kQKK);
    case GgmlType::Q8_K:
      return dequant_blocks<BlockQ8_K>(src, dst, n, kQKK);
    case GgmlType::Q8_1:
      break;
  }
  fail("dequantize_row: no dequantizer for ggml type ", ggml_type_name(type));
}

void quantize_row(GgmlType type, const float* src, void* dst, int64_t n) {
  check_multiple(type, n, "quantize_row");
  auto* p = static_cast<uint8_t*>(dst);
  switch (type) {
    case GgmlType::F32:
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case GgmlType::F16:
    case GgmlType::BF16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = type == GgmlType::F16 ? fp32_to_fp16(src[i]) : fp32_to_bf16(src[i]);
        std::memcpy(p + 2 * i, &h, sizeof h);
      }
      return;
    case GgmlType::Q8_0:
      check_finite(type, src, n);
      return quant_blocks<BlockQ8_0, quant_q8_0>(src, dst, n);
    case GgmlType::Q4_0:
      check_finite(type, src, n);
      return quant_blocks<BlockQ4_0, quant_q4_0>(src, dst, n);
    case GgmlType::Q4_1:
      check_finite(type, src, n);
      return quant_blocks<BlockQ4_1, quant_q4_1>(src, dst, n);
    default:
      break;
  }
  fail("quantize_row: no quantizer for ggml type ", ggml_type_name(type),
       " (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)");
}

namespace {

// The bytes of a derived buffer of `n` items, item i computed from block i by put(block, out).
// The blocks are copied out with memcpy: a mapped GGUF gives no alignment.
template <typename Block, typename Put>
ByteBuffer per_block(const uint8_t* data, int64_t n, int64_t item_bytes,
                     const std::shared_ptr<const MappedFile>& file, Put put) {
  std::function<void()> release;
  if (file)
    release = [data, n, file] {
      release_mapped_pages(data, static_cast<size_t>(n) * sizeof(Block));
    };
  return ByteBuffer::derived(
      static_cast<size_t>(n * item_bytes),
      [data, n, item_bytes, put](uint8_t* out) {
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; ++i) {
          Block b;
          std::memcpy(&b, data + i * static_cast<int64_t>(sizeof(Block)), sizeof b);
          put(b, out + i * item_bytes);
        }
      },
      std::move(release));
}

void put_f16(uint16_t h, uint8_t* out) {
  std::memcpy(out, &h, 2);
}

// Q4_0 / Q4_1 / Q8_0: a 32-element block is one group and one packed chunk; ggml's 4-bit nibble
// order (low nibbles = elements 0..15, high = 16..31) is the QMatrix 4-bit chunk layout byte
// for byte. Symmetric blocks have the offset -2^(bits-1) d: fp16 as d is, unless that
// overflows (|d| above 65504 / 8 or / 128), which only a scan of the blocks can tell.
template <typename Block>
QMatrix legacy_qmatrix(const uint8_t* data, int64_t rows, int64_t cols,
                       const std::shared_ptr<const MappedFile>& file, bool describe_only) {
  constexpr bool kQ8 = std::is_same_v<Block, BlockQ8_0>, kQ41 = std::is_same_v<Block, BlockQ4_1>;
  constexpr int kBits = kQ8 ? 8 : 4;
  QMatrix q;
  q.bits = kBits;
  q.rows = rows;
  q.cols = cols;
  q.group_size = kQK;
  const int64_t n = rows * (cols / kQK);
  q.codes = per_block<Block>(data, n, chunk_bytes(kBits), file, [](const Block& b, uint8_t* out) {
    if constexpr (kQ8) {
      for (int k = 0; k < kQK; ++k) out[k] = static_cast<uint8_t>(b.qs[k] + 128);  // int8 + 128
    } else {
      std::memcpy(out, b.qs, sizeof b.qs);
    }
  });
  q.scales = GroupParams::half(
      per_block<Block>(data, n, 2, file, [](const Block& b, uint8_t* out) { put_f16(b.d, out); }));
  if constexpr (kQ41) {
    q.offsets = GroupParams::half(per_block<Block>(
        data, n, 2, file, [](const Block& b, uint8_t* out) { put_f16(b.m, out); }));
  } else {
    constexpr float kZero = kQ8 ? -128.0f : -8.0f;
    bool fits = true;
    for (int64_t i = 0; i < n && fits && !describe_only; ++i) {
      uint16_t d = 0;
      std::memcpy(&d, data + i * static_cast<int64_t>(sizeof(Block)), 2);
      fits = std::abs(kZero * h2f(d)) <= 65504.0f;  // false for inf and NaN too
    }
    if (file) release_mapped_pages(data, static_cast<size_t>(n) * sizeof(Block));
    q.offsets = fits ? GroupParams::half(per_block<Block>(data, n, 2, file,
                                                          [](const Block& b, uint8_t* out) {
                                                            put_f16(fp32_to_fp16(kZero * h2f(b.d)),
                                                                    out);  // exact: a power of 2
                                                          }))
                     : GroupParams::single(
                           per_block<Block>(data, n, 4, file, [](const Block& b, uint8_t* out) {
                             const float m = kZero * h2f(b.d);
                             std::memcpy(out, &m, 4);
                           }));
  }
  return q;
}

// Q4_K: each 32-element sub-block has its own six-bit scale and min, so w = (d sc) q - dmin mn
// is affine with groups of 32: scale d sc, offset -(dmin mn), both exact in fp32.
QMatrix q4k_qmatrix(const uint8_t* data, int64_t rows, int64_t cols,
                    const std::shared_ptr<const MappedFile>& file) {
  QMatrix q;
  q.rows = rows;
  q.cols = cols;
  q.group_size = kQK;
  const int64_t n = rows * (cols / kQKK);
  q.codes = per_block<BlockQ4_K>(
      data, n, kSub * chunk_bytes(4), file, [](const BlockQ4_K& b, uint8_t* out) {
        for (int k = 0; k < kSub; ++k) {
          const uint8_t* src = b.qs + (k / 2) * 32;
          const int shift = 4 * (k % 2);
          for (int l = 0; l < 16; ++l)
            out[k * 16 + l] = static_cast<uint8_t>(((src[l] >> shift) & 0xf) |
                                                   ((src[l + 16] >> shift) & 0xf) << 4);
        }
      });
  // The scales (min = false) or the offsets of the eight sub-blocks, fp32.
  const auto params = [&](bool min) {
    return GroupParams::single(
        per_block<BlockQ4_K>(data, n, kSub * 4, file, [min](const BlockQ4_K& b, uint8_t* out) {
          const float d = h2f(b.d), dmin = h2f(b.dmin);
          for (int k = 0; k < kSub; ++k) {
            int sc = 0, mn = 0;
            k4_scale_min(b.scales, k, sc, mn);
            const float v = min ? -(dmin * static_cast<float>(mn)) : d * static_cast<float>(sc);
            std::memcpy(out + 4 * k, &v, 4);
          }
        }));
  };
  q.scales = params(false);
  q.offsets = params(true);
  return q;
}

}  // namespace

std::optional<QMatrix> ggml_to_qmatrix(GgmlType type, const uint8_t* data, int64_t rows,
                                       int64_t cols, const std::shared_ptr<const MappedFile>& file,
                                       bool describe_only) {
  switch (type) {
    case GgmlType::Q4_K:
      if (cols % kQKK != 0) return std::nullopt;
      return q4k_qmatrix(data, rows, cols, file);
    case GgmlType::Q4_0:
    case GgmlType::Q4_1:
    case GgmlType::Q8_0:
      if (cols % kQK != 0) return std::nullopt;
      if (type == GgmlType::Q4_0)
        return legacy_qmatrix<BlockQ4_0>(data, rows, cols, file, describe_only);
      if (type == GgmlType::Q4_1)
        return legacy_qmatrix<BlockQ4_1>(data, rows, cols, file, describe_only);
      return legacy_qmatrix<BlockQ8_0>(data, rows, cols, file, describe_only);
    default:
      return std::nullopt;
  }
}

}  // namespace qalora
