// The optimized runtime (BLAS, KV cache, batched prefill + incremental decode) against the plain
// double-precision reference, on random models with odd shapes.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "model/random_model.h"
#include "qalora/core/error.h"
#include "qalora/model/runtime.h"

namespace qalora {
namespace {

// max |a - b| / max |b|: logits are compared relative to their scale.
double relative_error(std::span<const float> a, std::span<const double> b) {
  double diff = 0, scale = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    diff = std::max(diff, std::abs(a[i] - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return diff / scale;
}

std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> d(0, static_cast<int32_t>(vocab - 1));
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& v : t) v = d(rng);
  return t;
}

struct ForwardCase {
  test::RandomModelShape shape;
  const char* label;
};

// Names the case in test listings instead of dumping its bytes.
void PrintTo(const ForwardCase& c, std::ostream* os) {
  *os << c.label;
}

class ForwardVsReference : public ::testing::TestWithParam<ForwardCase> {};

TEST_P(ForwardVsReference, PrefillThenDecodeMatchesDoubleReference) {
  const test::RandomModelShape& s = GetParam().shape;
  const Model model = test::make_random_model(s, 42);
  const std::vector<int32_t> tokens = random_tokens(13, s.vocab, 7);
  const std::vector<double> ref = reference_forward(model, tokens);
  const auto V = static_cast<size_t>(s.vocab);

  // Prefill 9 tokens with all logits, then decode the remaining 4 one at a time.
  InferenceSession session(model, s.context);
  std::vector<float> logits(9 * V);
  session.forward(std::span(tokens).first(9), logits, /*all_logits=*/true);
  for (size_t t = 0; t < 9; ++t)
    EXPECT_LT(relative_error(std::span(logits).subspan(t * V, V), std::span(ref).subspan(t * V, V)),
              1e-4)
        << "prefill position " << t;
  for (size_t t = 9; t < tokens.size(); ++t) {
    const std::vector<float> last = session.forward_last(std::span(tokens).subspan(t, 1));
    EXPECT_LT(relative_error(last, std::span(ref).subspan(t * V, V)), 1e-4)
        << "decode position " << t;
  }
  EXPECT_EQ(session.position(), 13);
}

INSTANTIATE_TEST_SUITE_P(OddShapes, ForwardVsReference,
                         ::testing::Values(ForwardCase{{.vocab = 97,
                                                        .dim = 52,
                                                        .hidden = 100,
                                                        .layers = 2,
                                                        .heads = 6,
                                                        .kv_heads = 6,
                                                        .head_dim = 8},
                                                       "mha"},
                                           ForwardCase{{.vocab = 61,
                                                        .dim = 45,
                                                        .hidden = 77,
                                                        .layers = 3,
                                                        .heads = 4,
                                                        .kv_heads = 2,
                                                        .head_dim = 8,
                                                        .tied = true},
                                                       "gqa2_tied"},
                                           ForwardCase{{.vocab = 103,
                                                        .dim = 33,
                                                        .hidden = 70,
                                                        .layers = 2,
                                                        .heads = 6,
                                                        .kv_heads = 2,
                                                        .head_dim = 8,
                                                        .qkv_bias = true},
                                                       "gqa3_bias"},
                                           ForwardCase{{.vocab = 50,
                                                        .dim = 40,
                                                        .hidden = 64,
                                                        .layers = 1,
                                                        .heads = 3,
                                                        .kv_heads = 1,
                                                        .head_dim = 10},
                                                       "mqa"}),
                         [](const auto& param_info) {
                           return std::string(param_info.param.label);
                         });

TEST(Forward, ChunkedPrefillEqualsSinglePrefill) {
  const test::RandomModelShape s;
  const Model model = test::make_random_model(s, 3);
  const std::vector<int32_t> tokens = random_tokens(20, s.vocab, 11);
  InferenceSession whole(model), chunked(model);
  const std::vector<float> a = whole.forward_last(tokens);
  chunked.forward_last(std::span(tokens).first(7));
  chunked.forward_last(std::span(tokens).subspan(7, 6));
  const std::vector<float> b = chunked.forward_last(std::span(tokens).subspan(13));
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NEAR(a[i], b[i], 1e-4f * (1 + std::abs(a[i])));
}

TEST(Forward, TruncateAndReplayGivesSameLogits) {
  const test::RandomModelShape s;
  const Model model = test::make_random_model(s, 5);
  const std::vector<int32_t> tokens = random_tokens(10, s.vocab, 13);
  InferenceSession session(model);
  const std::vector<float> first = session.forward_last(tokens);
  session.truncate(6);
  const std::vector<float> again = session.forward_last(std::span(tokens).subspan(6));
  // Batch shapes differ (10 vs 4 tokens), so BLAS may sum in another order: equal to rounding.
  for (size_t i = 0; i < first.size(); ++i) EXPECT_NEAR(first[i], again[i], 1e-5f);
}

TEST(Forward, RejectsBadInput) {
  const test::RandomModelShape s;
  const Model model = test::make_random_model(s, 1);
  InferenceSession session(model, 8);
  const std::vector<int32_t> empty, out_of_range{1, static_cast<int32_t>(s.vocab)}, negative{-1};
  EXPECT_THROW(session.forward_last(empty), Error);
  EXPECT_THROW(session.forward_last(out_of_range), Error);
  EXPECT_THROW(session.forward_last(negative), Error);
  EXPECT_THROW(session.forward_last(random_tokens(9, s.vocab, 1)), Error);  // context 8
  EXPECT_EQ(session.position(), 0);
}

}  // namespace
}  // namespace qalora
