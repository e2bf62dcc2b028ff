// Model -> GGUF v3 for llama.cpp / ollama (SPEC §8): llama.cpp's metadata keys and tensor
// names, each weight in a type chosen per tensor and checked by decoding what was encoded.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include "export/export_internal.h"
#include "qalora/core/error.h"
#include "qalora/tokenizer/pretokenize.h"

namespace qalora {

namespace fs = std::filesystem;

namespace {

using exporting::add_difference;
using exporting::describe;

constexpr int64_t kBlock = 32;  // elements of a Q4_0 / Q4_1 / Q8_0 block

bool is_block_type(GgmlType t) {
  return t == GgmlType::Q4_0 || t == GgmlType::Q4_1 || t == GgmlType::Q8_0;
}

// One weight to write: the model's values and, when quantized, the matrix they come from.
struct Weight {
  std::string name;
  const QMatrix* q = nullptr;
  Tensor values;  // [rows, cols], the model's fp32 values (the exact dequantization of q)
  std::optional<GgmlType> source;  // the type the model's GGUF source stored it in
};

struct Encoding {
  GgmlType type = GgmlType::F32;
  std::vector<uint8_t> bytes;
  double max_abs_dm = 0;
  // Q4_1 written from the codes with fp16-exact scales: any difference is the rounding of the
  // offsets to fp16, the storage rounding SPEC §4 allows.
  bool offsets_rounded_only = false;
};

void put_fp16(uint8_t* dst, float v) {
  const uint16_t h = fp32_to_fp16(v);
  std::memcpy(dst, &h, sizeof(h));
}

// The codes of an affine QMatrix as ggml blocks, without re-quantization: Q4_1 stores d = s and
// m of the block's group; Q4_0 / Q8_0 store d = s and q - z (+ 8 for Q4_0), which needs an
// fp16 scale and an offset m = -s z with integer z. nullopt when the layout or a group's
// parameters do not allow it.
std::optional<Encoding> encode_codes(const QMatrix& q, GgmlType type) {
  if (q.type != QuantType::Affine || !q.g_idx.empty() || q.cols % kBlock != 0 ||
      q.group_size % kBlock != 0 || (type != GgmlType::Q8_0 && q.bits > 4))
    return std::nullopt;
  const int64_t L = q.n_groups(), nb = q.cols / kBlock;
  const size_t block_bytes = ggml_type_traits(static_cast<uint32_t>(type))->block_bytes;
  Encoding e;
  e.type = type;
  e.bytes.resize(static_cast<size_t>(q.rows * nb) * block_bytes);
  e.offsets_rounded_only = type == GgmlType::Q4_1;
  std::vector<uint8_t> codes(static_cast<size_t>(q.cols));
  std::vector<float> scale_row(static_cast<size_t>(L)), offset_row(scale_row.size());
  for (int64_t j = 0; j < q.rows; ++j) {
    unpack_row(q.row_codes(j), q.cols, q.bits, codes.data());
    const float* scales = q.scales.read(j * L, L, scale_row.data());
    const float* offsets = q.offsets.read(j * L, L, offset_row.data());
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t g = b * kBlock / q.group_size;
      const float s = scales[g], m = offsets[g];
      uint8_t* blk = e.bytes.data() + static_cast<size_t>(j * nb + b) * block_bytes;
      const uint8_t* c = codes.data() + b * kBlock;
      put_fp16(blk, s);
      if (type == GgmlType::Q4_1) {
        put_fp16(blk + 2, m);
        e.offsets_rounded_only = e.offsets_rounded_only && round_to_fp16(s) == s;
        e.max_abs_dm = std::max(e.max_abs_dm, std::abs(static_cast<double>(round_to_fp16(m)) - m));
        for (int k = 0; k < 16; ++k) blk[4 + k] = static_cast<uint8_t>(c[k] | c[k + 16] << 4);
        continue;
      }
      const bool q8 = type == GgmlType::Q8_0;
      // s = 0: every value is m, representable only when it is 0 (then z is arbitrary).
      const float z = s != 0.0f ? std::nearbyint(-m / s) : (q8 ? 128.0f : 8.0f);
      if (round_to_fp16(s) != s || (s != 0.0f ? -(s * z) != m : m != 0.0f)) return std::nullopt;
      const int lo = q8 ? -128 : 0, hi = q8 ? 127 : 15, shift = q8 ? 0 : 8;
      int v[kBlock];
      for (int k = 0; k < kBlock; ++k) {
        v[k] = c[k] - static_cast<int>(z) + shift;
        if (v[k] < lo || v[k] > hi) return std::nullopt;
      }
      if (q8) {
        for (int k = 0; k < kBlock; ++k)
          blk[2 + k] = static_cast<uint8_t>(static_cast<int8_t>(v[k]));
      } else {
        for (int k = 0; k < 16; ++k) blk[2 + k] = static_cast<uint8_t>(v[k] | v[k + 16] << 4);
      }
    }
  }
  return e;
}

Encoding encode_values(const Tensor& values, GgmlType type) {
  Encoding e;
  e.type = type;
  const int64_t cols = values.dim(1);
  const size_t row_bytes = ggml_row_bytes(type, cols);
  e.bytes.resize(row_bytes * static_cast<size_t>(values.dim(0)));
  for (int64_t r = 0; r < values.dim(0); ++r)
    quantize_row(type, values.data() + r * cols,
                 e.bytes.data() + static_cast<size_t>(r) * row_bytes, cols);
  return e;
}

Encoding encode(const Weight& w, GgmlType type) {
  if (w.q != nullptr && is_block_type(type))
    if (std::optional<Encoding> e = encode_codes(*w.q, type)) return std::move(*e);
  return encode_values(w.values, type);
}

// What a consumer decodes from `e`, against the model's values.
TensorExport measure(const Weight& w, const Encoding& e) {
  TensorExport t;
  t.name = w.name;
  t.type = ggml_type_name(e.type);
  t.source = describe(w.q);
  t.max_abs_dm = e.max_abs_dm;
  const int64_t rows = w.values.dim(0), cols = w.values.dim(1);
  const size_t row_bytes = ggml_row_bytes(e.type, cols);
  std::vector<float> row(static_cast<size_t>(cols));
  for (int64_t r = 0; r < rows; ++r) {
    dequantize_row(e.type, e.bytes.data() + static_cast<size_t>(r) * row_bytes, row.data(), cols);
    add_difference(t, w.values.data() + r * cols, row.data(), cols);
  }
  return t;
}

bool acceptable(const TensorExport& t, const Encoding& e) {
  return t.exact() || e.offsets_rounded_only;
}

struct Chosen {
  Encoding encoding;
  TensorExport report;
};

// The first candidate that holds the weight exactly (F32 always does).
Chosen first_exact(const Weight& w, const std::vector<GgmlType>& candidates) {
  for (const GgmlType type : candidates) {
    if (is_block_type(type) && w.values.dim(1) % kBlock != 0) continue;
    Encoding e = encode(w, type);
    TensorExport t = measure(w, e);
    if (acceptable(t, e) || type == GgmlType::F32) return {std::move(e), std::move(t)};
  }
  fail("export_gguf: ", w.name, ": no candidate type");  // F32 ends every list
}

std::vector<GgmlType> auto_candidates(const Weight& w) {
  std::vector<GgmlType> c;
  // A quantized weight goes to a block type from its codes before any float type, even when its
  // source stored it as a float.
  if (w.source && (w.q == nullptr || is_block_type(*w.source))) c.push_back(*w.source);
  if (w.q != nullptr && w.q->type == QuantType::Affine) {
    if (w.q->bits <= 4) c.insert(c.end(), {GgmlType::Q4_0, GgmlType::Q4_1});
    c.push_back(GgmlType::Q8_0);
  }
  c.insert(c.end(), {GgmlType::F16, GgmlType::BF16, GgmlType::F32});
  return c;
}

Chosen choose(const Weight& w, std::optional<GgmlType> forced, bool allow_lossy) {
  if (!forced) return first_exact(w, auto_candidates(w));
  const int64_t cols = w.values.dim(1);
  if (is_block_type(*forced) && cols % kBlock != 0) {
    Chosen c = first_exact(w, {GgmlType::F16, GgmlType::BF16, GgmlType::F32});
    c.report.note = cat("rows of ", cols, " are not a multiple of ", kBlock, ", which ",
                        ggml_type_name(*forced), " needs");
    return c;
  }
  Encoding e = encode(w, *forced);
  TensorExport t = measure(w, e);
  // A dense weight is quantized because the user asked for it; a quantized one must survive.
  QL_CHECK(w.q == nullptr || acceptable(t, e) || allow_lossy, "export: tensor '", w.name, "' (",
           describe(w.q), ") cannot be stored as ", ggml_type_name(*forced), " exactly (max |dw| ",
           t.max_abs_dw, ", relative error ", t.relative_error(),
           "): pass --allow-lossy to accept that, or leave out --type for the smallest exact type");
  return {std::move(e), std::move(t)};
}

std::optional<GgmlType> writable_type(const std::string& name) {
  for (const GgmlType t : {GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0,
                           GgmlType::Q4_0, GgmlType::Q4_1})
    if (name == ggml_type_name(t)) return t;
  return std::nullopt;
}

// llama.cpp's name of our pre-tokenizer flavour (tokenizer.ggml.pre).
std::string llama_cpp_pre(const std::string& pre) {
  PreTokenizer p = PreTokenizer::Gpt2;
  if (!pre_tokenizer_from_name(pre, p)) return pre;
  switch (p) {
    case PreTokenizer::Gpt2:
      return "gpt-2";
    case PreTokenizer::Llama3:
      return "llama-bpe";
    case PreTokenizer::Qwen2:
      return "qwen2";
    case PreTokenizer::SmolLm:
      return "smollm";
  }
  return pre;
}

void write_tokenizer(GgufWriter& w, const Model& model) {
  if (model.format == ModelFormat::Gguf && fs::is_regular_file(model.source_path)) {
    const GgufFile src = GgufFile::open(model.source_path);
    if (src.has("tokenizer.ggml.model")) {
      for (const auto& [key, value] : src.metadata())
        if (key.starts_with("tokenizer.")) w.copy_kv(src, key);
      return;
    }
  }
  if (!model.tokenizer) return;
  const TokenizerData& d = model.tokenizer->data();
  const bool spm = d.kind == TokenizerKind::SentencePiece;
  w.set_string("tokenizer.ggml.model", spm ? "llama" : "gpt2");
  if (!spm) w.set_string("tokenizer.ggml.pre", llama_cpp_pre(d.pre));
  w.set_string_array("tokenizer.ggml.tokens", d.tokens);
  if (!d.scores.empty()) w.set_f32_array("tokenizer.ggml.scores", d.scores);
  std::vector<int32_t> types;
  for (const TokenType t : d.types) types.push_back(static_cast<int32_t>(t));
  w.set_i32_array("tokenizer.ggml.token_type", types);
  if (!d.merges.empty()) w.set_string_array("tokenizer.ggml.merges", d.merges);
  const std::pair<const char*, int32_t> ids[] = {{"tokenizer.ggml.bos_token_id", d.bos_id},
                                                 {"tokenizer.ggml.eos_token_id", d.eos_id},
                                                 {"tokenizer.ggml.unknown_token_id", d.unk_id},
                                                 {"tokenizer.ggml.padding_token_id", d.pad_id}};
  for (const auto& [key, id] : ids)
    if (id >= 0) w.set_u32(key, static_cast<uint32_t>(id));
  w.set_bool("tokenizer.ggml.add_bos_token", d.add_bos);
  w.set_bool("tokenizer.ggml.add_eos_token", d.add_eos);
  if (spm) w.set_bool("tokenizer.ggml.add_space_prefix", d.add_space_prefix);
  if (!d.chat_template.empty()) w.set_string("tokenizer.chat_template", d.chat_template);
}

// Per-frequency RoPE divisors for rope_freqs.weight: the model's own (a GGUF source), or the
// Llama 3 scaling, which GGUF expresses only this way.
std::vector<float> rope_freq_factors(const ModelConfig& c) {
  if (!c.rope_freq_factors.empty()) return c.rope_freq_factors;
  if (c.rope_scaling.type != RopeScaling::Type::Llama3) return {};
  ModelConfig plain = c;
  plain.rope_scaling = RopeScaling();
  const std::vector<double> base = rope_inv_freq(plain), scaled = rope_inv_freq(c);
  std::vector<float> f(base.size());
  for (size_t i = 0; i < f.size(); ++i) f[i] = static_cast<float>(base[i] / scaled[i]);
  return f;
}

uint32_t file_type(GgmlType t) {  // llama.cpp's LLAMA_FTYPE_* of a file mostly of type t
  switch (t) {
    case GgmlType::F32:
      return 0;
    case GgmlType::F16:
      return 1;
    case GgmlType::Q4_0:
      return 2;
    case GgmlType::Q4_1:
      return 3;
    case GgmlType::Q8_0:
      return 7;
    case GgmlType::BF16:
      return 32;
    default:
      return 0;
  }
}

void write_metadata(GgufWriter& w, const Model& model, const std::string& arch) {
  const ModelConfig& c = model.config;
  const auto u32 = [](int64_t v) { return static_cast<uint32_t>(v); };
  w.set_string("general.architecture", arch);
  w.set_string("general.name", c.name.empty() ? "qalora export" : c.name);
  const std::string a = arch + ".";
  w.set_u32(a + "context_length", u32(c.context_length));
  w.set_u32(a + "embedding_length", u32(c.dim));
  w.set_u32(a + "block_count", u32(c.n_layers));
  w.set_u32(a + "feed_forward_length", u32(c.hidden_dim));
  w.set_u32(a + "rope.dimension_count", u32(c.head_dim));
  w.set_u32(a + "attention.head_count", u32(c.n_heads));
  w.set_u32(a + "attention.head_count_kv", u32(c.n_kv_heads));
  if (c.head_dim * c.n_heads != c.dim) {
    w.set_u32(a + "attention.key_length", u32(c.head_dim));
    w.set_u32(a + "attention.value_length", u32(c.head_dim));
  }
  w.set_f32(a + "attention.layer_norm_rms_epsilon", c.norm_eps);
  w.set_f32(a + "rope.freq_base", c.rope_theta);
  w.set_u32(a + "vocab_size", u32(c.vocab_size));
  if (c.rope_scaling.type == RopeScaling::Type::Linear) {
    w.set_string(a + "rope.scaling.type", "linear");
    w.set_f32(a + "rope.scaling.factor", c.rope_scaling.factor);
  }
}

}  // namespace

