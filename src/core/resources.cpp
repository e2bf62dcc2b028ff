#include "qalora/core/resources.h"

#include <sys/resource.h>

#include <fstream>
#include <sstream>
#include <string>

namespace qalora {

int64_t peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<int64_t>(u.ru_maxrss) * 1024;  // Linux reports KiB
}

ResidentSplit resident_now() {
  ResidentSplit r;
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    std::istringstream fields(line);
    std::string key;
    int64_t kib = 0;
    if (!(fields >> key >> kib)) continue;
    if (key == "RssAnon:") r.private_bytes = kib * 1024;
    if (key == "RssFile:") r.file_bytes = kib * 1024;
  }
  return r;
}

}  // namespace qalora
