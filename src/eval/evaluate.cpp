#include "qalora/eval/evaluate.h"

#include <algorithm>
#include <array>
#include <cstdio>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <optional>

#include "qalora/adapters/adapter.h"
#include "qalora/core/clock.h"
#include "qalora/core/error.h"
#include "qalora/core/hash.h"
#include "qalora/core/mapped_file.h"
#include "qalora/core/progress.h"
#include "qalora/dist/communicator.h"
#include "qalora/eval/gsm8k.h"
#include "qalora/eval/perplexity.h"
#include "qalora/model/runtime.h"

namespace qalora {

using nlohmann::json;

namespace {

constexpr std::array<const char*, 4> kMmluCategories = {"stem", "humanities", "social_sciences",
                                                         "other"};

// Index of the largest value, the first one on ties.
int64_t best(const std::vector<double>& values) {
  return std::max_element(values.begin(), values.end()) - values.begin();
}

std::string fraction_status(const char* name, int64_t hits, int64_t done) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%s %.4f", name,
                done > 0 ? static_cast<double>(hits) / static_cast<double>(done) : 0.0);
  return buf;
}

json stderr_json(double s) { return std::isnan(s) ? json(nullptr) : json(s); }

// Runs item(k) for k in [0, n), each rank its share (k % ranks == rank), and gathers the
// records so that every rank holds all n, in order; the metrics are then computed from them.
std::vector<json> share_items(Communicator* comm, size_t n,
                              const std::function<json(size_t k)>& item) {
  std::vector<json> all(n);
  const Share share(comm);
  if (share.ranks == 1) {
    for (size_t k = 0; k < n; ++k) all[k] = item(k);
    return all;
  }
  json mine = json::array();
  share.for_each(static_cast<int64_t>(n), [&](int64_t k) {
    mine.push_back({k, item(static_cast<size_t>(k))});
  });
  for (int r = 0; r < share.ranks; ++r)
    for (const json& kj :
         json::parse(comm->broadcast_string(r == share.rank ? mine.dump() : "", r)))
      all[kj[0].get<size_t>()] = kj[1];
  return all;
}

// Positions all ranks computed.
int64_t total_fed(Communicator* comm, int64_t mine) {
  double fed = static_cast<double>(mine);
  if (comm) comm->all_reduce_sum(&fed, 1);
  return static_cast<int64_t>(fed);
}

// Starts the progress bar of a task's n items on rank 0 (counting its own share), if asked for.
void start_progress(std::optional<ProgressBar>& bar, const EvalOptions& o, const char* name,
                    size_t n) {
  if (o.progress && (o.comm == nullptr || o.comm->is_root()))
    bar.emplace(name, Share(o.comm).count(static_cast<int64_t>(n)));
}

// Adds an item's record to the report: its tokens scored (one count, or one per choice),
// whether its context was truncated, and the record itself.
void add_record(TaskReport& report, const json& j) {
  const json& tokens = j["tokens"];
  if (tokens.is_array()) {
    for (const json& t : tokens) report.tokens_scored += t.get<int64_t>();
  } else {
    report.tokens_scored += tokens.get<int64_t>();
  }
  report.truncated += j.contains("truncated") ? 1 : 0;
  report.items.push_back(j);
}

// The scorer a task uses: packed batches, or one request at a time (--batch-tokens 0, and the
// from-scratch path of --no-shared-prefix).
std::unique_ptr<Scorer> make_scorer(CachedSession& cache, const EvalOptions& o) {
  if (o.share_prefix && o.batch_tokens > 0)
    return std::make_unique<PackedScorer>(cache, o.batch_tokens);
  return std::make_unique<SessionScorer>(cache);
}

// Each item's scores, computed for a chunk of this rank's items at a time: one score_all call
// over their requests lets a packed scorer batch them (and the progress bar still moves).
class ChunkedScores {
 public:
  static constexpr size_t kChunkItems = 64;
  ChunkedScores(size_t n, const Share& share,
                std::function<std::vector<ScoreRequest>(size_t)> requests_of, Scorer& scorer)
      : n_(n), share_(share), requests_of_(std::move(requests_of)), scorer_(scorer) {}

