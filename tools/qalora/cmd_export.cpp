// qalora export: a model (optionally with its adapter) to the formats other tools run
// (SPEC §8, docs/export.md): GGUF for llama.cpp / ollama, a GPTQ checkpoint for transformers /
// vLLM, a dense Hugging Face folder, or the PEFT files of an adapter. Every weight written is
// compared with the model's own values; the differences are printed and saved beside the output.
#include <algorithm>
#include <cctype>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "cli_common.h"
#include "commands.h"
#include "qalora/adapters/adapter_io.h"
#include "qalora/adapters/merge.h"
#include "qalora/core/atomic_file.h"
#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"
#include "qalora/export/export.h"
#include "qalora/quant/offset_rounding.h"
#include "text_sample.h"

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
  std::string calib;  // empty = the adapter's training data; "none" = nearest values
  int64_t calib_tokens = 8192;
  int64_t ctx = 512;
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

// The adapter whose training data calibrates the offsets by default: --adapter, or the one a
// merged folder's merge.json names.
std::string calibration_adapter(const ExportArgs& args) {
  if (!args.model.adapter.empty()) return args.model.adapter;
  const fs::path record = fs::path(args.model.model) / "merge.json";
  if (!fs::is_regular_file(record)) return "";
  const json j = json::parse(read_file(record), nullptr, false);
  return !j.is_discarded() && j.contains("adapter") && j["adapter"].is_string()
             ? j["adapter"].get<std::string>()
             : "";
}

// Tokens to calibrate the offset rounding on; empty (with the reason in `why_none`) when there
// are none, which leaves every offset at its nearest value.
TextSample calibration_sample(const ExportArgs& args, const Model& model, std::string& why_none) {
  if (args.calib == "none") {
    why_none = "--calib none";
    return {};
  }
  if (!args.calib.empty()) return text_sample(args.calib, model, args.calib_tokens, "--calib");
  const std::string adapter = calibration_adapter(args);
  if (adapter.empty()) {
    why_none = "no adapter training data to calibrate on; pass --calib FILE";
    return {};
  }
  // The default is a convenience: when the adapter's data cannot be read, say so and go on.
  try {
    return training_data_sample(adapter, model, args.calib_tokens, "--calib");
  } catch (const Error& e) {
    why_none = e.what();
    return {};
  }
}

// Non-overlapping windows of `ctx` positions, each starting with BOS when the model adds one.
std::vector<std::vector<int32_t>> windows_of(const std::vector<int32_t>& tokens, const Model& model,
                                             int64_t ctx) {
  const bool bos = model.tokenizer && model.tokenizer->add_bos();
  const int64_t step = bos ? ctx - 1 : ctx;
  std::vector<std::vector<int32_t>> out;
  for (int64_t at = 0; at < std::ssize(tokens); at += step) {
    std::vector<int32_t>& w = out.emplace_back();
    if (bos) w.push_back(model.tokenizer->bos_id());
    const int64_t end = std::min(std::ssize(tokens), at + step);
    w.insert(w.end(), tokens.begin() + at, tokens.begin() + end);
  }
  return out;
}

