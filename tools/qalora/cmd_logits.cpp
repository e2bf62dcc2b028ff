// Placeholder until the logits subcommand lands.
#include "commands.h"

namespace qalora::cli {
void register_logits(CLI::App&) {}
}  // namespace qalora::cli
