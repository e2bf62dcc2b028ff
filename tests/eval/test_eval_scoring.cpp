// The scorer and the metrics without a model: constructed logits with known answers, and a
// model of random logits that must score at chance on every multiple-choice task.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "qalora/core/error.h"
#include "qalora/core/hash.h"
#include "qalora/eval/evaluate.h"
#include "qalora/model/model.h"
#include "test_util.h"

namespace qalora {
namespace {

using Ids = std::vector<int32_t>;
constexpr int64_t kVocab = 6;

// p(next | current token) from a fixed table; logits are the log-probabilities.
double toy_prob(int32_t current, int32_t next) {
  static const double table[kVocab][kVocab] = {
      {0.5, 0.1, 0.1, 0.1, 0.1, 0.1},      {0.05, 0.05, 0.4, 0.3, 0.1, 0.1},
      {0.1, 0.1, 0.1, 0.1, 0.5, 0.1},      {0.1, 0.1, 0.1, 0.1, 0.1, 0.5},
      {0.2, 0.2, 0.2, 0.2, 0.1, 0.1},      {1.0 / 6, 1.0 / 6, 1.0 / 6, 1.0 / 6, 1.0 / 6, 1.0 / 6},
  };
  return table[current][next];
}

void toy_logits(std::span<const int32_t> tokens, std::span<float> logits) {
  for (size_t i = 0; i < tokens.size(); ++i)
    for (int32_t j = 0; j < kVocab; ++j)
      logits[i * kVocab + static_cast<size_t>(j)] = static_cast<float>(std::log(toy_prob(tokens[i], j)));
}

// Logits drawn at random from the token ids seen so far: a "model" that knows nothing.
void random_logits(std::span<const int32_t> tokens, std::span<float> logits, int64_t vocab) {
  uint64_t h = 0x5eed;
  for (size_t i = 0; i < tokens.size(); ++i) {
    h = derive_seed(h, static_cast<uint64_t>(tokens[i]));
    for (int64_t j = 0; j < vocab; ++j) {
      const uint64_t r = derive_seed(h, static_cast<uint64_t>(j));
      logits[i * static_cast<size_t>(vocab) + static_cast<size_t>(j)] =
          static_cast<float>(static_cast<double>(r >> 11) * 0x1.0p-53 * 8.0);
    }
  }
}

TEST(EvalScoring, ConstructedLogitsGiveKnownLoglikelihoodsAndPredictions) {
  LogitsScorer scorer(toy_logits, kVocab, 64);
  // Context ends in token 1: p(2|1) = 0.4, p(3|1) = 0.3, p(4|3) = 0.1 ... choice 0 = [2],
  // choice 1 = [3, 5] (0.3 * 0.5 = 0.15), choice 2 = [4] (0.1).
  const std::vector<ScoreRequest> requests = {{{0, 1}, {2}}, {{0, 1}, {3, 5}}, {{0, 1}, {4}}};
  // Character lengths chosen so that acc_norm prefers choice 1: log(0.4)/8 < log(0.15)/20.
  const std::vector<int64_t> chars = {8, 20, 3};
  const McItemResult r = score_choices(requests, chars, 1, scorer);
  ASSERT_EQ(r.choices.size(), 3u);
  EXPECT_NEAR(r.choices[0].loglik, std::log(0.4), 1e-6);
  EXPECT_NEAR(r.choices[1].loglik, std::log(0.3) + std::log(0.5), 1e-6);
  EXPECT_NEAR(r.choices[2].loglik, std::log(0.1), 1e-6);
  EXPECT_EQ(r.choices[1].tokens, 2);
  EXPECT_TRUE(r.choices[0].greedy);   // 2 is the argmax after 1
  EXPECT_FALSE(r.choices[1].greedy);  // 3 is not
  EXPECT_EQ(r.pred, 0);
  EXPECT_EQ(r.pred_norm, 1);
  EXPECT_FALSE(r.truncated);

  // Three items: right, wrong, right -> acc 2/3 with stderr sqrt(var / n), var = 1/3.
  McItemResult wrong = r, right = r;
  wrong.gold = 2;
  right.gold = 0;
  const std::vector<McItemResult> results = {right, wrong, right};
  const auto metrics = mc_metrics(results, true);
  ASSERT_EQ(metrics.size(), 2u);
  EXPECT_EQ(metrics[0].name, "acc");
  EXPECT_NEAR(metrics[0].value, 2.0 / 3, 1e-12);
  EXPECT_NEAR(metrics[0].stderr_, 1.0 / 3, 1e-12);
  EXPECT_EQ(metrics[1].name, "acc_norm");
  EXPECT_NEAR(metrics[1].value, 0.0, 1e-12);
}

TEST(EvalScoring, WindowTruncatesTheContextFromTheLeft) {
  const ScoreRequest r{{0, 1, 2, 3, 4, 5, 0, 1}, {2, 3, 4}, 5};
  ScoreWindow w = fit_window(r, 16);
  EXPECT_FALSE(w.truncated);
  EXPECT_EQ(w.tokens, (Ids{0, 1, 2, 3, 4, 5, 0, 1, 2, 3}));
  EXPECT_EQ(w.first_row, 7);
  EXPECT_EQ(w.ends, (std::vector<int64_t>{5, 8, 10}));
  w = fit_window(r, 6);  // keeps the last 6 of the 10 fed tokens
  EXPECT_TRUE(w.truncated);
  EXPECT_EQ(w.tokens, (Ids{4, 5, 0, 1, 2, 3}));
  EXPECT_EQ(w.first_row, 3);
  EXPECT_EQ(w.ends, (std::vector<int64_t>{1, 4, 6}));
  // The truncated request scores as the request of the kept tokens (logits that depend on
  // the whole history tell them apart from the full request).
  const auto history = [](std::span<const int32_t> t, std::span<float> l) {
    random_logits(t, l, kVocab);
  };
  LogitsScorer narrow(history, kVocab, 6), wide(history, kVocab, 64);
  const ContinuationScore cut = narrow.score(r);
  const ContinuationScore kept = wide.score({{4, 5, 0, 1}, {2, 3, 4}});
  EXPECT_TRUE(cut.truncated);
  EXPECT_FALSE(kept.truncated);
  EXPECT_DOUBLE_EQ(cut.loglik, kept.loglik);
  EXPECT_NE(cut.loglik, wide.score(r).loglik);
  EXPECT_THROW(fit_window(r, 2), Error);  // the continuation alone is longer
}

TEST(EvalScoring, MeanStderrIsTheSampleStandardDeviationOverRootN) {
  const std::vector<double> v = {1, 2, 3, 4};
  const Metric m = mean_metric("x", v);
  EXPECT_DOUBLE_EQ(m.value, 2.5);
  EXPECT_NEAR(m.stderr_, std::sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3 / 4), 1e-15);
  EXPECT_TRUE(std::isnan(mean_metric("one", std::vector<double>{1}).stderr_));
}

TEST(EvalScoring, MmluAveragesMicroMacroAndPerCategory) {
  auto item = [](const char* subject, bool right) {
    McItemResult r;
    r.group = subject;
    r.gold = 0;
    r.pred = right ? 0 : 1;
    return r;
  };
  // anatomy (stem) 2/2, virology (other) 1/4: micro 3/6, macro (1 + 0.25) / 2.
  const std::vector<McItemResult> results = {
      item("anatomy", true),   item("anatomy", true),   item("virology", true),
      item("virology", false), item("virology", false), item("virology", false)};
  const auto m = mmlu_metrics(results);
  ASSERT_EQ(m.size(), 4u);
  EXPECT_EQ(m[0].name, "acc");
  EXPECT_DOUBLE_EQ(m[0].value, 0.5);
  EXPECT_EQ(m[1].name, "acc_macro");
  EXPECT_DOUBLE_EQ(m[1].value, 0.625);
  EXPECT_EQ(m[2].name, "acc_stem");
  EXPECT_DOUBLE_EQ(m[2].value, 1.0);
  EXPECT_EQ(m[3].name, "acc_other");
  EXPECT_DOUBLE_EQ(m[3].value, 0.25);
}

// Random logits score at chance (the mean of 1/choices) within three standard errors, on every
// multiple-choice task's real data.
TEST(EvalScoring, RandomLogitsScoreAtChance) {
  QL_REQUIRE_DATA("models/stories260K/stories260K.bin");
  QL_REQUIRE_DATA("eval/mc/hellaswag_val_1000.jsonl");
  const auto dir = test::data_dir();
  const Model model = load_model(dir / "models/stories260K/stories260K.bin",
                                 {.tokenizer = dir / "models/stories260K/tok512.bin"});
  const Tokenizer& tok = model.require_tokenizer();
  const int64_t vocab = tok.vocab_size();
  const PromptEncoder encoder(tok);
  LogitsScorer scorer(
      [vocab](std::span<const int32_t> t, std::span<float> l) { random_logits(t, l, vocab); },
      vocab, 100000);

  const std::vector<std::pair<TaskKind, std::string>> tasks = {
      {TaskKind::Arc, "arc_easy.jsonl"}, {TaskKind::Hellaswag, "hellaswag_val_1000.jsonl"},
      {TaskKind::Piqa, "piqa.jsonl"},    {TaskKind::Boolq, "boolq.jsonl"},
      {TaskKind::Winogrande, "winogrande.jsonl"}, {TaskKind::Mmlu, ""}};
  for (const auto& [kind, file] : tasks) {
    std::vector<McItem> items;
    if (kind == TaskKind::Mmlu) {
      items = read_mmlu(dir / "eval/mmlu", 1, 6, 3);
    } else {
      const auto all = read_mc_task(kind, dir / "eval/mc" / file);
      for (size_t i : seeded_subset(all.size(), 300, 3)) items.push_back(all[i]);
    }
    std::vector<McItemResult> results;
    double chance = 0;
    for (const McItem& item : items) {
      results.push_back(score_mc_item(item, encoder, scorer));
      chance += 1.0 / static_cast<double>(item.contexts.size());
    }
    chance /= static_cast<double>(items.size());
    for (const Metric& m : mc_metrics(results, reports_acc_norm(kind))) {
      std::printf("%-10s %-8s %.4f ± %.4f (chance %.4f)\n", task_name(kind), m.name.c_str(),
                  m.value, m.stderr_, chance);
      EXPECT_LE(std::abs(m.value - chance), 3 * m.stderr_) << task_name(kind) << " " << m.name;
    }
  }
}

}  // namespace
}  // namespace qalora
