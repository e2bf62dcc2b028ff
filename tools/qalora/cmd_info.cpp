// qalora info: what a model file holds — format, configuration, tensor types, tokenizer, chat
// template and, for a merged model, what was merged — or an adapter folder's configuration, as
// text or JSON.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "cli_common.h"
#include "commands.h"
#include "qalora/core/error.h"
#include "qalora/model/chat.h"
#include "qalora/model/quant_summary.h"

namespace qalora::cli {

namespace {

// Keys keep their insertion order, so the text view follows the same order.
using Json = nlohmann::ordered_json;

struct InfoArgs {
  ModelArgs model;
  bool tensors = false;
  bool json = false;
};

// A float widened to double prints as 9.99999974737875e-06; its shortest decimal form reads
// as the 1e-05 that the model file meant.
double decimal(float v) {
  return std::stod(cat(v));
}

const char* rope_scaling_name(RopeScaling::Type t) {
  switch (t) {
    case RopeScaling::Type::None:
      return "none";
    case RopeScaling::Type::Linear:
      return "linear";
    case RopeScaling::Type::Llama3:
      return "llama3";
  }
  return "?";
}

Json special_token(const Tokenizer& tok, int32_t id) {
  if (id < 0) return nullptr;
  return {{"id", id}, {"piece", tok.piece(id)}};
}

// null for a dense model.
Json describe_quantization(const Model& model) {
  const QuantSummary s = quant_summary(model);
  if (s.quantized == 0 && model.quant.empty()) return nullptr;
  const QuantInfo& q = model.quant;
  Json j = {{"method", q.method.empty() ? "unknown" : q.method},
            {"type", s.type},
            {"bits", s.bits != 0 ? s.bits : q.bits},
            {"group_size", q.group_size},
            {"sym", q.sym},
            {"act_order", q.act_order},
            {"static_groups", q.static_groups},
            {"double_quant", q.double_quant},
            {"quantized_linears", s.quantized},
            {"linears", s.linears},
            {"quantized_bytes", s.quantized_bytes},
            {"fp32_bytes", s.fp32_bytes}};
  if (!q.calibration.empty()) j["calibration"] = q.calibration;
  return j;
}

Json describe(const Model& model, bool list_tensors) {
  const ModelConfig& c = model.config;
  Json config = {{"dim", c.dim},
                 {"n_layers", c.n_layers},
                 {"n_heads", c.n_heads},
                 {"n_kv_heads", c.n_kv_heads},
                 {"head_dim", c.head_dim},
                 {"hidden_dim", c.hidden_dim},
                 {"vocab_size", c.vocab_size},
                 {"context_length", c.context_length},
                 {"rope_theta", decimal(c.rope_theta)},
                 {"norm_eps", decimal(c.norm_eps)},
                 {"tied_embeddings", c.tied_embeddings},
                 {"qkv_bias", c.qkv_bias}};
  config["rope_scaling"] = {{"type", rope_scaling_name(c.rope_scaling.type)}};
  if (c.rope_scaling.type != RopeScaling::Type::None) {
    config["rope_scaling"]["factor"] = decimal(c.rope_scaling.factor);
    if (c.rope_scaling.type == RopeScaling::Type::Llama3) {
      config["rope_scaling"]["low_freq_factor"] = decimal(c.rope_scaling.low_freq_factor);
      config["rope_scaling"]["high_freq_factor"] = decimal(c.rope_scaling.high_freq_factor);
      config["rope_scaling"]["original_context"] = c.rope_scaling.original_context;
    }
  }

  std::map<std::string, int64_t> type_counts;
  Json tensors = Json::array();
  for (const SourceTensor& t : model.source_tensors) {
    ++type_counts[t.type];
    if (list_tensors) tensors.push_back({{"name", t.name}, {"type", t.type}, {"shape", t.shape}});
  }

  Json info = {{"path", model.source_path},
               {"format", model_format_name(model.format)},
               {"architecture", c.arch},
               {"name", c.name},
               {"config", config},
               {"parameters", model.parameter_count()},
               {"tensor_types", type_counts},
               {"quantization", describe_quantization(model)},
               {"output_head", model.head_q.codes.empty()
                                   ? std::string("fp32")
                                   : cat(quant_type_name(model.head_q.type), " ",
                                         model.head_q.bits, "-bit, group ",
                                         model.head_q.group_size)}};
  if (list_tensors) info["tensors"] = tensors;

  if (!model.tokenizer) {
    info["tokenizer"] = nullptr;
    return info;
  }
  const Tokenizer& tok = *model.tokenizer;
  const TokenizerData& d = tok.data();
  info["tokenizer"] = {{"kind", d.kind == TokenizerKind::Gpt2 ? "gpt2" : "sentencepiece"},
                       {"vocab_size", tok.vocab_size()},
                       {"add_bos", tok.add_bos()},
                       {"bos", special_token(tok, tok.bos_id())},
                       {"eos", special_token(tok, tok.eos_id())},
                       {"unk", special_token(tok, tok.unk_id())},
                       {"pad", special_token(tok, tok.pad_id())},
                       {"pad_is_fallback", d.pad_id < 0}};
  if (d.kind == TokenizerKind::Gpt2) info["tokenizer"]["pre"] = d.pre;
  const auto chat = ChatTemplate::detect(tok);
  info["chat_template"] = chat ? Json{{"format", chat_format_name(chat->format())},
                                      {"default_system", chat->default_system()},
                                      {"in_model", !d.chat_template.empty()}}
                               : Json(nullptr);
  return info;
}

// One-line text for a value: strings unquoted, objects as "key=value, ...".
std::string compact(const Json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (!j.is_object()) return j.dump();
  std::string out;
  for (const auto& [key, value] : j.items())
    out += (out.empty() ? "" : ", ") + key + "=" + compact(value);
  return out;
}

void print_text(const Json& info) {
  const auto line = [](const std::string& key, const std::string& value) {
    std::printf("%-18s %s\n", (key + ":").c_str(), value.c_str());
  };
  line("file", compact(info["path"]));
  line("format", compact(info["format"]));
  line("architecture", compact(info["architecture"]));
  if (!info["name"].get<std::string>().empty()) line("name", compact(info["name"]));
  for (const auto& [key, value] : info["config"].items()) line("  " + key, compact(value));
  line("parameters", compact(info["parameters"]));
  std::string types;
  for (const auto& [type, count] : info["tensor_types"].items())
    types += (types.empty() ? "" : ", ") + type + " x" + compact(count);
  line("tensor types", types);
  line("output head", compact(info["output_head"]));

  const Json& q = info["quantization"];
  if (!q.is_null()) {
    const int64_t group = q["group_size"].get<int64_t>();
    std::string how =
        compact(q["method"]) + ", " + compact(q["type"]) + " " + compact(q["bits"]) + "-bit, " +
        (group == -1 ? std::string("per channel") : "group " + compact(q["group_size"]));
    if (q["sym"].get<bool>()) how += ", sym";
    if (q["act_order"].get<bool>())
      how += q["static_groups"].get<bool>() ? ", act-order (static groups)" : ", act-order";
    if (q["double_quant"].get<bool>()) how += ", double quant";
    line("quantization", how);
    const auto bytes = q["quantized_bytes"].get<double>(), fp32 = q["fp32_bytes"].get<double>();
    char ratio[64] = "";
    if (bytes > 0)
      std::snprintf(ratio, sizeof(ratio), " (%.2fx smaller, %.2f bits/weight)", fp32 / bytes,
                    32.0 * bytes / fp32);
    line("  linear weights", compact(q["quantized_linears"]) + " of " + compact(q["linears"]) +
                                 " quantized, " + compact(q["quantized_bytes"]) + " bytes vs " +
                                 compact(q["fp32_bytes"]) + " as fp32" + ratio);
    if (q.contains("calibration")) line("  calibration", compact(q["calibration"]));
  }

  const Json& tok = info["tokenizer"];
  if (tok.is_null()) {
    line("tokenizer", "none (pass --tokenizer FILE)");
  } else {
    line("tokenizer", compact(tok["kind"]) + ", " + compact(tok["vocab_size"]) + " tokens" +
                          (tok["add_bos"].get<bool>() ? ", adds BOS" : ""));
    for (const char* name : {"bos", "eos", "unk", "pad"}) {
      const Json& t = tok[name];
      std::string value = t.is_null() ? "none" : compact(t["id"]) + " " + t["piece"].dump();
      if (std::string(name) == "pad" && tok["pad_is_fallback"].get<bool>()) value += " (fallback)";
      line(std::string("  ") + name, value);
    }
    const Json& chat = info["chat_template"];
    line("chat template", chat.is_null()
                              ? "none"
                              : compact(chat["format"]) +
                                    (chat["in_model"].get<bool>() ? "" : " (from the vocabulary)"));
    if (!chat.is_null() && !chat["default_system"].get<std::string>().empty())
      line("  default system", chat["default_system"].dump());
  }

  if (info.contains("merge")) {
    const Json& m = info["merge"];
    line("merged", compact(m.value("method", Json("?"))) + " of adapter " +
                       compact(m.value("adapter", Json("?"))) + " into " +
                       compact(m.value("base", Json("?"))));
    for (const auto& [key, value] : m.items())
      if (key != "method" && key != "adapter" && key != "base") line("  " + key, compact(value));
  }

  if (info.contains("tensors")) {
    std::printf("\n");
    for (const auto& t : info["tensors"])
      std::printf("%-40s %-6s %s\n", compact(t["name"]).c_str(), compact(t["type"]).c_str(),
                  t["shape"].dump().c_str());
  }
}

Json read_json(const std::filesystem::path& path) {
  std::ifstream in(path);
  QL_CHECK(in, "cannot read ", path.string());
  try {
    return Json::parse(in);
  } catch (const Json::exception& e) {
    fail(path.string(), ": malformed JSON: ", e.what());
  }
}

// An adapter folder: its native description, else its PEFT configuration, as stored.
Json describe_adapter(const std::filesystem::path& dir) {
  const bool native = std::filesystem::exists(dir / "qalora_adapter.json");
  Json info = {{"adapter", dir.string()},
               {"layouts", native ? (std::filesystem::exists(dir / "adapter_config.json")
                                         ? "native + PEFT"
                                         : "native (no PEFT files: see README.md)")
                                  : "PEFT"}};
  Json config = read_json(dir / (native ? "qalora_adapter.json" : "adapter_config.json"));
  // The per-layer list is long and says the same for every layer; its size is what matters.
  if (config.contains("adapters") && config["adapters"].is_array()) {
    info["adapted_layers"] = config["adapters"].size();
    config.erase("adapters");
  }
  info["config"] = config;
  return info;
}

bool is_adapter_folder(const std::filesystem::path& p) {
  return std::filesystem::is_directory(p) && !std::filesystem::exists(p / "config.json") &&
         (std::filesystem::exists(p / "qalora_adapter.json") ||
          std::filesystem::exists(p / "adapter_config.json"));
}

void run_info(const InfoArgs& args) {
  QL_CHECK(!args.model.model.empty(), "info: no model given (qalora info MODEL, or -m MODEL)");
  if (is_adapter_folder(args.model.model)) {
    const Json info = describe_adapter(args.model.model);
    std::printf("%s\n", info.dump(2).c_str());
    return;
  }
  Json info = describe(load_model(args.model, /*describe_only=*/true), args.tensors);
  // `qalora merge` records what it merged beside the model.
  const std::filesystem::path merge_record = std::filesystem::path(args.model.model) / "merge.json";
  if (std::filesystem::exists(merge_record)) info["merge"] = read_json(merge_record);
  if (args.json) {
    std::printf("%s\n", info.dump(2).c_str());
  } else {
    print_text(info);
  }
}

}  // namespace

void register_info(CLI::App& app) {
  auto args = std::make_shared<InfoArgs>();
  CLI::App* cmd =
      add_command(app, "info",
                  "Describe a model (format, configuration, tensors, tokenizer, merge record) or an "
                  "adapter folder");
  add_model_args(cmd, args->model, /*positional=*/true);
  // The other commands take -m; accept it here too, as an alternative to the positional.
  CLI::Option* positional = cmd->get_option("model");
  CLI::Option* named =
      cmd->add_option("-m,--model", args->model.model, "the model, as -m instead of positionally");
  positional->required(false)->excludes(named);
  cmd->add_flag("--tensors", args->tensors, "list every tensor with its type and shape");
  cmd->add_flag("--json", args->json, "machine-readable output");
  cmd->callback([args] { run_info(*args); });
}

}  // namespace qalora::cli
