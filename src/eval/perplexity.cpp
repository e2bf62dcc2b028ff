#include "qalora/eval/perplexity.h"

#include <algorithm>
#include <cmath>
#include <optional>

#include "qalora/core/error.h"
#include "qalora/core/progress.h"
#include "qalora/data/dataset.h"
#include "qalora/dist/communicator.h"
#include "qalora/model/runtime.h"

namespace qalora {

namespace {

struct WindowPlan {
  int64_t begin, end;  // text tokens in the window
  int64_t score_from;  // first text token scored
};

// Windows follow the Hugging Face sliding-window recipe: starts advance by `stride`, each
// window scores the tokens after the previous window's end.
std::vector<WindowPlan> plan_windows(int64_t n_tokens, int64_t text_len, int64_t stride,
                                     bool has_bos, int64_t max_windows) {
  std::vector<WindowPlan> plan;
  int64_t prev_end = 0;
  for (int64_t begin = 0; prev_end < n_tokens; begin += stride) {
    if (max_windows > 0 && static_cast<int64_t>(plan.size()) == max_windows) break;
    const int64_t end = std::min(begin + text_len, n_tokens);
    // Without BOS a window's first token has nothing to be predicted from.
    const int64_t score_from = std::max(prev_end, has_bos ? begin : begin + 1);
    if (score_from < end) plan.push_back({begin, end, score_from});
    prev_end = end;
  }
  return plan;
}

}  // namespace

double token_nll(std::span<const float> logits, int32_t target) {
  QL_CHECK(target >= 0 && static_cast<size_t>(target) < logits.size(), "token id ", target,
           " out of range for a vocabulary of ", logits.size());
  double max_logit = logits[0];
  for (float l : logits) max_logit = std::max(max_logit, static_cast<double>(l));
  double sum = 0;
  for (float l : logits) sum += std::exp(static_cast<double>(l) - max_logit);
  return max_logit + std::log(sum) - static_cast<double>(logits[target]);
}

PerplexityResult perplexity(std::span<const int32_t> tokens, int64_t vocab_size, int32_t bos,
                            const WindowLogitsFn& logits_fn, const PerplexityOptions& options) {
  const bool has_bos = bos >= 0;
  QL_CHECK(options.ctx >= 2, "perplexity context (--ctx) must be >= 2 tokens, got ", options.ctx);
  const int64_t text_len = has_bos ? options.ctx - 1 : options.ctx;
  QL_CHECK(options.stride >= 0, "perplexity stride (--stride) must be >= 0, got ", options.stride);
  const int64_t stride = options.stride > 0 ? options.stride : text_len;
  QL_CHECK(stride <= text_len, "perplexity stride (--stride) must be <= ", text_len,
           " (the text tokens in a window of ", options.ctx, "), got ", stride);
  QL_CHECK(options.max_windows >= 0, "perplexity --max-windows must be >= 0, got ",
           options.max_windows);
  const auto plan = plan_windows(static_cast<int64_t>(tokens.size()), text_len, stride, has_bos,
                                 options.max_windows);
  QL_CHECK(!plan.empty(), "perplexity needs at least ", has_bos ? 1 : 2, " tokens of text, got ",
           tokens.size());

  const Share share(options.comm);
  std::optional<ProgressBar> bar;
  if (options.progress && share.rank == 0)
    bar.emplace("perplexity", share.count(static_cast<int64_t>(plan.size())));

  // Per window: the sum of its tokens' NLL and their count; each rank fills its own.
  std::vector<double> scores(2 * plan.size(), 0.0);
  std::vector<int32_t> window;
  std::vector<float> logits;
  const auto vocab = static_cast<size_t>(vocab_size);
  share.for_each(std::ssize(plan), [&](int64_t k) {
    const WindowPlan& w = plan[static_cast<size_t>(k)];
    window.clear();
    if (has_bos) window.push_back(bos);
    window.insert(window.end(), tokens.begin() + w.begin, tokens.begin() + w.end);
    logits.resize(window.size() * vocab);
    logits_fn(window, logits);

    // Text token i sits at window position i - begin (+1 after BOS); the row before predicts it.
    const int64_t offset = has_bos ? 1 : 0;
    for (int64_t i = w.score_from; i < w.end; ++i) {
      const auto row = static_cast<size_t>(i - w.begin + offset - 1);
      scores[static_cast<size_t>(2 * k)] +=
          token_nll(std::span<const float>(logits).subspan(row * vocab, vocab),
                    tokens[static_cast<size_t>(i)]);
      scores[static_cast<size_t>(2 * k + 1)] += 1;
    }
    if (bar) bar->advance();
  });
  if (share.ranks > 1) options.comm->all_reduce_sum(scores.data(), scores.size());

  std::optional<JsonlWriter> metrics;
  if (!options.metrics.empty() && share.rank == 0) metrics.emplace(options.metrics);
  PerplexityResult result;
  for (size_t k = 0; k < plan.size(); ++k) {
    const PerplexityWindow r{static_cast<int64_t>(k), plan[k].begin, plan[k].end,
                             static_cast<int64_t>(scores[2 * k + 1]), scores[2 * k]};
    result.nll_sum += r.nll_sum;
    result.tokens_scored += r.scored;
    result.per_window.push_back(r);
    if (metrics) {
      const double mean = r.nll_sum / static_cast<double>(r.scored);
      const double running = result.nll_sum / static_cast<double>(result.tokens_scored);
      metrics->write({{"window", r.index},
                      {"begin", r.begin},
                      {"end", r.end},
                      {"scored", r.scored},
                      {"mean_nll", mean},
                      {"ppl", std::exp(mean)},
                      {"running_ppl", std::exp(running)}});
    }
  }
  result.windows = static_cast<int64_t>(result.per_window.size());
  result.mean_nll = result.nll_sum / static_cast<double>(result.tokens_scored);
  result.ppl = std::exp(result.mean_nll);
  return result;
}

PerplexityResult perplexity(InferenceSession& session, std::span<const int32_t> tokens, int32_t bos,
                            const PerplexityOptions& options) {
  QL_CHECK(options.ctx <= session.max_context(), "perplexity context ", options.ctx,
           " exceeds the inference cache of ", session.max_context(), " positions");
  const auto run = [&session](std::span<const int32_t> window, std::span<float> logits) {
    session.reset();
    session.forward(window, logits, /*all_logits=*/true);
  };
  return perplexity(tokens, session.model().config.vocab_size, bos, run, options);
}

ExampleLoss example_loss(InferenceSession& session, std::span<const Example> examples,
                         bool progress, Communicator* comm, int64_t batch_tokens) {
  const Share share(comm);
  std::optional<ProgressBar> bar;
  if (progress && share.rank == 0) bar.emplace("loss", share.count(std::ssize(examples)));
  const auto vocab = static_cast<size_t>(session.model().config.vocab_size);
  ExampleLoss result;
  // Examples packed into one forward, each attending to itself only; the logits of the rows
  // that predict a target token, with those tokens.
  std::vector<int32_t> tokens, targets;
  PackedLayout layout;
  std::vector<int64_t> rows;
  int64_t packed = 0;
  std::vector<float> logits;
  const auto flush = [&] {
    if (tokens.empty()) return;
    logits.resize(rows.size() * vocab);
    session.reset();
    session.forward_packed(tokens, layout, rows, logits);
    for (size_t i = 0; i < targets.size(); ++i)
      result.nll_sum +=
          token_nll(std::span<const float>(logits).subspan(i * vocab, vocab), targets[i]);
    result.tokens += std::ssize(targets);
    result.examples += packed;
    if (bar) bar->advance(packed);
    tokens.clear(), targets.clear(), rows.clear(), layout.positions.clear(), layout.visible.clear();
    packed = 0;
  };
  share.for_each(std::ssize(examples), [&](int64_t k) {
    const Example& e = examples[static_cast<size_t>(k)];
    const auto n = std::ssize(e.tokens);
    QL_CHECK(n <= session.max_context(), "an example of ", n,
             " tokens exceeds the inference cache of ", session.max_context(), " positions");
    if (!tokens.empty() && std::ssize(tokens) + n > std::min(batch_tokens, session.max_context()))
      flush();
    const auto begin = std::ssize(tokens);
    for (int64_t t = 0; t < n; ++t) {
      tokens.push_back(e.tokens[static_cast<size_t>(t)]);
      layout.positions.push_back(t);
      layout.visible.push_back({.own_begin = begin});
      // target[t] marks tokens[t] as predicted by the logits of position t - 1.
      if (t > 0 && e.target[static_cast<size_t>(t)]) {
        rows.push_back(begin + t - 1);
        targets.push_back(e.tokens[static_cast<size_t>(t)]);
      }
    }
    ++packed;
  });
  flush();
  if (share.ranks > 1) {
    double sums[3] = {result.nll_sum, static_cast<double>(result.tokens),
                      static_cast<double>(result.examples)};
    comm->all_reduce_sum(sums, 3);
    result.nll_sum = sums[0];
    result.tokens = static_cast<int64_t>(sums[1]);
    result.examples = static_cast<int64_t>(sums[2]);
  }
  QL_CHECK(result.tokens > 0, "no target tokens to score in ", examples.size(), " examples");
  result.mean_nll = result.nll_sum / static_cast<double>(result.tokens);
  return result;
}

}  // namespace qalora
