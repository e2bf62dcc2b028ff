// QMatrix layout, codebooks, double quantization and the RTN / INT8 / NF4 / FP4 quantizers,
// each checked against its definition (qmatrix.h, quantize.h) rather than against itself.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "qalora/core/error.h"
#include "qalora/core/fp16.h"
#include "qalora/quant/qmatrix.h"
#include "qalora/quant/quantize.h"
#include "test_util.h"

namespace qalora {
namespace {

std::vector<uint8_t> random_codes(int64_t n, int bits, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> u(0, (1 << bits) - 1);
  std::vector<uint8_t> v(static_cast<size_t>(n));
  for (auto& c : v) c = static_cast<uint8_t>(u(rng));
  return v;
}

using test::random_normal;

int64_t packed_bytes(int64_t cols, int bits) {
  return (cols + kQChunk - 1) / kQChunk * chunk_bytes(bits);
}

// The packed layout written straight from the description in qmatrix.h, one chunk at a time,
// so pack_row is checked against the specification and not only against unpack_row.
std::vector<uint8_t> pack_by_spec(const std::vector<uint8_t>& codes, int bits) {
  const auto cols = static_cast<int64_t>(codes.size());
  std::vector<uint8_t> out(static_cast<size_t>(packed_bytes(cols, bits)), 0);
  auto code = [&](int64_t i) -> unsigned { return i < cols ? codes[i] : 0u; };
  for (int64_t c0 = 0; c0 < cols; c0 += kQChunk) {
    uint8_t* chunk = out.data() + c0 / kQChunk * chunk_bytes(bits);
    if (bits == 8) {
      for (int k = 0; k < 32; ++k) chunk[k] = static_cast<uint8_t>(code(c0 + k));
    } else if (bits == 4) {
      for (int k = 0; k < 16; ++k)
        chunk[k] = static_cast<uint8_t>(code(c0 + k) | (code(c0 + k + 16) << 4));
    } else {
      for (int k = 0; k < 8; ++k)
        chunk[k] =
            static_cast<uint8_t>((code(c0 + k) & 3) | ((code(c0 + k + 8) & 3) << 2) |
                                 ((code(c0 + k + 16) & 3) << 4) | ((code(c0 + k + 24) & 3) << 6));
      if (bits == 3) {
        uint32_t plane = 0;
        for (int k = 0; k < 32; ++k) plane |= ((code(c0 + k) >> 2) & 1u) << k;
        for (int b = 0; b < 4; ++b) chunk[8 + b] = static_cast<uint8_t>(plane >> (8 * b));
      }
    }
  }
  return out;
}

TEST(QMatrix, PackUnpackRoundTripsOnOddWidths) {
  for (int bits : {2, 3, 4, 8})
    for (int64_t cols : {1, 31, 33, 172, 200}) {
      SCOPED_TRACE(testing::Message() << "bits " << bits << " cols " << cols);
      const auto codes = random_codes(cols, bits, static_cast<uint64_t>(bits * 1000 + cols));
      std::vector<uint8_t> packed(static_cast<size_t>(packed_bytes(cols, bits)), 0xAB);
      pack_row(codes.data(), cols, bits, packed.data());
      EXPECT_EQ(packed, pack_by_spec(codes, bits));
      std::vector<uint8_t> back(static_cast<size_t>(cols));
      unpack_row(packed.data(), cols, bits, back.data());
      EXPECT_EQ(back, codes);
      // The padding of the last chunk holds zero codes.
      const int64_t padded = (cols + kQChunk - 1) / kQChunk * kQChunk;
      std::vector<uint8_t> all(static_cast<size_t>(padded));
      unpack_row(packed.data(), padded, bits, all.data());
      for (int64_t i = cols; i < padded; ++i) EXPECT_EQ(all[i], 0) << "padding column " << i;
    }
}

TEST(QMatrix, CodeAtMatchesPackedRows) {
  for (int bits : {2, 3, 4, 8})
    for (int64_t cols : {1, 31, 33, 172, 200}) {
      const int64_t rows = 3;
      QMatrix w = make_affine(rows, cols, bits, cols);
      w.validate("test");
      EXPECT_EQ(w.row_bytes(), packed_bytes(cols, bits));
      std::vector<std::vector<uint8_t>> codes;
      for (int64_t j = 0; j < rows; ++j) {
        codes.push_back(random_codes(cols, bits, static_cast<uint64_t>(7 * j + bits + cols)));
        pack_row(codes.back().data(), cols, bits, w.row_codes(j));
      }
      for (int64_t j = 0; j < rows; ++j)
        for (int64_t i = 0; i < cols; ++i)
          ASSERT_EQ(code_at(w, j, i), codes[j][i])
              << "bits " << bits << " [" << j << ", " << i << "]";
    }
}

TEST(QMatrix, ShapesAndStorage) {
  const QMatrix a = make_affine(7, 200, 4, 64);
  EXPECT_EQ(a.padded_cols(), 224);
  EXPECT_EQ(a.row_bytes(), 7 * 16);
  EXPECT_EQ(a.n_groups(), 4);
  EXPECT_EQ(a.storage_bytes(), 7 * 7 * 16 + 2 * (7 * 4 * 2));
  const QMatrix c = make_codebook(QuantType::NF4, 3, 33);
  EXPECT_EQ(c.n_blocks(), 2);  // 99 elements in blocks of 64
  EXPECT_EQ(c.storage_bytes(), 3 * 32 + 2 * 4);
  c.validate("test");
  QMatrix bad = make_affine(2, 10, 4, 5);
  bad.scales.assign(bad.scales.size() - 1, 0.0f);
  EXPECT_THROW(bad.validate("w"), Error);
}

// Standard normal quantile by bisection on the CDF 0.5 * erfc(-x / sqrt 2).
double norm_ppf(double p) {
  double lo = -40.0, hi = 40.0;
  for (int it = 0; it < 200; ++it) {
    const double mid = 0.5 * (lo + hi);
    (0.5 * std::erfc(-mid / std::sqrt(2.0)) < p ? lo : hi) = mid;
  }
  return 0.5 * (lo + hi);
}

std::vector<double> linspace(double a, double b, int n) {
  std::vector<double> v(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) v[i] = a + (b - a) * i / (n - 1);
  return v;
}

TEST(QMatrix, Nf4CodebookIsNormalQuantiles) {
  // bitsandbytes create_normal_map(offset = 0.9677083, use_extra_value = True): 8 positive and
  // 7 negative quantiles of N(0, 1) plus an exact zero, normalised by the largest.
  const double offset = 0.9677083;
  std::vector<double> v{0.0};
  const auto pos = linspace(offset, 0.5, 9), neg = linspace(offset, 0.5, 8);
  for (int i = 0; i < 8; ++i) v.push_back(norm_ppf(pos[i]));
  for (int i = 0; i < 7; ++i) v.push_back(-norm_ppf(neg[i]));
  std::sort(v.begin(), v.end());
  const double vmax = v.back();
  const float* book = nf4_codebook();
  for (int c = 0; c < 16; ++c) EXPECT_NEAR(book[c], v[c] / vmax, 1e-6) << "code " << c;
  EXPECT_EQ(book[7], 0.0f);
  EXPECT_EQ(codebook(QuantType::NF4), book);
  EXPECT_THROW(codebook(QuantType::Affine), Error);
}

TEST(QMatrix, Fp4CodebookIsE2M1) {
  // Bit 3 sign, bits 2..1 exponent, bit 0 mantissa; exponent 0 is subnormal (0, 0.5); the
  // largest magnitude (6) is scaled to 1.
  const float* book = fp4_codebook();
  for (int c = 0; c < 16; ++c) {
    const int e = (c >> 1) & 3, m = c & 1;
    const double mag = e == 0 ? 0.5 * m : std::ldexp(1.0 + 0.5 * m, e - 1);
    const double value = ((c & 8) ? -mag : mag) / 6.0;
    EXPECT_NEAR(book[c], value, 1e-7) << "code " << c;
  }
  EXPECT_EQ(book[7], 1.0f);
  EXPECT_EQ(book[15], -1.0f);
}

TEST(QMatrix, DoubleQuantizationRoundTrip) {
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<float> u(0.01f, 2.0f);
  for (size_t n : {size_t{1}, size_t{255}, size_t{256}, size_t{1000}}) {
    std::vector<float> v(n);
    for (auto& x : v) x = u(rng);
    const DoubleQuant dq = double_quantize(v);
    ASSERT_EQ(dq.codes.size(), n);
    ASSERT_EQ(dq.scales.size(), (n + 255) / 256);
    const double mean = std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(n);
    EXPECT_NEAR(dq.mean, mean, 1e-6 * std::abs(mean));
    const auto back = double_dequantize(dq);
    double back_mean = 0.0, max_scale = 0.0;
    for (size_t i = 0; i < n; ++i) {
      const float s = dq.scales[i / DoubleQuant::kBlock];
      max_scale = std::max(max_scale, static_cast<double>(s));
      EXPECT_GE(dq.codes[i], 1);  // symmetric: -127..127 stored + 128
      EXPECT_LE(std::abs(back[i] - v[i]), s / 2 * (1 + 1e-5f) + 1e-7f) << "n " << n << " i " << i;
      back_mean += back[i];
    }
    EXPECT_NEAR(back_mean / static_cast<double>(n), mean, max_scale / 2);
  }
  // Constant values decode exactly (everything sits on the mean).
  const auto same = double_dequantize(double_quantize(std::vector<float>(300, 0.25f)));
  for (float x : same) EXPECT_EQ(x, 0.25f);
  EXPECT_TRUE(double_quantize({}).empty());
}

bool fp16_exact(float v) {
  return fp16_to_fp32(fp32_to_fp16(v)) == v;
}

TEST(Quantize, RtnMinMaxProperties) {
  const int64_t rows = 5, cols = 200;
  const auto w = random_normal(rows * cols, 11, 0.05f);
  for (int bits : {2, 3, 4, 8})
    for (int64_t G : {32, 64, 7, -1})
      for (bool sym : {false, true}) {
        SCOPED_TRACE(testing::Message() << "bits " << bits << " G " << G << " sym " << sym);
        const QMatrix q = quantize_rtn(w.data(), rows, cols, bits, G, sym);
        q.validate("rtn");
        EXPECT_EQ(q.group_size, G == -1 ? cols : G);
        const int64_t L = q.n_groups();
        for (int64_t k = 0; k < q.scales.size(); ++k) {
          EXPECT_GT(q.scales[k], 0.0f);
          EXPECT_TRUE(fp16_exact(q.scales[k])) << q.scales[k];
          EXPECT_TRUE(fp16_exact(q.offsets[k])) << q.offsets[k];
          if (sym) {
            EXPECT_EQ(q.offsets[k], -q.scales[k] * static_cast<float>(1 << (bits - 1)));
          }
        }
        for (int64_t j = 0; j < rows; ++j)
          for (int64_t i = 0; i < cols; ++i) {
            const int64_t g = j * L + i / q.group_size;
            const float s = q.scales[g], m = q.offsets[g];
            ASSERT_LT(code_at(q, j, i), 1 << bits);
            // Within half a step, up to the fp16 rounding of the scale and offset, which can
            // pull the grid's ends in by a few 2^-11 relative steps.
            const float slack = (static_cast<float>((1 << bits) - 1) * s + std::abs(m)) * 1e-3f;
            ASSERT_LE(std::abs(dequant_at(q, j, i) - w[j * cols + i]), s / 2 + slack)
                << "[" << j << ", " << i << "]";
          }
      }
}

// Bit patterns of a matrix's group parameters, for exact comparisons.
std::vector<uint32_t> param_bits(const GroupParams& p) {
  std::vector<uint32_t> bits;
  for (const float v : p.to_vector()) bits.push_back(std::bit_cast<uint32_t>(v));
  return bits;
}

TEST(Quantize, RtnEqualsItsReferenceBitForBit) {
  // Widths with ragged last groups and partial blocks of 16 groups; rows that are all zeros
  // (some -0), constant, tiny (the scale floors at the smallest fp16) and exact halves.
  for (const int64_t cols : {16, 33, 48, 200, 560, 1000}) {
    const int64_t rows = 6;
    std::vector<float> w = random_normal(rows * cols, 300 + cols, 0.05f);
    for (int64_t i = 0; i < cols; ++i) {
      w[static_cast<size_t>(i)] = i % 3 == 0 ? -0.0f : 0.0f;
      w[static_cast<size_t>(cols + i)] = 0.75f;
      w[static_cast<size_t>(2 * cols + i)] = 1e-9f * static_cast<float>(i % 7);
      w[static_cast<size_t>(3 * cols + i)] = 0.125f * static_cast<float>(i % 17) - 1.0f;
    }
    for (int bits : {2, 3, 4, 8})
      for (int64_t G : {16, 32, 48, 64, 128, 7, -1})
        for (bool sym : {false, true}) {
          SCOPED_TRACE(testing::Message()
                       << cols << " cols, bits " << bits << " G " << G << " sym " << sym);
          const QMatrix got = quantize_rtn(w.data(), rows, cols, bits, G, sym);
          const QMatrix want = quantize_rtn_ref(w.data(), rows, cols, bits, G, sym);
          EXPECT_EQ(got.codes, want.codes);
          EXPECT_EQ(param_bits(got.scales), param_bits(want.scales));
          EXPECT_EQ(param_bits(got.offsets), param_bits(want.offsets));
        }
  }
  // A range no fp16 scale holds is refused by both.
  std::vector<float> wide(64, 0.0f);
  wide[40] = 3e5f;
  EXPECT_THROW(quantize_rtn(wide.data(), 1, 64, 2, 32, false), Error);
  EXPECT_THROW(quantize_rtn_ref(wide.data(), 1, 64, 2, 32, false), Error);
}

TEST(Quantize, AffineCodesEqualAffineCodeElementByElement) {
  // Values past both ends of the range, exact halves (round half to even), and lengths with
  // tails after the 16-wide vectors.
  std::vector<float> w = test::random_uniform(100, 71, -3.0f, 3.0f);
  for (int k = 0; k < 20; ++k)
    w[static_cast<size_t>(k)] = 0.25f * static_cast<float>(k - 10) + 0.125f;
  for (int bits : {2, 3, 4, 8})
    for (int64_t n : {1, 15, 16, 17, 33, 100}) {
      const AffineParams p{0.25f, -1.5f};
      std::vector<uint8_t> got(static_cast<size_t>(n), 0xFF);
      affine_codes(w.data(), n, p, bits, got.data());
      for (int64_t i = 0; i < n; ++i)
        ASSERT_EQ(got[static_cast<size_t>(i)], affine_code(w[static_cast<size_t>(i)], p, bits))
            << "bits " << bits << " n " << n << " i " << i << " w " << w[static_cast<size_t>(i)];
    }
}

TEST(Quantize, RtnRangeIncludesZeroAndHandlesConstantGroups) {
  // An all-positive group still represents 0 (the range always includes it) ...
  std::vector<float> pos(64, 0.0f);
  for (int i = 0; i < 64; ++i) pos[i] = 1.0f + 0.01f * static_cast<float>(i);
  const AffineParams p = affine_params(pos.data(), 64, 1, 4, false);
  EXPECT_EQ(p.offset, 0.0f);
  EXPECT_NEAR(p.scale, 1.63f / 15.0f, 1e-3f);
  // ... and an all-zero group gets scale 1 and decodes to exact zeros.
  const std::vector<float> zeros(64, 0.0f);
  const QMatrix q = quantize_rtn(zeros.data(), 1, 64, 4, 32, false);
  for (int64_t i = 0; i < 64; ++i) EXPECT_EQ(dequant_at(q, 0, i), 0.0f);
  EXPECT_EQ(q.scales[0], 1.0f);
  EXPECT_EQ(resolve_group_size(-1, 100), 100);
  EXPECT_EQ(resolve_group_size(128, 100), 100);
  EXPECT_THROW(resolve_group_size(0, 100), Error);
}

TEST(Quantize, Int8PerRowAbsmax) {
  const int64_t rows = 4, cols = 172;
  auto w = random_normal(rows * cols, 12);
  w[3] = 0.0f;
  const QMatrix q = quantize_int8(w.data(), rows, cols);
  q.validate("int8");
  EXPECT_EQ(q.bits, 8);
  EXPECT_EQ(q.n_groups(), 1);
  for (int64_t j = 0; j < rows; ++j) {
    float amax = 0.0f;
    for (int64_t i = 0; i < cols; ++i) amax = std::max(amax, std::abs(w[j * cols + i]));
    const float s = q.scales[j];
    EXPECT_TRUE(fp16_exact(s));
    EXPECT_NEAR(s, amax / 127.0f, amax / 127.0f * 1e-3f);
    EXPECT_EQ(q.offsets[j], -128.0f * s);
    for (int64_t i = 0; i < cols; ++i) {
      const uint8_t c = code_at(q, j, i);
      EXPECT_GE(c, 1);  // symmetric: -127..127 around 128
      EXPECT_LE(std::abs(dequant_at(q, j, i) - w[j * cols + i]), s / 2 + amax * 1e-3f);
    }
  }
  EXPECT_EQ(dequant_at(q, 0, 3), 0.0f);  // zero stays exactly zero
}

// Largest half-gap between adjacent levels of a codebook: the worst rounding error per unit
// of absmax for values inside [-1, 1].
float half_gap(const float* book) {
  std::vector<float> v(book, book + 16);
  std::sort(v.begin(), v.end());
  float g = 0.0f;
  for (int c = 1; c < 16; ++c) g = std::max(g, (v[c] - v[c - 1]) / 2);
  return g;
}

TEST(Quantize, CodebookErrorBounds) {
  for (QuantType type : {QuantType::NF4, QuantType::FP4})
    for (bool dq : {false, true})
      for (auto [rows, cols] : {std::pair<int64_t, int64_t>{7, 33}, {5, 200}, {64, 64}}) {
        SCOPED_TRACE(testing::Message()
                     << quant_type_name(type) << " dq " << dq << " " << rows << "x" << cols);
        const auto w = random_normal(rows * cols, static_cast<uint64_t>(rows * cols));
        const QMatrix q = quantize_codebook(type, w.data(), rows, cols, dq);
        q.validate("codebook");
        EXPECT_EQ(q.absmax_dq.empty(), !dq);
        const float* book = codebook(type);
        const float hg = half_gap(book);
        // True absmax per block, to bound the extra error of double-quantized constants.
        std::vector<float> amax(static_cast<size_t>(q.n_blocks()), 0.0f);
        for (int64_t e = 0; e < rows * cols; ++e)
          amax[e / kCodebookBlock] = std::max(amax[e / kCodebookBlock], std::abs(w[e]));
        double se = 0.0;
        for (int64_t j = 0; j < rows; ++j)
          for (int64_t i = 0; i < cols; ++i) {
            const int64_t e = j * cols + i, b = e / kCodebookBlock;
            const float a = q.absmax[b];
            if (!dq) {
              EXPECT_EQ(a, amax[b]);
            }
            const float err = std::abs(dequant_at(q, j, i) - w[e]);
            ASSERT_LE(err, a * hg + std::abs(amax[b] - a) + 1e-6f) << "[" << j << ", " << i << "]";
            // The code is the nearest level to w / a.
            const float r = w[e] / a, chosen = std::abs(book[code_at(q, j, i)] - r);
            for (int c = 0; c < 16; ++c) ASSERT_LE(chosen, std::abs(book[c] - r) + 1e-6f);
            se += static_cast<double>(err) * err;
          }
        // RMS error on N(0, 1) weights (measured about 0.09 for NF4, 0.107 for FP4): NF4's
        // levels fit Gaussian data better.
        EXPECT_LT(std::sqrt(se / static_cast<double>(rows * cols)),
                  type == QuantType::NF4 ? 0.1 : 0.12);
      }
}

}  // namespace
}  // namespace qalora
