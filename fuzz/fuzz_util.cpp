#include "fuzz_util.h"

#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <system_error>

namespace fs = std::filesystem;

namespace qalora::fuzz {

namespace {

// Removes the process's folder when the fuzzer exits normally (a crash leaves it for a look).
struct WorkDir {
  fs::path path;
  WorkDir() {
    const char* tmp = std::getenv("TMPDIR");
    const fs::path base = fs::is_directory("/dev/shm") ? fs::path("/dev/shm")
                          : tmp != nullptr             ? fs::path(tmp)
                                                       : fs::temp_directory_path();
    path = base / ("qalora-fuzz-" + std::to_string(::getpid()));
  }
  ~WorkDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

}  // namespace

fs::path fresh_dir() {
  static WorkDir dir;
  fs::remove_all(dir.path);
  fs::create_directories(dir.path);
  return dir.path;
}

fs::path write_file(const fs::path& dir, std::string_view name, std::string_view bytes) {
  fs::path path = dir / name;
  fs::create_directories(path.parent_path());
  std::ofstream(path, std::ios::binary)
      .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return path;
}

std::vector<std::string_view> split_parts(std::string_view input, size_t n) {
  std::vector<std::string_view> parts;
  while (parts.size() + 1 < n) {
    const size_t at = input.find(kPartSeparator);
    if (at == std::string_view::npos) break;
    parts.push_back(input.substr(0, at));
    input.remove_prefix(at + kPartSeparator.size());
  }
  parts.push_back(input);
  parts.resize(n);
  return parts;
}

void write_parts(const fs::path& dir, std::string_view input,
                 const std::vector<std::string>& names) {
  const std::vector<std::string_view> parts = split_parts(input, names.size());
  for (size_t i = 0; i < names.size(); ++i)
    if (!parts[i].empty()) write_file(dir, names[i], parts[i]);
}

std::string join_parts(const std::vector<std::string>& parts) {
  std::string out;
  for (size_t i = 0; i < parts.size(); ++i) {
    if (i > 0) out += kPartSeparator;
    out += parts[i];
  }
  return out;
}

bool verbose() {
  static const bool on = std::getenv("QALORA_FUZZ_VERBOSE") != nullptr;
  return on;
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace qalora::fuzz
