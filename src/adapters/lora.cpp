#include "qalora/adapters/lora.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "qalora/adapters/dropout_mask.h"
#include "qalora/core/error.h"
#include "qalora/ops/gemm.h"

namespace qalora {

namespace {

// Loops over more elements than this split their rows across threads.
constexpr int64_t kParallelElements = 1 << 15;

inline int64_t group_count(int64_t I, int64_t G) {
  return (I + G - 1) / G;
}

// The factor that turns a group's sum into its pooled value.
inline float pool_factor(AdapterPool pool, int64_t group_len) {
  return pool == AdapterPool::Average ? 1.0f / static_cast<float>(group_len) : 1.0f;
}

void check_group(int64_t I, int64_t G) {
  QL_CHECK(G >= 1 && I >= 1, "adapter pooling: group size expected >= 1 and in features >= 1, ",
           "got group size ", G, ", in features ", I);
}

using PoolFn = void (*)(float*, const float*, int64_t, int64_t, int64_t, AdapterPool);

// xin [T, C] = dropout(x) or dropout(P(x)): what A multiplies, in the forward and (recomputed)
// in the backward.
void adapter_input(const LoraAdapter& a, const float* x, int64_t T, const AdapterDropout& dropout,
                   float* xin, PoolFn pool_fn) {
  if (a.pooled())
    pool_fn(xin, x, T, a.in, a.group_size, a.pool);
  else
    std::memcpy(xin, x, static_cast<size_t>(T * a.in) * sizeof(float));
  dropout_forward(xin, T, a.a_cols(), dropout);
}

void check_grads(const LoraAdapter& a) {
  QL_CHECK(static_cast<int64_t>(a.grad_A.size()) == a.A.numel() &&
               static_cast<int64_t>(a.grad_B.size()) == a.B.numel(),
           "lora_backward: layer ", a.layer, " ", target_name(a.target), ": gradients expected ",
           a.A.numel(), " + ", a.B.numel(), " floats, got ", a.grad_A.size(), " + ",
           a.grad_B.size(), " (allocate them before the backward)");
}

}  // namespace

void pool_groups_forward(float* out, const float* x, int64_t T, int64_t I, int64_t G,
                         AdapterPool pool) {
  check_group(I, G);
  const int64_t L = group_count(I, G);
#pragma omp parallel for if (T * I > kParallelElements)
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * I;
    float* ot = out + t * L;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t i0 = l * G, n = std::min(G, I - i0);
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < n; ++i) s += xt[i0 + i];
      ot[l] = s * pool_factor(pool, n);
    }
  }
}

void pool_groups_forward_ref(float* out, const float* x, int64_t T, int64_t I, int64_t G,
                             AdapterPool pool) {
  check_group(I, G);
  const int64_t L = group_count(I, G);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t l = 0; l < L; ++l) {
      const int64_t i0 = l * G, n = std::min(G, I - i0);
      double s = 0.0;
      for (int64_t i = i0; i < i0 + n; ++i) s += x[t * I + i];
      if (pool == AdapterPool::Average) s /= static_cast<double>(n);
      out[t * L + l] = static_cast<float>(s);
    }
  }
}

void pool_groups_backward(float* dx, const float* dout, int64_t T, int64_t I, int64_t G,
                          AdapterPool pool) {
  check_group(I, G);
  const int64_t L = group_count(I, G);
#pragma omp parallel for if (T * I > kParallelElements)
  for (int64_t t = 0; t < T; ++t) {
    float* dxt = dx + t * I;
    const float* dt = dout + t * L;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t i0 = l * G, n = std::min(G, I - i0);
      const float v = dt[l] * pool_factor(pool, n);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) dxt[i0 + i] += v;
    }
  }
}

void pool_groups_backward_ref(float* dx, const float* dout, int64_t T, int64_t I, int64_t G,
                              AdapterPool pool) {
  check_group(I, G);
  const int64_t L = group_count(I, G);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < I; ++i) {
      const int64_t l = i / G, n = std::min(G, I - l * G);
      double v = dout[t * L + l];
      if (pool == AdapterPool::Average) v /= static_cast<double>(n);
      dx[t * I + i] = static_cast<float>(dx[t * I + i] + v);
    }
  }
}

