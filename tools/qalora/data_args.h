// The data options shared by `train` and `perplexity --data` (which must read a training file
// into the same examples to score the same held-out split).
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "qalora/data/dataset.h"

namespace qalora::cli {

struct DataArgs {
  DataOptions options;
  std::string format = "auto";
  std::string chat_template;  // empty = the model's
};

// --format, --train-on-source, --source-max-len, --target-max-len, --max-seq-len, --chat-template.
void add_data_args(CLI::App* cmd, DataArgs& args);
// The options with the names parsed; throws Error listing the valid names.
DataOptions resolve_data_args(const DataArgs& args);

}  // namespace qalora::cli
