// Faults a long run meets, end to end on stories260K (docs/reliability.md): kill -9 at random
// moments of train, quantize, merge and export leaves every output complete or absent, and a
// resumed run ends with the uninterrupted run's adapter; a full disk during a checkpoint or an
// export is one clear error with nothing partial left under a final name; a NaN loss stops (or
// skips the step) without saving a poisoned adapter; a second run into the same --out is refused;
// a finished run continues to more steps.
//
// QALORA_FAULT_TRIALS=N sets the kill trials per command (default 3; the campaign in
// docs/reliability.md ran 100).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "qalora/core/mapped_file.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;
using test::expect_one_line_error;
using test::run_cli;
using Clock = std::chrono::steady_clock;

const fs::path kStories = "models/stories260K";
const fs::path kTinyStories = "text/tinystories_val.txt";

std::string data(const fs::path& rel) {
  return (test::data_dir() / rel).string();
}

std::vector<std::string> concat(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// A slice of TinyStories: plenty for a few steps, and quick to tokenize.
fs::path story_slice(const fs::path& dir) {
  const fs::path p = dir / "stories.txt";
  std::ofstream(p) << read_file(test::data_dir() / kTinyStories).substr(0, 60000);
  return p;
}

std::vector<std::string> train_args(const fs::path& model, const fs::path& text,
                                    const fs::path& out, int steps,
                                    const std::vector<std::string>& extra = {}) {
  std::vector<std::string> a = {"train", "-m", model.string()};
  if (model.extension() == ".bin") a = concat(a, {"--tokenizer", data(kStories / "tok512.bin")});
  a = concat(a, {"--data",          text.string(), "--max-seq-len",       "64",
                 "--rank",          "4",           "--dropout",           "0.1",
                 "--warmup-ratio",  "0",           "--grad-accum",        "2",
                 "--eval-fraction", "0",           "--threads",           "1",
                 "--no-progress",   "--max-steps", std::to_string(steps), "--out",
                 out.string()});
  if (std::find(extra.begin(), extra.end(), "--learning-rate") == extra.end())
    a = concat(a, {"--learning-rate", "1e-3"});
  return concat(a, extra);
}

// Every file under `dir` (relative name -> bytes), aside from the lock file and the temporary
// files (NAME.tmp.PID) of a writer killed before it could rename them.
using Files = std::map<std::string, std::string>;
Files files_of(const fs::path& dir) {
  Files files;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file() && e.path().filename() != ".lock" &&
        e.path().filename().string().find(".tmp.") == std::string::npos)
      files[fs::relative(e.path(), dir).string()] = read_file(e.path());
  return files;
}

// The same names with the same bytes (failures name the files, not their bytes).
void expect_same_files(const Files& got, const Files& want) {
  for (const auto& [name, bytes] : want) {
    const auto it = got.find(name);
    EXPECT_TRUE(it != got.end()) << name << " is missing";
    if (it != got.end()) {
      EXPECT_TRUE(it->second == bytes) << name << " differs";
    }
  }
  for (const auto& [name, bytes] : got) EXPECT_TRUE(want.contains(name)) << name << " is extra";
}

std::vector<std::string> names_in(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  return names;
}

// What a LoRA run writes (a QA-LoRA run has no PEFT twin: docs/adapters.md).
const char* const kAdapterFiles[] = {"qalora_adapter.safetensors", "adapter_model.safetensors"};

// A command's error after its progress lines: one last line, "error: ...", naming `mentions`.
void expect_error_at_the_end(const test::CliResult& r, const std::string& mentions = "") {
  EXPECT_NE(r.exit_code, 0) << r.out;
  const auto start = r.err.rfind('\n', r.err.size() >= 2 ? r.err.size() - 2 : 0);
  const std::string last = r.err.substr(start == std::string::npos ? 0 : start + 1);
  EXPECT_TRUE(last.starts_with("error: ")) << r.err;
  EXPECT_NE(last.find(mentions), std::string::npos) << r.err;
}

// The checkpoint-N folders of a run; each must be whole.
std::vector<fs::path> checkpoints_of(const fs::path& run) {
  std::vector<fs::path> found;
  if (!fs::exists(run)) return found;
  for (const auto& e : fs::directory_iterator(run)) {
    const std::string name = e.path().filename().string();
    if (!name.starts_with("checkpoint-") || name.ends_with(".tmp")) continue;
    for (const char* f : {"trainer_state.json", "optimizer.safetensors", "qalora_adapter.json",
                          "qalora_adapter.safetensors"})
      EXPECT_TRUE(fs::exists(e.path() / f)) << e.path() << " lacks " << f;
    found.push_back(e.path());
  }
  return found;
}

