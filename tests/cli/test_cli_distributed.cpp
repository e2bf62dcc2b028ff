// mpirun -np 2 qalora train: two ranks with grad-accum 2 train the adapter one rank with
// grad-accum 4 does, resume where they stopped (also at one rank), refuse ranks that run
// another job; a failing, killed or hanging rank ends the whole job, and the last checkpoint
// resumes.
#include <gtest/gtest.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "qalora/core/mapped_file.h"
#include "qalora/dist/communicator.h"
#include "qalora/io/safetensors.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;
using test::run_cli;

const fs::path kStories = "models/stories260K";
const fs::path kTinyStories = "text/tinystories_val.txt";

bool have_mpirun() {
  return std::system("command -v mpirun >/dev/null 2>&1") == 0;
}

#define QL_REQUIRE_MPI()                                                                       \
  do {                                                                                         \
    if (!mpi_available()) GTEST_SKIP() << "built without MPI (-DQALORA_MPI=OFF or not found)"; \
    if (!have_mpirun()) GTEST_SKIP() << "mpirun not on PATH (apt-get install openmpi-bin)";    \
  } while (0)

// mpirun's options for a CI container: root allowed, more ranks than cores, and (in the
// sanitizer build) no leak report from the ranks: Open MPI's plugins leave allocations behind
// when they are unloaded at MPI_Finalize, which LeakSanitizer cannot attribute or suppress.
std::vector<std::string> mpirun_options() {
  setenv("OMPI_ALLOW_RUN_AS_ROOT", "1", 1);
  setenv("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1", 1);
  return {"--oversubscribe", "--bind-to", "none", "-x",
          "ASAN_OPTIONS=detect_leaks=0:abort_on_error=1"};
}

test::CliResult mpirun(const std::vector<std::vector<std::string>>& apps) {
  std::vector<std::string> args = mpirun_options();
  for (size_t i = 0; i < apps.size(); ++i) {
    if (i > 0) args.push_back(":");
    args.insert(args.end(), apps[i].begin(), apps[i].end());
  }
  return test::run_program("mpirun", args);
}

