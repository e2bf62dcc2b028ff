// OutputLock: one holder per folder at a time, released when the holder goes; the folder writer
// that quantize and merge use refuses a second writer of the same output.
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>
#include <optional>
#include <string>

#include "qalora/core/error.h"
#include "qalora/core/output_lock.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(OutputLock, RefusesASecondHolderUntilTheFirstIsGone) {
  const fs::path dir = test::temp_dir() / "out";
  std::optional<OutputLock> first;
  first.emplace(dir, "--out");
  EXPECT_TRUE(fs::is_directory(dir));
  // flock locks belong to open files, so a second claim conflicts even within one process.
  const std::string err = error_of([&] { OutputLock second(dir, "--out"); });
  EXPECT_NE(err.find("--out: " + dir.string() + " is in use by another run (pid " +
                     std::to_string(::getpid()) + ")"),
            std::string::npos)
      << err;
  first.reset();
  EXPECT_EQ(error_of([&] { OutputLock again(dir, "--out"); }), "");
}

TEST(OutputLock, AFolderHoldingOnlyTheLockFileCountsAsEmpty) {
  const fs::path dir = test::temp_dir() / "out";
  EXPECT_TRUE(output_folder_is_empty(dir));
  { OutputLock lock(dir, "--out"); }
  EXPECT_TRUE(fs::exists(dir / OutputLock::kFileName));
  EXPECT_TRUE(output_folder_is_empty(dir));
  std::ofstream(dir / "metrics.jsonl") << "{}\n";
  EXPECT_FALSE(output_folder_is_empty(dir));
}

}  // namespace
}  // namespace qalora
