// Evaluation task files. The first byte picks the reader: read_mc_task for each
// multiple-choice kind, read_cloze, read_gsm8k, or read_mmlu on a folder holding one subject's
// test/ and dev/ CSV (two parts; shots and the per-subject limit from the second byte).
#include <array>
#include <cstddef>
#include <cstdint>

#include "fuzz_util.h"
#include "qalora/eval/tasks.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace qalora;
  if (size < 2) return 0;
  constexpr std::array kReaders = {TaskKind::Mc,   TaskKind::Arc,   TaskKind::Hellaswag,
                                   TaskKind::Piqa, TaskKind::Boolq, TaskKind::Winogrande,
                                   TaskKind::Mmlu, TaskKind::Cloze, TaskKind::Gsm8k};
  const TaskKind kind = kReaders[data[0] % kReaders.size()];
  const std::string_view input = fuzz::as_text(data + 2, size - 2);
  const std::filesystem::path dir = fuzz::fresh_dir();
  fuzz::accept_errors([&] {
    if (kind == TaskKind::Mmlu) {
      fuzz::write_parts(dir, input,
                        {"test/abstract_algebra_test.csv", "dev/abstract_algebra_dev.csv"});
      (void)read_mmlu(dir, data[1] % 6, data[1] / 6 % 3, 1);
    } else if (kind == TaskKind::Cloze) {
      (void)read_cloze(fuzz::write_file(dir, "task.jsonl", input));
    } else if (kind == TaskKind::Gsm8k) {
      (void)read_gsm8k(fuzz::write_file(dir, "task.jsonl", input));
    } else {
      (void)read_mc_task(kind, fuzz::write_file(dir, "task.jsonl", input));
    }
  });
  return 0;
}
