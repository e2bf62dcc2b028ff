// Scoring on real models: the shared-prefix path against scoring every request from scratch
// (stories260K, SmolLM2-135M), and SmolLM2's per-choice log-likelihoods against an independent
// numpy scorer over an independent forward (tests/eval/numpy_scorer.py).
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "qalora/core/mapped_file.h"
#include "qalora/eval/evaluate.h"
#include "qalora/model/runtime.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;

// Thousands of small batches: on a shared machine a thread team costs more than it saves.
struct OneThread {
  int saved = num_threads();
  OneThread() { set_num_threads(1); }
  ~OneThread() { set_num_threads(saved); }
  OneThread(const OneThread&) = delete;
  OneThread& operator=(const OneThread&) = delete;
};

std::vector<McItem> first_items(TaskKind kind, const std::string& file, int64_t n) {
  const auto all = read_mc_task(kind, test::data_dir() / "eval/mc" / file);
  std::vector<McItem> items;
  for (size_t i : seeded_subset(all.size(), n, 11)) items.push_back(all[i]);
  return items;
}

// Every choice's log-likelihood, item by item.
std::vector<double> score_all(const std::vector<McItem>& items, const PromptEncoder& encoder,
                              Scorer& scorer, int64_t* truncated = nullptr) {
  std::vector<double> out;
  for (const McItem& item : items) {
    const McItemResult r = score_mc_item(item, encoder, scorer);
    for (const ContinuationScore& s : r.choices) out.push_back(s.loglik);
    if (truncated && r.truncated) ++*truncated;
  }
  return out;
}

// The same from one score_all call over every item's requests, as eval's chunks make it.
std::vector<double> score_packed(const std::vector<McItem>& items, const PromptEncoder& encoder,
                                 PackedScorer& scorer) {
  std::vector<ScoreRequest> requests;
  for (const McItem& item : items)
    for (ScoreRequest& r : mc_requests(item, encoder)) requests.push_back(std::move(r));
  std::vector<double> out;
  for (const ContinuationScore& s : scorer.score_all(requests)) out.push_back(s.loglik);
  return out;
}

double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  EXPECT_EQ(a.size(), b.size());
  double d = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) d = std::max(d, std::abs(a[i] - b[i]));
  return d;
}

// Shared prefixes (choices of an item, an MMLU subject's shots) against the same segments
// computed from scratch, and against one whole-window forward per request.
void expect_shared_matches_scratch(const Model& model, const std::vector<McItem>& items,
                                   bool check_single_batch) {
  const OneThread one_thread;
  const PromptEncoder encoder(model.require_tokenizer());
  InferenceSession session(model);
  for (const McItem& item : items) {
    if (item.prefix_chars == 0) continue;
    // An MMLU prompt's header and shots form a shared segment.
    const ScoreRequest r =
        encoder.encode_pair(item.contexts[0], item.continuations[0], item.prefix_chars);
    EXPECT_GT(r.prefix, 0) << item.group << " " << item.index;
  }

  CachedSession shared(session, /*share_prefix=*/true);
  SessionScorer shared_scorer(shared);
  int64_t truncated = 0;
  const auto a = score_all(items, encoder, shared_scorer, &truncated);
  const int64_t shared_fed = shared.tokens_fed();

  CachedSession scratch(session, /*share_prefix=*/false);
  SessionScorer scratch_scorer(scratch);
  const auto b = score_all(items, encoder, scratch_scorer);
  std::printf("%zu choices, %lld truncated; fed %lld tokens shared, %lld from scratch\n",
              a.size(), static_cast<long long>(truncated), static_cast<long long>(shared_fed),
              static_cast<long long>(scratch.tokens_fed()));
  EXPECT_LE(max_abs_diff(a, b), 1e-4);
  EXPECT_LT(shared_fed * 4, scratch.tokens_fed() * 3);

  // Packed batches (one request at a time, a budget that cuts items apart, the default): the
  // same numbers where every batch runs exactly (fp32 weights), else those of exact scoring.
  if (check_single_batch) {
    for (const int64_t budget : {1, 37, 512}) {
      CachedSession cache(session);
      PackedScorer packed(cache, budget);
      EXPECT_LE(max_abs_diff(a, score_packed(items, encoder, packed)), 1e-4) << budget;
    }
  }

  if (!check_single_batch) return;
  LogitsScorer whole(
      [&session](std::span<const int32_t> tokens, std::span<float> logits) {
        session.reset();
        session.forward(tokens, logits, /*all_logits=*/true);
      },
      model.config.vocab_size, session.max_context());
  EXPECT_LE(max_abs_diff(a, score_all(items, encoder, whole)), 1e-4);
}

TEST(EvalModels, StoriesSharedPrefixMatchesFromScratch) {
  QL_REQUIRE_DATA("models/stories260K/stories260K.bin");
  QL_REQUIRE_DATA("eval/mc/hellaswag_val_1000.jsonl");
  const fs::path dir = test::data_dir() / "models/stories260K";
  const Model model = load_model(dir / "stories260K.bin", {.tokenizer = dir / "tok512.bin"});
  std::vector<McItem> items = first_items(TaskKind::Hellaswag, "hellaswag_val_1000.jsonl", 10);
  const auto wino = first_items(TaskKind::Winogrande, "winogrande.jsonl", 6);
  items.insert(items.end(), wino.begin(), wino.end());
  // 2-shot MMLU, two questions per subject: the prefix is shared across items, and in
  // stories' 512-token window the longer prompts are truncated from the left.
  const auto mmlu = read_mmlu(test::data_dir() / "eval/mmlu", 2, 2, 5);
  items.insert(items.end(), mmlu.begin(), mmlu.begin() + 8);
  // fp32 weights: one whole-window forward gives the same numbers up to float rounding.
  expect_shared_matches_scratch(model, items, /*check_single_batch=*/true);
}