void dropout_forward(float* x, int64_t T, int64_t C, float p, uint64_t seed) {
  if (p == 0.0f) return;
  QL_CHECK(p > 0.0f && p < 1.0f, "dropout probability expected in [0, 1), got ", p);
  const DropoutMask mask = dropout_mask(p, seed);
  // A row's hashes are drawn a chunk at a time into a buffer, then applied: two loops the
  // compiler vectorizes (one hash per element group, 64-bit multiplies), where drawing each
  // group's hash beside its four elements ran scalar (10% of a LoRA step).
  constexpr int64_t kGroups = 64;
  const int64_t groups = (C + 3) / 4;
#pragma omp parallel for if (T * C > kParallelElements)
  for (int64_t t = 0; t < T; ++t) {
    float* xt = x + t * C;
    uint64_t h[kGroups];
    for (int64_t g0 = 0; g0 < groups; g0 += kGroups) {
      const int64_t n = std::min(kGroups, groups - g0);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) h[i] = mask.hash(t, 4 * (g0 + i), C);
      const int64_t c0 = 4 * g0, c1 = std::min(C, 4 * (g0 + n));
#pragma omp simd
      for (int64_t c = c0; c < c1; ++c)
        xt[c] = mask.keeps(h[(c - c0) / 4], c) ? xt[c] * mask.keep_scale : 0.0f;
    }
  }
}

void dropout_forward_ref(float* x, int64_t T, int64_t C, float p, uint64_t seed) {
  if (p == 0.0f) return;
  QL_CHECK(p > 0.0f && p < 1.0f, "dropout probability expected in [0, 1), got ", p);
  const DropoutMask mask = dropout_mask(p, seed);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c)
      if (!mask.keeps(mask.hash(t, c, C), c))
        x[t * C + c] = 0.0f;
      else
        x[t * C + c] *= mask.keep_scale;
}

void dropout_forward(float* x, int64_t T, int64_t C, const AdapterDropout& dropout) {
  if (dropout.p == 0.0f) return;
  int64_t row = 0;
  for (const DropoutRun& run : dropout.runs) {
    dropout_forward(x + row * C, run.rows, C, dropout.p, run.seed);
    row += run.rows;
  }
  QL_CHECK(row == T, "dropout: runs of ", row, " rows for ", T, " rows");
}

void lora_forward(const LoraAdapter& a, float scale, const float* x, int64_t T,
                  const AdapterDropout& dropout, float* y, float* u, float* scratch) {
  if (T == 0) return;
  const int64_t r = a.rank(), C = a.a_cols(), O = a.out;
  adapter_input(a, x, T, dropout, scratch, pool_groups_forward);
  ops::gemm(false, true, T, r, C, 1.0f, scratch, C, a.A.data(), C, 0.0f, u, r);
  ops::gemm(false, true, T, O, r, scale, u, r, a.B.data(), r, 1.0f, y, O);
}

void lora_forward_ref(const LoraAdapter& a, float scale, const float* x, int64_t T,
                      const AdapterDropout& dropout, float* y, float* u, float* scratch) {
  const int64_t r = a.rank(), C = a.a_cols(), O = a.out;
  const float* A = a.A.data();
  const float* B = a.B.data();
  adapter_input(a, x, T, dropout, scratch, pool_groups_forward_ref);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < r; ++k) {
      double acc = 0.0;
      for (int64_t c = 0; c < C; ++c) acc += static_cast<double>(scratch[t * C + c]) * A[k * C + c];
      u[t * r + k] = static_cast<float>(acc);
    }
    for (int64_t o = 0; o < O; ++o) {
      double acc = 0.0;
      for (int64_t k = 0; k < r; ++k) acc += static_cast<double>(u[t * r + k]) * B[o * r + k];
      y[t * O + o] = static_cast<float>(y[t * O + o] + scale * acc);
    }
  }
}

