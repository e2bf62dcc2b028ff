// Host-side helpers of the CUDA backend: error checks that become qalora::Error, device
// buffers, and the cuBLAS products every op of the training step uses. Compiled only with
// -DQALORA_CUDA (src/cuda is the backend; nothing outside it includes this file).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <span>
#include <string>

#include "qalora/core/error.h"

namespace qalora::cuda {

// Throw Error "<what>: <CUDA's reason>".
void check(cudaError_t status, const char* what);
void check(cublasStatus_t status, const char* what);
#define QL_CUDA(call) ::qalora::cuda::check((call), #call)
// After a kernel launch: throws Error naming the kernel when the launch failed.
inline void check_launch(const char* kernel) {
  check(cudaGetLastError(), kernel);
}

// Number of devices, 0 where the driver or a GPU is missing; `reason` receives why.
int device_count(std::string* reason = nullptr);
std::string describe(int index);       // "NVIDIA H200, 139.8 GiB, sm_90"
double bf16_peak_gflops(int index);    // see gpu_bf16_peak_gflops (qalora/core/device.h)
int64_t memory_used_bytes(int index);  // total - free device memory

// An array of T in GPU memory; moves, never copies.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(int64_t n) { resize(n); }
  ~DeviceBuffer() { release(); }
  DeviceBuffer(DeviceBuffer&& o) noexcept : data_(o.data_), size_(o.size_) {
    o.data_ = nullptr, o.size_ = 0;
  }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = o.data_, size_ = o.size_;
      o.data_ = nullptr, o.size_ = 0;
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  // Reallocates (contents lost) when n differs from the size.
  void resize(int64_t n) {
    if (n == size_) return;
    release();
    if (n > 0) QL_CUDA(cudaMalloc(reinterpret_cast<void**>(&data_), bytes_of(n)));
    size_ = n;
  }
  void upload(std::span<const T> host) {
    resize(static_cast<int64_t>(host.size()));
    if (size_ > 0) QL_CUDA(cudaMemcpy(data_, host.data(), bytes_of(size_), cudaMemcpyHostToDevice));
  }
  // The first host.size() elements.
  void download(std::span<T> host) const {
    QL_CHECK(static_cast<int64_t>(host.size()) <= size_, "cuda: download of ", host.size(),
             " elements from a buffer of ", size_);
    if (!host.empty())
      QL_CUDA(cudaMemcpy(host.data(), data_, host.size() * sizeof(T), cudaMemcpyDeviceToHost));
  }
  void zero() {
    if (size_ > 0) QL_CUDA(cudaMemset(data_, 0, bytes_of(size_)));
  }
  T* data() { return data_; }
  const T* data() const { return data_; }
  int64_t size() const { return size_; }
  int64_t bytes() const { return static_cast<int64_t>(bytes_of(size_)); }

 private:
  static size_t bytes_of(int64_t n) { return static_cast<size_t>(n) * sizeof(T); }
  void release() {
    if (data_ != nullptr) cudaFree(data_);
    data_ = nullptr, size_ = 0;
  }
  T* data_ = nullptr;
  int64_t size_ = 0;
};

// Row-major products on the GPU through cuBLAS, in the convention of ops::gemm:
// C[M, N] = alpha op(A) op(B) + beta C, op = transpose when the flag is set.
class Blas {
 public:
  Blas();
  ~Blas();
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;
  // fp32 in, fp32 out (the adapters' products): in fp32 arithmetic, or with Tf32 on the tensor
  // cores (inputs rounded to 10-bit mantissas, fp32 accumulation; about 8x the fp32 rate, and
  // still finer than the bf16 the frozen linears use).
  enum class Fp32Math { Exact, Tf32 };
  void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
             const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
             int64_t ldc, Fp32Math math = Fp32Math::Exact);
  // bf16 in (raw uint16 bits), fp32 out, fp32 accumulation on the tensor cores (the frozen
  // linears and the head).
  void gemm_bf16(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                 const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, float beta,
                 float* C, int64_t ldc);

 private:
  cublasHandle_t handle_ = nullptr;
};

}  // namespace qalora::cuda
