// Bit-for-bit model comparisons shared by the file-format round-trip tests: every tensor,
// every QMatrix field (codes, group parameters, g_idx, absmax, double quantization), the
// quantized head and the quantization settings.
#pragma once

#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "qalora/model/model.h"

namespace qalora::test {

// The seven linears of a block under their Hugging Face names.
inline constexpr std::pair<const char*, Linear LayerWeights::*> kLinears[] = {
    {"q_proj", &LayerWeights::q},       {"k_proj", &LayerWeights::k},
    {"v_proj", &LayerWeights::v},       {"o_proj", &LayerWeights::o},
    {"gate_proj", &LayerWeights::gate}, {"up_proj", &LayerWeights::up},
    {"down_proj", &LayerWeights::down}};

// Same size and the same bytes (so -0.0 != 0.0 and NaNs compare by payload).
template <typename T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

inline bool same_bits(const GroupParams& a, const GroupParams& b) {
  return same_bits(a.to_vector(), b.to_vector());
}

void expect_same_tensor(const Tensor& a, const Tensor& b, const std::string& what);
void expect_same_qmatrix(const QMatrix& a, const QMatrix& b, const std::string& what);
void expect_same_model(const Model& a, const Model& b);

}  // namespace qalora::test