void lora_backward(LoraAdapter& a, float scale, const ops::Operand& dy, const float* x,
                   const float* u, int64_t T, const AdapterDropout& dropout, float* dx,
                   float* scratch) {
  check_grads(a);
  if (T == 0) return;
  const int64_t r = a.rank(), C = a.a_cols(), O = a.out, I = a.in;
  const float* A = a.A.data();
  float* xin = scratch;        // [T, C], then the gradient of xin
  float* g = scratch + T * C;  // [T, r] = scale * dy B
  ops::gemm(false, false, T, r, O, scale, dy, O, a.B.data(), r, 0.0f, g, r);
  ops::gemm(true, false, O, r, T, scale, dy, O, u, r, 1.0f, a.grad_B.data(), r);
  adapter_input(a, x, T, dropout, xin, pool_groups_forward);
  ops::gemm(true, false, r, C, T, 1.0f, g, r, xin, C, 1.0f, a.grad_A.data(), C);
  if (!a.pooled() && dropout.p == 0.0f) {
    // Nothing between A and x: accumulate g A straight into dx.
    ops::gemm(false, false, T, I, r, 1.0f, g, r, A, C, 1.0f, dx, I);
    return;
  }
  ops::gemm(false, false, T, C, r, 1.0f, g, r, A, C, 0.0f, xin, C);
  // The mask scaled by 1 / (1 - p) is its own adjoint: apply it again.
  dropout_forward(xin, T, C, dropout);
  if (a.pooled())
    pool_groups_backward(dx, xin, T, I, a.group_size, a.pool);
  else
    cblas_saxpy(static_cast<blasint>(T * I), 1.0f, xin, 1, dx, 1);
}

void lora_backward_ref(LoraAdapter& a, float scale, const float* dy, const float* x, const float* u,
                       int64_t T, const AdapterDropout& dropout, float* dx, float* scratch) {
  check_grads(a);
  const int64_t r = a.rank(), C = a.a_cols(), O = a.out, I = a.in;
  const float* A = a.A.data();
  const float* B = a.B.data();
  float* xin = scratch;
  std::vector<double> g(static_cast<size_t>(T * r));
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < r; ++k) {
      double acc = 0.0;
      for (int64_t o = 0; o < O; ++o) acc += static_cast<double>(dy[t * O + o]) * B[o * r + k];
      g[static_cast<size_t>(t * r + k)] = scale * acc;
    }
  for (int64_t o = 0; o < O; ++o)
    for (int64_t k = 0; k < r; ++k) {
      double acc = 0.0;
      for (int64_t t = 0; t < T; ++t) acc += static_cast<double>(dy[t * O + o]) * u[t * r + k];
      float& gb = a.grad_B[static_cast<size_t>(o * r + k)];
      gb = static_cast<float>(gb + scale * acc);
    }
  adapter_input(a, x, T, dropout, xin, pool_groups_forward_ref);
  for (int64_t k = 0; k < r; ++k)
    for (int64_t c = 0; c < C; ++c) {
      double acc = 0.0;
      for (int64_t t = 0; t < T; ++t) acc += g[static_cast<size_t>(t * r + k)] * xin[t * C + c];
      float& ga = a.grad_A[static_cast<size_t>(k * C + c)];
      ga = static_cast<float>(ga + acc);
    }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c) {
      double acc = 0.0;
      for (int64_t k = 0; k < r; ++k) acc += g[static_cast<size_t>(t * r + k)] * A[k * C + c];
      xin[t * C + c] = static_cast<float>(acc);
    }
  dropout_forward(xin, T, C, dropout);
  if (a.pooled()) {
    pool_groups_backward_ref(dx, xin, T, I, a.group_size, a.pool);
  } else {
    for (int64_t i = 0; i < T * I; ++i) dx[i] += xin[i];
  }
}

}  // namespace qalora
