// Errors: every failure the user can cause is a qalora::Error whose message is one line naming
// the file, the field, and the expected and actual values. The CLI prints it and exits non-zero.
#pragma once

#include <exception>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace qalora {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Concatenates the arguments with operator<< into one message.
template <typename... Args>
std::string cat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

template <typename... Args>
[[noreturn]] void fail(Args&&... args) {
  throw Error(cat(std::forward<Args>(args)...));
}

// The first exception thrown by the bodies of an OpenMP parallel region, carried out of it (one
// that escaped the region would terminate the program): run each body through capture() and
// call rethrow() after the region.
class ParallelErrors {
 public:
  template <typename F>
  void capture(F&& body) noexcept {
    try {
      body();
    } catch (...) {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (!first_) first_ = std::current_exception();
    }
  }
  void rethrow() const {
    if (first_) std::rethrow_exception(first_);
  }

 private:
  std::mutex mutex_;
  std::exception_ptr first_;
};

}  // namespace qalora

// Checks a condition that bad input can violate; the message parts follow the condition.
#define QL_CHECK(cond, ...)                   \
  do {                                        \
    if (!(cond)) ::qalora::fail(__VA_ARGS__); \
  } while (0)
