// Adapter folders: qalora's native layout (everything in memory, stored as is) and PEFT's
// (adapter_config.json + adapter_model.safetensors, Hugging Face RoPE layout). The formats are
// documented in docs/adapters.md.
#include "qalora/adapters/adapter_io.h"

#include <algorithm>
#include <charconv>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "model/hf_folder.h"
#include "qalora/core/atomic_file.h"
#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"
#include "qalora/io/safetensors.h"
#include "qalora/model/model.h"

namespace qalora {

namespace {

namespace fs = std::filesystem;
using hf::ConfigJson;
using nlohmann::json;

constexpr const char* kNativeConfig = "qalora_adapter.json";
constexpr const char* kNativeWeights = "qalora_adapter.safetensors";
constexpr const char* kPeftConfig = "adapter_config.json";
constexpr const char* kPeftWeights = "adapter_model.safetensors";
constexpr const char* kReadme = "README.md";
// First line of the README written instead of the PEFT files; a later save that writes PEFT
// files removes a README starting with it (and leaves any other README alone).
constexpr const char* kReadmeTitle = "# qalora adapter without PEFT files";
constexpr int64_t kNativeVersion = 1;
constexpr const char* kPeftLayers = "base_model.model.model.layers.";

// The dimensions of BaseIdentity, as named in qalora_adapter.json's "base".
const std::pair<const char*, int64_t BaseIdentity::*> kBaseDims[] = {
    {"vocab_size", &BaseIdentity::vocab_size}, {"dim", &BaseIdentity::dim},
    {"hidden_dim", &BaseIdentity::hidden_dim}, {"n_layers", &BaseIdentity::n_layers},
    {"n_heads", &BaseIdentity::n_heads},       {"n_kv_heads", &BaseIdentity::n_kv_heads}};

Target target_at(int i) {
  return static_cast<Target>(i);
}

// q_proj/k_proj outputs are rotated by RoPE, so their rows follow the layout; heads of each.
bool rope_rows(Target t) {
  return t == Target::Q || t == Target::K;
}
int64_t rope_heads(const ModelConfig& c, Target t) {
  return t == Target::Q ? c.n_heads : c.n_kv_heads;
}

std::string native_key(int64_t layer, Target t, const char* matrix) {
  return cat("layers.", layer, ".", target_name(t), ".", matrix);
}

// The module path after "layers.N." in Hugging Face's LlamaForCausalLM.
std::string peft_module(Target t) {
  return cat(t <= Target::O ? "self_attn." : "mlp.", target_name(t));
}
std::string peft_key(int64_t layer, Target t, const char* matrix) {
  return cat(kPeftLayers, layer, ".", peft_module(t), ".lora_", matrix, ".weight");
}

// PEFT's QA-LoRA computes B A_peft (L * mean_G(x)) with L = in / G; ours B A P(x). The same
// function needs A_peft = A * num / den: avg (P = mean) 1 / L, sum (P = G * mean) G / L.
// Computed in double, rounded once to float.
Tensor scaled(const Tensor& a, double num, double den) {
  Tensor out = Tensor::zeros(a.shape());
  float* o = out.mutable_data();
  for (int64_t i = 0; i < a.numel(); ++i)
    o[i] = static_cast<float>(static_cast<double>(a.data()[i]) * num / den);
  return out;
}

// Rethrows an Error of a name parser (parse_targets, parse_adapter_kind, ...) with the file and
// field in front.
template <typename Parse>
auto parse_field(const std::string& file, const std::string& field, std::string_view value,
                 Parse&& parse) {
  try {
    return parse(value);
  } catch (const Error& e) {
    fail(file, ": field '", field, "': ", e.what());
  }
}

// A required string field of `j` (`where` names the file and, for nested objects, the object).
std::string string_field(const json& j, const std::string& where, const char* key) {
  QL_CHECK(j.contains(key) && !j[key].is_null(), where, ": missing required field '", key, "'");
  QL_CHECK(j[key].is_string(), where, ": field '", key, "' must be a string, got ", j[key].dump());
  return j[key].get<std::string>();
}

double number_field(const ConfigJson& c, const char* key) {
  QL_CHECK(c.has(key), c.file(), ": missing required field '", key, "'");
  return c.float_or(key, 0.0);
}

bool bool_field(const ConfigJson& c, const char* key) {
  QL_CHECK(c.has(key), c.file(), ": missing required field '", key, "'");
  return c.bool_or(key, false);
}

float dropout_field(const ConfigJson& c, const char* key, double value) {
  QL_CHECK(value >= 0.0 && value < 1.0, c.file(), ": field '", key, "' must be in [0, 1), got ",
           value);
  return static_cast<float>(value);
}

// target_modules / targets: a list of names or one string ("all-linear", "q_proj,v_proj").
std::vector<Target> targets_field(const json& j, const std::string& file, const char* key) {
  QL_CHECK(j.contains(key) && !j[key].is_null(), file, ": missing required field '", key, "'");
  const json& v = j[key];
  std::string list;
  if (v.is_string()) {
    list = v.get<std::string>();
  } else {
    QL_CHECK(v.is_array() && !v.empty(), file, ": field '", key,
             "' must be a non-empty list of module names, got ", v.dump());
    for (const json& name : v) {
      QL_CHECK(name.is_string(), file, ": field '", key, "' must list module names, got ",
               name.dump());
      if (!list.empty()) list += ',';
      list += name.get<std::string>();
    }
  }
  return parse_field(file, key, list, parse_targets);
}

json read_json_object(const fs::path& path) {
  const json j = hf::parse_json_file(path);
  QL_CHECK(j.is_object(), path.string(), ": expected a JSON object, got ", j.type_name());
  return j;
}

SafetensorsFile open_weights(const fs::path& dir, const char* weights, const char* config) {
  const fs::path path = dir / weights;
  QL_CHECK(fs::exists(path), path.string(), ": file not found (", config,
           " is there and needs it)");
  return SafetensorsFile::open(path);
}

// The tensor `name` of `st` as fp32 with shape `expected`; `context` ends the shape error.
Tensor load_tensor(const SafetensorsFile& st, const std::string& name, const Shape& expected,
                   const std::string& context) {
  const StTensorInfo* info = st.find(name);
  QL_CHECK(info != nullptr, st.path(), ": missing tensor '", name, "'");
  check_shape(st.path(), name, info->shape, expected, context);
  return st.load_f32(*info);
}

// `where` is "<file>" or "save_adapter: the adapter set"; the dimensions must be the model's.
void check_same_base(const BaseIdentity& adapter, const BaseIdentity& model,
                     const std::string& where) {
  QL_CHECK(adapter.arch == model.arch, where, ": field 'base.arch' is '", adapter.arch,
           "', the model's is '", model.arch, "'");
  for (const auto& [field, member] : kBaseDims)
    QL_CHECK(adapter.*member == model.*member, where, ": field 'base.", field, "' is ",
             adapter.*member, ", the model's is ", model.*member);
}

void sort_adapters(AdapterSet& set) {
  std::sort(set.adapters.begin(), set.adapters.end(),
            [](const LoraAdapter& x, const LoraAdapter& y) {
              return std::pair(x.layer, x.target) < std::pair(y.layer, y.target);
            });
}

// ---- native layout ----------------------------------------------------------------------------

std::string native_json(const AdapterSet& set) {
  const AdapterConfig& c = set.config;
  nlohmann::ordered_json targets = nlohmann::ordered_json::array();
  for (Target t : c.targets) targets.push_back(target_name(t));
  nlohmann::ordered_json base = {{"name", set.base.name}, {"arch", set.base.arch}};
  for (const auto& [field, member] : kBaseDims) base[field] = set.base.*member;
  base["quant_method"] = set.base.quant_method;
  base["bits"] = set.base.bits;
  base["group_size"] = set.base.group_size;
  nlohmann::ordered_json layout = nlohmann::ordered_json::array();
  for (const LoraAdapter& a : set.adapters)
    layout.push_back({{"layer", a.layer},
                      {"target", target_name(a.target)},
                      {"in", a.in},
                      {"out", a.out},
                      {"group_size", a.group_size},
                      {"n_groups", a.n_groups}});
  const nlohmann::ordered_json j = {{"format_version", kNativeVersion},
                                    {"kind", adapter_kind_name(c.kind)},
                                    {"rank", c.rank},
                                    {"alpha", hf::json_float(c.alpha)},
                                    {"dropout", hf::json_float(c.dropout)},
                                    {"rslora", c.rslora},
                                    {"targets", targets},
                                    {"init", adapter_init_name(c.init)},
                                    {"pool", adapter_pool_name(c.pool)},
                                    {"seed", c.seed},
                                    {"base", base},
                                    {"adapters", layout}};
  return j.dump(2) + "\n";
}

void write_native(const AdapterSet& set, const fs::path& dir) {
  std::vector<StWriteTensor> tensors;
  for (const LoraAdapter& a : set.adapters) {
    tensors.push_back(st_f32(native_key(a.layer, a.target, "A"), a.A));
    tensors.push_back(st_f32(native_key(a.layer, a.target, "B"), a.B));
  }
  // The weights first: a config on disk always describes a complete weights file.
  write_safetensors(dir / kNativeWeights, tensors);
  write_file_atomic(dir / kNativeConfig, native_json(set));
}

AdapterConfig read_native_config(const json& j, const std::string& file) {
  const ConfigJson c(j, file);
  AdapterConfig cfg;
  cfg.kind = parse_field(file, "kind", string_field(j, file, "kind"), parse_adapter_kind);
  cfg.rank = c.positive("rank");
  cfg.alpha = static_cast<float>(number_field(c, "alpha"));
  cfg.dropout = dropout_field(c, "dropout", number_field(c, "dropout"));
  cfg.rslora = bool_field(c, "rslora");
  QL_CHECK(!j.contains("targets") || j["targets"].is_array(), file,
           ": field 'targets' must be a list of target names, got ", j["targets"].dump());
  cfg.targets = targets_field(j, file, "targets");
  cfg.init = parse_field(file, "init", string_field(j, file, "init"), parse_adapter_init);
  cfg.pool = parse_field(file, "pool", string_field(j, file, "pool"), parse_adapter_pool);
  QL_CHECK(j.contains("seed") && j["seed"].is_number_unsigned(), file,
           ": field 'seed' must be a non-negative integer, got ",
           j.contains("seed") ? j["seed"].dump() : "nothing");
  cfg.seed = j["seed"].get<uint64_t>();
  return cfg;
}

BaseIdentity read_native_base(const json& j, const std::string& file) {
  QL_CHECK(j.contains("base") && j["base"].is_object(), file,
           ": field 'base' must be an object, got ",
           j.contains("base") ? j["base"].dump() : "nothing");
  const json& b = j["base"];
  const std::string where = cat(file, ": base");
  const ConfigJson c(b, where);
  BaseIdentity base;
  base.name = string_field(b, where, "name");
  base.arch = string_field(b, where, "arch");
  for (const auto& [field, member] : kBaseDims) base.*member = c.positive(field);
  base.quant_method = string_field(b, where, "quant_method");
  base.bits = static_cast<int>(c.integer("bits"));
  base.group_size = c.integer("group_size");
  return base;
}

AdapterSet read_native(const fs::path& dir, const Model& model) {
  const std::string file = (dir / kNativeConfig).string();
  const json j = read_json_object(dir / kNativeConfig);
  const int64_t version = ConfigJson(j, file).integer("format_version");
  QL_CHECK(version == kNativeVersion, file, ": field 'format_version' is ", version, ", expected ",
           kNativeVersion, " (written by a newer qalora?)");
  AdapterSet set;
  set.config = read_native_config(j, file);
  set.base = read_native_base(j, file);
  check_same_base(set.base, base_identity(model), file);

  QL_CHECK(j.contains("adapters") && j["adapters"].is_array(), file,
           ": field 'adapters' must be a list, got ",
           j.contains("adapters") ? j["adapters"].dump() : "nothing");
  const SafetensorsFile st = open_weights(dir, kNativeWeights, kNativeConfig);
  const bool qalora = set.config.kind == AdapterKind::QaLora;
  const int64_t r = set.config.rank;
  std::set<std::string> listed;  // tensor names the config accounts for
  for (size_t i = 0; i < j["adapters"].size(); ++i) {
    const json& e = j["adapters"][i];
    const std::string where = cat(file, ": adapters[", i, "]");
    QL_CHECK(e.is_object(), where, " must be an object, got ", e.dump());
    const ConfigJson c(e, where);
    LoraAdapter a;
    a.layer = c.integer("layer");
    QL_CHECK(a.layer >= 0 && a.layer < model.config.n_layers, where, ": field 'layer' is ", a.layer,
             ", the model has layers 0..", model.config.n_layers - 1);
    const std::vector<Target> t =
        parse_field(where, "target", string_field(e, where, "target"), parse_targets);
    QL_CHECK(t.size() == 1, where, ": field 'target' must name one linear layer, got '",
             string_field(e, where, "target"), "'");
    a.target = t[0];
    a.in = c.positive("in");
    a.out = c.positive("out");
    a.group_size = c.integer("group_size");
    a.n_groups = c.integer("n_groups");
    if (qalora) {
      QL_CHECK(a.group_size > 0, where, ": field 'group_size' must be positive for a qalora ",
               "adapter, got ", a.group_size);
      const int64_t groups = (a.in + a.group_size - 1) / a.group_size;
      QL_CHECK(a.n_groups == groups, where, ": field 'n_groups' is ", a.n_groups, ", expected ",
               groups, " (in ", a.in, " / group_size ", a.group_size, ", rounded up)");
      a.pool = set.config.pool;
    } else {
      QL_CHECK(a.group_size == 0 && a.n_groups == 0, where,
               ": fields 'group_size' and 'n_groups' must be 0 for a lora adapter, got ",
               a.group_size, " and ", a.n_groups);
    }
    QL_CHECK(std::find(set.config.targets.begin(), set.config.targets.end(), a.target) !=
                 set.config.targets.end(),
             where, ": field 'target' is ", target_name(a.target),
             ", which field 'targets' does not list");
    const std::string context = cat(" (rank ", r, " and adapters[", i, "] in ", kNativeConfig, ")");
    const std::string key_a = native_key(a.layer, a.target, "A");
    const std::string key_b = native_key(a.layer, a.target, "B");
    a.A = load_tensor(st, key_a, {r, qalora ? a.n_groups : a.in}, context);
    a.B = load_tensor(st, key_b, {a.out, r}, context);
    listed.insert({key_a, key_b});
    set.adapters.push_back(std::move(a));
  }
  for (const StTensorInfo& t : st.tensors())
    QL_CHECK(listed.count(t.name) != 0, st.path(), ": tensor '", t.name,
             "' is not an adapter listed in ", kNativeConfig);
  sort_adapters(set);
  return set;
}

// ---- PEFT layout ------------------------------------------------------------------------------

// Why PEFT cannot hold this set, one line per reason; empty when it can. PEFT's QA-LoRA has one
// qalora_group_size for all layers and requires it to divide every input size.
std::vector<std::string> peft_obstacles(const AdapterSet& set) {
  std::map<std::pair<Target, int64_t>, std::vector<int64_t>> ragged;  // (target, G) -> layers
  std::map<int64_t, std::vector<std::string>> sizes;                  // G -> "layer 0 q_proj"
  for (const LoraAdapter& a : set.adapters) {
    if (!a.pooled()) continue;
    if (a.in % a.group_size != 0) ragged[{a.target, a.group_size}].push_back(a.layer);
    sizes[a.group_size].push_back(cat("layer ", a.layer, " ", target_name(a.target)));
  }
  std::vector<std::string> why;
  for (const auto& [key, layers] : ragged) {
    const auto& [t, group] = key;
    const int64_t in = set.find(layers.front(), t)->in;
    std::string list;
    for (int64_t l : layers) list += cat(list.empty() ? "" : ", ", l);
    why.push_back(cat(target_name(t), " (layers ", list, "): ", in, " inputs in groups of ", group,
                      ", the last group holds ", in % group));
  }
  if (sizes.size() > 1)
    for (const auto& [group, layers] : sizes)
      why.push_back(
          cat("group size ", group, ": ", layers.size(), " layers, the first ", layers.front()));
  return why;
}

std::string readme(const std::vector<std::string>& why) {
  std::string s =
      cat(kReadmeTitle, "\n\n",
          "This folder holds a QA-LoRA adapter in qalora's native layout only: ", kNativeConfig,
          " and ", kNativeWeights, ". qalora loads it from these files.\n\n", "The PEFT files (",
          kPeftConfig, ", ", kPeftWeights,
          ") were not written: PEFT's QA-LoRA (use_qalora) pools the input of every ",
          "adapted layer in groups of one size, qalora_group_size, and requires it to ",
          "divide the layer's input size. The groups of this adapter follow the base's ",
          "quantization groups, and PEFT cannot express them:\n\n");
  for (const std::string& line : why) s += cat("- ", line, "\n");
  s += "\nMerging the adapter into the quantized base gives a model that needs no adapter files.\n";
  return s;
}

std::string peft_config_json(const AdapterSet& set, const Model& model) {
  const AdapterConfig& c = set.config;
  json targets = json::array();
  for (Target t : c.targets) targets.push_back(target_name(t));
  json j = {{"peft_type", "LORA"},
            {"task_type", "CAUSAL_LM"},
            {"base_model_name_or_path", set.base.name.empty() ? model.source_path : set.base.name},
            {"r", c.rank},
            {"lora_alpha", hf::json_float(c.alpha)},
            {"lora_dropout", hf::json_float(c.dropout)},
            {"target_modules", targets},
            {"use_rslora", c.rslora},
            {"bias", "none"},
            {"fan_in_fan_out", false},
            {"init_lora_weights", c.init == AdapterInit::Gaussian ? json("gaussian") : json(true)},
            {"inference_mode", true},
            {"modules_to_save", nullptr}};
  if (c.kind == AdapterKind::QaLora) {
    j["use_qalora"] = true;
    j["qalora_group_size"] = set.adapters.front().group_size;
  }
  return j.dump(2) + "\n";  // sorted keys, as PEFT writes them
}

void write_peft(const AdapterSet& set, const Model& model, const fs::path& dir) {
  std::vector<StWriteTensor> tensors;
  for (const LoraAdapter& a : set.adapters) {
    Tensor A = a.A;
    if (a.pooled()) {
      const auto L = static_cast<double>(a.n_groups);
      A = a.pool == AdapterPool::Average ? scaled(a.A, 1.0, L)
                                         : scaled(a.A, static_cast<double>(a.group_size), L);
    }
    const Tensor B = rope_rows(a.target)
                         ? permute_rope_rows(a.B, rope_heads(model.config, a.target),
                                             model.config.head_dim, /*to_hf=*/true)
                         : a.B;
    tensors.push_back(st_f32(peft_key(a.layer, a.target, "A"), A));
    tensors.push_back(st_f32(peft_key(a.layer, a.target, "B"), B));
  }
  write_safetensors(dir / kPeftWeights, tensors, {{"format", "pt"}});
  write_file_atomic(dir / kPeftConfig, peft_config_json(set, model));
}

// PEFT features whose adapters compute something qalora does not; each field must be absent,
// null, false, "none" or empty.
constexpr std::pair<const char*, const char*> kPeftUnsupported[] = {
    {"bias", "trained bias terms"},
    {"modules_to_save", "fully trained modules besides the LoRA weights"},
    {"layers_to_transform", "adapters on a subset of layers"},
    {"fan_in_fan_out", "transposed (Conv1D) weights"},
    {"use_dora", "DoRA"},
    {"lora_bias", "a bias on lora_B"},
    {"rank_pattern", "per-module ranks"},
    {"alpha_pattern", "per-module alphas"},
    {"layer_replication", "replicated layers"}};

bool neutral(const json& v) {
  return v.is_null() || v == false || v == "none" || ((v.is_array() || v.is_object()) && v.empty());
}

AdapterConfig read_peft_config(const json& j, const std::string& file, int64_t& group_size) {
  const ConfigJson c(j, file);
  const std::string type = string_field(j, file, "peft_type");
  QL_CHECK(type == "LORA", file, ": field 'peft_type' is '", type,
           "', expected LORA (the only PEFT method qalora reads)");
  for (const auto& [field, feature] : kPeftUnsupported)
    QL_CHECK(!j.contains(field) || neutral(j[field]), file, ": field '", field, "' is ",
             j[field].dump(), ": qalora does not support ", feature);
  AdapterConfig cfg;
  if (c.has("init_lora_weights")) {
    const json& init = j["init_lora_weights"];
    // Other initialisations (PiSSA, OLoRA, LoftQ, ...) change the base weights.
    QL_CHECK(init.is_boolean() || init == "gaussian", file, ": field 'init_lora_weights' is ",
             init.dump(),
             ", expected true, false or \"gaussian\" (initialisations that change the base ",
             "weights are not supported)");
    cfg.init = init == "gaussian" ? AdapterInit::Gaussian : AdapterInit::Kaiming;
  }
  cfg.rank = c.positive("r");
  cfg.alpha = static_cast<float>(number_field(c, "lora_alpha"));
  cfg.dropout = dropout_field(c, "lora_dropout", c.float_or("lora_dropout", 0.0));
  cfg.rslora = c.bool_or("use_rslora", false);
  cfg.kind = c.bool_or("use_qalora", false) ? AdapterKind::QaLora : AdapterKind::Lora;
  group_size = cfg.kind == AdapterKind::QaLora ? c.positive("qalora_group_size") : 0;
  cfg.targets = targets_field(j, file, "target_modules");
  cfg.pool = AdapterPool::Average;  // what PEFT's mean pooling is, after rescaling A
  cfg.seed = 0;
  return cfg;
}

struct PeftPair {
  const StTensorInfo* A = nullptr;
  const StTensorInfo* B = nullptr;
};

// Sorts the tensors of adapter_model.safetensors by (layer, target); anything else is an error.
std::map<std::pair<int64_t, Target>, PeftPair> index_peft_tensors(const SafetensorsFile& st,
                                                                  const AdapterConfig& cfg,
                                                                  int64_t n_layers) {
  const std::string expected =
      cat("expected ", kPeftLayers, "N.{self_attn,mlp}.<target>.lora_{A,B}.weight");
  std::map<std::pair<int64_t, Target>, PeftPair> pairs;
  for (const StTensorInfo& t : st.tensors()) {
    const std::string_view name = t.name;
    QL_CHECK(name.starts_with(kPeftLayers), st.path(), ": tensor '", name,
             "' is not a LoRA weight of a decoder layer (", expected, ")");
    const std::string_view rest = name.substr(std::string_view(kPeftLayers).size());
    int64_t layer = -1;
    const auto [end, ec] = std::from_chars(rest.data(), rest.data() + rest.size(), layer);
    QL_CHECK(ec == std::errc() && end < rest.data() + rest.size() && *end == '.', st.path(),
             ": tensor '", name, "' has no layer number (", expected, ")");
    const std::string_view module = rest.substr(static_cast<size_t>(end - rest.data()) + 1);
    const StTensorInfo** slot = nullptr;
    for (int i = 0; i < kNumTargets && slot == nullptr; ++i) {
      const Target target = target_at(i);
      const std::string m = peft_module(target);
      for (const char* matrix : {"A", "B"})
        if (module == cat(m, ".lora_", matrix, ".weight")) {
          QL_CHECK(std::find(cfg.targets.begin(), cfg.targets.end(), target) != cfg.targets.end(),
                   st.path(), ": tensor '", name, "' adapts ", target_name(target),
                   ", which target_modules in ", kPeftConfig, " does not list");
          QL_CHECK(layer >= 0 && layer < n_layers, st.path(), ": tensor '", name, "' is for layer ",
                   layer, ", the model has layers 0..", n_layers - 1);
          PeftPair& p = pairs[{layer, target}];
          slot = *matrix == 'A' ? &p.A : &p.B;
        }
    }
    QL_CHECK(slot != nullptr, st.path(), ": tensor '", name,
             "' is not a LoRA weight of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj or ",
             "down_proj (", expected, ")");
    *slot = &t;
  }
  return pairs;
}

AdapterSet read_peft(const fs::path& dir, const Model& model) {
  const std::string file = (dir / kPeftConfig).string();
  const json j = read_json_object(dir / kPeftConfig);
  AdapterSet set;
  int64_t group_size = 0;
  set.config = read_peft_config(j, file, group_size);
  // PEFT files do not record the base; the adapter belongs to the model it loads onto.
  set.base = base_identity(model);
  const AdapterConfig& cfg = set.config;

  const SafetensorsFile st = open_weights(dir, kPeftWeights, kPeftConfig);
  const int64_t n_layers = model.config.n_layers;
  const auto pairs = index_peft_tensors(st, cfg, n_layers);
  for (int64_t layer = 0; layer < n_layers; ++layer)
    for (Target t : cfg.targets) {
      const Linear& lin = target_linear(model.layers[static_cast<size_t>(layer)], t);
      LoraAdapter a;
      a.layer = layer;
      a.target = t;
      a.in = lin.in_features();
      a.out = lin.out_features();
      std::string context = cat(" (r ", cfg.rank, " in ", kPeftConfig, ", the model's ",
                                target_name(t), " has ", a.in, " inputs and ", a.out, " outputs");
      if (group_size > 0) {
        QL_CHECK(a.in % group_size == 0, file, ": field 'qalora_group_size' is ", group_size,
                 ", which does not divide the ", a.in, " inputs of ", target_name(t),
                 " (PEFT's QA-LoRA requires it to)");
        a.group_size = group_size;
        a.n_groups = a.in / group_size;
        a.pool = cfg.pool;
        context += cat(", ", a.n_groups, " groups of qalora_group_size");
      }
      context += ")";
      const auto it = pairs.find({layer, t});
      const PeftPair p = it == pairs.end() ? PeftPair{} : it->second;
      const std::string key_a = peft_key(layer, t, "A"), key_b = peft_key(layer, t, "B");
      QL_CHECK(p.A != nullptr, st.path(), ": missing tensor '", key_a, "' (", target_name(t),
               " is in target_modules)");
      QL_CHECK(p.B != nullptr, st.path(), ": missing tensor '", key_b, "' (", target_name(t),
               " is in target_modules)");
      a.A = load_tensor(st, key_a, {cfg.rank, a.pooled() ? a.n_groups : a.in}, context);
      a.B = load_tensor(st, key_b, {a.out, cfg.rank}, context);
      if (a.pooled()) a.A = scaled(a.A, static_cast<double>(a.n_groups), 1.0);
      if (rope_rows(t))
        a.B = permute_rope_rows(a.B, rope_heads(model.config, t), model.config.head_dim,
                                /*to_hf=*/false);
      set.adapters.push_back(std::move(a));
    }
  return set;
}

// Removes `path` when it exists; a failure (permissions) is an Error naming it.
void remove_file(const fs::path& path) {
  std::error_code ec;
  fs::remove(path, ec);
  QL_CHECK(!ec, path.string(), ": cannot remove stale file: ", ec.message());
}

void create_folder(const fs::path& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  QL_CHECK(!ec && fs::is_directory(dir), dir.string(), ": cannot create the adapter folder",
           ec ? cat(": ", ec.message()) : std::string());
}

bool is_our_readme(const fs::path& path) {
  if (!fs::exists(path)) return false;
  const std::string text = read_file(path);
  return text.starts_with(kReadmeTitle);
}

}  // namespace

void save_peft_adapter(const AdapterSet& set, const Model& model, const fs::path& dir) {
  check_adapters_match(set, model, "save_peft_adapter");
  check_same_base(set.base, base_identity(model), "save_peft_adapter: the adapter set");
  const std::vector<std::string> why = peft_obstacles(set);
  QL_CHECK(why.empty(), "PEFT cannot express this adapter: ", why.front(),
           " (PEFT's QA-LoRA needs one qalora_group_size that divides every adapted input size; "
           "merge the adapter into the base instead)");
  create_folder(dir);
  write_peft(set, model, dir);
}

void save_adapter(const AdapterSet& set, const Model& model, const fs::path& dir) {
  check_adapters_match(set, model, "save_adapter");
  check_same_base(set.base, base_identity(model), "save_adapter: the adapter set");
  create_folder(dir);

  write_native(set, dir);
  const std::vector<std::string> why = peft_obstacles(set);
  if (why.empty()) {
    save_peft_adapter(set, model, dir);
    if (is_our_readme(dir / kReadme)) remove_file(dir / kReadme);
  } else {
    // Stale PEFT files of an earlier save would describe another adapter.
    remove_file(dir / kPeftConfig);
    remove_file(dir / kPeftWeights);
    write_file_atomic(dir / kReadme, readme(why));
  }
}

AdapterSet load_adapter(const fs::path& dir, const Model& model) {
  QL_CHECK(fs::exists(dir), dir.string(), ": adapter folder not found");
  QL_CHECK(fs::is_directory(dir), dir.string(), ": expected an adapter folder, got a file");
  AdapterSet set;
  if (fs::exists(dir / kNativeConfig))
    set = read_native(dir, model);
  else if (fs::exists(dir / kPeftConfig))
    set = read_peft(dir, model);
  else
    fail(dir.string(), ": no adapter files: expected ", kNativeConfig, " + ", kNativeWeights,
         " (qalora) or ", kPeftConfig, " + ", kPeftWeights, " (PEFT)");
  check_adapters_match(set, model, dir.string());
  return set;
}

}  // namespace qalora
