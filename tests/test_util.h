// Shared helpers for the test suite: where the real data lives, temporary folders, and running
// the CLI as a subprocess to check exit codes and one-line errors.
#pragma once

#include <gtest/gtest.h>
#include <sys/types.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "qalora/core/device.h"
#include "qalora/core/tensor.h"
#include "qalora/ops/gemm.h"

namespace qalora::test {

// ../shared/data (or $QALORA_DATA_DIR); empty path when absent.
std::filesystem::path data_dir();
// Skips the current test with a clear message when a shared data file is missing.
#define QL_REQUIRE_DATA(relpath)                                                                 \
  do {                                                                                           \
    if (!std::filesystem::exists(::qalora::test::data_dir() / (relpath)))                        \
      GTEST_SKIP() << "shared test data not found: " << (::qalora::test::data_dir() / (relpath)) \
                   << " (set QALORA_DATA_DIR or place ../shared/data beside the checkout)";      \
  } while (0)

// Skips a test that needs a CUDA GPU where the build has no CUDA backend or the machine no GPU.
#define QL_REQUIRE_CUDA_DEVICE()                                                         \
  do {                                                                                   \
    if (::qalora::cuda_device_count() == 0)                                              \
      GTEST_SKIP() << "no CUDA device"                                                   \
                   << (::qalora::cuda_backend_built() ? "" : " (a build without CUDA)"); \
  } while (0)

// The default SmolLM2-135M-Instruct GGUF fetched by scripts/setup.sh ($QALORA_SMOLLM2 overrides).
std::filesystem::path smollm2_path();
#define QL_REQUIRE_SMOLLM2()                                                                  \
  do {                                                                                        \
    if (!std::filesystem::exists(::qalora::test::smollm2_path()))                             \
      GTEST_SKIP() << "SmolLM2-135M-Instruct not found at " << ::qalora::test::smollm2_path() \
                   << " (run scripts/setup.sh)";                                              \
  } while (0)

// Skips a test whose minutes of work on the real models add nothing under the sanitizers (the
// same code runs in the smaller tests there).
#ifdef QALORA_SANITIZE
#define QL_SKIP_UNDER_SANITIZERS(why) GTEST_SKIP() << "skipped under the sanitizers: " << (why)
#else
#define QL_SKIP_UNDER_SANITIZERS(why) \
  do {                                \
  } while (0)
#endif

// Sets the process's compute type (ops::set_compute_type) for a scope, fp32 again after it.
struct ComputeTypeScope {
  explicit ComputeTypeScope(ops::ComputeType type) { ops::set_compute_type(type); }
  ~ComputeTypeScope() { ops::set_compute_type(ops::ComputeType::Fp32); }
  ComputeTypeScope(const ComputeTypeScope&) = delete;
  ComputeTypeScope& operator=(const ComputeTypeScope&) = delete;
};

// n samples of N(0, sigma^2), reproducible from `seed`.
std::vector<float> random_normal(int64_t n, uint64_t seed, float sigma = 1.0f);
// n samples of U(lo, hi), reproducible from `seed`.
std::vector<float> random_uniform(int64_t n, uint64_t seed, float lo = -1.0f, float hi = 1.0f);

// n values that F16 (or, with `bf16`, BF16) holds exactly, and their encoded bytes.
struct Halves {
  std::vector<float> values;
  std::shared_ptr<std::vector<uint8_t>> bytes;
};
Halves random_halves(int64_t n, uint64_t seed, bool bf16);
// Those bytes as an encoded [rows, cols] tensor (not file-backed).
Tensor encoded_of(const Halves& h, int64_t rows, int64_t cols, bool bf16);

// Element by element, |a - b| <= tol * (1 + |b|); `what` names the comparison in failures.
void expect_close(const std::vector<float>& a, const std::vector<float>& b, float tol,
                  const std::string& what = "");

// A fresh, empty folder for this test under the build tree (emptied on each call).
std::filesystem::path temp_dir();

struct CliResult {
  int exit_code;
  std::string out;  // stdout
  std::string err;  // stderr
};
CliResult run_cli(const std::vector<std::string>& args);
// The same for another program (found on PATH), e.g. mpirun.
CliResult run_program(const std::string& program, const std::vector<std::string>& args);
// Starts the CLI without waiting for it (for tests that signal it); its stdout and stderr go to
// DIR/spawn.out and DIR/spawn.err.
pid_t spawn_cli(const std::vector<std::string>& args, const std::filesystem::path& dir);

// Runs `python3 SCRIPT ARGS...` (an independent reference implementation). Returns its exit
// status with its stderr in `err`; kPythonMissing when python3 or a package it needs is absent
// (scripts exit with 3 on ImportError), so the caller can skip.
constexpr int kPythonMissing = 3;
int run_python(const std::filesystem::path& script, const std::vector<std::string>& args,
               std::string& err);

// A failed run: non-zero exit, and stderr is exactly one line "error: ..." that contains
// `mentions` (a file name or field, when given).
void expect_one_line_error(const CliResult& r, const std::string& mentions = "");

}  // namespace qalora::test
