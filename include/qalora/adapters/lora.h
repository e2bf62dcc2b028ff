// The adapter's forward and backward (SPEC §4), the ops a training backend implements for
// adapters. Shapes as in adapter.h. Dropout masks are not stored: they are a pure function of
// (dropout_seed, token, column), so the backward and a recomputed forward regenerate them.
#pragma once

#include <cstdint>
#include <vector>

#include "qalora/adapters/adapter.h"
#include "qalora/ops/gemm.h"

namespace qalora {

// P(x): out[T, L] = per-group mean (Average, over the group's true size) or sum (Sum) of
// x[T, I] over consecutive groups of G columns (the last group may be smaller).
void pool_groups_forward(float* out, const float* x, int64_t T, int64_t I, int64_t G,
                         AdapterPool pool);
void pool_groups_forward_ref(float* out, const float* x, int64_t T, int64_t I, int64_t G,
                             AdapterPool pool);
// The adjoint of P: dx[T, I] += dout[T, L] spread over each group (divided by |l| for Average).
void pool_groups_backward(float* dx, const float* dout, int64_t T, int64_t I, int64_t G,
                          AdapterPool pool);
void pool_groups_backward_ref(float* dx, const float* dout, int64_t T, int64_t I, int64_t G,
                              AdapterPool pool);

// Inverted dropout applied in place to x[T, C]: element (t, c) is kept with probability 1 - p
// and scaled by 1 / (1 - p); which elements are kept depends only on (seed, t, c). p = 0 is a
// no-op.
void dropout_forward(float* x, int64_t T, int64_t C, float p, uint64_t seed);
// Its plain reference: every element's hash drawn on its own.
void dropout_forward_ref(float* x, int64_t T, int64_t C, float p, uint64_t seed);

// The dropout of an adapter's input rows. The rows are runs, one per sequence packed into the
// pass, each drawing its mask from its own seed with its rows numbered from 0: a sequence's
// mask does not depend on what it is packed with.
struct DropoutRun {
  int64_t rows;
  uint64_t seed;
};
struct AdapterDropout {
  float p = 0.0f;
  std::vector<DropoutRun> runs;  // covering the T rows in order; may be empty when p = 0
  static AdapterDropout single(float p, uint64_t seed, int64_t T) { return {p, {{T, seed}}}; }
};
// dropout_forward over each run of x[T, C].
void dropout_forward(float* x, int64_t T, int64_t C, const AdapterDropout& dropout);

// Saved by lora_forward for lora_backward.
//   u [T, r] = xin A^T, where xin [T, C] = dropout(x) (LoRA) or dropout(P(x)) (QA-LoRA).
// y[T, O] += scale * u B^T. `u` must hold T * r floats. `scratch` must hold T * C floats (it
// receives xin). No dropout at inference ({}).
void lora_forward(const LoraAdapter& a, float scale, const float* x, int64_t T,
                  const AdapterDropout& dropout, float* y, float* u, float* scratch);
void lora_forward_ref(const LoraAdapter& a, float scale, const float* x, int64_t T,
                      const AdapterDropout& dropout, float* y, float* u, float* scratch);

// Given dy [T, O], the forward's input x [T, I] and its saved u [T, r], with
// g = scale * dy B [T, r] and xin regenerated from x:
//   grad_B [O, r] += scale * dy^T u;  grad_A [r, C] += g^T xin;
//   dx [T, I] += E(dropout'(g A))  (dropout' = the forward's mask and 1 / (1 - p); E = the
//   pooling adjoint pool_groups_backward for QA-LoRA, identity for LoRA).
// Accumulates into a.grad_A and a.grad_B (which must be allocated) and into dx. `scratch`
// must hold lora_scratch_floats(a, T) floats. The products that read dy use its bf16 copy, if
// it has one, where they run in bf16.
// The scratch lora_forward and lora_backward need over T rows: T * (2 C + r) floats (LoRA's
// backward with dropout keeps both the input gradient and the recomputed input).
int64_t lora_scratch_floats(const LoraAdapter& a, int64_t T);
void lora_backward(LoraAdapter& a, float scale, const ops::Operand& dy, const float* x,
                   const float* u, int64_t T, const AdapterDropout& dropout, float* dx,
                   float* scratch);
void lora_backward_ref(LoraAdapter& a, float scale, const float* dy, const float* x, const float* u,
                       int64_t T, const AdapterDropout& dropout, float* dx, float* scratch);

}  // namespace qalora
