// The training kernels: each optimized kernel against its plain reference on odd shapes, and
// every backward (both versions) against central differences of a double-precision forward
// written here, with the scalar loss L = sum(dout * forward(x)).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "qalora/core/error.h"
#include "qalora/core/fp16.h"
#include "qalora/ops/gemm.h"
#include "qalora/ops/ops.h"
#include "test_util.h"

namespace qalora::ops {
namespace {

using test::expect_close;
using test::random_uniform;
using Vec = std::vector<double>;

Vec to_double(const std::vector<float>& x) {
  return Vec(x.begin(), x.end());
}

double dot(const std::vector<float>& a, const Vec& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

// dL/dx by central differences, element by element.
Vec numeric_gradient(const std::function<double(const Vec&)>& L, const std::vector<float>& x0) {
  constexpr double h = 1e-4;  // O(h^2) = 1e-8 truncation, far below the float kernels' error
  Vec x = to_double(x0), g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double xi = x[i];
    x[i] = xi + h;
    const double up = L(x);
    x[i] = xi - h;
    const double down = L(x);
    x[i] = xi;
    g[i] = (up - down) / (2.0 * h);
  }
  return g;
}

// Tight enough that a wrong factor or sign in any element fails; the gradient must not be
// near zero everywhere, or the comparison would prove nothing.
void expect_gradient(const std::vector<float>& analytic, const Vec& numeric,
                     const std::string& what) {
  ASSERT_EQ(analytic.size(), numeric.size()) << what;
  double largest = 0.0;
  for (size_t i = 0; i < numeric.size(); ++i) {
    largest = std::max(largest, std::abs(numeric[i]));
    ASSERT_NEAR(analytic[i], numeric[i], 1e-4 + 1e-3 * std::abs(numeric[i]))
        << what << " index " << i;
  }
  EXPECT_GT(largest, 1e-2) << what << ": gradient too small to check";
}

// ---- Double-precision forwards, written independently of the kernels.

Vec rmsnorm_d(const Vec& x, const Vec& w, int64_t T, int64_t D, double eps) {
  Vec out(x.size());
  for (int64_t t = 0; t < T; ++t) {
    double ss = 0.0;
    for (int64_t i = 0; i < D; ++i) ss += x[t * D + i] * x[t * D + i];
    const double r = 1.0 / std::sqrt(ss / static_cast<double>(D) + eps);
    for (int64_t i = 0; i < D; ++i) out[t * D + i] = x[t * D + i] * r * w[i];
  }
  return out;
}

Vec matmul_d(const Vec& x, const Vec& W, int64_t T, int64_t I, int64_t O) {
  Vec y(static_cast<size_t>(T * O), 0.0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t o = 0; o < O; ++o)
      for (int64_t i = 0; i < I; ++i) y[t * O + o] += x[t * I + i] * W[o * I + i];
  return y;
}

// Angles of position p, pair i: theta = 0.3 (p + 1) + 0.7 i, so that every pair and position
// rotates differently.
struct RopeTables {
  std::vector<float> cos_t, sin_t;
  RopeTables(int64_t positions, int64_t half)
      : cos_t(static_cast<size_t>(positions * half)), sin_t(cos_t.size()) {
    for (int64_t p = 0; p < positions; ++p)
      for (int64_t i = 0; i < half; ++i) {
        const double theta = 0.3 * static_cast<double>(p + 1) + 0.7 * static_cast<double>(i);
        cos_t[p * half + i] = static_cast<float>(std::cos(theta));
        sin_t[p * half + i] = static_cast<float>(std::sin(theta));
      }
  }
};

Vec rope_d(Vec x, int64_t T, int64_t H, int64_t Hd, int64_t pos0, const RopeTables& tab) {
  const int64_t half = Hd / 2;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < half; ++i) {
        double* v = &x[(t * H + h) * Hd + 2 * i];
        const double c = tab.cos_t[(pos0 + t) * half + i], s = tab.sin_t[(pos0 + t) * half + i];
        const double a = v[0], b = v[1];
        v[0] = a * c - b * s;
        v[1] = a * s + b * c;
      }
  return x;
}

Vec attention_d(const Vec& q, const Vec& k, const Vec& v, int64_t T, int64_t H, int64_t KV,
                int64_t Hd) {
  Vec out(q.size(), 0.0);
  const double scale = 1.0 / std::sqrt(static_cast<double>(Hd));
  for (int64_t h = 0; h < H; ++h) {
    const int64_t g = h / (H / KV);
    for (int64_t i = 0; i < T; ++i) {
      Vec s(static_cast<size_t>(i + 1));
      for (int64_t j = 0; j <= i; ++j) {
        for (int64_t d = 0; d < Hd; ++d) s[j] += q[(i * H + h) * Hd + d] * k[(j * KV + g) * Hd + d];
        s[j] *= scale;
      }
      const double mx = *std::max_element(s.begin(), s.end());
      double sum = 0.0;
      for (double& e : s) sum += (e = std::exp(e - mx));
      for (int64_t j = 0; j <= i; ++j)
        for (int64_t d = 0; d < Hd; ++d)
          out[(i * H + h) * Hd + d] += s[j] / sum * v[(j * KV + g) * Hd + d];
    }
  }
  return out;
}

Vec swiglu_d(const Vec& gate, const Vec& up) {
  Vec out(gate.size());
  for (size_t i = 0; i < gate.size(); ++i) out[i] = gate[i] / (1.0 + std::exp(-gate[i])) * up[i];
  return out;
}

// Sum over the non-ignored tokens of -log softmax(logits)[target].
double cross_entropy_d(const Vec& logits, const std::vector<int32_t>& targets, int64_t V) {
  double total = 0.0;
  for (size_t t = 0; t < targets.size(); ++t) {
    if (targets[t] < 0) continue;
    const double* l = &logits[t * V];
    double sum = 0.0;
    for (int64_t j = 0; j < V; ++j) sum += std::exp(l[j]);
    total += std::log(sum) - l[targets[t]];
  }
  return total;
}

// ---- Optimized against reference on odd shapes.

TEST(OpsBackward, RmsnormMatchesReference) {
  for (int64_t T : {1, 5, 17})
    for (int64_t D : {7, 33, 172}) {
      const auto x = random_uniform(T * D, 1), w = random_uniform(D, 2),
                 dy = random_uniform(T * D, 3), base = random_uniform(T * D, 4);
      auto a = base, b = base;  // accumulates into dx
      rmsnorm_backward(a.data(), dy.data(), x.data(), w.data(), T, D, 1e-5f);
      rmsnorm_backward_ref(b.data(), dy.data(), x.data(), w.data(), T, D, 1e-5f);
      expect_close(a, b, 1e-5f, "T " + std::to_string(T) + " D " + std::to_string(D));
    }
}

TEST(OpsBackward, MatmulInputMatchesReference) {
  for (auto [T, I, O] :
       {std::tuple<int64_t, int64_t, int64_t>{1, 13, 7}, {5, 172, 33}, {17, 33, 101}}) {
    const auto dy = random_uniform(T * O, 5), W = random_uniform(O * I, 6);
    std::vector<float> a(static_cast<size_t>(T * I), NAN), b(a.size());  // overwritten
    matmul_backward_input(a.data(), dy.data(), W.data(), T, I, O);
    matmul_backward_input_ref(b.data(), dy.data(), W.data(), T, I, O);
    expect_close(a, b, 1e-5f, "T " + std::to_string(T) + " I " + std::to_string(I));
    matmul_backward_input(a.data(), dy.data(), W.data(), T, I, O, true);  // a = 2 b
    for (float& v : b) v *= 2.0f;
    expect_close(a, b, 2e-5f, "accumulating, T " + std::to_string(T) + " I " + std::to_string(I));
  }
}

TEST(OpsBackward, RopeMatchesReferenceAndUndoesForward) {
  for (int64_t Hd : {6, 10}) {
    const int64_t T = 17, H = 3, pos0 = 4;
    const RopeTables tab(pos0 + T, Hd / 2);
    const auto x = random_uniform(T * H * Hd, 7);
    auto a = x, b = x;
    rope_backward(a.data(), T, H, Hd, pos0, tab.cos_t.data(), tab.sin_t.data());
    rope_backward_ref(b.data(), T, H, Hd, pos0, tab.cos_t.data(), tab.sin_t.data());
    expect_close(a, b, 1e-6f, "Hd " + std::to_string(Hd));
    // A rotation's adjoint is its inverse.
    rope_forward(a.data(), T, H, Hd, pos0, tab.cos_t.data(), tab.sin_t.data());
    expect_close(a, x, 1e-6f, "round trip Hd " + std::to_string(Hd));
  }
}

TEST(OpsBackward, AttentionMatchesReference) {
  // T 300 spans three row blocks (a partial last one).
  for (auto [H, KV] : {std::pair<int64_t, int64_t>{4, 2}, {3, 1}, {2, 2}})
    for (int64_t Hd : {6, 10})
      for (int64_t T : {1, 5, 17, 300}) {
        const std::string what = "H " + std::to_string(H) + " KV " + std::to_string(KV) + " Hd " +
                                 std::to_string(Hd) + " T " + std::to_string(T);
        const auto q = random_uniform(T * H * Hd, 8, -2.0f, 2.0f),
                   k = random_uniform(T * KV * Hd, 9, -2.0f, 2.0f),
                   v = random_uniform(T * KV * Hd, 10), dout = random_uniform(T * H * Hd, 11);
        std::vector<float> out_a(q.size()), out_b(q.size());
        std::vector<float> probs_a(static_cast<size_t>(H * T * T), NAN), probs_b(probs_a.size());
        attention_train_forward(out_a.data(), probs_a.data(), q.data(), k.data(), v.data(), T, H,
                                KV, Hd);
        attention_train_forward_ref(out_b.data(), probs_b.data(), q.data(), k.data(), v.data(), T,
                                    H, KV, Hd);
        expect_close(out_a, out_b, 1e-5f, "out " + what);
        expect_close(probs_a, probs_b, 1e-5f, "probs " + what);

        std::vector<float> dq_a(q.size(), NAN), dk_a(k.size(), NAN), dv_a(v.size(), NAN);
        std::vector<float> dq_b(q.size()), dk_b(k.size()), dv_b(v.size());
        std::vector<float> scratch(static_cast<size_t>(attention_backward_scratch(T, H)), NAN);
        attention_train_backward(dq_a.data(), dk_a.data(), dv_a.data(), dout.data(), probs_a.data(),
                                 q.data(), k.data(), v.data(), T, H, KV, Hd, scratch.data());
        attention_train_backward_ref(dq_b.data(), dk_b.data(), dv_b.data(), dout.data(),
                                     probs_b.data(), q.data(), k.data(), v.data(), T, H, KV, Hd,
                                     nullptr);
        expect_close(dq_a, dq_b, 2e-5f, "dq " + what);
        expect_close(dk_a, dk_b, 2e-5f, "dk " + what);
        expect_close(dv_a, dv_b, 2e-5f, "dv " + what);
      }
}

// max |a - b| over max |b|: the error of a bf16 result on the scale of the exact one.
double scaled_error(const std::vector<float>& a, const std::vector<float>& b) {
  double err = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;  // std::max would pass over a NaN
    err = std::max(err, std::fabs(static_cast<double>(a[i]) - b[i]));
    scale = std::max(scale, std::fabs(static_cast<double>(b[i])));
  }
  return err / scale;
}

