// Row-wise and elementwise ops of the block: RMSNorm, RoPE, SwiGLU, residual adds, bf16.
#include <cuda_bf16.h>

#include "kernels.h"
#include "reduce.cuh"
#include "runtime.h"

namespace qalora::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void rmsnorm_forward_kernel(float* out, const float* x, const float* w, int64_t D,
                                       float eps) {
  const float* xt = x + blockIdx.x * D;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) ss += xt[i] * xt[i];
  const float r = rsqrtf(block_reduce<false>(ss) / static_cast<float>(D) + eps);
  float* ot = out + blockIdx.x * D;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) ot[i] = xt[i] * r * w[i];
}

__global__ void rmsnorm_backward_kernel(float* dx, const float* dout, const float* x,
                                        const float* w, int64_t D, float eps) {
  const float* xt = x + blockIdx.x * D;
  const float* gt = dout + blockIdx.x * D;
  float ss = 0.0f, dot = 0.0f;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) {
    ss += xt[i] * xt[i];
    dot += gt[i] * w[i] * xt[i];
  }
  ss = block_reduce<false>(ss);
  dot = block_reduce<false>(dot);
  const float r = rsqrtf(ss / static_cast<float>(D) + eps);
  const float c = r * r * r * dot / static_cast<float>(D);
  float* dt = dx + blockIdx.x * D;
  for (int64_t i = threadIdx.x; i < D; i += blockDim.x) dt[i] += r * w[i] * gt[i] - xt[i] * c;
}

// One thread per rotated pair; `sign` = +1 rotates forward, -1 back (the adjoint).
__global__ void rope_kernel(float* x, int64_t T, int64_t H, int64_t half, const int32_t* positions,
                            const float* cos_table, const float* sin_table, float sign) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= T * H * half) return;
  const int64_t i = n % half, pos = positions[n / (H * half)];
  const float c = cos_table[pos * half + i], s = sign * sin_table[pos * half + i];
  float* v = x + 2 * n;  // pair i of head (t, h) sits at ((t * H + h) * half + i) * 2 = 2n
  const float a = v[0], b = v[1];
  v[0] = a * c - b * s;
  v[1] = a * s + b * c;
}

__device__ __forceinline__ float sigmoid(float g) {
  return 1.0f / (1.0f + expf(-g));
}

__global__ void swiglu_forward_kernel(float* out, const float* gate, const float* up, int64_t N) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < N) out[i] = gate[i] * sigmoid(gate[i]) * up[i];
}

__global__ void swiglu_backward_kernel(float* dgate, float* dup, const float* dout,
                                       const float* gate, const float* up, int64_t N) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= N) return;
  const float g = gate[i], d = dout[i], s = sigmoid(g);
  dup[i] = d * g * s;
  dgate[i] = d * up[i] * s * (1.0f + g * (1.0f - s));
}

__global__ void add_into_kernel(float* y, const float* x, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) y[i] += x[i];
}

__global__ void add_bias_kernel(float* y, const float* bias, int64_t n, int64_t O) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) y[i] += bias[i % O];
}

__global__ void to_bf16_kernel(const float* x, __nv_bfloat16* out, int64_t n) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < n) out[i] = __float2bfloat16_rn(x[i]);
}

}  // namespace

void rmsnorm_forward(float* out, const float* x, const float* w, int64_t T, int64_t D, float eps) {
  if (T == 0) return;
  rmsnorm_forward_kernel<<<static_cast<unsigned>(T), kThreads>>>(out, x, w, D, eps);
  check_launch("rmsnorm_forward");
}

void rmsnorm_backward(float* dx, const float* dout, const float* x, const float* w, int64_t T,
                      int64_t D, float eps) {
  if (T == 0) return;
  rmsnorm_backward_kernel<<<static_cast<unsigned>(T), kThreads>>>(dx, dout, x, w, D, eps);
  check_launch("rmsnorm_backward");
}

namespace {

void rope(float* x, int64_t T, int64_t H, int64_t Hd, const int32_t* positions,
          const float* cos_table, const float* sin_table, float sign) {
  const int64_t pairs = T * H * (Hd / 2);
  if (pairs == 0) return;
  rope_kernel<<<blocks_for(pairs, kThreads), kThreads>>>(x, T, H, Hd / 2, positions, cos_table,
                                                         sin_table, sign);
  check_launch(sign > 0 ? "rope_forward" : "rope_backward");
}

}  // namespace

void rope_forward(float* x, int64_t T, int64_t H, int64_t Hd, const int32_t* positions,
                  const float* cos_table, const float* sin_table) {
  rope(x, T, H, Hd, positions, cos_table, sin_table, 1.0f);
}

void rope_backward(float* dx, int64_t T, int64_t H, int64_t Hd, const int32_t* positions,
                   const float* cos_table, const float* sin_table) {
  rope(dx, T, H, Hd, positions, cos_table, sin_table, -1.0f);
}

void swiglu_forward(float* out, const float* gate, const float* up, int64_t N) {
  if (N == 0) return;
  swiglu_forward_kernel<<<blocks_for(N, kThreads), kThreads>>>(out, gate, up, N);
  check_launch("swiglu_forward");
}

void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                     const float* up, int64_t N) {
  if (N == 0) return;
  swiglu_backward_kernel<<<blocks_for(N, kThreads), kThreads>>>(dgate, dup, dout, gate, up, N);
  check_launch("swiglu_backward");
}

void add_into(float* y, const float* x, int64_t n) {
  if (n == 0) return;
  add_into_kernel<<<blocks_for(n, kThreads), kThreads>>>(y, x, n);
  check_launch("add_into");
}

void add_bias(float* y, const float* bias, int64_t T, int64_t O) {
  if (T * O == 0) return;
  add_bias_kernel<<<blocks_for(T * O, kThreads), kThreads>>>(y, bias, T * O, O);
  check_launch("add_bias");
}

void to_bf16(const float* x, uint16_t* out, int64_t n) {
  if (n == 0) return;
  to_bf16_kernel<<<blocks_for(n, kThreads), kThreads>>>(x, reinterpret_cast<__nv_bfloat16*>(out),
                                                        n);
  check_launch("to_bf16");
}

}  // namespace qalora::cuda
