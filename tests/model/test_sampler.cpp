#include <gtest/gtest.h>

#include <set>
#include <vector>

#include "qalora/core/error.h"
#include "qalora/model/sampler.h"

namespace qalora {
namespace {

const std::vector<float> kLogits = {0.5f, 2.0f, -1.0f, 2.0f, 1.0f, 0.0f};

TEST(Sampler, ArgmaxTakesTheLowestIdOnTies) {
  EXPECT_EQ(argmax(kLogits), 1);
  EXPECT_EQ(argmax(std::vector<float>{3.0f}), 0);
}

TEST(Sampler, TemperatureZeroIsGreedy) {
  Sampler s({.temperature = 0.0f, .seed = 7});
  for (int i = 0; i < 20; ++i) EXPECT_EQ(s.sample(kLogits), 1);
  const auto c = s.candidates(kLogits);
  ASSERT_EQ(c.size(), 1u);
  EXPECT_EQ(c[0].id, 1);
  EXPECT_DOUBLE_EQ(c[0].prob, 1.0);
}

TEST(Sampler, TopKOneIsGreedy) {
  Sampler s({.temperature = 1.5f, .top_k = 1, .top_p = 1.0f, .seed = 3});
  for (int i = 0; i < 50; ++i) EXPECT_EQ(s.sample(kLogits), 1);
}

TEST(Sampler, SameSeedSameTokens) {
  const SamplerConfig config{.temperature = 1.0f, .top_k = 0, .top_p = 1.0f, .seed = 42};
  Sampler a(config), b(config), c({.temperature = 1.0f, .top_k = 0, .top_p = 1.0f, .seed = 43});
  std::vector<int32_t> ta, tb, tc;
  for (int i = 0; i < 64; ++i) {
    ta.push_back(a.sample(kLogits));
    tb.push_back(b.sample(kLogits));
    tc.push_back(c.sample(kLogits));
  }
  EXPECT_EQ(ta, tb);
  EXPECT_NE(ta, tc);
}

TEST(Sampler, SoftmaxWithTemperature) {
  // Temperature 2 on logits {0, ln 4}: probabilities 1:2.
  Sampler s({.temperature = 2.0f, .top_k = 0, .top_p = 1.0f});
  const auto c = s.candidates(std::vector<float>{0.0f, 1.3862944f});
  ASSERT_EQ(c.size(), 2u);
  EXPECT_EQ(c[0].id, 1);
  EXPECT_NEAR(c[0].prob, 2.0 / 3.0, 1e-6);
  EXPECT_NEAR(c[1].prob, 1.0 / 3.0, 1e-6);
}

TEST(Sampler, TopPKeepsTheSmallestPrefixReachingTheMass) {
  // Probabilities 0.5, 0.25, 0.125, 0.125 (logits are their logs).
  const std::vector<float> logits = {-2.0794415f, -0.6931472f, -2.0794415f, -1.3862944f};
  Sampler s({.temperature = 1.0f, .top_k = 0, .top_p = 0.7f, .seed = 1});
  const auto c = s.candidates(logits);
  ASSERT_EQ(c.size(), 2u);  // 0.5 < 0.7 <= 0.75
  EXPECT_EQ(c[0].id, 1);
  EXPECT_EQ(c[1].id, 3);
  EXPECT_NEAR(c[0].prob, 2.0 / 3.0, 1e-6);
  EXPECT_NEAR(c[1].prob, 1.0 / 3.0, 1e-6);

  std::set<int32_t> drawn;
  int ones = 0;
  for (int i = 0; i < 3000; ++i) {
    const int32_t t = s.sample(logits);
    drawn.insert(t);
    ones += t == 1;
  }
  EXPECT_EQ(drawn, (std::set<int32_t>{1, 3}));
  EXPECT_NEAR(ones / 3000.0, 2.0 / 3.0, 0.05);
}

TEST(Sampler, RepetitionPenaltyDemotesRecentTokens) {
  Sampler s({.temperature = 0.0f, .repeat_penalty = 2.0f});
  s.accept(1);
  s.accept(3);
  // Penalty 2 brings tokens 1 and 3 from 2.0 down to 1.0, tied with token 4: lowest id wins.
  EXPECT_EQ(s.sample(kLogits), 1);
  // Penalty 4 brings them to 0.5, below token 4.
  Sampler strong({.temperature = 0.0f, .repeat_penalty = 4.0f});
  strong.accept(1);
  strong.accept(3);
  EXPECT_EQ(strong.sample(kLogits), 4);
}

TEST(Sampler, RejectsBadSettings) {
  EXPECT_THROW(Sampler({.temperature = -1.0f}), Error);
  EXPECT_THROW(Sampler({.top_k = -1}), Error);
  EXPECT_THROW(Sampler({.top_p = 0.0f}), Error);
  EXPECT_THROW(Sampler({.top_p = 1.5f}), Error);
  EXPECT_THROW(Sampler({.repeat_penalty = 0.0f}), Error);
}

}  // namespace
}  // namespace qalora
