#include "qalora/core/output_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "qalora/core/error.h"

namespace qalora {

namespace fs = std::filesystem;

OutputLock::OutputLock(const fs::path& dir, const char* option) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  QL_CHECK(!ec, option, ": cannot create ", dir.string(), ": ", ec.message());
  const fs::path file = dir / kFileName;
  fd_ = ::open(file.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  QL_CHECK(fd_ >= 0, option, ": cannot open ", file.string(), ": ", std::strerror(errno));
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int err = errno;
    char holder[32] = {};
    const ssize_t n = ::pread(fd_, holder, sizeof holder - 1, 0);
    ::close(fd_);
    fd_ = -1;
    QL_CHECK(err != EWOULDBLOCK, option, ": ", dir.string(), " is in use by another run (pid ",
             n > 0 ? std::string(holder, static_cast<size_t>(n)) : "?",
             "); wait for it to end or choose another folder");
    fail(option, ": cannot lock ", file.string(), ": ", std::strerror(err));
  }
  // The holder's pid, for the message a second run prints.
  const std::string pid = std::to_string(static_cast<long>(::getpid()));
  if (::ftruncate(fd_, 0) != 0 ||
      ::pwrite(fd_, pid.data(), pid.size(), 0) != static_cast<ssize_t>(pid.size()))
    fail(option, ": cannot write ", file.string(), ": ", std::strerror(errno));
}

OutputLock::~OutputLock() {
  if (fd_ >= 0) ::close(fd_);  // closing the last descriptor releases the flock
}

bool output_folder_is_empty(const fs::path& dir) {
  if (!fs::exists(dir)) return true;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename() != OutputLock::kFileName) return false;
  return true;
}

}  // namespace qalora
