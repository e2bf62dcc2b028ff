// The GPU's training step against the CPU's on every base the step supports: the same loss and
// adapter gradients, within what bf16 products of the frozen weights allow.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "cuda_test_util.h"
#include "qalora/core/device.h"
#include "qalora/train/train_step.h"
#include "train/train_test_util.h"

namespace qalora {
namespace {

using test::Case;

// ||a - b|| / ||b||
double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

class CudaTrainStep : public ::testing::TestWithParam<Case> {};

TEST_P(CudaTrainStep, FollowsTheCpuStep) {
  QL_REQUIRE_GPU();
  const Case& c = GetParam();
  const Model m = test::make_base(c);
  for (const bool checkpoint : {false, true}) {
    AdapterSet set = test::make_adapters(m, c, 0.1f);  // dropout: both draw the same masks
    const TrainStepOptions cpu{.grad_checkpoint = checkpoint, .loss_chunk = 4};
    TrainStepOptions gpu = cpu;
    gpu.device = parse_device("cuda:0");
    const std::vector<float> expected = test::grads_with(m, set, cpu);
    const std::vector<float> got = test::grads_with(m, set, gpu);
    ASSERT_EQ(got.size(), expected.size());
    EXPECT_LT(relative_error(got, expected), 2e-2)
        << (checkpoint ? "with" : "without") << " checkpointing";

    TrainSession on_cpu(m, set, 16, cpu), on_gpu(m, set, 16, gpu);
    int64_t n_cpu = 0, n_gpu = 0;
    const double l_cpu = on_cpu.loss(test::kTokens, test::kTarget, n_cpu);
    const double l_gpu = on_gpu.loss(test::kTokens, test::kTarget, n_gpu);
    EXPECT_EQ(n_gpu, n_cpu);
    EXPECT_NEAR(l_gpu, l_cpu, 1e-2 * std::abs(l_cpu));
  }
}

INSTANTIATE_TEST_SUITE_P(Bases, CudaTrainStep, ::testing::ValuesIn(test::kBaseCases),
                         [](const auto& param_info) { return param_info.param.name; });

// Three sequences packed into one pass on the GPU against the same pass on the CPU.
TEST(CudaPackedTrainStep, FollowsTheCpu) {
  QL_REQUIRE_GPU();
  const Case& c = test::kBaseCases[3];  // QA-LoRA on INT4
  const Model m = test::make_base(c);
  const std::vector<int32_t> a(test::kTokens.begin(), test::kTokens.begin() + 5);
  const std::vector<uint8_t> ta(test::kTarget.begin(), test::kTarget.begin() + 5);
  const std::vector<TrainSequence> batch = {
      {a, ta, 11}, {test::kTokens, test::kTarget, 22}, {a, ta, 33}};
  std::vector<float> grads[2];
  double loss[2];
  for (int i = 0; i < 2; ++i) {
    AdapterSet set = test::make_adapters(m, c, 0.2f);
    TrainStepOptions options{.loss_chunk = 4, .max_sequence = 11};
    if (i == 1) options.device = parse_device("cuda:0");
    TrainSession session(m, set, 21, options);
    zero_adapter_grads(set);
    int64_t n = 0;
    loss[i] = session.forward_backward(batch, 0.5f, n);
    EXPECT_EQ(n, 11);
    grads[i] = test::all_grads(set);
  }
  EXPECT_NEAR(loss[1], loss[0], 1e-2 * loss[0]);
  EXPECT_LT(relative_error(grads[1], grads[0]), 2e-2);
}

}  // namespace
}  // namespace qalora
