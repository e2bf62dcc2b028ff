#include "qalora/core/hash.h"

#include <cstdio>
#include <fstream>
#include <vector>

#include "qalora/core/error.h"

namespace qalora {

std::string file_fingerprint(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  QL_CHECK(in, "cannot read ", path.string());
  uint64_t h = 0xCBF29CE484222325ULL;
  std::vector<char> buf(1 << 16);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    const auto n = static_cast<size_t>(in.gcount());
    for (size_t i = 0; i < n; ++i) {
      h ^= static_cast<uint8_t>(buf[i]);
      h *= 0x100000001B3ULL;
    }
  }
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(h));
  return hex;
}

}  // namespace qalora
