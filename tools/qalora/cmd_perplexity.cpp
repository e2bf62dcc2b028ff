// Placeholder until the perplexity subcommand lands.
#include "commands.h"

namespace qalora::cli {
void register_perplexity(CLI::App&) {}
}  // namespace qalora::cli