bool gguf_q4_1_codes(const QMatrix& q) {
  return q.type == QuantType::Affine && q.g_idx.empty() && q.bits <= 4 && q.cols % kBlock == 0 &&
         q.group_size % kBlock == 0;
}

ExportReport export_gguf(const Model& model, const fs::path& path,
                         const GgufExportOptions& options) {
  const ModelConfig& c = model.config;
  QL_CHECK(!options.type || ggml_type_traits(static_cast<uint32_t>(*options.type))->can_quantize,
           "export: --type ", ggml_type_name(*options.type), " cannot be written");
  // llama.cpp's qwen2 uses the NEOX (halves) rope; its llama architecture rotates pairs.
  const bool qwen2 = c.arch == "qwen2";
  const std::string arch = qwen2 ? "qwen2" : "llama";
  std::map<std::string, GgmlType> source_types;
  if (model.format == ModelFormat::Gguf)
    for (const SourceTensor& t : model.source_tensors)
      if (const auto type = writable_type(t.type)) source_types[t.name] = *type;
  const auto source_of = [&](const std::string& name) -> std::optional<GgmlType> {
    const auto it = source_types.find(name);
    if (it == source_types.end()) return std::nullopt;
    return it->second;
  };

  GgufWriter w;
  // A 7B model's tensors are gigabytes: they wait on disk, next to the output, not in memory.
  w.spill_data_to(path.string() + ".data.partial");
  write_metadata(w, model, arch);
  ExportReport report;
  report.format = "gguf";
  report.path = path.string();
  std::map<GgmlType, int64_t> linear_types;

  // Norms, biases and RoPE factors: F32, as llama.cpp keeps them.
  const auto add_f32 = [&](const std::string& name, const Tensor& t) { w.add_f32_tensor(name, t); };
  const auto add = [&](const Weight& weight, std::optional<GgmlType> forced, bool linear) {
    Chosen ch = linear ? choose(weight, forced, options.allow_lossy)
                       : first_exact(weight, auto_candidates(weight));
    if (linear) ++linear_types[ch.encoding.type];
    w.add_tensor(weight.name, weight.values.shape(), ch.encoding.type,
                 std::move(ch.encoding.bytes));
    report.tensors.push_back(std::move(ch.report));
  };
  const auto float_weight = [&](const std::string& name, const Tensor& t) {
    return Weight{name, nullptr, t.decoded(), source_of(name)};
  };
  const auto head_weight = [&](const std::string& name) {
    return Weight{name, &model.head_q, dequantize(model.head_q), source_of(name)};
  };

  const bool tied = model.output.empty();
  const bool head_q = !model.head_q.codes.empty();
  add(tied && head_q ? head_weight("token_embd.weight")
                     : float_weight("token_embd.weight", model.tok_embeddings),
      std::nullopt, false);
  const std::vector<float> factors = rope_freq_factors(c);
  if (!factors.empty()) {
    Tensor t = Tensor::zeros({static_cast<int64_t>(factors.size())});
    std::copy(factors.begin(), factors.end(), t.mutable_data());
    add_f32("rope_freqs.weight", t);
  }
  for (size_t l = 0; l < model.layers.size(); ++l) {
    const LayerWeights& L = model.layers[l];
    const std::string b = cat("blk.", l, ".");
    add_f32(b + "attn_norm.weight", L.attn_norm);
    // llama.cpp's qwen2 rotates halves: q/k rows go back to that layout.
    const Linear q = qwen2 ? permute_rope_rows(L.q, c.n_heads, c.head_dim, true) : L.q;
    const Linear k = qwen2 ? permute_rope_rows(L.k, c.n_kv_heads, c.head_dim, true) : L.k;
    const auto add_linear = [&](const char* name, const Linear& lin) {
      const std::string wname = b + name + ".weight";
      add(Weight{wname, lin.quantized() ? &lin.qweight : nullptr, lin.dense_weight(),
                 source_of(wname)},
          options.type, true);
      if (!lin.bias.empty()) add_f32(b + name + ".bias", lin.bias);
    };
    add_linear("attn_q", q);
    add_linear("attn_k", k);
    add_linear("attn_v", L.v);
    add_linear("attn_output", L.o);
    add_f32(b + "ffn_norm.weight", L.ffn_norm);
    add_linear("ffn_gate", L.gate);
    add_linear("ffn_up", L.up);
    add_linear("ffn_down", L.down);
    L.release_pages();  // copied into the writer
  }
  add_f32("output_norm.weight", model.final_norm);
  if (!tied)
    add(head_q ? head_weight("output.weight") : float_weight("output.weight", model.output),
        std::nullopt, false);

  const auto most =
      std::max_element(linear_types.begin(), linear_types.end(),
                       [](const auto& x, const auto& y) { return x.second < y.second; });
  w.set_u32("general.file_type", most == linear_types.end() ? 0 : file_type(most->first));
  bool quantized = false;
  for (const auto& [type, n] : linear_types) quantized = quantized || is_block_type(type);
  if (quantized || head_q) w.set_u32("general.quantization_version", 2);
  write_tokenizer(w, model);
  w.write(path);
  return report;
}

}  // namespace qalora
