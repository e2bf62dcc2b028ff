#include "qalora/quant/qmatrix_rows.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "qalora/core/error.h"

namespace qalora {

namespace {

// Copies row `from` of a [rows, n] array to row `to` of another.
template <typename Src, typename Dst>
void copy_row(const Src& src, Dst& dst, int64_t n, int64_t from, int64_t to) {
  std::copy_n(src.data() + from * n, n, dst.data() + to * n);
}

}  // namespace

std::string row_permutation_problem(const QMatrix& w, std::span<const int64_t> src_row) {
  if (static_cast<int64_t>(src_row.size()) != w.rows)
    return cat("the row order has ", src_row.size(), " entries, the matrix ", w.rows, " rows");
  std::vector<bool> seen(static_cast<size_t>(w.rows), false);
  for (const int64_t r : src_row) {
    if (r < 0 || r >= w.rows || seen[r])
      return cat("the row order is not a permutation of 0..", w.rows - 1);
    seen[r] = true;
  }
  if (w.type == QuantType::Affine) return {};
  if (w.cols % kCodebookBlock != 0)
    return cat(quant_type_name(w.type), " absmax blocks of ", kCodebookBlock,
               " elements straddle rows of ", w.cols, " columns (", w.cols, " % ", kCodebookBlock,
               " != 0), so rows cannot move on their own");
  if (!w.absmax_dq.empty()) {
    const int64_t per_row = w.cols / kCodebookBlock;
    for (int64_t r = 0; r < w.rows; ++r)
      for (int64_t b = 0; b < per_row; ++b)
        if ((src_row[r] * per_row + b) / DoubleQuant::kBlock !=
            (r * per_row + b) / DoubleQuant::kBlock)
          return cat("double-quantized absmax constants of row ", src_row[r], " would move to row ",
                     r, " in another block of ", DoubleQuant::kBlock,
                     " constants, whose scale cannot decode them");
  }
  return {};
}

QMatrix permute_rows(const QMatrix& w, std::span<const int64_t> src_row, std::string_view context) {
  const std::string problem = row_permutation_problem(w, src_row);
  if (!problem.empty()) fail(context, ": ", problem);
  QMatrix out = w;
  const int64_t L = w.n_groups(), per_row = w.cols / kCodebookBlock;
  // Group parameters move in fp32 and return to fp16 when they came as fp16.
  const std::vector<float> scales = w.scales.to_vector(), offsets = w.offsets.to_vector();
  std::vector<float> out_scales(scales.size()), out_offsets(offsets.size());
  for (int64_t r = 0; r < w.rows; ++r) {
    const int64_t from = src_row[r];
    copy_row(w.codes, out.codes, w.row_bytes(), from, r);
    if (w.type == QuantType::Affine) {
      copy_row(scales, out_scales, L, from, r);
      copy_row(offsets, out_offsets, L, from, r);
    } else {
      copy_row(w.absmax, out.absmax, per_row, from, r);
      if (!w.absmax_dq.empty()) copy_row(w.absmax_dq.codes, out.absmax_dq.codes, per_row, from, r);
    }
  }
  if (w.type == QuantType::Affine) {
    out.scales = std::move(out_scales);
    out.offsets = std::move(out_offsets);
    if (w.scales.is_half()) out.scales.to_half_if_exact();
    if (w.offsets.is_half()) out.offsets.to_half_if_exact();
  }
  return out;
}

}  // namespace qalora
