// qalora merge: fold a trained adapter into its base and save the result (SPEC §4). A QA-LoRA
// adapter merges exactly into the offsets of its quantized base (same codes, scales and bits);
// --dense merges any adapter into fp32 weights, and --requantize quantizes that result again
// (the lossy path the QA-LoRA paper compares against). The merged model is then compared with
// the unmerged one on a slice of the adapter's training data or a text the user names.
#include <cstdio>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "cli_common.h"
#include "commands.h"
#include "qalora/adapters/merge.h"
#include "qalora/core/atomic_file.h"
#include "qalora/core/error.h"
#include "quantize_args.h"
#include "text_sample.h"

namespace qalora::cli {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

struct MergeArgs {
  ModelArgs model;
  std::string out;
  bool dense = false;
  std::string requantize;  // method; empty = no re-quantization
  std::string type;        // the dense merge's float type (f32, f16, bf16)
  QuantizeArgs quant;
  bool force = false;
  std::string fidelity_text;  // empty = a slice of the adapter's training data
  int64_t fidelity_tokens = 2048;
  int64_t ctx = 256;
};

json fidelity_json(const MergeFidelity& f, const MergeArgs& args, const TextSample& sample) {
  return {{"text", fs::absolute(sample.source).string()},
          {"ctx", args.ctx},
          {"tokens", f.tokens},
          {"max_abs_logit_diff", f.max_abs_logit_diff},
          {"mean_kl", f.mean_kl},
          {"ppl_unmerged", f.ppl_unmerged},
          {"ppl_merged", f.ppl_merged}};
}

// "dense", "qalora-offsets" or "requantize-<method>".
std::string merge_method(const MergeArgs& args, AdapterKind kind) {
  if (!args.requantize.empty()) return "requantize-" + args.requantize;
  return args.dense || kind == AdapterKind::Lora ? "dense" : "qalora-offsets";
}

void run_merge(MergeArgs& args) {
  QL_CHECK(args.force || !fs::exists(args.out) || fs::is_empty(args.out), "--out: ", args.out,
           " exists and is not empty (use --force to overwrite it, or another folder)");
  QL_CHECK(!(args.dense && !args.requantize.empty()),
           "--dense and --requantize exclude each other: --dense keeps fp32 weights, "
           "--requantize quantizes them again");
  if (!args.requantize.empty()) {
    args.quant.options.method = args.requantize;
    resolve_quantize_args(args.quant);
  }
  const bool check = args.fidelity_text != "none";
  QL_CHECK(!check || args.fidelity_tokens >= 2, "--fidelity-tokens: expected >= 2, got ",
           args.fidelity_tokens);
  // The merge happens in place: one model in memory, not a base and a merged copy.
  Model model = load_model(args.model);
  const std::unique_ptr<AdapterSet> set = load_adapter_arg(args.model, model);
  const AdapterConfig& c = set->config;
  const std::string base_quant = model.quant.method;
  const bool quantized_base = !model.quant.empty();
  // LoRA on a dense base has nothing quantized to preserve: its merge is the dense one.
  QL_CHECK(args.dense || !args.requantize.empty() || c.kind == AdapterKind::QaLora ||
               !quantized_base,
           "--adapter: ", args.model.adapter,
           " is a lora adapter, which cannot be merged into quantized weights exactly; pass "
           "--dense to merge it into fp32 weights, or --requantize METHOD to quantize the merged "
           "weights again (lossy)");
  const std::string method = merge_method(args, c.kind);
  QL_CHECK(args.type.empty() || method == "dense",
           "--type: only a dense merge (--dense, or a lora adapter on a dense base) takes a "
           "float type; this merge is ",
           method);
  const DenseFloats floats = parse_dense_floats(args.type);  // before any work
  // Read the text and the calibration data before the merge so that bad input fails before
  // any work.
  const TextSample sample =
      !check ? TextSample{}
      : args.fidelity_text.empty()
          ? training_data_sample(args.model.adapter, model, args.fidelity_tokens, "--fidelity-text")
          : text_sample(args.fidelity_text, model, args.fidelity_tokens, "--fidelity-text");
  const auto calibration = args.requantize.empty() ? std::vector<std::vector<int32_t>>{}
                                                   : load_calibration(args.quant, model);
  // The unmerged logits are taken before the model changes.
  const std::optional<FidelityReference> reference =
      check ? std::optional(fidelity_reference(model, set.get(), sample.tokens, args.ctx))
            : std::nullopt;

  // Every merge is written a block at a time: the merged fp32 copy of a 7B model (dense), its
  // fp32 offsets (QA-LoRA, twice their fp16 size in the base) would not fit or would not need
  // to be held.
  if (method == "dense") {
    save_merged_dense(model, *set, args.out, floats);
  } else if (method == "qalora-offsets") {
    save_merged_qalora(model, *set, args.out);
  } else {
    // Each block is merged just before it is quantized and written once it is.
    check_adapters_match(*set, model, "merge");
    ModelFolderWriter writer(model, args.out);
    quantize_with_progress(
        model, args.quant, calibration, "",
        [&](int64_t index, LayerWeights& block) {
          writer.write_block(index, block);
          block = LayerWeights{};
        },
        [&](int64_t index, LayerWeights& block) { merge_dense_block(block, index, *set); });
    writer.finish();
  }
  // The check reads the folder as written; without it, only the record of merge.json is needed.
  model = load_hf_model(args.out, /*describe_only=*/!check);
  const Model& merged = model;
  const char* into = method == "dense"            ? "fp32 weights"
                     : method == "qalora-offsets" ? "the quantized offsets"
                                                  : "fp32 weights, quantized again";
  std::printf("merged %s adapter %s into %s (%s) -> %s\n", adapter_kind_name(c.kind),
              args.model.adapter.c_str(), args.model.model.c_str(), into, args.out.c_str());

  json record = {{"base", fs::absolute(args.model.model).string()},
                 {"adapter", fs::absolute(args.model.adapter).string()},
                 {"method", method},
                 {"kind", adapter_kind_name(c.kind)},
                 {"rank", c.rank},
                 {"alpha", c.alpha},
                 {"rslora", c.rslora},
                 {"scale", c.scale()},
                 {"pool", c.kind == AdapterKind::QaLora ? json(adapter_pool_name(c.pool)) : json()},
                 {"base_quant", base_quant},
                 {"merged_quant", merged.quant.method},
                 {"fidelity", nullptr}};
  if (!args.requantize.empty())
    record["requantize"] = {{"method", merged.quant.method},
                            {"bits", merged.quant.bits},
                            {"group_size", merged.quant.group_size},
                            {"sym", merged.quant.sym},
                            {"calibration", merged.quant.calibration}};
  if (check) {
    const MergeFidelity f = merge_fidelity(*reference, merged);
    std::printf("fidelity on %lld positions of %s (ctx %lld), unmerged vs merged:\n",
                static_cast<long long>(f.tokens), sample.source.c_str(),
                static_cast<long long>(args.ctx));
    std::printf("max |logit diff|: %.6g\n", f.max_abs_logit_diff);
    std::printf("mean KL:          %.6g\n", f.mean_kl);
    std::printf("ppl unmerged:     %.6f\n", f.ppl_unmerged);
    std::printf("ppl merged:       %.6f\n", f.ppl_merged);
    record["fidelity"] = fidelity_json(f, args, sample);
  }
  write_file_atomic(fs::path(args.out) / "merge.json", record.dump(2) + "\n");
}

}  // namespace

