// qalora export end to end on stories260K: GGUF, GPTQ and dense folders of an INT4 model with
// their reports, a QA-LoRA adapter merged on the way, and one-line errors for what cannot be
// exported.
#include <gtest/gtest.h>

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

// `qalora quantize` of stories260K into dir/name.
fs::path quantize(const fs::path& dir, const std::string& name, const std::string& method,
                  const std::string& bits) {
  const fs::path out = dir / name;
  const auto r = run_cli({"quantize", "-m", data(kStories / "stories260K.bin"), "--tokenizer",
                          data(kStories / "tok512.bin"), "--method", method, "--bits", bits, "-g",
                          method == "nf4" ? "64" : "32", "-o", out.string()});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return out;
}

// The logits line `qalora logits` prints for a fixed prompt.
std::string logits(const fs::path& model) {
  const auto r = run_cli({"logits", "-m", model.string(), "-p", "Once upon a time"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.out;
}

TEST(CliExport, GgufGptqAndHfOfAnInt4Model) {
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  const fs::path dir = test::temp_dir();
  const fs::path q = quantize(dir, "q4", "rtn", "4");
  const fs::path gguf = dir / "q4.gguf";

  auto r = run_cli({"export", "-m", q.string(), "--format", "gguf", "-o", gguf.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("max |dw|: 0\n"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("Q4_1 x30"), std::string::npos) << r.out;
  const auto report = nlohmann::json::parse(read_file(gguf.string() + ".export.json"));
  EXPECT_EQ(report.at("format"), "gguf");
  EXPECT_EQ(report.at("exact"), true);
  EXPECT_EQ(report.at("types").at("Q4_1"), 30);
  EXPECT_EQ(logits(gguf), logits(q));

  // The file is there now: refused without --force, replaced with it.
  r = run_cli({"export", "-m", q.string(), "--format", "gguf", "-o", gguf.string()});
  expect_one_line_error(r, "--force");
  r = run_cli({"export", "-m", q.string(), "--format", "gguf", "-o", gguf.string(), "--type", "f32",
               "--force"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(read_file(gguf.string() + ".export.json")).at("types").at("F32"),
            36);

  const fs::path gptq = dir / "gptq";
  r = run_cli(
      {"export", "-m", q.string(), "--format", "gptq", "--gptq-format", "v2", "-o", gptq.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto qc = nlohmann::json::parse(read_file(gptq / "config.json")).at("quantization_config");
  EXPECT_EQ(qc.at("checkpoint_format"), "gptq_v2");
  EXPECT_TRUE(fs::exists(gptq / "export.json"));
  EXPECT_TRUE(fs::exists(gptq / "tokenizer.json"));
  r = run_cli({"export", "-m", q.string(), "--format", "gptq", "-o", gptq.string()});
  expect_one_line_error(r, "--force");
  r = run_cli({"export", "-m", q.string(), "--format", "gptq", "-o", gptq.string(), "--force"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(nlohmann::json::parse(read_file(gptq / "config.json"))
                .at("quantization_config")
                .at("checkpoint_format"),
            "gptq");

  const fs::path hf = dir / "hf";
  r = run_cli({"export", "-m", q.string(), "--format", "hf", "-o", hf.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_FALSE(fs::exists(hf / "quantize_config.json"));
  EXPECT_EQ(logits(hf), logits(q));
}

TEST(CliExport, AdaptersMergeOnTheWayOrBecomePeftFiles) {
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  QL_REQUIRE_DATA(kTinyStories);
  const fs::path dir = test::temp_dir();
  const fs::path q = quantize(dir, "q4", "rtn", "4");
  const fs::path text = dir / "train.txt";  // a slice: tokenizing the whole file is the slow part
  std::ofstream(text) << read_file(test::data_dir() / kTinyStories).substr(0, 20000);
  const auto train = [&](const std::string& kind) {
    const fs::path out = dir / kind;
    const auto r = run_cli({"train",
                            "-m",
                            q.string(),
                            "--data",
                            text.string(),
                            "--adapter",
                            kind,
                            "--rank",
                            "4",
                            "--learning-rate",
                            "2e-3",
                            "--max-steps",
                            "2",
                            "--grad-accum",
                            "1",
                            "--max-seq-len",
                            "32",
                            "--eval-fraction",
                            "0.01",
                            "--out",
                            out.string()});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return out.string();
  };
  const std::string qalora = train("qalora"), lora = train("lora");

  // QA-LoRA merges into the offsets, which Q4_1 stores in fp16: they are rounded first, with
  // error feedback on the adapter's training data.
  const fs::path gguf = dir / "merged.gguf";
  auto r = run_cli(
      {"export", "-m", q.string(), "--adapter", qalora, "--format", "gguf", "-o", gguf.string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto report = nlohmann::json::parse(read_file(gguf.string() + ".export.json"));
  EXPECT_EQ(report.at("max_abs_dw").get<double>(), 0) << "exact, offsets as rounded";
  const auto& offsets = report.at("offsets");
  EXPECT_EQ(offsets.at("onto"), "fp16");
  EXPECT_GT(offsets.at("max_abs_dm").get<double>(), 0);
  EXPECT_EQ(fs::path(offsets.at("calibration").get<std::string>()).filename(), "train.txt");
  EXPECT_LT(offsets.at("error_vs_nearest").get<double>(), 1.0);
  const double ppl = offsets.at("ppl_model").get<double>();
  EXPECT_NEAR(offsets.at("ppl_stored").get<double>(), ppl, 1e-3 * ppl);
  EXPECT_NE(r.out.find("with error feedback on"), std::string::npos) << r.out;

  r = run_cli({"export", "-m", q.string(), "--adapter", qalora, "--format", "gguf", "-o",
               gguf.string(), "--force", "--calib", "none"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  report = nlohmann::json::parse(read_file(gguf.string() + ".export.json"));
  EXPECT_FALSE(report.at("offsets").contains("calibration"));
  EXPECT_GT(report.at("offsets").at("max_abs_dm").get<double>(), 0);
  EXPECT_NE(r.out.find("each to its nearest value (--calib none)"), std::string::npos) << r.out;

  r = run_cli({"export", "-m", q.string(), "--adapter", lora, "--format", "gguf", "-o",
               (dir / "lora.gguf").string()});
  expect_one_line_error(r, "--format hf");
  r = run_cli({"export", "-m", q.string(), "--adapter", lora, "--format", "hf", "-o",
               (dir / "lora-hf").string()});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  // Merged in fp32, then stored in bf16 as Hugging Face publishes models: the rounding is
  // reported, and the folder loads (its logits differ from the fp32 folder's by the rounding).
  r = run_cli({"export", "-m", q.string(), "--adapter", lora, "--format", "hf", "--type", "bf16",
               "-o", (dir / "lora-hf16").string()});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("tensors: BF16 x"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("not exact"), std::string::npos) << r.out;
  EXPECT_NE(logits(dir / "lora-hf16"), logits(dir / "lora-hf"));
  r = run_cli({"export", "-m", q.string(), "--adapter", lora, "--format", "peft", "-o",
               (dir / "lora-peft").string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_TRUE(fs::exists(dir / "lora-peft" / "adapter_config.json"));
  EXPECT_TRUE(fs::exists(dir / "lora-peft" / "adapter_model.safetensors"));
  // stories260K's down projection has 172 inputs: groups of 32 leave a last group of 12.
  r = run_cli({"export", "-m", q.string(), "--adapter", qalora, "--format", "peft", "-o",
               (dir / "qalora-peft").string()});
  expect_one_line_error(r, "PEFT cannot express");
  EXPECT_FALSE(fs::exists(dir / "qalora-peft"));
}

TEST(CliExport, WhatCannotBeExportedIsAOneLineError) {
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  const fs::path dir = test::temp_dir();
  const fs::path q = quantize(dir, "q4", "rtn", "4");
  const fs::path nf4 = quantize(dir, "nf4", "nf4", "4");
  const std::string out = (dir / "out").string();
  const auto expect_error = [&](std::vector<std::string> args, const std::string& mentions) {
    args.insert(args.begin(), "export");
    const auto r = run_cli(args);
    expect_one_line_error(r, mentions);
    EXPECT_FALSE(fs::exists(out)) << mentions;
  };
  expect_error({"-m", q.string(), "--format", "gguf", "--type", "q4_0", "-o", out},
               "--allow-lossy");
  expect_error({"-m", nf4.string(), "--format", "gguf", "--type", "q4_1", "-o", out},
               "--allow-lossy");
  expect_error({"-m", nf4.string(), "--format", "gptq", "-o", out}, "nf4");
  expect_error({"-m", q.string(), "--format", "peft", "-o", out}, "--adapter");
  expect_error({"-m", q.string(), "--format", "hf", "--type", "q4_0", "-o", out}, "--type");
  expect_error({"-m", q.string(), "--format", "gptq", "--type", "bf16", "-o", out}, "--type");
  expect_error({"-m", q.string(), "--format", "onnx", "-o", out}, "--format");
  expect_error({"-m", q.string(), "--format", "gguf", "--type", "q5_k", "-o", out}, "--type");
  expect_error({"-m", q.string(), "--format", "gptq", "--gptq-format", "v3", "-o", out},
               "--gptq-format");
  expect_error({"-m", data(kStories / "stories260K.bin"), "--tokenizer",
                data(kStories / "tok512.bin"), "--format", "gptq", "-o", out},
               "no quantized linear");
  expect_error({"-m", q.string(), "--format", "hf", "--calib", "x.txt", "-o", out}, "--calib");
  expect_error({"-m", q.string(), "--format", "gguf", "--type", "f16", "--calib", "x.txt", "-o",
                out},
               "--calib");
  expect_error({"-m", q.string(), "--format", "gguf", "--calib-tokens", "0", "-o", out},
               "--calib-tokens");
  expect_error({"-m", q.string(), "--format", "gguf", "--calib", "missing.txt", "-o", out},
               "--calib: cannot open missing.txt");

  // Allowed, the error is reported.
  const auto r = run_cli({"export", "-m", q.string(), "--format", "gguf", "--type", "q4_0",
                          "--allow-lossy", "-o", out});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("not exact"), std::string::npos) << r.out;
  EXPECT_GT(
      nlohmann::json::parse(read_file(out + ".export.json")).at("relative_error").get<double>(), 0);
}

}  // namespace
}  // namespace qalora
