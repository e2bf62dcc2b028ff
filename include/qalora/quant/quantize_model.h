// Quantizing a whole model: the seven linear layers of every block, with RTN, GPTQ (true
// sequential, on calibration activations that flow through the already-quantized layers),
// NF4/FP4 or INT8. Embeddings, norms and the output head keep their precision.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "qalora/model/model.h"
#include "qalora/quant/gptq.h"

namespace qalora {

struct QuantizeOptions {
  std::string method = "rtn";  // rtn, gptq, nf4, fp4, int8
  int bits = 4;
  int64_t group_size = 128;    // -1 = per channel
  bool sym = false;
  bool act_order = false;      // GPTQ only
  bool static_groups = false;  // GPTQ with act_order only
  double damp = 0.01;          // GPTQ only
  bool double_quant = false;   // NF4/FP4 only
};

// Throws Error naming the option for impossible combinations (bits for the method, group size,
// act-order without GPTQ, static groups without act-order, damp out of range, ...).
void validate_quantize_options(const QuantizeOptions& options);

// `samples` windows of `length` tokens at random offsets (fixed by `seed`) of `tokens`.
// Throws when the text holds fewer than `length` tokens.
std::vector<std::vector<int32_t>> calibration_windows(const std::vector<int32_t>& tokens,
                                                      int64_t samples, int64_t length,
                                                      uint64_t seed, const std::string& source);

// What one quantized layer reports: its name, seconds, and the relative output error
// sqrt(tr(dW H dW^T) / tr(W H W^T)) on the calibration inputs (GPTQ; -1 when unknown).
struct LayerReport {
  int64_t layer = 0;
  std::string name;
  double seconds = 0;
  double relative_error = -1;
};
using LayerCallback = std::function<void(const LayerReport&)>;
// Called once block `index` is quantized and no longer needed by the quantizer: a streaming
// caller writes it out and may empty it.
using BlockCallback = std::function<void(int64_t index, LayerWeights& block)>;
// Called with block `index` before it is quantized: a caller may change its weights first (merge
// an adapter into them), so that only one block is ever held in fp32.
using BeforeBlock = BlockCallback;

// Arithmetic a quantization did, for its GFLOP/s. GPTQ counts the calibration forward
// (linears, attention), the Hessians, each linear's factorization, column sweep and error
// measure; RTN, NF4/FP4 and INT8 only read and round (0).
struct QuantizeWork {
  double flops = 0;
};

// Replaces every block linear's weight by its quantized form, block by block, and records
// model.quant. GPTQ needs `calibration` (token windows) and runs them through the model one
// block at a time; other methods ignore it. Throws Error naming the layer, linear and element
// of the first nan/inf weight.
QuantizeWork quantize_model(Model& model, const QuantizeOptions& options,
                            const std::vector<std::vector<int32_t>>& calibration,
                            const LayerCallback& on_layer = {}, const BlockCallback& on_block = {},
                            const BeforeBlock& before_block = {});

// sqrt(tr((W - Q) H (W - Q)^T) / tr(W H W^T)): ||W X - Q X|| / ||W X|| over the inputs that
// built H = (2/n) X^T X. W, Q [rows, cols]; H [cols, cols]. The plain reference for the error
// gptq_quantize derives from its sweep.
double relative_output_error(const float* W, const float* Q, int64_t rows, int64_t cols,
                             const std::vector<double>& H);

}  // namespace qalora
