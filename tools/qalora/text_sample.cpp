#include "text_sample.h"

#include <nlohmann/json.hpp>

#include "cli_common.h"
#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"
#include "qalora/data/dataset.h"

namespace qalora::cli {

namespace fs = std::filesystem;
using nlohmann::json;

TextSample text_sample(const std::string& path, const Model& model, int64_t max_tokens,
                       const std::string& option) {
  QL_CHECK(fs::is_regular_file(path), option, ": cannot open ", path,
           ": no such file (pass a text file, or none to skip it)");
  const std::string text = read_file(path);
  QL_CHECK(!text.empty(), option, ": ", path, " is empty");
  std::vector<int32_t> tokens = model.require_tokenizer().encode(text, /*add_bos=*/false);
  if (std::ssize(tokens) > max_tokens) tokens.resize(static_cast<size_t>(max_tokens));
  return {path, std::move(tokens)};
}

TextSample training_data_sample(const fs::path& adapter, const Model& model, int64_t max_tokens,
                                const std::string& option) {
  const fs::path config_path = adapter / "train_config.json";
  const std::string hint = cat("; pass ", option, " FILE, or none to skip it");
  QL_CHECK(fs::is_regular_file(config_path), "adapter ", adapter,
           " has no train_config.json naming its training data", hint);
  const json config = json::parse(read_file(config_path), nullptr, false);
  QL_CHECK(!config.is_discarded() && config.contains("data_path") &&
               config["data_path"].is_string(),
           config_path.string(), ": field data_path: expected a path string", hint);
  const fs::path data = config["data_path"].get<std::string>();
  QL_CHECK(fs::is_regular_file(data), config_path.string(), ": data_path ", data,
           " does not exist (moved?)", hint);
  const DataOptions options = data_options_from_json(config.value("data_options", json::object()));
  const Dataset set = load_dataset(data, model.require_tokenizer(), options);
  TextSample sample{data.string(), {}};
  for (const Example& e : set.examples) {
    if (std::ssize(sample.tokens) >= max_tokens) break;
    sample.tokens.insert(sample.tokens.end(), e.tokens.begin(), e.tokens.end());
  }
  if (std::ssize(sample.tokens) > max_tokens) sample.tokens.resize(static_cast<size_t>(max_tokens));
  return sample;
}

}  // namespace qalora::cli
