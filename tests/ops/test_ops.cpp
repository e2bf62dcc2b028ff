// Each optimized kernel against its plain reference on odd shapes (tails that are not a
// multiple of any vector width).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <tuple>
#include <vector>

#include "qalora/core/error.h"
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

TEST(Ops, RopeAtPositionsMatchesReferenceAndTheContiguousForm) {
  const int64_t T = 7, H = 3, Hd = 10, half = Hd / 2, positions_max = 12;
  std::vector<float> cos_t(positions_max * half), sin_t(cos_t.size());
  for (size_t i = 0; i < cos_t.size(); ++i) {
    cos_t[i] = std::cos(0.3f * static_cast<float>(i));
    sin_t[i] = std::sin(0.3f * static_cast<float>(i));
  }
  // Two packed sequences: positions restart, as a batch of several sequences has them.
  const std::vector<int64_t> positions = {5, 6, 7, 8, 5, 6, 11};
  const auto x = random_uniform(T * H * Hd, 7);
  auto a = x, b = x;
  rope_forward_at(a.data(), T, H, Hd, positions.data(), cos_t.data(), sin_t.data());
  rope_forward_at_ref(b.data(), T, H, Hd, positions.data(), cos_t.data(), sin_t.data());
  expect_close(a, b, 1e-6f);
  // Tokens 0..3 at positions 5..8 are what rope_forward does from pos0 = 5.
  auto c = x;
  rope_forward(c.data(), 4, H, Hd, 5, cos_t.data(), sin_t.data());
  for (int64_t i = 0; i < 4 * H * Hd; ++i) EXPECT_EQ(a[i], c[i]) << i;
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

// Packed sequences: each query sees a prefix, a context range and its own range only; the
// optimized kernel against the reference, and against causal attention over the same keys laid
// out contiguously (what the query would see alone).
TEST(Ops, AttentionWithVisibleRangesMatchesReferenceAndTheSequenceAlone) {
  for (auto [H, KV, Hd] : {std::tuple<int64_t, int64_t, int64_t>{4, 2, 8}, {6, 2, 64}, {3, 3, 5}}) {
    SCOPED_TRACE(testing::Message() << "H " << H << " KV " << KV << " Hd " << Hd);
    // Slots: prefix 0..2, then the batch from pos0 = 3: context A 3..6, A's continuation 7..8,
    // context B 9..10, B's continuation 11..13.
    const int64_t pos0 = 3, T = 11, P = pos0 + T, stride = P + 5;
    std::vector<VisibleKeys> visible;
    for (int64_t slot = pos0; slot < P; ++slot) {
      if (slot <= 6)
        visible.push_back({3, 3, 3, 3});
      else if (slot <= 8)
        visible.push_back({3, 3, 7, 7});
      else if (slot <= 10)
        visible.push_back({3, 3, 3, 9});
      else
        visible.push_back({3, 9, 11, 11});
    }
    const auto keys = random_uniform(P * KV * Hd, 21), values = random_uniform(P * KV * Hd, 22);
    std::vector<float> k(static_cast<size_t>(KV * stride * Hd), NAN), v(k);
    kv_cache_store(k.data(), v.data(), keys.data(), values.data(), P, 0, KV, Hd, stride);
    const auto q = random_uniform(T * H * Hd, 23);
    std::vector<float> a(q.size()), b(q.size());
    attention_forward(a.data(), q.data(), k.data(), v.data(), T, pos0, H, KV, Hd, stride, visible);
    attention_forward_ref(b.data(), q.data(), k.data(), v.data(), T, pos0, H, KV, Hd, stride,
                          visible);
    expect_close(a, b, 1e-5f);

    // B's continuation (slots 11..13) alone: prefix 0..2, context 9..10, itself, contiguous.
    const std::vector<int64_t> alone_slots = {0, 1, 2, 9, 10, 11, 12, 13};
    const auto n = static_cast<int64_t>(alone_slots.size());
    std::vector<float> ka(static_cast<size_t>(KV * n * Hd)), va(ka);
    std::vector<float> keys_alone, values_alone;
    for (int64_t s : alone_slots) {
      keys_alone.insert(keys_alone.end(), keys.begin() + s * KV * Hd,
                        keys.begin() + (s + 1) * KV * Hd);
      values_alone.insert(values_alone.end(), values.begin() + s * KV * Hd,
                          values.begin() + (s + 1) * KV * Hd);
    }
    kv_cache_store(ka.data(), va.data(), keys_alone.data(), values_alone.data(), n, 0, KV, Hd, n);
    std::vector<float> alone(static_cast<size_t>(3 * H * Hd));
    attention_forward_ref(alone.data(), q.data() + 8 * H * Hd, ka.data(), va.data(), 3, 5, H, KV,
                          Hd, n);
    expect_close(std::vector<float>(a.begin() + 8 * H * Hd, a.end()), alone, 1e-5f);
  }
}

TEST(Ops, AttentionRefusesRangesThatAreNotAscending) {
  const int64_t H = 2, KV = 1, Hd = 4, T = 2, pos0 = 2, stride = 8;
  std::vector<float> k(static_cast<size_t>(KV * stride * Hd), 0.5f), v(k), q(T * H * Hd, 0.1f),
      out(q.size());
  const std::vector<VisibleKeys> overlapping = {{2, 1, 2, 2}, {2, 2, 2, 2}};
  EXPECT_THROW(attention_forward(out.data(), q.data(), k.data(), v.data(), T, pos0, H, KV, Hd,
                                 stride, overlapping),
               Error);
}

}  // namespace
}  // namespace qalora::ops
