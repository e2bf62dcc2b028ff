// qalora logits: the last position's logits for a prompt, for cross-checking against other
// engines. Line 1: the token ids; line 2: every logit (%.6g); with --top N, N more lines
// "id<TAB>logit<TAB>piece", best first.
#include <algorithm>
#include <cstdio>
#include <memory>
#include <numeric>

#include "cli_common.h"
#include "commands.h"
#include "qalora/core/error.h"

namespace qalora::cli {

namespace {

struct LogitsArgs {
  ModelArgs model;
  std::string prompt;
  std::vector<int64_t> ids;
  int64_t top = 0;
  bool no_bos = false;
  bool use_ids = false;
};

std::vector<int32_t> checked_ids(const std::vector<int64_t>& ids, int64_t vocab) {
  QL_CHECK(!ids.empty(), "--ids is empty: expected token ids such as 1,2,3");
  std::vector<int32_t> out;
  for (int64_t id : ids) {
    QL_CHECK(id >= 0 && id < vocab, "--ids: token id ", id, " out of range: expected 0..",
             vocab - 1);
    out.push_back(static_cast<int32_t>(id));
  }
  return out;
}

void run_logits(const LogitsArgs& args) {
  QL_CHECK(args.top >= 0, "--top must be >= 0, got ", args.top);
  const Model model = load_model(args.model);
  const int64_t vocab = model.config.vocab_size;
  const std::vector<int32_t> tokens =
      args.use_ids ? checked_ids(args.ids, vocab)
                   : encode_prompt(model.require_tokenizer(), args.prompt, !args.no_bos);
  const auto adapters = load_adapter_arg(args.model, model);
  InferenceSession session(model, static_cast<int64_t>(tokens.size()), adapters.get());
  const std::vector<float> logits = session.forward_last(tokens);

  std::string out;
  for (size_t i = 0; i < tokens.size(); ++i) out += (i ? " " : "") + std::to_string(tokens[i]);
  out += "\n";
  char buf[64];
  for (size_t i = 0; i < logits.size(); ++i) {
    std::snprintf(buf, sizeof buf, i ? " %.6g" : "%.6g", static_cast<double>(logits[i]));
    out += buf;
  }
  out += "\n";

  std::vector<int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  const auto top = std::min<size_t>(static_cast<size_t>(args.top), order.size());
  std::partial_sort(
      order.begin(), order.begin() + static_cast<std::ptrdiff_t>(top), order.end(),
      [&](int32_t a, int32_t b) { return logits[a] != logits[b] ? logits[a] > logits[b] : a < b; });
  for (size_t i = 0; i < top; ++i) {
    const int32_t id = order[i];
    std::snprintf(buf, sizeof buf, "%d\t%.6g\t", id, static_cast<double>(logits[id]));
    const bool has_piece = model.tokenizer && id < model.tokenizer->vocab_size();
    out += buf + (has_piece ? model.tokenizer->piece(id) : std::string()) + "\n";
  }
  print_now(out);
}

}  // namespace

void register_logits(CLI::App& app) {
  auto args = std::make_shared<LogitsArgs>();
  CLI::App* cmd =
      add_command(app, "logits", "Print the token ids and last-position logits of a prompt");
  add_model_args(cmd, args->model);
  add_adapter_arg(cmd, args->model);
  auto* prompt = cmd->add_option("-p,--prompt", args->prompt, "text to score");
  auto* ids = cmd->add_option("--ids", args->ids, "token ids instead of a prompt, e.g. 1,2,3")
                  ->delimiter(',');
  prompt->excludes(ids);
  ids->excludes(prompt);
  cmd->add_option("--top", args->top, "also list the N most likely next tokens");
  cmd->add_flag("--no-bos", args->no_bos, "do not prepend the BOS token to --prompt");
  cmd->callback([args, prompt, ids] {
    QL_CHECK(prompt->count() + ids->count() > 0, "logits needs --prompt TEXT or --ids 1,2,3");
    args->use_ids = ids->count() > 0;
    run_logits(*args);
  });
}

}  // namespace qalora::cli
