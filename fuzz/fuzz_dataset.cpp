// Training data through load_dataset with the tiny tokenizer. The first byte picks the format
// (auto, alpaca, io, chat, sharegpt, text), the file's extension (.json, .jsonl, .txt, which
// auto detection reads) and train_on_source; small length limits make truncation happen.
#include <array>
#include <cstddef>
#include <cstdint>

#include "fixtures.h"
#include "fuzz_util.h"
#include "qalora/data/dataset.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qalora;
  if (size == 0) return 0;
  constexpr std::array kFormats = {DataFormat::Auto, DataFormat::Alpaca,   DataFormat::InputOutput,
                                   DataFormat::Chat, DataFormat::ShareGpt, DataFormat::Text};
  constexpr std::array kExtensions = {"data.json", "data.jsonl", "data.txt"};
  const uint8_t selector = data[0];
  DataOptions options;
  options.format = kFormats[selector % kFormats.size()];
  options.train_on_source = (selector / 18) % 2 == 1;
  options.source_max_len = 24;
  options.target_max_len = 12;
  options.max_seq_len = 40;
  const auto path = fuzz::write_file(fuzz::fresh_dir(), kExtensions[(selector / 6) % 3],
                                     fuzz::as_text(data + 1, size - 1));
  fuzz::accept_errors([&] { (void)load_dataset(path, fuzz::tiny_tokenizer(), options); });
  return 0;
}
