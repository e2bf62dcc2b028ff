#include "runtime.h"

#include <dlfcn.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <vector>

namespace qalora::cuda {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) fail("cuda: ", what, ": ", cudaGetErrorString(status));
}

namespace {

// cuBLAS is opened on first use, not linked: its libraries (600 MB) would otherwise be mapped
// and relocated by every qalora command, GPU or not, for about 150 MB of resident memory.
struct CublasApi {
  decltype(&cublasCreate_v2) create;
  decltype(&cublasDestroy_v2) destroy;
  decltype(&cublasSgemm_v2) sgemm;
  // cublasGemmEx is overloaded in C++: the C entry point's type, spelled out.
  cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                            const void*, const void*, cudaDataType, int, const void*, cudaDataType,
                            int, const void*, void*, cudaDataType, int, cublasComputeType_t,
                            cublasGemmAlgo_t);
  decltype(&cublasGetStatusString) status_string;
};

const CublasApi& cublas() {
  static const CublasApi api = [] {
    // The loader's path first, then the toolkit the build used (often not on that path).
    const std::string versioned = cat("libcublas.so.", CUBLAS_VER_MAJOR);
    void* lib = dlopen(versioned.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr)
      lib = dlopen((std::string(QALORA_CUDA_LIBRARY_DIR) + "/" + versioned).c_str(),
                   RTLD_NOW | RTLD_LOCAL);
    QL_CHECK(lib != nullptr, "cuda: cannot open ", versioned, " (cuBLAS, for the GPU's matrix ",
             "products): ", dlerror(), "; add its folder to LD_LIBRARY_PATH");
    const auto symbol = [&](const char* name) {
      void* f = dlsym(lib, name);
      QL_CHECK(f != nullptr, "cuda: ", versioned, " has no ", name);
      return f;
    };
    CublasApi a{};
    a.create = reinterpret_cast<decltype(a.create)>(symbol("cublasCreate_v2"));
    a.destroy = reinterpret_cast<decltype(a.destroy)>(symbol("cublasDestroy_v2"));
    a.sgemm = reinterpret_cast<decltype(a.sgemm)>(symbol("cublasSgemm_v2"));
    a.gemm_ex = reinterpret_cast<decltype(a.gemm_ex)>(symbol("cublasGemmEx"));
    a.status_string = reinterpret_cast<decltype(a.status_string)>(symbol("cublasGetStatusString"));
    return a;
  }();
  return api;
}

}  // namespace

void check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) fail("cublas: ", what, ": ", cublas().status_string(status));
}

int device_count(std::string* reason) {
  int n = 0;
  const cudaError_t status = cudaGetDeviceCount(&n);
  if (status != cudaSuccess) {
    if (reason != nullptr) *reason = cudaGetErrorString(status);
    cudaGetLastError();  // clear it: a CPU run goes on
    return 0;
  }
  if (n == 0 && reason != nullptr) *reason = "the driver reports no CUDA device";
  return n;
}

std::string describe(int index) {
  cudaDeviceProp p{};
  QL_CUDA(cudaGetDeviceProperties(&p, index));
  const double gib = static_cast<double>(p.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0);
  char mem[32];
  std::snprintf(mem, sizeof mem, "%.1f", gib);
  return cat(p.name, ", ", mem, " GiB, sm_", p.major, p.minor);
}

int64_t memory_used_bytes(int index) {
  QL_CUDA(cudaSetDevice(index));
  size_t free = 0, total = 0;
  QL_CUDA(cudaMemGetInfo(&free, &total));
  return static_cast<int64_t>(total - free);
}

double bf16_peak_gflops(int index) {
  QL_CUDA(cudaSetDevice(index));
  constexpr int64_t n = 8192;
  // Random values in +-[1, 2): products of zeros run faster than real data does.
  std::vector<uint16_t> host(static_cast<size_t>(n * n));
  uint64_t state = 0x9E3779B97F4A7C15ULL;
  for (uint16_t& v : host) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    v = static_cast<uint16_t>(0x3F80u | ((state >> 33) & 0x807Fu));
  }
  DeviceBuffer<uint16_t> a, b;
  a.upload(host), b.upload(host);
  DeviceBuffer<float> c(n * n);
  Blas blas;
  cudaEvent_t start, stop;
  QL_CUDA(cudaEventCreate(&start));
  QL_CUDA(cudaEventCreate(&stop));
  float best_ms = 1e30f;
  for (int i = 0; i < 6; ++i) {  // the first runs warm the clocks up
    QL_CUDA(cudaEventRecord(start));
    blas.gemm_bf16(false, true, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
    QL_CUDA(cudaEventRecord(stop));
    QL_CUDA(cudaEventSynchronize(stop));
    float ms = 0;
    QL_CUDA(cudaEventElapsedTime(&ms, start, stop));
    best_ms = std::min(best_ms, ms);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return 2.0 * static_cast<double>(n * n) * static_cast<double>(n) / (best_ms * 1e-3) / 1e9;
}

namespace {

int dim(int64_t n, const char* what) {
  QL_CHECK(n >= 0 && n <= INT_MAX, "cublas: ", what, " = ", n,
           " exceeds the 32-bit sizes of cuBLAS");
  return static_cast<int>(n);
}

}  // namespace

Blas::Blas() {
  QL_CUDA(cublas().create(&handle_));
}

Blas::~Blas() {
  if (handle_ != nullptr) cublas().destroy(handle_);
}

// cuBLAS is column-major: a row-major X[r, c] is the column-major X^T, so C = op(A) op(B) is
// computed as C^T = op(B)^T op(A)^T with the operands swapped and the flags kept.
void Blas::sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                 const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                 int64_t ldc, Fp32Math math) {
  if (M == 0 || N == 0) return;
  if (math == Fp32Math::Tf32) {
    QL_CUDA(cublas().gemm_ex(handle_, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                             trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, dim(N, "N"), dim(M, "M"),
                             dim(K, "K"), &alpha, B, CUDA_R_32F, dim(ldb, "ldb"), A, CUDA_R_32F,
                             dim(lda, "lda"), &beta, C, CUDA_R_32F, dim(ldc, "ldc"),
                             CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT));
    return;
  }
  QL_CUDA(cublas().sgemm(handle_, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                         trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, dim(N, "N"), dim(M, "M"), dim(K, "K"),
                         &alpha, B, dim(ldb, "ldb"), A, dim(lda, "lda"), &beta, C,
                         dim(ldc, "ldc")));
}

void Blas::gemm_bf16(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
                     const uint16_t* A, int64_t lda, const uint16_t* B, int64_t ldb, float beta,
                     float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  QL_CUDA(cublas().gemm_ex(handle_, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
                           trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, dim(N, "N"), dim(M, "M"),
                           dim(K, "K"), &alpha, B, CUDA_R_16BF, dim(ldb, "ldb"), A, CUDA_R_16BF,
                           dim(lda, "lda"), &beta, C, CUDA_R_32F, dim(ldc, "ldc"),
                           CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace qalora::cuda
