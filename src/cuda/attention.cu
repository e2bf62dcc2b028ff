// Causal grouped-query attention for training over packed sequences, one warp per query row
// (forward, dq) or key row (dk, dv), with an online softmax: no [T, T] matrix is stored, the
// backward recomputes the probabilities from the forward's log-sum-exp (as FlashAttention does).
// Each lane holds Hd / 32 elements of its row; sums over rows run in a fixed order, so results do
// not depend on scheduling.
#include <cmath>

#include "kernels.h"
#include "reduce.cuh"
#include "runtime.h"

namespace qalora::cuda {

namespace {

constexpr int kMaxPerLane = 8;  // Hd <= 32 * 8
constexpr int kWarpsPerBlock = 4;

struct Shape {
  int64_t T, H, KV, Hd;
  float scale;  // 1 / sqrt(Hd)
  __device__ int64_t q_row(int64_t t, int64_t h) const { return (t * H + h) * Hd; }
  __device__ int64_t kv_row(int64_t t, int64_t kvh) const { return (t * KV + kvh) * Hd; }
};

__device__ __forceinline__ void load_row(float (&r)[kMaxPerLane], const float* row, int64_t Hd,
                                         int lane, float mul) {
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j) {
    const int64_t i = lane + 32 * j;
    r[j] = i < Hd ? row[i] * mul : 0.0f;
  }
}

__device__ __forceinline__ float dot_row(const float (&r)[kMaxPerLane], const float* row,
                                         int64_t Hd, int lane) {
  float s = 0.0f;
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j) {
    const int64_t i = lane + 32 * j;
    if (i < Hd) s += r[j] * row[i];
  }
  return warp_sum(s);
}

__device__ __forceinline__ void axpy_row(float (&acc)[kMaxPerLane], float a, const float* row,
                                         int64_t Hd, int lane) {
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j) {
    const int64_t i = lane + 32 * j;
    if (i < Hd) acc[j] += a * row[i];
  }
}

__device__ __forceinline__ void store_row(float* row, const float (&r)[kMaxPerLane], float mul,
                                          int64_t Hd, int lane) {
#pragma unroll
  for (int j = 0; j < kMaxPerLane; ++j) {
    const int64_t i = lane + 32 * j;
    if (i < Hd) row[i] = r[j] * mul;
  }
}

