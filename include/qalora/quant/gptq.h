// GPTQ (Frantar et al. 2022) for one linear layer: quantize W column by column, pushing each
// column's rounding error onto the columns not yet quantized through the inverse Hessian of the
// layer's inputs, so the layer output W X changes as little as possible (SPEC §3).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "qalora/quant/qmatrix.h"

namespace qalora {

struct GptqOptions {
  int bits = 4;
  int64_t group_size = 128;  // -1 = per channel
  bool sym = false;
  bool act_order = false;      // columns by decreasing diag(H)
  bool static_groups = false;  // with act_order: group parameters fixed up front, contiguous groups
  double damp = 0.01;          // fraction of mean(diag H) added to the diagonal
  int64_t block = 128;         // columns per lazy-update block
};

// Accumulates H = (2 / n) sum_t x_t x_t^T over the n input rows it is given.
class HessianAccumulator {
 public:
  explicit HessianAccumulator(int64_t cols);
  // x [T, cols] row-major: T more calibration rows (padding must be left out by the caller).
  void add(const float* x, int64_t T);
  int64_t cols() const { return cols_; }
  int64_t samples() const { return n_; }
  // The full symmetric [cols, cols] matrix, in double.
  std::vector<double> hessian() const;
  // H[a][b], from the accumulated upper triangle.
  double at(int64_t a, int64_t b) const {
    const int64_t i = std::min(a, b), j = std::max(a, b);
    return 2.0 / static_cast<double>(n_) * upper_[static_cast<size_t>(i * cols_ + j)];
  }

 private:
  int64_t cols_;
  int64_t n_ = 0;
  std::vector<float> upper_;  // sum x x^T, upper triangle, row-major
};

// U, upper triangular [n, n] row-major, with U^T U = (H + lambda I)^-1 and lambda = damp *
// mean(diag H): the factor GPTQ's sweep pushes rounding errors through. lambda grows 10x, up to
// four times, while H + lambda I is not positive definite; then Error.
std::vector<double> damped_inverse_cholesky(const std::vector<double>& H, int64_t n, double damp);

// What GPTQ needs from one Hessian, whatever the weight: the sweep order, the inverse factor and
// the dead columns. The linears that read the same input (q/k/v, gate/up) share one.
struct GptqFactor {
  int64_t cols = 0;
  std::vector<int64_t> perm;   // sweep position -> column (identity without act-order)
  bool act_order = false;      // perm sorts columns by decreasing diag(H)
  std::vector<uint8_t> dead;   // per column: no calibration input reached it
  std::vector<double> added;   // per sweep position: what the factored H' adds to diag(H)
  std::vector<float> U;        // [cols, cols] upper, U^T U = H'^-1, rows and columns in sweep order
};

// H [cols, cols] from HessianAccumulator::hessian(). Throws Error on inconsistent options or
// when H cannot be factored even after extra damping.
GptqFactor gptq_factor(const std::vector<double>& H, int64_t cols, const GptqOptions& options);
// The same from the accumulated sums, without a double copy of H (cols^2 * 8 B).
GptqFactor gptq_factor(const HessianAccumulator& acc, const GptqOptions& options);

struct GptqResult {
  QMatrix q;
  // sqrt(tr(dW H dW^T) / tr(W H W^T)), dW = W - dequantize(q), H undamped: the relative output
  // error on the calibration inputs, as relative_output_error computes it, but from the sweep's
  // own rounding errors (their squares sum to tr(dW H' dW^T) for the damped H') and one
  // triangular solve: rows * cols^2 flops instead of two GEMMs' 4 * rows * cols^2.
  double relative_error = 0;
};

// W [rows, cols] fp32 row-major, quantized with the factor of its inputs' Hessian.
GptqResult gptq_quantize(const float* W, int64_t rows, const GptqFactor& factor,
                         const GptqOptions& options);
// One linear on its own: gptq_quantize(W, rows, gptq_factor(H, cols, options), options).
GptqResult gptq_quantize(const float* W, int64_t rows, int64_t cols, const std::vector<double>& H,
                         const GptqOptions& options);

}  // namespace qalora
