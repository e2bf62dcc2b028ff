// Every optimized quantized kernel against its _ref twin, on every instruction set this CPU
// can run (forced through qkernels_internal.h), on odd shapes: column counts that are not a
// multiple of the 32-column chunk, group sizes that do and do not align with chunks, a
// shuffled g_idx, and NF4/FP4 blocks that straddle rows.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "qalora/core/error.h"
#include "qalora/core/fp16.h"
#include "qalora/quant/qmatrix.h"
#include "qalora/quant/quantize.h"
#include "quant/qkernels_internal.h"
#include "test_util.h"

namespace qalora {
namespace {

using test::random_uniform;

using qk::Isa;

// Fills the codes with random values below 2^bits, row by row through pack_row.
void random_codes(QMatrix& w, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> u(0, (1 << w.bits) - 1);
  std::vector<uint8_t> codes(static_cast<size_t>(w.cols));
  for (int64_t j = 0; j < w.rows; ++j) {
    for (auto& c : codes) c = static_cast<uint8_t>(u(rng));
    pack_row(codes.data(), w.cols, w.bits, w.row_codes(j));
  }
}

QMatrix random_affine(int64_t rows, int64_t cols, int bits, int64_t G, uint64_t seed) {
  QMatrix w = make_affine(rows, cols, bits, G);
  random_codes(w, seed);
  w.scales = random_uniform(static_cast<int64_t>(w.scales.size()), seed + 1, 0.01f, 0.1f);
  w.offsets = random_uniform(static_cast<int64_t>(w.offsets.size()), seed + 2, -0.5f, 0.5f);
  w.validate("random affine");
  return w;
}

QMatrix random_codebook(QuantType type, int64_t rows, int64_t cols, uint64_t seed) {
  QMatrix w = make_codebook(type, rows, cols);
  random_codes(w, seed);
  w.absmax = random_uniform(w.n_blocks(), seed + 1, 0.1f, 2.0f);
  w.validate("random codebook");
  return w;
}

// ||a - b|| / ||b||, with ||b|| floored so that an all-zero reference compares absolutely.
double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double d = 0.0, n = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    d += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    n += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(d) / std::max(std::sqrt(n), 1e-3);
}

constexpr double kTol = 1e-5;
// dx sums over the rows (the outputs): with few columns, cancellation between the rows' terms
// lets two fp32 sums in different orders (kernel and reference) differ by more than kTol
// normwise (seen at 33 rows x 1 column when the compiler vectorizes the reference differently).
constexpr double kBackwardTol = 5e-5;

std::vector<Isa> runnable_isas() {
  std::vector<Isa> v;
  for (Isa isa : qk::kAllIsas)
    if (qk::isa_supported(isa)) v.push_back(isa);
  return v;
}

// Whether qmatmul_forward quantizes x to int8 for this weight and token count on `isa`.
bool int8_path(Isa isa, const QMatrix& w, int64_t T) {
  return qk::int8_gemv_used(isa, w) && T <= qk::kGemvMaxTokens;
}

// The largest error int8 activations may add to each output of x W^T: per chunk c of 32
// columns, |x_i - d_c q_i| <= d_c / 2, so |dy_j| <= sum_c d_c / 2 * sum_{i in c} |W[j,i]|.
std::vector<double> int8_error_bound(const std::vector<float>& x, const std::vector<float>& W,
                                     int64_t T, int64_t O, int64_t I) {
  std::vector<double> bound(static_cast<size_t>(T * O), 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c0 = 0; c0 < I; c0 += kQChunk) {
      const int64_t c1 = std::min(I, c0 + kQChunk);
      float amax = 0.0f;
      for (int64_t i = c0; i < c1; ++i) amax = std::max(amax, std::abs(x[t * I + i]));
      for (int64_t j = 0; j < O; ++j) {
        double wsum = 0.0;
        for (int64_t i = c0; i < c1; ++i) wsum += std::abs(W[j * I + i]);
        bound[t * O + j] += amax / 127.0 / 2.0 * wsum;
      }
    }
  return bound;
}

// Runs f once per runnable ISA with the kernels forced to it, then restores the default.
void for_each_isa(const std::function<void(Isa)>& f) {
  const Isa saved = qk::active_isa();
  for (Isa isa : runnable_isas()) {
    qk::force_isa(isa);
    SCOPED_TRACE(qk::isa_name(isa));
    f(isa);
  }
  qk::force_isa(saved);
}

// Forward for the given token counts, backward_input and dequantize_rows (whole and a row
// sub-range) of w against the references; the reference results are computed once and every
// ISA is compared with them. Bias alternates with the token count so both paths see both.
void check_kernels(const QMatrix& w, const std::vector<int64_t>& tokens,
                   const std::vector<int64_t>& backward_tokens, uint64_t seed, float x_lo) {
  const int64_t O = w.rows, I = w.cols;
  const auto bias = random_uniform(O, seed + 7);
  struct Case {
    int64_t T;
    const float* bias;
    std::vector<float> x, ref;
    std::vector<float> int8_ref;  // the int8-activation GEMV's reference, where it applies
    std::vector<double> int8_bound;
  };
  std::vector<float> deq_ref(static_cast<size_t>(O * I));
  dequantize_rows_ref(w, 0, O, deq_ref.data());
  std::vector<Case> fwd;
  for (size_t k = 0; k < tokens.size(); ++k) {
    Case c{tokens[k],
           k % 2 == 0 ? bias.data() : nullptr,
           random_uniform(tokens[k] * I, seed + 10 + k, x_lo, 1.0f),
           {},
           {},
           {}};
    c.ref.resize(static_cast<size_t>(c.T * O));
    qmatmul_forward_ref(c.ref.data(), c.x.data(), w, c.bias, c.T);
    if (qk::int8_gemv_layout(w) && c.T <= qk::kGemvMaxTokens) {
      c.int8_ref.resize(c.ref.size());
      qk::gemv_int8_ref(c.int8_ref.data(), c.x.data(), w, c.bias, c.T);
      c.int8_bound = int8_error_bound(c.x, deq_ref, c.T, O, I);
    }
    fwd.push_back(std::move(c));
  }
  std::vector<Case> bwd;
  for (size_t k = 0; k < backward_tokens.size(); ++k) {
    Case c{backward_tokens[k],
           nullptr,
           random_uniform(backward_tokens[k] * O, seed + 30 + k),
           {},
           {},
           {}};
    c.ref.resize(static_cast<size_t>(c.T * I));
    qmatmul_backward_input_ref(c.ref.data(), c.x.data(), w, c.T);
    bwd.push_back(std::move(c));
  }
  const int64_t r0 = O > 2 ? 1 : 0, r1 = O > 2 ? O - 1 : O;
  const std::vector<float> part_ref(deq_ref.begin() + r0 * I, deq_ref.begin() + r1 * I);

  for_each_isa([&](Isa isa) {
    for (const Case& c : fwd) {
      // Sized exactly, so the sanitizer build catches reads or writes past the ends.
      std::vector<float> y(c.ref.size(), -7.0f);
      qmatmul_forward(y.data(), c.x.data(), w, c.bias, c.T);
      if (!int8_path(isa, w, c.T)) {
        EXPECT_LE(rel_err(y, c.ref), kTol) << "forward T " << c.T << (c.bias ? " bias" : "");
        continue;
      }
      EXPECT_LE(rel_err(y, c.int8_ref), kTol) << "int8 forward T " << c.T;
      std::vector<float> exact(c.ref.size(), -7.0f);
      qmatmul_forward(exact.data(), c.x.data(), w, c.bias, c.T, DecodeActivations::Exact);
      EXPECT_LE(rel_err(exact, c.ref), kTol) << "exact forward T " << c.T;
      // Against fp32: within the rounding bound of the activations (plus fp32 slack).
      for (size_t i = 0; i < y.size(); ++i)
        ASSERT_LE(std::abs(static_cast<double>(y[i]) - c.ref[i]),
                  c.int8_bound[i] + 1e-5 * (1.0 + std::abs(c.ref[i])))
            << "int8 forward T " << c.T << " output " << i;
    }
    for (const Case& c : bwd) {
      std::vector<float> dx(c.ref.size(), -7.0f);
      qmatmul_backward_input(dx.data(), c.x.data(), w, c.T);
      EXPECT_LE(rel_err(dx, c.ref), kBackwardTol) << "backward_input T " << c.T;
      qmatmul_backward_input(dx.data(), c.x.data(), w, c.T, true);  // dx = 2 ref
      std::vector<float> twice = c.ref;
      for (float& v : twice) v *= 2.0f;
      EXPECT_LE(rel_err(dx, twice), kBackwardTol) << "accumulating backward_input T " << c.T;
    }
    std::vector<float> deq(deq_ref.size(), -7.0f), part(part_ref.size(), -7.0f);
    dequantize_rows(w, 0, O, deq.data());
    dequantize_rows(w, r0, r1, part.data());
    // Dequantization is one multiply-add per element: equal up to the fused rounding.
    EXPECT_LE(rel_err(deq, deq_ref), 1e-6) << "dequantize_rows";
    EXPECT_LE(rel_err(part, part_ref), 1e-6) << "dequantize_rows " << r0 << ".." << r1;
    for (size_t i = 0; i < deq.size(); ++i)
      ASSERT_NEAR(deq[i], deq_ref[i], 1e-6f * (1.0f + std::abs(deq_ref[i]))) << "element " << i;
  });
}

// check_kernels on w, and for affine w on its group parameters rounded to fp16 and held as
// fp16 too (each kernel reads either storage).
void check_all_kernels(const QMatrix& w, const std::vector<int64_t>& tokens,
                       const std::vector<int64_t>& backward_tokens, uint64_t seed,
                       float x_lo = -1.0f) {
  {
    SCOPED_TRACE(w.scales.is_half() ? "fp16 parameters" : "fp32 parameters");
    check_kernels(w, tokens, backward_tokens, seed, x_lo);
  }
  if (w.type != QuantType::Affine || w.scales.is_half()) return;
  QMatrix h = w;
  for (GroupParams* p : {&h.scales, &h.offsets}) {
    float* v = p->writable();
    for (int64_t i = 0; i < p->size(); ++i) v[i] = round_to_fp16(v[i]);
    ASSERT_TRUE(p->to_half_if_exact());
  }
  SCOPED_TRACE("fp16 parameters");
  check_kernels(h, tokens, backward_tokens, seed, x_lo);
}

const std::vector<int64_t> kTokens = {1, 2, 3, 5, 17, 64};
const std::vector<int64_t> kRows = {1, 7, 33, 64};
const std::vector<int64_t> kCols = {1, 31, 33, 64, 172, 200};

TEST(QKernels, IsaDispatch) {
  const auto isas = runnable_isas();
  ASSERT_FALSE(isas.empty());
  // By default the best runnable ISA is chosen; the name matches it.
  EXPECT_EQ(qk::active_isa(), isas.back());
  EXPECT_STREQ(qkernel_isa(), qk::isa_name(isas.back()));
  const Isa prev = qk::force_isa(Isa::Portable);
  EXPECT_STREQ(qkernel_isa(), "portable");
  EXPECT_EQ(qk::force_isa(prev), Isa::Portable);
  for (Isa isa : qk::kAllIsas)
    if (!qk::isa_supported(isa)) {
      EXPECT_THROW(qk::force_isa(isa), Error);
    }
  std::printf("[ info ] quantized kernels: %s; testing", qkernel_isa());
  for (Isa isa : isas) std::printf(" %s", qk::isa_name(isa));
  std::printf("\n");
}

TEST(QKernels, ZeroTokensTouchNothing) {
  const QMatrix w = random_affine(7, 33, 4, 32, 1);
  std::vector<float> x(33, 1.0f), y(7, -7.0f), dy(7, 1.0f), dx(33, -7.0f);
  for_each_isa([&](Isa) {
    qmatmul_forward(y.data(), x.data(), w, nullptr, 0);
    qmatmul_backward_input(dx.data(), dy.data(), w, 0);
    for (float v : y) EXPECT_EQ(v, -7.0f);
    for (float v : dx) EXPECT_EQ(v, -7.0f);
  });
}

TEST(QKernels, AffineRandomCodesMatchReference) {
  uint64_t seed = 100;
  for (int bits : {2, 3, 4, 8})
    for (int64_t rows : kRows)
      for (int64_t cols : kCols) {
        std::vector<int64_t> groups;
        for (int64_t G : {int64_t{32}, int64_t{64}, int64_t{128}, int64_t{48}, int64_t{7}, cols})
          if (G <= cols && std::find(groups.begin(), groups.end(), G) == groups.end())
            groups.push_back(G);
        for (int64_t G : groups) {
          SCOPED_TRACE(testing::Message()
                       << "bits " << bits << " " << rows << "x" << cols << " G " << G);
          const QMatrix w = random_affine(rows, cols, bits, G, seed += 100);
          // The large T cases only where they add something: the GEMM path is plain BLAS.
          check_all_kernels(w, rows * cols <= 64 * 64 ? kTokens : std::vector<int64_t>{1, 2, 3, 5},
                            {1, 5}, seed);
        }
      }
}

TEST(QKernels, AffineLargeTokenCounts) {
  for (int bits : {2, 3, 4, 8})
    for (int64_t G : {32, 48, 200}) {
      SCOPED_TRACE(testing::Message() << "bits " << bits << " G " << G);
      check_all_kernels(random_affine(64, 200, bits, G, 7000 + bits * 10 + G), kTokens, {17, 64},
                        7100);
    }
}

TEST(QKernels, WideRowsAtGroupSize32MatchReference) {
  // The G = 32 int8 GEMVs sum 16 (AVX-512 VNNI) or 8 chunks (AVX2) at a time: whole blocks
  // (512, 1024 columns), a block plus a tail of an even or odd number of chunks (544, 704, 736,
  // 1056; 96: a tail alone), and a tail that ends in half a vector.
  uint64_t seed = 7500;
  for (int bits : {2, 4, 8})
    for (int64_t cols : {96, 512, 544, 704, 736, 1000, 1024, 1056}) {
      SCOPED_TRACE(testing::Message() << "bits " << bits << " cols " << cols);
      seed += 10;
      check_all_kernels(random_affine(9, cols, bits, 32, seed), {1, 2, 3, 4}, {}, seed);
    }
}

TEST(QKernels, AffineShuffledGidxMatchesReference) {
  // GPTQ act-order: columns visit groups in a permuted order (g_idx not monotone).
  uint64_t seed = 9000;
  for (int bits : {2, 3, 4, 8})
    for (auto [rows, cols] : {std::pair<int64_t, int64_t>{7, 33}, {33, 172}, {64, 200}})
      // G = 5 at 172 and 200 columns makes more than 32 groups (the gather path).
      for (int64_t G : {32, 7, 48, 5}) {
        if (G >= cols) continue;  // one group: nothing to permute
        SCOPED_TRACE(testing::Message()
                     << "bits " << bits << " " << rows << "x" << cols << " G " << G);
        QMatrix w = random_affine(rows, cols, bits, G, seed += 10);
        w.g_idx.resize(static_cast<size_t>(cols));
        for (int64_t i = 0; i < cols; ++i) w.g_idx[i] = static_cast<int32_t>(i / G);
        std::shuffle(w.g_idx.begin(), w.g_idx.end(), std::mt19937_64(seed));
        w.validate("g_idx");
        ASSERT_FALSE(qk::affine_chunk_aligned(w));
        check_all_kernels(w, {1, 2, 3, 5}, {3}, seed);
      }
}

TEST(QKernels, CodebookRandomCodesMatchReference) {
  // cols % 64 != 0 makes absmax blocks straddle rows (and, when cols % 32 != 0, chunks).
  uint64_t seed = 20000;
  for (QuantType type : {QuantType::NF4, QuantType::FP4})
    for (int64_t rows : kRows)
      for (int64_t cols : kCols) {
        SCOPED_TRACE(testing::Message() << quant_type_name(type) << " " << rows << "x" << cols);
        const QMatrix w = random_codebook(type, rows, cols, seed += 10);
        check_all_kernels(w, rows * cols <= 64 * 64 ? kTokens : std::vector<int64_t>{1, 2, 3, 5},
                          {1, 5}, seed);
      }
}

TEST(QKernels, QuantizedWeightsMatchReference) {
  // Real quantizer output: clamped extremes, sym zero points, fp16-rounded parameters.
  const int64_t rows = 33, cols = 172;
  const auto W = random_uniform(rows * cols, 3, -0.2f, 0.2f);
  std::vector<std::pair<const char*, QMatrix>> cases;
  for (int bits : {2, 3, 4, 8})
    for (int64_t G : {32, 128, -1})
      for (bool sym : {false, true})
        cases.emplace_back("rtn", quantize_rtn(W.data(), rows, cols, bits, G, sym));
  cases.emplace_back("int8", quantize_int8(W.data(), rows, cols));
  for (QuantType type : {QuantType::NF4, QuantType::FP4})
    for (bool dq : {false, true})
      cases.emplace_back(quant_type_name(type), quantize_codebook(type, W.data(), rows, cols, dq));
  uint64_t seed = 30000;
  for (const auto& [name, w] : cases) {
    SCOPED_TRACE(testing::Message() << name << " bits " << w.bits << " G " << w.group_size);
    check_all_kernels(w, {1, 4, 17}, {2}, seed += 50);
  }
}

TEST(QKernels, PositiveActivationsKeepOffsetTermAccurate) {
  // With all-positive x the fused GEMV's m * sum(x) term is large against the result: check
  // that the cancellation stays within tolerance.
  for (int bits : {2, 4, 8}) {
    const auto W = random_uniform(64 * 576, 4, -0.1f, 0.1f);
    const QMatrix w = quantize_rtn(W.data(), 64, 576, bits, 128, true);
    check_all_kernels(w, {1, 3}, {}, 40000 + bits, 0.0f);
  }
}

TEST(QKernels, Int8ActivationsOnSymmetricWeightsStayWithinTheirBound) {
  // Q8_0-like weights: symmetric codes around the zero point 2^(bits-1) (m = -s 2^(bits-1)),
  // most of them near it because one outlier per group sets the scale. Here the offsets'
  // share is as large as the codes' and cancels them; it must be taken from the same rounded
  // activations, or the rounding error of x comes back multiplied by 2^(bits-1).
  const int64_t rows = 64, cols = 576;
  auto W = test::random_normal(rows * cols, 61, 0.02f);
  for (int64_t i = 0; i < rows * cols; i += 32) W[i] = 0.5f;
  for (auto [bits, G] : {std::pair<int, int64_t>{8, 32}, {4, 128}, {2, 64}}) {
    SCOPED_TRACE(testing::Message() << "bits " << bits << " G " << G);
    check_all_kernels(quantize_rtn(W.data(), rows, cols, bits, G, true), {1, 2, 4}, {}, 62, 0.0f);
  }
}

TEST(QKernels, SharedProductsMatchSeparateOnes) {
  // q/k/v-like products of one x: shared layouts (one team, one preparation of x, rows split
  // across matrix boundaries) and a mixed set that falls back to separate calls.
  const int64_t cols = 200;
  const std::vector<QMatrix> same = {random_affine(33, cols, 4, 64, 1),
                                     random_affine(7, cols, 4, 64, 2),
                                     random_affine(1, cols, 4, 64, 3)};
  const std::vector<QMatrix> mixed = {random_affine(9, cols, 4, 64, 4),
                                      random_affine(9, cols, 8, 32, 5),
                                      random_codebook(QuantType::NF4, 9, cols, 6)};
  for (const auto* set : {&same, &mixed})
    for (int64_t T : {1, 3, 5}) {
      SCOPED_TRACE(testing::Message() << (set == &same ? "same" : "mixed") << " T " << T);
      ASSERT_EQ(same_activation_layout((*set)[0], (*set)[1]), set == &same);
      const auto x = random_uniform(T * cols, 70 + T);
      const auto bias = random_uniform(64, 71);
      for_each_isa([&](Isa) {
        std::vector<std::vector<float>> y, expected;
        std::vector<QProduct> products;
        for (size_t m = 0; m < set->size(); ++m) {
          const QMatrix& w = (*set)[m];
          const float* b = m == 1 ? bias.data() : nullptr;
          expected.emplace_back(static_cast<size_t>(T * w.rows));
          qmatmul_forward(expected.back().data(), x.data(), w, b, T);
          y.emplace_back(static_cast<size_t>(T * w.rows), -7.0f);
        }
        for (size_t m = 0; m < set->size(); ++m)
          products.push_back({&(*set)[m], m == 1 ? bias.data() : nullptr, y[m].data()});
        qmatmul_forward_shared(products, x.data(), T);
        for (size_t m = 0; m < set->size(); ++m) EXPECT_EQ(y[m], expected[m]) << "product " << m;
        qmatmul_forward_shared({}, x.data(), T);  // a layer with no quantized linears
      });
    }
}

TEST(QKernels, NonFiniteActivationsReachTheOutput) {
  // A NaN in x must come out as NaN on every path (the int8 one included), never as a number.
  const QMatrix w = random_affine(9, 100, 4, 32, 80);
  auto x = random_uniform(2 * 100, 81);
  x[37] = std::numeric_limits<float>::quiet_NaN();
  for_each_isa([&](Isa) {
    std::vector<float> y(2 * 9);
    qmatmul_forward(y.data(), x.data(), w, nullptr, 2);
    for (int64_t j = 0; j < 9; ++j) {
      EXPECT_TRUE(std::isnan(y[j])) << "row " << j;
      EXPECT_TRUE(std::isfinite(y[9 + j])) << "row " << j;  // the other token is unaffected
    }
  });
}

TEST(QKernels, SmolLmShapes) {
  // The decode shapes the benchmarks time, against the reference on a few rows' worth.
  for (auto [rows, cols] : {std::pair<int64_t, int64_t>{64, 576}, {64, 1536}}) {
    check_all_kernels(random_affine(rows, cols, 4, 128, 50000 + cols), {1, 2}, {1}, 50100);
    check_all_kernels(random_codebook(QuantType::NF4, rows, cols, 50200 + cols), {1}, {}, 50300);
  }
}

}  // namespace
}  // namespace qalora
