#include "qalora/model/model.h"

#include <cmath>
#include <numbers>

#include "qalora/core/error.h"

namespace qalora {

const char* model_format_name(ModelFormat f) {
  switch (f) {
    case ModelFormat::Gguf:
      return "gguf";
    case ModelFormat::HuggingFace:
      return "huggingface";
    case ModelFormat::Llama2c:
      return "llama2.c";
  }
  return "unknown";
}

namespace {

void expect_shape(const std::string& source, const std::string& name, const Tensor& t,
                  const Shape& expected) {
  QL_CHECK(!t.empty(), source, ": tensor '", name, "' is missing (expected shape ",
           shape_str(expected), ")");
  check_shape(source, name, t.shape(), expected);
}

void expect_linear(const std::string& source, const std::string& name, const Linear& l, int64_t out,
                   int64_t in, bool bias) {
  if (l.quantized()) {
    check_shape(source, name + ".qweight", {l.qweight.rows, l.qweight.cols}, {out, in});
    l.qweight.validate(source + ": " + name);
  } else {
    expect_shape(source, name + ".weight", l.weight, {out, in});
  }
  if (bias) expect_shape(source, name + ".bias", l.bias, {out});
  QL_CHECK(bias || l.bias.empty(), source, ": tensor '", name,
           ".bias' is present but the config has no biases");
}

}  // namespace

void Linear::release_pages() const {
  weight.release_pages();
  qweight.release_pages();
  bias.release_pages();
}

void LayerWeights::release_pages() const {
  for (const Tensor* t : {&attn_norm, &ffn_norm}) t->release_pages();
  for (const Linear* l : {&q, &k, &v, &o, &gate, &up, &down}) l->release_pages();
}

void Model::validate() const {
  const ModelConfig& c = config;
  const std::string& src = source_path;
  QL_CHECK(c.dim > 0 && c.hidden_dim > 0 && c.n_layers > 0 && c.vocab_size > 0, src,
           ": config has non-positive sizes (dim ", c.dim, ", hidden ", c.hidden_dim, ", layers ",
           c.n_layers, ", vocab ", c.vocab_size, ")");
  QL_CHECK(c.n_heads > 0 && c.n_kv_heads > 0 && c.n_heads % c.n_kv_heads == 0, src,
           ": attention heads ", c.n_heads, " must be a positive multiple of kv heads ",
           c.n_kv_heads);
  QL_CHECK(c.head_dim > 0 && c.head_dim % 2 == 0, src, ": head dim must be positive and even, got ",
           c.head_dim);
  QL_CHECK(c.context_length > 0, src, ": context length must be positive, got ", c.context_length);
  QL_CHECK(c.rope_freq_factors.empty() ||
               static_cast<int64_t>(c.rope_freq_factors.size()) == c.head_dim / 2,
           src, ": rope frequency factors have ", c.rope_freq_factors.size(), " entries, expected ",
           c.head_dim / 2);
  QL_CHECK(static_cast<int64_t>(layers.size()) == c.n_layers, src, ": ", layers.size(),
           " blocks loaded, config says ", c.n_layers);
  expect_shape(src, "token embeddings", tok_embeddings, {c.vocab_size, c.dim});
  expect_shape(src, "final norm", final_norm, {c.dim});
  if (!output.empty()) expect_shape(src, "output head", output, {c.vocab_size, c.dim});
  if (!head_q.codes.empty()) {
    check_shape(src, "output head (quantized)", {head_q.rows, head_q.cols}, {c.vocab_size, c.dim});
    head_q.validate(src + ": output head");
  }
  for (size_t i = 0; i < layers.size(); ++i) {
    const LayerWeights& l = layers[i];
    const std::string b = "blocks." + std::to_string(i) + ".";
    expect_shape(src, b + "attn_norm", l.attn_norm, {c.dim});
    expect_shape(src, b + "ffn_norm", l.ffn_norm, {c.dim});
    expect_linear(src, b + "q", l.q, c.q_dim(), c.dim, c.qkv_bias);
    expect_linear(src, b + "k", l.k, c.kv_dim(), c.dim, c.qkv_bias);
    expect_linear(src, b + "v", l.v, c.kv_dim(), c.dim, c.qkv_bias);
    expect_linear(src, b + "o", l.o, c.dim, c.q_dim(), false);
    expect_linear(src, b + "gate", l.gate, c.hidden_dim, c.dim, false);
    expect_linear(src, b + "up", l.up, c.hidden_dim, c.dim, false);
    expect_linear(src, b + "down", l.down, c.dim, c.hidden_dim, false);
  }
  if (tokenizer) {
    QL_CHECK(tokenizer->vocab_size() <= c.vocab_size, src, ": tokenizer has ",
             tokenizer->vocab_size(), " tokens but the model's vocabulary is ", c.vocab_size);
  }
}

int64_t Model::parameter_count() const {
  int64_t n = tok_embeddings.numel() + final_norm.numel() + output.numel();
  for (const LayerWeights& l : layers) {
    n += l.attn_norm.numel() + l.ffn_norm.numel();
    for (const Linear* lin : {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down})
      n += lin->out_features() * lin->in_features() + lin->bias.numel();
  }
  return n;
}

const Tokenizer& Model::require_tokenizer() const {
  QL_CHECK(tokenizer != nullptr, source_path,
           ": no tokenizer found for this model; pass --tokenizer FILE (tokenizer.json, "
           "tokenizer.model or a llama2.c tok*.bin)");
  return *tokenizer;
}

std::vector<double> rope_inv_freq(const ModelConfig& c) {
  const int64_t half = c.head_dim / 2;
  std::vector<double> inv(static_cast<size_t>(half));
  const RopeScaling& rs = c.rope_scaling;
  for (int64_t i = 0; i < half; ++i) {
    double f = std::pow(static_cast<double>(c.rope_theta),
                        -2.0 * static_cast<double>(i) / static_cast<double>(c.head_dim));
    if (rs.type == RopeScaling::Type::Linear) {
      f /= rs.factor;
    } else if (rs.type == RopeScaling::Type::Llama3) {
      // Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
      const double wavelen = 2.0 * std::numbers::pi / f;
      const double low_wavelen = static_cast<double>(rs.original_context) / rs.low_freq_factor;
      const double high_wavelen = static_cast<double>(rs.original_context) / rs.high_freq_factor;
      if (wavelen > low_wavelen) {
        f /= rs.factor;
      } else if (wavelen >= high_wavelen) {
        const double smooth =
            (static_cast<double>(rs.original_context) / wavelen - rs.low_freq_factor) /
            (rs.high_freq_factor - rs.low_freq_factor);
        f = (1.0 - smooth) * f / rs.factor + smooth * f;
      }
    }
    if (!c.rope_freq_factors.empty()) f /= c.rope_freq_factors[static_cast<size_t>(i)];
    inv[static_cast<size_t>(i)] = f;
  }
  return inv;
}

void rope_tables(const ModelConfig& config, int64_t positions, std::vector<float>& cos,
                 std::vector<float>& sin) {
  const std::vector<double> inv_freq = rope_inv_freq(config);
  const int64_t half = config.head_dim / 2;
  cos.resize(static_cast<size_t>(positions * half));
  sin.resize(cos.size());
  for (int64_t p = 0; p < positions; ++p)
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(p) * inv_freq[static_cast<size_t>(i)];
      cos[static_cast<size_t>(p * half + i)] = static_cast<float>(std::cos(angle));
      sin[static_cast<size_t>(p * half + i)] = static_cast<float>(std::sin(angle));
    }
}

}  // namespace qalora
