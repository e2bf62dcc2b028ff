// Atomic file output: the temporary file a killed writer left is recognised by its dead pid and
// removed by the next write of the same file; a live writer's is left alone.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <string>
#include <vector>

#include "qalora/core/atomic_file.h"
#include "qalora/core/mapped_file.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;

// The pid of a process that has ended.
pid_t ended_pid() {
  const pid_t pid = fork();
  if (pid == 0) _exit(0);
  waitpid(pid, nullptr, 0);
  return pid;
}

TEST(AtomicFile, RecognisesWhatADeadWriterLeft) {
  const std::string dead = std::to_string(ended_pid()), alive = std::to_string(::getpid());
  EXPECT_TRUE(left_by_dead_process("a.json.tmp." + dead, "a.json.tmp."));
  EXPECT_FALSE(left_by_dead_process("a.json.tmp." + alive, "a.json.tmp."));
  EXPECT_FALSE(left_by_dead_process("b.json.tmp." + dead, "a.json.tmp."));
  EXPECT_FALSE(left_by_dead_process("a.json.tmp.", "a.json.tmp."));
  EXPECT_FALSE(left_by_dead_process("a.json.tmp.12x", "a.json.tmp."));
}

TEST(AtomicFile, TheNextWriteRemovesADeadWritersTemporaryFile) {
  const fs::path dir = test::temp_dir();
  const fs::path dead = dir / ("a.json.tmp." + std::to_string(ended_pid()));
  const fs::path other = dir / ("b.json.tmp." + std::to_string(ended_pid()));
  for (const fs::path& p : {dead, other}) std::ofstream(p) << "half";
  write_file_atomic(dir / "a.json", "{}");
  EXPECT_EQ(read_file(dir / "a.json"), "{}");
  EXPECT_FALSE(fs::exists(dead));
  EXPECT_TRUE(fs::exists(other));  // another file's is not this write's business
}

}  // namespace
}  // namespace qalora

namespace qalora {
namespace {

// Files are written through an aligned staging buffer with O_DIRECT where the file system takes
// it: writes of every size around the 4 KiB blocks and the 8 MiB buffer, put together, come
// back byte for byte, and tellp counts what was written.
TEST(AtomicFile, WritesOfAnySizeComeBackWhole) {
  const fs::path dir = test::temp_dir();
  for (const std::vector<size_t>& pieces : {std::vector<size_t>{},
                                            {1},
                                            {4095},
                                            {4096},
                                            {4097},
                                            {3, 4093, 4096, 1},
                                            {(size_t{8} << 20) + 3, 5, 4096},
                                            {100, size_t{8} << 20, 4096 * 3 + 7}}) {
    std::string want;
    write_file_atomic(dir / "f.bin", [&](std::ostream& out) {
      for (size_t n : pieces) {
        EXPECT_EQ(static_cast<size_t>(out.tellp()), want.size());
        std::string piece(n, '\0');
        for (size_t i = 0; i < n; ++i) piece[i] = static_cast<char>((want.size() + i) * 131 % 251);
        if (n == 1) {
          out.put(piece[0]);
        } else {
          out.write(piece.data(), static_cast<std::streamsize>(n));
        }
        want += piece;
      }
    });
    EXPECT_EQ(read_file(dir / "f.bin"), want)
        << pieces.size() << " pieces, " << want.size() << " bytes";
  }
}

}  // namespace
}  // namespace qalora