// A merged QA-LoRA model's offsets are fp32; Q4_1 stores them in fp16 and GPTQ as integer zero
// points. Rounds them before writing, with error feedback through the Hessian of the pooled
// inputs when there is calibration text, prints what that did to the model's outputs, and
// returns the record for the export's JSON (null when every offset already fits).
json round_stored_offsets(const ExportArgs& args, Model& model, const OffsetGrid& grid,
                          const std::function<bool(const QMatrix&)>& stored) {
  const int64_t off = offsets_off_grid(model, grid, stored);
  if (off == 0) return nullptr;
  const char* onto = grid.kind == OffsetGrid::Kind::Fp16 ? "fp16" : "integer zero points";
  std::string why_none;
  const TextSample sample = calibration_sample(args, model, why_none);
  const int64_t ctx = std::min(args.ctx, model.config.context_length);  // short-context models
  // With calibration text, the model's logits are kept to compare the rounded model with
  // (rather than a copy of the model).
  std::vector<std::vector<double>> hessians;
  std::optional<FidelityReference> reference;
  if (!sample.tokens.empty()) {
    hessians = pooled_input_hessians(model, windows_of(sample.tokens, model, ctx));
    reference = fidelity_reference(model, nullptr, sample.tokens, ctx);
  }
  const OffsetRounding r =
      round_model_offsets(model, grid, hessians.empty() ? nullptr : &hessians, stored);
  json record = {{"onto", onto}, {"linears", off}, {"max_abs_dm", r.max_abs_dm}};
  std::printf("offsets of %lld linears rounded onto %s (max |dm| %.3g)", static_cast<long long>(off),
              onto, r.max_abs_dm);
  if (hessians.empty()) {
    std::printf(", each to its nearest value (%s)\n", why_none.c_str());
    return record;
  }
  const double ratio = r.nearest_error > 0 ? r.output_error / r.nearest_error : 0.0;
  std::printf(" with error feedback on %lld tokens of %s:\n", static_cast<long long>(sample.tokens.size()),
              sample.source.c_str());
  std::printf("  output error %.3g of rounding each offset to its nearest value\n", ratio);
  const MergeFidelity f = merge_fidelity(*reference, model);
  std::printf("  max |logit diff|: %.6g, ppl %.6f -> %.6f (the model's -> as stored)\n",
              f.max_abs_logit_diff, f.ppl_unmerged, f.ppl_merged);
  if (f.ppl_merged > 1.01 * f.ppl_unmerged)
    std::printf("warning: as stored, the perplexity on that text is %.1f%% above the model's%s\n",
                100.0 * (f.ppl_merged / f.ppl_unmerged - 1.0),
                grid.kind == OffsetGrid::Kind::ZeroPoints
                    ? ": integer zero points undo offset shifts below half a quantization step "
                      "(a short fine-tune's); --format gguf keeps the offsets in fp16"
                    : "");
  record.update({{"calibration", fs::absolute(sample.source).string()},
                 {"tokens", f.tokens},
                 {"error_vs_nearest", ratio},
                 {"max_abs_logit_diff", f.max_abs_logit_diff},
                 {"mean_kl", f.mean_kl},
                 {"ppl_model", f.ppl_unmerged},
                 {"ppl_stored", f.ppl_merged}});
  return record;
}

void print_report(const ExportReport& r, bool offsets_rounded) {
  std::map<std::string, int64_t> types;
  for (const TensorExport& t : r.tensors) ++types[t.type];
  std::string list;
  for (const auto& [type, n] : types) list += cat(list.empty() ? "" : ", ", type, " x", n);
  if (!list.empty()) std::printf("tensors: %s\n", list.c_str());
  // The tensors that differ or carry a note, largest error first; export.json lists every one.
  std::vector<const TensorExport*> shown;
  for (const TensorExport& t : r.tensors)
    if (!t.exact() || !t.note.empty()) shown.push_back(&t);
  std::ranges::stable_sort(shown, std::greater<>(), &TensorExport::relative_error);
  constexpr size_t kShown = 10;
  for (size_t i = 0; i < std::min(shown.size(), kShown); ++i) {
    const TensorExport& t = *shown[i];
    std::printf("  %s: %s from %s, max |dw| %.3g, relative error %.3g, max |dm| %.3g%s%s\n",
                t.name.c_str(), t.type.c_str(), t.source.c_str(), t.max_abs_dw, t.relative_error(),
                t.max_abs_dm, t.note.empty() ? "" : "; ", t.note.c_str());
  }
  if (shown.size() > kShown)
    std::printf("  ... and %zu more (export.json lists every tensor)\n", shown.size() - kShown);
  std::printf("max |dw|: %.6g\n", r.max_abs_dw());
  std::printf("relative error: %.6g\n", r.relative_error());
  std::printf("max |dm|: %.6g\n", r.max_abs_dm());
  std::printf("%s\n", !r.exact()        ? "not exact: see the differences above"
                     : offsets_rounded ? "exact: every weight decodes to the model's value, offsets "
                                         "as rounded above"
                                       : "exact: every weight decodes to the model's value");
}

