#include "qalora/adapters/lora.h"

#include <cblas.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <vector>

#include "qalora/adapters/dropout_mask.h"
#include "qalora/core/error.h"
#include "qalora/core/reused_buffer.h"
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

// Calls apply(c0, c1, lanes) over row t of `mask` in chunks of columns c0..c1-1, lanes[c - c0]
// being column c's 16-bit lane (it keeps the column where lane >= mask.threshold). A chunk of
// hashes is drawn into a buffer, then applied: two loops that vectorize (one hash per group of
// four columns, 64-bit multiplies; then one lane per column), where drawing each hash beside
// its four elements ran scalar (10% of a LoRA step).
template <typename Apply>
void for_each_mask_chunk(const DropoutMask& mask, int64_t t, int64_t C, Apply&& apply) {
  // Column c's lane is bits 16 (c % 4) of its group's hash (DropoutMask::keeps): in memory, on a
  // little-endian machine, the hashes are the lanes in column order.
  static_assert(std::endian::native == std::endian::little);
  constexpr int64_t kGroups = 64;
  const int64_t groups = (C + 3) / 4;
  uint64_t h[kGroups];
  uint16_t lanes[4 * kGroups];
  for (int64_t g0 = 0; g0 < groups; g0 += kGroups) {
    const int64_t n = std::min(kGroups, groups - g0);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) h[i] = mask.hash(t, 4 * (g0 + i), C);
    std::memcpy(lanes, h, static_cast<size_t>(n) * sizeof(uint64_t));
    apply(4 * g0, std::min(C, 4 * (g0 + n)), static_cast<const uint16_t*>(lanes));
  }
}

// dst[c] = src[c] * keep_scale where row t of `mask` keeps column c, else 0, for C columns (dst
// may be src).
void dropout_row(const DropoutMask& mask, int64_t t, const float* src, float* dst, int64_t C) {
  // Captured by value, so that no store to dst can change what the loop reads.
  for_each_mask_chunk(mask, t, C,
                      [src, dst, threshold = mask.threshold, scale = mask.keep_scale](
                          int64_t c0, int64_t c1, const uint16_t* lanes) {
#pragma omp simd
                        for (int64_t c = c0; c < c1; ++c) {
                          // Read whatever the mask says: a select of two values, not a
                          // masked load, which the vectorizer refuses here.
                          const float v = src[c] * scale;
                          dst[c] = lanes[c - c0] >= threshold ? v : 0.0f;
                        }
                      });
}

// Row t's mask drawn once for both uses of it in LoRA's backward: xin = the masked x (grad_A's
// operand again) and dx += the masked dxin (masked in place first: a product rounded on its
// own, then added, as separate passes would; a fused multiply-add would differ in the last bit).
void dropout_row_backward(const DropoutMask& mask, int64_t t, const float* x, float* xin,
                          float* dxin, float* dx, int64_t C) {
  for_each_mask_chunk(
      mask, t, C,
      [x, xin, dxin, dx, threshold = mask.threshold, scale = mask.keep_scale](
          int64_t c0, int64_t c1, const uint16_t* lanes) {
#pragma omp simd
        for (int64_t c = c0; c < c1; ++c) {
          // The mask as bits (all ones or +0.0f): with a select, the
          // compiler sinks the loads into it and the loop does not vectorize.
          const uint32_t keep = lanes[c - c0] >= threshold ? ~0u : 0u;
          xin[c] = std::bit_cast<float>(std::bit_cast<uint32_t>(x[c] * scale) & keep);
          dxin[c] = std::bit_cast<float>(std::bit_cast<uint32_t>(dxin[c] * scale) & keep);
        }
#pragma omp simd
        for (int64_t c = c0; c < c1; ++c) dx[c] += dxin[c];
      });
}

// Calls row_fn(row, mask, t) for each of T rows of C columns (p > 0), rows split across
// threads: t numbers the row within its run (its sequence), whose seed draws `mask`.
template <typename RowFn>
void for_each_dropout_row(int64_t T, int64_t C, const AdapterDropout& dropout, RowFn&& row_fn) {
  QL_CHECK(dropout.p > 0.0f && dropout.p < 1.0f, "dropout probability expected in [0, 1), got ",
           dropout.p);
  int64_t row = 0;
  for (const DropoutRun& run : dropout.runs) {
    const DropoutMask mask = dropout_mask(dropout.p, run.seed);
    QL_CHECK(run.rows <= T - row, "dropout: runs of more than ", T, " rows");
#pragma omp parallel for if (run.rows * C > kParallelElements)
    for (int64_t t = 0; t < run.rows; ++t) row_fn(row + t, mask, t);
    row += run.rows;
  }
  QL_CHECK(row == T, "dropout: runs of ", row, " rows for ", T, " rows");
}

