// Hugging Face folders: config.json + model.safetensors (or shards listed in
// model.safetensors.index.json) + tokenizer.json / tokenizer.model. Quantized linears are read
// and written by quantized_io.cpp.
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <optional>

#include "model/hf_folder.h"
#include "qalora/core/atomic_file.h"
#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"
#include "qalora/io/safetensors.h"
#include "qalora/model/model.h"
#include "qalora/quant/qmatrix_rows.h"

namespace qalora {

namespace fs = std::filesystem;
using nlohmann::json;

namespace hf {

json parse_json_file(const fs::path& path) {
  try {
    return json::parse(read_file(path));
  } catch (const json::parse_error& e) {
    fail(path.string(), ": not valid JSON: ", e.what());
  }
}

double json_float(float f) {
  char buf[32];
  const auto res = std::to_chars(buf, buf + sizeof(buf) - 1, f);
  *res.ptr = '\0';
  return std::strtod(buf, nullptr);
}

HfWeights::HfWeights(const fs::path& dir, const std::string& fallback_file) {
  const fs::path single = dir / "model.safetensors";
  const fs::path index_path = dir / "model.safetensors.index.json";
  if (fs::exists(single)) {
    shards_.push_back(SafetensorsFile::open(single));
  } else if (fs::exists(index_path)) {
    open_shards(dir, index_path);
  } else if (!fallback_file.empty() && fs::exists(dir / fallback_file)) {
    shards_.push_back(SafetensorsFile::open(dir / fallback_file));
  } else {
    fail(dir.string(), ": no model.safetensors or model.safetensors.index.json",
         fallback_file.empty() ? "" : " or ", fallback_file);
  }
  for (size_t s = 0; s < shards_.size(); ++s)
    for (const StTensorInfo& t : shards_[s].tensors()) where_.try_emplace(t.name, s, &t);
}

const std::string& HfWeights::file_of(const std::string& name) const {
  const auto it = where_.find(name);
  return shards_[it == where_.end() ? 0 : it->second.first].path();
}

const std::pair<size_t, const StTensorInfo*>& HfWeights::locate(const std::string& name) const {
  const auto it = where_.find(name);
  QL_CHECK(it != where_.end(), file_of(name), ": tensor '", name, "' is missing");
  return it->second;
}

Tensor HfWeights::get(const std::string& name, const Shape& expected,
                      const std::string& context) const {
  const auto& [shard, info] = locate(name);
  check_shape(shards_[shard].path(), name, info->shape, expected, context);
  return shards_[shard].load_f32(*info);
}

const uint8_t* HfWeights::raw(const std::string& name, StDtype dtype, const Shape& expected,
                              const std::string& context) const {
  const auto& [shard, info] = locate(name);
  QL_CHECK(info->dtype == dtype, shards_[shard].path(), ": tensor '", name, "' has dtype ",
           st_dtype_name(info->dtype), ", expected ", st_dtype_name(dtype), context);
  check_shape(shards_[shard].path(), name, info->shape, expected, context);
  return shards_[shard].data(*info);
}

std::vector<SourceTensor> HfWeights::source_tensors() const {
  std::vector<SourceTensor> out;
  for (const SafetensorsFile& f : shards_)
    for (const StTensorInfo& t : f.tensors())
      out.push_back({t.name, st_dtype_name(t.dtype), t.shape});
  return out;
}

void HfWeights::open_shards(const fs::path& dir, const fs::path& index_path) {
  const json index = parse_json_file(index_path);
  QL_CHECK(index.contains("weight_map") && index["weight_map"].is_object(), index_path.string(),
           ": missing object field 'weight_map'");
  std::map<std::string, size_t> shard_of_file;
  for (const auto& [name, file] : index["weight_map"].items()) {
    QL_CHECK(file.is_string(), index_path.string(), ": weight_map['", name,
             "'] must be a file name, got ", file.dump());
    const std::string f = file.get<std::string>();
    if (shard_of_file.try_emplace(f, shards_.size()).second)
      shards_.push_back(SafetensorsFile::open(dir / f));
    QL_CHECK(shards_[shard_of_file.at(f)].find(name) != nullptr, index_path.string(),
             ": weight_map puts '", name, "' in ", f, ", which does not contain it");
  }
  QL_CHECK(!shards_.empty(), index_path.string(), ": weight_map is empty");
}

}  // namespace hf

namespace {

using hf::ConfigJson;
using hf::FolderQuant;
using hf::HfWeights;
using hf::json_float;

struct HfArch {
  const char* class_name;  // config.json "architectures"
  const char* model_type;
  const char* arch;  // ModelConfig::arch
  bool qkv_bias;
};
constexpr HfArch kArchs[] = {
    {"LlamaForCausalLM", "llama", "llama", false},
    {"MistralForCausalLM", "mistral", "llama", false},
    {"Qwen2ForCausalLM", "qwen2", "qwen2", true},
};

const HfArch& find_arch(const json& j, const std::string& file) {
  const ConfigJson c(j, file);
  if (c.has("architectures")) {
    const json& a = j["architectures"];
    const std::string name =
        a.is_array() && !a.empty() && a[0].is_string() ? a[0].get<std::string>() : a.dump();
    for (const HfArch& arch : kArchs)
      if (name == arch.class_name) return arch;
    fail(file, ": architectures[0] is '", name,
         "', expected LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM");
  }
  const std::string type = c.string_or("model_type", "");
  for (const HfArch& arch : kArchs)
    if (type == arch.model_type) return arch;
  fail(file, ": no 'architectures' and model_type '", type, "' is not llama, mistral or qwen2");
}

RopeScaling parse_rope_scaling(const json& j, const std::string& file) {
  RopeScaling rs;
  if (!j.contains("rope_scaling") || j["rope_scaling"].is_null()) return rs;
  const json& r = j["rope_scaling"];
  QL_CHECK(r.is_object(), file, ": rope_scaling must be an object or null, got ", r.dump());
  const ConfigJson c(r, file + " rope_scaling");
  const std::string type = c.string_or("rope_type", c.string_or("type", ""));
  if (type == "default") return rs;
  if (type == "linear") {
    rs.type = RopeScaling::Type::Linear;
  } else if (type == "llama3") {
    rs.type = RopeScaling::Type::Llama3;
    rs.low_freq_factor = static_cast<float>(c.float_or("low_freq_factor", rs.low_freq_factor));
    rs.high_freq_factor = static_cast<float>(c.float_or("high_freq_factor", rs.high_freq_factor));
    rs.original_context = c.positive_or("original_max_position_embeddings", rs.original_context);
  } else {
    fail(file, ": rope_scaling type '", type, "' is not supported (expected linear or llama3)");
  }
  rs.factor = static_cast<float>(c.float_or("factor", rs.factor));
  QL_CHECK(rs.factor > 0, file, ": rope_scaling factor must be positive, got ", rs.factor);
  return rs;
}

std::string folder_name(const fs::path& dir) {
  const fs::path p = dir.lexically_normal();
  return p.has_filename() ? p.filename().string() : p.parent_path().filename().string();
}

// config.json as a ModelConfig. tied_embeddings is left false when the field is absent; the
// caller decides from the tensors (see load_hf_model).
ModelConfig parse_config(const json& j, const std::string& file, const fs::path& dir) {
  QL_CHECK(j.is_object(), file, ": expected a JSON object");
  const HfArch& arch = find_arch(j, file);
  const ConfigJson c(j, file);

  ModelConfig cfg;
  cfg.arch = arch.arch;
  cfg.name = c.string_or("_name_or_path", "");
  if (cfg.name.empty()) cfg.name = folder_name(dir);
  cfg.vocab_size = c.positive("vocab_size");
  cfg.dim = c.positive("hidden_size");
  cfg.hidden_dim = c.positive("intermediate_size");
  cfg.n_layers = c.positive("num_hidden_layers");
  cfg.n_heads = c.positive("num_attention_heads");
  cfg.n_kv_heads = c.positive_or("num_key_value_heads", cfg.n_heads);
  cfg.head_dim = c.positive_or("head_dim", cfg.dim / cfg.n_heads);
  QL_CHECK(cfg.head_dim % 2 == 0, file, ": head_dim ", cfg.head_dim, " must be even for RoPE");
  cfg.context_length = c.positive_or("max_position_embeddings", cfg.context_length);
  cfg.rope_theta = static_cast<float>(c.float_or("rope_theta", cfg.rope_theta));
  cfg.rope_scaling = parse_rope_scaling(j, file);
  cfg.norm_eps = static_cast<float>(c.float_or("rms_norm_eps", 1e-6));  // transformers' default
  cfg.tied_embeddings = c.bool_or("tie_word_embeddings", false);
  cfg.qkv_bias = arch.qkv_bias || c.bool_or("attention_bias", false);
  return cfg;
}

// The runtime has biases on q/k/v only (Qwen2, Llama attention_bias); any other stored bias is
// refused rather than silently dropped.
Linear load_linear(const HfWeights& w, const FolderQuant& q, const std::string& prefix, int64_t out,
                   int64_t in, bool bias) {
  Linear lin;
  if (q.kind != FolderQuant::Kind::Dense)
    lin.qweight = hf::load_quantized_weight(w, q, prefix, out, in);
  if (!lin.quantized()) lin.weight = w.get(prefix + ".weight", {out, in});
  if (bias)
    lin.bias = w.get(prefix + ".bias", {out});
  else
    QL_CHECK(!w.has(prefix + ".bias"), w.file_of(prefix + ".bias"), ": tensor '", prefix,
             ".bias' is not supported (only q/k/v biases are, with Qwen2 or attention_bias)");
  return lin;
}

std::shared_ptr<const Tokenizer> load_folder_tokenizer(const fs::path& dir) {
  if (fs::exists(dir / "tokenizer.json"))
    return std::make_shared<const Tokenizer>(read_hf_tokenizer(dir / "tokenizer.json"));
  if (fs::exists(dir / "tokenizer.model"))
    return std::make_shared<const Tokenizer>(read_sentencepiece_model(dir / "tokenizer.model"));
  return nullptr;
}

json config_to_json(const Model& model) {
  const ModelConfig& c = model.config;
  // Llama's attention_bias would also add an o_proj bias; Qwen2 has exactly q/k/v biases.
  const bool qwen2 = c.arch == "qwen2" || c.qkv_bias;
  json j;
  j["architectures"] = json::array({qwen2 ? "Qwen2ForCausalLM" : "LlamaForCausalLM"});
  j["model_type"] = qwen2 ? "qwen2" : "llama";
  j["hidden_act"] = "silu";
  j["hidden_size"] = c.dim;
  j["intermediate_size"] = c.hidden_dim;
  j["num_hidden_layers"] = c.n_layers;
  j["num_attention_heads"] = c.n_heads;
  j["num_key_value_heads"] = c.n_kv_heads;
  j["head_dim"] = c.head_dim;
  j["max_position_embeddings"] = c.context_length;
  j["rms_norm_eps"] = json_float(c.norm_eps);
  j["rope_theta"] = json_float(c.rope_theta);
  if (c.rope_scaling.type == RopeScaling::Type::Linear) {
    j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", json_float(c.rope_scaling.factor)}};
  } else if (c.rope_scaling.type == RopeScaling::Type::Llama3) {
    j["rope_scaling"] = {{"rope_type", "llama3"},
                         {"factor", json_float(c.rope_scaling.factor)},
                         {"low_freq_factor", json_float(c.rope_scaling.low_freq_factor)},
                         {"high_freq_factor", json_float(c.rope_scaling.high_freq_factor)},
                         {"original_max_position_embeddings", c.rope_scaling.original_context}};
  }
  j["vocab_size"] = c.vocab_size;
  j["tie_word_embeddings"] = model.output.empty();
  if (qwen2) j["use_sliding_window"] = false;
  j["torch_dtype"] = "float32";
  if (model.tokenizer) {
    if (model.tokenizer->bos_id() >= 0) j["bos_token_id"] = model.tokenizer->bos_id();
    if (model.tokenizer->eos_id() >= 0) j["eos_token_id"] = model.tokenizer->eos_id();
  }
  if (!c.name.empty()) j["_name_or_path"] = c.name;
  return j;
}

void add_linear(std::vector<StWriteTensor>& out, const std::string& prefix, const Linear& lin) {
  if (lin.quantized())
    hf::add_quantized_weight(out, prefix, lin.qweight);
  else
    out.push_back(st_f32(prefix + ".weight", lin.weight));
  if (!lin.bias.empty()) out.push_back(st_f32(prefix + ".bias", lin.bias));
}

// Embeddings, norms and the head of a quantized folder keep the float type of the model's
// source file (found under its Hugging Face or GGUF name) when their values allow it; dense
// folders stay F32 throughout.
class FloatTypes {
 public:
  FloatTypes(const Model& m, bool keep_source) {
    if (keep_source)
      for (const SourceTensor& t : m.source_tensors) type_[t.name] = t.type;
  }
  StWriteTensor tensor(const std::string& hf_name, const std::string& gguf_name,
                       const Tensor& t) const {
    StDtype dtype = StDtype::F32;
    for (const std::string& name : {hf_name, gguf_name}) {
      const auto it = type_.find(name);
      if (it != type_.end() && it->second == "F16") dtype = StDtype::F16;
      if (it != type_.end() && it->second == "BF16") dtype = StDtype::BF16;
    }
    return hf::st_float(hf_name, t.data(), t.shape(), dtype);
  }

