// qalora train: fine-tune LoRA / QLoRA / QA-LoRA adapters on a frozen base (SPEC §4-§6).
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <thread>

#include "cli_common.h"
#include "commands.h"
#include "data_args.h"
#include "qalora/core/error.h"
#include "qalora/core/output_lock.h"
#include "qalora/dist/communicator.h"
#include "qalora/model/runtime.h"
#include "qalora/train/trainer.h"

namespace qalora::cli {

namespace {

std::atomic<bool> g_stop{false};
std::atomic<int> g_signal{0};

extern "C" void on_stop_signal(int sig) {
  g_signal.store(sig);
  g_stop.store(true);
}

struct TrainArgs {
  ModelArgs model;
  TrainConfig config;
  DataArgs data_args;
  std::string data, eval_data, out, resume;
  std::string adapter = "lora", targets = "all-linear", init = "kaiming";
  std::string pool = "avg", scheduler = "constant", on_non_finite = "stop";
  bool no_progress = false;
  CLI::Option* seed_option = nullptr;
};

// Ranks on one machine split its cores unless --threads says otherwise (a launcher that binds
// each rank to its cores, as mpirun does for a few ranks, already leaves each only its own).
void share_cores(const Communicator& comm, int threads) {
  if (threads > 0) return;
  const int visible = omp_get_num_procs();
  const auto machine = static_cast<int>(std::thread::hardware_concurrency());
  if (visible >= machine && comm.local_size() > 1)
    set_num_threads(std::max(1, machine / comm.local_size()));
}

void run_train(TrainArgs& args) {
  TrainConfig& c = args.config;
  c.data = args.data;
  c.eval_data = args.eval_data;
  c.out = args.out;
  c.resume = args.resume;
  c.progress = !args.no_progress;
  QL_CHECK(std::filesystem::exists(c.data), "--data: file not found: ", args.data);
  QL_CHECK(c.eval_data.empty() || std::filesystem::exists(c.eval_data),
           "--eval-data: file not found: ", args.eval_data);
  c.data_options = resolve_data_args(args.data_args);
  c.adapter.kind = parse_adapter_kind(args.adapter);
  c.adapter.targets = parse_targets(args.targets);
  c.adapter.init = parse_adapter_init(args.init);
  c.adapter.pool = parse_adapter_pool(args.pool);
  c.adapter.seed = c.seed;
  c.lr_schedule = parse_lr_schedule(args.scheduler);
  c.on_non_finite = parse_non_finite(args.on_non_finite);
  c.device = resolve_device(args.model);
  Communicator& comm = world();
  // Held until the run ends: a second run into the same folder is refused, not interleaved.
  std::optional<OutputLock> lock;
  if (comm.is_root()) lock.emplace(c.out, "--out");
  QL_CHECK(!c.resume.empty() || output_folder_is_empty(c.out), "--out: ", args.out,
           " exists and is not empty (use --resume ", args.out,
           " to continue that run, or another folder)");
  if (comm.size() > 1) {
    comm.barrier();  // every rank has checked --out before rank 0 writes into it
    share_cores(comm, args.model.threads);
  }

  const Model model = load_model(args.model);
  if (comm.is_root()) {
    if (c.device.cuda())
      std::printf("device:        %s, bf16 tensor-core products (fp32 accumulation)\n",
                  describe_device(c.device).c_str());
    else
      std::printf("%s\n", compute_line().c_str());
  }
  g_stop.store(false);
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
  const TrainResult r = train(model, c, &g_stop, comm);
  std::signal(SIGINT, SIG_DFL);
  std::signal(SIGTERM, SIG_DFL);
  if (!comm.is_root()) return;

  if (r.interrupted) {
    std::printf("interrupted at step %lld of %lld: checkpoint %s (continue with --resume %s)\n",
                static_cast<long long>(r.steps), static_cast<long long>(r.total_steps),
                r.checkpoint.string().c_str(), args.out.c_str());
    std::fflush(stdout);
    // The conventional status of a process ended by this signal, after a clean shutdown.
    std::exit(128 + g_signal.load());
  }
  std::printf("trained %lld steps: %lld tokens (%lld scored) in %.1f s, %.0f tokens/s\n",
              static_cast<long long>(r.steps), static_cast<long long>(r.tokens),
              static_cast<long long>(r.target_tokens), r.seconds,
              static_cast<double>(r.tokens) / std::max(r.seconds, 1e-9));
  if (comm.size() > 1) {
    const double per_step =
        r.all_reduce_seconds / static_cast<double>(std::max<int64_t>(1, r.steps - r.first_step));
    std::printf("%d ranks: %.3f s per step in the gradient all-reduce (%.1f%% of the time)\n",
                comm.size(), per_step, 100 * r.all_reduce_seconds / std::max(r.seconds, 1e-9));
  }
  if (r.eval_loss_before >= 0 && r.eval_loss_after >= 0)
    std::printf("held-out loss: %.4f -> %.4f\n", r.eval_loss_before, r.eval_loss_after);
  std::printf("last training loss: %.4f\n", r.train_loss_last);
  std::printf(
      "adapter: %s (native + PEFT files), loss curve: %s/loss.svg, metrics: %s/metrics.jsonl\n",
      args.out.c_str(), args.out.c_str(), args.out.c_str());
}

}  // namespace

void register_train(CLI::App& app) {
  auto args = std::make_shared<TrainArgs>();
  TrainConfig& c = args->config;
  CLI::App* cmd = add_command(app, "train", "Fine-tune LoRA / QLoRA / QA-LoRA adapters");
  add_model_args(cmd, args->model);
  add_compute_arg(cmd, args->model);
  add_device_arg(cmd, args->model);
  cmd->add_option("--data", args->data, "training data (.json/.jsonl/.txt)")->required();
  cmd->add_option("--out", args->out, "output folder (adapter, checkpoints, metrics)")->required();
  cmd->add_option("--resume", args->resume, "continue from a checkpoint (or an output folder)");
  // Adapter
  cmd->add_option("--adapter", args->adapter, "lora (LoRA/QLoRA/GPTQ-LoRA) or qalora")
      ->capture_default_str();
  cmd->add_option("-r,--rank", c.adapter.rank, "adapter rank")->capture_default_str();
  cmd->add_option("--alpha", c.adapter.alpha, "adapter alpha (scale alpha / r)")
      ->capture_default_str();
  cmd->add_option("--dropout", c.adapter.dropout, "adapter input dropout")->capture_default_str();
  cmd->add_flag("--rslora", c.adapter.rslora, "scale alpha / sqrt(r) (rank-stabilized LoRA)");
  cmd->add_option("--targets", args->targets, "comma list of q_proj..down_proj, or all-linear")
      ->capture_default_str();
  cmd->add_option("--init", args->init, "A initialisation: kaiming or gaussian")
      ->capture_default_str();
  cmd->add_option("--pool", args->pool, "qalora pooling: avg or sum")->capture_default_str();
  // Trainer
  cmd->add_option("--learning-rate,--lr", c.learning_rate, "peak learning rate")
      ->capture_default_str();
  cmd->add_option("--lr-scheduler", args->scheduler, "constant, linear or cosine")
      ->capture_default_str();
  cmd->add_option("--warmup-ratio", c.warmup_ratio, "fraction of steps of linear warmup")
      ->capture_default_str();
  cmd->add_option("--max-steps", c.max_steps, "optimizer steps (0 = --num-epochs)")
      ->capture_default_str();
  cmd->add_option("--num-epochs", c.num_epochs, "epochs when --max-steps is 0")
      ->capture_default_str();
  cmd->add_option("--batch-size", c.batch_size,
                  "sequences packed into one pass (no padding; bigger products, more activation "
                  "memory)")
      ->capture_default_str();
  cmd->add_option("--grad-accum", c.grad_accum, "micro-batches per optimizer step")
      ->capture_default_str();
  cmd->add_option("--max-grad-norm", c.max_grad_norm, "clip the gradient norm (0 = off)")
      ->capture_default_str();
  cmd->add_option("--weight-decay", c.adamw.weight_decay, "AdamW decoupled weight decay")
      ->capture_default_str();
  cmd->add_option("--adam-beta1", c.adamw.beta1)->capture_default_str();
  cmd->add_option("--adam-beta2", c.adamw.beta2)->capture_default_str();
  cmd->add_option("--adam-epsilon", c.adamw.eps)->capture_default_str();
  cmd->add_option("--eval-steps", c.eval_steps, "held-out loss every N steps (0 = start and end)")
      ->capture_default_str();
  cmd->add_option("--save-steps", c.save_steps, "checkpoint every N steps (0 = at the end only)")
      ->capture_default_str();
  cmd->add_option("--save-total-limit", c.save_total_limit, "keep the last K checkpoints (0 = all)")
      ->capture_default_str();
  cmd->add_option("--seed", c.seed, "seed of initialisation, data order and dropout")
      ->capture_default_str();
  cmd->add_option("--on-non-finite", args->on_non_finite,
                  "a step with a NaN/Inf loss or gradient: stop, or skip it")
      ->capture_default_str();
  cmd->add_flag("--grad-checkpoint", c.grad_checkpoint,
                "recompute each block in the backward (less memory, one more forward)");
  // Data
  cmd->add_option("--eval-data", args->eval_data,
                  "held-out data file (default: a split of --data)");
  cmd->add_option("--eval-fraction", c.eval_fraction, "held-out fraction of --data")
      ->capture_default_str();
  add_data_args(cmd, args->data_args);
  cmd->add_flag("--group-by-length", c.group_by_length, "batch sequences of similar length");
  cmd->add_flag("--no-progress", args->no_progress, "no progress bar");
  cmd->callback([args] { run_ranked([&] { run_train(*args); }); });
}

}  // namespace qalora::cli