  // The scores of item k's requests; k is one of this rank's items, asked for in order.
  std::vector<ContinuationScore> of(size_t k) {
    if (!ready_.contains(k)) {
      ready_.clear();
      std::vector<ScoreRequest> requests;
      std::vector<std::pair<size_t, size_t>> spans;  // item, its request count
      for (size_t j = k; j < n_ && spans.size() < kChunkItems;
           j += static_cast<size_t>(share_.ranks)) {
        std::vector<ScoreRequest> mine = requests_of_(j);
        spans.emplace_back(j, mine.size());
        std::move(mine.begin(), mine.end(), std::back_inserter(requests));
      }
      const std::vector<ContinuationScore> scores = scorer_.score_all(requests);
      auto at = scores.begin();
      for (const auto& [item, count] : spans) {
        ready_[item].assign(at, at + static_cast<std::ptrdiff_t>(count));
        at += static_cast<std::ptrdiff_t>(count);
      }
    }
    return std::move(ready_.at(k));
  }

 private:
  size_t n_;
  Share share_;
  std::function<std::vector<ScoreRequest>(size_t)> requests_of_;
  Scorer& scorer_;
  std::map<size_t, std::vector<ContinuationScore>> ready_;
};

}  // namespace

Metric mean_metric(std::string name, std::span<const double> values) {
  Metric m{std::move(name)};
  const auto n = static_cast<double>(values.size());
  if (values.empty()) return m;
  for (double v : values) m.value += v;
  m.value /= n;
  if (values.size() < 2) return m;
  double ss = 0;
  for (double v : values) ss += (v - m.value) * (v - m.value);
  m.stderr_ = std::sqrt(ss / (n - 1) / n);
  return m;
}

McItemResult choose(std::vector<ContinuationScore> scores, std::span<const int64_t> norm_chars,
                    int64_t gold) {
  QL_CHECK(scores.size() == norm_chars.size() && !scores.empty(), "choose: ", scores.size(),
           " scores for ", norm_chars.size(), " choice lengths");
  McItemResult r;
  r.gold = gold;
  r.norm_chars.assign(norm_chars.begin(), norm_chars.end());
  r.choices = std::move(scores);
  std::vector<double> raw, normed;
  for (size_t i = 0; i < r.choices.size(); ++i) {
    r.truncated = r.truncated || r.choices[i].truncated;
    raw.push_back(r.choices[i].loglik);
    normed.push_back(r.choices[i].loglik /
                     static_cast<double>(std::max<int64_t>(1, norm_chars[i])));
  }
  r.pred = best(raw);
  r.pred_norm = best(normed);
  return r;
}

McItemResult score_choices(std::span<const ScoreRequest> requests,
                           std::span<const int64_t> norm_chars, int64_t gold, Scorer& scorer) {
  return choose(scorer.score_all(requests), norm_chars, gold);
}

std::vector<ScoreRequest> mc_requests(const McItem& item, const PromptEncoder& encoder) {
  std::vector<ScoreRequest> requests;
  for (size_t i = 0; i < item.contexts.size(); ++i)
    requests.push_back(
        encoder.encode_pair(item.contexts[i], item.continuations[i], item.prefix_chars));
  return requests;
}

McItemResult score_mc_item(const McItem& item, const PromptEncoder& encoder, Scorer& scorer) {
  McItemResult r = score_choices(mc_requests(item, encoder), item.norm_chars, item.gold, scorer);
  r.index = item.index;
  r.group = item.group;
  return r;
}

std::vector<Metric> mc_metrics(std::span<const McItemResult> results, bool with_norm) {
  std::vector<double> acc, acc_norm;
  for (const McItemResult& r : results) {
    acc.push_back(r.pred == r.gold ? 1.0 : 0.0);
    acc_norm.push_back(r.pred_norm == r.gold ? 1.0 : 0.0);
  }
  std::vector<Metric> metrics = {mean_metric("acc", acc)};
  if (with_norm) metrics.push_back(mean_metric("acc_norm", acc_norm));
  return metrics;
}

std::vector<Metric> mmlu_metrics(std::span<const McItemResult> results) {
  std::vector<double> all;
  std::map<std::string, std::vector<double>> by_subject, by_category;
  for (const McItemResult& r : results) {
    const double hit = r.pred == r.gold ? 1.0 : 0.0;
    all.push_back(hit);
    by_subject[r.group].push_back(hit);
    by_category[mmlu_category(r.group)].push_back(hit);
  }
  std::vector<Metric> metrics = {mean_metric("acc", all)};
  Metric macro{"acc_macro"};
  double var = 0;
  for (const auto& [subject, hits] : by_subject) {
    const Metric m = mean_metric(subject, hits);
    macro.value += m.value;
    var += m.stderr_ * m.stderr_;  // NaN (a one-question subject) makes the stderr NaN
  }
  const auto subjects = static_cast<double>(by_subject.size());
  macro.value /= subjects;
  macro.stderr_ = std::sqrt(var) / subjects;
  metrics.push_back(macro);
  for (const char* category : kMmluCategories)
    if (by_category.contains(category))
      metrics.push_back(mean_metric(cat("acc_", category), by_category[category]));
  return metrics;
}

