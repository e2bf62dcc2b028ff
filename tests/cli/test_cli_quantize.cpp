// qalora quantize end to end on stories260K, like a user would run it, and its bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>

#include "model/random_model.h"
#include "qalora/core/mapped_file.h"
#include "qalora/model/runtime.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;
using test::expect_one_line_error;
using test::run_cli;

const fs::path kStories = "models/stories260K";
const fs::path kTinyStories = "text/tinystories_val.txt";

std::string stories(const std::string& file) {
  return (test::data_dir() / kStories / file).string();
}

std::vector<std::string> stories_args(std::vector<std::string> args) {
  args.insert(args.begin() + 1,
              {"-m", stories("stories260K.bin"), "--tokenizer", stories("tok512.bin")});
  return args;
}

double ppl_of(const std::vector<std::string>& model_args, const fs::path& text) {
  std::vector<std::string> args = {"perplexity"};
  args.insert(args.end(), model_args.begin(), model_args.end());
  args.insert(args.end(), {"--text", text.string(), "--ctx", "256"});
  const auto r = run_cli(args);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  const auto at = r.out.find("ppl:");
  return at == std::string::npos ? NAN : std::stod(r.out.substr(at + 4));
}

// Every method through the CLI: the folder loads, generates, and scores close to fp32 (INT8
// nearly equal, 4-bit within a few percent, GPTQ no worse than RTN at 3 bits).
TEST(CliQuantize, StoriesEveryMethodRoundTripsThroughTheFolder) {
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  QL_REQUIRE_DATA(kTinyStories);
  const fs::path dir = test::temp_dir();
  const std::string text = read_file(test::data_dir() / kTinyStories);
  const fs::path eval = dir / "eval.txt", calib = dir / "calib.txt";
  std::ofstream(eval) << text.substr(0, 40000);
  std::ofstream(calib) << text.substr(100000, 100000);
  const double fp =
      ppl_of({"-m", stories("stories260K.bin"), "--tokenizer", stories("tok512.bin")}, eval);

  struct Row {
    std::vector<std::string> flags;
    double max_ratio;
  };
  const Row rows[] = {
      {{"--method", "int8"}, 1.01},
      {{"--method", "rtn", "--bits", "8", "-g", "32"}, 1.01},
      {{"--method", "rtn", "--bits", "4", "-g", "32"}, 1.15},
      {{"--method", "rtn", "--bits", "4", "-g", "48", "--sym"}, 1.25},
      {{"--method", "nf4"}, 1.2},
      {{"--method", "fp4", "--double-quant"}, 1.25},
      {{"--method", "gptq", "--bits", "4", "-g", "32", "--calib", calib.string(), "--calib-samples",
        "16", "--calib-len", "128"},
       1.1},
      {{"--method", "gptq", "--bits", "3", "-g", "32", "--act-order", "--calib", calib.string(),
        "--calib-samples", "16", "--calib-len", "128"},
       1.8},
  };
  for (const Row& row : rows) {
    const fs::path out = dir / "q";
    std::vector<std::string> args = {"quantize", "--out", out.string(), "--metrics",
                                     (dir / "q.jsonl").string()};
    args.insert(args.end(), row.flags.begin(), row.flags.end());
    const auto r = run_cli(stories_args(args));
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find("bits/weight"), std::string::npos) << r.out;
    // GPTQ reports its arithmetic against the GEMM peak; the rounding methods do none.
    EXPECT_EQ(r.out.find("of the fp32 GEMM peak") != std::string::npos, row.flags[1] == "gptq")
        << r.out;
    // One metrics line per quantized linear: 5 blocks x 7.
    std::ifstream metrics(dir / "q.jsonl");
    int lines = 0;
    for (std::string line; std::getline(metrics, line);) ++lines;
    EXPECT_EQ(lines, 35);
    const double q = ppl_of({"-m", out.string()}, eval);
    EXPECT_LT(q, fp * row.max_ratio) << row.flags[1] << ": " << q << " vs fp32 " << fp;
    EXPECT_GT(q, fp * 0.97);
    const auto g = run_cli(
        {"generate", "-m", out.string(), "--prompt", "Once upon", "-n", "8", "--temp", "0"});
    EXPECT_EQ(g.exit_code, 0) << g.err;
    EXPECT_EQ(g.out.rfind("Once upon", 0), 0u) << g.out;
    fs::remove_all(out);
  }
}

