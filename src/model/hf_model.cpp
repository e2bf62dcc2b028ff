// Hugging Face folders: config.json + model.safetensors (or shards listed in
// model.safetensors.index.json) + tokenizer.json / tokenizer.model. Quantized linears are read
// and written by quantized_io.cpp.
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <future>
#include <optional>

#include "model/hf_folder.h"
#include "qalora/core/atomic_file.h"
#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"
#include "qalora/core/output_lock.h"
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
  } catch (const json::exception& e) {  // parse_error, or out_of_range for a number like 1e999
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

Tensor HfWeights::stored(const std::string& name, const Shape& expected,
                         const std::string& context) const {
  const auto& [shard, info] = locate(name);
  check_shape(shards_[shard].path(), name, info->shape, expected, context);
  return shards_[shard].load(*info);
}

Tensor HfWeights::get(const std::string& name, const Shape& expected,
                      const std::string& context) const {
  return stored(name, expected, context).decoded();
}

const uint8_t* HfWeights::raw(const std::string& name, StDtype dtype, const Shape& expected,
                              const std::string& context) const {
  const auto& [shard, info] = locate(name);
  QL_CHECK(info->dtype == dtype, shards_[shard].path(), ": tensor '", name, "' has dtype ",
           st_dtype_name(info->dtype), ", expected ", st_dtype_name(dtype), context);
  check_shape(shards_[shard].path(), name, info->shape, expected, context);
  return shards_[shard].data(*info);
}

std::shared_ptr<const void> HfWeights::owner(const std::string& name) const {
  return shards_[locate(name).first].mapping();
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

json config_json(const Model& model) {
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
  if (!lin.quantized()) lin.weight = w.stored(prefix + ".weight", {out, in});
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

// Embeddings, norms and the head of a quantized folder keep the float type of the model's
// source file (found under its Hugging Face or GGUF name) when their values allow it; dense
// folders stay F32 throughout.
class FloatTypes {
 public:
  explicit FloatTypes(const Model& m) {
    for (const SourceTensor& t : m.source_tensors) type_[t.name] = t.type;
  }
  StWriteTensor tensor(const std::string& hf_name, const std::string& gguf_name, const Tensor& t,
                       bool keep_source) const {
    StDtype dtype = StDtype::F32;
    if (keep_source)
      for (const std::string& name : {hf_name, gguf_name}) {
        const auto it = type_.find(name);
        if (it != type_.end() && it->second == "F16") dtype = StDtype::F16;
        if (it != type_.end() && it->second == "BF16") dtype = StDtype::BF16;
      }
    return hf::st_float(hf_name, t, dtype);
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
  QL_CHECK(w.rank() >= 1 && w.dim(0) == n_heads * head_dim, "permute_rope_rows: tensor shape ",
           shape_str(w.shape()), " expected ", n_heads * head_dim, " rows (", n_heads, " heads x ",
           head_dim, ")");
  return w.permuted_rows(rope_row_order(n_heads, head_dim, to_hf));
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

Model load_hf_model(const fs::path& dir, bool describe_only) {
  const fs::path config_path = dir / "config.json";
  const json config = hf::parse_json_file(config_path);
  Model m;
  // The config goes first so that a bad config is reported before any tensor is read.
  m.config = parse_config(config, config_path.string(), dir);
  FolderQuant quant = hf::read_folder_quant(config, config_path.string(), dir);
  quant.describe_only = describe_only;
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
    head.describe_only = false;  // the float head is computed from it
    head.type = QuantType::Affine;
    head.info.bits = quant.head_bits;
    head.info.group_size = quant.head_group_size;
    m.head_q = hf::load_quantized_weight(w, head, "lm_head", c.vocab_size, c.dim);
    QL_CHECK(!m.head_q.codes.empty(), w.file_of("lm_head.qweight"),
             ": tensor 'lm_head.qweight' is missing (quantize_config.json has a 'head' entry)");
    (c.tied_embeddings ? m.tok_embeddings : m.output) = dequantize(m.head_q);
  }
  if (m.tok_embeddings.empty())
    m.tok_embeddings = w.stored("model.embed_tokens.weight", {c.vocab_size, c.dim});
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
    m.output = w.stored("lm_head.weight", {c.vocab_size, c.dim});
  m.tokenizer = load_folder_tokenizer(dir);
  return m;
}

namespace {

// Model weight files a folder may hold from an earlier save; they are replaced as a set.
bool is_weights_file(const std::string& name) {
  return name == "model.safetensors" || name == "model.safetensors.index.json" ||
         (name.starts_with("model-") && name.ends_with(".safetensors"));
}

fs::path partial_path(const fs::path& dir) {
  fs::path d = dir.lexically_normal();
  if (!d.has_filename()) d = d.parent_path();
  return d.string() + ".partial";
}

}  // namespace

struct ModelFolderWriter::Impl {
  const Model& model;
  fs::path dir, partial;
  int64_t shard_bytes;
  std::optional<hf::NativeLayout> layout;  // set by block 0 when the folder is quantized
  FloatTypes floats;
  std::vector<StWriteTensor> pending;
  int64_t pending_bytes = 0;
  int64_t total_bytes = 0;
  std::vector<std::vector<std::string>> shard_names;  // tensors of each written shard
  // The previous shard, written to its file while the caller produces the next blocks, so the
  // write overlaps the work (done on the calling thread, the kernel's copy into the page cache
  // had taken a third of a 7B RTN's time, before files went with O_DIRECT). At most one shard
  // waits for it, so memory holds up to two.
  std::future<void> writing;
  int64_t next_block = 0;
  bool finished = false;
  // Two runs writing the same folder would share `partial`: the second is refused.
  std::optional<OutputLock> lock;

  // Dense float tensors rounded to this type (DenseFloats F16 / BF16), and what that did.
  std::optional<StDtype> rounded_type;
  std::vector<FloatRounding> rounding;

  Impl(const Model& m, fs::path d, int64_t shard, DenseFloats dense)
      : model(m), dir(std::move(d)), partial(partial_path(dir)), shard_bytes(shard), floats(m) {
    if (dense != DenseFloats::F32)
      rounded_type = dense == DenseFloats::F16 ? StDtype::F16 : StDtype::BF16;
  }

  // A dense float tensor as the folder stores it.
  StWriteTensor dense_tensor(const std::string& name, const Tensor& t) {
    if (!rounded_type) return st_f32(name, t);
    return hf::st_rounded(name, t, *rounded_type, rounding.emplace_back());
  }
  // Float tensors are read once, so their mapped pages are dropped once converted.
  void add_float(const std::string& hf_name, const std::string& gguf_name, const Tensor& t) {
    // (A quantized folder never rounds: write_block refuses it.)
    add(rounded_type ? dense_tensor(hf_name, t)
                     : floats.tensor(hf_name, gguf_name, t, layout.has_value()));
    t.release_pages();
  }
  void add(StWriteTensor t) {
    pending_bytes += static_cast<int64_t>(t.bytes.size());
    pending.push_back(std::move(t));
  }
  void add_linear(const std::string& prefix, const Linear& lin) {
    if (lin.quantized()) {
      std::vector<StWriteTensor> out;
      hf::add_quantized_weight(out, prefix, lin.qweight);
      for (StWriteTensor& t : out) add(std::move(t));
    } else {
      add(dense_tensor(prefix + ".weight", lin.weight));
    }
    if (!lin.bias.empty()) add(dense_tensor(prefix + ".bias", lin.bias));
  }
  void flush() {
    if (pending.empty()) return;
    wait_for_writing();
    std::vector<std::string>& names = shard_names.emplace_back();
    for (const StWriteTensor& t : pending) names.push_back(t.name);
    writing = std::async(std::launch::async,
                         [tensors = std::move(pending),
                          path = partial / cat("shard-", shard_names.size(), ".safetensors")] {
                           // transformers refuses safetensors files whose metadata lacks a
                           // known "format".
                           write_safetensors(path, tensors, {{"format", "pt"}});
                         });
    total_bytes += pending_bytes;
    pending.clear();
    pending_bytes = 0;
  }
  // Rethrows the shard writer's error, if it had one.
  void wait_for_writing() {
    if (writing.valid()) writing.get();
  }
  // The shards under their final names, and the index that lists them when there are several.
  void name_shards() {
    const size_t n = shard_names.size();
    if (n == 1) {
      fs::rename(partial / "shard-1.safetensors", partial / "model.safetensors");
      return;
    }
    json map = json::object();
    for (size_t s = 0; s < n; ++s) {
      char name[64];
      std::snprintf(name, sizeof(name), "model-%05zu-of-%05zu.safetensors", s + 1, n);
      fs::rename(partial / cat("shard-", s + 1, ".safetensors"), partial / name);
      for (const std::string& t : shard_names[s]) map[t] = name;
    }
    const json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", map}};
    write_file_atomic(partial / "model.safetensors.index.json", index.dump(2) + "\n");
  }
  // Moves the finished files into `dir`: in one rename when `dir` is new (or empty), so that it
  // is either absent or complete. Otherwise config.json goes last, and an older one goes first:
  // until the move ends the folder is not a loadable model, never a mix of two.
  void publish() {
    std::error_code ec;
    fs::remove(partial / OutputLock::kFileName, ec);
    if (!fs::exists(dir) || fs::is_empty(dir)) {
      fs::rename(partial, dir, ec);
      QL_CHECK(!ec, dir.string(), ": cannot rename ", partial.string(),
               " into place: ", ec.message());
      return;
    }
    fs::create_directories(dir, ec);
    QL_CHECK(!ec, dir.string(), ": cannot create folder: ", ec.message());
    fs::remove(dir / "config.json", ec);
    for (const auto& e : fs::directory_iterator(dir))
      if (is_weights_file(e.path().filename().string()) ||
          e.path().filename() == "quantize_config.json")
        fs::remove(e.path());
    for (const auto& e : fs::directory_iterator(partial))
      if (e.path().filename() != "config.json") fs::rename(e.path(), dir / e.path().filename());
    fs::rename(partial / "config.json", dir / "config.json");
    fs::remove(partial, ec);
  }
};

ModelFolderWriter::ModelFolderWriter(const Model& model, const fs::path& dir, int64_t shard_bytes,
                                     DenseFloats floats)
    : impl_(std::make_unique<Impl>(model, dir, shard_bytes, floats)) {
  const ModelConfig& c = model.config;
  // config.json can only describe RoPE by rope_scaling parameters, not by a table of divisors.
  QL_CHECK(c.rope_freq_factors.empty(), dir.string(),
           ": this model's per-frequency RoPE factors (GGUF rope_freqs.weight) have no config.json "
           "equivalent; it cannot be saved as a Hugging Face folder");
  QL_CHECK(!fs::exists(dir) || fs::is_directory(dir), dir.string(), ": exists and is not a folder");
  impl_->lock.emplace(impl_->partial, dir.string().c_str());
  // Whatever an interrupted run left.
  for (const auto& e : fs::directory_iterator(impl_->partial))
    if (e.path().filename() != OutputLock::kFileName) fs::remove_all(e.path());
}

ModelFolderWriter::~ModelFolderWriter() {
  if (impl_->finished) return;
  if (impl_->writing.valid()) impl_->writing.wait();  // its error is moot: the output is dropped
  std::error_code ec;
  fs::remove_all(impl_->partial, ec);
}

void ModelFolderWriter::write_block(int64_t index, const LayerWeights& L) {
  Impl& w = *impl_;
  const ModelConfig& c = w.model.config;
  QL_CHECK(index == w.next_block && index < c.n_layers, w.dir.string(), ": block ", index,
           " written out of order, expected block ", w.next_block);
  const std::span<const LayerWeights> block(&L, 1);
  const bool quantized = hf::has_quantized_linear_in(block);
  if (index == 0) {
    // The first block decides; a quantized folder records one layout for every block.
    if (quantized) w.layout = hf::native_layout(w.model.quant, block, w.dir.string());
    QL_CHECK(!quantized || !w.rounded_type, w.dir.string(),
             ": a quantized folder keeps the float types of its source; only a dense folder's "
             "floats can be rounded to F16 or BF16");
  } else if (w.layout) {
    hf::check_same_quantization(L, index, *w.layout, w.dir.string());
    hf::native_layout(w.model.quant, block, w.dir.string(), index);  // validates the block
  } else {
    QL_CHECK(!quantized, w.dir.string(), ": block ", index,
             " has quantized linears but block 0 has none; a folder holds one quantization");
  }
  // Dense folders are Hugging Face checkpoints: q/k go to its halves layout. Quantized folders
  // are ours and keep the runtime's pair order (qk_rope_layout "pairs").
  const auto qk = [&](const Linear& lin, int64_t heads) {
    return w.layout ? lin : permute_rope_rows(lin, heads, c.head_dim, true);
  };
  const std::string p = cat("model.layers.", index, "."), g = cat("blk.", index, ".");
  w.add_float(p + "input_layernorm.weight", g + "attn_norm.weight", L.attn_norm);
  w.add_linear(p + "self_attn.q_proj", qk(L.q, c.n_heads));
  w.add_linear(p + "self_attn.k_proj", qk(L.k, c.n_kv_heads));
  w.add_linear(p + "self_attn.v_proj", L.v);
  w.add_linear(p + "self_attn.o_proj", L.o);
  w.add_float(p + "post_attention_layernorm.weight", g + "ffn_norm.weight", L.ffn_norm);
  w.add_linear(p + "mlp.gate_proj", L.gate);
  w.add_linear(p + "mlp.up_proj", L.up);
  w.add_linear(p + "mlp.down_proj", L.down);
  L.release_pages();  // copied into the pending shard
  ++w.next_block;
  if (w.pending_bytes >= w.shard_bytes) w.flush();
}

void ModelFolderWriter::finish() {
  Impl& w = *impl_;
  const Model& model = w.model;
  const ModelConfig& c = model.config;
  QL_CHECK(w.next_block == c.n_layers, w.dir.string(), ": ", w.next_block, " of ", c.n_layers,
           " blocks written");
  // A native folder keeps a quantized head as such (see load_hf_model).
  const bool quantized_head = w.layout && !model.head_q.codes.empty();
  if (quantized_head) {
    std::vector<StWriteTensor> head;
    hf::add_quantized_weight(head, "lm_head", model.head_q);
    for (StWriteTensor& t : head) w.add(std::move(t));
  }
  if (!quantized_head || !c.tied_embeddings)
    w.add_float("model.embed_tokens.weight", "token_embd.weight", model.tok_embeddings);
  w.add_float("model.norm.weight", "output_norm.weight", model.final_norm);
  if (!model.output.empty() && !quantized_head)
    w.add_float("lm_head.weight", "output.weight", model.output);
  w.flush();
  w.wait_for_writing();
  w.name_shards();

  json config = hf::config_json(model);
  if (w.rounded_type)
    config["torch_dtype"] = *w.rounded_type == StDtype::F16 ? "float16" : "bfloat16";
  if (w.layout) {
    const json q = hf::native_quant_json(model, *w.layout);
    write_file_atomic(w.partial / "quantize_config.json", q.dump(2) + "\n");
    config["quantization_config"] = q;
  }
  if (model.tokenizer) write_hf_tokenizer(model.tokenizer->data(), w.partial);
  write_file_atomic(w.partial / "config.json", config.dump(2) + "\n");
  w.publish();
  w.finished = true;
}

const std::vector<FloatRounding>& ModelFolderWriter::rounding() const {
  return impl_->rounding;
}

std::vector<FloatRounding> save_hf_model_by_block(
    const Model& record, const Model& model, const fs::path& dir, DenseFloats floats,
    const std::function<void(LayerWeights& block, int64_t index)>& change) {
  ModelFolderWriter writer(record, dir, ModelFolderWriter::kDefaultShardBytes, floats);
  for (size_t l = 0; l < model.layers.size(); ++l) {
    LayerWeights block = model.layers[l];  // shares the weights until `change` writes them
    change(block, static_cast<int64_t>(l));
    writer.write_block(static_cast<int64_t>(l), block);
    model.layers[l].release_pages();
  }
  writer.finish();
  return writer.rounding();
}

std::vector<FloatRounding> save_hf_model(const Model& model, const fs::path& dir,
                                         DenseFloats floats) {
  ModelFolderWriter writer(model, dir, ModelFolderWriter::kDefaultShardBytes, floats);
  for (int64_t l = 0; l < static_cast<int64_t>(model.layers.size()); ++l)
    writer.write_block(l, model.layers[static_cast<size_t>(l)]);
  writer.finish();
  return writer.rounding();
}

}  // namespace qalora
