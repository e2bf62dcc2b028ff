// The training step against the double-precision reference: its loss equals the reference
// model's, and its adapter gradients equal central finite differences of that loss, on tiny
// random models with grouped-query attention and ragged quantization groups, for every kind of
// base an adapter can sit on.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "model/random_model.h"
#include "qalora/adapters/adapter.h"
#include "qalora/core/error.h"
#include "qalora/model/runtime.h"
#include "qalora/quant/quantize_model.h"
#include "qalora/train/train_step.h"
#include "test_util.h"

namespace qalora {
namespace {

struct Case {
  std::string name;
  std::string method;  // "" = dense base
  int bits;
  AdapterKind kind;
  AdapterPool pool;
  bool tied;
};

std::ostream& operator<<(std::ostream& os, const Case& c) {
  return os << c.name;
}

// dim 40 and hidden 24 with groups of 16: every layer has a ragged last group (8 inputs).
Model make_base(const Case& c) {
  test::RandomModelShape shape;
  shape.vocab = 29, shape.dim = 40, shape.hidden = 24, shape.layers = 2;
  shape.heads = 4, shape.kv_heads = 2, shape.head_dim = 10, shape.tied = c.tied;
  Model m = test::make_random_model(shape, 7);
  if (!c.method.empty()) {
    QuantizeOptions q;
    q.method = c.method;
    q.bits = c.bits;
    q.group_size = c.method == "nf4" ? kCodebookBlock : 16;
    quantize_model(m, q, {});
  }
  return m;
}

AdapterSet make_adapters(const Model& m, const Case& c, float dropout) {
  AdapterConfig cfg;
  cfg.kind = c.kind;
  cfg.pool = c.pool;
  cfg.rank = 3;
  cfg.alpha = 6.0f;
  cfg.dropout = dropout;
  cfg.seed = 11;
  AdapterSet set = create_adapters(m, cfg);
  test::randomize_adapter_b(set, 5);
  return set;
}

const std::vector<int32_t> kTokens = {1, 5, 17, 3, 28, 9, 9, 0, 21, 14, 2};
const std::vector<uint8_t> kTarget = {0, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1};

double reference_loss(const Model& m, const AdapterSet& set) {
  const std::vector<double> logits = reference_forward(m, kTokens, &set);
  const int64_t V = m.config.vocab_size;
  double loss = 0;
  for (size_t t = 0; t + 1 < kTokens.size(); ++t) {
    if (!kTarget[t + 1]) continue;
    const double* row = logits.data() + static_cast<int64_t>(t) * V;
    double mx = row[0], sum = 0;
    for (int64_t v = 0; v < V; ++v) mx = std::max(mx, row[v]);
    for (int64_t v = 0; v < V; ++v) sum += std::exp(row[v] - mx);
    loss += mx + std::log(sum) - row[kTokens[t + 1]];
  }
  return loss;
}

class TrainStepGradient : public ::testing::TestWithParam<Case> {};

TEST_P(TrainStepGradient, MatchesFiniteDifferencesOfTheDoubleReference) {
  const Case& c = GetParam();
  const Model m = make_base(c);
  AdapterSet set = make_adapters(m, c, 0.0f);
  TrainSession session(m, set, 16, {.grad_checkpoint = false, .loss_chunk = 4});
  zero_adapter_grads(set);
  int64_t n = 0;
  const double loss = session.forward_backward(kTokens, kTarget, 1.0f, 99, n);
  EXPECT_EQ(n, 7);
  const double ref = reference_loss(m, set);
  EXPECT_NEAR(loss, ref, 1e-4 * std::abs(ref));

  // Central differences in double over a spread of A and B entries of every target. The step
  // actually taken is what the float parameter can hold.
  int checked = 0;
  for (size_t k = 0; k < set.adapters.size(); k += 3) {
    LoraAdapter& a = set.adapters[k];
    for (int which = 0; which < 2; ++which) {
      Tensor& p = which == 0 ? a.A : a.B;
      const std::vector<float>& g = which == 0 ? a.grad_A : a.grad_B;
      for (int64_t i = 0; i < p.numel(); i += std::max<int64_t>(1, p.numel() / 4)) {
        float* w = p.mutable_data() + i;
        const float w0 = *w;
        const float hi = w0 + 1e-3f, lo = w0 - 1e-3f;
        *w = hi;
        const double l_hi = reference_loss(m, set);
        *w = lo;
        const double l_lo = reference_loss(m, set);
        *w = w0;
        const double fd = (l_hi - l_lo) / (static_cast<double>(hi) - lo);
        EXPECT_NEAR(g[static_cast<size_t>(i)], fd, 2e-3 + 2e-3 * std::abs(fd))
            << target_name(a.target) << " layer " << a.layer << (which ? " B[" : " A[") << i << "]";
        ++checked;
      }
    }
  }
  EXPECT_GE(checked, 20);
}

INSTANTIATE_TEST_SUITE_P(
    Bases, TrainStepGradient,
    ::testing::Values(
        Case{"lora_dense", "", 0, AdapterKind::Lora, AdapterPool::Average, false},
        Case{"lora_nf4", "nf4", 4, AdapterKind::Lora, AdapterPool::Average, true},
        Case{"lora_int4", "rtn", 4, AdapterKind::Lora, AdapterPool::Average, false},
        Case{"qalora_int4_avg", "rtn", 4, AdapterKind::QaLora, AdapterPool::Average, false},
        Case{"qalora_int3_sum", "rtn", 3, AdapterKind::QaLora, AdapterPool::Sum, true},
        Case{"qalora_int2_avg", "rtn", 2, AdapterKind::QaLora, AdapterPool::Average, false}),
    [](const auto& param_info) { return param_info.param.name; });

std::vector<float> all_grads(const AdapterSet& set) {
  std::vector<float> g;
  for (const LoraAdapter& a : set.adapters) {
    g.insert(g.end(), a.grad_A.begin(), a.grad_A.end());
    g.insert(g.end(), a.grad_B.begin(), a.grad_B.end());
  }
  return g;
}

std::vector<float> grads_with(const Model& m, AdapterSet& set, TrainStepOptions options) {
  TrainSession session(m, set, 16, options);
  zero_adapter_grads(set);
  int64_t n = 0;
  session.forward_backward(kTokens, kTarget, 0.5f, 1234, n);
  return all_grads(set);
}

TEST(TrainStep, CheckpointingAndLossChunksGiveTheSameGradients) {
  const Case c{"qalora", "rtn", 4, AdapterKind::QaLora, AdapterPool::Average, false};
  const Model m = make_base(c);
  AdapterSet set = make_adapters(m, c, 0.1f);  // dropout: recomputation must redraw the masks
  const auto plain = grads_with(m, set, {.grad_checkpoint = false, .loss_chunk = 64});
  const auto recomputed = grads_with(m, set, {.grad_checkpoint = true, .loss_chunk = 64});
  EXPECT_EQ(plain, recomputed);
  const auto chunked = grads_with(m, set, {.grad_checkpoint = false, .loss_chunk = 3});
  ASSERT_EQ(plain.size(), chunked.size());
  for (size_t i = 0; i < plain.size(); ++i)
    ASSERT_NEAR(plain[i], chunked[i], 1e-6f + 1e-5f * std::abs(plain[i])) << i;
}

TEST(TrainStep, DropoutChangesTheGradientAndNoTargetsGiveNone) {
  const Case c{"lora", "", 0, AdapterKind::Lora, AdapterPool::Average, false};
  const Model m = make_base(c);
  AdapterSet with = make_adapters(m, c, 0.3f), without = make_adapters(m, c, 0.0f);
  EXPECT_NE(grads_with(m, with, {}), grads_with(m, without, {}));

  TrainSession session(m, without, 16);
  zero_adapter_grads(without);
  int64_t n = -1;
  const std::vector<uint8_t> none(kTokens.size(), 0);
  EXPECT_EQ(session.forward_backward(kTokens, none, 1.0f, 1, n), 0.0);
  EXPECT_EQ(n, 0);
  for (float g : all_grads(without)) ASSERT_EQ(g, 0.0f);
}

TEST(TrainStep, HeldOutLossEqualsTheReferenceAndRejectsBadInput) {
  const Case c{"qalora", "rtn", 3, AdapterKind::QaLora, AdapterPool::Sum, true};
  const Model m = make_base(c);
  AdapterSet set = make_adapters(m, c, 0.2f);
  TrainSession session(m, set, 16);
  int64_t n = 0;
  const double ref = reference_loss(m, set);
  EXPECT_NEAR(session.loss(kTokens, kTarget, n), ref, 1e-4 * ref);
  const std::vector<int32_t> too_long(17, 1);
  EXPECT_THROW(session.loss(too_long, std::vector<uint8_t>(17, 1), n), Error);
  const std::vector<int32_t> bad_id = {1, 29};
  EXPECT_THROW(session.loss(bad_id, std::vector<uint8_t>{0, 1}, n), Error);
}

}  // namespace
}  // namespace qalora
