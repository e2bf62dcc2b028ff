// Products with a frozen weight in whatever form its file stores it (see Tensor::encoded).
// Plain fp32 weights go straight to ops::matmul_*; encoded ones (F16, BF16, ggml blocks) are
// decoded a tile of rows at a time into a reused buffer (in bf16 where the product runs in bf16;
// BF16 rows are read as stored), so no fp32 copy of W ever exists and memory grows with one
// tile, not with the model. The reference for both is the plain kernel on
// W.decoded().
#pragma once

#include <cstdint>

#include "qalora/core/tensor.h"
#include "qalora/ops/gemm.h"

namespace qalora::ops {

// y[T, O] = x[T, I] W[O, I]^T (+ bias[O]); bias may be null.
void matmul_forward(float* y, const float* x, const Tensor& W, const float* bias, int64_t T);
// dx[T, I] = dy[T, O] W[O, I] (+= with `accumulate`); dy's bf16 copy is used where the product
// runs in bf16.
void matmul_backward_input(float* dx, const Operand& dy, const Tensor& W, int64_t T,
                           bool accumulate = false);
// out[O, I] = W in bf16 (to_bf16's rounding), encoded rows decoded a row at a time.
void to_bf16(const Tensor& W, uint16_t* out);

}  // namespace qalora::ops