// xin [T, C] = dropout(x) or dropout(P(x)): what A multiplies, in the forward and (recomputed)
// in the backward (except LoRA's with dropout, which makes it in its own pass over the mask), as
// an operand of a product that runs in bf16 when `bf16`. LoRA's xin goes
// straight from x to where the product reads it, in one pass: x itself without dropout, else
// the masked rows, rounded to bf16 while in cache when `bf16` (written over `xin`'s first half).
ops::Operand adapter_input(const LoraAdapter& a, const float* x, int64_t T,
                           const AdapterDropout& dropout, float* xin, PoolFn pool_fn, bool bf16) {
  const int64_t C = a.a_cols();
  if (a.pooled()) {
    pool_fn(xin, x, T, a.in, a.group_size, a.pool);
    dropout_forward(xin, T, C, dropout);
    return {xin};
  }
  if (dropout.p == 0.0f) return {x};
  if (!bf16) {
    for_each_dropout_row(T, C, dropout, [&](int64_t row, const DropoutMask& mask, int64_t t) {
      dropout_row(mask, t, x + row * C, xin + row * C, C);
    });
    return {xin};
  }
  auto* xin16 = reinterpret_cast<uint16_t*>(xin);
  for_each_dropout_row(T, C, dropout, [&](int64_t row, const DropoutMask& mask, int64_t t) {
    thread_local std::vector<float> masked;
    float* m = reused_buffer(masked, C);
    dropout_row(mask, t, x + row * C, m, C);
    ops::to_bf16(m, 1, C, C, xin16 + row * C);
  });
  return {nullptr, xin16};
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
  dropout_forward(x, T, C, AdapterDropout::single(p, seed, T));
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
  for_each_dropout_row(T, C, dropout, [&](int64_t row, const DropoutMask& mask, int64_t t) {
    dropout_row(mask, t, x + row * C, x + row * C, C);
  });
}

void lora_forward(const LoraAdapter& a, float scale, const float* x, int64_t T,
                  const AdapterDropout& dropout, float* y, float* u, float* scratch) {
  if (T == 0) return;
  const int64_t r = a.rank(), C = a.a_cols(), O = a.out;
  const ops::Operand xin =
      adapter_input(a, x, T, dropout, scratch, pool_groups_forward, ops::use_bf16(T, r, C));
  ops::gemm(false, true, T, r, C, 1.0f, xin, C, a.A.data(), C, 0.0f, u, r);
  ops::gemm(false, true, T, O, r, scale, u, r, a.B.data(), r, 1.0f, y, O);
}

void lora_forward_ref(const LoraAdapter& a, float scale, const float* x, int64_t T,
                      const AdapterDropout& dropout, float* y, float* u, float* scratch) {
  const int64_t r = a.rank(), C = a.a_cols(), O = a.out;
  const float* A = a.A.data();
  const float* B = a.B.data();
  const float* xin = adapter_input(a, x, T, dropout, scratch, pool_groups_forward_ref, false).f32;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t k = 0; k < r; ++k) {
      double acc = 0.0;
      for (int64_t c = 0; c < C; ++c) acc += static_cast<double>(xin[t * C + c]) * A[k * C + c];
      u[t * r + k] = static_cast<float>(acc);
    }
    for (int64_t o = 0; o < O; ++o) {
      double acc = 0.0;
      for (int64_t k = 0; k < r; ++k) acc += static_cast<double>(u[t * r + k]) * B[o * r + k];
      y[t * O + o] = static_cast<float>(y[t * O + o] + scale * acc);
    }
  }
}

int64_t lora_scratch_floats(const LoraAdapter& a, int64_t T) {
  return T * (2 * a.a_cols() + a.rank());
}

