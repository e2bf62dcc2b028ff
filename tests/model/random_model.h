// Small random Llama models with chosen (odd) shapes, for golden tests of the forward pass and
// of the file formats.
#pragma once

#include <cstdint>

#include "qalora/adapters/adapter.h"
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

// dim 40 and hidden 24 with 4 query and 2 key/value heads: quantization groups of 16 leave a
// ragged last group in every layer (16, 16, 8 and 16, 8).
RandomModelShape ragged_shape();

// Every adapter's B ~ U(-amplitude, amplitude): B starts at zero, which would hide A from a test.
void randomize_adapter_b(AdapterSet& set, uint64_t seed, float amplitude = 0.5f);

}  // namespace qalora::test
