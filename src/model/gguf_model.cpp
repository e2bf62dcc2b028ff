// GGUF -> Model: llama-architecture metadata, weights as stored (affine block types on the
// quantized kernels, other types decoded per use, F32 in place), and the tokenizer from
// tokenizer.ggml.*.
#include <cctype>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <set>

#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"
#include "qalora/io/gguf.h"
#include "qalora/model/model.h"

namespace qalora {

namespace {

// Architectures whose GGUF files keep the Hugging Face "halves" RoPE layout (llama.cpp's NEOX
// rope type): their q/k rows are permuted on load so that the runtime sees adjacent pairs.
const std::set<std::string, std::less<>> kNeoxRopeArchs = {"qwen2",    "qwen3",   "phi3",
                                                           "stablelm", "gptneox", "olmo2"};
const std::set<std::string, std::less<>> kSupportedArchs = {"llama", "mistral", "qwen2"};

TokenizerData gguf_tokenizer(const GgufFile& f) {
  TokenizerData d;
  const std::string model = f.get_string("tokenizer.ggml.model");
  if (model == "llama") {
    d.kind = TokenizerKind::SentencePiece;
  } else if (model == "gpt2") {
    d.kind = TokenizerKind::Gpt2;
  } else {
    fail(f.path(), ": tokenizer.ggml.model is '", model, "', expected 'llama' or 'gpt2'");
  }
  d.tokens = f.get_string_array("tokenizer.ggml.tokens");
  const size_t n = d.tokens.size();
  if (f.has("tokenizer.ggml.scores")) {
    for (double s : f.get_float_array("tokenizer.ggml.scores"))
      d.scores.push_back(static_cast<float>(s));
    QL_CHECK(d.scores.size() == n, f.path(), ": tokenizer.ggml.scores has ", d.scores.size(),
             " entries, expected ", n);
  }
  if (f.has("tokenizer.ggml.token_type")) {
    for (int64_t t : f.get_int_array("tokenizer.ggml.token_type")) {
      QL_CHECK(t >= 1 && t <= 6, f.path(), ": tokenizer.ggml.token_type value ", t,
               " is not a token type (1..6)");
      d.types.push_back(static_cast<TokenType>(t));
    }
    QL_CHECK(d.types.size() == n, f.path(), ": tokenizer.ggml.token_type has ", d.types.size(),
             " entries, expected ", n);
  } else {
    d.types.assign(n, TokenType::Normal);
  }
  if (f.has("tokenizer.ggml.merges")) d.merges = f.get_string_array("tokenizer.ggml.merges");
  d.pre = f.get_string_or("tokenizer.ggml.pre", "default");
  d.bos_id = static_cast<int32_t>(f.get_int_or("tokenizer.ggml.bos_token_id", -1));
  d.eos_id = static_cast<int32_t>(f.get_int_or("tokenizer.ggml.eos_token_id", -1));
  d.unk_id = static_cast<int32_t>(f.get_int_or("tokenizer.ggml.unknown_token_id", -1));
  d.pad_id = static_cast<int32_t>(f.get_int_or("tokenizer.ggml.padding_token_id", -1));
  d.add_bos = f.get_bool_or("tokenizer.ggml.add_bos_token", d.kind == TokenizerKind::SentencePiece);
  d.add_eos = f.get_bool_or("tokenizer.ggml.add_eos_token", false);
  d.add_space_prefix =
      f.get_bool_or("tokenizer.ggml.add_space_prefix", d.kind == TokenizerKind::SentencePiece);
  d.chat_template = f.get_string_or("tokenizer.chat_template", "");
  return d;
}

RopeScaling gguf_rope_scaling(const GgufFile& f, const std::string& arch) {
  RopeScaling rs;
  const std::string type = f.get_string_or(arch + ".rope.scaling.type", "none");
  const auto factor = static_cast<float>(f.get_float_or(arch + ".rope.scaling.factor", 1.0));
  if (type == "linear" && factor != 1.0f) {
    rs.type = RopeScaling::Type::Linear;
    rs.factor = factor;
  } else if (type != "none" && type != "linear") {
    fail(f.path(), ": ", arch, ".rope.scaling.type '", type, "' is not supported (none, linear)");
  }
  return rs;
}

// What the linears' block types amount to: one affine type for all of them reads as that
// quantization (QA-LoRA trains on its 32-wide groups); a mix is recorded as "gguf".
QuantInfo gguf_quant_info(const Model& m, const std::map<std::string, int64_t>& linear_types) {
  QuantInfo q;
  for (const LayerWeights& L : m.layers)
    for (const Linear* l : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down})
      if (l->quantized()) {
        q.method = linear_types.size() == 1 ? linear_types.begin()->first : "gguf";
        for (char& ch : q.method)
          ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
        q.bits = l->qweight.bits;
        q.group_size = l->qweight.group_size;
        return q;
      }
  return q;
}

}  // namespace