// In bf16 the products round q, k, v, dO, the probabilities and dS to 8 significant bits: every
// output stays within a few bf16 ulps (2^-8) of the exact one on its own scale.
TEST(OpsBackward, AttentionInBf16StaysNearTheReference) {
  if (!bf16_available()) GTEST_SKIP() << "no bf16 matrix path on this CPU or build";
  // T 257: two full row blocks and a one-row tail; Hd 64 makes the products large enough for
  // bf16.
  const int64_t H = 3, KV = 1, Hd = 64, T = 257;
  const auto q = random_uniform(T * H * Hd, 18, -0.5f, 0.5f),
             k = random_uniform(T * KV * Hd, 19, -0.5f, 0.5f), v = random_uniform(T * KV * Hd, 20),
             dout = random_uniform(T * H * Hd, 21);
  std::vector<float> out_a(q.size()), out_b(q.size());
  // NaN past the half the bf16 probabilities take: the backward must not read there.
  std::vector<float> probs_a(static_cast<size_t>(H * T * T), NAN), probs_b(probs_a.size());
  std::vector<float> dq_a(q.size()), dk_a(k.size()), dv_a(v.size());
  std::vector<float> dq_b(q.size()), dk_b(k.size()), dv_b(v.size());
  // NaN: what a previous layer left there must not leak into the masked columns.
  std::vector<float> scratch(static_cast<size_t>(attention_backward_scratch(T, H)), NAN);
  {
    test::ComputeTypeScope bf16(ComputeType::Bf16);
    ASSERT_EQ(attention_probs_floats(T, H, Hd), (H * T * T + 1) / 2);
    attention_train_forward(out_a.data(), probs_a.data(), q.data(), k.data(), v.data(), T, H, KV,
                            Hd);
    attention_train_backward(dq_a.data(), dk_a.data(), dv_a.data(), dout.data(), probs_a.data(),
                             q.data(), k.data(), v.data(), T, H, KV, Hd, scratch.data());
  }
  attention_train_forward_ref(out_b.data(), probs_b.data(), q.data(), k.data(), v.data(), T, H, KV,
                              Hd);
  attention_train_backward_ref(dq_b.data(), dk_b.data(), dv_b.data(), dout.data(), probs_b.data(),
                               q.data(), k.data(), v.data(), T, H, KV, Hd, nullptr);
  // Kept in bf16, over the first half of the buffer.
  std::vector<float> probs_kept(probs_a.size());
  const auto* probs16 = reinterpret_cast<const uint16_t*>(probs_a.data());
  for (size_t i = 0; i < probs_kept.size(); ++i) probs_kept[i] = bf16_to_fp32(probs16[i]);
  const std::pair<const char*, double> errors[] = {{"out", scaled_error(out_a, out_b)},
                                                   {"probs", scaled_error(probs_kept, probs_b)},
                                                   {"dq", scaled_error(dq_a, dq_b)},
                                                   {"dk", scaled_error(dk_a, dk_b)},
                                                   {"dv", scaled_error(dv_a, dv_b)}};
  for (const auto& [what, err] : errors) {
    EXPECT_LT(err, 4 * std::ldexp(1.0, -8)) << what;
    EXPECT_GT(err, 1e-6) << what << ": no bf16 rounding; did the products run in fp32?";
  }
}