__device__ __forceinline__ int64_t warp_index() {
  return (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32;
}

// Warp (t, h): out[t, h] and lse[h, t] over keys seq_begin[t]..t.
__global__ void forward_kernel(float* out, float* lse, const float* q, const float* k,
                               const float* v, const int32_t* seq_begin, Shape s) {
  const int64_t w = warp_index();
  if (w >= s.T * s.H) return;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t t = w / s.H, h = w % s.H, kvh = h / (s.H / s.KV);
  float qr[kMaxPerLane], acc[kMaxPerLane] = {};
  load_row(qr, q + s.q_row(t, h), s.Hd, lane, s.scale);
  float m = -INFINITY, l = 0.0f;
  for (int64_t j = seq_begin[t]; j <= t; ++j) {
    const float score = dot_row(qr, k + s.kv_row(j, kvh), s.Hd, lane);
    const float m_new = fmaxf(m, score);
    const float correction = expf(m - m_new), p = expf(score - m_new);
    l = l * correction + p;
#pragma unroll
    for (int jj = 0; jj < kMaxPerLane; ++jj) acc[jj] *= correction;
    axpy_row(acc, p, v + s.kv_row(j, kvh), s.Hd, lane);
    m = m_new;
  }
  store_row(out + s.q_row(t, h), acc, 1.0f / l, s.Hd, lane);
  if (lane == 0) lse[h * s.T + t] = m + logf(l);
}

// delta[h, t] = dout[t, h] . out[t, h]: the softmax backward's row term.
__global__ void delta_kernel(float* delta, const float* dout, const float* out, Shape s) {
  const int64_t w = warp_index();
  if (w >= s.T * s.H) return;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t t = w / s.H, h = w % s.H;
  float o[kMaxPerLane];
  load_row(o, out + s.q_row(t, h), s.Hd, lane, 1.0f);
  const float d = dot_row(o, dout + s.q_row(t, h), s.Hd, lane);
  if (lane == 0) delta[h * s.T + t] = d;
}

// Warp (t, h): dq[t, h] = scale * sum over keys seq_begin[t]..t of p (dp - delta) k[j].
__global__ void dq_kernel(float* dq, const float* dout, const float* lse, const float* delta,
                          const float* q, const float* k, const float* v, const int32_t* seq_begin,
                          Shape s) {
  const int64_t w = warp_index();
  if (w >= s.T * s.H) return;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t t = w / s.H, h = w % s.H, kvh = h / (s.H / s.KV);
  float qr[kMaxPerLane], g[kMaxPerLane], acc[kMaxPerLane] = {};
  load_row(qr, q + s.q_row(t, h), s.Hd, lane, s.scale);
  load_row(g, dout + s.q_row(t, h), s.Hd, lane, 1.0f);
  const float row_lse = lse[h * s.T + t], row_delta = delta[h * s.T + t];
  for (int64_t j = seq_begin[t]; j <= t; ++j) {
    const float p = expf(dot_row(qr, k + s.kv_row(j, kvh), s.Hd, lane) - row_lse);
    const float dp = dot_row(g, v + s.kv_row(j, kvh), s.Hd, lane);
    axpy_row(acc, p * (dp - row_delta), k + s.kv_row(j, kvh), s.Hd, lane);
  }
  store_row(dq + s.q_row(t, h), acc, s.scale, s.Hd, lane);
}

// Warp (j, kv head): dv[j] = sum of p dout[t], dk[j] = scale * sum of p (dp - delta) q[t], over
// the group's query heads and the queries j..seq_end[j]-1 that see key j.
__global__ void dkdv_kernel(float* dk, float* dv, const float* dout, const float* lse,
                            const float* delta, const float* q, const float* k, const float* v,
                            const int32_t* seq_end, Shape s) {
  const int64_t w = warp_index();
  if (w >= s.T * s.KV) return;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t j = w / s.KV, kvh = w % s.KV, group = s.H / s.KV;
  float kr[kMaxPerLane], vr[kMaxPerLane], dk_acc[kMaxPerLane] = {}, dv_acc[kMaxPerLane] = {};
  load_row(kr, k + s.kv_row(j, kvh), s.Hd, lane, s.scale);
  load_row(vr, v + s.kv_row(j, kvh), s.Hd, lane, 1.0f);
  for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h)
    for (int64_t t = j; t < seq_end[j]; ++t) {
      const float* qt = q + s.q_row(t, h);
      const float* gt = dout + s.q_row(t, h);
      const float p = expf(dot_row(kr, qt, s.Hd, lane) - lse[h * s.T + t]);
      const float dp = dot_row(vr, gt, s.Hd, lane);
      axpy_row(dv_acc, p, gt, s.Hd, lane);
      axpy_row(dk_acc, p * (dp - delta[h * s.T + t]), qt, s.Hd, lane);
    }
  store_row(dk + s.kv_row(j, kvh), dk_acc, s.scale, s.Hd, lane);
  store_row(dv + s.kv_row(j, kvh), dv_acc, 1.0f, s.Hd, lane);
}

Shape shape_of(int64_t T, int64_t H, int64_t KV, int64_t Hd) {
  QL_CHECK(Hd > 0 && Hd <= 32 * kMaxPerLane, "cuda attention: head dim ", Hd, " outside 1..",
           32 * kMaxPerLane);
  QL_CHECK(KV > 0 && H % KV == 0, "cuda attention: ", H, " query heads are not a multiple of ", KV,
           " key/value heads");
  return {T, H, KV, Hd, 1.0f / sqrtf(static_cast<float>(Hd))};
}

unsigned warp_blocks(int64_t warps) {
  return blocks_for(warps, kWarpsPerBlock);
}

}  // namespace

void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const int32_t* seq_begin, int64_t T, int64_t H, int64_t KV, int64_t Hd) {
  const Shape s = shape_of(T, H, KV, Hd);
  if (T == 0) return;
  forward_kernel<<<warp_blocks(T * H), 32 * kWarpsPerBlock>>>(out, lse, q, k, v, seq_begin, s);
  check_launch("attention_forward");
}

void attention_backward(float* dq, float* dk, float* dv, float* delta, const float* dout,
                        const float* out, const float* lse, const float* q, const float* k,
                        const float* v, const int32_t* seq_begin, const int32_t* seq_end, int64_t T,
                        int64_t H, int64_t KV, int64_t Hd) {
  const Shape s = shape_of(T, H, KV, Hd);
  if (T == 0) return;
  delta_kernel<<<warp_blocks(T * H), 32 * kWarpsPerBlock>>>(delta, dout, out, s);
  check_launch("attention_backward (delta)");
  dq_kernel<<<warp_blocks(T * H), 32 * kWarpsPerBlock>>>(dq, dout, lse, delta, q, k, v, seq_begin,
                                                         s);
  check_launch("attention_backward (dq)");
  dkdv_kernel<<<warp_blocks(T * KV), 32 * kWarpsPerBlock>>>(dk, dv, dout, lse, delta, q, k, v,
                                                            seq_end, s);
  check_launch("attention_backward (dk, dv)");
}

}  // namespace qalora::cuda
