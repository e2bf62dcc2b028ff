// Batch order and held-out splits on synthetic data sets: coverage per epoch, determinism from
// the seed, length grouping, exact resumption from a saved state, and the split sizes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <set>
#include <vector>

#include "qalora/core/error.h"
#include "qalora/data/dataset.h"

namespace qalora {
namespace {

// n examples; example i has tokens[0] = i (its identity) and a length from a fixed scramble.
Dataset synthetic(int64_t n) {
  Dataset d;
  d.source = "synthetic.jsonl";
  for (int64_t i = 0; i < n; ++i) {
    Example ex;
    ex.tokens.assign(size_t(2 + (i * 37) % 61), 7);
    ex.tokens[0] = int32_t(i);
    ex.target.assign(ex.tokens.size(), 1);
    ex.target[0] = 0;
    d.examples.push_back(std::move(ex));
  }
  d.stats.records = n;
  return d;
}

using Batches = std::vector<std::vector<int64_t>>;

Batches take(Batcher& b, int64_t count) {
  Batches out;
  for (int64_t i = 0; i < count; ++i) out.push_back(b.next());
  return out;
}

// The concatenated indices of one epoch's batches, checked to be a permutation of 0..n-1.
std::vector<int64_t> expect_permutation(const Batches& epoch, int64_t n) {
  std::vector<int64_t> all;
  for (const auto& batch : epoch) all.insert(all.end(), batch.begin(), batch.end());
  std::vector<int64_t> sorted = all;
  std::sort(sorted.begin(), sorted.end());
  std::vector<int64_t> expected(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) expected[size_t(i)] = i;
  EXPECT_EQ(sorted, expected);
  return all;
}

TEST(Batcher, EachEpochIsASeededPermutationWithAShortLastBatch) {
  const Dataset d = synthetic(103);
  Batcher b(d, 4, false, 42);
  EXPECT_EQ(b.batches_per_epoch(), 26);
  const Batches e0 = take(b, 26);
  for (size_t i = 0; i + 1 < e0.size(); ++i) EXPECT_EQ(e0[i].size(), 4u);
  EXPECT_EQ(e0.back().size(), 3u);
  EXPECT_EQ(b.state().epoch, 0);
  EXPECT_EQ(b.state().position, 103);
  const std::vector<int64_t> order0 = expect_permutation(e0, 103);

  const Batches e1 = take(b, 26);
  EXPECT_EQ(b.state().epoch, 1);
  const std::vector<int64_t> order1 = expect_permutation(e1, 103);
  EXPECT_NE(order0, order1);
  std::vector<int64_t> identity = order0;
  std::sort(identity.begin(), identity.end());
  EXPECT_NE(order0, identity);

  Batcher same(d, 4, false, 42);
  EXPECT_EQ(take(same, 52), [&] {
    Batches both = e0;
    both.insert(both.end(), e1.begin(), e1.end());
    return both;
  }());
  Batcher other(d, 4, false, 43);
  EXPECT_NE(take(other, 26), e0);
}

// Which example comes first, over many seeds: each of 5 should lead about a fifth of the time.
TEST(Batcher, PermutationsAreUniform) {
  const Dataset d = synthetic(5);
  std::vector<int> first(5, 0);
  const int trials = 20000;
  for (int s = 0; s < trials; ++s) {
    Batcher b(d, 1, false, uint64_t(s));
    ++first[size_t(b.next()[0])];
  }
  const double expected = trials / 5.0, sigma = std::sqrt(trials * 0.2 * 0.8);
  for (int c : first) EXPECT_NEAR(c, expected, 5 * sigma);
}

TEST(Batcher, GroupByLengthSortsEachMegabatchLongestFirst) {
  const int64_t n = 530, batch = 2, mega = 50 * batch;
  const Dataset d = synthetic(n);
  const auto len = [&](int64_t i) { return d.examples[size_t(i)].tokens.size(); };
  Batcher b(d, batch, true, 7);
  EXPECT_EQ(b.batches_per_epoch(), 265);
  for (int epoch = 0; epoch < 2; ++epoch) {
    const std::vector<int64_t> order = expect_permutation(take(b, 265), n);
    bool any_rise_across = false;
    for (int64_t i = 1; i < n; ++i) {
      if (i % mega != 0)
        EXPECT_GE(len(order[size_t(i - 1)]), len(order[size_t(i)])) << "at " << i;
      else if (len(order[size_t(i - 1)]) < len(order[size_t(i)]))
        any_rise_across = true;
    }
    // Megabatches are drawn from a shuffle, not one global sort.
    EXPECT_TRUE(any_rise_across);
  }
  Batcher plain(d, batch, false, 7);
  Batcher grouped(d, batch, true, 7);
  EXPECT_NE(take(plain, 50), take(grouped, 50));
}

TEST(Batcher, RestoreContinuesWithTheSameBatches) {
  const Dataset d = synthetic(23);
  for (const bool group : {false, true}) {
    Batcher a(d, 5, group, 99);
    take(a, 7);  // into the second epoch
    const BatcherState saved = a.state();
    EXPECT_EQ(saved.epoch, 1);
    EXPECT_EQ(saved.position, 10);
    const Batches expected = take(a, 12);

    Batcher b(d, 5, group, 99);
    b.next();
    b.restore(saved);
    EXPECT_EQ(take(b, 12), expected);

    // At the end of an epoch.
    Batcher c(d, 5, group, 99);
    take(c, 5);
    const BatcherState end = c.state();
    EXPECT_EQ(end.position, 23);
    Batcher e(d, 5, group, 99);
    e.restore(end);
    EXPECT_EQ(take(e, 6), take(c, 6));
  }
}

TEST(Batcher, BadStatesAndArgumentsThrow) {
  const Dataset d = synthetic(10);
  Batcher b(d, 3, false, 1);
  for (const BatcherState s :
       {BatcherState{-1, 0}, BatcherState{0, -3}, BatcherState{0, 11}, BatcherState{2, 4}}) {
    try {
      b.restore(s);
      ADD_FAILURE() << "no error for epoch " << s.epoch << " position " << s.position;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("position " + std::to_string(s.position)),
                std::string::npos)
          << e.what();
    }
  }
  EXPECT_NO_THROW(b.restore({3, 9}));
  EXPECT_NO_THROW(b.restore({3, 10}));
  EXPECT_THROW(Batcher(d, 0, false, 1), Error);
  const Dataset empty;
  EXPECT_THROW(Batcher(empty, 1, false, 1), Error);
}

TEST(DataSplit, HeldOutSizesAndDeterminism) {
  const auto held_size = [](int64_t n, double fraction) {
    Dataset d = synthetic(n);
    const Dataset h = split_heldout(d, fraction, 5);
    EXPECT_EQ(int64_t(d.examples.size() + h.examples.size()), n);
    return int64_t(h.examples.size());
  };
  EXPECT_EQ(held_size(10, 0.0), 0);
  EXPECT_EQ(held_size(10, 0.01), 1);  // at least one
  EXPECT_EQ(held_size(10, 0.25), 3);  // 2.5 rounds up
  EXPECT_EQ(held_size(10, 0.99), 9);  // never all
  EXPECT_EQ(held_size(1, 0.5), 0);
  EXPECT_EQ(held_size(200, 0.1), 20);

  const auto ids = [](const Dataset& d) {
    std::vector<int32_t> out;
    for (const Example& ex : d.examples) out.push_back(ex.tokens[0]);
    return out;
  };
  Dataset a = synthetic(50), b = synthetic(50), c = synthetic(50);
  const Dataset ha = split_heldout(a, 0.2, 11), hb = split_heldout(b, 0.2, 11),
                hc = split_heldout(c, 0.2, 12);
  EXPECT_EQ(ids(ha), ids(hb));
  EXPECT_EQ(ids(a), ids(b));
  EXPECT_NE(ids(ha), ids(hc));
  // Both keep the file order and together hold every example once.
  std::vector<int32_t> train = ids(a), held = ids(ha);
  EXPECT_TRUE(std::is_sorted(train.begin(), train.end()));
  EXPECT_TRUE(std::is_sorted(held.begin(), held.end()));
  std::set<int32_t> all(train.begin(), train.end());
  all.insert(held.begin(), held.end());
  EXPECT_EQ(all.size(), 50u);

  int64_t tokens = 0;
  for (const Example& ex : ha.examples) tokens += int64_t(ex.tokens.size());
  EXPECT_EQ(ha.stats.tokens, tokens);
  EXPECT_EQ(ha.stats.records, 10);
  EXPECT_EQ(a.stats.records, 40);
  EXPECT_EQ(a.stats.tokens + ha.stats.tokens, [&] {
    int64_t t = 0;
    for (const Example& ex : synthetic(50).examples) t += int64_t(ex.tokens.size());
    return t;
  }());

  Dataset d = synthetic(4);
  EXPECT_THROW(split_heldout(d, 1.0, 1), Error);
  EXPECT_THROW(split_heldout(d, -0.1, 1), Error);
}

}  // namespace
}  // namespace qalora
