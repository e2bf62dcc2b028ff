// Small deterministic hashes: seeding per-purpose random streams and fingerprinting files.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

namespace qalora {

// SplitMix64's finalizer: a bijective mix of 64 bits, used to derive independent seeds
// (per adapter, per step, per element) from one user seed.
constexpr uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// A seed for stream `index` of `seed`.
constexpr uint64_t derive_seed(uint64_t seed, uint64_t index) {
  return splitmix64(seed ^ splitmix64(index));
}

// FNV-1a 64 of a file's bytes, as 16 hex digits; throws Error when unreadable.
std::string file_fingerprint(const std::filesystem::path& path);

}  // namespace qalora
