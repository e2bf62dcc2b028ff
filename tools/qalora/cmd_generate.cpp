// Placeholder until the generate subcommand lands.
#include "commands.h"

namespace qalora::cli {
void register_generate(CLI::App&) {}
}  // namespace qalora::cli
