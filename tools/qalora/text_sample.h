// The token samples that checks and calibrations run on: merge's fidelity check and export's
// offset rounding. By default both use the data the adapter was trained on.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "qalora/model/model.h"

namespace qalora::cli {

struct TextSample {
  std::string source;  // the file the tokens come from
  std::vector<int32_t> tokens;
};

// The first `max_tokens` tokens of a text file. Errors name `option` (the CLI option that gave
// the path).
TextSample text_sample(const std::string& path, const Model& model, int64_t max_tokens,
                       const std::string& option);

// The first examples of the data `adapter` was trained on (train_config.json's data_path, read
// with the run's data options), up to `max_tokens` tokens. Errors suggest `option` FILE or none.
TextSample training_data_sample(const std::filesystem::path& adapter, const Model& model,
                                int64_t max_tokens, const std::string& option);

}  // namespace qalora::cli
