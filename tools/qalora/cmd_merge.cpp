// qalora merge: fold a trained adapter into its base and save the result (SPEC §4). A QA-LoRA
// adapter merges exactly into the offsets of its quantized base (same codes, scales and bits);
// --dense merges any adapter into fp32 weights. The fidelity of the merge is measured on a text
// the user names: adapter folders do not record their training data, so there is no default.
#include <cstdio>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "cli_common.h"
#include "commands.h"
#include "qalora/adapters/merge.h"
#include "qalora/core/atomic_file.h"
#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"

namespace qalora::cli {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

struct MergeArgs {
  ModelArgs model;
  std::string out;
  bool dense = false;
  bool force = false;
  std::string fidelity_text;
  int64_t fidelity_tokens = 2048;
  int64_t ctx = 256;
};

// "none", or the text's tokens, at most `max_tokens` of them.
std::vector<int32_t> fidelity_tokens(const MergeArgs& args, const Model& model) {
  QL_CHECK(fs::is_regular_file(args.fidelity_text), "--fidelity-text: cannot open ",
           args.fidelity_text, ": no such file (pass a text file, or none to skip the check)");
  const std::string text = read_file(args.fidelity_text);
  QL_CHECK(!text.empty(), "--fidelity-text: ", args.fidelity_text, " is empty");
  std::vector<int32_t> tokens = model.require_tokenizer().encode(text, /*add_bos=*/false);
  if (static_cast<int64_t>(tokens.size()) > args.fidelity_tokens)
    tokens.resize(static_cast<size_t>(args.fidelity_tokens));
  return tokens;
}

json fidelity_json(const MergeFidelity& f, const MergeArgs& args) {
  return {{"text", fs::absolute(args.fidelity_text).string()},
          {"ctx", args.ctx},
          {"tokens", f.tokens},
          {"max_abs_logit_diff", f.max_abs_logit_diff},
          {"mean_kl", f.mean_kl},
          {"ppl_unmerged", f.ppl_unmerged},
          {"ppl_merged", f.ppl_merged}};
}

void run_merge(const MergeArgs& args) {
  QL_CHECK(args.force || !fs::exists(args.out) || fs::is_empty(args.out), "--out: ", args.out,
           " exists and is not empty (use --force to overwrite it, or another folder)");
  const bool check = args.fidelity_text != "none";
  QL_CHECK(!check || args.fidelity_tokens >= 2, "--fidelity-tokens: expected >= 2, got ",
           args.fidelity_tokens);
  const Model base = load_model(args.model);
  const std::unique_ptr<AdapterSet> set = load_adapter_arg(args.model, base);
  const AdapterConfig& c = set->config;
  const bool quantized_base = !base.quant.empty();
  // LoRA on a dense base has nothing quantized to preserve: its merge is the dense one.
  QL_CHECK(args.dense || c.kind == AdapterKind::QaLora || !quantized_base,
           "--adapter: ", args.model.adapter,
           " is a lora adapter, which cannot be merged into quantized weights exactly; pass "
           "--dense to merge it into fp32 weights");
  const bool dense = args.dense || c.kind == AdapterKind::Lora;
  // Tokenize before the merge so that a bad text fails before any work.
  const std::vector<int32_t> tokens = check ? fidelity_tokens(args, base) : std::vector<int32_t>{};

  Model merged = base;
  if (dense)
    merge_dense(merged, *set);
  else
    merge_qalora(merged, *set);
  save_hf_model(merged, args.out);
  const char* method = dense ? "dense" : "qalora-offsets";
  std::printf("merged %s adapter %s into %s (%s) -> %s\n", adapter_kind_name(c.kind),
              args.model.adapter.c_str(), args.model.model.c_str(),
              dense ? "fp32 weights" : "the quantized offsets", args.out.c_str());

  json record = {{"base", fs::absolute(args.model.model).string()},
                 {"adapter", fs::absolute(args.model.adapter).string()},
                 {"method", method},
                 {"kind", adapter_kind_name(c.kind)},
                 {"rank", c.rank},
                 {"alpha", c.alpha},
                 {"rslora", c.rslora},
                 {"scale", c.scale()},
                 {"pool", c.kind == AdapterKind::QaLora ? json(adapter_pool_name(c.pool)) : json()},
                 {"base_quant", base.quant.method},
                 {"merged_quant", merged.quant.method},
                 {"fidelity", nullptr}};
  if (check) {
    const MergeFidelity f = merge_fidelity(base, *set, merged, tokens, args.ctx);
    std::printf("fidelity on %lld positions of %s (ctx %lld), unmerged vs merged:\n",
                static_cast<long long>(f.tokens), args.fidelity_text.c_str(),
                static_cast<long long>(args.ctx));
    std::printf("max |logit diff|: %.6g\n", f.max_abs_logit_diff);
    std::printf("mean KL:          %.6g\n", f.mean_kl);
    std::printf("ppl unmerged:     %.6f\n", f.ppl_unmerged);
    std::printf("ppl merged:       %.6f\n", f.ppl_merged);
    record["fidelity"] = fidelity_json(f, args);
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
                "merge into fp32 weights (any adapter; the only way for LoRA on a quantized base)");
  cmd->add_flag("--force", args->force, "write into --out even when it is not empty");
  cmd->add_option("--fidelity-text", args->fidelity_text,
                  "text to compare the merged and unmerged models on, or none (adapter folders "
                  "do not record their training data, so there is no default)")
      ->required();
  cmd->add_option("--fidelity-tokens", args->fidelity_tokens, "tokens of the text compared")
      ->capture_default_str();
  cmd->add_option("-c,--ctx", args->ctx, "window length of the comparison (BOS included)")
      ->capture_default_str();
  cmd->callback([args] { run_merge(*args); });
}

}  // namespace qalora::cli
