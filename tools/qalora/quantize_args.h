// The quantization options shared by `quantize` and `merge --requantize`: method, bits, group
// size and GPTQ's calibration text, with the method-dependent defaults.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <string>
#include <vector>

#include "qalora/model/model.h"
#include "qalora/quant/quantize_model.h"

namespace qalora::cli {

struct QuantizeArgs {
  QuantizeOptions options;
  CLI::Option* bits = nullptr;
  CLI::Option* group_size = nullptr;
  std::string calib;
  int64_t calib_samples = 128;
  int64_t calib_len = 2048;
  uint64_t seed = 0;
};

// --bits, --group-size, --sym, --act-order, --static-groups, --damp, --double-quant, --calib,
// --calib-samples, --calib-len, --seed. The method option is the caller's (its name differs).
void add_quantize_args(CLI::App* cmd, QuantizeArgs& args);

// Applies the method's defaults where not given (bits 4, int8: 8; group 128, nf4/fp4 blocks of
// 64, int8 per channel) and validates the combination.
void resolve_quantize_args(QuantizeArgs& args);

// GPTQ's calibration windows from --calib (records their source in model.quant.calibration
// after quantize_model); empty for the other methods, which refuse --calib.
std::vector<std::vector<int32_t>> load_calibration(const QuantizeArgs& args, const Model& model);

// Quantizes the model's linears with a progress bar; `metrics` (optional JSONL path) gets one
// line per linear; `on_block` and `before_block` (optional) are quantize_model's.
// Prints the method, size, bits per weight and mean GPTQ output error.
void quantize_with_progress(Model& model, const QuantizeArgs& args,
                            const std::vector<std::vector<int32_t>>& calibration,
                            const std::string& metrics, const BlockCallback& on_block = {},
                            const BeforeBlock& before_block = {});

}  // namespace qalora::cli
