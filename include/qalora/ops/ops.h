// Forward kernels of the Llama block, each with a plain reference beside it (suffix _ref) that
// the tests compare against on odd shapes. Shapes are named once per function:
//   T tokens, D model dim, F features, H query heads, KV key/value heads, Hd head dim.
// All tensors are row-major fp32; the optimized versions use OpenMP and BLAS.
#pragma once

#include <cstdint>
#include <span>

#include "qalora/ops/gemm.h"

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
// The same with token t at positions[t] (several sequences packed in one batch).
void rope_forward_at(float* x, int64_t T, int64_t H, int64_t Hd, const int64_t* positions,
                     const float* cos_table, const float* sin_table);
void rope_forward_at_ref(float* x, int64_t T, int64_t H, int64_t Hd, const int64_t* positions,
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

// The cache slots one query attends to: [0, prefix_end), [context_begin, context_end) and
// [own_begin, its own slot], ascending and disjoint; empty ranges are allowed. Packed scoring
// runs several sequences in one batch: each sees a shared prefix, its context and itself.
struct VisibleKeys {
  int64_t prefix_end = 0;
  int64_t context_begin = 0, context_end = 0;
  int64_t own_begin = 0;
};

// Grouped-query attention of T new queries at cache slots pos0..pos0+T-1 against a cache
// (kv_cache_store's layout) holding slots 0..pos0+T-1: causal (each query sees every slot up to
// its own) when `visible` is empty, else query t sees visible[t]. q [T, H, Hd]; out [T, H, Hd].
// H must be a multiple of KV.
void attention_forward(float* out, const float* q, const float* k_cache, const float* v_cache,
                       int64_t T, int64_t pos0, int64_t H, int64_t KV, int64_t Hd,
                       int64_t cache_stride, std::span<const VisibleKeys> visible = {});
void attention_forward_ref(float* out, const float* q, const float* k_cache, const float* v_cache,
                           int64_t T, int64_t pos0, int64_t H, int64_t KV, int64_t Hd,
                           int64_t cache_stride, std::span<const VisibleKeys> visible = {});

// ---- Training: whole sequences, no cache. Backwards take the forward's inputs (and what it
// saved) and give input gradients only: the base weights are frozen.

// dx[T, D] += the input gradient of rmsnorm_forward given dout[T, D] (accumulates, as the
// residual stream does).
void rmsnorm_backward(float* dx, const float* dout, const float* x, const float* w, int64_t T,
                      int64_t D, float eps);
void rmsnorm_backward_ref(float* dx, const float* dout, const float* x, const float* w, int64_t T,
                          int64_t D, float eps);

// dx[T, I] = dy[T, O] W[O, I] (+= with `accumulate`): the input gradient of matmul_forward.
void matmul_backward_input(float* dx, const Operand& dy, const float* W, int64_t T, int64_t I,
                           int64_t O, bool accumulate = false);
void matmul_backward_input_ref(float* dx, const float* dy, const float* W, int64_t T, int64_t I,
                               int64_t O);

// The adjoint of rope_forward, in place on dx [T, H, Hd]: rotates each pair back.
void rope_backward(float* dx, int64_t T, int64_t H, int64_t Hd, int64_t pos0,
                   const float* cos_table, const float* sin_table);
void rope_backward_ref(float* dx, int64_t T, int64_t H, int64_t Hd, int64_t pos0,
                       const float* cos_table, const float* sin_table);

// Causal grouped-query attention over one whole sequence: q [T, H, Hd], k and v [T, KV, Hd],
// out [T, H, Hd]; scores scaled by 1/sqrt(Hd); query head h reads kv head h / (H / KV). Saves
// the softmax probabilities [H, T, T] (row t holds positions 0..t, zeros above the diagonal)
// in probs for the backward: as floats, or where the attention runs in bf16 (the compute type
// is bf16 and the products are large enough) as bf16 values over probs' first bytes, since
// both products that read them round them anyway; attention_probs_floats(T, H, Hd) floats
// either way. H must be a multiple of KV.
int64_t attention_probs_floats(int64_t T, int64_t H, int64_t Hd);
void attention_train_forward(float* out, float* probs, const float* q, const float* k,
                             const float* v, int64_t T, int64_t H, int64_t KV, int64_t Hd);
void attention_train_forward_ref(float* out, float* probs, const float* q, const float* k,
                                 const float* v, int64_t T, int64_t H, int64_t KV, int64_t Hd);
// Gradients of attention_train_forward given dout [T, H, Hd] and its probs (saved under the
// same compute type): dq [T, H, Hd], dk and dv [T, KV, Hd] (overwritten; dk and dv sum over
// the query heads of each group). `scratch`
// holds at least attention_backward_scratch(T, H) floats: the score gradients of every head
// ([H, T, T], as probs), kept so that heads and row blocks run in parallel while each dk/dv
// row is still summed in a fixed order (results do not depend on the thread count). The
// reference ignores it.
int64_t attention_backward_scratch(int64_t T, int64_t H);
void attention_train_backward(float* dq, float* dk, float* dv, const float* dout,
                              const float* probs, const float* q, const float* k, const float* v,
                              int64_t T, int64_t H, int64_t KV, int64_t Hd, float* scratch);
void attention_train_backward_ref(float* dq, float* dk, float* dv, const float* dout,
                                  const float* probs, const float* q, const float* k,
                                  const float* v, int64_t T, int64_t H, int64_t KV, int64_t Hd,
                                  float* scratch);

// Given dout[N] of swiglu_forward: dgate[N], dup[N] (overwritten; dgate may alias dout).
void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                     const float* up, int64_t N);
void swiglu_backward_ref(float* dgate, float* dup, const float* dout, const float* gate,
                         const float* up, int64_t N);

// Cross-entropy of logits [T, V] against targets[T] (a target < 0 is ignored: no loss, zero
// gradient). Replaces the logits by their gradient times grad_scale: (softmax - onehot) *
// grad_scale, and writes each token's loss (natural log) to losses[T] (0 for ignored).
// Returns the sum of the losses, in double (summed in token order). A target >= V throws
// Error. Callers run it on chunks of tokens so that the whole [T, vocab] matrix never exists
// at once.
double cross_entropy_forward_backward(float* logits, float* losses, const int32_t* targets,
                                      int64_t T, int64_t V, float grad_scale);
double cross_entropy_forward_backward_ref(float* logits, float* losses, const int32_t* targets,
                                          int64_t T, int64_t V, float grad_scale);

}  // namespace qalora::ops