TEST(OpsBackward, SwigluMatchesReferenceAlsoInPlace) {
  const int64_t N = 1001;
  const auto g = random_uniform(N, 12, -6.0f, 6.0f), u = random_uniform(N, 13),
             dy = random_uniform(N, 14);
  std::vector<float> dg_a(N), du_a(N), dg_b(N), du_b(N);
  swiglu_backward(dg_a.data(), du_a.data(), dy.data(), g.data(), u.data(), N);
  swiglu_backward_ref(dg_b.data(), du_b.data(), dy.data(), g.data(), u.data(), N);
  expect_close(dg_a, dg_b, 1e-6f, "dgate");
  expect_close(du_a, du_b, 1e-6f, "dup");
  auto inplace = dy;  // dgate aliasing dout
  swiglu_backward(inplace.data(), du_a.data(), inplace.data(), g.data(), u.data(), N);
  EXPECT_EQ(inplace, dg_a);
}

TEST(OpsBackward, CrossEntropyMatchesReference) {
  for (int64_t T : {1, 5, 17})
    for (int64_t V : {13, 101}) {
      const std::string what = "T " + std::to_string(T) + " V " + std::to_string(V);
      const auto logits = random_uniform(T * V, 15, -8.0f, 8.0f);
      std::vector<int32_t> targets(static_cast<size_t>(T));
      for (int64_t t = 0; t < T; ++t)  // every third token ignored
        targets[t] = t % 3 == 2 ? -1 : static_cast<int32_t>((t * 37 + 5) % V);
      auto a = logits, b = logits;
      std::vector<float> loss_a(static_cast<size_t>(T), NAN), loss_b(loss_a.size());
      const double sum_a =
          cross_entropy_forward_backward(a.data(), loss_a.data(), targets.data(), T, V, 0.25f);
      const double sum_b =
          cross_entropy_forward_backward_ref(b.data(), loss_b.data(), targets.data(), T, V, 0.25f);
      expect_close(a, b, 1e-6f, "gradient " + what);
      expect_close(loss_a, loss_b, 1e-6f, "losses " + what);
      EXPECT_NEAR(sum_a, sum_b, 1e-6 * std::abs(sum_b)) << what;
      EXPECT_NEAR(sum_b, std::accumulate(loss_b.begin(), loss_b.end(), 0.0), 1e-5) << what;
    }
}

