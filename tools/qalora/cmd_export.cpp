// qalora export: a model (optionally with its adapter) to the formats other tools run
// (SPEC §8, docs/export.md): GGUF for llama.cpp / ollama, a GPTQ checkpoint for transformers /
// vLLM, a dense Hugging Face folder, or the PEFT files of an adapter. Every weight written is
// compared with the model's own values; the differences are printed and saved beside the output.
#include <cctype>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "cli_common.h"
#include "commands.h"
#include "qalora/adapters/adapter_io.h"
#include "qalora/adapters/merge.h"
#include "qalora/core/atomic_file.h"
#include "qalora/core/error.h"
#include "qalora/export/export.h"

namespace qalora::cli {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

struct ExportArgs {
  ModelArgs model;
  std::string format;
  std::string out;
  std::string type;
  std::string gptq_format;
  bool allow_lossy = false;
  bool force = false;
};

GgmlType parse_type(const std::string& s) {
  for (const GgmlType t : {GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0,
                           GgmlType::Q4_0, GgmlType::Q4_1}) {
    std::string name = ggml_type_name(t);
    for (char& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    if (s == name) return t;
  }
  fail("--type: '", s, "' is not a GGUF export type (f32, f16, bf16, q8_0, q4_0, q4_1)");
}

void print_report(const ExportReport& r) {
  std::map<std::string, int64_t> types;
  for (const TensorExport& t : r.tensors) ++types[t.type];
  std::string list;
  for (const auto& [type, n] : types) list += cat(list.empty() ? "" : ", ", type, " x", n);
  if (!list.empty()) std::printf("tensors: %s\n", list.c_str());
  for (const TensorExport& t : r.tensors)
    if (!t.exact() || !t.note.empty())
      std::printf("  %s: %s from %s, max |dw| %.3g, relative error %.3g, max |dm| %.3g%s%s\n",
                  t.name.c_str(), t.type.c_str(), t.source.c_str(), t.max_abs_dw,
                  t.relative_error(), t.max_abs_dm, t.note.empty() ? "" : "; ", t.note.c_str());
  std::printf("max |dw|: %.6g\n", r.max_abs_dw());
  std::printf("relative error: %.6g\n", r.relative_error());
  std::printf("max |dm|: %.6g\n", r.max_abs_dm());
  std::printf("%s\n", r.exact() ? "exact: every weight decodes to the model's value"
                                : "not exact: see the differences above");
}

void run_export(const ExportArgs& args) {
  const std::string& f = args.format;
  QL_CHECK(f == "gguf" || f == "gptq" || f == "hf" || f == "peft", "--format: '", f,
           "' is not an export format (gguf, gptq, hf, peft)");
  QL_CHECK(args.type.empty() || f == "gguf", "--type: only --format gguf takes a tensor type, got ",
           "--format ", f);
  QL_CHECK(args.gptq_format.empty() || f == "gptq", "--gptq-format: only for --format gptq, got ",
           "--format ", f);
  QL_CHECK(args.gptq_format.empty() || args.gptq_format == "v1" || args.gptq_format == "v2",
           "--gptq-format: expected v1 or v2, got '", args.gptq_format, "'");
  QL_CHECK(f != "peft" || !args.model.adapter.empty(),
           "--format peft: needs --adapter (the adapter folder to write as PEFT files)");
  QL_CHECK(args.force || !fs::exists(fs::symlink_status(args.out)), "--out: ", args.out,
           " already exists (use --force to replace it)");
  QL_CHECK(f != "gguf" || !fs::is_directory(args.out), "--out: ", args.out,
           " is a folder; --format gguf writes a file");
  const std::optional<GgmlType> type =
      args.type.empty() ? std::nullopt : std::optional<GgmlType>(parse_type(args.type));

  Model model = load_model(args.model);
  const std::unique_ptr<AdapterSet> set = load_adapter_arg(args.model, model);
  if (set && f != "peft") {
    if (f == "hf") {
      merge_dense(model, *set);
    } else {
      QL_CHECK(set->config.kind == AdapterKind::QaLora, "--adapter: ", args.model.adapter,
               " is a lora adapter, which cannot be merged into quantized weights exactly: use "
               "--format hf (merged dense), or `qalora merge --dense` first");
      merge_qalora(model, *set);
    }
  }

  ExportReport report;
  if (f == "gguf") {
    report = export_gguf(model, args.out, {type, args.allow_lossy});
    write_file_atomic(args.out + ".export.json", report.to_json().dump(2) + "\n");
  } else {
    write_folder_atomic(args.out, args.force, [&](const fs::path& dir) {
      if (f == "gptq")
        report = export_gptq(model, dir, {args.gptq_format == "v2", args.allow_lossy});
      else if (f == "hf")
        report = export_hf(model, dir);
      else
        save_peft_adapter(*set, model, dir);
      report.format = f;
      report.path = args.out;
      if (f != "peft") write_file_atomic(dir / "export.json", report.to_json().dump(2) + "\n");
    });
  }
  report.path = args.out;
  std::printf("exported %s%s%s -> %s (%s)\n", args.model.model.c_str(), set ? " with adapter " : "",
              set ? args.model.adapter.c_str() : "", args.out.c_str(), f.c_str());
  // PEFT files hold the adapter, not the model's weights: there is nothing to compare.
  if (f != "peft") print_report(report);
}

}  // namespace

void register_export(CLI::App& app) {
  auto args = std::make_shared<ExportArgs>();
  CLI::App* cmd = add_command(app, "export",
                              "Export a model (or an adapter) to GGUF, GPTQ, Hugging Face or PEFT");
  add_model_args(cmd, args->model);
  add_adapter_arg(cmd, args->model);
  cmd->add_option("--format", args->format, "gguf, gptq, hf or peft")->required();
  cmd->add_option("-o,--out", args->out, "output file (gguf) or folder")->required();
  cmd->add_option("--type", args->type,
                  "gguf: type of the linear weights (f32, f16, bf16, q8_0, q4_0, q4_1); default: "
                  "the smallest type that holds each weight exactly");
  cmd->add_option("--gptq-format", args->gptq_format,
                  "gptq: checkpoint_format v1 (gptq, zeros - 1, AutoGPTQ's default) or v2");
  cmd->add_flag("--allow-lossy", args->allow_lossy,
                "write quantized weights in a type that cannot hold them exactly (the error is "
                "reported)");
  cmd->add_flag("--force", args->force, "replace an existing output");
  cmd->callback([args] { run_export(*args); });
}

}  // namespace qalora::cli
