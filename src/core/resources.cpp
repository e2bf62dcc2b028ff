#include "qalora/core/resources.h"

#include <sys/resource.h>

#include <fstream>
#include <map>
#include <sstream>
#include <string>

namespace qalora {

namespace {

// The "Key: N kB" lines of /proc/self/status, in bytes; empty where there is no such file.
std::map<std::string, int64_t> proc_status_bytes() {
  std::map<std::string, int64_t> fields;
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    std::istringstream words(line);
    std::string key, unit;
    int64_t value = 0;
    if (words >> key >> value >> unit && unit == "kB") fields[key] = value * 1024;
  }
  return fields;
}

}  // namespace

int64_t peak_rss_bytes() {
  // VmHWM belongs to this program's address space. getrusage's ru_maxrss survives exec, so a
  // command started from a large process would report that process's size as its own peak.
  const auto status = proc_status_bytes();
  if (const auto it = status.find("VmHWM:"); it != status.end()) return it->second;
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<int64_t>(u.ru_maxrss) * 1024;  // Linux reports KiB
}

ResidentSplit resident_now() {
  const auto status = proc_status_bytes();
  const auto get = [&](const char* key) {
    const auto it = status.find(key);
    return it == status.end() ? int64_t{0} : it->second;
  };
  return {.private_bytes = get("RssAnon:"), .file_bytes = get("RssFile:")};
}

}  // namespace qalora
