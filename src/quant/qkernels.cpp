// Optimized quantized-linear kernels. Decode (few tokens) streams the packed codes once through
// a fused dequantize + dot product per row; prefill and training dequantize the weight into a
// scratch buffer and hand it to BLAS, so the dequantization cost is amortised over T tokens.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <vector>

#include "qalora/quant/qmatrix.h"

namespace qalora {

namespace {

// Up to this many tokens, the fused GEMV beats dequantize + GEMM.
constexpr int64_t kGemvMaxTokens = 4;

// One row dequantized: unpack the codes, then apply group parameters or the codebook.
void dequantize_row(const QMatrix& w, int64_t j, uint8_t* codes, float* out) {
  unpack_row(w.row_codes(j), w.cols, w.bits, codes);
  if (w.type == QuantType::Affine) {
    const int64_t L = w.n_groups();
    const float* s = w.scales.data() + j * L;
    const float* m = w.offsets.data() + j * L;
    if (w.g_idx.empty()) {
      for (int64_t g = 0; g < L; ++g) {
        const int64_t i1 = std::min(w.cols, (g + 1) * w.group_size);
        for (int64_t i = g * w.group_size; i < i1; ++i)
          out[i] = s[g] * static_cast<float>(codes[i]) + m[g];
      }
    } else {
      for (int64_t i = 0; i < w.cols; ++i) {
        const int32_t g = w.g_idx[i];
        out[i] = s[g] * static_cast<float>(codes[i]) + m[g];
      }
    }
    return;
  }
  const float* book = codebook(w.type);
  const int64_t base = j * w.cols;
  for (int64_t i = 0; i < w.cols; ++i)
    out[i] = book[codes[i]] * w.absmax[(base + i) / w.group_size];
}

thread_local std::vector<float> tl_weights;  // dequantized weight scratch

float* weight_scratch(int64_t n) {
  if (static_cast<int64_t>(tl_weights.size()) < n) tl_weights.resize(static_cast<size_t>(n));
  return tl_weights.data();
}

}  // namespace

const char* qkernel_isa() { return "portable"; }

void dequantize_rows(const QMatrix& w, int64_t r0, int64_t r1, float* out) {
#pragma omp parallel
  {
    std::vector<uint8_t> codes(static_cast<size_t>(w.cols));
#pragma omp for schedule(static)
    for (int64_t j = r0; j < r1; ++j) dequantize_row(w, j, codes.data(), out + (j - r0) * w.cols);
  }
}

void qmatmul_forward(float* y, const float* x, const QMatrix& w, const float* bias, int64_t T) {
  const int64_t O = w.rows, I = w.cols;
  if (T <= kGemvMaxTokens) {
#pragma omp parallel
    {
      std::vector<uint8_t> codes(static_cast<size_t>(I));
      std::vector<float> row(static_cast<size_t>(I));
#pragma omp for schedule(static)
      for (int64_t j = 0; j < O; ++j) {
        dequantize_row(w, j, codes.data(), row.data());
        for (int64_t t = 0; t < T; ++t) {
          const float* xt = x + t * I;
          float acc = 0.0f;
          for (int64_t i = 0; i < I; ++i) acc += row[i] * xt[i];
          y[t * O + j] = acc + (bias ? bias[j] : 0.0f);
        }
      }
    }
    return;
  }
  float* W = weight_scratch(O * I);
  dequantize_rows(w, 0, O, W);
  for (int64_t t = 0; t < T; ++t)
    if (bias) std::copy(bias, bias + O, y + t * O);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(T), static_cast<int>(O),
              static_cast<int>(I), 1.0f, x, static_cast<int>(I), W, static_cast<int>(I),
              bias ? 1.0f : 0.0f, y, static_cast<int>(O));
}

void qmatmul_backward_input(float* dx, const float* dy, const QMatrix& w, int64_t T) {
  const int64_t O = w.rows, I = w.cols;
  float* W = weight_scratch(O * I);
  dequantize_rows(w, 0, O, W);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(T), static_cast<int>(I),
              static_cast<int>(O), 1.0f, dy, static_cast<int>(O), W, static_cast<int>(I), 0.0f, dx,
              static_cast<int>(I));
}

}  // namespace qalora
