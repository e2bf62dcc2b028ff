// Subcommand registration: each cmd_<name>.cpp adds one subcommand to the app.
#pragma once

#include <CLI/CLI.hpp>

namespace qalora::cli {

void register_info(CLI::App& app);
void register_generate(CLI::App& app);
void register_logits(CLI::App& app);
void register_perplexity(CLI::App& app);
void register_eval(CLI::App& app);
void register_chat(CLI::App& app);
void register_bench(CLI::App& app);
void register_quantize(CLI::App& app);
void register_train(CLI::App& app);
void register_merge(CLI::App& app);
void register_export(CLI::App& app);

inline void register_commands(CLI::App& app) {
  register_info(app);
  register_generate(app);
  register_logits(app);
  register_perplexity(app);
  register_eval(app);
  register_chat(app);
  register_bench(app);
  register_quantize(app);
  register_train(app);
  register_merge(app);
  register_export(app);
}

}  // namespace qalora::cli