// ---- Finite differences of the double forwards above.

TEST(OpsBackward, RmsnormGradientMatchesFiniteDifferences) {
  const int64_t T = 3, D = 33;
  const float eps = 1e-5f;
  const auto x = random_uniform(T * D, 20), w = random_uniform(D, 21, 0.5f, 1.5f),
             dy = random_uniform(T * D, 22), base = random_uniform(T * D, 23);
  const Vec wd = to_double(w);
  const Vec fd =
      numeric_gradient([&](const Vec& xd) { return dot(dy, rmsnorm_d(xd, wd, T, D, eps)); }, x);
  for (auto* fn : {rmsnorm_backward, rmsnorm_backward_ref}) {
    auto dx = base;
    fn(dx.data(), dy.data(), x.data(), w.data(), T, D, eps);
    for (size_t i = 0; i < dx.size(); ++i) dx[i] -= base[i];  // what was added
    expect_gradient(dx, fd, fn == rmsnorm_backward ? "optimized" : "reference");
  }
}

TEST(OpsBackward, MatmulInputGradientMatchesFiniteDifferences) {
  const int64_t T = 5, I = 7, O = 13;
  const auto x = random_uniform(T * I, 24), W = random_uniform(O * I, 25),
             dy = random_uniform(T * O, 26);
  const Vec Wd = to_double(W);
  const Vec fd =
      numeric_gradient([&](const Vec& xd) { return dot(dy, matmul_d(xd, Wd, T, I, O)); }, x);
  for (const bool optimized : {true, false}) {
    std::vector<float> dx(x.size());
    if (optimized)
      matmul_backward_input(dx.data(), dy.data(), W.data(), T, I, O);
    else
      matmul_backward_input_ref(dx.data(), dy.data(), W.data(), T, I, O);
    expect_gradient(dx, fd, optimized ? "optimized" : "reference");
  }
}

