#include "test_util.h"

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>

#include "qalora/core/fp16.h"

namespace qalora::test {

std::filesystem::path data_dir() {
  if (const char* env = std::getenv("QALORA_DATA_DIR")) return env;
  return QALORA_DATA_DIR;
}

std::filesystem::path smollm2_path() {
  if (const char* env = std::getenv("QALORA_SMOLLM2")) return env;
  const char* home = std::getenv("HOME");
  const char* cache = std::getenv("XDG_CACHE_HOME");
  std::filesystem::path base =
      cache ? std::filesystem::path(cache) : std::filesystem::path(home ? home : "/tmp") / ".cache";
  return base / "qalora" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf";
}

static std::filesystem::path test_scratch_path() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = std::string(info->test_suite_name()) + "." + info->name();
  std::replace(name.begin(), name.end(), '/', '_');  // parameterized test names contain '/'
  return std::filesystem::path(QALORA_TEST_TMP) / name;
}

// A fresh path beside the test's temp_dir(), so files the test prepared there survive.
static std::filesystem::path temp_dir_sibling(const std::string& what) {
  static int calls = 0;
  std::filesystem::path p = test_scratch_path().string() + "." + what + std::to_string(calls++);
  std::filesystem::create_directories(p.parent_path());
  return p;
}

std::filesystem::path temp_dir() {
  const std::filesystem::path dir = test_scratch_path();
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

static std::string slurp(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

CliResult run_cli(const std::vector<std::string>& args) {
  return run_program(QALORA_CLI_PATH, args);
}

// Starts `program ARGS...` with stdout and stderr into files and stdin from /dev/null.
static pid_t spawn_program(const std::string& program, const std::vector<std::string>& args,
                           const std::filesystem::path& out_path,
                           const std::filesystem::path& err_path) {
  const pid_t pid = fork();
  if (pid == 0) {
    std::vector<char*> argv;
    std::string exe = program;
    argv.push_back(exe.data());
    std::vector<std::string> copy = args;
    for (auto& a : copy) argv.push_back(a.data());
    argv.push_back(nullptr);
    if (!freopen(out_path.c_str(), "w", stdout) || !freopen(err_path.c_str(), "w", stderr) ||
        !freopen("/dev/null", "r", stdin))
      _exit(127);
    execvp(exe.c_str(), argv.data());
    _exit(127);
  }
  return pid;
}

CliResult run_program(const std::string& program, const std::vector<std::string>& args) {
  const std::filesystem::path dir = temp_dir_sibling("cli");
  std::filesystem::create_directories(dir);
  const auto out_path = dir / "stdout", err_path = dir / "stderr";
  const pid_t pid = spawn_program(program, args, out_path, err_path);
  int status = 0;
  waitpid(pid, &status, 0);
  CliResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  r.out = slurp(out_path);
  r.err = slurp(err_path);
  return r;
}

pid_t spawn_cli(const std::vector<std::string>& args, const std::filesystem::path& dir) {
  return spawn_program(QALORA_CLI_PATH, args, dir / "spawn.out", dir / "spawn.err");
}

int run_python(const std::filesystem::path& script, const std::vector<std::string>& args,
               std::string& err) {
  const std::filesystem::path err_path = temp_dir_sibling("python.stderr");
  std::string cmd = "python3 '" + script.string() + "'";
  for (const auto& a : args) cmd += " '" + a + "'";
  cmd += " 2> '" + err_path.string() + "'";
  const int status = std::system(cmd.c_str());
  err = slurp(err_path);
  const int rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128;
  if (rc == 127) {
    err = "python3 not found on PATH";
    return kPythonMissing;
  }
  return rc;
}

void expect_one_line_error(const CliResult& r, const std::string& mentions) {
  EXPECT_NE(r.exit_code, 0) << r.out;
  ASSERT_FALSE(r.err.empty());
  EXPECT_TRUE(r.err.starts_with("error: ")) << r.err;
  EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << "expected exactly one line: " << r.err;
  if (!mentions.empty()) {
    EXPECT_NE(r.err.find(mentions), std::string::npos) << r.err;
  }
}

std::vector<float> random_normal(int64_t n, uint64_t seed, float sigma) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, sigma);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = d(rng);
  return v;
}

std::vector<float> random_uniform(int64_t n, uint64_t seed, float lo, float hi) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = u(rng);
  return v;
}

Halves random_halves(int64_t n, uint64_t seed, bool bf16) {
  Halves h;
  h.values = random_uniform(n, seed);
  h.bytes = std::make_shared<std::vector<uint8_t>>(static_cast<size_t>(2 * n));
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t b = bf16 ? fp32_to_bf16(h.values[i]) : fp32_to_fp16(h.values[i]);
    h.values[i] = bf16 ? bf16_to_fp32(b) : fp16_to_fp32(b);
    std::memcpy(h.bytes->data() + 2 * i, &b, 2);
  }
  return h;
}

Tensor encoded_of(const Halves& h, int64_t rows, int64_t cols, bool bf16) {
  return Tensor::encoded(h.bytes->data(), {rows, cols}, bf16 ? bf16_codec(cols) : half_codec(cols),
                         h.bytes, /*file_backed=*/false);
}

void expect_close(const std::vector<float>& a, const std::vector<float>& b, float tol,
                  const std::string& what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  for (size_t i = 0; i < a.size(); ++i)
    ASSERT_NEAR(a[i], b[i], tol * (1.0f + std::abs(b[i]))) << what << " index " << i;
}

}  // namespace qalora::test