int trials() {
  const char* env = std::getenv("QALORA_FAULT_TRIALS");
  return env != nullptr ? std::max(1, std::atoi(env)) : 3;
}

// Runs the CLI and kills it with SIGKILL after `delay` (unless it ended first). True when the
// kill landed.
bool kill_after(const std::vector<std::string>& args, const fs::path& dir, Clock::duration delay) {
  const pid_t pid = test::spawn_cli(args, dir);
  EXPECT_GT(pid, 0);
  const auto deadline = Clock::now() + delay;
  int status = 0;
  while (Clock::now() < deadline) {
    if (waitpid(pid, &status, WNOHANG) == pid) return false;
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  kill(pid, SIGKILL);
  waitpid(pid, &status, 0);
  return WIFSIGNALED(status);
}

// Wall time of an uninterrupted run, which must succeed.
Clock::duration timed_run(const std::vector<std::string>& args) {
  const auto t0 = Clock::now();
  const auto r = run_cli(args);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return Clock::now() - t0;
}

TEST(CliFaults, FinishedRunContinuesToMoreSteps) {
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  QL_REQUIRE_DATA(kTinyStories);
  const fs::path dir = test::temp_dir(), text = story_slice(dir);
  const fs::path model = data(kStories / "stories260K.bin");
  const fs::path straight = dir / "straight", extended = dir / "extended";
  ASSERT_EQ(run_cli(train_args(model, text, straight, 8)).exit_code, 0);
  // No --save-steps: the last step still leaves a checkpoint to continue from.
  auto r = run_cli(train_args(model, text, extended, 4));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(checkpoints_of(extended), std::vector<fs::path>{extended / "checkpoint-4"});
  r = run_cli(train_args(model, text, extended, 8, {"--resume", extended.string()}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("continuing a run of 4 steps to 8"), std::string::npos) << r.out;
  for (const char* f : kAdapterFiles)
    EXPECT_TRUE(read_file(straight / f) == read_file(extended / f)) << f << " differs";
  // A run is not continued backwards.
  expect_one_line_error(
      run_cli(train_args(model, text, extended, 6, {"--resume", extended.string()})),
      "past this run's 6 steps");
}

TEST(CliFaults, NonFiniteLossStopsBeforeSavingOrSkipsTheStep) {
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  QL_REQUIRE_DATA(kTinyStories);
  const fs::path dir = test::temp_dir(), text = story_slice(dir);
  const fs::path model = data(kStories / "stories260K.bin");
  // A learning rate this high turns the adapter's output into infinities after one step.
  const std::vector<std::string> hot = {"--learning-rate", "1e30", "--save-steps", "1"};
  const fs::path stopped = dir / "stopped";
  const auto r = run_cli(train_args(model, text, stopped, 6, hot));
  expect_one_line_error(r, "step 2: the loss is");
  EXPECT_NE(r.err.find("checkpoint-1"), std::string::npos) << r.err;
  EXPECT_EQ(checkpoints_of(stopped), std::vector<fs::path>{stopped / "checkpoint-1"});
  EXPECT_FALSE(fs::exists(stopped / kAdapterFiles[0]));

  const fs::path skipped = dir / "skipped";
  const auto s =
      run_cli(train_args(model, text, skipped, 4, concat(hot, {"--on-non-finite", "skip"})));
  ASSERT_EQ(s.exit_code, 0) << s.err;
  EXPECT_NE(s.err.find("step 2: the loss is"), std::string::npos) << s.err;
  const std::string metrics = read_file(skipped / "metrics.jsonl");
  EXPECT_NE(metrics.find("\"non_finite\""), std::string::npos) << metrics;
  EXPECT_NE(metrics.find("\"skipped_steps\":3"), std::string::npos) << metrics;
  EXPECT_TRUE(fs::exists(skipped / kAdapterFiles[0]));
}

TEST(CliFaults, SecondRunIntoTheSameOutIsRefused) {
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  QL_REQUIRE_DATA(kTinyStories);
  const fs::path dir = test::temp_dir(), text = story_slice(dir);
  const fs::path model = data(kStories / "stories260K.bin"), run = dir / "run";
  const pid_t first =
      test::spawn_cli(train_args(model, text, run, 1000000, {"--save-steps", "1"}), dir);
  ASSERT_GT(first, 0);
  const auto deadline = Clock::now() + std::chrono::seconds(60);
  while (checkpoints_of(run).empty() && Clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ASSERT_FALSE(checkpoints_of(run).empty()) << read_file(dir / "spawn.err");
  for (const auto& extra : {std::vector<std::string>{}, {"--resume", run.string()}})
    expect_one_line_error(run_cli(train_args(model, text, run, 1000000, extra)),
                          "in use by another run (pid " + std::to_string(first));
  // The kernel drops the lock of a killed run: its folder resumes.
  ASSERT_EQ(kill(first, SIGKILL), 0);
  waitpid(first, nullptr, 0);
  int at = 0;  // the latest checkpoint's step (the folder lists them in no particular order)
  for (const fs::path& c : checkpoints_of(run)) {
    const std::string name = c.filename().string();
    at = std::max(at, std::stoi(name.substr(name.find('-') + 1)));
  }
  const auto r = run_cli(train_args(model, text, run, at + 1, {"--resume", run.string()}));
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

TEST(CliFaults, FullDiskLeavesThePreviousCheckpointAndNoPartialOutput) {
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  QL_REQUIRE_DATA(kTinyStories);
  const fs::path dir = test::temp_dir(), text = story_slice(dir);
  const fs::path model = data(kStories / "stories260K.bin"), run = dir / "run";
  ASSERT_EQ(run_cli(train_args(model, text, run, 2, {"--save-steps", "1"})).exit_code, 0);
  const auto before = files_of(run / "checkpoint-2");
  // A file size limit (as a full disk would) just below the optimizer state's size: the next
  // checkpoint fails while writing it.
  const auto limit = fs::file_size(run / "checkpoint-2" / "optimizer.safetensors") - 1;
  const std::string fsize = "--fsize=" + std::to_string(limit);
  auto r = test::run_program("prlimit",
                             concat({fsize, QALORA_CLI_PATH},
                                    train_args(model, text, run, 3, {"--resume", run.string()})));
  expect_one_line_error(r, "optimizer.safetensors");
  expect_same_files(files_of(run / "checkpoint-2"), before);
  for (const std::string& name : names_in(run))
    EXPECT_FALSE(name.starts_with("checkpoint-3")) << name;
  // With room again, the run goes on from checkpoint 2.
  r = run_cli(train_args(model, text, run, 3, {"--resume", run.string()}));
  EXPECT_EQ(r.exit_code, 0) << r.err;

  // Quantize and export under a limit smaller than their output write nothing under its name.
  const std::vector<std::pair<std::string, std::vector<std::string>>> commands = {
      {"q4",
       {"quantize", "-m", model.string(), "--tokenizer", data(kStories / "tok512.bin"), "--method",
        "rtn", "--bits", "4", "-g", "32", "-o", (dir / "q4").string()}},
      {"e.gguf",
       {"export", "-m", model.string(), "--tokenizer", data(kStories / "tok512.bin"), "--format",
        "gguf", "--calib", "none", "-o", (dir / "e.gguf").string()}},
  };
  for (const auto& [name, args] : commands) {
    r = test::run_program("prlimit", concat({"--fsize=100000", QALORA_CLI_PATH}, args));
    expect_error_at_the_end(r, "File too large");
    for (const std::string& left : names_in(dir))
      EXPECT_FALSE(left.starts_with(name) || left.starts_with("." + name))
          << left << " after " << r.err;
  }
}

// One command killed at random moments of its run, `trials` times. `check` inspects what a kill
// left and names the outcome (tallied for docs/reliability.md); `reset` prepares the next trial.
void kill_trials(const std::string& what, const std::vector<std::string>& args, const fs::path& dir,
                 const std::function<std::string()>& check, const std::function<void()>& reset) {
  const Clock::duration whole = timed_run(args);
  reset();
  std::mt19937_64 rng(std::hash<std::string>{}(what));
  int landed = 0;
  std::map<std::string, int> outcomes;
  for (int t = 0; t < trials(); ++t) {
    const auto delay = std::chrono::duration_cast<Clock::duration>(
        whole * std::uniform_real_distribution<double>(0.05, 1.0)(rng));
    SCOPED_TRACE(what + " trial " + std::to_string(t) + ", killed after " +
                 std::to_string(std::chrono::duration<double>(delay).count()) + " s");
    landed += kill_after(args, dir, delay);
    ++outcomes[check()];
    reset();
  }
  std::printf("%s: %d trials, %d killed before the end; left:", what.c_str(), trials(), landed);
  for (const auto& [outcome, n] : outcomes) std::printf(" %s %d,", outcome.c_str(), n);
  std::printf("\n");
  std::fflush(stdout);  // the next fork would print an unflushed line again
}

TEST(CliFaults, KillNineLeavesOutputsCompleteOrAbsentAndResumesIdentically) {
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  QL_REQUIRE_DATA(kTinyStories);
  const fs::path dir = test::temp_dir(), text = story_slice(dir);
  const fs::path model = data(kStories / "stories260K.bin");
  const std::string tok = data(kStories / "tok512.bin");
  const fs::path q = dir / "q4", ref = dir / "ref";

  // quantize: the folder is absent or equal to an uninterrupted run's.
  const auto quantize = [&](const fs::path& out) {
    return std::vector<std::string>{"quantize", "-m",  model.string(), "--tokenizer", tok,
                                    "--method", "rtn", "--bits",       "4",           "-g",
                                    "32",       "-o",  out.string()};
  };
  ASSERT_EQ(run_cli(quantize(ref / "q4")).exit_code, 0);
  const auto quantized = files_of(ref / "q4");
  kill_trials(
      "quantize", quantize(q), dir,
      [&] {
        if (!fs::exists(q)) return "no folder";
        expect_same_files(files_of(q), quantized);
        return "the complete folder";
      },
      [&] { fs::remove_all(q); });
  ASSERT_EQ(run_cli(quantize(q)).exit_code, 0);

  // train (QA-LoRA on the INT4 folder, a checkpoint every step): what is left resumes to the
  // uninterrupted run's adapter.
  const fs::path run = dir / "run";
  const auto train = train_args(q, text, run, 6, {"--adapter", "qalora", "--save-steps", "1"});
  ASSERT_EQ(
      run_cli(train_args(q, text, ref / "run", 6, {"--adapter", "qalora", "--save-steps", "1"}))
          .exit_code,
      0);
  kill_trials(
      "train", train, dir,
      [&] {
        std::string outcome = "no checkpoint (started again)";
        const auto checkpoints = checkpoints_of(run);
        if (!checkpoints.empty()) outcome = "checkpoints to resume from";
        for (const std::string& name : fs::exists(run) ? names_in(run) : std::vector<std::string>{})
          if (name.ends_with(".tmp")) outcome += ", one killed mid-write";
        // A run killed before its first checkpoint has nothing to resume: it starts again.
        if (checkpoints.empty()) fs::remove_all(run);
        const auto r = run_cli(fs::exists(run) ? concat(train, {"--resume", run.string()}) : train);
        EXPECT_EQ(r.exit_code, 0) << r.err;
        EXPECT_TRUE(read_file(run / kAdapterFiles[0]) == read_file(ref / "run" / kAdapterFiles[0]))
            << "the resumed adapter differs";
        return outcome;
      },
      [&] { fs::remove_all(run); });
  ASSERT_EQ(run_cli(train).exit_code, 0);

  // merge and export: absent or equal (merge.json records timings, and may be all a kill missed).
  const fs::path merged = dir / "merged";
  const auto merge = [&](const fs::path& out) {
    return std::vector<std::string>{"merge",      "-m",    q.string(),   "--adapter",
                                    run.string(), "--out", out.string(), "--fidelity-text",
                                    "none"};
  };
  ASSERT_EQ(run_cli(merge(ref / "merged")).exit_code, 0);
  auto merged_files = files_of(ref / "merged");
  merged_files.erase("merge.json");
  kill_trials(
      "merge", merge(merged), dir,
      [&] {
        if (!fs::exists(merged)) return "no folder";
        auto left = files_of(merged);
        const bool record = left.erase("merge.json") > 0;
        expect_same_files(left, merged_files);
        return record ? "the complete folder" : "the complete model, no merge.json yet";
      },
      [&] { fs::remove_all(merged); });
  ASSERT_EQ(run_cli(merge(merged)).exit_code, 0);

  const fs::path gguf = dir / "m.gguf";
  const auto exporting = [&](const fs::path& out) {
    return std::vector<std::string>{"export", "-m", merged.string(), "--format", "gguf", "--calib",
                                    "none",   "-o", out.string()};
  };
  ASSERT_EQ(run_cli(exporting(ref / "m.gguf")).exit_code, 0);
  const std::string exported = read_file(ref / "m.gguf");
  kill_trials(
      "export", exporting(gguf), dir,
      [&] {
        if (!fs::exists(gguf)) return "no file";
        EXPECT_TRUE(read_file(gguf) == exported) << "the GGUF differs";
        return "the complete file";
      },
      [&] {
        fs::remove(gguf);
        fs::remove(gguf.string() + ".export.json");
      });
}

}  // namespace
}  // namespace qalora
