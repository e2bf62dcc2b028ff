// Frozen weights on the GPU: quantized matrices keep their packed codes and group parameters
// (dequantized to bf16 per use, dequantize.cu); dense ones become bf16 copies.
#pragma once

#include "kernels.h"
#include "qalora/core/tensor.h"
#include "qalora/quant/qmatrix.h"
#include "runtime.h"

namespace qalora::cuda {

struct DeviceQMatrix {
  DeviceBuffer<uint8_t> codes;
  DeviceBuffer<float> scales, offsets, absmax;
  DeviceBuffer<int32_t> g_idx;
  QMatrixView view;  // points into the buffers above
  explicit DeviceQMatrix(const QMatrix& w);
};

// A dense [rows, cols] tensor of any stored type as bf16 (rounded to nearest even), converted
// on the host a few rows at a time.
DeviceBuffer<uint16_t> upload_bf16(const Tensor& w);

}  // namespace qalora::cuda