void run_export(const ExportArgs& args) {
  const std::string& f = args.format;
  QL_CHECK(f == "gguf" || f == "gptq" || f == "hf" || f == "peft", "--format: '", f,
           "' is not an export format (gguf, gptq, hf, peft)");
  QL_CHECK(args.type.empty() || f == "gguf" || f == "hf",
           "--type: only --format gguf and hf take a tensor type, got --format ", f);
  QL_CHECK(args.gptq_format.empty() || f == "gptq", "--gptq-format: only for --format gptq, got ",
           "--format ", f);
  QL_CHECK(args.gptq_format.empty() || args.gptq_format == "v1" || args.gptq_format == "v2",
           "--gptq-format: expected v1 or v2, got '", args.gptq_format, "'");
  QL_CHECK(args.calib.empty() || f == "gptq" || (f == "gguf" && (args.type.empty() || args.type == "q4_1")),
           "--calib: only --format gptq and gguf with Q4_1 store offsets that need rounding, got "
           "--format ", f, args.type.empty() ? "" : " --type " + args.type);
  QL_CHECK(args.calib.empty() || args.calib == "none" || fs::is_regular_file(args.calib),
           "--calib: cannot open ", args.calib, ": no such file (pass a text file, or none)");
  QL_CHECK(f != "peft" || !args.model.adapter.empty(),
           "--format peft: needs --adapter (the adapter folder to write as PEFT files)");
  QL_CHECK(args.force || !fs::exists(fs::symlink_status(args.out)), "--out: ", args.out,
           " already exists (use --force to replace it)");
  QL_CHECK(f != "gguf" || !fs::is_directory(args.out), "--out: ", args.out,
           " is a folder; --format gguf writes a file");
  const std::optional<GgmlType> type = args.type.empty() || f != "gguf"
                                           ? std::nullopt
                                           : std::optional<GgmlType>(parse_type(args.type));
  const DenseFloats hf_floats = f == "hf" ? parse_dense_floats(args.type) : DenseFloats::F32;

  Model model = load_model(args.model);
  const std::unique_ptr<AdapterSet> set = load_adapter_arg(args.model, model);
  // --format hf merges dense as it writes each block; gguf and gptq keep the weights quantized.
  if (set && (f == "gguf" || f == "gptq")) {
    QL_CHECK(set->config.kind == AdapterKind::QaLora, "--adapter: ", args.model.adapter,
             " is a lora adapter, which cannot be merged into quantized weights exactly: use "
             "--format hf (merged dense), or `qalora merge --dense` first");
    merge_qalora(model, *set);
  }

  json offsets = nullptr;
  if (f == "gguf" && (!type || *type == GgmlType::Q4_1))
    offsets = round_stored_offsets(args, model, {OffsetGrid::Kind::Fp16}, gguf_q4_1_codes);
  if (f == "gptq")
    offsets = round_stored_offsets(args, model,
                                   {OffsetGrid::Kind::ZeroPoints, args.gptq_format == "v2" ? 0 : 1},
                                   gptq_packable);
  const auto report_json = [&](const ExportReport& r) {
    json j = r.to_json();
    j["offsets"] = offsets;
    return j.dump(2) + "\n";
  };

  ExportReport report;
  if (f == "gguf") {
    report = export_gguf(model, args.out, {type, args.allow_lossy});
    write_file_atomic(args.out + ".export.json", report_json(report));
  } else {
    write_folder_atomic(args.out, args.force, [&](const fs::path& dir) {
      if (f == "gptq")
        report = export_gptq(model, dir, {args.gptq_format == "v2", args.allow_lossy});
      else if (f == "hf")
        report = export_hf(model, dir, hf_floats, set.get());
      else
        save_peft_adapter(*set, model, dir);
      report.format = f;
      report.path = args.out;
      if (f != "peft") write_file_atomic(dir / "export.json", report_json(report));
    });
  }
  report.path = args.out;
  std::printf("exported %s%s%s -> %s (%s)\n", args.model.model.c_str(), set ? " with adapter " : "",
              set ? args.model.adapter.c_str() : "", args.out.c_str(), f.c_str());
  // PEFT files hold the adapter, not the model's weights: there is nothing to compare.
  if (f != "peft") print_report(report, !offsets.is_null());
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
                  "the smallest type that holds each weight exactly. hf: type of every float "
                  "tensor (f32, or f16 / bf16 rounded, the error reported); default: f32");
  cmd->add_option("--gptq-format", args->gptq_format,
                  "gptq: checkpoint_format v1 (gptq, zeros - 1, AutoGPTQ's default) or v2");
  cmd->add_flag("--allow-lossy", args->allow_lossy,
                "write quantized weights in a type that cannot hold them exactly (the error is "
                "reported)");
  cmd->add_option("--calib", args->calib,
                  "gguf (Q4_1) and gptq: text whose activations guide the rounding of offsets "
                  "that the format stores coarser (a merged QA-LoRA model's), or none; default: "
                  "the adapter's training data (--adapter, or the merge.json of a merged folder)");
  cmd->add_option("--calib-tokens", args->calib_tokens, "tokens of that text used")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--calib-ctx", args->ctx, "window length of the calibration and check")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{2}, int64_t{1} << 20));
  cmd->add_flag("--force", args->force, "replace an existing output");
  cmd->callback([args] {
    run_export(*args);
    print_peak_memory();
  });
}

}  // namespace qalora::cli
