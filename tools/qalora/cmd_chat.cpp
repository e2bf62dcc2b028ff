// Placeholder until the chat subcommand lands.
#include "commands.h"

namespace qalora::cli {
void register_chat(CLI::App&) {}
}  // namespace qalora::cli
