#include "qalora/core/atomic_file.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <streambuf>
#include <string>
#include <utility>
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

namespace {

// A file written through a 4 KiB-aligned staging buffer with O_DIRECT where the file system
// takes it: the data goes from the buffer to the disk without the kernel first copying it into
// the page cache (a third of a 7B RTN run's samples were that copy, and the copies left for
// writeback throttled the writer). The tail that is not a whole block is written without
// O_DIRECT. Where O_DIRECT is refused (tmpfs), plain buffered writes.
class DirectFileBuf : public std::streambuf {
 public:
  static constexpr size_t kAlign = 4096, kSize = size_t{8} << 20;

  explicit DirectFileBuf(const std::filesystem::path& path)
      : buf_(static_cast<char*>(std::aligned_alloc(kAlign, kSize))) {
    if (!buf_) throw std::bad_alloc();
    fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_DIRECT, 0644);
    direct_ = fd_ >= 0;
    if (fd_ < 0 && errno == EINVAL)
      fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    setp(buf_.get(), buf_.get() + kSize);
  }
  ~DirectFileBuf() override {
    if (fd_ >= 0) ::close(fd_);
  }
  DirectFileBuf(const DirectFileBuf&) = delete;
  DirectFileBuf& operator=(const DirectFileBuf&) = delete;

  bool is_open() const { return fd_ >= 0; }
  // Writes what is staged, syncs and closes; false (errno set) on failure.
  bool finish() {
    if (!drain(/*all=*/true) || ::fsync(fd_) != 0) return false;
    const int fd = std::exchange(fd_, -1);
    return ::close(fd) == 0;
  }

 protected:
  int_type overflow(int_type c) override {
    if (!drain(/*all=*/false)) return traits_type::eof();
    if (!traits_type::eq_int_type(c, traits_type::eof())) {
      *pptr() = traits_type::to_char_type(c);
      pbump(1);
    }
    return traits_type::not_eof(c);
  }
  // tellp() only: the output is written in order.
  pos_type seekoff(off_type off, std::ios_base::seekdir dir,
                   std::ios_base::openmode which) override {
    if (off != 0 || dir != std::ios_base::cur || which != std::ios_base::out)
      return pos_type(off_type(-1));
    return pos_type(static_cast<off_type>(written_ + static_cast<size_t>(pptr() - pbase())));
  }
  std::streamsize xsputn(const char* s, std::streamsize n) override {
    for (std::streamsize done = 0; done < n;) {
      if (pptr() == epptr() && !drain(/*all=*/false)) return done;
      const auto k = std::min<std::streamsize>(n - done, epptr() - pptr());
      std::memcpy(pptr(), s + done, static_cast<size_t>(k));
      pbump(static_cast<int>(k));
      done += k;
    }
    return n;
  }

 private:
  // Writes the staged whole blocks (and, with `all`, the tail after them), keeping the rest.
  bool drain(bool all) {
    const size_t staged = static_cast<size_t>(pptr() - pbase());
    const size_t whole = staged / kAlign * kAlign;
    if (!write_all(pbase(), whole)) return false;
    const size_t tail = staged - whole;
    if (all && tail > 0) {
      // A partial block cannot go through O_DIRECT: the file's last bytes are written plainly.
      if (!buffered() || !write_all(pbase() + whole, tail)) return false;
      setp(buf_.get(), buf_.get() + kSize);
      return true;
    }
    std::memmove(buf_.get(), pbase() + whole, tail);
    setp(buf_.get(), buf_.get() + kSize);
    pbump(static_cast<int>(tail));
    return true;
  }
  bool write_all(const char* p, size_t n) {
    while (n > 0) {
      const ssize_t w = ::write(fd_, p, n);
      if (w < 0 && errno == EINTR) continue;
      // O_DIRECT refuses a write the kernel would cut short (a file size limit): go on without
      // it, so that the error is the limit's own.
      if (w < 0 && errno == EINVAL && direct_) {
        if (!buffered()) return false;
        continue;
      }
      if (w <= 0) return false;
      written_ += static_cast<size_t>(w);
      p += w;
      n -= static_cast<size_t>(w);
    }
    return true;
  }

  // Clears O_DIRECT: later writes go through the page cache.
  bool buffered() {
    if (!direct_) return true;
    const int flags = ::fcntl(fd_, F_GETFL);
    if (flags < 0 || ::fcntl(fd_, F_SETFL, flags & ~O_DIRECT) != 0) return false;
    direct_ = false;
    return true;
  }

  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  std::unique_ptr<char, Free> buf_;
  int fd_ = -1;
  bool direct_ = false;
  size_t written_ = 0;  // bytes the file has
};

}  // namespace

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
      DirectFileBuf file(tmp);
      if (!file.is_open()) fail(tmp.string(), ": cannot open for writing: ", std::strerror(errno));
      std::ostream out(&file);
      errno = 0;
      write(out);
      // Synced before the rename, so that a crash cannot expose an empty target.
      if (!out || !file.finish()) fail(tmp.string(), ": write failed: ", write_failure_reason());
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
