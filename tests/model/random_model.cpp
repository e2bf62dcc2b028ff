#include "model/random_model.h"

#include <cmath>
#include <random>

namespace qalora::test {

namespace {

Tensor random_tensor(Shape shape, float scale, float offset, std::mt19937_64& rng) {
  Tensor t = Tensor::zeros(std::move(shape));
  std::uniform_real_distribution<float> u(-scale, scale);
  float* d = t.mutable_data();
  for (int64_t i = 0; i < t.numel(); ++i) d[i] = offset + u(rng);
  return t;
}

Linear random_linear(int64_t out, int64_t in, bool bias, std::mt19937_64& rng) {
  Linear l;
  l.weight = random_tensor({out, in}, 1.0f / std::sqrt(static_cast<float>(in)), 0.0f, rng);
  if (bias) l.bias = random_tensor({out}, 0.1f, 0.0f, rng);
  return l;
}

}  // namespace

Model make_random_model(const RandomModelShape& s, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Model m;
  ModelConfig& c = m.config;
  c.name = "random";
  c.vocab_size = s.vocab;
  c.dim = s.dim;
  c.hidden_dim = s.hidden;
  c.n_layers = s.layers;
  c.n_heads = s.heads;
  c.n_kv_heads = s.kv_heads;
  c.head_dim = s.head_dim;
  c.context_length = s.context;
  c.tied_embeddings = s.tied;
  c.qkv_bias = s.qkv_bias;
  m.tok_embeddings = random_tensor({s.vocab, s.dim}, 1.0f, 0.0f, rng);
  for (int64_t i = 0; i < s.layers; ++i) {
    LayerWeights l;
    l.attn_norm = random_tensor({s.dim}, 0.2f, 1.0f, rng);
    l.q = random_linear(c.q_dim(), s.dim, s.qkv_bias, rng);
    l.k = random_linear(c.kv_dim(), s.dim, s.qkv_bias, rng);
    l.v = random_linear(c.kv_dim(), s.dim, s.qkv_bias, rng);
    l.o = random_linear(s.dim, c.q_dim(), false, rng);
    l.ffn_norm = random_tensor({s.dim}, 0.2f, 1.0f, rng);
    l.gate = random_linear(s.hidden, s.dim, false, rng);
    l.up = random_linear(s.hidden, s.dim, false, rng);
    l.down = random_linear(s.dim, s.hidden, false, rng);
    m.layers.push_back(std::move(l));
  }
  m.final_norm = random_tensor({s.dim}, 0.2f, 1.0f, rng);
  if (!s.tied)
    m.output =
        random_tensor({s.vocab, s.dim}, 1.0f / std::sqrt(static_cast<float>(s.dim)), 0.0f, rng);
  m.source_path = "random-model";
  m.validate();
  return m;
}

RandomModelShape ragged_shape() {
  RandomModelShape s;
  s.vocab = 31, s.dim = 40, s.hidden = 24, s.layers = 2, s.heads = 4, s.kv_heads = 2;
  s.head_dim = 10;
  return s;
}

void randomize_adapter_b(AdapterSet& set, uint64_t seed, float amplitude) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-amplitude, amplitude);
  for (LoraAdapter& a : set.adapters) {
    float* b = a.B.mutable_data();
    for (int64_t i = 0; i < a.B.numel(); ++i) b[i] = u(rng);
  }
}

}  // namespace qalora::test
