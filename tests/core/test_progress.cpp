#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "qalora/core/error.h"
#include "qalora/core/progress.h"
#include "test_util.h"

namespace qalora {
namespace {

std::string read_back(std::FILE* f) {
  std::fflush(f);
  std::rewind(f);
  std::string out;
  char buf[256];
  while (std::fgets(buf, sizeof buf, f)) out += buf;
  return out;
}

int count_lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

TEST(ProgressBar, FormatShowsCountPercentRateAndEta) {
  EXPECT_EQ(ProgressBar::format("eval", 25, 100, 5.0), "eval 25/100 (25%) 5 it/s ETA 15.0s");
  EXPECT_EQ(ProgressBar::format("eval", 100, 100, 20.0),
            "eval 100/100 (100%) 5 it/s elapsed 20.0s");
  EXPECT_EQ(ProgressBar::format("train", 7, 0, 2.0), "train 7 3.5 it/s elapsed 2.0s");
  EXPECT_EQ(ProgressBar::format("x", 1, 1000, 1.0), "x 1/1000 (0%) 1 it/s ETA 16m39s");
}

TEST(ProgressBar, OffATtyPrintsAPlainLineEveryTenth) {
  std::FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  {
    ProgressBar bar("windows", 1000, f, /*tty=*/false);
    for (int i = 0; i < 1000; ++i) bar.advance();
  }
  const std::string out = read_back(f);
  std::fclose(f);
  EXPECT_EQ(out.find('\r'), std::string::npos);
  EXPECT_EQ(count_lines(out), 10) << out;  // 10%, 20%, ..., 100%; finish adds nothing
  EXPECT_NE(out.find("windows 100/1000 (10%)"), std::string::npos) << out;
  EXPECT_NE(out.find("windows 1000/1000 (100%)"), std::string::npos) << out;
}

TEST(ProgressBar, OffATtyFinishReportsAnEarlyStop) {
  std::FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  {
    ProgressBar bar("steps", 10, f, /*tty=*/false);
    bar.update(3);
  }
  const std::string out = read_back(f);
  std::fclose(f);
  EXPECT_EQ(count_lines(out), 2) << out;
  EXPECT_NE(out.find("steps 3/10 (30%)"), std::string::npos) << out;
}

TEST(ProgressBar, OnATtyRedrawsOneLine) {
  std::FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  {
    ProgressBar bar("w", 3, f, /*tty=*/true);
    for (int i = 0; i < 3; ++i) bar.advance();
  }
  const std::string out = read_back(f);
  std::fclose(f);
  EXPECT_EQ(count_lines(out), 1) << out;
  EXPECT_EQ(out.front(), '\r');
  EXPECT_NE(out.find("w 3/3 (100%)"), std::string::npos) << out;
}

TEST(JsonlWriter, AppendsFlushedLines) {
  const auto path = test::temp_dir() / "metrics.jsonl";
  {
    JsonlWriter w(path);
    w.write({{"step", 1}, {"loss", 2.5}});
    // Flushed: readable before the writer closes.
    std::ifstream in(path);
    std::string line;
    ASSERT_TRUE(std::getline(in, line));
    EXPECT_EQ(nlohmann::json::parse(line)["loss"], 2.5);
  }
  {
    JsonlWriter w(path, /*append=*/true);
    w.write({{"step", 2}});
  }
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  EXPECT_EQ(ss.str(), "{\"loss\":2.5,\"step\":1}\n{\"step\":2}\n");
  EXPECT_THROW(JsonlWriter(test::temp_dir() / "missing" / "m.jsonl"), Error);
}

}  // namespace
}  // namespace qalora
