// Each optimized kernel against its plain reference on odd shapes (tails that are not a
// multiple of any vector width).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "qalora/ops/ops.h"
#include "test_util.h"

namespace qalora::ops {
namespace {

using test::expect_close;
using test::random_uniform;

TEST(Ops, RmsnormMatchesReference) {
  for (int64_t D : {1, 7, 33, 172}) {
    const int64_t T = 5;
    auto x = random_uniform(T * D, 1), w = random_uniform(D, 2);
    std::vector<float> a(x.size()), b(x.size());
    rmsnorm_forward(a.data(), x.data(), w.data(), T, D, 1e-5f);
    rmsnorm_forward_ref(b.data(), x.data(), w.data(), T, D, 1e-5f);
    expect_close(a, b, 1e-6f);
  }
}

TEST(Ops, MatmulMatchesReference) {
  for (auto [T, I, O] : {std::tuple<int64_t, int64_t, int64_t>{1, 13, 7},
                         {3, 172, 45},
                         {17, 33, 65},
                         {64, 100, 1}}) {
    auto x = random_uniform(T * I, 3), W = random_uniform(O * I, 4), bias = random_uniform(O, 5);
    std::vector<float> a(static_cast<size_t>(T * O)), b(a.size());
    for (const float* bp : std::vector<const float*>{nullptr, bias.data()}) {
      matmul_forward(a.data(), x.data(), W.data(), bp, T, I, O);
      matmul_forward_ref(b.data(), x.data(), W.data(), bp, T, I, O);
      expect_close(a, b, 1e-5f);
    }
  }
}

TEST(Ops, RopeMatchesReferenceAndPreservesNorm) {
  const int64_t T = 5, H = 3, Hd = 10, pos0 = 4, half = Hd / 2;
  std::vector<float> cos_t((pos0 + T) * half), sin_t(cos_t.size());
  for (size_t i = 0; i < cos_t.size(); ++i) {
    cos_t[i] = std::cos(0.3f * static_cast<float>(i));
    sin_t[i] = std::sin(0.3f * static_cast<float>(i));
  }
  auto x = random_uniform(T * H * Hd, 6);
  auto a = x, b = x;
  rope_forward(a.data(), T, H, Hd, pos0, cos_t.data(), sin_t.data());
  rope_forward_ref(b.data(), T, H, Hd, pos0, cos_t.data(), sin_t.data());
  expect_close(a, b, 1e-6f);
  for (size_t p = 0; p < x.size(); p += 2)  // a rotation keeps each pair's length
    EXPECT_NEAR(std::hypot(a[p], a[p + 1]), std::hypot(x[p], x[p + 1]), 1e-5f);
}

TEST(Ops, ExpMatchesReference) {
  std::vector<float> x;
  for (float v = -87.0f; v <= 88.0f; v += 0.0137f) x.push_back(v);
  for (float v : {0.0f, -0.0f, 1.0f, -1.0f, 0.34657359f, -0.34657359f, 88.0f, -87.0f})
    x.push_back(v);
  std::vector<float> a(x.size()), b(x.size());
  exp_forward(a.data(), x.data(), static_cast<int64_t>(x.size()));
  exp_forward_ref(b.data(), x.data(), static_cast<int64_t>(x.size()));
  for (size_t i = 0; i < x.size(); ++i)
    ASSERT_NEAR(a[i], b[i], 3e-7f * b[i]) << "exp(" << x[i] << ")";
  // Outside the range: clamped, finite; NaN propagates.
  const float edge[] = {-200.0f, -88.0f, 89.0f, 1e30f, std::numeric_limits<float>::quiet_NaN()};
  float y[5];
  exp_forward(y, edge, 5);
  EXPECT_LE(y[0], 2e-38f);
  EXPECT_GT(y[0], 0.0f);
  EXPECT_LE(y[1], 2e-38f);
  EXPECT_GT(y[2], 1e38f);
  EXPECT_TRUE(std::isfinite(y[3]));
  EXPECT_TRUE(std::isnan(y[4]));
}

TEST(Ops, SwigluMatchesReference) {
  auto g = random_uniform(1001, 7, -6.0f, 6.0f), u = random_uniform(1001, 8);
  std::vector<float> a(g.size()), b(g.size());
  swiglu_forward(a.data(), g.data(), u.data(), 1001);
  swiglu_forward_ref(b.data(), g.data(), u.data(), 1001);
  expect_close(a, b, 1e-6f);
}

TEST(Ops, AttentionMatchesReference) {
  // Prefill (T > 1, BLAS path) and decode (T == 1) with GQA ratios 1, 2, 3; decode over one
  // position, and over enough (Hd 64, 150 positions) that the threads split the positions.
  struct Case {
    int64_t T, pos0, Hd;
  };
  for (auto [H, KV] : {std::pair<int64_t, int64_t>{4, 4}, {4, 2}, {6, 2}}) {
    for (const Case c : {Case{7, 0, 8}, Case{5, 3, 8}, Case{1, 9, 8}, Case{1, 0, 8},
                         Case{1, 150, 64}, Case{3, 150, 64}}) {
      SCOPED_TRACE(testing::Message() << "H " << H << " KV " << KV << " T " << c.T << " pos0 "
                                      << c.pos0 << " Hd " << c.Hd);
      const int64_t stride = c.pos0 + c.T + 3, P = c.pos0 + c.T;
      // The caches filled as the runtime fills them: position by position.
      const auto keys = random_uniform(P * KV * c.Hd, 10),
                 values = random_uniform(P * KV * c.Hd, 11);
      std::vector<float> k(static_cast<size_t>(KV * stride * c.Hd), NAN), v(k);
      for (int64_t p = 0; p < P; ++p)
        kv_cache_store(k.data(), v.data(), keys.data() + p * KV * c.Hd,
                       values.data() + p * KV * c.Hd, 1, p, KV, c.Hd, stride);
      for (int64_t h = 0; h < KV; ++h)  // the layout: keys transposed, values by position
        for (int64_t p = 0; p < P; ++p)
          for (int64_t i = 0; i < c.Hd; ++i) {
            ASSERT_EQ(k[(h * c.Hd + i) * stride + p], keys[(p * KV + h) * c.Hd + i]);
            ASSERT_EQ(v[(h * stride + p) * c.Hd + i], values[(p * KV + h) * c.Hd + i]);
          }
      const auto q = random_uniform(c.T * H * c.Hd, 9);
      std::vector<float> a(q.size()), b(q.size());
      attention_forward(a.data(), q.data(), k.data(), v.data(), c.T, c.pos0, H, KV, c.Hd, stride);
      attention_forward_ref(b.data(), q.data(), k.data(), v.data(), c.T, c.pos0, H, KV, c.Hd,
                            stride);
      expect_close(a, b, 1e-5f);
    }
  }
}

}  // namespace
}  // namespace qalora::ops
