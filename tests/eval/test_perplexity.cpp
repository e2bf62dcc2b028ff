#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "qalora/core/error.h"
#include "qalora/data/dataset.h"
#include "qalora/eval/perplexity.h"
#include "qalora/model/runtime.h"
#include "test_util.h"

namespace qalora {
namespace {

using Ids = std::vector<int32_t>;
constexpr int32_t kBos = 3;
constexpr int64_t kVocab = 4;

// A toy "model" whose prediction depends only on the current token: after token t the next
// text token is (t + 1) % 3 with probability 1/2 and each other id has 1/6; after BOS all four
// ids have 1/4. Logits are log-probabilities, so each NLL is -log of those numbers.
struct ToyModel {
  std::vector<Ids> windows_seen;
  void operator()(std::span<const int32_t> tokens, std::span<float> logits) {
    windows_seen.emplace_back(tokens.begin(), tokens.end());
    for (size_t i = 0; i < tokens.size(); ++i) {
      for (int32_t j = 0; j < kVocab; ++j) {
        const double p = tokens[i] == kBos ? 0.25 : (j == (tokens[i] + 1) % 3 ? 0.5 : 1.0 / 6);
        logits[i * kVocab + static_cast<size_t>(j)] = static_cast<float>(std::log(p));
      }
    }
  }
};

PerplexityOptions quiet(int64_t ctx, int64_t stride = 0) {
  PerplexityOptions o;
  o.ctx = ctx;
  o.stride = stride;
  o.progress = false;
  return o;
}

const double kLog2 = std::log(2.0), kLog4 = std::log(4.0), kLog6 = std::log(6.0);

TEST(Perplexity, TokenNllIsStable) {
  EXPECT_NEAR(token_nll(std::vector<float>{1000.0f, 1000.0f}, 0), kLog2, 1e-12);
  EXPECT_NEAR(token_nll(std::vector<float>{-1000.0f, 0.0f, 0.0f, 0.0f}, 1), std::log(3.0), 1e-12);
  EXPECT_THROW(token_nll(std::vector<float>{0.0f}, 1), Error);
}

TEST(Perplexity, NonOverlappingWindowsWithBos) {
  ToyModel toy;
  const Ids text = {0, 1, 2, 0, 2, 1, 1};
  const auto r = perplexity(text, kVocab, kBos, std::ref(toy), quiet(4));
  // Windows of BOS + 3 text tokens; the last one is shorter.
  EXPECT_EQ(toy.windows_seen, (std::vector<Ids>{{3, 0, 1, 2}, {3, 0, 2, 1}, {3, 1}}));
  EXPECT_EQ(r.windows, 3);
  EXPECT_EQ(r.tokens_scored, 7);
  // Window 1: 0|BOS, 1|0, 2|1; window 2: 0|BOS, 2|0, 1|2; window 3: 1|BOS.
  const double expected = (3 * kLog4 + 2 * kLog2 + 2 * kLog6) / 7;
  EXPECT_NEAR(r.mean_nll, expected, 1e-6);
  EXPECT_NEAR(r.ppl, std::exp(expected), 1e-5);
  EXPECT_NEAR(r.per_window[1].nll_sum, kLog4 + 2 * kLog6, 1e-6);
}

TEST(Perplexity, WithoutBosTheFirstTokenOfEachWindowIsContext) {
  ToyModel toy;
  const auto r = perplexity(Ids{0, 1, 2, 0, 2, 1}, kVocab, -1, std::ref(toy), quiet(3));
  EXPECT_EQ(r.windows, 2);
  EXPECT_EQ(r.tokens_scored, 4);
  EXPECT_NEAR(r.mean_nll, (2 * kLog2 + 2 * kLog6) / 4, 1e-6);
}

TEST(Perplexity, StrideScoresOnlyNewTokens) {
  ToyModel toy;
  const auto r = perplexity(Ids{0, 1, 2, 0, 2}, kVocab, kBos, std::ref(toy), quiet(4, 1));
  EXPECT_EQ(toy.windows_seen, (std::vector<Ids>{{3, 0, 1, 2}, {3, 1, 2, 0}, {3, 2, 0, 2}}));
  EXPECT_EQ(r.tokens_scored, 5);
  // 0|BOS, 1|0, 2|1, then 0|2 and 2|0 with more context.
  EXPECT_NEAR(r.nll_sum, kLog4 + 3 * kLog2 + kLog6, 1e-6);
}

TEST(Perplexity, ShortTextIsOneShortWindowAndMaxWindowsLimits) {
  ToyModel toy;
  const auto short_text = perplexity(Ids{0, 1}, kVocab, kBos, std::ref(toy), quiet(512));
  EXPECT_EQ(short_text.windows, 1);
  EXPECT_NEAR(short_text.mean_nll, (kLog4 + kLog2) / 2, 1e-6);

  PerplexityOptions o = quiet(3);
  o.max_windows = 2;
  const auto limited = perplexity(Ids{0, 1, 2, 0, 1, 2, 0}, kVocab, kBos, std::ref(toy), o);
  EXPECT_EQ(limited.windows, 2);
  EXPECT_EQ(limited.tokens_scored, 4);
}

TEST(Perplexity, RejectsBadOptionsAndEmptyText) {
  ToyModel toy;
  EXPECT_THROW(perplexity(Ids{}, kVocab, kBos, std::ref(toy), quiet(4)), Error);
  EXPECT_THROW(perplexity(Ids{0}, kVocab, -1, std::ref(toy), quiet(4)), Error);
  EXPECT_THROW(perplexity(Ids{0, 1}, kVocab, kBos, std::ref(toy), quiet(1)), Error);
  EXPECT_THROW(perplexity(Ids{0, 1}, kVocab, kBos, std::ref(toy), quiet(4, 4)), Error);
}

TEST(Perplexity, WritesOneJsonLinePerWindow) {
  ToyModel toy;
  PerplexityOptions o = quiet(4);
  o.metrics = test::temp_dir() / "ppl.jsonl";
  perplexity(Ids{0, 1, 2, 0, 2, 1, 1}, kVocab, kBos, std::ref(toy), o);
  std::ifstream in(o.metrics);
  std::vector<nlohmann::json> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(lines[1]["window"], 1);
  EXPECT_EQ(lines[1]["scored"], 3);
  EXPECT_NEAR(lines[1]["mean_nll"].get<double>(), (kLog4 + 2 * kLog6) / 3, 1e-6);
}

// Examples packed into shared forwards score as each one alone does: stories260K (fp32), the
// loss computed here from one whole forward per example against example_loss at budgets that
// pack none, some and all of them.
TEST(ExampleLoss, PackedExamplesScoreAsEachOneAlone) {
  QL_REQUIRE_DATA("models/stories260K/stories260K.bin");
  const std::filesystem::path dir = test::data_dir() / "models/stories260K";
  const Model model = load_model(dir / "stories260K.bin", {.tokenizer = dir / "tok512.bin"});
  const Tokenizer& tok = model.require_tokenizer();
  std::vector<Example> examples;
  for (const char* text : {"Once upon a time there was a little girl named Lily.",
                           "The dog ran to the park and played with a ball all day long.",
                           "Tom was sad.", "She looked at the sky and saw a big bird fly by."}) {
    Example e;
    e.tokens = tok.encode(text, true);
    e.target.assign(e.tokens.size(), 0);
    for (size_t t = e.tokens.size() / 3; t < e.tokens.size(); ++t) e.target[t] = 1;
    examples.push_back(std::move(e));
  }
  InferenceSession session(model);
  const auto V = static_cast<size_t>(model.config.vocab_size);
  double nll = 0;
  int64_t scored = 0;
  for (const Example& e : examples) {
    std::vector<float> logits(e.tokens.size() * V);
    session.reset();
    session.forward(e.tokens, logits, /*all_logits=*/true);
    for (size_t t = 1; t < e.tokens.size(); ++t)
      if (e.target[t]) {
        nll += token_nll(std::span<const float>(logits).subspan((t - 1) * V, V), e.tokens[t]);
        ++scored;
      }
  }
  for (const int64_t budget : {1, 30, 512}) {
    const ExampleLoss r = example_loss(session, examples, false, nullptr, budget);
    EXPECT_EQ(r.examples, 4);
    EXPECT_EQ(r.tokens, scored);
    EXPECT_NEAR(r.nll_sum, nll, 1e-4 * nll) << budget;
  }
}

}  // namespace
}  // namespace qalora
