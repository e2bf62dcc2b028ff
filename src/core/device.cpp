#include "qalora/core/device.h"

#include <charconv>

#include "qalora/core/error.h"

#ifdef QALORA_WITH_CUDA
#include "cuda/runtime.h"
#endif

namespace qalora {

std::string Device::name() const {
  return cuda() ? cat("cuda:", index) : std::string("cpu");
}

Device parse_device(std::string_view text) {
  if (text == "cpu") return {};
  if (text == "cuda") return {Device::Kind::Cuda, 0};
  if (text.starts_with("cuda:")) {
    const std::string_view digits = text.substr(5);
    int index = -1;
    const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), index);
    if (ec == std::errc() && end == digits.data() + digits.size() && index >= 0)
      return {Device::Kind::Cuda, index};
  }
  fail("--device: expected cpu, cuda or cuda:N, got '", text, "'");
}

bool cuda_backend_built() {
#ifdef QALORA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

int cuda_device_count() {
#ifdef QALORA_WITH_CUDA
  return cuda::device_count();
#else
  return 0;
#endif
}

void require_device(const Device& device) {
  if (!device.cuda()) return;
#ifdef QALORA_WITH_CUDA
  std::string reason;
  const int n = cuda::device_count(&reason);
  QL_CHECK(n > 0, "--device ", device.name(), ": no CUDA device can be used (", reason, ")");
  QL_CHECK(device.index < n, "--device ", device.name(), ": this machine has ", n,
           " CUDA device(s), numbered 0..", n - 1);
#else
  fail("--device ", device.name(),
       ": this build has no CUDA backend (configure with -DQALORA_CUDA=ON where nvcc is "
       "installed; scripts/gpu-check.sh does)");
#endif
}

std::string describe_device(const Device& device) {
  require_device(device);
#ifdef QALORA_WITH_CUDA
  if (device.cuda()) return cat(device.name(), " (", cuda::describe(device.index), ")");
#endif
  return device.name();
}

double gpu_bf16_peak_gflops(const Device& device) {
  require_device(device);
#ifdef QALORA_WITH_CUDA
  if (device.cuda()) return cuda::bf16_peak_gflops(device.index);
#endif
  fail("gpu_bf16_peak_gflops: ", device.name(), " is not a GPU");
}

int64_t gpu_memory_used_bytes(const Device& device) {
  require_device(device);
#ifdef QALORA_WITH_CUDA
  if (device.cuda()) return cuda::memory_used_bytes(device.index);
#endif
  fail("gpu_memory_used_bytes: ", device.name(), " is not a GPU");
}

}  // namespace qalora
