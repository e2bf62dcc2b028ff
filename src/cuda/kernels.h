// The ops of the training step on the GPU: one launcher per kernel, each the twin of the CPU op
// of the same name (src/ops/ops.h, src/adapters/lora.h) with the same shapes and meaning, and
// tested against that op's reference (tests/cuda). Pointers are GPU memory; launches go to the
// default stream, in order. Shapes: T tokens, D model dim, H query heads, KV key/value heads,
// Hd head dim, V vocabulary, I input features, G group size.
#pragma once

#include <cstdint>

namespace qalora::cuda {

// ---- elementwise.cu
void rmsnorm_forward(float* out, const float* x, const float* w, int64_t T, int64_t D, float eps);
// dx[T, D] += the input gradient (accumulates, as the CPU op).
void rmsnorm_backward(float* dx, const float* dout, const float* x, const float* w, int64_t T,
                      int64_t D, float eps);
// In place on x [T, H, Hd], token t at positions[t]; tables [positions, Hd / 2].
void rope_forward(float* x, int64_t T, int64_t H, int64_t Hd, const int32_t* positions,
                  const float* cos_table, const float* sin_table);
void rope_backward(float* dx, int64_t T, int64_t H, int64_t Hd, const int32_t* positions,
                   const float* cos_table, const float* sin_table);
void swiglu_forward(float* out, const float* gate, const float* up, int64_t N);
// dgate may alias dout.
void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                     const float* up, int64_t N);
void add_into(float* y, const float* x, int64_t n);                // y += x
void add_bias(float* y, const float* bias, int64_t T, int64_t O);  // y[t, o] += bias[o]
void to_bf16(const float* x, uint16_t* out, int64_t n);            // round to nearest even

// ---- attention.cu: causal GQA over packed sequences without a [T, T] matrix in memory: token
// t belongs to the sequence of rows [seq_begin[t], seq_end[t]) and attends to rows
// seq_begin[t]..t. The forward keeps each row's log-sum-exp lse [H, T] instead of the
// probabilities; the backward recomputes them. q, out, dq, dout [T, H, Hd]; k, v, dk, dv
// [T, KV, Hd]; Hd <= 256.
void attention_forward(float* out, float* lse, const float* q, const float* k, const float* v,
                       const int32_t* seq_begin, int64_t T, int64_t H, int64_t KV, int64_t Hd);
// `delta` [H, T] is scratch. dq, dk, dv are overwritten.
void attention_backward(float* dq, float* dk, float* dv, float* delta, const float* dout,
                        const float* out, const float* lse, const float* q, const float* k,
                        const float* v, const int32_t* seq_begin, const int32_t* seq_end, int64_t T,
                        int64_t H, int64_t KV, int64_t Hd);

// ---- cross_entropy.cu: as ops::cross_entropy_forward_backward; targets (all < V) in GPU
// memory, losses [T] written (0 where the target is < 0).
void cross_entropy(float* logits, float* losses, const int32_t* targets, int64_t T, int64_t V,
                   float grad_scale);

// ---- lora.cu
void pool_groups_forward(float* out, const float* x, int64_t T, int64_t I, int64_t G, bool average);
void pool_groups_backward(float* dx, const float* dout, int64_t T, int64_t I, int64_t G,
                          bool average);  // dx +=
void dropout_forward(float* x, int64_t T, int64_t C, float p, uint64_t seed);

// ---- dequantize.cu: a QMatrix (qalora/quant/qmatrix.h) whose arrays are in GPU memory.
struct QMatrixView {
  bool affine = true;  // else a 16-entry codebook (NF4 / FP4) times absmax per block
  int bits = 4;
  int64_t rows = 0, cols = 0, row_bytes = 0;
  int64_t group_size = 0;  // affine: columns per group; codebook: absmax block
  int64_t n_groups = 0;    // affine: groups per row
  const uint8_t* codes = nullptr;
  const float* scales = nullptr;   // affine [rows, n_groups]
  const float* offsets = nullptr;  // affine [rows, n_groups]
  const int32_t* g_idx = nullptr;  // affine: [cols] or null (contiguous groups)
  const float* absmax = nullptr;   // codebook [ceil(rows * cols / group_size)]
  float codebook[16] = {};
};
// out [rows, cols] bf16 = the dequantized matrix, rounded to nearest even.
void dequantize_bf16(const QMatrixView& w, uint16_t* out);

}  // namespace qalora::cuda
