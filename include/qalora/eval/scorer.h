// Log-likelihood scoring of a continuation given a context (SPEC §7), the core of every
// multiple-choice task. Text becomes token ids in one place (PromptEncoder); the ids are then
// scored either from scratch by any logits function (LogitsScorer: unit tests, references) or
// by the model with a KV cache that keeps the longest common prefix of consecutive requests
// (SessionScorer over CachedSession: the choices of one item share their context, the items of
// an MMLU subject their header and shots).
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "qalora/eval/perplexity.h"
#include "qalora/model/chat.h"
#include "qalora/model/runtime.h"
#include "qalora/tokenizer/tokenizer.h"

namespace qalora {

class InferenceSession;

struct ScoreRequest {
  std::vector<int32_t> context;       // never empty
  std::vector<int32_t> continuation;  // the tokens scored, never empty
  // The first `prefix` context tokens are shared with other requests (an MMLU subject's
  // header and shots) and computed as a segment of their own; 0 = none.
  int64_t prefix = 0;
};

// A generation prompt's ids, with its shared prefix as in ScoreRequest.
struct Prompt {
  std::vector<int32_t> ids;
  int64_t prefix = 0;
};

// Context text to token ids, as lm-evaluation-harness does. encode_pair: trailing whitespace
// of the context moves to the front of the continuation; the context is encoded alone (BOS
// when the tokenizer adds one) and context + continuation whole; the continuation's tokens are
// the whole encoding's tokens beyond the context's count. The scored sequence is therefore
// always context ids + continuation ids, whatever merges at the boundary, so shared-prefix and
// from-scratch scoring see the same ids. When the whole encoding is not longer than the
// context's, the continuation is encoded alone (without BOS). An empty context becomes BOS, or
// EOS without one (the harness's prefix token).
// prefix_chars > 0: the context's first prefix_chars bytes are a prefix shared with other
// items; its tokens, without its trailing whitespace, become ScoreRequest::prefix when
// encoding them alone gives the first tokens of the context (else 0: no shared segment).
// With a chat template the context is rendered as one user turn followed by the opened
// assistant turn, and encoded with special tokens parsed (the template writes its own BOS).
class PromptEncoder {
 public:
  explicit PromptEncoder(const Tokenizer& tok, std::optional<ChatTemplate> chat = std::nullopt);

  ScoreRequest encode_pair(std::string_view context, std::string_view continuation,
                           size_t prefix_chars = 0) const;
  // A generation prompt: the context alone, formatted and encoded as in encode_pair.
  Prompt encode_context(std::string_view context, size_t prefix_chars = 0) const;

  const Tokenizer& tokenizer() const { return tok_; }
  const std::optional<ChatTemplate>& chat() const { return chat_; }

 private:
  std::string format(std::string_view context) const;
  std::vector<int32_t> encode(const std::string& text) const;
  // Tokens of the shared prefix of `context` within `formatted` (encoded as `ids`), or 0.
  int64_t prefix_tokens(const std::string& formatted, std::string_view context,
                        size_t prefix_chars, const std::vector<int32_t>& ids) const;

  const Tokenizer& tok_;
  std::optional<ChatTemplate> chat_;
};

// What is fed to the model for one request: context + continuation without its last token,
// keeping the last `window` tokens when longer (truncated from the left, as the harness does).
// Row first_row of the logits (the context's last token) predicts the continuation's first
// token. ends: the segments the tokens are computed in, each the end of one: the shared prefix
// (when some of it is left), the context, and the fed continuation (when not empty).
struct ScoreWindow {
  std::vector<int32_t> tokens;
  int64_t first_row = 0;
  std::vector<int64_t> ends;
  bool truncated = false;
};
// Throws Error when the continuation alone does not fit the window.
ScoreWindow fit_window(const ScoreRequest& request, int64_t window);

struct ContinuationScore {
  double loglik = 0;      // natural log
  bool greedy = true;     // every token is its row's argmax (LAMBADA's accuracy)
  int64_t tokens = 0;     // continuation tokens scored
  bool truncated = false; // the context lost tokens on the left
};

// `rows` [targets.size(), vocab]: row i predicts targets[i].
ContinuationScore score_continuation(std::span<const float> rows,
                                     std::span<const int32_t> targets, int64_t vocab);

class Scorer {
 public:
  virtual ~Scorer() = default;
  virtual ContinuationScore score(const ScoreRequest& request) = 0;
  // Every request's score, in order; scorers that batch requests override it.
  virtual std::vector<ContinuationScore> score_all(std::span<const ScoreRequest> requests);
};

// Scores every request from scratch with a logits function over the whole fed window
// (tokens [n] -> logits [n, vocab]).
class LogitsScorer final : public Scorer {
 public:
  LogitsScorer(WindowLogitsFn logits_fn, int64_t vocab, int64_t window);
  ContinuationScore score(const ScoreRequest& request) override;