Evaluator::Evaluator(InferenceSession& session, const PromptEncoder& encoder, EvalOptions options)
    : session_(session), encoder_(encoder), options_(std::move(options)) {}

TaskReport Evaluator::run(TaskKind kind, const std::filesystem::path& data) {
  QL_CHECK(options_.shots >= 0, "--shots must be >= 0, got ", options_.shots);
  QL_CHECK(options_.limit >= 0, "--limit must be >= 0 (0 = all items), got ", options_.limit);
  const auto start = Clock::now();
  TaskReport r;
  switch (kind) {
    case TaskKind::Cloze:
      r = run_cloze(data);
      break;
    case TaskKind::Gsm8k:
      r = run_gsm8k(data);
      break;
    case TaskKind::Ppl:
      r = run_ppl(data);
      break;
    default:
      r = run_mc(kind, data);
  }
  r.task = task_name(kind);
  r.data = data.string();
  r.shots = uses_shots(kind) ? options_.shots : 0;
  r.seconds = seconds_since(start);
  return r;
}

TaskReport Evaluator::run_mc(TaskKind kind, const std::filesystem::path& data) {
  std::vector<McItem> items;
  if (kind == TaskKind::Mmlu) {
    items = read_mmlu(data, options_.shots, options_.limit, options_.seed);
  } else {
    std::vector<McItem> all = read_mc_task(kind, data);
    for (size_t i : seeded_subset(all.size(), options_.limit, options_.seed))
      items.push_back(std::move(all[i]));
  }
  CachedSession cache(session_, options_.share_prefix);
  const std::unique_ptr<Scorer> scorer = make_scorer(cache, options_);
  ChunkedScores scores(
      items.size(), Share(options_.comm), [&](size_t k) { return mc_requests(items[k], encoder_); },
      *scorer);
  std::optional<ProgressBar> bar;
  start_progress(bar, options_, task_name(kind), items.size());
  const bool with_norm = reports_acc_norm(kind);

  int64_t hits = 0, done = 0;
  const std::vector<json> records = share_items(options_.comm, items.size(), [&](size_t k) {
    McItemResult res = choose(scores.of(k), items[k].norm_chars, items[k].gold);
    res.index = items[k].index;
    res.group = items[k].group;
    json j = {{"index", res.index}};
    if (!res.group.empty()) j["subject"] = res.group;
    j["gold"] = res.gold;
    j["pred"] = res.pred;
    if (with_norm) j["pred_norm"] = res.pred_norm;
    json loglik = json::array(), tokens = json::array();
    for (const ContinuationScore& s : res.choices) {
      loglik.push_back(s.loglik);
      tokens.push_back(s.tokens);
    }
    j["loglik"] = std::move(loglik);
    j["tokens"] = std::move(tokens);
    if (res.truncated) j["truncated"] = true;
    hits += res.pred == res.gold ? 1 : 0;
    if (bar) {
      bar->set_status(fraction_status("acc", hits, ++done));
      bar->advance();
    }
    return j;
  });

  TaskReport report;
  std::vector<McItemResult> results;  // what the metrics read, from every rank's records
  for (const json& j : records) {
    McItemResult r;
    r.group = j.value("subject", "");
    r.gold = j["gold"].get<int64_t>();
    r.pred = j["pred"].get<int64_t>();
    r.pred_norm = j.value("pred_norm", int64_t{0});
    results.push_back(std::move(r));
    add_record(report, j);
  }
  report.n = static_cast<int64_t>(results.size());
  report.metrics = kind == TaskKind::Mmlu ? mmlu_metrics(results) : mc_metrics(results, with_norm);
  report.tokens_fed = total_fed(options_.comm, cache.tokens_fed());
  return report;
}

