// Atomic file output: data goes to a temporary file beside the target, is flushed and synced,
// then renamed over the target, so an interrupted run never leaves a half-written file.
#pragma once

#include <filesystem>
#include <functional>
#include <ostream>
#include <string_view>

namespace qalora {

void write_file_atomic(const std::filesystem::path& path,
                       const std::function<void(std::ostream&)>& write);
void write_file_atomic(const std::filesystem::path& path, std::string_view contents);

}  // namespace qalora
