// qalora eval end to end on stories260K: the table, the JSON with per-item results, the
// shared-prefix switch, and one-line errors for bad input.
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "qalora/core/mapped_file.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;
using test::run_cli;

// fp32: these tests compare scoring paths number by number, and in bf16 a continuation fed as a
// few decode steps (fp32 GEMV) rounds differently from one fed inside a prefill (bf16 GEMM).
std::vector<std::string> stories_eval() {
  const fs::path dir = test::data_dir() / "models/stories260K";
  return {"eval",
          "--model",
          (dir / "stories260K.bin").string(),
          "--tokenizer",
          (dir / "tok512.bin").string(),
          "--no-progress",
          "--threads",
          "1",
          "--compute-dtype",
          "fp32"};
}

std::string mc(const std::string& file) { return (test::data_dir() / "eval/mc" / file).string(); }

test::CliResult run_eval(std::vector<std::string> extra) {
  std::vector<std::string> args = stories_eval();
  args.insert(args.end(), extra.begin(), extra.end());
  return run_cli(args);
}

fs::path write_text(const fs::path& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
  return path;
}

#define QL_REQUIRE_EVAL_DATA()                          \
  QL_REQUIRE_DATA("models/stories260K/stories260K.bin"); \
  QL_REQUIRE_DATA("eval/mc/arc_easy.jsonl")

