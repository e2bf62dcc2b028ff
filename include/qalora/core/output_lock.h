// An exclusive claim on an output folder for the life of a process: a second run writing into the
// same folder is refused instead of interleaving its files with the first one's. The claim is an
// flock(2) on a ".lock" file inside the folder, so the kernel drops it when the holder exits, even
// by kill -9, and a stale lock file never blocks a later run.
#pragma once

#include <filesystem>

namespace qalora {

class OutputLock {
 public:
  // The name of the lock file inside the folder (tools that check a folder is empty skip it).
  static constexpr const char* kFileName = ".lock";

  // Creates `dir` when missing and claims it; throws Error naming the folder and the holder's pid
  // when another process holds it. `option` names the flag in the message ("--out").
  OutputLock(const std::filesystem::path& dir, const char* option);
  ~OutputLock();
  OutputLock(const OutputLock&) = delete;
  OutputLock& operator=(const OutputLock&) = delete;

 private:
  int fd_ = -1;
};

// Whether `dir` holds nothing but a lock file (or does not exist).
bool output_folder_is_empty(const std::filesystem::path& dir);

}  // namespace qalora
