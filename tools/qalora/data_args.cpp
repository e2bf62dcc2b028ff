#include "data_args.h"

#include "qalora/model/chat.h"

namespace qalora::cli {

void add_data_args(CLI::App* cmd, DataArgs& a) {
  DataOptions& o = a.options;
  cmd->add_option("--format", a.format, "auto, alpaca, io, chat, sharegpt or text")
      ->capture_default_str();
  cmd->add_flag("--train-on-source", o.train_on_source, "also train on prompt tokens");
  cmd->add_option("--source-max-len", o.source_max_len, "prompt tokens kept")
      ->capture_default_str();
  cmd->add_option("--target-max-len", o.target_max_len, "response tokens kept")
      ->capture_default_str();
  cmd->add_option("--max-seq-len", o.max_seq_len, "text window length; cap on every sequence")
      ->capture_default_str();
  cmd->add_option("--chat-template", a.chat_template,
                  "chat/sharegpt: chatml, llama2, llama3 or zephyr (default: the model's)");
}

DataOptions resolve_data_args(const DataArgs& a) {
  DataOptions o = a.options;
  o.format = parse_data_format(a.format);
  if (!a.chat_template.empty()) o.chat_template = parse_chat_format(a.chat_template);
  return o;
}

}  // namespace qalora::cli
