// Held-out splits and the batch order. The permutations are drawn with mt19937_64 and our own
// Fisher-Yates (std::shuffle and the standard distributions differ between libraries), so a
// checkpoint resumes with the same batches wherever it is loaded.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "qalora/core/error.h"
#include "qalora/core/hash.h"
#include "qalora/data/dataset.h"

namespace qalora {

namespace {

// A uniformly random permutation of 0..n-1 determined by `seed`.
std::vector<int64_t> permutation(int64_t n, uint64_t seed) {
  std::vector<int64_t> p(static_cast<size_t>(n));
  std::iota(p.begin(), p.end(), int64_t{0});
  std::mt19937_64 rng(seed);
  for (int64_t i = n - 1; i > 0; --i) {
    const auto bound = static_cast<uint64_t>(i) + 1;
    // Draws below the largest multiple of `bound` only, so every j is equally likely.
    const uint64_t limit = UINT64_MAX - UINT64_MAX % bound;
    uint64_t r = rng();
    while (r >= limit) r = rng();
    std::swap(p[static_cast<size_t>(i)], p[r % bound]);
  }
  return p;
}

void recount(DataStats& stats, const std::vector<Example>& examples) {
  stats.tokens = 0;
  stats.target_tokens = 0;
  for (const Example& ex : examples) {
    stats.tokens += static_cast<int64_t>(ex.tokens.size());
    stats.target_tokens += ex.target_count();
  }
}

}  // namespace

Dataset split_heldout(Dataset& data, double fraction, uint64_t seed) {
  QL_CHECK(fraction >= 0.0 && fraction < 1.0, "held-out fraction must be in [0, 1), got ",
           fraction);
  const auto n = static_cast<int64_t>(data.examples.size());
  int64_t held = 0;
  if (fraction > 0.0 && n >= 2)
    held = std::clamp<int64_t>(std::llround(fraction * static_cast<double>(n)), 1, n - 1);

  const std::vector<int64_t> perm = permutation(n, splitmix64(seed));
  std::vector<uint8_t> is_held(static_cast<size_t>(n), 0);
  for (int64_t i = 0; i < held; ++i) is_held[static_cast<size_t>(perm[static_cast<size_t>(i)])] = 1;

  Dataset out;
  out.source = data.source;
  out.format = data.format;
  std::vector<Example> kept;
  for (size_t i = 0; i < data.examples.size(); ++i)
    (is_held[i] ? out.examples : kept).push_back(std::move(data.examples[i]));
  data.examples = std::move(kept);
  data.stats.records -= held;
  out.stats.records = held;
  recount(data.stats, data.examples);
  recount(out.stats, out.examples);
  return out;
}

Batcher::Batcher(const Dataset& data, int64_t batch_size, bool group_by_length, uint64_t seed)
    : data_(data), batch_size_(batch_size), group_by_length_(group_by_length), seed_(seed) {
  QL_CHECK(batch_size >= 1, "batch size must be at least 1, got ", batch_size);
  QL_CHECK(!data.examples.empty(), data.source.string(), ": no examples to draw batches from");
  build_order();
}

void Batcher::build_order() {
  const auto n = static_cast<int64_t>(data_.examples.size());
  order_ = permutation(n, derive_seed(seed_, static_cast<uint64_t>(state_.epoch)));
  if (!group_by_length_) return;
  const auto length = [&](int64_t i) {
    return data_.examples[static_cast<size_t>(i)].tokens.size();
  };
  const int64_t mega = 50 * batch_size_;
  for (int64_t at = 0; at < n; at += mega) {
    const auto first = order_.begin() + at;
    const auto last = order_.begin() + std::min(n, at + mega);
    std::stable_sort(first, last, [&](int64_t a, int64_t b) { return length(a) > length(b); });
  }
}

std::vector<int64_t> Batcher::next() {
  const auto n = static_cast<int64_t>(order_.size());
  if (state_.position >= n) {
    ++state_.epoch;
    state_.position = 0;
    build_order();
  }
  const int64_t end = std::min(n, state_.position + batch_size_);
  std::vector<int64_t> batch(order_.begin() + state_.position, order_.begin() + end);
  state_.position = end;
  return batch;
}

int64_t Batcher::batches_per_epoch() const {
  return (static_cast<int64_t>(data_.examples.size()) + batch_size_ - 1) / batch_size_;
}

void Batcher::restore(const BatcherState& state) {
  const auto n = static_cast<int64_t>(data_.examples.size());
  QL_CHECK(state.epoch >= 0 && state.position >= 0 && state.position <= n &&
               (state.position % batch_size_ == 0 || state.position == n),
           "data cursor (epoch ", state.epoch, ", position ", state.position,
           ") does not fit this data set: expected epoch >= 0 and a batch boundary in 0..", n,
           " for batch size ", batch_size_, " (was the checkpoint made with other data?)");
  state_ = state;
  build_order();
}

}  // namespace qalora
