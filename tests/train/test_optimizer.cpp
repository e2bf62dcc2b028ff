// AdamW against its formula in double, the learning-rate schedules, gradient clipping, and the
// loss-curve picture.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <numbers>
#include <string>

#include "model/random_model.h"
#include "qalora/adapters/adapter.h"
#include "qalora/core/error.h"
#include "qalora/train/loss_curve.h"
#include "qalora/train/optimizer.h"
#include "test_util.h"

namespace qalora {
namespace {

AdapterSet small_set() {
  test::RandomModelShape shape;
  shape.layers = 1;
  AdapterConfig cfg;
  cfg.rank = 2;
  cfg.targets = parse_targets("q_proj,down_proj");
  return create_adapters(test::make_random_model(shape, 1), cfg);
}

TEST(AdamW, StepsFollowTheFormulaInDouble) {
  AdapterSet set = small_set();
  const AdamWConfig cfg{.beta1 = 0.8, .beta2 = 0.95, .eps = 1e-6, .weight_decay = 0.1};
  AdamW opt(set, cfg);
  LoraAdapter& a = set.adapters[0];
  const double w0 = a.A.data()[3];
  double w = w0, m = 0, v = 0;
  const double lr = 0.01;
  for (int t = 1; t <= 3; ++t) {
    for (LoraAdapter& x : set.adapters) {
      x.grad_A.assign(static_cast<size_t>(x.A.numel()), 0.5f * static_cast<float>(t));
      x.grad_B.assign(static_cast<size_t>(x.B.numel()), -0.25f);
    }
    const double g = 0.5 * t;
    m = cfg.beta1 * m + (1 - cfg.beta1) * g;
    v = cfg.beta2 * v + (1 - cfg.beta2) * g * g;
    const double mhat = m / (1 - std::pow(cfg.beta1, t)), vhat = v / (1 - std::pow(cfg.beta2, t));
    w = w * (1 - lr * cfg.weight_decay) - lr * mhat / (std::sqrt(vhat) + cfg.eps);
    opt.step(set, lr);
    EXPECT_NEAR(a.A.data()[3], w, 1e-6) << "step " << t;
  }
  EXPECT_EQ(opt.steps(), 3);
  EXPECT_NE(a.A.data()[3], w0);
}

TEST(LearningRate, WarmupThenConstantLinearOrCosine) {
  const double peak = 1e-3;
  for (LrSchedule s : {LrSchedule::Constant, LrSchedule::Linear, LrSchedule::Cosine}) {
    EXPECT_NEAR(learning_rate(s, peak, 0, 4, 20), peak / 5, 1e-12);
    EXPECT_NEAR(learning_rate(s, peak, 3, 4, 20), peak * 4 / 5, 1e-12);
    EXPECT_NEAR(learning_rate(s, peak, 4, 4, 20), peak, 1e-12);
  }
  EXPECT_NEAR(learning_rate(LrSchedule::Constant, peak, 19, 4, 20), peak, 1e-12);
  EXPECT_NEAR(learning_rate(LrSchedule::Linear, peak, 12, 4, 20), peak / 2, 1e-12);
  EXPECT_NEAR(learning_rate(LrSchedule::Cosine, peak, 12, 4, 20), peak / 2, 1e-12);
  EXPECT_NEAR(learning_rate(LrSchedule::Cosine, peak, 8, 4, 20),
              peak * 0.5 * (1 + std::cos(std::numbers::pi / 4)), 1e-12);
  EXPECT_EQ(parse_lr_schedule("cosine"), LrSchedule::Cosine);
  EXPECT_THROW(parse_lr_schedule("step"), Error);
}

TEST(GradNorm, IsTheEuclideanNormAndScales) {
  AdapterSet set = small_set();
  double ss = 0;
  for (LoraAdapter& a : set.adapters) {
    a.grad_A.assign(static_cast<size_t>(a.A.numel()), 0.5f);
    a.grad_B.assign(static_cast<size_t>(a.B.numel()), -2.0f);
    ss += 0.25 * static_cast<double>(a.A.numel()) + 4.0 * static_cast<double>(a.B.numel());
  }
  EXPECT_NEAR(grad_norm(set), std::sqrt(ss), 1e-9 * std::sqrt(ss));
  scale_grads(set, 0.5f);
  EXPECT_NEAR(grad_norm(set), 0.5 * std::sqrt(ss), 1e-9 * std::sqrt(ss));
}

// The optimizer spreads the tensors over the threads: one thread and two give the same norm
// and the same parameters, bit for bit.
TEST(AdamW, StepAndNormDoNotDependOnTheThreadCount) {
  AdapterSet sets[2] = {small_set(), small_set()};
  double norms[2];
  for (int i = 0; i < 2; ++i) {
    const int threads = omp_get_max_threads();
    omp_set_num_threads(i + 1);
    uint64_t seed = 40;
    for (LoraAdapter& a : sets[i].adapters) {
      a.grad_A = test::random_uniform(a.A.numel(), ++seed);
      a.grad_B = test::random_uniform(a.B.numel(), ++seed);
    }
    norms[i] = grad_norm(sets[i]);
    AdamW opt(sets[i], {});
    for (int step = 0; step < 3; ++step) opt.step(sets[i], 1e-2);
    omp_set_num_threads(threads);
  }
  EXPECT_EQ(norms[0], norms[1]);
  for (size_t k = 0; k < sets[0].adapters.size(); ++k) {
    const LoraAdapter &a = sets[0].adapters[k], &b = sets[1].adapters[k];
    for (int64_t j = 0; j < a.A.numel(); ++j) ASSERT_EQ(a.A.data()[j], b.A.data()[j]) << k;
    for (int64_t j = 0; j < a.B.numel(); ++j) ASSERT_EQ(a.B.data()[j], b.B.data()[j]) << k;
  }
}

TEST(LossCurve, DrawsBothSeriesAndClosesEveryTag) {
  std::vector<LossPoint> train, eval = {{0, 3.0}, {50, 2.0}, {100, 1.5}};
  for (int64_t s = 1; s <= 100; ++s) train.push_back({s, 3.0 - 0.015 * static_cast<double>(s)});
  const std::string svg = loss_curve_svg(train, eval, "run <1>");
  const auto count = [&](const std::string& needle) {
    int64_t n = 0;
    for (size_t at = svg.find(needle); at != std::string::npos; at = svg.find(needle, at + 1)) ++n;
    return n;
  };
  EXPECT_EQ(count("<text"), count("</text>"));
  EXPECT_EQ(count("<circle"), 3);
  EXPECT_EQ(count("<polyline"), 3);  // training, its moving average, held-out
  EXPECT_NE(svg.find("run &lt;1&gt;"), std::string::npos);
  EXPECT_EQ(svg.find("nan"), std::string::npos);
  // Empty and degenerate series still give a picture.
  const std::string empty = loss_curve_svg({}, {}, "empty");
  EXPECT_NE(empty.find("</svg>"), std::string::npos);
  EXPECT_EQ(empty.find("nan"), std::string::npos);
}

}  // namespace
}  // namespace qalora
