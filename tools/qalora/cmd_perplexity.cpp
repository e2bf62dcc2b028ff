// qalora perplexity: mean NLL and perplexity of a text file (SPEC §7), or the loss of a
// training file's examples over their target tokens, e.g. the held-out split of a `train` run.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>

#include "cli_common.h"
#include "commands.h"
#include "data_args.h"
#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"
#include "qalora/dist/communicator.h"
#include "qalora/eval/perplexity.h"

namespace qalora::cli {

namespace {

struct PerplexityArgs {
  ModelArgs model;
  std::string text;
  PerplexityOptions options;
  std::string metrics;
  std::string data;
  DataArgs data_args;
  double eval_fraction = 0;
  uint64_t seed = 42;
  bool no_progress = false;
};

std::string read_text(const std::string& path) {
  QL_CHECK(std::filesystem::is_regular_file(path), "--text: cannot open ", path, ": no such file");
  std::string text = read_file(path);
  QL_CHECK(!text.empty(), "--text: ", path, " is empty: expected text to score");
  return text;
}

// The loss `train` reports as held-out loss: with the run's --eval-fraction and --seed (and
// data options) the same examples are scored.
void run_example_loss(const PerplexityArgs& args) {
  QL_CHECK(std::filesystem::is_regular_file(args.data), "--data: cannot open ", args.data,
           ": no such file");
  QL_CHECK(args.eval_fraction >= 0 && args.eval_fraction < 1,
           "--eval-fraction: expected a value in [0, 1), got ", args.eval_fraction);
  const Model model = load_model(args.model);
  Dataset data = load_dataset(args.data, model.require_tokenizer(), resolve_data_args(args.data_args));
  const Dataset scored =
      args.eval_fraction > 0 ? split_heldout(data, args.eval_fraction, args.seed) : std::move(data);
  int64_t longest = 1;
  for (const Example& e : scored.examples) longest = std::max(longest, std::ssize(e.tokens));
  const auto adapters = load_adapter_arg(args.model, model);
  InferenceSession session(model, longest, adapters.get());
  Communicator& comm = world();
  const ExampleLoss r = example_loss(session, scored.examples, !args.no_progress, &comm);
  if (!comm.is_root()) return;
  std::printf("examples:      %lld%s\n", static_cast<long long>(r.examples),
              args.eval_fraction > 0 ? " (held-out split)" : "");
  std::printf("tokens scored: %lld\n", static_cast<long long>(r.tokens));
  std::printf("%s\n", compute_line().c_str());
  std::printf("loss:          %.6f\n", r.mean_nll);
  std::printf("ppl:           %.4f\n", std::exp(r.mean_nll));
}

void run_perplexity(const PerplexityArgs& args) {
  QL_CHECK(args.text.empty() != args.data.empty(),
           "perplexity: pass exactly one of --text (a text file) and --data (a training file)");
  if (!args.data.empty()) return run_example_loss(args);
  const std::string text = read_text(args.text);
  const Model model = load_model(args.model);
  const Tokenizer& tok = model.require_tokenizer();
  PerplexityOptions options = args.options;
  options.metrics = args.metrics;
  options.progress = !args.no_progress;
  options.comm = &world();
  const auto adapters = load_adapter_arg(args.model, model);
  InferenceSession session(model, resolve_ctx(model, options.ctx), adapters.get());

  const std::vector<int32_t> tokens = tok.encode(text, /*add_bos=*/false);
  const int32_t bos = tok.add_bos() ? tok.bos_id() : -1;
  const PerplexityResult r = perplexity(session, tokens, bos, options);
  if (!options.comm->is_root()) return;
  std::printf("text tokens:   %zu\n", tokens.size());
  std::printf("context:       %lld%s\n", static_cast<long long>(options.ctx),
              bos >= 0 ? " (BOS + text)" : "");
  if (options.stride > 0)
    std::printf("stride:        %lld\n", static_cast<long long>(options.stride));
  std::printf("windows:       %lld\n", static_cast<long long>(r.windows));
  std::printf("tokens scored: %lld\n", static_cast<long long>(r.tokens_scored));
  std::printf("%s\n", compute_line().c_str());
  std::printf("mean NLL:      %.6f\n", r.mean_nll);
  std::printf("ppl:           %.4f\n", r.ppl);
}

}  // namespace

void register_perplexity(CLI::App& app) {
  auto args = std::make_shared<PerplexityArgs>();
  CLI::App* cmd = add_command(app, "perplexity", "Perplexity of a text file");
  add_model_args(cmd, args->model);
  add_compute_arg(cmd, args->model);
  add_adapter_arg(cmd, args->model);
  cmd->add_option("--text", args->text, "text file to score");
  cmd->add_option("--data", args->data,
                  "instead of --text: a training file whose examples' target tokens are scored");
  cmd->add_option("--eval-fraction", args->eval_fraction,
                  "--data: score only the held-out split `train` takes with this fraction")
      ->capture_default_str();
  cmd->add_option("--seed", args->seed, "--data: the seed of that split (train's --seed)")
      ->capture_default_str();
  add_data_args(cmd, args->data_args);
  cmd->add_flag("--no-progress", args->no_progress, "no progress bar");
  cmd->add_option("-c,--ctx", args->options.ctx, "window length in tokens (BOS included)")
      ->capture_default_str();
  cmd->add_option("--stride", args->options.stride,
                  "slide windows by S tokens, scoring only new tokens (default: no overlap)");
  cmd->add_option("--max-windows", args->options.max_windows, "score at most K windows (0 = all)");
  cmd->add_option("--metrics", args->metrics, "write one JSON line per window to this file");
  cmd->callback([args] { run_ranked([&] { run_perplexity(*args); }); });
}

}  // namespace qalora::cli