TEST(OpsBackward, RopeGradientMatchesFiniteDifferences) {
  const int64_t T = 5, H = 2, Hd = 10, pos0 = 3;
  const RopeTables tab(pos0 + T, Hd / 2);
  const auto x = random_uniform(T * H * Hd, 27), dy = random_uniform(T * H * Hd, 28);
  const Vec fd =
      numeric_gradient([&](const Vec& xd) { return dot(dy, rope_d(xd, T, H, Hd, pos0, tab)); }, x);
  for (auto* fn : {rope_backward, rope_backward_ref}) {
    auto dx = dy;  // in place
    fn(dx.data(), T, H, Hd, pos0, tab.cos_t.data(), tab.sin_t.data());
    expect_gradient(dx, fd, fn == rope_backward ? "optimized" : "reference");
  }
}

TEST(OpsBackward, AttentionGradientMatchesFiniteDifferences) {
  for (auto [H, KV] : {std::pair<int64_t, int64_t>{4, 2}, {3, 1}, {2, 2}}) {
    const int64_t T = 6, Hd = 6;
    const std::string shape = "H " + std::to_string(H) + " KV " + std::to_string(KV);
    const auto q = random_uniform(T * H * Hd, 30, -2.0f, 2.0f),
               k = random_uniform(T * KV * Hd, 31, -2.0f, 2.0f),
               v = random_uniform(T * KV * Hd, 32), dout = random_uniform(T * H * Hd, 33);
    const Vec qd = to_double(q), kd = to_double(k), vd = to_double(v);
    const Vec fd_q = numeric_gradient(
        [&](const Vec& x) { return dot(dout, attention_d(x, kd, vd, T, H, KV, Hd)); }, q);
    const Vec fd_k = numeric_gradient(
        [&](const Vec& x) { return dot(dout, attention_d(qd, x, vd, T, H, KV, Hd)); }, k);
    const Vec fd_v = numeric_gradient(
        [&](const Vec& x) { return dot(dout, attention_d(qd, kd, x, T, H, KV, Hd)); }, v);

    std::vector<float> out(q.size()), probs(static_cast<size_t>(H * T * T));
    attention_train_forward(out.data(), probs.data(), q.data(), k.data(), v.data(), T, H, KV, Hd);
    const Vec out_d = attention_d(qd, kd, vd, T, H, KV, Hd);  // the forward differentiated here
    for (size_t i = 0; i < out.size(); ++i) ASSERT_NEAR(out[i], out_d[i], 1e-5) << shape;

    std::vector<float> scratch(static_cast<size_t>(attention_backward_scratch(T, H)));
    for (auto* fn : {attention_train_backward, attention_train_backward_ref}) {
      const std::string what =
          shape + (fn == attention_train_backward ? " optimized" : " reference");
      std::vector<float> dq(q.size()), dk(k.size()), dv(v.size());
      fn(dq.data(), dk.data(), dv.data(), dout.data(), probs.data(), q.data(), k.data(), v.data(),
         T, H, KV, Hd, scratch.data());
      expect_gradient(dq, fd_q, "dq " + what);
      expect_gradient(dk, fd_k, "dk " + what);
      expect_gradient(dv, fd_v, "dv " + what);
    }
  }
}