TaskReport Evaluator::run_cloze(const std::filesystem::path& data) {
  const std::vector<ClozeItem> all = read_cloze(data);
  CachedSession cache(session_, options_.share_prefix);
  const std::unique_ptr<Scorer> scorer = make_scorer(cache, options_);
  const auto subset = seeded_subset(all.size(), options_.limit, options_.seed);
  ChunkedScores scores(
      subset.size(), Share(options_.comm),
      [&](size_t k) {
        const ClozeItem& item = all[subset[k]];
        return std::vector<ScoreRequest>{encoder_.encode_pair(item.context, item.continuation)};
      },
      *scorer);
  std::optional<ProgressBar> bar;
  start_progress(bar, options_, "cloze", subset.size());

  int64_t greedy = 0, done = 0;
  const std::vector<json> records = share_items(options_.comm, subset.size(), [&](size_t k) {
    const ClozeItem& item = all[subset[k]];
    const ContinuationScore s = scores.of(k).front();
    json j = {
        {"index", item.index}, {"loglik", s.loglik}, {"tokens", s.tokens}, {"greedy", s.greedy}};
    if (s.truncated) j["truncated"] = true;
    greedy += s.greedy ? 1 : 0;
    if (bar) {
      bar->set_status(fraction_status("acc", greedy, ++done));
      bar->advance();
    }
    return j;
  });

  TaskReport report;
  std::vector<double> hits, logliks;
  for (const json& j : records) {
    hits.push_back(j["greedy"].get<bool>() ? 1.0 : 0.0);
    logliks.push_back(j["loglik"].get<double>());
    add_record(report, j);
  }
  report.n = static_cast<int64_t>(hits.size());
  // The harness's LAMBADA perplexity: exp of minus the mean log-likelihood per item.
  const Metric mean_ll = mean_metric("loglik", logliks);
  report.metrics = {mean_metric("acc", hits), Metric{"ppl", std::exp(-mean_ll.value)}};
  report.tokens_fed = total_fed(options_.comm, cache.tokens_fed());
  return report;
}

TaskReport Evaluator::run_gsm8k(const std::filesystem::path& data) {
  const int64_t k = options_.shots;
  std::vector<Gsm8kItem> shots;
  if (k > 0) {
    QL_CHECK(!options_.shots_data.empty(), "gsm8k: --shots ", k,
             " needs --shots-data (a JSON lines file of {question, answer})");
    const std::vector<Gsm8kItem> train = read_gsm8k(options_.shots_data);
    QL_CHECK(k <= static_cast<int64_t>(train.size()), "gsm8k: --shots ", k, " exceeds the ",
             train.size(), " examples of ", options_.shots_data.string());
    // The same seeded shots for every question: their prefix is computed once.
    for (size_t i : seeded_subset(train.size(), k, derive_seed(options_.seed, 1)))
      shots.push_back(train[i]);
  }
  const std::vector<Gsm8kItem> all = read_gsm8k(data);
  const auto subset = seeded_subset(all.size(), options_.limit, options_.seed);
  const Tokenizer& tok = encoder_.tokenizer();
  const std::vector<std::string> stops = {"Question:", "\n\n"};
  std::vector<int32_t> stop_tokens = {tok.eos_id()};
  if (encoder_.chat()) stop_tokens = encoder_.chat()->stop_tokens();
  CachedSession cache(session_, options_.share_prefix);
  std::optional<ProgressBar> bar;
  start_progress(bar, options_, "gsm8k", subset.size());

  int64_t flex_count = 0, done = 0;
  const std::vector<json> records = share_items(options_.comm, subset.size(), [&](size_t at) {
    const Gsm8kItem& item = all[subset[at]];
    const std::string prompt = gsm8k_prompt(shots, item.question);
    const size_t prefix_chars = prompt.size() - gsm8k_prompt({}, item.question).size();
    const Generation g = generate_until(cache, tok, encoder_.encode_context(prompt, prefix_chars),
                                        stops, stop_tokens, options_.max_new_tokens);
    const std::string gold = gsm8k_normalize(gsm8k_marked_number(item.answer).value_or(""));
    const auto strict = gsm8k_marked_number(g.text);
    const auto flexible = gsm8k_last_number(g.text);
    const bool strict_ok = strict && gsm8k_normalize(*strict) == gold;
    const bool flex_ok = flexible && gsm8k_normalize(*flexible) == gold;
    json j = {{"index", item.index},          {"gold", gold},
              {"generation", g.text},         {"strict", strict.value_or("")},
              {"flexible", flexible.value_or("")}, {"correct_strict", strict_ok},
              {"correct_flexible", flex_ok},  {"tokens", g.tokens}};
    if (g.truncated) j["truncated"] = true;
    flex_count += flex_ok ? 1 : 0;
    if (bar) {
      bar->set_status(fraction_status("em", flex_count, ++done));
      bar->advance();
    }
    return j;
  });

  TaskReport report;
  std::vector<double> strict_hits, flex_hits;
  for (const json& j : records) {
    strict_hits.push_back(j["correct_strict"].get<bool>() ? 1.0 : 0.0);
    flex_hits.push_back(j["correct_flexible"].get<bool>() ? 1.0 : 0.0);
    add_record(report, j);
  }
  report.n = static_cast<int64_t>(subset.size());
  report.metrics = {mean_metric("exact_match", strict_hits),
                    mean_metric("exact_match_flexible", flex_hits)};
  report.tokens_fed = total_fed(options_.comm, cache.tokens_fed());
  return report;
}

