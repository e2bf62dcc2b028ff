// The adapters' own ops: QA-LoRA's group pooling and its adjoint, and dropout with the CPU's
// mask (qalora/adapters/dropout_mask.h). Their products run through cuBLAS (runtime.h).
#include "kernels.h"
#include "qalora/adapters/dropout_mask.h"
#include "reduce.cuh"
#include "runtime.h"

namespace qalora::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void pool_forward_kernel(float* out, const float* x, int64_t T, int64_t I, int64_t G,
                                    int64_t L, bool average) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= T * L) return;
  const int64_t t = n / L, l = n % L, i0 = l * G, size = min(G, I - i0);
  const float* xt = x + t * I + i0;
  float s = 0.0f;
  for (int64_t i = 0; i < size; ++i) s += xt[i];
  out[n] = average ? s / static_cast<float>(size) : s;
}

__global__ void pool_backward_kernel(float* dx, const float* dout, int64_t T, int64_t I, int64_t G,
                                     int64_t L, bool average) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= T * I) return;
  const int64_t t = n / I, l = (n % I) / G, size = min(G, I - l * G);
  const float g = dout[t * L + l];
  dx[n] += average ? g / static_cast<float>(size) : g;
}

// One thread per four elements: they share one hash.
__global__ void dropout_kernel(float* x, int64_t T, int64_t C, DropoutMask mask) {
  const int64_t quads = (C + 3) / 4;
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= T * quads) return;
  const int64_t t = n / quads, c0 = (n % quads) * 4;
  const uint64_t h = mask.hash(t, c0, C);
  float* xt = x + t * C;
  for (int64_t c = c0; c < min(c0 + 4, C); ++c)
    xt[c] = mask.keeps(h, c) ? xt[c] * mask.keep_scale : 0.0f;
}

// The number of groups of G columns (the last may be shorter) in I.
int64_t group_count(int64_t I, int64_t G) {
  QL_CHECK(G > 0 && G <= I, "cuda pooling: group size ", G, " outside 1..", I);
  return (I + G - 1) / G;
}

}  // namespace

void pool_groups_forward(float* out, const float* x, int64_t T, int64_t I, int64_t G,
                         bool average) {
  const int64_t L = group_count(I, G);
  if (T == 0) return;
  pool_forward_kernel<<<blocks_for(T * L, kThreads), kThreads>>>(out, x, T, I, G, L, average);
  check_launch("pool_groups_forward");
}

void pool_groups_backward(float* dx, const float* dout, int64_t T, int64_t I, int64_t G,
                          bool average) {
  const int64_t L = group_count(I, G);
  if (T == 0) return;
  pool_backward_kernel<<<blocks_for(T * I, kThreads), kThreads>>>(dx, dout, T, I, G, L, average);
  check_launch("pool_groups_backward");
}

void dropout_forward(float* x, int64_t T, int64_t C, float p, uint64_t seed) {
  if (p == 0.0f || T * C == 0) return;
  QL_CHECK(p > 0.0f && p < 1.0f, "dropout probability expected in [0, 1), got ", p);
  const int64_t quads = T * ((C + 3) / 4);
  dropout_kernel<<<blocks_for(quads, kThreads), kThreads>>>(x, T, C, dropout_mask(p, seed));
  check_launch("dropout_forward");
}

}  // namespace qalora::cuda
