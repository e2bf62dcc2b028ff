// `qalora eval` below the CLI: runs one task over a model (task readers -> requests -> scorer
// -> metrics) and reports its metrics with standard errors and every item's predictions and
// log-likelihoods, so that two runs or two engines can be compared item by item.
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <span>
#include <string>
#include <vector>

#include "qalora/eval/scorer.h"
#include "qalora/eval/tasks.h"
#include "qalora/model/model.h"

namespace qalora {

class Communicator;

struct Metric {
  std::string name;
  double value = 0;
  double stderr_ = std::numeric_limits<double>::quiet_NaN();  // NaN: none
};

// Mean of `values` and its standard error: the sample standard deviation (n - 1) over sqrt(n),
// lm-evaluation-harness's mean_stderr (NaN for fewer than two values).
Metric mean_metric(std::string name, std::span<const double> values);

// One multiple-choice item scored: a ContinuationScore per choice.
struct McItemResult {
  int64_t index = 0;
  std::string group;
  int64_t gold = 0;
  std::vector<ContinuationScore> choices;
  std::vector<int64_t> norm_chars;
  int64_t pred = 0;       // argmax of the log-likelihoods (first on ties)
  int64_t pred_norm = 0;  // argmax of loglik / norm_chars
  bool truncated = false;
};

// The predictions from each choice's score.
McItemResult choose(std::vector<ContinuationScore> scores, std::span<const int64_t> norm_chars,
                    int64_t gold);
// Scores each request (choice) and picks the predictions.
McItemResult score_choices(std::span<const ScoreRequest> requests,
                           std::span<const int64_t> norm_chars, int64_t gold, Scorer& scorer);
// An McItem's requests, one per choice, through the encoder.
std::vector<ScoreRequest> mc_requests(const McItem& item, const PromptEncoder& encoder);
// An McItem through the encoder and the scorer.
McItemResult score_mc_item(const McItem& item, const PromptEncoder& encoder, Scorer& scorer);

// acc, and acc_norm when with_norm, each with its standard error.
std::vector<Metric> mc_metrics(std::span<const McItemResult> results, bool with_norm);
// MMLU: acc (micro average over all questions), acc_macro (mean of the subjects' accuracies;
// stderr from the subjects' own standard errors), and acc_<category> (micro within each of
// stem, humanities, social_sciences, other that has questions).
std::vector<Metric> mmlu_metrics(std::span<const McItemResult> results);

struct EvalOptions {
  int64_t shots = 0;                   // mmlu and gsm8k (other tasks ignore it)
  std::filesystem::path shots_data;    // gsm8k: {question, answer} JSON lines to draw shots from
  int64_t limit = 0;                   // > 0: a seeded subset (per subject for mmlu)
  uint64_t seed = 1234;
  bool share_prefix = true;            // false: score every request from scratch
  // > 0: pack many items' requests into forwards of about this many tokens (PackedScorer);
  // 0: one request at a time.
  int64_t batch_tokens = 512;
  bool progress = true;
  int64_t max_new_tokens = 256;        // gsm8k
  // Ranks that share the items (each scores every ranks-th; every rank gets the whole report);
  // null: this process scores them all.
  Communicator* comm = nullptr;
};

struct TaskReport {
  std::string task;
  std::string data;
  int64_t n = 0;
  int64_t shots = 0;
  std::vector<Metric> metrics;
  int64_t truncated = 0;      // items whose context lost tokens on the left
  double seconds = 0;
  int64_t tokens_scored = 0;  // continuation tokens whose log-likelihood was taken
  int64_t tokens_fed = 0;     // positions the model computed (prefixes shared or not)
  nlohmann::json items = nlohmann::json::array();
};

class Evaluator {
 public:
  // `session` sets the context window; `encoder` the text-to-ids rules (chat template or not).
  Evaluator(InferenceSession& session, const PromptEncoder& encoder, EvalOptions options);
  TaskReport run(TaskKind kind, const std::filesystem::path& data);

 private:
  TaskReport run_mc(TaskKind kind, const std::filesystem::path& data);
  TaskReport run_cloze(const std::filesystem::path& data);
  TaskReport run_gsm8k(const std::filesystem::path& data);
  TaskReport run_ppl(const std::filesystem::path& data);

  InferenceSession& session_;
  const PromptEncoder& encoder_;
  EvalOptions options_;
};

// Replaces every quantized linear layer and the quantized head by its fp32 dequantization
// (4 bytes per parameter). Scoring then runs every batch in exact fp32: the runtime otherwise
// dequantizes whole matrices for each batch above a few tokens (costly for the short batches
// of continuations) and quantizes activations to int8 below that.
void dequantize_weights(Model& model);

// A table: task, n, metric, value ± stderr, one row per metric, and each task's truncated
// count, time, and tokens per second.
std::string format_table(std::span<const TaskReport> reports);
nlohmann::json report_json(const TaskReport& report);

}  // namespace qalora