std::vector<std::string> with(std::vector<std::string> a, const std::vector<std::string>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// The adapter tensors of a run, by name.
std::vector<std::pair<std::string, std::vector<float>>> adapter_of(const fs::path& run) {
  const auto f = SafetensorsFile::open(run / "qalora_adapter.safetensors");
  std::vector<std::pair<std::string, std::vector<float>>> out;
  for (const StTensorInfo& t : f.tensors()) {
    const Tensor v = f.load_f32(t);
    out.emplace_back(t.name, std::vector<float>(v.data(), v.data() + v.numel()));
  }
  return out;
}

void expect_same_adapter(const fs::path& a, const fs::path& b, float tol) {
  const auto x = adapter_of(a), y = adapter_of(b);
  ASSERT_EQ(x.size(), y.size());
  for (size_t i = 0; i < x.size(); ++i) {
    ASSERT_EQ(x[i].first, y[i].first);
    test::expect_close(x[i].second, y[i].second, tol, x[i].first);
  }
}

class CliDistributed : public testing::Test {
 protected:
  void SetUp() override {
    QL_REQUIRE_MPI();
    QL_REQUIRE_DATA(kStories / "stories260K.bin");
    QL_REQUIRE_DATA(kTinyStories);
    dir_ = test::temp_dir();
    train_text_ = (dir_ / "train.txt").string();
    std::ofstream(train_text_) << read_file(test::data_dir() / kTinyStories).substr(0, 60000);
    q4_ = (dir_ / "q4").string();
    const auto r =
        run_cli({"quantize", "-m", (test::data_dir() / kStories / "stories260K.bin").string(),
                 "--tokenizer", (test::data_dir() / kStories / "tok512.bin").string(), "--method",
                 "rtn", "--bits", "4", "-g", "32", "-o", q4_});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  // `qalora train` on the INT4 model with everything but the adapter, accumulation and steps
  // fixed. fp32: one process and two ranks sum the gradients in different orders, and bf16's
  // rounding of the products' inputs carries those differences past the tolerances used here.
  std::vector<std::string> train(const std::string& adapter, int accum, int steps,
                                 const fs::path& out, std::vector<std::string> extra = {}) const {
    return with({QALORA_CLI_PATH,
                 "train",
                 "-m",
                 q4_,
                 "--data",
                 train_text_,
                 "--max-seq-len",
                 "64",
                 "--adapter",
                 adapter,
                 "--rank",
                 "4",
                 "--dropout",
                 "0.1",
                 "--learning-rate",
                 "3e-3",
                 "--grad-accum",
                 std::to_string(accum),
                 "--max-steps",
                 std::to_string(steps),
                 "--eval-fraction",
                 "0.05",
                 "--threads",
                 "1",
                 "--compute-dtype",
                 "fp32",
                 "--no-progress",
                 "--out",
                 out.string()},
                extra);
  }
  fs::path dir_;
  std::string train_text_, q4_;
};

TEST_F(CliDistributed, TwoRanksTrainTheAdapterOfOneRankWithTwiceTheAccumulation) {
  for (const std::string adapter : {"lora", "qalora"}) {
    SCOPED_TRACE(adapter);
    const fs::path one = dir_ / (adapter + "-1"), two = dir_ / (adapter + "-2");
    auto single = train(adapter, 4, 3, one);
    single.erase(single.begin());  // run_cli adds the program
    auto r = run_cli(single);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    r = mpirun({with({"-np", "2"}, train(adapter, 2, 3, two))});
    ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
    EXPECT_NE(r.out.find("x accum 2 x 2 ranks (mpi)"), std::string::npos) << r.out;
    // Rank 0 alone prints and writes.
    EXPECT_EQ(r.out.find("trained 3 steps"), r.out.rfind("trained 3 steps")) << r.out;
    expect_same_adapter(one, two, 2e-5f);
    EXPECT_NE(read_file(two / "metrics.jsonl").find("\"all_reduce\""), std::string::npos);
  }
}

TEST_F(CliDistributed, PerplexityAndHeldOutLossSplitTheirWorkAcrossRanks) {
  const auto model = std::vector<std::string>{"-m", q4_, "--no-progress"};
  const std::vector<std::vector<std::string>> modes = {
      {"--text", train_text_, "--ctx", "64", "--max-windows", "40"},
      {"--data", train_text_, "--max-seq-len", "64", "--eval-fraction", "0.05"}};
  for (const auto& mode : modes) {
    SCOPED_TRACE(mode[0]);
    const auto one = run_cli(with(with({"perplexity"}, model), mode));
    ASSERT_EQ(one.exit_code, 0) << one.err;
    const auto two = mpirun({with({"-np", "2", QALORA_CLI_PATH, "perplexity"}, with(model, mode))});
    ASSERT_EQ(two.exit_code, 0) << two.out << two.err;
    // The same report, printed once: the sums are gathered before rank 0 prints.
    EXPECT_EQ(two.out, one.out);
  }
  const fs::path metrics = dir_ / "ppl.jsonl";
  const auto r = mpirun({with({"-np", "2", QALORA_CLI_PATH, "perplexity"},
                              with(model, with(modes[0], {"--metrics", metrics.string()})))});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  std::ifstream in(metrics);
  int lines = 0;
  for (std::string line; std::getline(in, line);) ++lines;
  EXPECT_EQ(lines, 40) << "one line per window, written by rank 0 alone";
}

// Equal JSON, numbers within a relative 1e-5: a rank packs other items beside an item than one
// process does, and a differently sized batch rounds differently.
void expect_same_report(const nlohmann::json& a, const nlohmann::json& b, const std::string& at) {
  if (a.is_number_float() || b.is_number_float()) {
    ASSERT_TRUE(a.is_number() && b.is_number()) << at;
    EXPECT_NEAR(a.get<double>(), b.get<double>(), 1e-5 * (1 + std::abs(b.get<double>()))) << at;
  } else if (a.is_structured()) {
    ASSERT_EQ(a.type(), b.type()) << at;
    ASSERT_EQ(a.size(), b.size()) << at;
    for (auto it = a.begin(); it != a.end(); ++it) {
      const std::string key = a.is_object() ? it.key() : std::to_string(it - a.begin());
      expect_same_report(*it,
                         a.is_object() ? b.at(it.key()) : b.at(static_cast<size_t>(it - a.begin())),
                         at + "/" + key);
    }
  } else {
    EXPECT_EQ(a, b) << at;
  }
}

TEST_F(CliDistributed, EvalSharesItsItemsAndReportsWhatOneProcessReports) {
  QL_REQUIRE_DATA("eval/mc/arc_easy.jsonl");
  QL_REQUIRE_DATA("eval/gsm8k_test.jsonl");
  const std::string gsm8k = (test::data_dir() / "eval/gsm8k_test.jsonl").string();
  const fs::path cloze = dir_ / "cloze.jsonl";
  std::ofstream(cloze)
      << R"({"context": "Once upon a time, there was a little", "continuation": " girl"})"
      << "\n"
      << R"({"context": "The cat sat on the", "continuation": " mat"})"
      << "\n"
      << R"({"context": "She went to the", "continuation": " park"})"
      << "\n";
  const auto eval = [&](const fs::path& out) {
    // fp32: a rank batches other items beside an item than one process does, and in bf16 an
    // item's continuation may then run as decode steps (fp32) in one and in a prefill in the
    // other.
    return std::vector<std::string>{"eval",
                                    "-m",
                                    q4_,
                                    "--compute-dtype",
                                    "fp32",
                                    "--no-progress",
                                    "--threads",
                                    "1",
                                    "--task",
                                    "arc",
                                    "--data",
                                    (test::data_dir() / "eval/mc/arc_easy.jsonl").string(),
                                    "--limit",
                                    "15",
                                    "--task",
                                    "cloze",
                                    "--data",
                                    cloze.string(),
                                    "--task",
                                    "gsm8k",
                                    "--data",
                                    gsm8k,
                                    "--shots",
                                    "1",
                                    "--shots-data",
                                    gsm8k,
                                    "--max-new-tokens",
                                    "6",
                                    "--task",
                                    "ppl",
                                    "--data",
                                    train_text_,
                                    "--out",
                                    out.string()};
  };
  auto r = run_cli(eval(dir_ / "one.json"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto args = eval(dir_ / "two.json");
  args.insert(args.begin(), QALORA_CLI_PATH);
  r = mpirun({with({"-np", "2"}, args)});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  auto one = nlohmann::json::parse(read_file(dir_ / "one.json"));
  auto two = nlohmann::json::parse(read_file(dir_ / "two.json"));
  ASSERT_EQ(one["tasks"].size(), 4u);
  ASSERT_EQ(two["tasks"].size(), 4u);
  for (size_t t = 0; t < 4; ++t) {
    // Timing differs, and so do the positions computed: each rank shares prefixes only
    // among its own items.
    for (auto* j : {&one, &two}) {
      (*j)["tasks"][t].erase("seconds");
      (*j)["tasks"][t].erase("tokens_fed");
    }
    expect_same_report(one["tasks"][t], two["tasks"][t],
                       one["tasks"][t]["task"].get<std::string>());
  }
}

// A run whose checkpoint 2 is all that is left (as after a kill at step 3), resumed.
void copy_checkpoint(const fs::path& run, const fs::path& to) {
  fs::create_directories(to);
  fs::copy(run / "checkpoint-2", to / "checkpoint-2", fs::copy_options::recursive);
}

TEST_F(CliDistributed, ResumesBitExactlyAtTwoRanksAndContinuesAtOne) {
  const fs::path full = dir_ / "full";
  auto r = mpirun({with({"-np", "2"}, train("qalora", 2, 4, full, {"--save-steps", "2"}))});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  ASSERT_TRUE(fs::exists(full / "checkpoint-2"));

  const fs::path two = dir_ / "resumed-2";
  copy_checkpoint(full, two);
  r = mpirun({with({"-np", "2"},
                   train("qalora", 2, 4, two, {"--save-steps", "2", "--resume", two.string()}))});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("resumed from"), std::string::npos) << r.out;
  EXPECT_EQ(read_file(full / "qalora_adapter.safetensors"),
            read_file(two / "qalora_adapter.safetensors"));

  // One rank with twice the accumulation keeps the global batch and the data cursor.
  const fs::path one = dir_ / "resumed-1";
  copy_checkpoint(full, one);
  auto single = train("qalora", 4, 4, one, {"--resume", one.string()});
  single.erase(single.begin());
  r = run_cli(single);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  expect_same_adapter(full, one, 2e-5f);

  // Another global batch is another run.
  const fs::path other = dir_ / "resumed-other";
  copy_checkpoint(full, other);
  single = train("qalora", 2, 4, other, {"--resume", other.string()});
  single.erase(single.begin());
  r = run_cli(single);
  test::expect_one_line_error(r, "grad_accum");
}

TEST_F(CliDistributed, RanksThatRunAnotherJobAreRefused) {
  auto r =
      mpirun({with({"-np", "1"}, train("qalora", 2, 2, dir_ / "a")),
              with({"-np", "1"}, train("qalora", 2, 2, dir_ / "a", {"--weight-decay", "0.1"}))});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("another configuration or base than rank 0"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("weight_decay"), std::string::npos) << r.err;
}

TEST_F(CliDistributed, AFailingRankEndsTheJob) {
  auto bad = train("qalora", 2, 2, dir_ / "b");
  bad[3] = (dir_ / "missing").string();  // -m of rank 1
  auto r = mpirun({with({"-np", "1"}, train("qalora", 2, 2, dir_ / "b")), with({"-np", "1"}, bad)});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("error: rank 1:"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("missing"), std::string::npos) << r.err;
}

// Processes whose parent is `parent` (the ranks mpirun started on this machine).
std::vector<pid_t> children_of(pid_t parent) {
  std::vector<pid_t> out;
  for (const auto& e : fs::directory_iterator("/proc")) {
    const std::string name = e.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream stat(e.path() / "stat");
    std::string line;
    if (!std::getline(stat, line)) continue;
    // pid (comm) state ppid ...: comm may hold spaces, so read after its closing parenthesis.
    const auto close = line.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream rest(line.substr(close + 2));
    char state = 0;
    pid_t ppid = 0;
    rest >> state >> ppid;
    if (ppid == parent) out.push_back(static_cast<pid_t>(std::stol(name)));
  }
  return out;
}

int count_loss_lines(const fs::path& metrics) {
  std::ifstream in(metrics);
  int n = 0;
  for (std::string line; std::getline(in, line);) n += line.find("\"loss\"") != std::string::npos;
  return n;
}

// mpirun with `mpi_args` and one qalora command line, started without waiting; its stdout and
// stderr go to dir/job.out and dir/job.err.
pid_t spawn_mpirun(const std::vector<std::string>& mpi_args, const std::vector<std::string>& app,
                   const fs::path& dir) {
  const std::vector<std::string> args =
      with(with(with({"mpirun"}, mpirun_options()), mpi_args), app);
  const pid_t job = fork();
  if (job == 0) {
    std::vector<std::string> copy = args;
    std::vector<char*> argv;
    for (auto& a : copy) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (!freopen((dir / "job.out").c_str(), "w", stdout) ||
        !freopen((dir / "job.err").c_str(), "w", stderr))
      _exit(127);
    execvp("mpirun", argv.data());
    _exit(127);
  }
  return job;
}

void wait_for_loss_lines(const fs::path& metrics, int lines) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (count_loss_lines(metrics) < lines && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
}

// The job's wait status once it ends by itself within `seconds`; nullopt (after killing it and
// `ranks`) when it does not.
std::optional<int> wait_for_job(pid_t job, const std::vector<pid_t>& ranks, int seconds) {
  int status = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
  while (waitpid(job, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      for (pid_t r : ranks) kill(r, SIGKILL);
      kill(job, SIGKILL);
      waitpid(job, &status, 0);
      return std::nullopt;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return status;
}

// Starts a 2-rank job, sends `signal` to one rank once `lines` steps are logged in
// out/metrics.jsonl, and returns the job's wait status if it then ends by itself within 60 s.
std::optional<int> signal_a_rank(const std::vector<std::string>& mpi_args,
                                 const std::vector<std::string>& app, const fs::path& out,
                                 int lines, int signal, const fs::path& dir) {
  const pid_t job = spawn_mpirun(with(mpi_args, {"-np", "2"}), app, dir);
  EXPECT_GT(job, 0);
  if (job <= 0) return std::nullopt;
  wait_for_loss_lines(out / "metrics.jsonl", lines);
  const std::vector<pid_t> ranks = children_of(job);
  EXPECT_EQ(ranks.size(), 2u) << "mpirun's rank processes";
  if (!ranks.empty()) {
    EXPECT_EQ(kill(ranks.back(), signal), 0);
  }
  return wait_for_job(job, ranks, 60);
}

TEST_F(CliDistributed, AKilledRankEndsTheJobAndItsLastCheckpointResumes) {
  const int steps = 400;
  const fs::path whole = dir_ / "whole", cut = dir_ / "cut";
  auto r = mpirun({with({"-np", "2"}, train("lora", 1, steps, whole, {"--save-steps", "10"}))});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;

  // The job ends by itself, without hanging in a collective operation.
  const auto status = signal_a_rank({}, train("lora", 1, steps, cut, {"--save-steps", "10"}), cut,
                                    25, SIGKILL, dir_);
  ASSERT_TRUE(status.has_value()) << "the job did not end within 60 s of a rank's death";
  EXPECT_FALSE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0);
  ASSERT_FALSE(fs::exists(cut / "qalora_adapter.safetensors")) << "killed before the end";

  r = mpirun({with({"-np", "2"}, train("lora", 1, steps, cut,
                                       {"--save-steps", "10", "--resume", cut.string()}))});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("resumed from"), std::string::npos) << r.out;
  EXPECT_EQ(read_file(whole / "qalora_adapter.safetensors"),
            read_file(cut / "qalora_adapter.safetensors"));
  EXPECT_EQ(count_loss_lines(cut / "metrics.jsonl"), steps);
}

TEST_F(CliDistributed, ARankThatHangsEndsTheJobAfterTheTimeout) {
  // A stopped rank neither answers nor dies: the other waits in the gradient all-reduce until
  // QALORA_COMM_TIMEOUT, then ends the job with one line.
  const fs::path out = dir_ / "hang";
  const auto status = signal_a_rank({"-x", "QALORA_COMM_TIMEOUT=3"}, train("lora", 1, 100000, out),
                                    out, 10, SIGSTOP, dir_);
  ASSERT_TRUE(status.has_value()) << "the job hung with a stopped rank";
  EXPECT_FALSE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0);
  EXPECT_NE(
      read_file(dir_ / "job.err").find("error: rank 0: no answer from the other ranks for 3 s"),
      std::string::npos)
      << read_file(dir_ / "job.err");
}

}  // namespace
}  // namespace qalora
