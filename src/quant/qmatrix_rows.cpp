#include "qalora/quant/qmatrix_rows.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "qalora/core/error.h"

namespace qalora {

namespace {

// Copies row `from` of a [rows, n] array to row `to` of another.
template <typename Src, typename Dst>
void copy_row(const Src& src, Dst& dst, int64_t n, int64_t from, int64_t to) {
  std::copy_n(src.data() + from * n, n, dst.data() + to * n);
}

// The rows of `src` ([rows, row_bytes]) in the order src_row, copied when first read, so a
// mapped or repacked source costs memory only while a pass uses it (as the source would).
ByteBuffer permuted_rows(const ByteBuffer& src, int64_t row_bytes,
                         std::shared_ptr<const std::vector<int64_t>> src_row) {
  return ByteBuffer::derived(
      src.size(),
      [src, row_bytes, src_row](uint8_t* out) {
        const uint8_t* in = src.data();
        for (size_t r = 0; r < src_row->size(); ++r)
          std::memcpy(out + static_cast<int64_t>(r) * row_bytes, in + (*src_row)[r] * row_bytes,
                      static_cast<size_t>(row_bytes));
      },
      [src] { src.release_pages(); });
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
  const auto order = std::make_shared<const std::vector<int64_t>>(src_row.begin(), src_row.end());
  out.codes = permuted_rows(w.codes, w.row_bytes(), order);
  if (w.type == QuantType::Affine) {
    const auto params = [&](const GroupParams& p) {
      const ByteBuffer bytes = permuted_rows(p.buffer(), p.byte_size() / w.rows, order);
      return p.is_half() ? GroupParams::half(bytes) : GroupParams::single(bytes);
    };
    out.scales = params(w.scales);
    out.offsets = params(w.offsets);
    return out;
  }
  const int64_t per_row = w.cols / kCodebookBlock;
  for (int64_t r = 0; r < w.rows; ++r) {
    copy_row(w.absmax, out.absmax, per_row, src_row[r], r);
    if (!w.absmax_dq.empty())
      copy_row(w.absmax_dq.codes, out.absmax_dq.codes, per_row, src_row[r], r);
  }
  return out;
}

}  // namespace qalora