 private:
  WindowLogitsFn logits_fn_;
  int64_t vocab_;
  int64_t window_;
  std::vector<float> logits_;
};

// An InferenceSession whose KV cache remembers the token ids it holds, as segments. run()
// computes a sequence segment by segment, reusing the leading segments that equal the cached
// ones (same ids, same boundaries); with share_prefix off it computes every segment each time
// (the from-scratch path, for checks and timing). Both paths run the same batches, so they
// agree to the last bit: the runtime computes a batch of a few tokens differently from a long
// one (int8-quantized activations on its decode path), so splitting a sequence anywhere else
// would not.
class CachedSession {
 public:
  // Resets the session: the cache starts empty.
  explicit CachedSession(InferenceSession& session, bool share_prefix = true);

  // Makes the cache hold exactly `tokens` (which must fit it), computed in the segments that
  // end at `ends` (ascending, the last one tokens.size()). first_row must be the last position
  // of a segment; writes the logits of positions [first_row, tokens.size()) to `logits`
  // ([rows, vocab]).
  void run(std::span<const int32_t> tokens, std::span<const int64_t> ends, int64_t first_row,
           std::vector<float>& logits);
  // Appends one token to the last segment (generation) and writes its logits ([vocab]).
  void append(int32_t token, std::vector<float>& logits);
  // Makes the cache hold exactly `prefix` (one segment, reused when it is there already;
  // nothing when empty).
  void hold(std::span<const int32_t> prefix);
  // Runs a packed batch (InferenceSession::forward_packed) after the held tokens, which stay as
  // they are: the batch's slots are scratch for the next run to overwrite.
  void run_packed(std::span<const int32_t> tokens, const PackedLayout& layout,
                  std::span<const int64_t> rows, std::vector<float>& logits);

  InferenceSession& session() { return session_; }
  int64_t max_context() const;
  int64_t tokens_fed() const { return tokens_fed_; }  // positions computed so far

 private:
  InferenceSession& session_;
  bool share_prefix_;
  std::vector<int32_t> cached_;
  std::vector<int64_t> ends_;                  // cached segments
  std::vector<std::vector<float>> last_rows_;  // logits of each cached segment's last token
  int64_t tokens_fed_ = 0;
};

class SessionScorer final : public Scorer {
 public:
  explicit SessionScorer(CachedSession& cache);
  ContinuationScore score(const ScoreRequest& request) override;

 private:
  CachedSession& cache_;
  std::vector<float> logits_;
};

// Scores many requests in few forwards. Consecutive requests with the same shared prefix
// (ScoreRequest::prefix, held in the cache) are packed into batches of about `batch_tokens`
// tokens: each distinct context once, then each request's fed continuation, which attends to
// the prefix, its context and itself (ops::VisibleKeys) at the positions it would have alone.
// The quantized weights are then converted once per batch instead of once per request. A
// request whose context must be cut to fit the window is scored alone, as SessionScorer does.
// Scores equal SessionScorer's up to the rounding of a differently sized batch.
class PackedScorer final : public Scorer {
 public:
  PackedScorer(CachedSession& cache, int64_t batch_tokens);
  ContinuationScore score(const ScoreRequest& request) override;
  std::vector<ContinuationScore> score_all(std::span<const ScoreRequest> requests) override;

 private:
  // The requests in one forward (they share their prefix and fit the window untruncated).
  void score_batch(std::span<const ScoreRequest> requests, std::span<ContinuationScore> out);

  CachedSession& cache_;
  SessionScorer single_;
  int64_t batch_tokens_;
  std::vector<float> logits_;
};

}  // namespace qalora
