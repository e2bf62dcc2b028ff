// qalora eval: benchmark tasks (SPEC §7) by log-likelihood or generation; docs/evaluation.md.
#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cli_common.h"
#include "commands.h"
#include "qalora/core/atomic_file.h"
#include "qalora/core/error.h"
#include "qalora/dist/communicator.h"
#include "qalora/eval/evaluate.h"
#include "qalora/model/chat.h"

namespace qalora::cli {

namespace {

struct EvalArgs {
  ModelArgs model;
  int64_t ctx = 0;
  std::vector<std::string> tasks;
  std::vector<std::string> data;
  EvalOptions options;
  std::string shots_data;
  bool chat_template = false;
  bool no_shared_prefix = false;
  bool dense = false;
  std::string out;
};

void run_eval(const EvalArgs& args) {
  QL_CHECK(args.tasks.size() == args.data.size(), "each --task needs one --data: got ",
           args.tasks.size(), " --task and ", args.data.size(), " --data");
  std::vector<TaskKind> kinds;
  for (const std::string& t : args.tasks) kinds.push_back(parse_task(t));
  QL_CHECK(args.options.shots == 0 || std::any_of(kinds.begin(), kinds.end(), uses_shots),
           "--shots applies to mmlu and gsm8k, and no --task here is one of them");

  Model model = load_model(args.model);
  const Tokenizer& tok = model.require_tokenizer();
  std::optional<ChatTemplate> chat;
  if (args.chat_template) {
    chat = ChatTemplate::detect(tok);
    QL_CHECK(chat.has_value(), "--chat-template: ", args.model.model,
             " has no chat template and no chat marker tokens");
  }
  const PromptEncoder encoder(tok, chat);
  const auto adapters = load_adapter_arg(args.model, model);
  if (args.dense) dequantize_weights(model);
  InferenceSession session(model, resolve_ctx(model, args.ctx), adapters.get());

  EvalOptions options = args.options;
  options.shots_data = args.shots_data;
  options.share_prefix = !args.no_shared_prefix;
  options.comm = &world();
  const bool root = options.comm->is_root();
  Evaluator evaluator(session, encoder, options);

  std::vector<TaskReport> reports;
  nlohmann::json out = {{"model", args.model.model},
                        {"adapter", args.model.adapter},
                        {"ctx", session.max_context()},
                        {"chat_template", args.chat_template},
                        {"shared_prefix", options.share_prefix},
                        {"batch_tokens", options.batch_tokens},
                        {"shots", options.shots},
                        {"limit", options.limit},
                        {"seed", options.seed},
                        {"tasks", nlohmann::json::array()}};
  for (size_t i = 0; i < kinds.size(); ++i) {
    reports.push_back(evaluator.run(kinds[i], args.data[i]));
    out["tasks"].push_back(report_json(reports.back()));
    // Written after every task, so a long run keeps what it finished.
    if (!args.out.empty() && root) write_file_atomic(args.out, out.dump(1) + "\n");
  }
  if (root) print_now(compute_line() + "\n" + format_table(reports));
}

}  // namespace

void register_eval(CLI::App& app) {
  auto args = std::make_shared<EvalArgs>();
  CLI::App* cmd = add_command(app, "eval", "Benchmark tasks: MMLU, HellaSwag, ARC, GSM8K, ...");
  add_model_args(cmd, args->model);
  add_compute_arg(cmd, args->model);
  add_adapter_arg(cmd, args->model);
  add_ctx_arg(cmd, args->ctx);
  cmd->add_option("--task", args->tasks,
                  "task (repeatable, one --data each): mc, arc, hellaswag, piqa, boolq, "
                  "winogrande, mmlu, cloze, gsm8k, ppl")
      ->required();
  cmd->add_option("--data", args->data, "the task's data file (mmlu: the folder with test/, dev/)")
      ->required();
  cmd->add_option("--shots", args->options.shots, "few-shot examples (mmlu, gsm8k)")
      ->capture_default_str();
  cmd->add_option("--shots-data", args->shots_data, "gsm8k: {question, answer} file for shots");
  cmd->add_option("--limit", args->options.limit,
                  "a seeded subset of N items (mmlu: per subject; ppl: first N windows)");
  cmd->add_option("--seed", args->options.seed, "seed of --limit and the gsm8k shots")
      ->capture_default_str();
  cmd->add_option("--max-new-tokens", args->options.max_new_tokens, "gsm8k generation limit")
      ->capture_default_str();
  cmd->add_flag("--chat-template", args->chat_template,
                "wrap each prompt in the model's chat template as a user turn");
  cmd->add_flag("--no-shared-prefix", args->no_shared_prefix,
                "score every choice from scratch (for timing and checks)");
  cmd->add_option("--batch-tokens", args->options.batch_tokens,
                  "pack many choices into forwards of about N tokens (0: one choice at a time)")
      ->capture_default_str();
  cmd->add_flag("--dense", args->dense,
                "score on the fp32 dequantized weights (4 bytes per parameter): exact and "
                "faster for quantized models");
  cmd->add_flag("--no-progress", [args](int64_t) { args->options.progress = false; },
                "no progress bar");
  cmd->add_option("--out", args->out, "write metrics and per-item results as JSON");
  cmd->callback([args] { run_ranked([&] { run_eval(*args); }); });
}

}  // namespace qalora::cli
