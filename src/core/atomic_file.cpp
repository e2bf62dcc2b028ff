#include "qalora/core/atomic_file.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "qalora/core/error.h"

namespace qalora {

const char* write_failure_reason() {
  return errno != 0 ? std::strerror(errno) : "disk full?";
}

bool left_by_dead_process(std::string_view name, std::string_view prefix) {
  if (!name.starts_with(prefix) || name.size() == prefix.size()) return false;
  const std::string_view digits = name.substr(prefix.size());
  long pid = 0;
  const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), pid);
  if (ec != std::errc() || end != digits.data() + digits.size() || pid <= 0) return false;
  return ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH;
}

void for_each_left_by_dead_process(const std::filesystem::path& dir, std::string_view prefix,
                                   const std::function<void(const std::filesystem::path&)>& found) {
  std::error_code ec;
  std::vector<std::filesystem::path> left;  // collected first: `found` may change the folder
  for (const auto& e : std::filesystem::directory_iterator(dir, ec))
    if (left_by_dead_process(e.path().filename().string(), prefix)) left.push_back(e.path());
  for (const auto& p : left) found(p);
}

void write_file_atomic(const std::filesystem::path& path,
                       const std::function<void(std::ostream&)>& write) {
  const std::filesystem::path tmp =
      path.string() + ".tmp." + std::to_string(static_cast<long>(::getpid()));
  for_each_left_by_dead_process(path.has_parent_path() ? path.parent_path() : ".",
                                path.filename().string() + ".tmp.",
                                [](const std::filesystem::path& p) {
                                  std::error_code ignored;
                                  std::filesystem::remove(p, ignored);
                                });
  std::error_code ec;
  try {
    {
      std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
      if (!out) fail(tmp.string(), ": cannot open for writing: ", std::strerror(errno));
      write(out);
      out.flush();
      if (!out) fail(tmp.string(), ": write failed: ", write_failure_reason());
    }
    // Sync the data before the rename so a crash cannot expose an empty target.
    const int fd = ::open(tmp.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
      ::fsync(fd);
      ::close(fd);
    }
    std::filesystem::rename(tmp, path, ec);
    if (ec) fail(path.string(), ": cannot rename temporary file into place: ", ec.message());
  } catch (...) {
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    throw;
  }
}

void write_file_atomic(const std::filesystem::path& path, std::string_view contents) {
  write_file_atomic(path, [&](std::ostream& out) {
    out.write(contents.data(), static_cast<std::streamsize>(contents.size()));
  });
}

}  // namespace qalora
