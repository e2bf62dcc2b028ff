// Placeholder until the info subcommand lands.
#include "commands.h"

namespace qalora::cli {
void register_info(CLI::App&) {}
}  // namespace qalora::cli
