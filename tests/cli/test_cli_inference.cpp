// The inference subcommands end to end, on real models: run as a subprocess like a user would.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;
using test::run_cli;

const fs::path kStories = "models/stories260K";

std::string stories(const std::string& file) {
  return (test::data_dir() / kStories / file).string();
}

// Greedy continuation of "Zoo" by llama2.c (data/README.md), an independent implementation.
// llama2.c counts 60 steps including the prompt positions after BOS.
const std::string kZooContinuation =
    "Zoo was a little girl named Lily. She loved to play outside in the park. One day, she saw "
    "a big, red ball. She wanted to play with it, but she didn't want to play with";
constexpr int kLlama2cSteps = 60;

// Number of ids on the first line of `qalora logits` (BOS included).
size_t prompt_token_count(const std::vector<std::string>& model_args, const std::string& prompt) {
  std::vector<std::string> args = {"logits"};
  args.insert(args.end(), model_args.begin(), model_args.end());
  args.insert(args.end(), {"--prompt", prompt});
  const auto r = run_cli(args);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  std::istringstream line(r.out.substr(0, r.out.find('\n')));
  size_t n = 0;
  for (std::string id; line >> id;) ++n;
  return n;
}

void expect_zoo_continuation(const std::vector<std::string>& model_args) {
  const size_t prompt_tokens = prompt_token_count(model_args, "Zoo");
  ASSERT_GE(prompt_tokens, 2u);
  const int new_tokens = kLlama2cSteps - static_cast<int>(prompt_tokens - 1);
  std::vector<std::string> args = {"generate"};
  args.insert(args.end(), model_args.begin(), model_args.end());
  args.insert(args.end(), {"--prompt", "Zoo", "-n", std::to_string(new_tokens), "--temp", "0"});
  const auto r = run_cli(args);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, kZooContinuation + "\n");
  EXPECT_NE(r.err.find("tok/s"), std::string::npos) << r.err;
  // Without --ctx the cache holds the prompt and the tokens asked for, not the whole context.
  const std::string cache = "KV cache " + std::to_string(prompt_tokens + new_tokens) + " positions";
  EXPECT_NE(r.err.find(cache), std::string::npos) << r.err;
}

TEST(CliGenerate, StoriesGreedyMatchesLlama2cFromBin) {
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  expect_zoo_continuation(
      {"--model", stories("stories260K.bin"), "--tokenizer", stories("tok512.bin")});
}

TEST(CliGenerate, StoriesGreedyMatchesLlama2cFromGguf) {
  QL_REQUIRE_DATA(kStories / "stories260K.gguf");
  expect_zoo_continuation({"--model", stories("stories260K.gguf")});
}

TEST(CliGenerate, SampledRunsAreReproducibleWithASeed) {
  QL_REQUIRE_DATA(kStories / "stories260K.gguf");
  const std::vector<std::string> args = {"generate", "--model", stories("stories260K.gguf"),
                                         "--prompt", "Once",    "-n",
                                         "30",       "--seed",  "5"};
  const auto a = run_cli(args), b = run_cli(args);
  ASSERT_EQ(a.exit_code, 0) << a.err;
  EXPECT_EQ(a.out, b.out);
  EXPECT_TRUE(a.out.starts_with("Once")) << a.out;
}

TEST(CliLogits, BinAndGgufAgree) {
  QL_REQUIRE_DATA(kStories / "stories260K.gguf");
  const auto bin = run_cli({"logits", "--model", stories("stories260K.bin"), "--tokenizer",
                            stories("tok512.bin"), "--prompt", "Once upon a time"});
  const auto gguf =
      run_cli({"logits", "--model", stories("stories260K.gguf"), "--prompt", "Once upon a time"});
  ASSERT_EQ(bin.exit_code, 0) << bin.err;
  ASSERT_EQ(gguf.exit_code, 0) << gguf.err;
  EXPECT_EQ(bin.out, gguf.out);

  std::istringstream lines(gguf.out);
  std::string ids, logits;
  std::getline(lines, ids);
  std::getline(lines, logits);
  EXPECT_TRUE(ids.starts_with("1 ")) << ids;  // BOS first
  std::istringstream values(logits);
  int count = 0;
  for (double v; values >> v; ++count) EXPECT_TRUE(std::isfinite(v));
  EXPECT_EQ(count, 512);
}

TEST(CliLogits, IdsGiveTheSameLogitsAsThePrompt) {
  QL_REQUIRE_DATA(kStories / "stories260K.gguf");
  const auto from_prompt =
      run_cli({"logits", "--model", stories("stories260K.gguf"), "--prompt", "Zoo"});
  ASSERT_EQ(from_prompt.exit_code, 0) << from_prompt.err;
  std::string ids = from_prompt.out.substr(0, from_prompt.out.find('\n'));
  std::replace(ids.begin(), ids.end(), ' ', ',');
  const auto from_ids =
      run_cli({"logits", "--model", stories("stories260K.gguf"), "--ids", ids, "--top", "3"});
  ASSERT_EQ(from_ids.exit_code, 0) << from_ids.err;
  EXPECT_TRUE(from_ids.out.starts_with(from_prompt.out));
  // Three more lines: id, logit, piece.
  EXPECT_EQ(std::count(from_ids.out.begin(), from_ids.out.end(), '\n'), 5);
}

