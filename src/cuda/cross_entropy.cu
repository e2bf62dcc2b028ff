// Cross-entropy over the vocabulary, one block per token: the logits are replaced in place by
// (softmax - onehot) * grad_scale, as on the CPU.
#include "kernels.h"
#include "reduce.cuh"
#include "runtime.h"

namespace qalora::cuda {

namespace {

constexpr int kThreads = 512;

__global__ void cross_entropy_kernel(float* logits, float* losses, const int32_t* targets,
                                     int64_t V, float grad_scale) {
  float* l = logits + blockIdx.x * V;
  const int32_t y = targets[blockIdx.x];
  if (y < 0) {
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) l[j] = 0.0f;
    if (threadIdx.x == 0) losses[blockIdx.x] = 0.0f;
    return;
  }
  float mx = -INFINITY;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) mx = fmaxf(mx, l[j]);
  mx = block_reduce<true>(mx);
  float sum = 0.0f;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) sum += expf(l[j] - mx);
  const float lse = mx + logf(block_reduce<false>(sum));
  const float target_logit = l[y];
  __syncthreads();  // every thread has read l[y] before it is overwritten
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x)
    l[j] = (expf(l[j] - lse) - (j == y ? 1.0f : 0.0f)) * grad_scale;
  if (threadIdx.x == 0) losses[blockIdx.x] = lse - target_logit;
}

}  // namespace

void cross_entropy(float* logits, float* losses, const int32_t* targets, int64_t T, int64_t V,
                   float grad_scale) {
  if (T == 0) return;
  cross_entropy_kernel<<<static_cast<unsigned>(T), kThreads>>>(logits, losses, targets, V,
                                                               grad_scale);
  check_launch("cross_entropy");
}

}  // namespace qalora::cuda
