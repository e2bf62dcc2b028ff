// The adapter ops of lora.h: group pooling and its adjoint, the dropout mask, and the LoRA /
// QA-LoRA forward and backward, each against its plain reference on odd shapes and the
// backward against finite differences of a double-precision forward written here.
#include <gtest/gtest.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "qalora/adapters/lora.h"
#include "qalora/core/error.h"
#include "qalora/ops/gemm.h"
#include "test_util.h"

namespace qalora {
namespace {

using test::expect_close;
using test::random_uniform;

size_t sz(int64_t n) {
  return static_cast<size_t>(n);
}

int64_t groups(int64_t I, int64_t G) {
  return (I + G - 1) / G;
}

// I = 172 with G = 32 leaves a last group of 12; G = I is per channel; G = 1 is no pooling.
const std::vector<std::tuple<int64_t, int64_t>> kPoolShapes = {{172, 32}, {172, 172}, {172, 1},
                                                               {7, 3},    {33, 32},   {31, 64}};

TEST(LoraPool, MatchesReferenceOnOddShapes) {
  for (auto [I, G] : kPoolShapes) {
    // T = 300 crosses the threshold where the rows are split across threads.
    for (int64_t T : {1, 5, 300}) {
      for (AdapterPool pool : {AdapterPool::Average, AdapterPool::Sum}) {
        SCOPED_TRACE(testing::Message()
                     << "T " << T << " I " << I << " G " << G << " " << adapter_pool_name(pool));
        const int64_t L = groups(I, G);
        const auto x = random_uniform(T * I, 1), dout = random_uniform(T * L, 2);
        std::vector<float> a(sz(T * L)), b(a.size());
        pool_groups_forward(a.data(), x.data(), T, I, G, pool);
        pool_groups_forward_ref(b.data(), x.data(), T, I, G, pool);
        expect_close(a, b, 1e-5f);
        auto da = random_uniform(T * I, 3), db = da;  // the backward accumulates
        pool_groups_backward(da.data(), dout.data(), T, I, G, pool);
        pool_groups_backward_ref(db.data(), dout.data(), T, I, G, pool);
        expect_close(da, db, 1e-6f);
      }
    }
  }
}

TEST(LoraPool, AveragesTheRaggedGroupOverItsTrueSize) {
  const int64_t I = 172, G = 32, L = 6;
  std::vector<float> x(sz(I)), out(sz(L));
  for (int64_t i = 0; i < I; ++i) x[sz(i)] = static_cast<float>(i);
  pool_groups_forward(out.data(), x.data(), 1, I, G, AdapterPool::Average);
  EXPECT_FLOAT_EQ(out[0], 15.5f);   // mean of 0..31
  EXPECT_FLOAT_EQ(out[5], 165.5f);  // mean of 160..171: 12 columns, not 32
  pool_groups_forward(out.data(), x.data(), 1, I, G, AdapterPool::Sum);
  EXPECT_FLOAT_EQ(out[5], 1986.0f);  // 12 * 165.5
  std::vector<float> dx(sz(I), 0.0f), dout(sz(L), 0.0f);
  dout[5] = 6.0f;
  pool_groups_backward(dx.data(), dout.data(), 1, I, G, AdapterPool::Average);
  EXPECT_FLOAT_EQ(dx[159], 0.0f);
  EXPECT_FLOAT_EQ(dx[160], 0.5f);  // 6 / 12
  EXPECT_FLOAT_EQ(dx[171], 0.5f);
}

TEST(LoraPool, BackwardIsTheAdjoint) {
  const int64_t T = 4;
  for (auto [I, G] : kPoolShapes) {
    for (AdapterPool pool : {AdapterPool::Average, AdapterPool::Sum}) {
      const int64_t L = groups(I, G);
      const auto x = random_uniform(T * I, 4), y = random_uniform(T * L, 5);
      std::vector<float> px(sz(T * L)), pty(sz(T * I), 0.0f);
      pool_groups_forward(px.data(), x.data(), T, I, G, pool);
      pool_groups_backward(pty.data(), y.data(), T, I, G, pool);
      double lhs = 0.0, rhs = 0.0, mag = 0.0;
      for (size_t i = 0; i < px.size(); ++i) lhs += static_cast<double>(px[i]) * y[i];
      for (size_t i = 0; i < pty.size(); ++i) {
        rhs += static_cast<double>(x[i]) * pty[i];
        mag += std::abs(static_cast<double>(x[i]) * pty[i]);
      }
      EXPECT_NEAR(lhs, rhs, 1e-6 * mag) << "I " << I << " G " << G;
    }
  }
}

TEST(LoraDropout, MaskIsDeterministicWithTheExpectedRate) {
  const int64_t T = 1000, C = 1000;
  const float p = 0.3f;
  std::vector<float> a(sz(T * C), 1.0f), b = a, other = a;
  dropout_forward(a.data(), T, C, p, 42);
  dropout_forward(b.data(), T, C, p, 42);
  dropout_forward(other.data(), T, C, p, 43);
  EXPECT_EQ(a, b);
  int64_t kept = 0, same = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_TRUE(a[i] == 0.0f || a[i] == 1.0f / (1.0f - p)) << a[i];
    kept += a[i] != 0.0f;
    same += a[i] == other[i];
  }
  // n = 1e6: the kept fraction's standard deviation is 4.6e-4.
  EXPECT_NEAR(static_cast<double>(kept) / static_cast<double>(T * C), 1.0 - p, 3e-3);
  // Independent masks agree with probability p^2 + (1 - p)^2 = 0.58.
  EXPECT_NEAR(static_cast<double>(same) / static_cast<double>(T * C), 0.58, 3e-3);
}

// Widths around the 4-element hash groups and the 64-group chunks the optimized loop draws at
// a time, and a size that splits across threads.
TEST(LoraDropout, MatchesReferenceOnOddWidths) {
  for (const auto& [T, C] : {std::pair<int64_t, int64_t>{7, 1},
                             {7, 3},
                             {7, 4},
                             {7, 5},
                             {7, 37},
                             {7, 255},
                             {7, 256},
                             {7, 257},
                             {3, 1001},
                             {100, 999}}) {
    const auto x = random_uniform(T * C, 9);
    auto fast = x, ref = x;
    dropout_forward(fast.data(), T, C, 0.3f, 77);
    dropout_forward_ref(ref.data(), T, C, 0.3f, 77);
    ASSERT_EQ(fast, ref) << "T " << T << " C " << C;
  }
}

TEST(LoraDropout, MaskDependsOnlyOnSeedTokenAndColumn) {
  const int64_t T = 9, C = 37;
  const auto x = random_uniform(T * C, 6);
  auto full = x, head = x;
  dropout_forward(full.data(), T, C, 0.5f, 7);
  dropout_forward(head.data(), 4, C, 0.5f, 7);  // fewer tokens: the same mask on those rows
  for (size_t i = 0; i < sz(4 * C); ++i) ASSERT_EQ(full[i], head[i]) << i;
  // Values do not move the mask: ones and x drop the same elements.
  std::vector<float> ones(sz(T * C), 1.0f);
  dropout_forward(ones.data(), T, C, 0.5f, 7);
  for (size_t i = 0; i < full.size(); ++i) ASSERT_EQ(full[i], x[i] * ones[i]) << i;
}

TEST(LoraDropout, ZeroIsANoOpAndBadRatesAreRefused) {
  const auto x = random_uniform(50, 8);
  auto y = x;
  dropout_forward(y.data(), 5, 10, 0.0f, 9);
  EXPECT_EQ(x, y);
  EXPECT_THROW(dropout_forward(y.data(), 5, 10, 1.0f, 9), Error);
  EXPECT_THROW(dropout_forward(y.data(), 5, 10, -0.1f, 9), Error);
}

struct LoraShape {
  int64_t T, I, O, r, G;  // G = 0: plain LoRA
  AdapterPool pool = AdapterPool::Average;
};

// An adapter with random A and B (B is zero only at init) and random gradients to add to.
LoraAdapter random_adapter(const LoraShape& s, uint64_t seed) {
  LoraAdapter a;
  a.layer = 1;
  a.target = Target::Up;
  a.in = s.I;
  a.out = s.O;
  a.group_size = s.G;
  a.n_groups = s.G > 0 ? groups(s.I, s.G) : 0;
  a.pool = s.pool;
  const int64_t C = s.G > 0 ? a.n_groups : s.I;
  a.A = Tensor::zeros({s.r, C});
  a.B = Tensor::zeros({s.O, s.r});
  const auto A = random_uniform(s.r * C, seed), B = random_uniform(s.O * s.r, seed + 1);
  std::copy(A.begin(), A.end(), a.A.mutable_data());
  std::copy(B.begin(), B.end(), a.B.mutable_data());
  a.grad_A = random_uniform(s.r * C, seed + 2);
  a.grad_B = random_uniform(s.O * s.r, seed + 3);
  return a;
}

const std::vector<LoraShape> kShapes = {
    {5, 172, 45, 3, 0}, {5, 172, 45, 3, 32}, {5, 172, 45, 3, 32, AdapterPool::Sum},
    {1, 33, 7, 1, 32},  {17, 100, 65, 8, 1}, {13, 172, 30, 16, 172, AdapterPool::Sum},
    {40, 37, 11, 5, 0},
};

TEST(LoraOps, ForwardBackwardMatchReferenceOnOddShapes) {
  for (const LoraShape& s : kShapes) {
    for (float p : {0.0f, 0.3f}) {
      SCOPED_TRACE(testing::Message()
                   << "T " << s.T << " I " << s.I << " O " << s.O << " r " << s.r << " G " << s.G
                   << " " << adapter_pool_name(s.pool) << " p " << p);
      LoraAdapter a = random_adapter(s, 10), b = random_adapter(s, 10);
      const float scale = 0.7f;
      const uint64_t seed = 11;
      const auto x = random_uniform(s.T * s.I, 12), dy = random_uniform(s.T * s.O, 13);
      auto ya = random_uniform(s.T * s.O, 14), yb = ya;  // the forward adds to y
      std::vector<float> ua(sz(s.T * s.r)), ub(ua.size());
      std::vector<float> scratch(sz(lora_scratch_floats(a, s.T)));
      lora_forward(a, scale, x.data(), s.T, AdapterDropout::single(p, seed, s.T), ya.data(),
                   ua.data(), scratch.data());
      lora_forward_ref(b, scale, x.data(), s.T, AdapterDropout::single(p, seed, s.T), yb.data(),
                       ub.data(), scratch.data());
      expect_close(ua, ub, 1e-5f);
      expect_close(ya, yb, 1e-5f);
      auto dxa = random_uniform(s.T * s.I, 15), dxb = dxa;  // the backward adds to dx
      lora_backward(a, scale, dy.data(), x.data(), ua.data(), s.T,
                    AdapterDropout::single(p, seed, s.T), dxa.data(), scratch.data());
      lora_backward_ref(b, scale, dy.data(), x.data(), ua.data(), s.T,
                        AdapterDropout::single(p, seed, s.T), dxb.data(), scratch.data());
      expect_close(a.grad_A, b.grad_A, 1e-5f);
      expect_close(a.grad_B, b.grad_B, 1e-5f);
      expect_close(dxa, dxb, 1e-5f);
    }
  }
}

// In bf16, LoRA's masked input goes from x to bf16 in one pass, each row rounded while in cache,
// and the backward masks and adds g A a row at a time. The same operations done in separate
// passes (the mask applied to a copy of x, then an adapter without dropout on that copy; the
// mask applied to that adapter's input gradient) must give the same bits. Two runs (packed
// sequences) with their own seeds; I = 300 leaves a tail after the 16-wide conversion.
TEST(LoraOps, Bf16MaskedInputInOnePassEqualsSeparatePasses) {
  if (!ops::bf16_available()) GTEST_SKIP() << "no bf16 matrix path on this CPU or build";
  test::ComputeTypeScope bf16(ops::ComputeType::Bf16);
  const LoraShape s{70, 300, 90, 64, 0};
  ASSERT_TRUE(ops::use_bf16(s.T, s.r, s.I));
  const AdapterDropout dropout{0.3f, {{33, 5}, {37, 6}}};
  LoraAdapter a = random_adapter(s, 20), b = random_adapter(s, 20);
  const float scale = 0.7f;
  const auto x = random_uniform(s.T * s.I, 21), dy = random_uniform(s.T * s.O, 22);
  auto masked_x = x;
  dropout_forward(masked_x.data(), s.T, s.I, dropout);
  auto ya = random_uniform(s.T * s.O, 23), yb = ya;
  std::vector<float> ua(sz(s.T * s.r)), ub(ua.size()), scratch(sz(lora_scratch_floats(a, s.T)));
  lora_forward(a, scale, x.data(), s.T, dropout, ya.data(), ua.data(), scratch.data());
  lora_forward(b, scale, masked_x.data(), s.T, {}, yb.data(), ub.data(), scratch.data());
  EXPECT_EQ(ua, ub);
  EXPECT_EQ(ya, yb);

  auto dxa = random_uniform(s.T * s.I, 24);
  const auto dx0 = dxa;
  std::vector<float> g_a(dxa.size(), 0.0f);  // b's input gradient alone: g A
  lora_backward(a, scale, dy.data(), x.data(), ua.data(), s.T, dropout, dxa.data(), scratch.data());
  lora_backward(b, scale, dy.data(), masked_x.data(), ub.data(), s.T, {}, g_a.data(),
                scratch.data());
  EXPECT_EQ(a.grad_A, b.grad_A);
  EXPECT_EQ(a.grad_B, b.grad_B);
  dropout_forward(g_a.data(), s.T, s.I, dropout);
  for (size_t i = 0; i < dxa.size(); ++i) ASSERT_EQ(dxa[i], dx0[i] + g_a[i]) << "dx at " << i;
}

// loss = sum(dy * y) with y = scale * B A mask(P(x)), in double. `mask` [T, C] holds the
// dropout factors (0 or 1 / (1 - p)).
double loss_double(const LoraShape& s, double scale, const std::vector<double>& A,
                   const std::vector<double>& B, const std::vector<double>& x,
                   const std::vector<double>& mask, const std::vector<double>& dy,
                   std::vector<double>* y_out = nullptr) {
  const int64_t C = s.G > 0 ? groups(s.I, s.G) : s.I;
  double loss = 0.0;
  for (int64_t t = 0; t < s.T; ++t) {
    std::vector<double> xin(sz(C), 0.0), u(sz(s.r), 0.0);
    for (int64_t i = 0; i < s.I; ++i) {
      const int64_t c = s.G > 0 ? i / s.G : i;
      const double len = s.G > 0 ? static_cast<double>(std::min(s.G, s.I - c * s.G)) : 1.0;
      xin[sz(c)] += x[sz(t * s.I + i)] / (s.pool == AdapterPool::Average ? len : 1.0);
    }
    for (int64_t c = 0; c < C; ++c) xin[sz(c)] *= mask[sz(t * C + c)];
    for (int64_t k = 0; k < s.r; ++k)
      for (int64_t c = 0; c < C; ++c) u[sz(k)] += A[sz(k * C + c)] * xin[sz(c)];
    for (int64_t o = 0; o < s.O; ++o) {
      double y = 0.0;
      for (int64_t k = 0; k < s.r; ++k) y += scale * B[sz(o * s.r + k)] * u[sz(k)];
      loss += dy[sz(t * s.O + o)] * y;
      if (y_out != nullptr) (*y_out)[sz(t * s.O + o)] = y;
    }
  }
  return loss;
}

std::vector<double> to_double(const float* v, int64_t n) {
  return {v, v + n};
}

TEST(LoraOps, GradientsMatchFiniteDifferences) {
  // QA-LoRA with G = 8 on I = 37 leaves a last group of 5.
  for (const LoraShape& s : {LoraShape{3, 37, 6, 3, 0}, LoraShape{3, 37, 6, 3, 8},
                             LoraShape{3, 37, 6, 3, 8, AdapterPool::Sum}}) {
    for (float p : {0.0f, 0.4f}) {
      SCOPED_TRACE(testing::Message()
                   << "G " << s.G << " " << adapter_pool_name(s.pool) << " p " << p);
      LoraAdapter a = random_adapter(s, 20);
      const int64_t C = a.a_cols();
      std::fill(a.grad_A.begin(), a.grad_A.end(), 0.0f);
      std::fill(a.grad_B.begin(), a.grad_B.end(), 0.0f);
      const float scale = 1.3f;
      const uint64_t seed = 21;
      const auto x = random_uniform(s.T * s.I, 22), dy = random_uniform(s.T * s.O, 23);
      std::vector<float> y(sz(s.T * s.O), 0.0f), u(sz(s.T * s.r)), dx(sz(s.T * s.I), 0.0f);
      std::vector<float> scratch(sz(lora_scratch_floats(a, s.T)));
      lora_forward(a, scale, x.data(), s.T, AdapterDropout::single(p, seed, s.T), y.data(),
                   u.data(), scratch.data());
      lora_backward(a, scale, dy.data(), x.data(), u.data(), s.T,
                    AdapterDropout::single(p, seed, s.T), dx.data(), scratch.data());

      std::vector<float> mask_f(sz(s.T * C), 1.0f);
      dropout_forward(mask_f.data(), s.T, C, p, seed);
      const auto mask = to_double(mask_f.data(), s.T * C);
      auto A = to_double(a.A.data(), a.A.numel()), B = to_double(a.B.data(), a.B.numel());
      auto xd = to_double(x.data(), s.T * s.I);
      const auto dyd = to_double(dy.data(), s.T * s.O);
      std::vector<double> yd(y.size());
      loss_double(s, scale, A, B, xd, mask, dyd, &yd);
      for (size_t i = 0; i < y.size(); ++i) ASSERT_NEAR(y[i], yd[i], 1e-5 * (1 + std::abs(yd[i])));

      // The loss is linear in each of A, B, x, so central differences are exact up to rounding.
      const double h = 1e-3;
      const auto check = [&](std::vector<double>& v, const std::vector<float>& grad,
                             const char* name) {
        for (size_t i = 0; i < v.size(); ++i) {
          const double v0 = v[i];
          v[i] = v0 + h;
          const double up = loss_double(s, scale, A, B, xd, mask, dyd);
          v[i] = v0 - h;
          const double down = loss_double(s, scale, A, B, xd, mask, dyd);
          v[i] = v0;
          const double numeric = (up - down) / (2 * h);
          ASSERT_NEAR(grad[i], numeric, 1e-4 * (1 + std::abs(numeric))) << name << "[" << i << "]";
        }
      };
      check(A, a.grad_A, "grad_A");
      check(B, a.grad_B, "grad_B");
      check(xd, dx, "dx");
    }
  }
}

TEST(LoraOps, BackwardRequiresAllocatedGradients) {
  const LoraShape s{2, 8, 4, 2, 0};
  LoraAdapter a = random_adapter(s, 30);
  a.grad_A.clear();
  std::vector<float> x(16), dy(8), u(4), dx(16), scratch(20);
  try {
    lora_backward(a, 1.0f, dy.data(), x.data(), u.data(), s.T, {}, dx.data(), scratch.data());
    FAIL() << "expected an Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layer 1 up_proj: gradients expected 16 + 8 floats"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace qalora