 private:
  std::map<std::string, std::string> type_;
};

}  // namespace

std::vector<int64_t> rope_row_order(int64_t n_heads, int64_t head_dim, bool to_hf) {
  QL_CHECK(head_dim > 0 && head_dim % 2 == 0,
           "permute_rope_rows: head_dim must be positive and even, got ", head_dim);
  const int64_t half = head_dim / 2;
  std::vector<int64_t> src(static_cast<size_t>(n_heads * head_dim));
  // Pair layout row (h, 2i + j) holds what the halves layout keeps at row (h, j * d/2 + i).
  for (int64_t h = 0; h < n_heads; ++h)
    for (int64_t i = 0; i < half; ++i)
      for (int64_t j = 0; j < 2; ++j) {
        const int64_t pair_row = h * head_dim + 2 * i + j;
        const int64_t halves_row = h * head_dim + j * half + i;
        if (to_hf)
          src[halves_row] = pair_row;
        else
          src[pair_row] = halves_row;
      }
  return src;
}

Tensor permute_rope_rows(const Tensor& w, int64_t n_heads, int64_t head_dim, bool to_hf) {
  const std::vector<int64_t> src = rope_row_order(n_heads, head_dim, to_hf);
  QL_CHECK(w.rank() >= 1 && w.dim(0) == n_heads * head_dim, "permute_rope_rows: tensor shape ",
           shape_str(w.shape()), " expected ", n_heads * head_dim, " rows (", n_heads, " heads x ",
           head_dim, ")");
  const int64_t rows = w.dim(0);
  const size_t row_len = rows == 0 ? 0 : static_cast<size_t>(w.numel() / rows);
  Tensor out = Tensor::zeros(w.shape());
  float* dst = out.mutable_data();
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(dst + static_cast<size_t>(r) * row_len,
                w.data() + static_cast<size_t>(src[r]) * row_len, row_len * sizeof(float));
  return out;
}

QMatrix permute_rope_rows(const QMatrix& w, int64_t n_heads, int64_t head_dim, bool to_hf) {
  return permute_rows(w, rope_row_order(n_heads, head_dim, to_hf), "permute_rope_rows");
}

Linear permute_rope_rows(const Linear& lin, int64_t n_heads, int64_t head_dim, bool to_hf) {
  Linear out;
  if (lin.quantized())
    out.qweight = permute_rope_rows(lin.qweight, n_heads, head_dim, to_hf);
  else
    out.weight = permute_rope_rows(lin.weight, n_heads, head_dim, to_hf);
  if (!lin.bias.empty()) out.bias = permute_rope_rows(lin.bias, n_heads, head_dim, to_hf);
  return out;
}

Model load_hf_model(const fs::path& dir) {
  const fs::path config_path = dir / "config.json";
  const json config = hf::parse_json_file(config_path);
  Model m;
  // The config goes first so that a bad config is reported before any tensor is read.
  m.config = parse_config(config, config_path.string(), dir);
  const FolderQuant quant = hf::read_folder_quant(config, config_path.string(), dir);
  const HfWeights w(dir, quant.weights_file);
  // Without the field transformers would randomly initialise a missing lm_head; treating a
  // missing head as tied is the only useful reading.
  if (!ConfigJson(config, config_path.string()).has("tie_word_embeddings"))
    m.config.tied_embeddings = !w.has("lm_head.weight");
  const ModelConfig& c = m.config;
  m.format = ModelFormat::HuggingFace;
  m.source_path = dir.string();
  m.source_tensors = w.source_tensors();
  m.quant = quant.info;
  // GPTQModel can quantize the head too; only our own native head quantization is read.
  QL_CHECK(!w.has("lm_head.qweight") || quant.head_bits > 0, w.file_of("lm_head.qweight"),
           ": tensor 'lm_head.qweight': a quantized output head is not supported");

  if (quant.head_bits > 0) {
    // The head in its source quantization; the float head (or tied embedding) is its exact
    // dequantization, so the file stores it once.
    FolderQuant head = quant;
    head.type = QuantType::Affine;
    head.info.bits = quant.head_bits;
    head.info.group_size = quant.head_group_size;
    m.head_q = hf::load_quantized_weight(w, head, "lm_head", c.vocab_size, c.dim);
    QL_CHECK(!m.head_q.codes.empty(), w.file_of("lm_head.qweight"),
             ": tensor 'lm_head.qweight' is missing (quantize_config.json has a 'head' entry)");
    (c.tied_embeddings ? m.tok_embeddings : m.output) = dequantize(m.head_q);
  }
  if (m.tok_embeddings.empty())
    m.tok_embeddings = w.get("model.embed_tokens.weight", {c.vocab_size, c.dim});
  // Layer by layer, so that an absurd num_hidden_layers fails at the first missing tensor.
  for (int64_t l = 0; l < c.n_layers; ++l) {
    LayerWeights& L = m.layers.emplace_back();
    const std::string p = cat("model.layers.", l, ".");
    L.attn_norm = w.get(p + "input_layernorm.weight", {c.dim});
    L.q = load_linear(w, quant, p + "self_attn.q_proj", c.q_dim(), c.dim, c.qkv_bias);
    L.k = load_linear(w, quant, p + "self_attn.k_proj", c.kv_dim(), c.dim, c.qkv_bias);
    L.v = load_linear(w, quant, p + "self_attn.v_proj", c.kv_dim(), c.dim, c.qkv_bias);
    L.o = load_linear(w, quant, p + "self_attn.o_proj", c.dim, c.q_dim(), false);
    L.ffn_norm = w.get(p + "post_attention_layernorm.weight", {c.dim});
    L.gate = load_linear(w, quant, p + "mlp.gate_proj", c.hidden_dim, c.dim, false);
    L.up = load_linear(w, quant, p + "mlp.up_proj", c.hidden_dim, c.dim, false);
    L.down = load_linear(w, quant, p + "mlp.down_proj", c.dim, c.hidden_dim, false);
    if (quant.qk_halves) {
      L.q = permute_rope_rows(L.q, c.n_heads, c.head_dim, false);
      L.k = permute_rope_rows(L.k, c.n_kv_heads, c.head_dim, false);
    }
  }
  m.final_norm = w.get("model.norm.weight", {c.dim});
  if (!c.tied_embeddings && m.output.empty())
    m.output = w.get("lm_head.weight", {c.vocab_size, c.dim});
  m.tokenizer = load_folder_tokenizer(dir);
  if (!m.quant.empty()) {
    // The codes are copied into the QMatrix; copying the few float tensors too (norms,
    // biases) releases the memory map, whose touched pages would stay resident.
    for (LayerWeights& L : m.layers) {
      for (Tensor* t : {&L.attn_norm, &L.ffn_norm}) t->mutable_data();
      for (Linear* l : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down})
        for (Tensor* t : {&l->weight, &l->bias})
          if (!t->empty()) t->mutable_data();
    }
    for (Tensor* t : {&m.final_norm, &m.tok_embeddings, &m.output})
      if (!t->empty()) t->mutable_data();
  }
  return m;
}

