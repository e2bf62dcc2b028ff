// qalora train end to end, as a user runs it: QA-LoRA on GPTQ-quantized stories260K lowers the
// held-out loss, an interrupted run resumes to a bit-identical adapter, and bad input fails with
// one clear line; bf16 products follow the fp32 loss curve.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "qalora/core/device.h"
#include "qalora/core/mapped_file.h"
#include "qalora/ops/gemm.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;
using test::expect_one_line_error;
using test::run_cli;

const fs::path kStories = "models/stories260K";
const fs::path kTinyStories = "text/tinystories_val.txt";
const fs::path kAlpaca = "instruct/alpaca_en_demo.json";

std::string data(const fs::path& rel) {
  return (test::data_dir() / rel).string();
}

std::vector<std::string> stories_model() {
  return {"-m", data(kStories / "stories260K.bin"), "--tokenizer", data(kStories / "tok512.bin")};
}

std::vector<std::string> concat(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// "held-out loss: A -> B" of a finished run.
std::pair<double, double> heldout_losses(const std::string& out) {
  const auto at = out.find("held-out loss: ");
  if (at == std::string::npos) return {NAN, NAN};
  const std::string rest = out.substr(at + 15);
  return {std::stod(rest), std::stod(rest.substr(rest.find("->") + 2))};
}

int count_lines_with(const fs::path& file, const std::string& needle) {
  std::ifstream in(file);
  int n = 0;
  for (std::string line; std::getline(in, line);) n += line.find(needle) != std::string::npos;
  return n;
}

// SmolLM2 quantized to RTN INT4 g32 in dir/q4, as a user does before QA-LoRA.
std::string quantize_smollm2(const fs::path& dir) {
  const auto r = run_cli({"quantize", "-m", test::smollm2_path().string(), "--method", "rtn",
                          "--bits", "4", "-g", "32", "-o", (dir / "q4").string()});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return (dir / "q4").string();
}

// `qalora train` of a QA-LoRA r 16 adapter on Alpaca over `q4`; the schedule and lengths follow.
std::vector<std::string> smollm2_qalora(const std::string& q4) {
  return {"train",  "-m",     q4,   "--data",          data(kAlpaca), "--adapter",
          "qalora", "--rank", "16", "--learning-rate", "1e-3"};
}

TEST(CliTrain, QaLoraOnGptqStoriesLowersTheHeldOutLoss) {
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  QL_REQUIRE_DATA(kTinyStories);
  const fs::path dir = test::temp_dir();
  const fs::path eval = dir / "eval.txt";
  const std::string stories = read_file(test::data_dir() / kTinyStories);
  std::ofstream(eval) << stories.substr(0, 20000);
  // A slice of the file is plenty for 30 steps, and tokenizes in a fraction of the time.
  const std::string train_text = (dir / "train.txt").string();
  std::ofstream(train_text) << stories.substr(20000, 150000);
  for (const std::string bits : {"4", "2"}) {
    const fs::path q = dir / ("q" + bits), run = dir / ("run" + bits);
    auto r = run_cli(
        concat(concat({"quantize"}, stories_model()),
               {"--method", "gptq", "--bits", bits, "-g", "32", "--calib", train_text,
                "--calib-samples", "16", "--calib-len", "128", "-o", q.string()}));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    r = run_cli({"train",
                 "-m",
                 q.string(),
                 "--data",
                 train_text,
                 "--max-seq-len",
                 "128",
                 "--adapter",
                 "qalora",
                 "--rank",
                 "8",
                 "--learning-rate",
                 "2e-3",
                 "--max-steps",
                 "30",
                 "--grad-accum",
                 "4",
                 "--eval-fraction",
                 "0.02",
                 "--out",
                 run.string()});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const auto [before, after] = heldout_losses(r.out);
    EXPECT_LT(after, before - 0.01) << "INT" << bits << ": " << r.out;
    for (const char* f : {"qalora_adapter.json", "qalora_adapter.safetensors", "loss.svg",
                          "metrics.jsonl", "train_config.json"})
      EXPECT_TRUE(fs::exists(run / f)) << f;
    EXPECT_EQ(count_lines_with(run / "metrics.jsonl", "\"loss\""), 30);
    EXPECT_NE(read_file(run / "loss.svg").find("<polyline"), std::string::npos);
    // The adapter runs unmerged in every inference command.
    r = run_cli({"logits", "-m", q.string(), "--adapter", run.string(), "-p", "Once upon"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    const auto base = run_cli({"logits", "-m", q.string(), "-p", "Once upon"});
    EXPECT_NE(r.out, base.out) << "the adapter must change the logits";
    // Trained on TinyStories, it scores TinyStories text better than the bare quantized model.
    const auto ppl = [&](const std::vector<std::string>& extra) {
      const auto p = run_cli(
          concat({"perplexity", "-m", q.string(), "--text", eval.string(), "--ctx", "128"}, extra));
      EXPECT_EQ(p.exit_code, 0) << p.err;
      const auto at = p.out.find("ppl:");
      return at == std::string::npos ? NAN : std::stod(p.out.substr(at + 4));
    };
    EXPECT_LT(ppl({"--adapter", run.string()}), ppl({})) << "INT" << bits;
    // perplexity --data scores the run's held-out split: the loss the trainer reported.
    const auto heldout = [&](const std::vector<std::string>& extra) {
      const auto p = run_cli(concat({"perplexity", "-m", q.string(), "--data", train_text,
                                     "--max-seq-len", "128", "--eval-fraction", "0.02"},
                                    extra));
      EXPECT_EQ(p.exit_code, 0) << p.err;
      const auto at = p.out.find("loss:");
      return at == std::string::npos ? NAN : std::stod(p.out.substr(at + 5));
    };
    EXPECT_NEAR(heldout({"--adapter", run.string()}), after, 1e-3);
    EXPECT_NEAR(heldout({}), before, 1e-3);
    r = run_cli({"generate", "-m", q.string(), "--adapter", run.string(), "-p", "Once", "-n", "8",
                 "--temp", "0"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    r = run_cli({"chat", "-m", q.string(), "--adapter", (dir / "none").string(), "-p", "hi"});
    expect_one_line_error(r, "none");
  }
}

TEST(CliTrain, InterruptedBySignalAndResumedGivesTheSameAdapter) {
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  QL_REQUIRE_DATA(kTinyStories);
  const fs::path dir = test::temp_dir();
  const auto args = [&](const fs::path& out) {
    return concat(concat({"train"}, stories_model()), {"--data",
                                                       data(kTinyStories),
                                                       "--max-seq-len",
                                                       "64",
                                                       "--rank",
                                                       "4",
                                                       "--dropout",
                                                       "0.1",
                                                       "--learning-rate",
                                                       "1e-3",
                                                       "--lr-scheduler",
                                                       "cosine",
                                                       "--warmup-ratio",
                                                       "0.1",
                                                       "--max-steps",
                                                       "200",
                                                       "--grad-accum",
                                                       "2",
                                                       "--eval-fraction",
                                                       "0.01",
                                                       "--group-by-length",
                                                       "--threads",
                                                       "1",
                                                       "--out",
                                                       out.string()});
  };
  const fs::path whole = dir / "whole", parts = dir / "parts";
  auto r = run_cli(args(whole));
  ASSERT_EQ(r.exit_code, 0) << r.err;

  const pid_t pid = test::spawn_cli(args(parts), dir);
  ASSERT_GT(pid, 0);
  // A real SIGINT once a few steps are logged, as Ctrl-C would send.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (count_lines_with(parts / "metrics.jsonl", "\"loss\"") < 10 &&
         std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  ASSERT_EQ(kill(pid, SIGINT), 0);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  ASSERT_EQ(WEXITSTATUS(status), 128 + SIGINT) << read_file(dir / "spawn.err");
  const std::string said = read_file(dir / "spawn.out");
  EXPECT_NE(said.find("interrupted at step"), std::string::npos) << said;
  EXPECT_FALSE(fs::exists(parts / "qalora_adapter.safetensors")) << "only a checkpoint so far";

  r = run_cli(concat(args(parts), {"--resume", parts.string()}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("resumed from"), std::string::npos) << r.out;
  for (const char* f : {"qalora_adapter.safetensors", "adapter_model.safetensors"})
    EXPECT_EQ(read_file(whole / f), read_file(parts / f)) << f << " differs after the resume";
  EXPECT_EQ(count_lines_with(parts / "metrics.jsonl", "\"loss\""), 200);

  // A checkpoint of this run does not resume another configuration.
  auto other = args(parts);
  other[std::find(other.begin(), other.end(), "--rank") - other.begin() + 1] = "8";
  r = run_cli(concat(other, {"--resume", parts.string()}));
  expect_one_line_error(r, "adapter.rank");
}

// A run killed before its first checkpoint leaves its train_config.json and perhaps metrics:
// --resume starts it over in place (the run is deterministic, so it ends as a fresh one does),
// and refuses another configuration by the field that differs.
TEST(CliTrain, ARunStoppedBeforeItsFirstCheckpointStartsOverOnResume) {
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  QL_REQUIRE_DATA(kTinyStories);
  const fs::path dir = test::temp_dir();
  const auto args = [&](const fs::path& out, const char* rank) {
    return concat(concat({"train"}, stories_model()),
                  {"--data", data(kTinyStories), "--max-seq-len", "64", "--rank", rank, "--dropout",
                   "0.1", "--max-steps", "12", "--grad-accum", "2", "--eval-fraction", "0.01",
                   "--out", out.string()});
  };
  const fs::path whole = dir / "whole", cut = dir / "cut";
  ASSERT_EQ(run_cli(args(whole, "4")).exit_code, 0);
  ASSERT_EQ(run_cli(args(cut, "4")).exit_code, 0);
  // What a kill before the first save leaves: no checkpoint, no adapter.
  for (const auto& e : fs::directory_iterator(cut))
    if (e.path().filename() != "train_config.json" && e.path().filename() != "metrics.jsonl")
      fs::remove_all(e.path());
  auto r = run_cli(args(cut, "8"));  // without --resume: the folder is not empty
  expect_one_line_error(r, "--resume");
  r = run_cli(concat(args(cut, "8"), {"--resume", cut.string()}));
  expect_one_line_error(r, "adapter.rank was 4, this run has 8");
  r = run_cli(concat(args(cut, "4"), {"--resume", cut.string()}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("starts over from step 0"), std::string::npos) << r.out;
  EXPECT_EQ(read_file(whole / "qalora_adapter.safetensors"),
            read_file(cut / "qalora_adapter.safetensors"));
  EXPECT_EQ(count_lines_with(cut / "metrics.jsonl", "\"loss\""), 12);
}

TEST(CliTrain, BadInputIsOneClearLine) {
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  const fs::path dir = test::temp_dir();
  const auto train = [&](const std::vector<std::string>& extra) {
    return run_cli(concat(concat({"train"}, stories_model()), extra));
  };
  const std::string out = (dir / "out").string();
  expect_one_line_error(train({"--data", (dir / "none.json").string(), "--out", out}), "none.json");

  const fs::path bad = dir / "bad.jsonl";
  std::ofstream(bad) << "{\"input\": \"a\", \"output\": \"b\"}\n{\"input\": \"a\", \n";
  expect_one_line_error(train({"--data", bad.string(), "--out", out}), "bad.jsonl:2");

  const fs::path missing = dir / "missing.jsonl";
  std::ofstream(missing) << "{\"instruction\": \"a\", \"input\": \"\"}\n";
  expect_one_line_error(train({"--data", missing.string(), "--out", out}), "output");

  const fs::path empty = dir / "empty.json";
  std::ofstream(empty) << "[]";
  expect_one_line_error(train({"--data", empty.string(), "--out", out}), "empty.json");

  const fs::path good = dir / "good.jsonl";
  std::ofstream(good) << "{\"input\": \"Tell a story\", \"output\": \"Once upon a time\"}\n"
                      << "{\"input\": \"Name a color\", \"output\": \"Red\"}\n";
  expect_one_line_error(train({"--data", good.string(), "--adapter", "qalora", "--out", out}),
                        "--adapter lora");
  expect_one_line_error(train({"--data", good.string(), "--targets", "q_proj,wq", "--out", out}),
                        "wq");
  const fs::path chat = dir / "chat.jsonl";
  std::ofstream(chat)
      << R"({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})"
      << "\n";
  expect_one_line_error(train({"--data", chat.string(), "--chat-template", "vicuna", "--out", out}),
                        "vicuna");
  fs::create_directories(dir / "full");
  std::ofstream(dir / "full" / "x") << "x";
  expect_one_line_error(train({"--data", good.string(), "--out", (dir / "full").string()}),
                        "--resume");
  expect_one_line_error(train({"--data", good.string(), "--lr-scheduler", "step", "--out", out}),
                        "step");
  expect_one_line_error(
      train({"--data", good.string(), "--resume", (dir / "nowhere").string(), "--out", out}),
      "nowhere");
}

// A short QA-LoRA run of the default model on Alpaca data lowers its held-out loss.
TEST(CliTrain, SmolLm2QaLoraOnAlpacaLowersTheHeldOutLoss) {
  QL_SKIP_UNDER_SANITIZERS("minutes of SmolLM2 training");
  QL_REQUIRE_SMOLLM2();
  QL_REQUIRE_DATA(kAlpaca);
  const fs::path dir = test::temp_dir();
  const std::string q4 = quantize_smollm2(dir);
  ASSERT_FALSE(HasFailure());
  const auto r = run_cli(concat(
      smollm2_qalora(q4),
      {"--max-steps", "6", "--grad-accum", "4", "--source-max-len", "128", "--target-max-len", "64",
       "--eval-fraction", "0.015", "--out", (dir / "run").string()}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto [before, after] = heldout_losses(r.out);
  EXPECT_LT(after, before) << r.out;
}

// The training loss of every step, from a run's metrics.jsonl.
std::vector<double> step_losses(const fs::path& run) {
  std::vector<double> losses;
  std::ifstream in(run / "metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    const auto j = nlohmann::json::parse(line);
    if (j.contains("loss")) losses.push_back(j["loss"].get<double>());
  }
  return losses;
}

// One way of running the same training: its extra arguments, and what its stdout and its
// train_config.json must say about it.
struct Variant {
  std::string name;
  std::vector<std::string> args;
  std::string stdout_says, config_says;
};
const Variant kFp32 = {
    "fp32", {"--compute-dtype", "fp32"}, "compute:       fp32", "\"compute_type\": \"fp32\""};
const Variant kBf16 = {
    "bf16", {"--compute-dtype", "bf16"}, "compute:       bf16", "\"compute_type\": \"bf16\""};

// Runs `train_args` as `reference` and as `variant` into dir/<name> (same data, seed and
// order) and compares their loss curves step by step. The variant rounds the products' inputs
// to bf16 only, so the paired difference must stay far below the curve's own noise (how much
// the loss moves from one step to the next), and the held-out losses must agree.
void expect_curve_follows(const fs::path& dir, const std::vector<std::string>& train_args,
                          const Variant& reference, const Variant& variant) {
  std::vector<double> curve[2];
  std::pair<double, double> heldout[2];
  for (int i = 0; i < 2; ++i) {
    const Variant& v = i == 0 ? reference : variant;
    const auto r = run_cli(concat(concat(train_args, v.args), {"--out", (dir / v.name).string()}));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find(v.stdout_says), std::string::npos) << r.out;
    curve[i] = step_losses(dir / v.name);
    EXPECT_NE(read_file(dir / v.name / "train_config.json").find(v.config_says), std::string::npos)
        << v.config_says;
    heldout[i] = heldout_losses(r.out);
  }
  ASSERT_EQ(curve[0].size(), curve[1].size());
  ASSERT_GE(curve[0].size(), 10u);
  double diff2 = 0, noise2 = 0, differ = 0;
  for (size_t s = 0; s < curve[0].size(); ++s) {
    diff2 += std::pow(curve[1][s] - curve[0][s], 2);
    differ += curve[1][s] != curve[0][s];
    if (s > 0) noise2 += std::pow(curve[0][s] - curve[0][s - 1], 2);
  }
  const double n = static_cast<double>(curve[0].size());
  const double rms_diff = std::sqrt(diff2 / n), rms_noise = std::sqrt(noise2 / (n - 1));
  std::printf("%s vs %s: rms step difference %.2e, rms step-to-step change %.2e\n",
              variant.name.c_str(), reference.name.c_str(), rms_diff, rms_noise);
  EXPECT_LT(rms_diff, 0.05 * rms_noise) << variant.name << " strays from the reference curve";
  EXPECT_GT(differ, n / 2) << "the " << variant.name << " run computed as the reference";
  EXPECT_NEAR(heldout[1].second, heldout[0].second, 0.01 * heldout[0].second);
  EXPECT_LT(heldout[1].second, heldout[1].first) << "the " << variant.name << " run did not learn";
}

TEST(CliTrain, Bf16LossCurveFollowsFp32OnStories) {
  if (!ops::bf16_available()) GTEST_SKIP() << "no bf16 matrix path on this CPU or build";
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  QL_REQUIRE_DATA(kTinyStories);
  const fs::path dir = test::temp_dir();
  const std::string train_text = (dir / "train.txt").string();
  std::ofstream(train_text) << read_file(test::data_dir() / kTinyStories).substr(0, 150000);
  expect_curve_follows(dir,
                       concat(concat({"train"}, stories_model()),
                              {"--data", train_text, "--max-seq-len", "128", "--adapter", "lora",
                               "--rank", "8", "--learning-rate", "2e-3", "--max-steps", "100",
                               "--grad-accum", "2", "--eval-fraction", "0.02"}),
                       kFp32, kBf16);
}

TEST(CliTrain, Bf16LossCurveFollowsFp32OnSmolLm2QaLora) {
  QL_SKIP_UNDER_SANITIZERS("minutes of SmolLM2 training");
  if (!ops::bf16_available()) GTEST_SKIP() << "no bf16 matrix path on this CPU or build";
  QL_REQUIRE_SMOLLM2();
  QL_REQUIRE_DATA(kAlpaca);
  const fs::path dir = test::temp_dir();
  const std::string q4 = quantize_smollm2(dir);
  ASSERT_FALSE(HasFailure());
  expect_curve_follows(
      dir,
      concat(smollm2_qalora(q4), {"--max-steps", "20", "--grad-accum", "1", "--source-max-len",
                                  "96", "--target-max-len", "32", "--eval-fraction", "0.01"}),
      kFp32, kBf16);
}

// The GPU's step in a real run: QA-LoRA on INT4 stories260K for 50 steps follows the CPU's fp32
// curve, and the adapter it trained merges losslessly with the host's merge.
TEST(CliTrain, GpuLossCurveFollowsTheCpuAndItsAdapterMergesLosslessly) {
  QL_REQUIRE_CUDA_DEVICE();
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  QL_REQUIRE_DATA(kTinyStories);
  const fs::path dir = test::temp_dir();
  const std::string train_text = (dir / "train.txt").string();
  std::ofstream(train_text) << read_file(test::data_dir() / kTinyStories).substr(0, 150000);
  const std::string q4 = (dir / "q4").string();
  auto r = run_cli(concat(concat({"quantize"}, stories_model()),
                          {"--method", "rtn", "--bits", "4", "-g", "32", "-o", q4}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const Variant cuda = {
      "cuda", {"--device", "cuda"}, "device:        cuda:0", "\"device\": \"cuda:0\""};
  expect_curve_follows(dir,
                       {"train", "-m", q4, "--data", train_text, "--max-seq-len", "128",
                        "--adapter", "qalora", "--rank", "8", "--learning-rate", "2e-3",
                        "--max-steps", "50", "--grad-accum", "2", "--eval-fraction", "0.02"},
                       kFp32, cuda);
  ASSERT_FALSE(HasFailure());
  r = run_cli({"merge", "-m", q4, "--adapter", (dir / "cuda").string(), "--fidelity-tokens", "32",
               "--out", (dir / "merged").string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto at = r.out.find("max |logit diff|: ");
  ASSERT_NE(at, std::string::npos) << r.out;
  EXPECT_LT(std::stod(r.out.substr(at + 18)), 1e-4) << r.out;
}

// A GPU run resumes bit-exactly on the GPU, and a CPU checkpoint continues on the GPU (and back)
// to the same held-out loss within bf16 noise. A finished run continues to more steps, so the
// runs split at step 20 of 40 (constant rate, no warm-up: the schedule does not depend on the
// length then).
TEST(CliTrain, GpuRunsResumeBitExactlyAndAcrossDevices) {
  QL_REQUIRE_CUDA_DEVICE();
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  QL_REQUIRE_DATA(kTinyStories);
  const fs::path dir = test::temp_dir();
  const auto args = [&](const fs::path& out, const char* device, const char* steps) {
    return concat(concat({"train"}, stories_model()), {"--data",          data(kTinyStories),
                                                       "--max-seq-len",   "64",
                                                       "--rank",          "4",
                                                       "--dropout",       "0.1",
                                                       "--learning-rate", "1e-3",
                                                       "--warmup-ratio",  "0",
                                                       "--max-steps",     steps,
                                                       "--grad-accum",    "2",
                                                       "--eval-fraction", "0.01",
                                                       "--device",        device,
                                                       "--out",           out.string()});
  };
  const fs::path whole = dir / "whole";
  auto r = run_cli(args(whole, "cuda", "40"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const double whole_loss = heldout_losses(r.out).second;
  for (const char* first : {"cuda", "cpu"}) {
    const fs::path parts = dir / (std::string("from_") + first);
    r = run_cli(args(parts, first, "20"));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    r = run_cli(concat(args(parts, "cuda", "40"), {"--resume", parts.string()}));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find("resumed from"), std::string::npos) << r.out;
    if (std::string(first) == "cuda")
      EXPECT_EQ(read_file(whole / "qalora_adapter.safetensors"),
                read_file(parts / "qalora_adapter.safetensors"))
          << "a GPU run resumed on the GPU differs from the uninterrupted one";
    else
      EXPECT_NEAR(heldout_losses(r.out).second, whole_loss, 0.01 * whole_loss);
  }
}

}  // namespace
}  // namespace qalora