void lora_backward(LoraAdapter& a, float scale, const ops::Operand& dy, const float* x,
                   const float* u, int64_t T, const AdapterDropout& dropout, float* dx,
                   float* scratch) {
  check_grads(a);
  if (T == 0) return;
  const int64_t r = a.rank(), C = a.a_cols(), O = a.out, I = a.in;
  const float* A = a.A.data();
  float* g = scratch + T * C;  // [T, r] = scale * dy B
  ops::gemm(false, false, T, r, O, scale, dy, O, a.B.data(), r, 0.0f, g, r);
  ops::gemm(true, false, O, r, T, scale, dy, O, u, r, 1.0f, a.grad_B.data(), r);
  if (!a.pooled() && dropout.p > 0.0f) {
    // LoRA with dropout: dxin = g A first, so that one pass over the rows draws each row's mask
    // once for both the input gradient and the recomputed input grad_A reads.
    float* dxin = scratch;   // [T, C]
    float* xin = g + T * r;  // [T, C], or its bf16 copy over its first half
    const bool bf16 = ops::use_bf16(r, C, T);
    auto* xin16 = reinterpret_cast<uint16_t*>(xin);
    ops::gemm(false, false, T, C, r, 1.0f, g, r, A, C, 0.0f, dxin, C);
    for_each_dropout_row(T, C, dropout, [&](int64_t row, const DropoutMask& mask, int64_t t) {
      thread_local std::vector<float> masked;
      float* m = bf16 ? reused_buffer(masked, C) : xin + row * C;
      dropout_row_backward(mask, t, x + row * C, m, dxin + row * C, dx + row * C, C);
      if (bf16) ops::to_bf16(m, 1, C, C, xin16 + row * C);
    });
    ops::gemm(true, false, r, C, T, 1.0f, g, r,
              bf16 ? ops::Operand(nullptr, xin16) : ops::Operand(xin), C, 1.0f, a.grad_A.data(), C);
    return;
  }
  const ops::Operand xin =
      adapter_input(a, x, T, dropout, scratch, pool_groups_forward, ops::use_bf16(r, C, T));
  ops::gemm(true, false, r, C, T, 1.0f, g, r, xin, C, 1.0f, a.grad_A.data(), C);
  if (!a.pooled()) {
    // LoRA without dropout: nothing between A and x, so g A accumulates straight into dx.
    ops::gemm(false, false, T, I, r, 1.0f, g, r, A, C, 1.0f, dx, I);
    return;
  }
  // QA-LoRA: the mask scaled by 1 / (1 - p) is its own adjoint; apply it again, then E.
  float* dxin = scratch;  // [T, C], over xin (used)
  ops::gemm(false, false, T, C, r, 1.0f, g, r, A, C, 0.0f, dxin, C);
  dropout_forward(dxin, T, C, dropout);
  pool_groups_backward(dx, dxin, T, I, a.group_size, a.pool);
}

void lora_backward_ref(LoraAdapter& a, float scale, const float* dy, const float* x, const float* u,
                       int64_t T, const AdapterDropout& dropout, float* dx, float* scratch) {
  check_grads(a);
  const int64_t r = a.rank(), C = a.a_cols(), O = a.out, I = a.in;
  const float* A = a.A.data();
  const float* B = a.B.data();
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
  const float* xin = adapter_input(a, x, T, dropout, scratch, pool_groups_forward_ref, false).f32;
  for (int64_t k = 0; k < r; ++k)
    for (int64_t c = 0; c < C; ++c) {
      double acc = 0.0;
      for (int64_t t = 0; t < T; ++t) acc += g[static_cast<size_t>(t * r + k)] * xin[t * C + c];
      float& ga = a.grad_A[static_cast<size_t>(k * C + c)];
      ga = static_cast<float>(ga + acc);
    }
  float* dxin = scratch;  // over xin (used)
  for (int64_t t = 0; t < T; ++t)
    for (int64_t c = 0; c < C; ++c) {
      double acc = 0.0;
      for (int64_t k = 0; k < r; ++k) acc += g[static_cast<size_t>(t * r + k)] * A[k * C + c];
      dxin[t * C + c] = static_cast<float>(acc);
    }
  dropout_forward(dxin, T, C, dropout);
  if (a.pooled()) {
    pool_groups_backward_ref(dx, dxin, T, I, a.group_size, a.pool);
  } else {
    for (int64_t i = 0; i < T * I; ++i) dx[i] += dxin[i];
  }
}

}  // namespace qalora