TEST(EvalModels, SmolLM2SharedPrefixMatchesFromScratch) {
  QL_SKIP_UNDER_SANITIZERS("SmolLM2 scoring; stories260K covers the same code");
  QL_REQUIRE_SMOLLM2();
  QL_REQUIRE_DATA("eval/mc/hellaswag_val_1000.jsonl");
  const Model model = load_model(test::smollm2_path());
  std::vector<McItem> items = first_items(TaskKind::Hellaswag, "hellaswag_val_1000.jsonl", 5);
  const auto mmlu = read_mmlu(test::data_dir() / "eval/mmlu", 2, 2, 5);
  items.insert(items.end(), mmlu.begin(), mmlu.begin() + 4);
  // Q4_1 weights: batches of a few tokens run with int8 activations, so only the same
  // segments computed from scratch are comparable (packed scoring is checked against numpy).
  expect_shared_matches_scratch(model, items, /*check_single_batch=*/false);
}

// SmolLM2 against numpy_scorer.py in float64 over the same token ids: one request at a time on
// the dequantized weights (so that every batch is exact fp32), or packed on the Q4_1 weights
// themselves (a packed batch is long enough to run exactly). Tokenization is tested on its own
// (tests/tokenizer).
void expect_matches_numpy(TaskKind kind, const std::string& file, int64_t n_items, bool packed) {
  const OneThread one_thread;
  Model model = load_model(test::smollm2_path());
  if (!packed) dequantize_weights(model);
  const PromptEncoder encoder(model.require_tokenizer());
  InferenceSession session(model);
  CachedSession cache(session);
  SessionScorer one_at_a_time(cache);
  PackedScorer batched(cache, 512);
  Scorer& scorer = packed ? static_cast<Scorer&>(batched) : one_at_a_time;

  const auto items = first_items(kind, file, n_items);
  nlohmann::json requests = nlohmann::json::array();
  std::vector<std::vector<double>> ours;
  for (const McItem& item : items) {
    nlohmann::json conts = nlohmann::json::array();
    std::vector<int32_t> context;
    for (size_t i = 0; i < item.contexts.size(); ++i) {
      const ScoreRequest r = encoder.encode_pair(item.contexts[i], item.continuations[i]);
      if (i == 0) context = r.context;
      ASSERT_EQ(r.context, context) << "the choices of an item share their context";
      conts.push_back(r.continuation);
    }
    requests.push_back({{"context", context}, {"continuations", conts}});
    std::vector<double> ll;
    for (const ContinuationScore& s : score_mc_item(item, encoder, scorer).choices)
      ll.push_back(s.loglik);
    ours.push_back(ll);
  }
  const fs::path in = test::temp_dir() / "requests.json", out = test::temp_dir() / "numpy.json";
  std::ofstream(in) << nlohmann::json{{"items", requests}}.dump();
  std::string err;
  const int rc = test::run_python(fs::path(__FILE__).parent_path() / "numpy_scorer.py",
                                  {test::smollm2_path().string(), in.string(), out.string()}, err);
  if (rc == test::kPythonMissing) GTEST_SKIP() << "numpy/gguf unavailable: " << err;
  ASSERT_EQ(rc, 0) << err;
  const auto theirs =
      nlohmann::json::parse(read_file(out))["loglik"].get<std::vector<std::vector<double>>>();
  ASSERT_EQ(theirs.size(), ours.size());

  double worst = 0;
  int64_t compared = 0;
  for (size_t i = 0; i < ours.size(); ++i) {
    ASSERT_EQ(ours[i].size(), theirs[i].size());
    for (size_t c = 0; c < ours[i].size(); ++c)
      worst = std::max(worst, std::abs(ours[i][c] - theirs[i][c]) / (1 + std::abs(theirs[i][c])));
    // The chosen index, where numpy's top two are not a near-tie.
    std::vector<double> sorted = theirs[i];
    std::sort(sorted.rbegin(), sorted.rend());
    if (sorted[0] - sorted[1] <= 1e-3) continue;
    const auto pick = [](const std::vector<double>& v) {
      return std::max_element(v.begin(), v.end()) - v.begin();
    };
    EXPECT_EQ(pick(ours[i]), pick(theirs[i])) << task_name(kind) << " item " << items[i].index;
    ++compared;
  }
  std::printf("%s: %zu items, %lld choices compared, max relative loglik difference %.3g\n",
              task_name(kind), items.size(), static_cast<long long>(compared), worst);
  EXPECT_LT(worst, 1e-4);
  EXPECT_GE(compared, n_items * 9 / 10);
}

TEST(EvalModels, SmolLM2ArcMatchesNumpyScorer) {
  QL_SKIP_UNDER_SANITIZERS("SmolLM2 scoring; stories260K covers the same code");
  QL_REQUIRE_SMOLLM2();
  QL_REQUIRE_DATA("eval/mc/arc_easy.jsonl");
  expect_matches_numpy(TaskKind::Arc, "arc_easy.jsonl", 25, /*packed=*/false);
}

TEST(EvalModels, SmolLM2HellaswagMatchesNumpyScorer) {
  QL_SKIP_UNDER_SANITIZERS("SmolLM2 scoring; stories260K covers the same code");
  QL_REQUIRE_SMOLLM2();
  QL_REQUIRE_DATA("eval/mc/hellaswag_val_1000.jsonl");
  expect_matches_numpy(TaskKind::Hellaswag, "hellaswag_val_1000.jsonl", 25, /*packed=*/true);
}

}  // namespace
}  // namespace qalora
