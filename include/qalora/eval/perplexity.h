// Perplexity of a token stream (SPEC §7). The stream is cut into windows of `ctx` positions;
// with a BOS token each window starts with BOS and holds ctx - 1 text tokens, all of them
// scored. A stride below the window's text length slides the window instead, scoring only
// tokens no earlier window scored (each then sees at least window - stride tokens of context).
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <span>
#include <vector>

namespace qalora {

class InferenceSession;
struct Example;
class Communicator;

struct PerplexityOptions {
  int64_t ctx = 512;
  int64_t stride = 0;             // 0: non-overlapping windows
  int64_t max_windows = 0;        // 0: the whole stream
  bool progress = true;           // progress bar on stderr
  std::filesystem::path metrics;  // optional JSONL, one record per window
  // Ranks that share the windows (rank r scores every r-th; every rank gets the whole result,
  // rank 0 alone writes `metrics`); null: this process scores them all.
  Communicator* comm = nullptr;
};

struct PerplexityWindow {
  int64_t index = 0;
  int64_t begin = 0;  // text tokens [begin, end) are in the window
  int64_t end = 0;
  int64_t scored = 0;  // tokens scored in this window
  double nll_sum = 0;  // natural log
};

struct PerplexityResult {
  int64_t windows = 0;
  int64_t tokens_scored = 0;
  double nll_sum = 0;
  double mean_nll = 0;
  double ppl = 0;  // exp(mean_nll)
  std::vector<PerplexityWindow> per_window;
};

// Logits of a whole window, tokens [n] -> logits [n, vocab], each row predicting the next token.
using WindowLogitsFn =
    std::function<void(std::span<const int32_t> tokens, std::span<float> logits)>;

// -log softmax(logits)[target], computed in double with the max subtracted.
double token_nll(std::span<const float> logits, int32_t target);

// bos < 0: no BOS is prepended.
PerplexityResult perplexity(std::span<const int32_t> tokens, int64_t vocab_size, int32_t bos,
                            const WindowLogitsFn& logits_fn, const PerplexityOptions& options);
// The model's forward pass; the session's cache must hold `options.ctx` positions.
PerplexityResult perplexity(InferenceSession& session, std::span<const int32_t> tokens, int32_t bos,
                            const PerplexityOptions& options);

// The loss of instruction examples as training defines it (src/train/trainer.cpp's held-out
// loss): the mean NLL over their target tokens, each example run alone from position 0.
struct ExampleLoss {
  int64_t examples = 0;
  int64_t tokens = 0;  // target tokens scored
  double nll_sum = 0;
  double mean_nll = 0;
};
// The session's cache must hold the longest example. Throws Error when no example has a target.
// With `comm`, its ranks share the examples as perplexity() shares windows. Examples are packed
// into forwards of up to `batch_tokens` tokens (each attends to itself only; a longer example
// runs alone), and only the rows that predict a target are projected to logits.
ExampleLoss example_loss(InferenceSession& session, std::span<const Example> examples,
                         bool progress = true, Communicator* comm = nullptr,
                         int64_t batch_tokens = 512);

}  // namespace qalora
