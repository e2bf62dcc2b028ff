// Atomic file output: data goes to a temporary file beside the target, is flushed and synced,
// then renamed over the target, so an interrupted run never leaves a half-written file; the next
// write of the same file removes what a killed writer left. The data bypasses the page cache
// (O_DIRECT) where the file system allows it: the sync waits for the disk either way, and the
// kernel's copy into the page cache was a third of a 7B quantization's time.
#pragma once

#include <filesystem>
#include <functional>
#include <ostream>
#include <string_view>

namespace qalora {

void write_file_atomic(const std::filesystem::path& path,
                       const std::function<void(std::ostream&)>& write);
void write_file_atomic(const std::filesystem::path& path, std::string_view contents);

// Why the last write to a stream failed, for messages: the system's reason (errno) when it left
// one, else "disk full?".
const char* write_failure_reason();

// Whether `name` is PREFIX followed by the pid of a process that no longer exists: a temporary
// output (".tmp.PID") its writer left when it was killed, which a later writer may remove.
bool left_by_dead_process(std::string_view name, std::string_view prefix);
// Calls `found` with each entry of `dir` that left_by_dead_process(name, prefix) names (it may
// remove or rename the entry). A folder that cannot be read has none.
void for_each_left_by_dead_process(const std::filesystem::path& dir, std::string_view prefix,
                                   const std::function<void(const std::filesystem::path&)>& found);

}  // namespace qalora
