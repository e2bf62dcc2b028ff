// How much of a model is quantized and what its quantized linears take, for `qalora info`.
#pragma once

#include <cstdint>
#include <string>

#include "qalora/model/model.h"

namespace qalora {

struct QuantSummary {
  int64_t linears = 0;          // block linears (seven per block)
  int64_t quantized = 0;        // of which hold a QMatrix
  int64_t quantized_bytes = 0;  // QMatrix::storage_bytes() of those
  int64_t fp32_bytes = 0;       // the same weights as fp32
  std::string type;             // quant_type_name of the first quantized linear; "" when none
  int bits = 0;
};
QuantSummary quant_summary(const Model& model);

}  // namespace qalora
