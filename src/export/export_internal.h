// Helpers shared by the exporters (src/export/*.cpp).
#pragma once

#include <cstdint>
#include <string>

#include "qalora/core/fp16.h"
#include "qalora/export/export.h"

namespace qalora::exporting {

// Adds the element-wise differences `written - model` of n values to the tensor's statistics.
void add_difference(TensorExport& t, const float* model, const float* written, int64_t n);

// "affine 4-bit g32", "affine 4-bit g32 act-order", "nf4", or "f32" for a dense weight.
std::string describe(const QMatrix* q);


}  // namespace qalora::exporting
