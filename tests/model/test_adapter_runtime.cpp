// The inference runtime with unmerged adapters against the double-precision reference, and
// LoRA on a dense base against the same LoRA merged into the weights by hand.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "model/random_model.h"
#include "qalora/adapters/adapter.h"
#include "qalora/core/error.h"
#include "qalora/model/runtime.h"
#include "qalora/quant/quantize_model.h"

namespace qalora {
namespace {

std::vector<float> session_logits(const Model& m, const AdapterSet* set,
                                  const std::vector<int32_t>& tokens) {
  InferenceSession session(m, 32, set);
  std::vector<float> logits(tokens.size() * static_cast<size_t>(m.config.vocab_size));
  // Prefill then one decode step: both paths apply the adapters.
  const std::span<const int32_t> all(tokens);
  session.forward(all.first(tokens.size() - 1), logits, true);
  session.forward(all.last(1),
                  std::span<float>(logits).last(static_cast<size_t>(m.config.vocab_size)));
  return logits;
}

TEST(AdapterRuntime, QaLoraOnInt4MatchesTheReference) {
  Model m = test::make_random_model(test::ragged_shape(), 3);
  QuantizeOptions q;
  q.method = "rtn";
  q.bits = 4;
  q.group_size = 16;
  quantize_model(m, q, {});
  for (AdapterPool pool : {AdapterPool::Average, AdapterPool::Sum}) {
    AdapterConfig cfg;
    cfg.kind = AdapterKind::QaLora;
    cfg.pool = pool;
    cfg.rank = 4;
    AdapterSet set = create_adapters(m, cfg);
    test::randomize_adapter_b(set, 9);
    const std::vector<int32_t> tokens = {1, 4, 30, 7, 7, 12, 0, 19};
    const std::vector<float> got = session_logits(m, &set, tokens);
    const std::vector<double> ref = reference_forward(m, tokens, &set);
    const std::vector<double> base = reference_forward(m, tokens);
    double moved = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      ASSERT_NEAR(got[i], ref[i], 1e-4 * (1 + std::abs(ref[i]))) << i;
      moved = std::max(moved, std::abs(ref[i] - base[i]));
    }
    EXPECT_GT(moved, 1e-2) << "the adapter must change the logits";
  }
}

TEST(AdapterRuntime, LoraOnDenseEqualsTheMergedWeights) {
  const Model m = test::make_random_model(test::ragged_shape(), 4);
  AdapterConfig cfg;
  cfg.rank = 3;
  cfg.alpha = 5;
  cfg.rslora = true;
  cfg.targets = parse_targets("q_proj,v_proj,down_proj");
  AdapterSet set = create_adapters(m, cfg);
  test::randomize_adapter_b(set, 10);
  Model merged = test::make_random_model(test::ragged_shape(), 4);
  for (const LoraAdapter& a : set.adapters) {
    LayerWeights& L = merged.layers[static_cast<size_t>(a.layer)];
    Linear& l = a.target == Target::Q ? L.q : (a.target == Target::V ? L.v : L.down);
    float* w = l.weight.mutable_data();
    for (int64_t o = 0; o < a.out; ++o)
      for (int64_t i = 0; i < a.in; ++i) {
        double d = 0;
        for (int64_t k = 0; k < a.rank(); ++k)
          d += static_cast<double>(a.B.data()[o * a.rank() + k]) * a.A.data()[k * a.in + i];
        w[o * a.in + i] += static_cast<float>(cfg.scale() * d);
      }
  }
  const std::vector<int32_t> tokens = {2, 9, 9, 30, 1, 5};
  const std::vector<float> got = session_logits(m, &set, tokens);
  const std::vector<float> want = session_logits(merged, nullptr, tokens);
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_NEAR(got[i], want[i], 2e-4 * (1 + std::abs(want[i])));
}

TEST(AdapterRuntime, RejectsAnAdapterOfAnotherModel) {
  const Model m = test::make_random_model(test::ragged_shape(), 5);
  test::RandomModelShape other = test::ragged_shape();
  other.hidden = 32;
  const Model n = test::make_random_model(other, 5);
  const AdapterSet set = create_adapters(n, AdapterConfig{});
  EXPECT_THROW(InferenceSession(m, 16, &set), Error);
}

}  // namespace
}  // namespace qalora
