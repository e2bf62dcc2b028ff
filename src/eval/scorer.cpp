#include "qalora/eval/scorer.h"

#include <algorithm>
#include <cctype>
#include <utility>

#include "qalora/core/error.h"
#include "qalora/model/runtime.h"
#include "qalora/model/sampler.h"

namespace qalora {

PromptEncoder::PromptEncoder(const Tokenizer& tok, std::optional<ChatTemplate> chat)
    : tok_(tok), chat_(std::move(chat)) {}

std::string PromptEncoder::format(std::string_view context) const {
  if (!chat_) return std::string(context);
  const ChatMessage turn{"user", std::string(context)};
  return chat_->render(std::span<const ChatMessage>(&turn, 1), /*add_generation_prompt=*/true);
}

std::vector<int32_t> PromptEncoder::encode(const std::string& text) const {
  if (chat_) return tok_.encode(text, /*add_bos=*/false, /*parse_special=*/true);
  return tok_.encode(text, tok_.add_bos());
}

int64_t PromptEncoder::prefix_tokens(const std::string& formatted, std::string_view context,
                                     size_t prefix_chars, const std::vector<int32_t>& ids) const {
  if (prefix_chars >= context.size()) return 0;
  // The prefix ends before its trailing whitespace: byte-level BPE encodes "\n\n" at the end
  // of a text as one token but before a word as two, so that boundary would not be stable.
  while (prefix_chars > 0 && std::isspace(static_cast<unsigned char>(context[prefix_chars - 1])))
    --prefix_chars;
  if (prefix_chars == 0) return 0;
  // With a chat template the context sits inside the rendered turn.
  const size_t at = formatted.find(context.substr(0, prefix_chars));
  if (at == std::string::npos) return 0;
  const std::vector<int32_t> prefix = encode(formatted.substr(0, at + prefix_chars));
  if (prefix.size() >= ids.size() || !std::equal(prefix.begin(), prefix.end(), ids.begin()))
    return 0;
  return static_cast<int64_t>(prefix.size());
}

Prompt PromptEncoder::encode_context(std::string_view context, size_t prefix_chars) const {
  const std::string formatted = format(context);
  Prompt p;
  p.ids = encode(formatted);
  if (p.ids.empty()) p.ids.push_back(tok_.bos_id() >= 0 ? tok_.bos_id() : tok_.eos_id());
  p.prefix = prefix_tokens(formatted, context, prefix_chars, p.ids);
  return p;
}

ScoreRequest PromptEncoder::encode_pair(std::string_view context, std::string_view continuation,
                                        size_t prefix_chars) const {
  std::string ctx = format(context);
  std::string cont(continuation);
  const size_t keep = ctx.find_last_not_of(" \t\n\r\f\v") + 1;  // npos + 1 == 0: all blank
  cont.insert(0, ctx, keep);
  ctx.resize(keep);

  ScoreRequest r;
  r.context = encode(ctx);
  const std::vector<int32_t> whole = encode(ctx + cont);
  if (whole.size() > r.context.size()) {
    r.continuation.assign(whole.begin() + static_cast<std::ptrdiff_t>(r.context.size()),
                          whole.end());
  } else {
    r.continuation = tok_.encode(cont, /*add_bos=*/false, /*parse_special=*/chat_.has_value());
  }
  QL_CHECK(!r.continuation.empty(), "the continuation \"", cont, "\" encodes to no tokens");
  if (r.context.empty()) r.context.push_back(tok_.bos_id() >= 0 ? tok_.bos_id() : tok_.eos_id());
  r.prefix = prefix_tokens(ctx, context, prefix_chars, r.context);
  return r;
}

ScoreWindow fit_window(const ScoreRequest& request, int64_t window) {
  const auto n_ctx = static_cast<int64_t>(request.context.size());
  const auto n_cont = static_cast<int64_t>(request.continuation.size());
  QL_CHECK(n_ctx >= 1 && n_cont >= 1, "a scored request needs a context and a continuation, got ",
           n_ctx, " and ", n_cont, " tokens");
  QL_CHECK(n_cont <= window, "a continuation of ", n_cont,
           " tokens does not fit the context window of ", window, " (raise --ctx)");
  ScoreWindow w;
  const int64_t drop = std::max<int64_t>(0, n_ctx + n_cont - 1 - window);
  w.truncated = drop > 0;
  w.first_row = n_ctx - 1 - drop;
  w.tokens.assign(request.context.begin() + drop, request.context.end());
  w.tokens.insert(w.tokens.end(), request.continuation.begin(), request.continuation.end() - 1);
  const int64_t prefix = request.prefix - drop;
  if (prefix > 0 && prefix < w.first_row + 1) w.ends.push_back(prefix);
  w.ends.push_back(w.first_row + 1);
  if (n_cont > 1) w.ends.push_back(static_cast<int64_t>(w.tokens.size()));
  return w;
}

ContinuationScore score_continuation(std::span<const float> rows,
                                     std::span<const int32_t> targets, int64_t vocab) {
  const auto V = static_cast<size_t>(vocab);
  QL_CHECK(rows.size() == targets.size() * V, "score_continuation: ", rows.size(),
           " logits for ", targets.size(), " targets of a vocabulary of ", vocab);
  ContinuationScore s;
  s.tokens = static_cast<int64_t>(targets.size());
  for (size_t i = 0; i < targets.size(); ++i) {
    const auto row = rows.subspan(i * V, V);
    s.loglik -= token_nll(row, targets[i]);
    s.greedy = s.greedy && argmax(row) == targets[i];
  }
  return s;
}

std::vector<ContinuationScore> Scorer::score_all(std::span<const ScoreRequest> requests) {
  std::vector<ContinuationScore> scores;
  for (const ScoreRequest& r : requests) scores.push_back(score(r));
  return scores;
}

LogitsScorer::LogitsScorer(WindowLogitsFn logits_fn, int64_t vocab, int64_t window)
    : logits_fn_(std::move(logits_fn)), vocab_(vocab), window_(window) {}

ContinuationScore LogitsScorer::score(const ScoreRequest& request) {
  const ScoreWindow w = fit_window(request, window_);
  const auto V = static_cast<size_t>(vocab_);
  logits_.resize(w.tokens.size() * V);
  logits_fn_(w.tokens, logits_);
  const auto first = static_cast<size_t>(w.first_row) * V;
  ContinuationScore s = score_continuation(std::span<const float>(logits_).subspan(first),
                                           request.continuation, vocab_);
  s.truncated = w.truncated;
  return s;
}

CachedSession::CachedSession(InferenceSession& session, bool share_prefix)
    : session_(session), share_prefix_(share_prefix) {
  session_.reset();
}

int64_t CachedSession::max_context() const { return session_.max_context(); }

void CachedSession::run(std::span<const int32_t> tokens, std::span<const int64_t> ends,
                        int64_t first_row, std::vector<float>& logits) {
  const auto n = static_cast<int64_t>(tokens.size());
  QL_CHECK(!ends.empty() && ends.back() == n && std::is_sorted(ends.begin(), ends.end()) &&
               ends.front() > 0,
           "CachedSession::run: segment ends must ascend to ", n);
  QL_CHECK(n <= session_.max_context(), "a sequence of ", n,
           " tokens does not fit the context of ", session_.max_context());
  const auto row_segment = std::find(ends.begin(), ends.end(), first_row + 1);
  QL_CHECK(row_segment != ends.end(), "CachedSession::run: row ", first_row,
           " is not the last of a segment");
  const auto j = static_cast<size_t>(row_segment - ends.begin());

  // Reuse leading segments, but not past j: later ones must return all their rows.
  size_t keep = 0;
  if (share_prefix_) {
    while (keep <= j && keep < ends_.size() && ends[keep] == ends_[keep] &&
           std::equal(tokens.begin(), tokens.begin() + ends[keep], cached_.begin()))
      ++keep;
  }
  const int64_t start = keep > 0 ? ends[keep - 1] : 0;
  session_.truncate(start);
  cached_.resize(static_cast<size_t>(start));
  ends_.resize(keep);
  last_rows_.resize(keep);

  const auto V = static_cast<size_t>(session_.model().config.vocab_size);
  std::vector<float> later;  // all rows of the segments after j
  std::vector<float> out;
  for (size_t i = keep; i < ends.size(); ++i) {
    const int64_t b = i > 0 ? ends[i - 1] : 0;
    const auto segment = tokens.subspan(static_cast<size_t>(b), static_cast<size_t>(ends[i] - b));
    const bool all_rows = i > j;
    out.resize((all_rows ? segment.size() : 1) * V);
    session_.forward(segment, out, all_rows);
    tokens_fed_ += static_cast<int64_t>(segment.size());
    cached_.insert(cached_.end(), segment.begin(), segment.end());
    ends_.push_back(ends[i]);
    last_rows_.emplace_back(out.end() - static_cast<std::ptrdiff_t>(V), out.end());
    if (all_rows) later.insert(later.end(), out.begin(), out.end());
  }
  logits.assign(last_rows_[j].begin(), last_rows_[j].end());
  logits.insert(logits.end(), later.begin(), later.end());
}

void CachedSession::append(int32_t token, std::vector<float>& logits) {
  QL_CHECK(!ends_.empty(), "CachedSession::append before run");
  logits.resize(static_cast<size_t>(session_.model().config.vocab_size));
  const int32_t one[] = {token};
  session_.forward(one, logits, /*all_logits=*/false);
  ++tokens_fed_;
  cached_.push_back(token);
  ++ends_.back();
  last_rows_.back() = logits;
}

void CachedSession::hold(std::span<const int32_t> prefix) {
  if (prefix.empty()) {
    session_.truncate(0);
    cached_.clear();
    ends_.clear();
    last_rows_.clear();
    return;
  }
  const auto n = static_cast<int64_t>(prefix.size());
  const int64_t ends[] = {n};
  std::vector<float> ignored;
  run(prefix, ends, n - 1, ignored);
}

void CachedSession::run_packed(std::span<const int32_t> tokens, const PackedLayout& layout,
                               std::span<const int64_t> rows, std::vector<float>& logits) {
  session_.truncate(static_cast<int64_t>(cached_.size()));
  logits.resize(rows.size() * static_cast<size_t>(session_.model().config.vocab_size));
  session_.forward_packed(tokens, layout, rows, logits);
  tokens_fed_ += static_cast<int64_t>(tokens.size());
}

SessionScorer::SessionScorer(CachedSession& cache) : cache_(cache) {}

ContinuationScore SessionScorer::score(const ScoreRequest& request) {
  const ScoreWindow w = fit_window(request, cache_.max_context());
  cache_.run(w.tokens, w.ends, w.first_row, logits_);
  ContinuationScore s = score_continuation(logits_, request.continuation,
                                           cache_.session().model().config.vocab_size);
  s.truncated = w.truncated;
  return s;
}

namespace {

// Tokens a request adds to a packed batch beyond its shared prefix: its context (when no
// earlier request of the batch has the same one) and its fed continuation.
int64_t packed_tokens(const ScoreRequest& r, bool new_context) {
  const auto n_ctx = static_cast<int64_t>(r.context.size());
  return (new_context ? n_ctx - r.prefix : 0) + static_cast<int64_t>(r.continuation.size()) - 1;
}

bool same_prefix(const ScoreRequest& a, const ScoreRequest& b) {
  return a.prefix == b.prefix &&
         std::equal(a.context.begin(), a.context.begin() + a.prefix, b.context.begin());
}

// Where among a batch's contexts so far `r`'s context is (choices of one item share theirs).
template <typename Placed, typename Ids>
auto find_context(Placed& placed, const ScoreRequest& r, Ids ids_of) {
  return std::find_if(placed.begin(), placed.end(), [&](const auto& p) {
    const std::span<const int32_t> ids = ids_of(p);
    return std::equal(ids.begin(), ids.end(), r.context.begin(), r.context.end());
  });
}

}  // namespace

PackedScorer::PackedScorer(CachedSession& cache, int64_t batch_tokens)
    : cache_(cache), single_(cache), batch_tokens_(batch_tokens) {
  QL_CHECK(batch_tokens >= 1, "--batch-tokens: expected >= 1, got ", batch_tokens);
}

ContinuationScore PackedScorer::score(const ScoreRequest& request) {
  return score_all(std::span<const ScoreRequest>(&request, 1)).front();
}

std::vector<ContinuationScore> PackedScorer::score_all(std::span<const ScoreRequest> requests) {
  std::vector<ContinuationScore> scores(requests.size());
  const int64_t window = cache_.max_context();
  size_t i = 0;
  while (i < requests.size()) {
    const ScoreRequest& first = requests[i];
    if (fit_window(first, window).truncated) {
      scores[i] = single_.score(first);
      ++i;
      continue;
    }
    // The batch: following requests with the same prefix, untruncated, within the budget (and
    // the cache, which holds the prefix and the whole batch).
    const int64_t budget = std::min(batch_tokens_, window - first.prefix);
    std::vector<std::span<const int32_t>> contexts;
    int64_t used = 0;
    size_t j = i;
    for (; j < requests.size(); ++j) {
      const ScoreRequest& r = requests[j];
      if (j > i && (!same_prefix(first, r) || fit_window(r, window).truncated)) break;
      const bool new_context =
          find_context(contexts, r, [](std::span<const int32_t> c) { return c; }) == contexts.end();
      const int64_t add = packed_tokens(r, new_context);
      if (j > i && used + add > budget) break;
      used += add;
      if (new_context) contexts.push_back(r.context);
    }
    score_batch(requests.subspan(i, j - i), std::span(scores).subspan(i, j - i));
    i = j;
  }
  return scores;
}

void PackedScorer::score_batch(std::span<const ScoreRequest> requests,
                               std::span<ContinuationScore> out) {
  const ScoreRequest& first = requests.front();
  const int64_t P = first.prefix;
  cache_.hold(std::span(first.context).first(static_cast<size_t>(P)));

  std::vector<int32_t> tokens;
  PackedLayout layout;
  std::vector<int64_t> rows;
  // Each distinct context with the batch offset of its first token after the prefix.
  std::vector<std::pair<std::span<const int32_t>, int64_t>> placed;
  for (const ScoreRequest& r : requests) {
    const auto n_ctx = static_cast<int64_t>(r.context.size());
    auto at = find_context(placed, r, [](const auto& p) { return p.first; });
    if (at == placed.end()) {
      const auto begin = static_cast<int64_t>(tokens.size());
      for (int64_t k = P; k < n_ctx; ++k) {
        tokens.push_back(r.context[static_cast<size_t>(k)]);
        layout.positions.push_back(k);
        layout.visible.push_back(
            {.prefix_end = P, .context_begin = P, .context_end = P, .own_begin = P + begin});
      }
      placed.emplace_back(r.context, begin);
      at = placed.end() - 1;
    }
    // The context's tokens sit at slots P + begin ... P + begin + (n_ctx - P) - 1.
    const int64_t ctx_begin = P + at->second, ctx_end = ctx_begin + n_ctx - P;
    rows.push_back(ctx_end - 1 - P);
    const auto own = static_cast<int64_t>(tokens.size());
    for (size_t k = 0; k + 1 < r.continuation.size(); ++k) {
      rows.push_back(static_cast<int64_t>(tokens.size()));
      tokens.push_back(r.continuation[k]);
      layout.positions.push_back(n_ctx + static_cast<int64_t>(k));
      layout.visible.push_back({.prefix_end = P,
                                .context_begin = ctx_begin,
                                .context_end = ctx_end,
                                .own_begin = P + own});
    }
  }
  cache_.run_packed(tokens, layout, rows, logits_);

  const int64_t V = cache_.session().model().config.vocab_size;
  size_t row = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    const size_t n = requests[i].continuation.size();
    out[i] = score_continuation(std::span<const float>(logits_).subspan(row * V, n * V),
                                requests[i].continuation, V);
    row += n;
  }
}

}  // namespace qalora
