// Helpers shared by the fuzz targets and the seed generator: where a target writes the files it
// hands to a loader, and how one fuzz input holds several files.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "qalora/core/error.h"

namespace qalora::fuzz {

// Separates the files of a multi-file input (also in every dictionary, so mutations keep it).
inline constexpr std::string_view kPartSeparator = "\n@@qalora-part@@\n";

// A folder of this process's own (under /dev/shm when present, else $TMPDIR), emptied by each
// call and removed at exit: loaders take paths, so every input is written there first.
std::filesystem::path fresh_dir();

// `bytes` as file `name` (which may hold a subfolder) in `dir`; returns its path.
std::filesystem::path write_file(const std::filesystem::path& dir, std::string_view name,
                                 std::string_view bytes);

// The input cut at kPartSeparator into exactly `n` parts: missing ones are empty, and the last
// keeps any further separators.
std::vector<std::string_view> split_parts(std::string_view input, size_t n);

// Writes the parts into `dir` under the names given, in order; an empty part leaves its file
// out, so that the fuzzer also tries folders missing a file.
void write_parts(const std::filesystem::path& dir, std::string_view input,
                 const std::vector<std::string>& names);

// The inverse of split_parts, for seeds.
std::string join_parts(const std::vector<std::string>& parts);

std::string read_file(const std::filesystem::path& path);

inline std::string_view as_text(const uint8_t* data, size_t size) {
  return {reinterpret_cast<const char*>(data), size};
}

// Whether QALORA_FUZZ_VERBOSE is set: accept_errors then prints each Error, to see how far an
// input (a seed, a regression) gets.
bool verbose();

// Runs `f`: bad input must end in a qalora::Error, which is the expected outcome and swallowed
// here; any other exception escapes and libFuzzer reports it as a crash.
template <typename F>
void accept_errors(F&& f) {
  try {
    f();
  } catch (const qalora::Error& e) {
    if (verbose()) std::fprintf(stderr, "qalora::Error: %s\n", e.what());
  }
}

}  // namespace qalora::fuzz