TEST(OpsBackward, SwigluGradientMatchesFiniteDifferences) {
  const int64_t N = 37;
  const auto g = random_uniform(N, 34, -5.0f, 5.0f), u = random_uniform(N, 35),
             dy = random_uniform(N, 36);
  const Vec gd = to_double(g), ud = to_double(u);
  const Vec fd_g = numeric_gradient([&](const Vec& x) { return dot(dy, swiglu_d(x, ud)); }, g);
  const Vec fd_u = numeric_gradient([&](const Vec& x) { return dot(dy, swiglu_d(gd, x)); }, u);
  for (auto* fn : {swiglu_backward, swiglu_backward_ref}) {
    const std::string what = fn == swiglu_backward ? "optimized" : "reference";
    std::vector<float> dg(N), du(N);
    fn(dg.data(), du.data(), dy.data(), g.data(), u.data(), N);
    expect_gradient(dg, fd_g, "dgate " + what);
    expect_gradient(du, fd_u, "dup " + what);
  }
}

TEST(OpsBackward, CrossEntropyGradientMatchesFiniteDifferences) {
  const int64_t T = 4, V = 13;
  const float grad_scale = 0.37f;
  const std::vector<int32_t> targets = {2, -1, 12, 0};
  const auto logits = random_uniform(T * V, 37, -3.0f, 3.0f);
  const Vec fd = numeric_gradient(
      [&](const Vec& l) { return grad_scale * cross_entropy_d(l, targets, V); }, logits);
  const double loss_d = cross_entropy_d(to_double(logits), targets, V);
  for (auto* fn : {cross_entropy_forward_backward, cross_entropy_forward_backward_ref}) {
    const std::string what = fn == cross_entropy_forward_backward ? "optimized" : "reference";
    auto grad = logits;
    std::vector<float> losses(T);
    const double sum = fn(grad.data(), losses.data(), targets.data(), T, V, grad_scale);
    EXPECT_NEAR(sum, loss_d, 1e-5 * loss_d) << what;
    expect_gradient(grad, fd, what);
  }
}

// ---- Edge cases.

TEST(OpsBackward, AttentionSingleToken) {
  // One position: the softmax is 1, out copies v, and q, k get no gradient.
  const int64_t T = 1, H = 4, KV = 2, Hd = 6;
  const auto q = random_uniform(H * Hd, 40), k = random_uniform(KV * Hd, 41),
             v = random_uniform(KV * Hd, 42), dout = random_uniform(H * Hd, 43);
  std::vector<float> out(q.size()), probs(H, NAN);
  attention_train_forward(out.data(), probs.data(), q.data(), k.data(), v.data(), T, H, KV, Hd);
  for (int64_t h = 0; h < H; ++h) {
    EXPECT_FLOAT_EQ(probs[h], 1.0f);
    for (int64_t d = 0; d < Hd; ++d) EXPECT_FLOAT_EQ(out[h * Hd + d], v[(h / 2) * Hd + d]);
  }
  std::vector<float> dq(q.size(), NAN), dk(k.size(), NAN), dv(v.size(), NAN);
  std::vector<float> scratch(static_cast<size_t>(attention_backward_scratch(T, H)));
  attention_train_backward(dq.data(), dk.data(), dv.data(), dout.data(), probs.data(), q.data(),
                           k.data(), v.data(), T, H, KV, Hd, scratch.data());
  for (float g : dq) EXPECT_EQ(g, 0.0f);
  for (float g : dk) EXPECT_EQ(g, 0.0f);
  for (int64_t g = 0; g < KV; ++g)  // dv sums the two query heads of its group
    for (int64_t d = 0; d < Hd; ++d)
      EXPECT_FLOAT_EQ(dv[g * Hd + d], dout[(2 * g) * Hd + d] + dout[(2 * g + 1) * Hd + d]);
}

