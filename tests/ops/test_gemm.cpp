#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "qalora/core/error.h"
#include "qalora/core/fp16.h"
#include "qalora/ops/gemm.h"
#include "test_util.h"

namespace qalora {
namespace {

using ops::ComputeType;

using test::ComputeTypeScope;

#define REQUIRE_BF16()                                                                        \
  if (!ops::bf16_available())                                                                 \
  GTEST_SKIP() << "no bf16 matrix path here (CPU without AVX512-BF16 / AMX-BF16, or a build " \
                  "without oneDNN)"

// One product's operands, stored with row strides wider than their rows (odd padding), as
// layers pass column blocks of larger matrices.
struct Product {
  bool trans_a, trans_b;
  int64_t M, N, K, lda, ldb, ldc;
  std::vector<float> A, B, C;

  Product(bool ta, bool tb, int64_t m, int64_t n, int64_t k, uint64_t seed)
      : trans_a(ta), trans_b(tb), M(m), N(n), K(k) {
    lda = (ta ? M : K) + 3;
    ldb = (tb ? K : N) + 5;
    ldc = N + 2;
    A = test::random_normal((ta ? K : M) * lda, seed);
    B = test::random_normal((tb ? N : K) * ldb, seed + 1);
    C = test::random_normal(M * ldc, seed + 2);
  }
  float a(int64_t m, int64_t k) const { return trans_a ? A[k * lda + m] : A[m * lda + k]; }
  float b(int64_t k, int64_t n) const { return trans_b ? B[n * ldb + k] : B[k * ldb + n]; }
};

std::vector<uint16_t> bf16_of(const std::vector<float>& x) {
  std::vector<uint16_t> out(x.size());
  ops::to_bf16_ref(x.data(), 1, static_cast<int64_t>(x.size()), 0, out.data());
  return out;
}

TEST(Gemm, ToBf16RoundsToNearestEvenAndMatchesReference) {
  // 1 + 2^-8 lies halfway between 1 and the next bf16 (1 + 2^-7): it rounds to the even 1;
  // 1 + 3 2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6: it rounds to the even 1 + 2^-6.
  const float halfway_down = 1.0f + std::ldexp(1.0f, -8);
  const float halfway_up = 1.0f + 3.0f * std::ldexp(1.0f, -8);
  EXPECT_EQ(bf16_to_fp32(fp32_to_bf16(halfway_down)), 1.0f);
  EXPECT_EQ(bf16_to_fp32(fp32_to_bf16(halfway_up)), 1.0f + std::ldexp(1.0f, -6));

  constexpr int64_t rows = 67, cols = 45, ld = 51;  // tails of every vector width
  std::vector<float> x = test::random_normal(rows * ld, 11, 100.0f);
  x[3] = std::numeric_limits<float>::quiet_NaN();
  x[4] = std::numeric_limits<float>::infinity();
  x[5] = -std::numeric_limits<float>::max();  // rounds up to -inf
  x[6] = halfway_down;
  x[7] = -std::numeric_limits<float>::denorm_min();  // flushed to -0
  std::vector<uint16_t> fast(rows * cols), ref(rows * cols);
  ops::to_bf16(x.data(), rows, cols, ld, fast.data());
  ops::to_bf16_ref(x.data(), rows, cols, ld, ref.data());
  EXPECT_EQ(fast, ref);
  EXPECT_TRUE(std::isnan(bf16_to_fp32(ref[3])));
  EXPECT_EQ(bf16_to_fp32(ref[5]), -std::numeric_limits<float>::infinity());
  EXPECT_EQ(ref[7], 0x8000);
  // Within half a bf16 ulp: 8 significant bits, so at most 2^-8 of the value.
  for (int64_t i = 8; i < cols; ++i)
    EXPECT_LE(std::fabs(bf16_to_fp32(ref[i]) - x[i]), std::ldexp(std::fabs(x[i]), -8));
}

TEST(Gemm, Bf16MatchesReferenceOnOddShapesTransposesAndStrides) {
  REQUIRE_BF16();
  uint64_t seed = 100;
  for (const bool ta : {false, true})
    for (const bool tb : {false, true})
      for (const float beta : {0.0f, 0.75f}) {
        Product p(ta, tb, 37, 29, 75, seed += 3);
        const auto A = bf16_of(p.A), B = bf16_of(p.B);
        std::vector<float> fast = p.C, ref = p.C;
        ops::gemm_bf16(ta, tb, p.M, p.N, p.K, 0.5f, A.data(), p.lda, B.data(), p.ldb, beta,
                       fast.data(), p.ldc);
        ops::gemm_bf16_ref(ta, tb, p.M, p.N, p.K, 0.5f, A.data(), p.lda, B.data(), p.ldb, beta,
                           ref.data(), p.ldc);
        // The padding columns of C are never written: both keep the initial values there.
        test::expect_close(fast, ref, 2e-5f,
                           "trans_a " + std::to_string(ta) + " trans_b " + std::to_string(tb) +
                               " beta " + std::to_string(beta));
      }
}

TEST(Gemm, Bf16OfAnEmptySumScalesC) {
  REQUIRE_BF16();
  std::vector<float> c = {1.0f, -2.0f, 3.0f, 4.0f};
  ops::gemm_bf16(false, false, 2, 2, 0, 1.0f, nullptr, 1, nullptr, 2, 0.5f, c.data(), 2);
  EXPECT_EQ(c, (std::vector<float>{0.5f, -1.0f, 1.5f, 2.0f}));
}

// In bf16, gemm() rounds each input once (a relative error of at most 2^-8 each) and
// accumulates in fp32: against the fp32 product each term a b is off by at most
// (2^-7 + 2^-16) |a b|, so the whole sum by at most that times sum |a| |b| (plus fp32 rounding).
TEST(Gemm, Bf16ComputeTypeStaysWithinTheRoundingBoundOfFp32) {
  REQUIRE_BF16();
  uint64_t seed = 300;
  for (const bool ta : {false, true})
    for (const bool tb : {false, true}) {
      Product p(ta, tb, 41, 37, 700, seed += 3);  // above the 2^20 multiply-adds of bf16
      std::vector<float> exact = p.C, rounded = p.C;
      ops::gemm(ta, tb, p.M, p.N, p.K, 1.0f, p.A.data(), p.lda, p.B.data(), p.ldb, 1.0f,
                exact.data(), p.ldc);
      {
        ComputeTypeScope bf16(ComputeType::Bf16);
        ops::gemm(ta, tb, p.M, p.N, p.K, 1.0f, p.A.data(), p.lda, p.B.data(), p.ldb, 1.0f,
                  rounded.data(), p.ldc);
      }
      int64_t differ = 0;
      for (int64_t m = 0; m < p.M; ++m)
        for (int64_t n = 0; n < p.N; ++n) {
          double bound = 0.0;
          for (int64_t k = 0; k < p.K; ++k) bound += std::fabs(p.a(m, k) * p.b(k, n));
          const double err = std::fabs(rounded[m * p.ldc + n] - exact[m * p.ldc + n]);
          EXPECT_LE(err, (std::ldexp(1.0, -7) + std::ldexp(1.0, -16)) * bound + 1e-5 * (1 + bound))
              << m << ", " << n;
          differ += err > 0;
        }
      EXPECT_GT(differ, p.M * p.N / 2) << "the bf16 path ran in fp32";
    }
}

// A bf16 copy that an operand carries replaces its conversion: the same product bit for bit,
// and the copy, not the fp32 values, is what the product reads.
TEST(Gemm, Bf16CopiesCarriedByOperandsReplaceTheirConversion) {
  REQUIRE_BF16();
  ComputeTypeScope scope(ComputeType::Bf16);
  uint64_t seed = 900;
  for (const bool ta : {false, true})
    for (const bool tb : {false, true}) {
      Product p(ta, tb, 41, 37, 700, seed += 3);
      const auto A16 = bf16_of(p.A), B16 = bf16_of(p.B);
      std::vector<float> doubled_A(p.A.size());
      for (size_t i = 0; i < p.A.size(); ++i) doubled_A[i] = 2.0f * p.A[i];
      const auto A16x2 = bf16_of(doubled_A);
      std::vector<float> converted = p.C, carried = p.C, weight_only = p.C, from_copy = p.C;
      ops::gemm(ta, tb, p.M, p.N, p.K, 0.5f, p.A.data(), p.lda, p.B.data(), p.ldb, 0.0f,
                converted.data(), p.ldc);
      ops::gemm(ta, tb, p.M, p.N, p.K, 0.5f, ops::Operand(p.A.data(), A16.data()), p.lda,
                ops::Operand(p.B.data(), B16.data()), p.ldb, 0.0f, carried.data(), p.ldc);
      ops::gemm_bf16(ta, tb, p.M, p.N, p.K, 0.5f, p.A.data(), p.lda,
                     ops::Operand(nullptr, B16.data()), p.ldb, 0.0f, weight_only.data(), p.ldc);
      ops::gemm(ta, tb, p.M, p.N, p.K, 0.25f, ops::Operand(p.A.data(), A16x2.data()), p.lda,
                p.B.data(), p.ldb, 0.0f, from_copy.data(), p.ldc);
      EXPECT_EQ(carried, converted);
      EXPECT_EQ(weight_only, converted);
      EXPECT_EQ(from_copy, converted) << "the product read A's fp32 values, not its copy";
    }
}

// Below 2^20 multiply-adds the conversions would cost more than bf16 saves: such products
// give the fp32 result bit for bit.
TEST(Gemm, SmallProductsStayInFp32) {
  REQUIRE_BF16();
  Product p(false, true, 64, 64, 63, 700);
  std::vector<float> fp32 = p.C, bf16 = p.C;
  ops::gemm(false, true, p.M, p.N, p.K, 1.0f, p.A.data(), p.lda, p.B.data(), p.ldb, 0.0f,
            fp32.data(), p.ldc);
  ComputeTypeScope scope(ComputeType::Bf16);
  EXPECT_FALSE(ops::use_bf16(p.M, p.N, p.K));
  EXPECT_TRUE(ops::use_bf16(128, 128, 64));
  ops::gemm(false, true, p.M, p.N, p.K, 1.0f, p.A.data(), p.lda, p.B.data(), p.ldb, 0.0f,
            bf16.data(), p.ldc);
  EXPECT_EQ(bf16, fp32);
}

// Attention calls gemm() from inside its parallel loop: each thread must get its own kernels
// and buffers, and the same numbers as a call outside it.
TEST(Gemm, Bf16GivesTheSameResultInsideAParallelRegion) {
  REQUIRE_BF16();
  ComputeTypeScope bf16(ComputeType::Bf16);
  constexpr int kProducts = 8;
  std::vector<Product> products;
  for (int i = 0; i < kProducts; ++i) products.emplace_back(false, true, 60 + i, 70, 256, 500 + i);
  std::vector<std::vector<float>> serial(kProducts), parallel(kProducts);
  for (int i = 0; i < kProducts; ++i) {
    Product& p = products[i];
    serial[i] = parallel[i] = p.C;
    ops::gemm(false, true, p.M, p.N, p.K, 1.0f, p.A.data(), p.lda, p.B.data(), p.ldb, 0.0f,
              serial[i].data(), p.ldc);
  }
#pragma omp parallel for num_threads(2) schedule(dynamic)
  for (int i = 0; i < kProducts; ++i) {
    const Product& p = products[i];
    ops::gemm(false, true, p.M, p.N, p.K, 1.0f, p.A.data(), p.lda, p.B.data(), p.ldb, 0.0f,
              parallel[i].data(), p.ldc);
  }
  for (int i = 0; i < kProducts; ++i) test::expect_close(parallel[i], serial[i], 1e-6f);
}

TEST(Gemm, ComputeTypeNamesAndRefusals) {
  EXPECT_EQ(ops::parse_compute_type("fp32"), ComputeType::Fp32);
  EXPECT_EQ(ops::parse_compute_type("auto"), ops::default_compute_type());
  try {
    ops::parse_compute_type("fp16");
    FAIL() << "fp16 was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'fp16'"), std::string::npos) << e.what();
  }
  if (ops::bf16_available()) {
    EXPECT_EQ(ops::default_compute_type(), ComputeType::Bf16);
    EXPECT_GT(ops::gemm_peak_gflops(ComputeType::Bf16), 0.0);
  } else {
    EXPECT_THROW(ops::set_compute_type(ComputeType::Bf16), Error);
    EXPECT_EQ(ops::compute_type(), ComputeType::Fp32);
  }
}

// Where the CPU has AMX-BF16 (as /proc/cpuinfo reports it), the process must have been granted
// the tile data (Linux asks each process to request it) and the products must run on it.
TEST(Gemm, AmxTilesAreRequestedWhereTheCpuHasThem) {
  std::ifstream cpuinfo("/proc/cpuinfo");
  const std::string text((std::istreambuf_iterator<char>(cpuinfo)), {});
  if (text.find(" amx_bf16") == std::string::npos) GTEST_SKIP() << "no AMX-BF16 on this CPU";
  REQUIRE_BF16();
  EXPECT_STREQ(ops::bf16_isa_name(), "AMX-BF16");
  Product p(false, true, 37, 45, 70, 5);
  std::vector<float> out = p.C;
  ops::gemm_bf16(false, true, p.M, p.N, p.K, 1.0f, p.A.data(), p.lda, p.B.data(), p.ldb, 0.0f,
                 out.data(), p.ldc);  // a tile instruction without the permission: SIGILL
  EXPECT_TRUE(std::isfinite(out[0]));
}

}  // namespace
}  // namespace qalora
