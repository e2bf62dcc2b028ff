// qalora perplexity: mean NLL and perplexity of a text file (SPEC §7).
#include <cstdio>
#include <filesystem>
#include <memory>

#include "cli_common.h"
#include "commands.h"
#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"
#include "qalora/eval/perplexity.h"

namespace qalora::cli {

namespace {

struct PerplexityArgs {
  ModelArgs model;
  std::string text;
  PerplexityOptions options;
  std::string metrics;
};

std::string read_text(const std::string& path) {
  QL_CHECK(std::filesystem::is_regular_file(path), "--text: cannot open ", path, ": no such file");
  std::string text = read_file(path);
  QL_CHECK(!text.empty(), "--text: ", path, " is empty: expected text to score");
  return text;
}

void run_perplexity(const PerplexityArgs& args) {
  const std::string text = read_text(args.text);
  const Model model = load_model(args.model);
  const Tokenizer& tok = model.require_tokenizer();
  PerplexityOptions options = args.options;
  options.metrics = args.metrics;
  const auto adapters = load_adapter_arg(args.model, model);
  InferenceSession session(model, resolve_ctx(model, options.ctx), adapters.get());

  const std::vector<int32_t> tokens = tok.encode(text, /*add_bos=*/false);
  const int32_t bos = tok.add_bos() ? tok.bos_id() : -1;
  const PerplexityResult r = perplexity(session, tokens, bos, options);
  std::printf("text tokens:   %zu\n", tokens.size());
  std::printf("context:       %lld%s\n", static_cast<long long>(options.ctx),
              bos >= 0 ? " (BOS + text)" : "");
  if (options.stride > 0)
    std::printf("stride:        %lld\n", static_cast<long long>(options.stride));
  std::printf("windows:       %lld\n", static_cast<long long>(r.windows));
  std::printf("tokens scored: %lld\n", static_cast<long long>(r.tokens_scored));
  std::printf("mean NLL:      %.6f\n", r.mean_nll);
  std::printf("ppl:           %.4f\n", r.ppl);
}

}  // namespace

void register_perplexity(CLI::App& app) {
  auto args = std::make_shared<PerplexityArgs>();
  CLI::App* cmd = add_command(app, "perplexity", "Perplexity of a text file");
  add_model_args(cmd, args->model);
  add_adapter_arg(cmd, args->model);
  cmd->add_option("--text", args->text, "text file to score")->required();
  cmd->add_option("-c,--ctx", args->options.ctx, "window length in tokens (BOS included)")
      ->capture_default_str();
  cmd->add_option("--stride", args->options.stride,
                  "slide windows by S tokens, scoring only new tokens (default: no overlap)");
  cmd->add_option("--max-windows", args->options.max_windows, "score at most K windows (0 = all)");
  cmd->add_option("--metrics", args->metrics, "write one JSON line per window to this file");
  cmd->callback([args] { run_perplexity(*args); });
}

}  // namespace qalora::cli
