// What the process has used of the machine.
#pragma once

#include <cstdint>

namespace qalora {

// Peak resident set size of this process so far, in bytes.
int64_t peak_rss_bytes();

}  // namespace qalora
