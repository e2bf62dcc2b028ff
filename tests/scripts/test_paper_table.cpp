// scripts/paper-table.sh --quick (the QA-LoRA paper's comparison on stories260K) end to end, and
// the orderings the issue asks of it: at INT3 and INT2 the merged QA-LoRA model has a lower
// held-out loss than LoRA (on NF4) merged and re-quantized with GPTQ at the same bits, and the
// merged QA-LoRA model scores as the unmerged one to three significant digits.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "qalora/core/mapped_file.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;

const nlohmann::json& row(const nlohmann::json& rows, const std::string& method, int bits) {
  for (const auto& r : rows)
    if (r.at("method") == method && r.at("bits") == bits) return r;
  ADD_FAILURE() << "no row " << method << " INT" << bits;
  static const nlohmann::json none = {{"heldout_loss", NAN}, {"unmerged_heldout_loss", NAN}};
  return none;
}

TEST(PaperTable, QuickVariantShowsWhatQaLoraAvoids) {
  QL_SKIP_UNDER_SANITIZERS("minutes of training and quantization");
  QL_REQUIRE_DATA("models/stories260K/stories260K.bin");
  QL_REQUIRE_DATA("text/tinystories_val.txt");
  const fs::path out = test::temp_dir() / "table";
  const fs::path script = fs::path(__FILE__).parent_path().parent_path().parent_path() /
                          "scripts" / "paper_table.py";
  const std::string cmd = "python3 '" + script.string() + "' --quick --out '" + out.string() +
                          "' --qalora '" QALORA_CLI_PATH "' --data '" +
                          test::data_dir().string() + "' > '" + (out.string() + ".log") + "' 2>&1";
  const int rc = std::system(cmd.c_str());
  ASSERT_TRUE(fs::exists(out / "results.json")) << read_file(out.string() + ".log");
  const auto rows = nlohmann::json::parse(read_file(out / "results.json")).at("rows");
  EXPECT_EQ(rows.size(), 17u);
  for (const int bits : {3, 2}) {
    const double qalora = row(rows, "QA-LoRA (merged)", bits).at("heldout_loss");
    const double requantized = row(rows, "QLoRA w/ GPTQ", bits).at("heldout_loss");
    EXPECT_LT(qalora, requantized) << "INT" << bits;
  }
  for (const int bits : {4, 3, 2}) {
    const auto& r = row(rows, "QA-LoRA (merged)", bits);
    const double merged = r.at("heldout_loss"), unmerged = r.at("unmerged_heldout_loss");
    EXPECT_LE(std::abs(merged - unmerged), 5e-4 * unmerged) << "INT" << bits;
    // Fine-tuning helps over the bare GPTQ base at every width.
    EXPECT_LT(merged, row(rows, "GPTQ", bits).at("heldout_loss").get<double>()) << "INT" << bits;
    EXPECT_LT(r.at("bits_per_weight").get<double>(), bits + 1.5) << "deployed as a b-bit model";
  }
  EXPECT_EQ(rc, 0) << "the script checks the same orderings: " << read_file(out.string() + ".log");
  EXPECT_NE(read_file(out / "plot.svg").find("<polyline"), std::string::npos);
  EXPECT_NE(read_file(out / "table.md").find("QA-LoRA (merged)"), std::string::npos);
}

}  // namespace
}  // namespace qalora
