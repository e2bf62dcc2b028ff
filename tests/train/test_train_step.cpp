// The training step against the double-precision reference: its loss equals the reference
// model's, and its adapter gradients equal central finite differences of that loss, on tiny
// random models with grouped-query attention and ragged quantization groups, for every kind of
// base an adapter can sit on.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "model/random_model.h"
#include "qalora/adapters/adapter.h"
#include "qalora/core/device.h"
#include "qalora/core/error.h"
#include "qalora/model/runtime.h"
#include "qalora/ops/gemm.h"
#include "qalora/quant/quantize_model.h"
#include "qalora/train/train_step.h"
#include "test_util.h"
#include "train/train_test_util.h"

namespace qalora {
namespace {

using test::all_grads;
using test::Case;
using test::grads_with;
using test::kTarget;
using test::kTokens;
using test::make_adapters;
using test::make_base;

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

INSTANTIATE_TEST_SUITE_P(Bases, TrainStepGradient, ::testing::ValuesIn(test::kBaseCases),
                         [](const auto& param_info) { return param_info.param.name; });

// In bf16 the step keeps one bf16 copy of the head for the session. An encoded head (here F16)
// is decoded into it a tile at a time; a dense head is converted directly. The same values
// either way give the same copy, so the same step, bit for bit, and the copy is counted in the
// step's memory.
TEST(TrainStep, Bf16HeadCopyOfAnEncodedHeadEqualsTheDenseOne) {
  if (!ops::bf16_available()) GTEST_SKIP() << "no bf16 matrix path on this CPU or build";
  test::ComputeTypeScope bf16(ops::ComputeType::Bf16);
  // Large enough for bf16 head products (8 x 2048 x 64 = 2^20 multiply-adds per chunk of 8) and
  // for activations that make room for the copy.
  test::RandomModelShape shape;
  shape.vocab = 2048, shape.dim = 64, shape.hidden = 48, shape.layers = 1;
  shape.heads = 4, shape.kv_heads = 2, shape.head_dim = 16, shape.context = 256;
  const int64_t T = 256, V = shape.vocab, D = shape.dim;
  Model dense = test::make_random_model(shape, 3), encoded = test::make_random_model(shape, 3);
  const test::Halves head = test::random_halves(V * D, 4, /*bf16=*/false);
  dense.output = Tensor::zeros({V, D});
  std::copy(head.values.begin(), head.values.end(), dense.output.mutable_data());
  encoded.output = test::encoded_of(head, V, D, /*bf16=*/false);
  ASSERT_TRUE(encoded.output.encoded());

  std::mt19937 rng(5);
  std::vector<int32_t> tokens(static_cast<size_t>(T));
  for (int32_t& id : tokens) id = static_cast<int32_t>(rng() % static_cast<uint32_t>(V));
  const std::vector<uint8_t> targets(tokens.size(), 1);
  const Case c{"lora", "", 0, AdapterKind::Lora, AdapterPool::Average, false};
  std::vector<float> grads[2];
  double losses[2];
  const Model* models[2] = {&dense, &encoded};
  for (int i = 0; i < 2; ++i) {
    AdapterSet set = make_adapters(*models[i], c, 0.0f);
    TrainSession session(*models[i], set, T, {.grad_checkpoint = false, .loss_chunk = 8});
    const int64_t before = session.activation_bytes();
    zero_adapter_grads(set);
    int64_t n = 0;
    losses[i] = session.forward_backward(tokens, targets, 1.0f, 1, n);
    EXPECT_GE(session.activation_bytes() - before, V * D * 2) << "no bf16 copy of the head";
    grads[i] = all_grads(set);
  }
  EXPECT_EQ(losses[0], losses[1]);
  EXPECT_EQ(grads[0], grads[1]);
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

// Three sequences packed into one pass give what the three give one by one: the loss sum and
// every adapter gradient (each sequence attends to itself, restarts its positions and draws its
// own dropout masks), with and without checkpointing, and when the attention is kept per block.
TEST(TrainStep, PackedSequencesEqualTheirSeparatePasses) {
  const Case& c = test::kBaseCases[3];  // QA-LoRA on INT4
  const Model m = make_base(c);
  const std::vector<int32_t> a(kTokens.begin(), kTokens.begin() + 5),
      b(kTokens.begin() + 3, kTokens.end());
  const std::vector<uint8_t> ta(kTarget.begin(), kTarget.begin() + 5),
      tb(kTarget.begin() + 3, kTarget.end());
  const std::vector<TrainSequence> batch = {{a, ta, 11}, {kTokens, kTarget, 22}, {b, tb, 33}};
  for (const bool checkpoint : {false, true}) {
    AdapterSet set = make_adapters(m, c, 0.2f);
    const TrainStepOptions options{
        .grad_checkpoint = checkpoint, .loss_chunk = 5, .max_sequence = 11};
    TrainSession session(m, set, 40, options);
    zero_adapter_grads(set);
    double separate = 0;
    int64_t n = 0, total = 0;
    for (const TrainSequence& s : batch) {
      separate += session.forward_backward(s.tokens, s.target, 0.5f, s.dropout_seed, n);
      total += n;
    }
    const std::vector<float> expected = all_grads(set);
    zero_adapter_grads(set);
    const double packed = session.forward_backward(batch, 0.5f, n);
    EXPECT_EQ(n, total);
    EXPECT_NEAR(packed, separate, 1e-5 * separate);
    const std::vector<float> got = all_grads(set);
    ASSERT_EQ(got.size(), expected.size());
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_NEAR(got[i], expected[i], 1e-6f + 1e-4f * std::abs(expected[i])) << i;
  }
  AdapterSet set = make_adapters(m, c, 0.0f);
  TrainSession session(m, set, 20, {.max_sequence = 11});
  int64_t n = 0;
  EXPECT_THROW(session.forward_backward(batch, 1.0f, n), Error);  // 27 tokens > 20
}

// Where no GPU can be used, asking for one fails up front with the reason (tests/cuda covers
// the GPU's step where there is one).
TEST(TrainStep, AGpuThatCannotBeUsedIsRefusedWithTheReason) {
  if (cuda_device_count() > 0) GTEST_SKIP() << "a CUDA device is present";
  const Case& c = test::kBaseCases[0];
  const Model m = make_base(c);
  AdapterSet set = make_adapters(m, c, 0.0f);
  try {
    TrainSession session(m, set, 16, {.device = parse_device("cuda:0")});
    FAIL() << "a TrainSession on cuda:0 was created";
  } catch (const Error& e) {
    const std::string why =
        cuda_backend_built() ? "no CUDA device" : "this build has no CUDA backend";
    EXPECT_NE(std::string(e.what()).find(why), std::string::npos) << e.what();
  }
}

TEST(Device, ParsesCpuAndCudaOrdinalsAndRejectsTheRest) {
  EXPECT_FALSE(parse_device("cpu").cuda());
  EXPECT_EQ(parse_device("cuda").name(), "cuda:0");
  EXPECT_EQ(parse_device("cuda:3").index, 3);
  for (const char* bad : {"gpu", "cuda:", "cuda:-1", "cuda:1x", "CUDA", ""})
    EXPECT_THROW(parse_device(bad), Error) << bad;
}

}  // namespace
}  // namespace qalora
