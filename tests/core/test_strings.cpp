#include <gtest/gtest.h>

#include "qalora/core/strings.h"

namespace qalora {
namespace {

TEST(Strings, TrimDropsAsciiWhitespaceAtBothEndsOnly) {
  EXPECT_EQ(trim(" \t\r\nq_proj , k\r\n"), "q_proj , k");
  EXPECT_EQ(trim("x"), "x");
  EXPECT_EQ(trim(" \n\t "), "");
  EXPECT_EQ(trim(""), "");
  EXPECT_EQ(trim("\vx\f"), "\vx\f");  // \v and \f are not among the four
}

}  // namespace
}  // namespace qalora