TaskReport Evaluator::run_ppl(const std::filesystem::path& data) {
  QL_CHECK(std::filesystem::is_regular_file(data), "ppl: cannot open ", data.string(),
           ": no such file");
  const std::string text = read_file(data);
  QL_CHECK(!text.empty(), "ppl: ", data.string(), " is empty: expected text to score");
  const Tokenizer& tok = encoder_.tokenizer();
  const std::vector<int32_t> tokens = tok.encode(text, /*add_bos=*/false);
  const int32_t bos = tok.add_bos() ? tok.bos_id() : -1;
  PerplexityOptions po;
  po.ctx = session_.max_context();
  po.max_windows = options_.limit;
  po.progress = options_.progress;
  po.comm = options_.comm;
  const PerplexityResult res = perplexity(session_, tokens, bos, po);

  TaskReport report;
  report.n = res.windows;
  report.metrics = {Metric{"ppl", res.ppl}, Metric{"mean_nll", res.mean_nll}};
  report.tokens_scored = res.tokens_scored;
  for (const PerplexityWindow& w : res.per_window) {
    report.tokens_fed += w.end - w.begin + (bos >= 0 ? 1 : 0);
    report.items.push_back({{"index", w.index},
                            {"begin", w.begin},
                            {"end", w.end},
                            {"scored", w.scored},
                            {"nll_sum", w.nll_sum}});
  }
  return report;
}

void dequantize_weights(Model& model) {
  for (LayerWeights& layer : model.layers)
    for (Target t : all_targets()) {
      Linear& l = target_linear(layer, t);
      if (!l.quantized()) continue;
      l.weight = l.dense_weight();
      l.qweight = QMatrix();
    }
  model.head_q = QMatrix();  // the runtime then uses the fp32 head the loader keeps beside it
}

std::string format_table(std::span<const TaskReport> reports) {
  std::string out;
  char line[256];
  std::snprintf(line, sizeof line, "%-12s %7s  %-24s %8s   %s\n", "task", "n", "metric", "value",
                "stderr");
  out += line;
  for (const TaskReport& r : reports) {
    for (size_t i = 0; i < r.metrics.size(); ++i) {
      const Metric& m = r.metrics[i];
      const std::string n = i == 0 ? std::to_string(r.n) : "";
      if (std::isnan(m.stderr_)) {
        std::snprintf(line, sizeof line, "%-12s %7s  %-24s %8.4f\n", i == 0 ? r.task.c_str() : "",
                      n.c_str(), m.name.c_str(), m.value);
      } else {
        std::snprintf(line, sizeof line, "%-12s %7s  %-24s %8.4f ± %.4f\n",
                      i == 0 ? r.task.c_str() : "", n.c_str(), m.name.c_str(), m.value, m.stderr_);
      }
      out += line;
    }
    std::snprintf(line, sizeof line,
                  "  (%s: %lld truncated, %.1f s, %lld tokens scored, %lld fed, %.0f fed/s)\n",
                  r.task.c_str(), static_cast<long long>(r.truncated), r.seconds,
                  static_cast<long long>(r.tokens_scored), static_cast<long long>(r.tokens_fed),
                  r.seconds > 0 ? static_cast<double>(r.tokens_fed) / r.seconds : 0.0);
    out += line;
  }
  return out;
}

json report_json(const TaskReport& r) {
  json metrics = json::object();
  for (const Metric& m : r.metrics)
    metrics[m.name] = {{"value", m.value}, {"stderr", stderr_json(m.stderr_)}};
  return {{"task", r.task},
          {"data", r.data},
          {"n", r.n},
          {"shots", r.shots},
          {"metrics", std::move(metrics)},
          {"truncated", r.truncated},
          {"seconds", r.seconds},
          {"tokens_scored", r.tokens_scored},
          {"tokens_fed", r.tokens_fed},
          {"items", r.items}};
}

}  // namespace qalora