std::shared_ptr<const Tokenizer> load_gguf_tokenizer(const std::filesystem::path& path) {
  const GgufFile f = GgufFile::open(path);
  QL_CHECK(f.has("tokenizer.ggml.model"), path.string(),
           ": GGUF file has no tokenizer (tokenizer.ggml.model is missing)");
  return std::make_shared<const Tokenizer>(gguf_tokenizer(f));
}

Model load_gguf_model(const std::filesystem::path& path, bool describe_only) {
  const GgufFile f = GgufFile::open(path);
  Model m;
  m.format = ModelFormat::Gguf;
  m.source_path = path.string();
  const std::string arch = f.get_string("general.architecture");
  QL_CHECK(kSupportedArchs.contains(arch), path.string(), ": general.architecture is '", arch,
           "', expected one of llama, mistral, qwen2");

  ModelConfig& c = m.config;
  c.arch = arch;
  c.name = f.get_string_or("general.name", path.stem().string());
  // Sizes are positive and below 2^31 (no model's are larger), so that a corrupt header fails
  // here, naming its key, not in a product that overflows or an allocation.
  const auto size = [&](const std::string& key, std::optional<int64_t> fallback = {}) {
    const int64_t v = fallback ? f.get_int_or(key, *fallback) : f.get_int(key);
    QL_CHECK(v > 0 && v <= INT32_MAX, path.string(), ": ", key,
             ": expected a positive size below 2^31, got ", v);
    return v;
  };
  c.dim = size(arch + ".embedding_length");
  c.hidden_dim = size(arch + ".feed_forward_length");
  c.n_layers = size(arch + ".block_count");
  c.n_heads = size(arch + ".attention.head_count");
  c.n_kv_heads = size(arch + ".attention.head_count_kv", c.n_heads);
  c.head_dim = size(arch + ".attention.key_length", c.dim / c.n_heads);
  c.context_length = f.get_int_or(arch + ".context_length", 2048);
  c.rope_theta = static_cast<float>(f.get_float_or(arch + ".rope.freq_base", 10000.0));
  c.norm_eps = static_cast<float>(f.get_float_or(arch + ".attention.layer_norm_rms_epsilon", 1e-5));
  c.rope_scaling = gguf_rope_scaling(f, arch);
  c.qkv_bias = f.find_tensor("blk.0.attn_q.bias") != nullptr;
  const int64_t rope_dims = f.get_int_or(arch + ".rope.dimension_count", c.head_dim);
  QL_CHECK(rope_dims == c.head_dim, path.string(), ": ", arch, ".rope.dimension_count is ",
           rope_dims, ", only full-head rotary (", c.head_dim, ") is supported");

  const GgufTensorInfo* embd = f.find_tensor("token_embd.weight");
  QL_CHECK(embd != nullptr, path.string(), ": tensor 'token_embd.weight' is missing");
  QL_CHECK(embd->shape.size() == 2, path.string(), ": tensor 'token_embd.weight' has shape ",
           shape_str(embd->shape), ", expected [vocab, ", c.dim, "]");
  c.vocab_size = embd->shape[0];

  for (const GgufTensorInfo& t : f.tensors())
    m.source_tensors.push_back({t.name, ggml_type_name(t.type), t.shape});

  const bool permute = kNeoxRopeArchs.contains(arch);
  // Shapes are checked under the file's own tensor names, before anything is dequantized.
  // Weights stay as stored (decoded per use); norms, biases and RoPE factors are small fp32.
  auto info = [&](const std::string& name, const Shape& shape) -> const GgufTensorInfo& {
    const GgufTensorInfo* t = f.find_tensor(name);
    QL_CHECK(t != nullptr, path.string(), ": tensor '", name, "' is missing");
    check_shape(path.string(), name, t->shape, shape);
    return *t;
  };
  auto stored = [&](const std::string& name, const Shape& shape) {
    return f.load(info(name, shape));
  };
  auto load = [&](const std::string& name, const Shape& shape) {
    return stored(name, shape).decoded();
  };
  auto rope_rows = [&](Tensor t, int64_t heads) {
    return permute ? permute_rope_rows(t, heads, c.head_dim, /*to_hf=*/false) : t;
  };
  // Block types with an exact affine form (Q4_0, Q4_1, Q8_0, Q4_K) run from their codes on the
  // quantized kernels, repacked matrix by matrix when a pass reaches them and freed with its
  // block; every other type stays as stored and is decoded a tile at a time.
  std::map<std::string, int64_t> linear_types;
  auto linear = [&](const std::string& name, const Shape& shape, int64_t rope_heads = 0) {
    Linear lin;
    const GgufTensorInfo& t = info(name, shape);
    if (auto q = ggml_to_qmatrix(t.type, f.tensor_data(t), shape[0], shape[1], f.mapping(),
                                 describe_only)) {
      lin.qweight = permute && rope_heads > 0
                        ? permute_rope_rows(*q, rope_heads, c.head_dim, /*to_hf=*/false)
                        : std::move(*q);
    } else {
      lin.weight = rope_heads > 0 ? rope_rows(f.load(t), rope_heads) : f.load(t);
    }
    ++linear_types[ggml_type_name(t.type)];
    return lin;
  };

  const int64_t D = c.dim, F = c.hidden_dim, Q = c.q_dim(), KV = c.kv_dim();
  m.tok_embeddings = f.load(*embd);
  m.final_norm = load("output_norm.weight", {D});
  if (f.find_tensor("output.weight") != nullptr)
    m.output = stored("output.weight", {c.vocab_size, D});
  c.tied_embeddings = m.output.empty();
  const GgufTensorInfo* head = m.output.empty() ? embd : f.find_tensor("output.weight");
  if (auto q = ggml_to_qmatrix(head->type, f.tensor_data(*head), c.vocab_size, D, f.mapping(),
                               describe_only))
    m.head_q = std::move(*q);
  if (f.find_tensor("rope_freqs.weight") != nullptr) {
    const Tensor factors = load("rope_freqs.weight", {c.head_dim / 2});
    c.rope_freq_factors.assign(factors.data(), factors.data() + factors.numel());
  }
  // Block by block, so that an absurd block_count fails at the first missing tensor.
  for (int64_t i = 0; i < c.n_layers; ++i) {
    const std::string b = "blk." + std::to_string(i) + ".";
    LayerWeights& l = m.layers.emplace_back();
    l.attn_norm = load(b + "attn_norm.weight", {D});
    l.q = linear(b + "attn_q.weight", {Q, D}, c.n_heads);
    l.k = linear(b + "attn_k.weight", {KV, D}, c.n_kv_heads);
    l.v = linear(b + "attn_v.weight", {KV, D});
    l.o = linear(b + "attn_output.weight", {D, Q});
    if (c.qkv_bias) {
      l.q.bias = rope_rows(load(b + "attn_q.bias", {Q}), c.n_heads);
      l.k.bias = rope_rows(load(b + "attn_k.bias", {KV}), c.n_kv_heads);
      l.v.bias = load(b + "attn_v.bias", {KV});
    }
    l.ffn_norm = load(b + "ffn_norm.weight", {D});
    l.gate = linear(b + "ffn_gate.weight", {F, D});
    l.up = linear(b + "ffn_up.weight", {F, D});
    l.down = linear(b + "ffn_down.weight", {D, F});
  }
  m.quant = gguf_quant_info(m, linear_types);
  if (f.has("tokenizer.ggml.model"))
    m.tokenizer = std::make_shared<const Tokenizer>(gguf_tokenizer(f));
  m.validate();
  return m;
}

}  // namespace qalora