TEST(CliPerplexity, StoriesOnTinyStoriesIsLow) {
  QL_REQUIRE_DATA(kStories / "stories260K.gguf");
  QL_REQUIRE_DATA("text/tinystories_val.txt");
  const fs::path metrics = test::temp_dir() / "ppl.jsonl";
  const auto r = run_cli({"perplexity", "--model", stories("stories260K.gguf"), "--text",
                          (test::data_dir() / "text/tinystories_val.txt").string(), "--max-windows",
                          "2", "--metrics", metrics.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("windows:       2\n"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("tokens scored: 1022\n"), std::string::npos) << r.out;
  const size_t at = r.out.find("ppl:");
  ASSERT_NE(at, std::string::npos) << r.out;
  const double ppl = std::stod(r.out.substr(at + 4));
  EXPECT_TRUE(std::isfinite(ppl));
  EXPECT_GT(ppl, 1.0);
  EXPECT_LT(ppl, 20.0);  // a uniform guess over the 512 tokens would be 512
  EXPECT_TRUE(fs::exists(metrics));
}

TEST(CliInfo, DescribesStoriesGguf) {
  QL_REQUIRE_DATA(kStories / "stories260K.gguf");
  const auto text = run_cli({"info", stories("stories260K.gguf"), "--tensors"});
  ASSERT_EQ(text.exit_code, 0) << text.err;
  EXPECT_NE(text.out.find("F32 x48"), std::string::npos) << text.out;
  EXPECT_NE(text.out.find("token_embd.weight"), std::string::npos) << text.out;
  const auto json = run_cli({"info", stories("stories260K.gguf"), "--json"});
  ASSERT_EQ(json.exit_code, 0) << json.err;
  EXPECT_NE(json.out.find("\"n_kv_heads\": 4"), std::string::npos) << json.out;
  EXPECT_NE(json.out.find("\"vocab_size\": 512"), std::string::npos) << json.out;
}

TEST(CliErrors, MissingModelFile) {
  test::expect_one_line_error(
      run_cli({"generate", "--model", "/nonexistent/model.gguf", "--prompt", "a"}));
}

TEST(CliErrors, EmptyPrompt) {
  QL_REQUIRE_DATA(kStories / "stories260K.gguf");
  test::expect_one_line_error(
      run_cli({"generate", "--model", stories("stories260K.gguf"), "--prompt", ""}));
}

TEST(CliErrors, IdsOutOfRange) {
  QL_REQUIRE_DATA(kStories / "stories260K.gguf");
  const auto r = run_cli({"logits", "--model", stories("stories260K.gguf"), "--ids", "1,512"});
  test::expect_one_line_error(r);
  EXPECT_NE(r.err.find("512"), std::string::npos) << r.err;
}

TEST(CliErrors, Llama2cCheckpointWithoutTokenizer) {
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  const fs::path alone = test::temp_dir() / "stories260K.bin";
  fs::copy_file(stories("stories260K.bin"), alone);
  const auto r = run_cli({"generate", "--model", alone.string(), "--prompt", "Zoo"});
  test::expect_one_line_error(r);
  EXPECT_NE(r.err.find("--tokenizer"), std::string::npos) << r.err;
}

TEST(CliErrors, UnknownOption) {
  test::expect_one_line_error(
      run_cli({"generate", "--model", "m.gguf", "--prompt", "a", "--bogus"}));
}

TEST(CliErrors, MissingTextFile) {
  QL_REQUIRE_DATA(kStories / "stories260K.gguf");
  const auto r = run_cli(
      {"perplexity", "--model", stories("stories260K.gguf"), "--text", "/nonexistent/text.txt"});
  test::expect_one_line_error(r);
  EXPECT_NE(r.err.find("--text"), std::string::npos) << r.err;
}

TEST(CliErrors, EmptyTextFile) {
  QL_REQUIRE_DATA(kStories / "stories260K.gguf");
  const fs::path empty = test::temp_dir() / "empty.txt";
  std::ofstream(empty).close();
  const auto r =
      run_cli({"perplexity", "--model", stories("stories260K.gguf"), "--text", empty.string()});
  test::expect_one_line_error(r);
  EXPECT_NE(r.err.find("is empty"), std::string::npos) << r.err;
}

TEST(CliErrors, ChatWithoutTemplate) {
  QL_REQUIRE_DATA(kStories / "stories260K.gguf");
  const auto r = run_cli({"chat", "--model", stories("stories260K.gguf"), "--prompt", "Hi"});
  test::expect_one_line_error(r);
  EXPECT_NE(r.err.find("--chat-template"), std::string::npos) << r.err;
}

TEST(CliChat, SmolLM2KnowsTheCapitalOfFrance) {
  QL_REQUIRE_SMOLLM2();
  const auto r = run_cli({"chat", "--model", test::smollm2_path().string(), "--prompt",
                          "What is the capital of France?", "--temp", "0", "-n", "48"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("Paris"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace qalora
