// Integration tests on the real checkpoints in ../shared/data and the default SmolLM2 model.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "qalora/core/mapped_file.h"
#include "qalora/model/runtime.h"
#include "test_util.h"

namespace qalora {
namespace {

const char* kStoriesBin = "models/stories260K/stories260K.bin";
const char* kStoriesTok = "models/stories260K/tok512.bin";
const char* kStoriesGguf = "models/stories260K/stories260K.gguf";

Model load_stories_bin() {
  return load_model(test::data_dir() / kStoriesBin, {.tokenizer = test::data_dir() / kStoriesTok});
}

std::vector<float> all_logits(const Model& m, const std::vector<int32_t>& tokens) {
  InferenceSession s(m, static_cast<int64_t>(tokens.size()));
  std::vector<float> logits(tokens.size() * static_cast<size_t>(m.config.vocab_size));
  s.forward(tokens, logits, /*all_logits=*/true);
  return logits;
}

TEST(RealModels, Stories260KBinAndGgufGiveIdenticalLogits) {
  QL_REQUIRE_DATA(kStoriesBin);
  QL_REQUIRE_DATA(kStoriesGguf);
  const Model bin = load_stories_bin();
  const Model gguf = load_model(test::data_dir() / kStoriesGguf);
  ASSERT_EQ(bin.config.vocab_size, gguf.config.vocab_size);
  const std::vector<int32_t> ids = bin.require_tokenizer().encode("Once upon a time, Zoo", true);
  EXPECT_EQ(ids, gguf.require_tokenizer().encode("Once upon a time, Zoo", true));
  EXPECT_EQ(all_logits(bin, ids), all_logits(gguf, ids));  // bit-identical
}

// Greedy decoding through the optimized runtime, checked token by token against the
// double-precision reference forward: both must pick the same argmax.
TEST(RealModels, Stories260KOptimizedMatchesReference) {
  QL_REQUIRE_DATA(kStoriesBin);
  const Model m = load_stories_bin();
  const std::vector<int32_t> ids = m.require_tokenizer().encode("Zoo", true);
  const std::vector<float> fast = all_logits(m, ids);
  const std::vector<double> ref = reference_forward(m, ids);
  double diff = 0, scale = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    diff = std::max(diff, std::abs(fast[i] - ref[i]));
    scale = std::max(scale, std::abs(ref[i]));
  }
  EXPECT_LT(diff / scale, 1e-4);
}

TEST(RealModels, HuggingFaceRoundTripGivesIdenticalLogits) {
  QL_REQUIRE_DATA(kStoriesGguf);
  const Model src = load_model(test::data_dir() / kStoriesGguf);
  const auto dir = test::temp_dir() / "hf";
  save_hf_model(src, dir);
  const Model back = load_model(dir, {.tokenizer = test::data_dir() / kStoriesTok});
  EXPECT_EQ(back.format, ModelFormat::HuggingFace);
  const std::vector<int32_t> ids = src.require_tokenizer().encode("The cat sat on the mat.", true);
  EXPECT_EQ(all_logits(src, ids), all_logits(back, ids));
}

TEST(RealModels, SmolLM2HuggingFaceRoundTripKeepsLogitsAndTokenizer) {
  QL_REQUIRE_SMOLLM2();
  const Model src = load_model(test::smollm2_path());
  const auto dir = test::temp_dir() / "hf";
  save_hf_model(src, dir);
  const Model back = load_model(dir);
  ASSERT_NE(back.tokenizer, nullptr) << "tokenizer.json was not written or not read back";
  const std::string text = "Hello world! 1234 <|im_start|>user";
  const std::vector<int32_t> ids = src.require_tokenizer().encode(text, false, true);
  EXPECT_EQ(ids, back.require_tokenizer().encode(text, false, true));
  EXPECT_EQ(all_logits(src, ids), all_logits(back, ids));
}

TEST(RealModels, SmolLM2ConfigFromGguf) {
  QL_REQUIRE_SMOLLM2();
  const Model m = load_model(test::smollm2_path());
  const ModelConfig& c = m.config;
  EXPECT_EQ(c.dim, 576);
  EXPECT_EQ(c.n_layers, 30);
  EXPECT_EQ(c.n_heads, 9);
  EXPECT_EQ(c.n_kv_heads, 3);
  EXPECT_EQ(c.hidden_dim, 1536);
  EXPECT_EQ(c.vocab_size, 49152);
  EXPECT_TRUE(c.tied_embeddings);
  EXPECT_FLOAT_EQ(c.rope_theta, 100000.0f);
  EXPECT_EQ(m.require_tokenizer().pad_id(), 2);
}

// SmolLM2 through our GGUF loader and runtime against an independent numpy forward pass over
// the same file (tests/model/numpy_forward.py, gguf-py's dequantizers, float64).
TEST(RealModels, SmolLM2MatchesNumpyForward) {
  QL_REQUIRE_SMOLLM2();
  const Model m = load_model(test::smollm2_path());
  const std::vector<int32_t> ids =
      m.require_tokenizer().encode("The capital of France is Paris, and the capital of", false);
  const auto out = test::temp_dir() / "numpy.json";
  std::vector<std::string> args = {test::smollm2_path().string(), out.string()};
  for (int32_t id : ids) args.push_back(std::to_string(id));
  std::string err;
  const int rc = test::run_python(
      std::filesystem::path(__FILE__).parent_path() / "numpy_forward.py", args, err);
  if (rc == test::kPythonMissing) GTEST_SKIP() << "numpy/gguf unavailable: " << err;
  ASSERT_EQ(rc, 0) << err;
  const auto expected = nlohmann::json::parse(read_file(out))["logits"].get<std::vector<double>>();

  InferenceSession session(m);
  const std::vector<float> logits = session.forward_last(ids);
  ASSERT_EQ(logits.size(), expected.size());
  double diff = 0, scale = 0;
  size_t ours = 0, theirs = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    diff = std::max(diff, std::abs(logits[i] - expected[i]));
    scale = std::max(scale, std::abs(expected[i]));
    if (logits[i] > logits[ours]) ours = i;
    if (expected[i] > expected[theirs]) theirs = i;
  }
  std::printf("max |logit difference| %.3g (%.3g relative)\n", diff, diff / scale);
  EXPECT_LT(diff / scale, 1e-4);
  EXPECT_EQ(ours, theirs);
}

}  // namespace
}  // namespace qalora