void save_hf_model(const Model& model, const fs::path& dir) {
  const ModelConfig& c = model.config;
  // config.json can only describe RoPE by rope_scaling parameters, not by a table of divisors.
  QL_CHECK(c.rope_freq_factors.empty(), dir.string(),
           ": this model's per-frequency RoPE factors (GGUF rope_freqs.weight) have no config.json "
           "equivalent; it cannot be saved as a Hugging Face folder");
  std::optional<hf::NativeLayout> layout;
  if (hf::has_quantized_linear(model)) layout = hf::native_layout(model, dir.string());
  const bool qk_halves = !layout || layout->qk_halves;
  const FloatTypes floats(model, layout.has_value());
  const auto qk = [&](const Linear& lin, int64_t heads) {
    return qk_halves ? permute_rope_rows(lin, heads, c.head_dim, true) : lin;
  };

  // A native folder keeps a quantized head as such (see load_hf_model).
  const bool quantized_head = layout && !model.head_q.codes.empty();
  std::vector<StWriteTensor> tensors;
  if (quantized_head) hf::add_quantized_weight(tensors, "lm_head", model.head_q);
  if (!quantized_head || !c.tied_embeddings)
    tensors.push_back(
        floats.tensor("model.embed_tokens.weight", "token_embd.weight", model.tok_embeddings));
  for (size_t l = 0; l < model.layers.size(); ++l) {
    const LayerWeights& L = model.layers[l];
    const std::string p = cat("model.layers.", l, "."), g = cat("blk.", l, ".");
    tensors.push_back(
        floats.tensor(p + "input_layernorm.weight", g + "attn_norm.weight", L.attn_norm));
    add_linear(tensors, p + "self_attn.q_proj", qk(L.q, c.n_heads));
    add_linear(tensors, p + "self_attn.k_proj", qk(L.k, c.n_kv_heads));
    add_linear(tensors, p + "self_attn.v_proj", L.v);
    add_linear(tensors, p + "self_attn.o_proj", L.o);
    tensors.push_back(
        floats.tensor(p + "post_attention_layernorm.weight", g + "ffn_norm.weight", L.ffn_norm));
    add_linear(tensors, p + "mlp.gate_proj", L.gate);
    add_linear(tensors, p + "mlp.up_proj", L.up);
    add_linear(tensors, p + "mlp.down_proj", L.down);
  }
  tensors.push_back(floats.tensor("model.norm.weight", "output_norm.weight", model.final_norm));
  if (!model.output.empty() && !quantized_head)
    tensors.push_back(floats.tensor("lm_head.weight", "output.weight", model.output));

  std::error_code ec;
  fs::create_directories(dir, ec);
  QL_CHECK(!ec, dir.string(), ": cannot create folder: ", ec.message());
  // transformers refuses safetensors files whose metadata lacks a known "format".
  write_safetensors(dir / "model.safetensors", tensors, {{"format", "pt"}});
  json config = config_to_json(model);
  const fs::path quant_config = dir / "quantize_config.json";
  if (layout) {
    const json q = hf::native_quant_json(model, *layout);
    write_file_atomic(quant_config, q.dump(2) + "\n");
    config["quantization_config"] = q;
  } else {
    // A stale one from an earlier quantized save would make this dense folder read as quantized.
    fs::remove(quant_config, ec);
    QL_CHECK(!ec, quant_config.string(), ": cannot remove: ", ec.message());
  }
  // config.json last: it is what makes the folder a model.
  write_file_atomic(dir / "config.json", config.dump(2) + "\n");
  if (model.tokenizer) write_hf_tokenizer(model.tokenizer->data(), dir);
}

}  // namespace qalora
