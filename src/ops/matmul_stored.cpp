#include "qalora/ops/matmul_stored.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "qalora/core/reused_buffer.h"
#include "qalora/ops/gemm.h"
#include "qalora/ops/ops.h"

namespace qalora::ops {

namespace {

// Decoded rows per GEMM tile: about 4 MiB of fp32, enough for BLAS to run near its peak and
// small next to any layer. The decode GEMV works on 16-row blocks that stay in L1/L2.
constexpr int64_t kTileFloats = int64_t{1} << 20;
constexpr int64_t kGemvRows = 16;
constexpr int64_t kGemvMaxTokens = 4;

int64_t tile_rows(int64_t cols) {
  return std::max<int64_t>(kGemvRows, kTileFloats / std::max<int64_t>(cols, 1));
}

// Decode: each thread takes its own blocks of rows and dots them with the few token vectors
// straight from their storage, so the weight is read once.
void gemv_encoded(float* y, const float* x, const Tensor& W, int64_t T) {
  const int64_t O = W.dim(0);
  const int64_t blocks = (O + kGemvRows - 1) / kGemvRows;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t r0 = b * kGemvRows, r1 = std::min(O, r0 + kGemvRows);
    W.dot_rows(r0, r1, x, T, y + r0, O);
  }
}

// out[(r1 - r0), I] = rows r0..r1-1 as fp32.
void decode_f32_rows(const Tensor& W, int64_t r0, int64_t r1, float* out) {
  const int64_t n = W.row_len();
#pragma omp parallel for schedule(static)
  for (int64_t r = r0; r < r1; ++r) W.decode_rows(r, r + 1, out + (r - r0) * n);
}

// The same in bf16, each row decoded into an fp32 row kept in cache and rounded there: one pass
// over the output, where an fp32 tile would be written, then read again by the product's
// conversion.
void decode_bf16_rows(const Tensor& W, int64_t r0, int64_t r1, uint16_t* out) {
  const int64_t I = W.row_len();
#pragma omp parallel
  {
    thread_local std::vector<float> row;
    float* decoded = reused_buffer(row, I);
#pragma omp for schedule(static)
    for (int64_t r = r0; r < r1; ++r) {
      W.decode_rows(r, r + 1, decoded);
      to_bf16(decoded, 1, I, I, out + (r - r0) * I);
    }
  }
}

// Calls body(r0, n, tile) for each run of n rows from r0, decoded into `tile` [n, I] of fp32
// (T = float) or bf16 (T = uint16_t). BF16 rows in order come as stored, in one tile.
template <typename T, typename Body>
void for_each_tile(const Tensor& W, Body&& body) {
  const int64_t O = W.dim(0), I = W.dim(1);
  if constexpr (std::is_same_v<T, uint16_t>)
    if (const uint16_t* stored = W.bf16_values()) return body(0, O, stored);
  thread_local std::vector<T> tile;
  const int64_t R = std::min(O, tile_rows(I));
  T* out = reused_buffer(tile, R * I);
  for (int64_t r0 = 0; r0 < O; r0 += R) {
    const int64_t n = std::min(R, O - r0);
    if constexpr (std::is_same_v<T, uint16_t>)
      decode_bf16_rows(W, r0, r0 + n, out);
    else
      decode_f32_rows(W, r0, r0 + n, out);
    body(r0, n, static_cast<const T*>(out));
  }
}

}  // namespace

void matmul_forward(float* y, const float* x, const Tensor& W, const float* bias, int64_t T) {
  const int64_t O = W.dim(0), I = W.dim(1);
  if (!W.encoded()) return matmul_forward(y, x, W.data(), bias, T, I, O);
  if (T <= kGemvMaxTokens) {
    gemv_encoded(y, x, W, T);
  } else if (use_bf16(T, O, I)) {
    for_each_tile<uint16_t>(W, [&](int64_t r0, int64_t n, const uint16_t* tile) {
      gemm_bf16(false, true, T, n, I, 1.0f, x, I, {nullptr, tile}, I, 0.0f, y + r0, O);
    });
  } else {
    for_each_tile<float>(W, [&](int64_t r0, int64_t n, const float* tile) {
      gemm(false, true, T, n, I, 1.0f, x, I, tile, I, 0.0f, y + r0, O);
    });
  }
  if (bias != nullptr)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t o = 0; o < O; ++o) y[t * O + o] += bias[o];
}

void matmul_backward_input(float* dx, const Operand& dy, const Tensor& W, int64_t T,
                           bool accumulate) {
  const int64_t O = W.dim(0), I = W.dim(1);
  if (!W.encoded()) return matmul_backward_input(dx, dy, W.data(), T, I, O, accumulate);
  // dx (+)= dy[:, r0:r0+n] W[r0:r0+n, :] for each tile.
  if (use_bf16(T, I, O))
    for_each_tile<uint16_t>(W, [&](int64_t r0, int64_t n, const uint16_t* tile) {
      gemm_bf16(false, false, T, I, n, 1.0f, dy.at(r0), O, {nullptr, tile}, I,
                r0 == 0 && !accumulate ? 0.0f : 1.0f, dx, I);
    });
  else
    for_each_tile<float>(W, [&](int64_t r0, int64_t n, const float* tile) {
      gemm(false, false, T, I, n, 1.0f, dy.at(r0), O, tile, I, r0 == 0 && !accumulate ? 0.0f : 1.0f,
           dx, I);
    });
}

void to_bf16(const Tensor& W, uint16_t* out) {
  const int64_t I = W.dim(1);
  if (!W.encoded()) return to_bf16(W.data(), W.dim(0), I, I, out);
  if (const uint16_t* w16 = W.bf16_values()) {
    std::copy_n(w16, W.numel(), out);
    return;
  }
  decode_bf16_rows(W, 0, W.dim(0), out);
}

}  // namespace qalora::ops