void register_merge(CLI::App& app) {
  auto args = std::make_shared<MergeArgs>();
  CLI::App* cmd = add_command(app, "merge", "Merge a trained adapter into its base model");
  add_model_args(cmd, args->model);
  add_adapter_arg(cmd, args->model);
  cmd->get_option("--adapter")->required();
  cmd->add_option("--out", args->out, "output model folder (+ merge.json)")->required();
  cmd->add_flag("--dense", args->dense,
                "merge into fp32 weights (any adapter; lossless, but no longer quantized)");
  cmd->add_option("--type", args->type,
                  "dense merge: type of every float tensor (f32, or f16 / bf16 rounded to "
                  "nearest even, as Hugging Face publishes checkpoints); default: f32");
  cmd->add_option("--requantize", args->requantize,
                  "merge into fp32 weights, then quantize them again with this method (rtn, "
                  "gptq, nf4, fp4, int8; lossy), with the options below");
  add_quantize_args(cmd, args->quant);
  cmd->add_flag("--force", args->force, "write into --out even when it is not empty");
  cmd->add_option("--fidelity-text", args->fidelity_text,
                  "text to compare the merged and unmerged models on, or none (default: the "
                  "first examples of the adapter's training data)");
  cmd->add_option("--fidelity-tokens", args->fidelity_tokens, "tokens of the text compared")
      ->capture_default_str();
  cmd->add_option("-c,--ctx", args->ctx, "window length of the comparison (BOS included)")
      ->capture_default_str();
  cmd->callback([args] {
    run_merge(*args);
    print_peak_memory();
  });
}

}  // namespace qalora::cli