TEST(CliEval, TableAndJsonWithPerItemResults) {
  QL_REQUIRE_EVAL_DATA();
  const fs::path out = test::temp_dir() / "results.json";
  const auto r = run_eval({"--task", "arc", "--data", mc("arc_easy.jsonl"), "--task", "winogrande",
                           "--data", mc("winogrande.jsonl"), "--limit", "20", "--out",
                           out.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("acc_norm"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("winogrande"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(" ± "), std::string::npos) << r.out;
  const auto j = nlohmann::json::parse(read_file(out));
  ASSERT_EQ(j["tasks"].size(), 2u);
  const auto& arc = j["tasks"][0];
  EXPECT_EQ(arc["task"], "arc");
  EXPECT_EQ(arc["n"], 20);
  ASSERT_EQ(arc["items"].size(), 20u);
  int64_t right = 0;
  for (const auto& item : arc["items"]) {
    const auto ll = item["loglik"].get<std::vector<double>>();
    ASSERT_EQ(ll.size(), 4u);
    EXPECT_EQ(item["pred"], std::max_element(ll.begin(), ll.end()) - ll.begin());
    right += item["pred"] == item["gold"] ? 1 : 0;
  }
  EXPECT_DOUBLE_EQ(arc["metrics"]["acc"]["value"].get<double>(), static_cast<double>(right) / 20);
  EXPECT_FALSE(j["tasks"][1]["metrics"].contains("acc_norm"));  // one shared continuation

  // A second run and a run without shared prefixes give the same per-item numbers.
  const fs::path again = test::temp_dir() / "again.json";
  const auto r2 = run_eval({"--task", "arc", "--data", mc("arc_easy.jsonl"), "--limit", "20",
                            "--no-shared-prefix", "--out", again.string()});
  ASSERT_EQ(r2.exit_code, 0) << r2.err;
  const auto j2 = nlohmann::json::parse(read_file(again));
  for (size_t i = 0; i < 20; ++i) {
    const auto a = arc["items"][i]["loglik"].get<std::vector<double>>();
    const auto b = j2["tasks"][0]["items"][i]["loglik"].get<std::vector<double>>();
    for (size_t c = 0; c < a.size(); ++c) EXPECT_NEAR(a[c], b[c], 1e-4) << "item " << i;
  }
  EXPECT_GT(j2["tasks"][0]["tokens_fed"].get<int64_t>(), arc["tokens_fed"].get<int64_t>());
}

TEST(CliEval, ClozeGsm8kAndPplRun) {
  QL_REQUIRE_EVAL_DATA();
  QL_REQUIRE_DATA("eval/gsm8k_test.jsonl");
  const fs::path dir = test::temp_dir();
  const fs::path cloze = write_text(dir / "cloze.jsonl",
                                    R"({"context": "Once upon a time, there was a little", "continuation": " girl"})"
                                    "\n"
                                    R"({"context": "The cat sat on the", "continuation": " mat"})"
                                    "\n");
  const fs::path text = write_text(dir / "text.txt", "Once upon a time, there was a little girl "
                                                     "named Lily. She loved to play outside.");
  const fs::path out = dir / "r.json";
  const std::string gsm8k = (test::data_dir() / "eval/gsm8k_test.jsonl").string();
  const auto r = run_eval({"--task", "cloze", "--data", cloze.string(), "--task", "gsm8k",
                           "--data", gsm8k, "--shots", "2", "--shots-data", gsm8k, "--limit", "2",
                           "--max-new-tokens", "8", "--task", "ppl", "--data", text.string(),
                           "--out", out.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(read_file(out));
  ASSERT_EQ(j["tasks"].size(), 3u);
  EXPECT_EQ(j["tasks"][0]["n"], 2);
  EXPECT_TRUE(j["tasks"][0]["metrics"].contains("ppl"));
  EXPECT_EQ(j["tasks"][1]["n"], 2);
  EXPECT_LE(j["tasks"][1]["items"][0]["tokens"].get<int64_t>(), 8);
  EXPECT_TRUE(j["tasks"][1]["metrics"].contains("exact_match"));
  EXPECT_GT(j["tasks"][2]["metrics"]["ppl"]["value"].get<double>(), 1.0);
}

// A context longer than the window is truncated from the left and counted.
TEST(CliEval, LongContextsAreTruncatedAndCounted) {
  QL_REQUIRE_EVAL_DATA();
  const fs::path out = test::temp_dir() / "r.json";
  const auto r = run_eval({"--task", "boolq", "--data", mc("boolq.jsonl"), "--limit", "5", "--ctx",
                           "32", "--out", out.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto j = nlohmann::json::parse(read_file(out));
  EXPECT_EQ(j["tasks"][0]["truncated"], 5);
  EXPECT_NE(r.out.find("5 truncated"), std::string::npos) << r.out;
  EXPECT_TRUE(j["tasks"][0]["items"][0]["truncated"].get<bool>());
}

TEST(CliEval, BadInputIsOneLineError) {
  QL_REQUIRE_EVAL_DATA();
  const fs::path dir = test::temp_dir();
  test::expect_one_line_error(
      run_eval({"--task", "hellaswog", "--data", mc("arc_easy.jsonl")}), "unknown task");
  // A file of another task's format: the missing field and the line.
  test::expect_one_line_error(
      run_eval({"--task", "arc", "--data", mc("hellaswag_val_1000.jsonl")}),
      "line 1: missing field \"query\"");
  const fs::path gold = write_text(dir / "gold.jsonl",
                                   R"({"query": "q", "choices": ["a", "b"], "gold": 5})"
                                   "\n");
  test::expect_one_line_error(run_eval({"--task", "mc", "--data", gold.string()}),
                              "gold 5 out of range for 2 choices");
  const fs::path empty = write_text(dir / "empty.jsonl", "");
  test::expect_one_line_error(run_eval({"--task", "piqa", "--data", empty.string()}),
                              "holds no items");
  QL_REQUIRE_DATA("eval/mmlu/dev/anatomy_dev.csv");
  test::expect_one_line_error(
      run_eval({"--task", "mmlu", "--data", (test::data_dir() / "eval/mmlu").string(), "--shots",
                "6"}),
      "--shots 6 exceeds the 5 examples of");
  test::expect_one_line_error(
      run_eval({"--task", "arc", "--data", mc("arc_easy.jsonl"), "--shots", "2"}),
      "--shots applies to mmlu and gsm8k");
  test::expect_one_line_error(
      run_eval({"--task", "arc", "--data", mc("arc_easy.jsonl"), "--task", "piqa"}),
      "each --task needs one --data");
  test::expect_one_line_error(run_eval({"--task", "gsm8k", "--data", mc("arc_easy.jsonl")}),
                              "missing field \"question\"");
  test::expect_one_line_error(
      run_eval({"--task", "arc", "--data", mc("arc_easy.jsonl"), "--chat-template"}),
      "has no chat template");
}

}  // namespace
}  // namespace qalora
