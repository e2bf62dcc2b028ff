// Helpers shared by the exporters (src/export/*.cpp).
#pragma once

#include <cstdint>
#include <string>

#include "qalora/core/fp16.h"
#include "qalora/export/export.h"

namespace qalora::exporting {

// Adds the element-wise differences `written - model` of n values to the tensor's statistics.
void add_difference(TensorExport& t, const float* model, const float* written, int64_t n);

// "affine 4-bit g32", "affine 4-bit g32 act-order", "nf4", or "f32" for a dense weight.
std::string describe(const QMatrix* q);

inline float fp16_round(float v) {
  return fp16_to_fp32(fp32_to_fp16(v));
}

// The q/k rows of a linear's weight (dense or quantized) and bias moved between RoPE layouts.
Linear rope_permuted(const Linear& lin, int64_t n_heads, int64_t head_dim, bool to_hf);

}  // namespace qalora::exporting
