#include "qalora/ops/blas.h"

#include <cblas.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#include "qalora/core/clock.h"

namespace qalora {

double sgemm_peak_gflops() {
  constexpr int n = 2048;
  std::vector<float> a(static_cast<size_t>(n) * n, 1.0f), b(a), c(a.size());
  const double best = best_seconds(3, [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, n, 1.0f, a.data(), n, b.data(), n,
                0.0f, c.data(), n);
  });
  return 2.0 * n * n * static_cast<double>(n) / best / 1e9;
}

const char* blas_core_name() {
  return openblas_get_corename();
}

void select_blas_kernels(char** argv) {
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr) return;
  std::string core = blas_core_name();
  std::transform(core.begin(), core.end(), core.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  // Kernel families older than AVX2: a sign the CPU model was not recognised when the CPU
  // itself has more.
  constexpr const char* kLegacy[] = {"prescott", "core2",   "penryn",    "dunnington",
                                     "nehalem",  "katmai",  "banias",    "atom",
                                     "athlon",   "opteron", "barcelona", "bobcat"};
  if (std::none_of(std::begin(kLegacy), std::end(kLegacy),
                   [&](const char* c) { return core == c; }))
    return;
  __builtin_cpu_init();
  const char* wanted = nullptr;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    wanted = "SkylakeX";
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    wanted = "Haswell";
  if (wanted == nullptr) return;
  setenv("OPENBLAS_CORETYPE", wanted, 1);
  // The executable's own path rather than /proc/self/exe, so the process keeps its name.
  std::error_code error;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", error);
  if (!error) execv(self.c_str(), argv);  // returns only on failure: keep the slow kernels
}

}  // namespace qalora
