// Where a command computes: the CPU, or a CUDA GPU when the build has the CUDA backend
// (-DQALORA_CUDA, src/cuda). `--device cpu|cuda[:N]` on the commands that run a model.
#pragma once

#include <string>
#include <string_view>

namespace qalora {

struct Device {
  enum class Kind { Cpu, Cuda };
  Kind kind = Kind::Cpu;
  int index = 0;  // CUDA device ordinal
  bool cuda() const { return kind == Kind::Cuda; }
  std::string name() const;  // "cpu", "cuda:0"
};

// "cpu", "cuda" (= cuda:0) or "cuda:N"; throws Error naming the text otherwise.
Device parse_device(std::string_view text);

// True when this build has the CUDA backend.
bool cuda_backend_built();
// Number of CUDA devices this process can use: 0 without the backend, a driver or a GPU.
int cuda_device_count();
// Throws Error, in one line, when `device` cannot be used here: the build has no CUDA
// backend, or there is no such GPU (with the driver's reason).
void require_device(const Device& device);
// "cpu", or "cuda:0 (NVIDIA H200, 139.8 GiB, sm_90)".
std::string describe_device(const Device& device);

// For `bench` on a GPU: the rate of an 8192^3 bf16 cuBLAS product with fp32 accumulation,
// measured now, and the device memory in use by every process (total - free), in bytes.
double gpu_bf16_peak_gflops(const Device& device);
int64_t gpu_memory_used_bytes(const Device& device);

}  // namespace qalora
