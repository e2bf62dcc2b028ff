// Forward kernels of the Llama block, each with a plain reference beside it (suffix _ref) that
// the tests compare against on odd shapes. Shapes are named once per function:
//   T tokens, D model dim, F features, H query heads, KV key/value heads, Hd head dim.
// All tensors are row-major fp32; the optimized versions use OpenMP and BLAS.
#pragma once

#include <cstdint>

namespace qalora::ops {

// out[T, D] = x[T, D] / rms(x) * w[D]
void rmsnorm_forward(float* out, const float* x, const float* w, int64_t T, int64_t D, float eps);
void rmsnorm_forward_ref(float* out, const float* x, const float* w, int64_t T, int64_t D,
                         float eps);

// y[T, O] = x[T, I] W[O, I]^T (+ bias[O]); bias may be null.
void matmul_forward(float* y, const float* x, const float* W, const float* bias, int64_t T,
                    int64_t I, int64_t O);
void matmul_forward_ref(float* y, const float* x, const float* W, const float* bias, int64_t T,
                        int64_t I, int64_t O);

// Rotates adjacent pairs (x[2i], x[2i+1]) of each head in place. x is [T, H, Hd]; token t sits
// at position pos0 + t; cos/sin tables are [positions, Hd / 2].
void rope_forward(float* x, int64_t T, int64_t H, int64_t Hd, int64_t pos0, const float* cos_table,
                  const float* sin_table);
void rope_forward_ref(float* x, int64_t T, int64_t H, int64_t Hd, int64_t pos0,
                      const float* cos_table, const float* sin_table);

// y[n] = exp(x[n]), vectorized, within a few ulp of std::exp; x is clamped to [-87, 88] (below,
// ~1.6e-38 instead of a smaller or subnormal value; above, ~1.7e38 instead of inf); NaN stays
// NaN. The softmax of attention and SwiGLU's sigmoid use it.
void exp_forward(float* y, const float* x, int64_t n);
void exp_forward_ref(float* y, const float* x, int64_t n);

// out[N] = silu(gate[N]) * up[N]
void swiglu_forward(float* out, const float* gate, const float* up, int64_t N);
void swiglu_forward_ref(float* out, const float* gate, const float* up, int64_t N);

// The KV cache of one layer: k_cache [KV, Hd, cache_stride], keys transposed (position
// fastest), so that a decode step's scores are vector sums over positions rather than a dot
// product with a horizontal sum per position; v_cache [KV, cache_stride, Hd]. Stores the T
// new keys and values k, v [T, KV, Hd] at positions pos0..pos0+T-1.
void kv_cache_store(float* k_cache, float* v_cache, const float* k, const float* v, int64_t T,
                    int64_t pos0, int64_t KV, int64_t Hd, int64_t cache_stride);

// Causal grouped-query attention of T new queries at positions pos0..pos0+T-1 against a cache
// (kv_cache_store's layout) holding positions 0..pos0+T-1. q [T, H, Hd]; out [T, H, Hd]. H
// must be a multiple of KV.
void attention_forward(float* out, const float* q, const float* k_cache, const float* v_cache,
                       int64_t T, int64_t pos0, int64_t H, int64_t KV, int64_t Hd,
                       int64_t cache_stride);
void attention_forward_ref(float* out, const float* q, const float* k_cache, const float* v_cache,
                           int64_t T, int64_t pos0, int64_t H, int64_t KV, int64_t Hd,
                           int64_t cache_stride);

}  // namespace qalora::ops
