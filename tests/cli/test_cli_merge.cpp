// qalora merge end to end on stories260K: a QA-LoRA adapter trained on the GPTQ INT4 model merges
// into a native INT4 folder that scores a text exactly as the unmerged adapter does; a LoRA
// adapter needs --dense; an existing --out needs --force.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "qalora/core/mapped_file.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;
using test::expect_one_line_error;
using test::run_cli;

const fs::path kStories = "models/stories260K";
const fs::path kTinyStories = "text/tinystories_val.txt";

std::string data(const fs::path& rel) {
  return (test::data_dir() / rel).string();
}

// The number after `label` in `out`; NaN when absent.
double number_after(const std::string& out, const std::string& label) {
  const auto at = out.find(label);
  return at == std::string::npos ? NAN : std::stod(out.substr(at + label.size()));
}

// Equal to three significant digits: within half a unit of the third digit.
void expect_same_3_digits(double a, double b, const std::string& what) {
  EXPECT_LE(std::abs(a - b), 5e-4 * std::abs(b)) << what << ": " << a << " vs " << b;
}

std::vector<std::string> train_args(const fs::path& model, const std::string& kind,
                                    const fs::path& out, const std::string& steps) {
  return {"train",
          "-m",
          model.string(),
          "--data",
          data(kTinyStories),
          "--adapter",
          kind,
          "--rank",
          "8",
          "--learning-rate",
          "2e-3",
          "--max-steps",
          steps,
          "--max-seq-len",
          "64",
          "--eval-fraction",
          "0.01",
          "--out",
          out.string()};
}

TEST(CliMerge, QaLoraMergesExactlyIntoTheGptqOffsets) {
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  QL_REQUIRE_DATA(kTinyStories);
  const fs::path dir = test::temp_dir();
  const fs::path eval = dir / "eval.txt", q = dir / "q4", run = dir / "run", out = dir / "merged";
  std::ofstream(eval) << read_file(test::data_dir() / kTinyStories).substr(0, 20000);
  auto r = run_cli({"quantize", "-m", data(kStories / "stories260K.bin"), "--tokenizer",
                    data(kStories / "tok512.bin"), "--method", "gptq", "--bits", "4", "-g", "32",
                    "--calib", data(kTinyStories), "--calib-samples", "16", "--calib-len", "128",
                    "-o", q.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = run_cli(train_args(q, "qalora", run, "20"));
  ASSERT_EQ(r.exit_code, 0) << r.err;

  r = run_cli({"merge", "-m", q.string(), "--adapter", run.string(), "--out", out.string(),
               "--fidelity-text", eval.string(), "--ctx", "128"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_LE(number_after(r.out, "max |logit diff|:"), 1e-2) << r.out;
  const double ppl_unmerged = number_after(r.out, "ppl unmerged:");
  expect_same_3_digits(number_after(r.out, "ppl merged:"), ppl_unmerged, "printed perplexities");

  // Still a native INT4 folder, with the merge recorded beside it.
  const auto qc = nlohmann::json::parse(read_file(out / "quantize_config.json"));
  EXPECT_EQ(qc.at("bits"), 4);
  const auto record = nlohmann::json::parse(read_file(out / "merge.json"));
  EXPECT_EQ(record.at("method"), "qalora-offsets");
  EXPECT_EQ(record.at("kind"), "qalora");
  EXPECT_EQ(record.at("rank"), 8);
  EXPECT_NEAR(record.at("fidelity").at("ppl_unmerged").get<double>(), ppl_unmerged, 1e-5);
  // info shows the merge record of the model and an adapter folder's configuration.
  auto info = run_cli({"info", out.string(), "--json"});
  ASSERT_EQ(info.exit_code, 0) << info.err;
  EXPECT_EQ(nlohmann::json::parse(info.out).at("merge").at("method"), "qalora-offsets");
  info = run_cli({"info", out.string()});
  EXPECT_NE(info.out.find("merged:"), std::string::npos) << info.out;
  info = run_cli({"info", run.string()});
  ASSERT_EQ(info.exit_code, 0) << info.err;
  const auto adapter = nlohmann::json::parse(info.out);
  EXPECT_EQ(adapter.at("config").at("kind"), "qalora");
  EXPECT_EQ(adapter.at("config").at("rank"), 8);
  EXPECT_GT(adapter.at("adapted_layers").get<int>(), 0);

  const auto ppl = [&](const std::vector<std::string>& model) {
    std::vector<std::string> args = {"perplexity", "--text", eval.string(), "--ctx", "128"};
    args.insert(args.end(), model.begin(), model.end());
    const auto p = run_cli(args);
    EXPECT_EQ(p.exit_code, 0) << p.err;
    return number_after(p.out, "ppl:");
  };
  const double merged = ppl({"-m", out.string()});
  const double unmerged = ppl({"-m", q.string(), "--adapter", run.string()});
  expect_same_3_digits(merged, unmerged, "perplexity of the merged folder");
  EXPECT_GT(std::abs(ppl({"-m", q.string()}) - unmerged), 1e-3 * unmerged)
      << "the adapter must change the perplexity";

  // The folder is there now: refused without --force, rewritten with it.
  r = run_cli({"merge", "-m", q.string(), "--adapter", run.string(), "--out", out.string(),
               "--fidelity-text", "none"});
  expect_one_line_error(r, "--out");
  r = run_cli({"merge", "-m", q.string(), "--adapter", run.string(), "--out", out.string(),
               "--fidelity-text", "none", "--force"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out.find("max |logit diff|"), std::string::npos) << r.out;
  EXPECT_TRUE(nlohmann::json::parse(read_file(out / "merge.json")).at("fidelity").is_null());
}

TEST(CliMerge, LoraOnAQuantizedBaseNeedsDense) {
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  QL_REQUIRE_DATA(kTinyStories);
  const fs::path dir = test::temp_dir();
  const fs::path q = dir / "q4", run = dir / "run", out = dir / "merged";
  auto r = run_cli({"quantize", "-m", data(kStories / "stories260K.bin"), "--tokenizer",
                    data(kStories / "tok512.bin"), "--method", "rtn", "--bits", "4", "-g", "32",
                    "-o", q.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = run_cli(train_args(q, "lora", run, "3"));
  ASSERT_EQ(r.exit_code, 0) << r.err;

  r = run_cli({"merge", "-m", q.string(), "--adapter", run.string(), "--out", out.string(),
               "--fidelity-text", "none"});
  expect_one_line_error(r, "--dense");
  EXPECT_FALSE(fs::exists(out));
  r = run_cli({"merge", "-m", q.string(), "--adapter", run.string(), "--out", out.string(),
               "--fidelity-text", data(kTinyStories), "--fidelity-tokens", "300", "--ctx", "64",
               "--dense"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_LE(number_after(r.out, "max |logit diff|:"), 1e-2) << r.out;
  EXPECT_FALSE(fs::exists(out / "quantize_config.json")) << "every linear was adapted";
  EXPECT_EQ(nlohmann::json::parse(read_file(out / "merge.json")).at("method"), "dense");

  r = run_cli(
      {"merge", "-m", q.string(), "--adapter", run.string(), "--out", (dir / "other").string()});
  expect_one_line_error(r, "--fidelity-text");
}

}  // namespace
}  // namespace qalora
