// Weight quantizers that need no data: round-to-nearest affine (RTN), INT8 per-row absmax and
// the NF4/FP4 codebooks. GPTQ (gptq.h) builds on the same affine group parameters.
#pragma once

#include <cstdint>
#include <functional>

#include "qalora/quant/qmatrix.h"

namespace qalora {

// Scale and offset of one affine group, already rounded to fp16 (their storage precision).
struct AffineParams {
  float scale = 1.0f;
  float offset = 0.0f;
};

// Min-max parameters of n values (stride apart) per SPEC §3: the range always includes 0;
// sym centres it (zero point 2^(bits-1)); a zero range uses scale 1.
AffineParams affine_params(const float* w, int64_t n, int64_t stride, int bits, bool sym);
// The code of w against stored parameters: clamp(round((w - offset) / scale), 0, 2^bits - 1).
uint8_t affine_code(float w, const AffineParams& p, int bits);
// affine_code of w[0..n) into codes[0..n): the same codes, in vectors where the build has
// AVX-512.
void affine_codes(const float* w, int64_t n, const AffineParams& p, int bits, uint8_t* codes);

// Group size argument: -1 means one group per row (per channel).
int64_t resolve_group_size(int64_t group_size, int64_t cols);

// Row j of a weight in fp32: a pointer into an fp32 matrix, or `scratch` ([cols] floats)
// holding the row decoded from its stored form. Called from several threads at once.
using WeightRows = std::function<const float*(int64_t j, float* scratch)>;

// W [rows, cols] row-major, fp32; every value must be finite (throws naming `name`).
QMatrix quantize_rtn(const float* w, int64_t rows, int64_t cols, int bits, int64_t group_size,
                     bool sym);
// The same from rows given one at a time (quantizing a stored fp16 weight row by row makes no
// fp32 copy of the matrix).
QMatrix quantize_rtn(const WeightRows& row, int64_t rows, int64_t cols, int bits,
                     int64_t group_size, bool sym);
// quantize_rtn one value at a time, without vectors: the definition the optimized one is
// tested against.
QMatrix quantize_rtn_ref(const float* w, int64_t rows, int64_t cols, int bits, int64_t group_size,
                         bool sym);
// 8-bit weight-only per-row absmax: s = absmax / 127, codes round(w / s) + 128.
QMatrix quantize_int8(const float* w, int64_t rows, int64_t cols);
QMatrix quantize_int8(const WeightRows& row, int64_t rows, int64_t cols);
// NF4 or FP4 with absmax blocks of 64 over the flattened weight; with double_quant the absmax
// constants are 8-bit quantized first and the codes are chosen against the decoded values.
QMatrix quantize_codebook(QuantType type, const float* w, int64_t rows, int64_t cols,
                          bool double_quant);

// Throws Error "<name>: weight [row, col] is nan/inf" for the first non-finite value.
void check_finite(const float* w, int64_t rows, int64_t cols, std::string_view name);
// The first column of row[0..cols) that is not finite, or -1.
int64_t first_non_finite(const float* row, int64_t cols);

}  // namespace qalora
