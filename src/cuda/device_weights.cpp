#include "device_weights.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "qalora/ops/gemm.h"

namespace qalora::cuda {

DeviceQMatrix::DeviceQMatrix(const QMatrix& w) {
  w.validate("cuda upload");
  codes.upload({w.codes.data(), w.codes.size()});
  view.rows = w.rows, view.cols = w.cols, view.bits = w.bits, view.row_bytes = w.row_bytes();
  view.group_size = w.group_size;
  view.affine = w.type == QuantType::Affine;
  if (view.affine) {
    scales.upload(w.scales.to_vector());
    offsets.upload(w.offsets.to_vector());
    g_idx.upload(w.g_idx);
    view.n_groups = w.n_groups();
    view.scales = scales.data(), view.offsets = offsets.data();
    view.g_idx = w.g_idx.empty() ? nullptr : g_idx.data();
  } else {
    absmax.upload(w.absmax);
    view.absmax = absmax.data();
    std::memcpy(view.codebook, codebook(w.type), sizeof view.codebook);
  }
  view.codes = codes.data();
}

DeviceBuffer<uint16_t> upload_bf16(const Tensor& w) {
  const int64_t rows = w.rows(), cols = w.row_len();
  DeviceBuffer<uint16_t> out(rows * cols);
  const int64_t step = std::max<int64_t>(1, (int64_t{1} << 22) / std::max<int64_t>(cols, 1));
  std::vector<float> f32(static_cast<size_t>(std::min(step, rows) * cols));
  std::vector<uint16_t> bf16(f32.size());
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    const int64_t n = std::min(step, rows - r0);
    w.decode_rows(r0, r0 + n, f32.data());
    ops::to_bf16(f32.data(), n, cols, cols, bf16.data());
    QL_CUDA(cudaMemcpy(out.data() + r0 * cols, bf16.data(),
                       static_cast<size_t>(n * cols) * sizeof(uint16_t), cudaMemcpyHostToDevice));
  }
  return out;
}

}  // namespace qalora::cuda
