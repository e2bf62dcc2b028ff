// Internal to the quantized kernels: the per-ISA kernel table the dispatcher in qkernels.cpp
// calls, and a switch for tests to force one ISA so every path is checked on one machine.
#pragma once

#include <cstdint>
#include <vector>

#include "qalora/quant/qmatrix.h"

namespace qalora::qk {

enum class Isa { Portable, Avx2, Avx512 };
const char* isa_name(Isa isa);
// Whether this CPU can run `isa` (Portable always).
bool isa_supported(Isa isa);
// The ISA the kernels use now: the best supported one unless forced.
Isa active_isa();
// Makes the kernels use `isa` until the next call (throws Error if unsupported); returns the
// previous one. Not thread-safe against kernels running concurrently: for tests and benches.
Isa force_isa(Isa isa);

// The fused GEMV's inputs, prepared once per call by the dispatcher and shared by all rows.
struct GemvArgs {
  const QMatrix* w = nullptr;
  const float* x = nullptr;  // [T, padded_cols], zero past cols (no tail masks needed)
  int64_t x_stride = 0;      // padded_cols
  int64_t L = 0;             // affine: w.n_groups()
  // Affine with chunk-aligned groups: [T, L] sums of x over each group.
  const float* xsum = nullptr;
  // Affine otherwise: the group of each column, [padded_cols] (column_groups).
  const int32_t* groups = nullptr;
  float* y = nullptr;           // [T, rows]
  const float* bias = nullptr;  // [rows] or null
  int64_t T = 0;                // 1..kGemvMaxTokens
};
inline constexpr int64_t kGemvMaxTokens = 4;

// Affine with contiguous groups that start on chunk boundaries (G % 32 == 0, or one group
// per row): one scale and offset per chunk, and the GEMV can use
// y_j = sum_g s[j,g] (q_jg . x_g) + m[j,g] sum(x_g). Other affine layouts (g_idx, odd G) look
// the parameters up per column.
bool affine_chunk_aligned(const QMatrix& w);

// The group of every column (w.g_idx, or i / group_size), zero-padded to padded_cols so whole
// chunks can be loaded; kept in `buf`.
const int32_t* column_groups(const QMatrix& w, std::vector<int32_t>& buf);

struct KernelTable {
  Isa isa;
  // Rows r0..r1-1 of y for any layout, single-threaded. Null: dequantize rows + dot instead.
  void (*gemv_rows)(const GemvArgs& a, int64_t r0, int64_t r1);
  // out[(j - r0) * cols + i] for rows r0..r1-1, any layout, single-threaded.
  void (*dequant_rows)(const QMatrix& w, int64_t r0, int64_t r1, float* out);
  // sum a[i] * b[i].
  float (*dot)(const float* a, const float* b, int64_t n);
};

extern const KernelTable kPortableTable;
extern const KernelTable kAvx2Table;
extern const KernelTable kAvx512Table;

}  // namespace qalora::qk
