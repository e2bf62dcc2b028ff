// Atomic file output: the temporary file a killed writer left is recognised by its dead pid and
// removed by the next write of the same file; a live writer's is left alone.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <string>

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
