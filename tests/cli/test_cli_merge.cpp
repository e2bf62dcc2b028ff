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

  // Stored in bf16, as Hugging Face publishes models: the fidelity check reads the folder as
  // written, so it sees the rounding.
  const fs::path out16 = dir / "merged16";
  r = run_cli({"merge", "-m", q.string(), "--adapter", run.string(), "--out", out16.string(),
               "--fidelity-text", data(kTinyStories), "--fidelity-tokens", "300", "--ctx", "64",
               "--dense", "--type", "bf16"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(read_file(out16 / "config.json")).at("torch_dtype"), "bfloat16");
  const double diff16 = number_after(r.out, "max |logit diff|:");
  EXPECT_GT(diff16, 0.0) << r.out;
  EXPECT_LE(diff16, 0.5) << r.out;
  r = run_cli({"merge", "-m", q.string(), "--adapter", run.string(), "--out", (dir / "m3").string(),
               "--fidelity-text", "none", "--dense", "--type", "q4_0"});
  expect_one_line_error(r, "--type");
}

// The paper's comparison in miniature, on INT2 where it matters most: a QA-LoRA adapter merges
// into the GPTQ offsets without loss, while a LoRA adapter merged and quantized again (RTN or
// GPTQ, the "QLoRA w/ GPTQ" path) loses much of what it learned. Without --fidelity-text the
// check runs on the adapter's own training data.
TEST(CliMerge, RequantizedLoraLosesWhatQaLoraKeeps) {
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  QL_REQUIRE_DATA(kTinyStories);
  const fs::path dir = test::temp_dir();
  const fs::path q = dir / "q2", calib_text = dir / "calib.txt";
  std::ofstream(calib_text) << read_file(test::data_dir() / kTinyStories).substr(0, 60000);
  const std::vector<std::string> calib = {"--calib", calib_text.string(), "--calib-samples", "16",
                                          "--calib-len", "128"};
  std::vector<std::string> args = {"quantize", "-m", data(kStories / "stories260K.bin"),
                                   "--tokenizer", data(kStories / "tok512.bin"), "--method",
                                   "gptq", "--bits", "2", "-g", "32", "-o", q.string()};
  args.insert(args.end(), calib.begin(), calib.end());
  auto r = run_cli(args);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = run_cli(train_args(q, "lora", dir / "lora", "30"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  r = run_cli(train_args(q, "qalora", dir / "qalora", "30"));
  ASSERT_EQ(r.exit_code, 0) << r.err;

  r = run_cli({"merge", "-m", q.string(), "--adapter", (dir / "qalora").string(), "--out",
               (dir / "m-qalora").string(), "--ctx", "128"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find(kTinyStories.filename().string()), std::string::npos)
      << "the default fidelity text is the training data: " << r.out;
  EXPECT_LE(number_after(r.out, "max |logit diff|:"), 1e-2) << r.out;
  expect_same_3_digits(number_after(r.out, "ppl merged:"), number_after(r.out, "ppl unmerged:"),
                       "QA-LoRA");

  for (const std::string method : {"rtn", "gptq"}) {
    SCOPED_TRACE(method);
    const fs::path out = dir / ("m-lora-" + method);
    args = {"merge",        "-m",   q.string(), "--adapter", (dir / "lora").string(),
            "--out",        out.string(),       "--ctx",     "128",
            "--requantize", method, "--bits",   "2",         "-g",
            "32"};
    if (method == "gptq") args.insert(args.end(), calib.begin(), calib.end());
    r = run_cli(args);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const double unmerged = number_after(r.out, "ppl unmerged:");
    const double merged = number_after(r.out, "ppl merged:");
    EXPECT_GT(merged, 1.1 * unmerged) << "re-quantizing at 2 bits must cost: " << r.out;
    EXPECT_GT(number_after(r.out, "max |logit diff|:"), 0.5) << r.out;
    const auto record = nlohmann::json::parse(read_file(out / "merge.json"));
    EXPECT_EQ(record.at("method"), "requantize-" + method);
    EXPECT_EQ(record.at("requantize").at("bits"), 2);
    EXPECT_EQ(record.at("requantize").at("group_size"), 32);
    const auto qc = nlohmann::json::parse(read_file(out / "quantize_config.json"));
    EXPECT_EQ(qc.at("bits"), 2);
  }
}

TEST(CliMerge, BadInputIsOneClearLine) {
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  QL_REQUIRE_DATA(kTinyStories);
  const fs::path dir = test::temp_dir();
  const auto quantize = [&](const fs::path& out, std::vector<std::string> extra) {
    std::vector<std::string> args = {"quantize", "-m", data(kStories / "stories260K.bin"),
                                     "--tokenizer", data(kStories / "tok512.bin"), "-o",
                                     out.string()};
    args.insert(args.end(), extra.begin(), extra.end());
    const auto r = run_cli(args);
    ASSERT_EQ(r.exit_code, 0) << r.err;
  };
  quantize(dir / "g32", {"--bits", "4", "-g", "32"});
  quantize(dir / "g64", {"--bits", "4", "-g", "64"});
  const fs::path calib = dir / "calib.txt";
  std::ofstream(calib) << read_file(test::data_dir() / kTinyStories).substr(0, 20000);
  quantize(dir / "act-order", {"--method", "gptq", "-g", "32", "--act-order", "--calib",
                               calib.string(), "--calib-samples", "8", "--calib-len", "64"});
  const fs::path run = dir / "run";
  auto r = run_cli(train_args(dir / "g32", "qalora", run, "2"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto merge = [&](const fs::path& model, const fs::path& adapter,
                         std::vector<std::string> extra) {
    std::vector<std::string> args = {"merge", "-m", model.string(), "--adapter", adapter.string(),
                                     "--out", (dir / "out").string()};
    args.insert(args.end(), extra.begin(), extra.end());
    return run_cli(args);
  };

  expect_one_line_error(merge(dir / "g64", run, {}), "group");
  expect_one_line_error(merge(dir / "act-order", run, {}), "act-order");
  expect_one_line_error(merge(dir / "g32", run, {"--dense", "--requantize", "rtn"}),
                        "--requantize");
  expect_one_line_error(merge(dir / "g32", run, {"--requantize", "gptq"}), "--calib");
  expect_one_line_error(merge(dir / "g32", run, {"--type", "bf16"}), "--type");
  expect_one_line_error(merge(dir / "g32", run, {"--requantize", "rtn", "--bits", "5"}), "bits");
  // A PEFT-only folder records no training data: the fidelity text must be named. (QA-LoRA on
  // stories260K has no PEFT form: its down projection's last group is ragged.)
  const fs::path lora = dir / "lora", peft = dir / "peft";
  r = run_cli(train_args(dir / "g32", "lora", lora, "2"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  fs::create_directories(peft);
  for (const char* f : {"adapter_config.json", "adapter_model.safetensors"})
    fs::copy_file(lora / f, peft / f);
  expect_one_line_error(merge(dir / "g32", peft, {"--dense"}), "--fidelity-text");
  r = merge(dir / "g32", peft, {"--dense", "--fidelity-text", "none"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_FALSE(fs::exists(dir / "out" / "quantize_config.json.tmp"));
}

}  // namespace
}  // namespace qalora
