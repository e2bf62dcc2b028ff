// Reordering the rows (output features) of a QMatrix, e.g. the RoPE layout change of q_proj /
// k_proj. Each row moves with its codes and its group parameters, so the result dequantizes to
// the same rows in the new order, bit for bit.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "qalora/quant/qmatrix.h"

namespace qalora {

// Why the rows of `w` cannot be reordered exactly by `src_row` (row r of the result = row
// src_row[r]); empty when they can. Affine matrices always can. NF4/FP4 need rows that own whole
// absmax blocks (cols % 64 == 0), and with double quantization every absmax constant must stay
// in its block of 256: its 8-bit code only means something next to that block's scale.
std::string row_permutation_problem(const QMatrix& w, std::span<const int64_t> src_row);

// Row r of the result is row src_row[r] of `w`; throws Error "<context>: <problem>" otherwise.
// The codes and group parameters are copied when first read (derived ByteBuffers), so that a
// mapped or lazily repacked matrix stays one that costs memory only while a pass uses it.
QMatrix permute_rows(const QMatrix& w, std::span<const int64_t> src_row, std::string_view context);

}  // namespace qalora
