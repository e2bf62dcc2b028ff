// What the process has used of the machine.
#pragma once

#include <cstdint>

namespace qalora {

// Peak resident set size of this process so far, in bytes.
int64_t peak_rss_bytes();

// Resident memory now, split by where it comes from (Linux /proc/self/status; zeros elsewhere).
// Mapped model files are page cache: the kernel can drop those pages and read them again, so
// only the private part has to fit in RAM.
struct ResidentSplit {
  int64_t private_bytes = 0;  // RssAnon: heap, stacks, copies
  int64_t file_bytes = 0;     // RssFile: pages of mapped files
};
ResidentSplit resident_now();

}  // namespace qalora
