// The training loop (SPEC §5): batches -> forward/backward -> clip -> AdamW -> schedule, with
// held-out evaluation, checkpoints that resume bit-exactly, metrics and a loss curve.
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

#include "qalora/adapters/adapter.h"
#include "qalora/core/device.h"
#include "qalora/data/dataset.h"
#include "qalora/dist/communicator.h"
#include "qalora/model/model.h"
#include "qalora/train/optimizer.h"

namespace qalora {

// What a step whose loss or gradient is NaN or infinite does: stop the run (the adapter and the
// checkpoints stay as they were before that step), or skip the step without updating anything.
enum class NonFinite { Stop, Skip };
const char* non_finite_name(NonFinite n);  // "stop", "skip"
NonFinite parse_non_finite(std::string_view name);

struct TrainConfig {
  std::filesystem::path data;
  std::filesystem::path eval_data;  // empty: split eval_fraction off `data`
  double eval_fraction = 0.05;
  DataOptions data_options;
  AdapterConfig adapter;

  double learning_rate = 2e-4;
  LrSchedule lr_schedule = LrSchedule::Constant;
  double warmup_ratio = 0.03;
  double max_grad_norm = 0.3;  // <= 0: no clipping
  AdamWConfig adamw;
  int64_t batch_size = 1;
  int64_t grad_accum = 16;
  int64_t max_steps = 0;  // > 0 overrides num_epochs
  int64_t num_epochs = 1;
  bool group_by_length = false;
  uint64_t seed = 42;
  bool grad_checkpoint = false;
  Device device;  // where the steps compute (not part of the identity: a run may move)
  NonFinite on_non_finite = NonFinite::Stop;

  int64_t eval_steps = 0;        // held-out loss every N steps (0: at the start and end only)
  int64_t save_steps = 0;        // checkpoint every N steps, and always after the last one
  int64_t save_total_limit = 0;  // keep the last K checkpoints (0: all)
  std::filesystem::path out;
  std::filesystem::path resume;  // a checkpoint-N folder, or an output folder (its latest)
  bool progress = true;

  // The fields that determine the trained adapter, as JSON: a resumed run must match them. The
  // length of the run is not one of them: a finished run continues to more steps.
  nlohmann::json identity(int ranks = 1) const;
};

struct TrainResult {
  int64_t steps = 0;  // optimizer steps done in total (including before a resume)
  int64_t total_steps = 0;
  int64_t first_step = 0;     // where this invocation started (non-zero after a resume)
  int64_t tokens = 0;         // tokens run through the model in this invocation
  int64_t target_tokens = 0;  // of which scored
  double seconds = 0;
  double all_reduce_seconds = 0;  // of `seconds`, summing gradients over the ranks
  double eval_loss_before = -1;  // mean held-out loss per target token; -1 without held-out data
  double eval_loss_after = -1;
  double train_loss_last = 0;  // of the last step
  int64_t skipped_steps = 0;   // steps with a non-finite loss or gradient (NonFinite::Skip)
  bool interrupted = false;
  std::filesystem::path checkpoint;  // the run's latest checkpoint (written or resumed from)
};

// Runs (or resumes) a training run writing into config.out: the adapter (adapter_io.h layouts)
// at the end, checkpoint-<step>/ folders, metrics.jsonl, loss.svg, train_config.json. Stops
// early, after writing a checkpoint, when `stop` becomes true (set it from a signal handler).
// Across the ranks of `comm` (data parallel, docs/distributed.md): each runs its share of every
// step's examples, gradients are summed, and rank 0 alone writes.
TrainResult train(const Model& model, const TrainConfig& config, const std::atomic<bool>* stop,
                  Communicator& comm = world());

// The checkpoint-<step> folder with the highest step in `dir`, or `dir` itself when it is one.
std::filesystem::path find_checkpoint(const std::filesystem::path& dir);

}  // namespace qalora
