// Small random Llama models with chosen (odd) shapes, for golden tests of the forward pass and
// of the file formats.
#pragma once

#include <cstdint>

#include "qalora/model/model.h"

namespace qalora::test {

struct RandomModelShape {
  int64_t vocab = 97;
  int64_t dim = 52;
  int64_t hidden = 100;
  int64_t layers = 2;
  int64_t heads = 6;
  int64_t kv_heads = 3;
  int64_t head_dim = 8;
  bool tied = false;
  bool qkv_bias = false;
  int64_t context = 64;
};

// Weights ~ U(-a, a) with a chosen so activations stay O(1); norms around 1.
Model make_random_model(const RandomModelShape& shape, uint64_t seed);

}  // namespace qalora::test