// QALORA_ISA picks the quantized kernels' instruction set (portable always runs) and names
// the choices when it matches none.
TEST(CliQuantize, KernelIsaFromTheEnvironment) {
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  const fs::path out = test::temp_dir() / "q";
  const auto q = run_cli(stories_args(
      {"quantize", "--method", "rtn", "--bits", "4", "-g", "32", "--out", out.string()}));
  ASSERT_EQ(q.exit_code, 0) << q.err;
  const std::vector<std::string> gen = {"generate", "-m", out.string(), "--prompt", "Once upon",
                                        "-n",       "8",  "--temp",     "0"};
  ASSERT_EQ(setenv("QALORA_ISA", "portable", 1), 0);
  const auto portable = run_cli(gen);
  ASSERT_EQ(setenv("QALORA_ISA", "avx9000", 1), 0);
  const auto bogus = run_cli(gen);
  unsetenv("QALORA_ISA");
  EXPECT_EQ(portable.exit_code, 0) << portable.err;
  EXPECT_EQ(portable.out.rfind("Once upon", 0), 0u) << portable.out;
  test::expect_one_line_error(bogus, "QALORA_ISA=avx9000");
  EXPECT_NE(bogus.err.find("avx512vnni"), std::string::npos) << bogus.err;
}

TEST(CliQuantize, BadOptionsAreOneLineErrors) {
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  const std::string out = (test::temp_dir() / "q").string();
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"quantize", "--bits", "5", "--out", out}, "--bits"},
      {{"quantize", "--method", "nf4", "--bits", "3", "--out", out}, "--bits"},
      {{"quantize", "--method", "nf4", "-g", "128", "--out", out}, "--group-size"},
      {{"quantize", "--method", "int8", "--bits", "4", "--out", out}, "--bits"},
      {{"quantize", "-g", "0", "--out", out}, "--group-size"},
      {{"quantize", "--method", "awq", "--out", out}, "--method"},
      {{"quantize", "--act-order", "--out", out}, "--act-order"},
      {{"quantize", "--method", "gptq", "--static-groups", "--calib", "x", "--out", out},
       "--static-groups"},
      {{"quantize", "--method", "gptq", "--damp", "1.5", "--calib", "x", "--out", out}, "--damp"},
      {{"quantize", "--method", "gptq", "--out", out}, "--calib"},
      {{"quantize", "--method", "gptq", "--calib", "/nonexistent.txt", "--out", out}, "--calib"},
      {{"quantize", "--method", "rtn", "--calib", stories("tok512.bin"), "--out", out}, "--calib"},
  };
  for (const auto& [args, mention] : cases) {
    const auto r = run_cli(stories_args(args));
    expect_one_line_error(r, mention);
    EXPECT_FALSE(fs::exists(out)) << "no output folder after a refused run";
  }
}

TEST(CliQuantize, CalibrationTextShorterThanAskedIsRefused) {
  QL_REQUIRE_DATA(kStories / "stories260K.bin");
  const fs::path dir = test::temp_dir();
  std::ofstream(dir / "short.txt") << "Once upon a time there was a cat.";
  const auto r =
      run_cli(stories_args({"quantize", "--method", "gptq", "--calib", (dir / "short.txt").string(),
                            "--calib-len", "256", "--out", (dir / "q").string()}));
  expect_one_line_error(r, "short.txt");
  EXPECT_NE(r.err.find("256"), std::string::npos) << r.err;
}

TEST(CliQuantize, NonFiniteWeightsAreRefused) {
  for (float bad :
       {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    Model m = test::make_random_model({}, 3);
    m.layers[1].up.weight.mutable_data()[17] = bad;
    const fs::path dir = test::temp_dir();
    save_hf_model(m, dir / "model");
    auto r = run_cli({"quantize", "-m", (dir / "model").string(), "--out", (dir / "q").string()});
    // Quantizing streams: the bad weight is found when its layer comes, after the progress of
    // the layers before it; the error is the last line and nothing is left under --out.
    const size_t last = r.err.rfind('\n', r.err.size() - 2);
    if (last != std::string::npos) r.err.erase(0, last + 1);
    expect_one_line_error(r, "up_proj");
    EXPECT_FALSE(fs::exists(dir / "q"));
    EXPECT_FALSE(fs::exists(dir / "q.partial"));
  }
}

}  // namespace
}  // namespace qalora
