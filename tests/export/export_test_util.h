// Helpers of the export tests: models to export, logits, bit-exact comparisons and reading
// an export back with gguf-py.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "model/random_model.h"
#include "qalora/adapters/adapter.h"
#include "qalora/core/tensor.h"
#include "qalora/model/model.h"

namespace qalora::test {

// dim 64, hidden 96, 4 heads and 2 kv heads of 16: every size a multiple of 32, so every linear
// fits Q4_1 / Q8_0 blocks and GPTQ's int32 words at 2, 3, 4 and 8 bits.
RandomModelShape aligned_shape(bool tied);

// stories260K (llama2.c checkpoint + tok512.bin) from the shared data folder.
std::filesystem::path stories_dir();
Model load_stories();

// RTN-quantizes every linear (asymmetric unless `sym`).
Model quantized(Model m, const std::string& method, int bits, int64_t group_size, bool sym = false);
// A QA-LoRA adapter with random B (rank 4, alpha 8) on `base`.
AdapterSet random_qalora(const Model& base, uint64_t seed);
// `base` with a random QA-LoRA adapter merged into its offsets.
Model merged_qalora(const Model& base, uint64_t seed);

// Every position's logits of a fixed token sequence (ids below 97, valid for every test model).
std::vector<float> all_logits(const Model& m, const AdapterSet* set = nullptr);

// Bit patterns equal (the stronger form of ==: also tells -0 from 0).
bool same_bits(const float* a, const float* b, int64_t n);
bool same_bits(const Tensor& a, const Tensor& b);
double max_abs_diff(const float* a, const float* b, int64_t n);
double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b);

// The seven linears of layer l, in LayerWeights order, as fp32.
std::vector<Tensor> dense_linears(const Model& m, size_t l);

// Runs tests/export/gguf_readback.py on `gguf`: every tensor dequantized by gguf-py, and the
// metadata ("kv:<key>", "len:<key>", "type:<tensor>"). nullopt (and `skip` set) when python3,
// gguf or numpy is missing.
struct GgufReadback {
  std::map<std::string, Tensor> tensors;
  std::map<std::string, std::string> metadata;
};
std::optional<GgufReadback> gguf_py_readback(const std::filesystem::path& gguf, std::string& skip);

}  // namespace qalora::test