TEST(OpsBackward, AttentionProbsAreCausalRowsSummingToOne) {
  const int64_t T = 150, H = 3, KV = 1, Hd = 10;
  const auto q = random_uniform(T * H * Hd, 44, -3.0f, 3.0f),
             k = random_uniform(T * KV * Hd, 45, -3.0f, 3.0f), v = random_uniform(T * KV * Hd, 46);
  std::vector<float> out(q.size()), probs(static_cast<size_t>(H * T * T), NAN);
  attention_train_forward(out.data(), probs.data(), q.data(), k.data(), v.data(), T, H, KV, Hd);
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < T; ++i) {
      const float* p = probs.data() + (h * T + i) * T;
      double sum = 0.0;
      for (int64_t j = 0; j <= i; ++j) {
        ASSERT_GT(p[j], 0.0f) << "head " << h << " row " << i << " col " << j;
        sum += p[j];
      }
      ASSERT_NEAR(sum, 1.0, 1e-5) << "head " << h << " row " << i;
      for (int64_t j = i + 1; j < T; ++j)
        ASSERT_EQ(p[j], 0.0f) << "head " << h << " row " << i << " col " << j;
    }
}

TEST(OpsBackward, CrossEntropyIgnoredTargetsAndRows) {
  const int64_t T = 4, V = 101;
  const std::vector<int32_t> targets = {-1, 7, -100, 100};
  for (auto* fn : {cross_entropy_forward_backward, cross_entropy_forward_backward_ref}) {
    const std::string what = fn == cross_entropy_forward_backward ? "optimized" : "reference";
    auto logits = random_uniform(T * V, 47, -4.0f, 4.0f);
    for (int64_t j = 0; j < V; ++j) logits[3 * V + j] += 1000.0f;  // stable for large logits
    std::vector<float> losses(T, NAN);
    const double sum = fn(logits.data(), losses.data(), targets.data(), T, V, 0.5f);
    EXPECT_EQ(losses[0], 0.0f) << what;
    EXPECT_EQ(losses[2], 0.0f) << what;
    EXPECT_TRUE(std::isfinite(losses[3]) && losses[3] > 0.0f) << what;
    EXPECT_NEAR(sum, static_cast<double>(losses[1]) + losses[3], 1e-5) << what;
    for (int64_t t : {0, 2})
      for (int64_t j = 0; j < V; ++j) ASSERT_EQ(logits[t * V + j], 0.0f) << what;
    for (int64_t t : {1, 3}) {  // (softmax - onehot) * scale: sums to 0, target negative
      double row = 0.0;
      for (int64_t j = 0; j < V; ++j) row += logits[t * V + j];
      EXPECT_NEAR(row, 0.0, 1e-6) << what;
      EXPECT_LT(logits[t * V + targets[t]], 0.0f) << what;
      EXPECT_GE(logits[t * V + targets[t]], -0.5f) << what;
    }
    // Only ignored tokens: nothing to learn.
    const std::vector<int32_t> none = {-1};
    std::vector<float> one(V, 1.0f);
    EXPECT_EQ(fn(one.data(), losses.data(), none.data(), 1, V, 1.0f), 0.0) << what;
  }
}

TEST(OpsBackward, CrossEntropyRejectsTargetOutsideVocabulary) {
  const std::vector<int32_t> targets = {3, 13};
  std::vector<float> logits(2 * 13, 0.0f), losses(2);
  EXPECT_THROW(
      cross_entropy_forward_backward(logits.data(), losses.data(), targets.data(), 2, 13, 1.0f),
      Error);
  EXPECT_THROW(
      cross_entropy_forward_backward_ref(logits.data(), losses.data(), targets.data(), 2, 13, 1.0f),
      Error);
}

}  // namespace
}  // namespace qalora::ops
