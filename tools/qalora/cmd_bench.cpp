// Placeholder until the bench subcommand lands.
#include "commands.h"

namespace qalora::cli {
void register_bench(CLI::App&) {}
}  // namespace qalora::cli
