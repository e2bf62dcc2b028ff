// qalora bench: how close inference gets to the machine. Prefill is compute-bound, so its
// linear-layer GFLOP/s is compared with the fp32 GEMM peak; decoding one token at a time reads
// every weight once per token, so its implied weight bandwidth is compared with memory bandwidth.
#include <cblas.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "cli_common.h"
#include "commands.h"
#include "qalora/core/error.h"
#include "qalora/core/resources.h"
#include "qalora/ops/blas.h"
#include "qalora/ops/gemm.h"
#include "qalora/quant/qmatrix.h"
#include "qalora/train/optimizer.h"
#include "qalora/train/train_step.h"

namespace qalora::cli {

namespace {

struct BenchArgs {
  ModelArgs model;
  int64_t prompt_tokens = 256;
  int64_t gen_tokens = 64;
  std::string baseline;
  int reps = 3;
  bool json = false;
  // --train: one training step's speed instead of inference.
  bool train = false;
  std::string train_adapter;  // lora or qalora; default: qalora on an affine integer base
  int64_t seq_len = 512;
  int64_t batch = 1;  // --train: sequences packed into one pass
  int64_t rank = 64;
  int64_t steps = 3;
  bool grad_checkpoint = false;
};

constexpr int kReps = 3;

// What the frozen linears are: the quantization method ("rtn base") or, for a dense base, the
// type it is stored in ("a BF16 base").
std::string base_name(const Model& model) {
  if (!model.quant.empty()) return model.quant.method + " base";
  if (model.layers.empty()) return "no base";
  return cat("a ", model.layers.front().q.weight.stored_type(), " base");
}

struct Bandwidth {
  double read_gbs;
  double copy_gbs;  // bytes read + bytes written
};

// 256 MiB arrays: far beyond any cache.
class MemoryProbe {
 public:
  MemoryProbe() : src_(kFloats, 1.0f), dst_(kFloats, 0.0f) {}
  Bandwidth measure() {
    const auto len = static_cast<int64_t>(kFloats);
    constexpr int64_t chunk = 1 << 16;
    const double copy_s = best_seconds(kReps, [&] {
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < len; i += chunk) {
        const auto count = static_cast<size_t>(std::min(chunk, len - i));
        std::memcpy(dst_.data() + i, src_.data() + i, count * sizeof(float));
      }
    });
    return {read_gbs(), 2 * kBytes / copy_s / 1e9};
  }
  // OpenBLAS's sasum is a vectorised, threaded pure read of the array.
  double read_gbs() {
    const int n = static_cast<int>(kFloats);
    return kBytes / best_seconds(kReps, [&] { sink_ = sink_ + cblas_sasum(n, src_.data(), 1); }) /
           1e9;
  }

 private:
  static constexpr size_t kFloats = (size_t{256} << 20) / sizeof(float);
  static constexpr double kBytes = static_cast<double>(kFloats * sizeof(float));
  std::vector<float> src_, dst_;
  volatile float sink_ = 0;  // keeps the read from being optimised away
};

// Bytes of weights one decoded token reads: every weight once as it is held (quantized codes
// with their group parameters as held, F16/BF16/ggml rows as stored, fp32 arrays), except that
// an untied embedding table contributes a single row (the head is read in full either way).
double quantized_bytes(const QMatrix& q) {
  return static_cast<double>(q.codes.size() + q.scales.byte_size() + q.offsets.byte_size()) +
         4.0 * static_cast<double>(q.g_idx.size() + q.absmax.size());
}

double weight_bytes_per_token(const Model& model) {
  auto bytes_of = [](const Tensor& t) { return static_cast<double>(t.stored_bytes()); };
  double bytes = bytes_of(model.final_norm);
  for (const LayerWeights& L : model.layers) {
    bytes += bytes_of(L.attn_norm) + bytes_of(L.ffn_norm);
    for (const Linear* l : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down})
      bytes += (l->quantized() ? quantized_bytes(l->qweight) : bytes_of(l->weight)) +
               bytes_of(l->bias);
  }
  bytes += model.head_q.codes.empty() ? bytes_of(model.head()) : quantized_bytes(model.head_q);
  if (!model.output.empty())
    bytes += bytes_of(model.tok_embeddings) / static_cast<double>(model.config.vocab_size);
  return bytes;
}

struct Speed {
  double prefill_tps = 0;
  double linear_gflops = 0;
  double linear_share = 0;  // of prefill time
  double decode_tps = 0;
  double decode_linear_share = 0;     // of decode time
  double decode_attention_share = 0;  // of decode time
  double bytes_per_token = 0;
};

Speed measure(const Model& model, const AdapterSet* adapters, const BenchArgs& args) {
  const int64_t ctx = args.prompt_tokens + args.gen_tokens;
  QL_CHECK(ctx <= model.config.context_length, "--prompt-tokens + --gen-tokens = ", ctx,
           " exceeds the model's context length ", model.config.context_length);
  std::mt19937_64 rng(1234);
  std::uniform_int_distribution<int32_t> any_token(
      0, static_cast<int32_t>(model.config.vocab_size - 1));
  std::vector<int32_t> prompt(static_cast<size_t>(args.prompt_tokens));
  for (auto& t : prompt) t = any_token(rng);

  InferenceSession session(model, ctx, adapters);
  session.keep_weights_resident();
  session.stats().reset();
  auto start = Clock::now();
  std::vector<float> logits = session.forward_last(prompt);
  const double prefill_s = seconds_since(start);
  const ForwardStats prefill = session.stats();

  session.stats().reset();
  start = Clock::now();
  for (int64_t i = 0; i < args.gen_tokens; ++i) {
    const int32_t next[] = {argmax(logits)};
    logits = session.forward_last(next);
  }
  const double decode_s = seconds_since(start);
  const ForwardStats decode = session.stats();

  Speed r;
  r.prefill_tps = static_cast<double>(args.prompt_tokens) / prefill_s;
  r.linear_gflops =
      prefill.linear_seconds > 0 ? prefill.linear_flops / prefill.linear_seconds / 1e9 : 0.0;
  r.linear_share = prefill.linear_seconds / prefill_s;
  r.decode_tps = static_cast<double>(args.gen_tokens) / decode_s;
  r.decode_linear_share = decode.linear_seconds / decode_s;
  r.decode_attention_share = decode.attention_seconds / decode_s;
  r.bytes_per_token = weight_bytes_per_token(model);
  return r;
}

// Training step speed (SPEC §5 defaults except the rank and sequence given): forward, backward,
// gradient clipping and AdamW over one random sequence, all positions scored.
void run_train_bench(const BenchArgs& args) {
  QL_CHECK(args.seq_len >= 2, "--seq-len must be >= 2, got ", args.seq_len);
  QL_CHECK(args.steps >= 1, "--steps must be >= 1, got ", args.steps);
  QL_CHECK(args.batch >= 1, "--batch must be >= 1, got ", args.batch);
  const Device device = resolve_device(args.model);
  const Model model = load_model(args.model);
  AdapterConfig cfg;
  const bool affine =
      !model.quant.empty() && model.quant.method != "nf4" && model.quant.method != "fp4";
  cfg.kind = parse_adapter_kind(args.train_adapter.empty() ? (affine ? "qalora" : "lora")
                                                           : args.train_adapter);
  cfg.rank = args.rank;
  AdapterSet adapters = create_adapters(model, cfg);
  TrainSession session(
      model, adapters, args.batch * args.seq_len,
      {.grad_checkpoint = args.grad_checkpoint, .max_sequence = args.seq_len, .device = device});
  AdamW opt(adapters, {});
  std::mt19937_64 rng(1234);
  std::uniform_int_distribution<int32_t> any_token(
      0, static_cast<int32_t>(model.config.vocab_size - 1));
  std::vector<int32_t> tokens(static_cast<size_t>(args.batch * args.seq_len));
  const std::vector<uint8_t> target(tokens.size(), 1);
  std::vector<TrainSequence> batch;
  for (int64_t b = 0; b < args.batch; ++b)
    batch.push_back({std::span(tokens).subspan(static_cast<size_t>(b * args.seq_len),
                                               static_cast<size_t>(args.seq_len)),
                     std::span(target).subspan(0, static_cast<size_t>(args.seq_len)),
                     static_cast<uint64_t>(b)});
  double data_s = 0, opt_s = 0;
  auto step = [&] {
    auto t0 = Clock::now();
    for (auto& t : tokens) t = any_token(rng);
    data_s += seconds_since(t0);
    zero_adapter_grads(adapters);
    int64_t n = 0;
    session.forward_backward(batch, 1.0f / static_cast<float>(args.batch * (args.seq_len - 1)), n);
    t0 = Clock::now();
    const double norm = grad_norm(adapters);
    if (norm > 0.3) scale_grads(adapters, static_cast<float>(0.3 / norm));
    opt.step(adapters, 2e-4);
    opt_s += seconds_since(t0);
  };
  // The peak is measured around the steps: a shared machine's speed drifts. On a GPU: the
  // bf16 tensor-core rate of cuBLAS, which the frozen linears run on.
  const ops::ComputeType type = device.cuda() ? ops::ComputeType::Bf16 : ops::compute_type();
  const auto peak = [&] {
    return device.cuda() ? gpu_bf16_peak_gflops(device) : ops::gemm_peak_gflops(type);
  };
  const double gemm_before = peak();
  step();  // warm-up: buffers, page faults, BLAS threads
  session.stats().reset();
  data_s = opt_s = 0;
  const auto start = Clock::now();
  for (int64_t i = 0; i < args.steps; ++i) step();
  const double total_s = seconds_since(start);
  const TrainStepStats& st = session.stats();
  const double gemm = std::max(gemm_before, peak());
  const std::string gemm_kernel = device.cuda() ? "cuBLAS on " + describe_device(device)
                                  : type == ops::ComputeType::Bf16
                                      ? std::string("oneDNN ") + ops::bf16_isa_name()
                                      : std::string("OpenBLAS ") + blas_core_name();
  const double tps = static_cast<double>(st.tokens) / total_s;
  const double gflops = st.flops / total_s / 1e9;

  // What the run must hold: the base's weights as stored in memory, the adapters with their
  // gradients and two AdamW moments, and the activation buffers.
  const double weights =
      weight_bytes_per_token(model) + static_cast<double>(model.tok_embeddings.stored_bytes()) *
                                          static_cast<double>(model.config.vocab_size - 1) /
                                          static_cast<double>(model.config.vocab_size);
  const double adapter_bytes = 4.0 * 4.0 * static_cast<double>(adapters.parameter_count());
  const auto act_bytes = static_cast<double>(session.activation_bytes());
  const auto rss = static_cast<double>(peak_rss_bytes());
  const double gpu_memory = device.cuda() ? static_cast<double>(gpu_memory_used_bytes(device)) : 0;
  nlohmann::ordered_json j = {{"model", args.model.model},
                              {"device", describe_device(device)},
                              {"quantization", model.quant.empty() ? "none" : model.quant.method},
                              {"adapter", adapter_kind_name(cfg.kind)},
                              {"rank", cfg.rank},
                              {"adapter_parameters", adapters.parameter_count()},
                              {"seq_len", args.seq_len},
                              {"batch", args.batch},
                              {"steps", args.steps},
                              {"grad_checkpoint", args.grad_checkpoint},
                              {"kernel_isa", qkernel_isa()},
                              {"blas_core", blas_core_name()},
                              {"threads", num_threads()},
                              {"tokens_per_s", tps},
                              {"gflops", gflops},
                              {"compute_type", ops::compute_type_name(type)},
                              {"bf16_isa", ops::bf16_isa_name()},
                              {"gemm_peak_gflops", gemm},
                              {"gemm_efficiency", gflops / gemm},
                              {"seconds_forward", st.forward_seconds / total_s},
                              {"seconds_backward", st.backward_seconds / total_s},
                              {"seconds_optimizer", opt_s / total_s},
                              {"seconds_data", data_s / total_s},
                              {"share_base_linears", st.base_seconds / total_s},
                              {"share_adapters", st.adapter_seconds / total_s},
                              {"share_attention", st.attention_seconds / total_s},
                              {"share_head", st.head_seconds / total_s},
                              {"peak_rss_bytes", rss},
                              {"gpu_memory_bytes", gpu_memory},
                              {"weight_bytes", weights},
                              {"adapter_state_bytes", adapter_bytes},
                              {"activation_bytes", act_bytes}};
  if (args.json) {
    std::printf("%s\n", j.dump(2).c_str());
    return;
  }
  const std::string where =
      device.cuda() ? describe_device(device) : cat(num_threads(), " threads");
  std::printf("training step: %s r %lld (%lld parameters) on %s, %s tokens, %s%s\n",
              adapter_kind_name(cfg.kind), static_cast<long long>(cfg.rank),
              static_cast<long long>(adapters.parameter_count()), base_name(model).c_str(),
              (args.batch > 1 ? cat(args.batch, " x ", args.seq_len) : cat(args.seq_len)).c_str(),
              where.c_str(), args.grad_checkpoint ? ", grad checkpointing" : "");
  std::printf("  throughput           %9.1f tok/s    (%.2f s per step, mean of %lld steps)\n", tps,
              total_s / static_cast<double>(args.steps), static_cast<long long>(args.steps));
  std::printf(
      "  compute              %9.1f GFLOP/s  %5.1f%% of the %s GEMM peak (%.1f GFLOP/s, %s; "
      "quantized: %s)\n",
      gflops, 100 * gflops / gemm, ops::compute_type_name(type), gemm, gemm_kernel.c_str(),
      device.cuda() ? "dequantized to bf16 per use" : qkernel_isa());
  std::printf(
      "  time                 %9.0f%% forward, %.0f%% backward, %.1f%% optimizer, %.1f%% data\n",
      100 * st.forward_seconds / total_s, 100 * st.backward_seconds / total_s,
      100 * opt_s / total_s, 100 * data_s / total_s);
  if (!device.cuda())  // a GPU's ops run asynchronously: timed per phase only
    std::printf(
        "  by op                %9.0f%% frozen linears, %.0f%% adapters, %.0f%% attention, %.0f%% "
        "head and loss\n",
        100 * st.base_seconds / total_s, 100 * st.adapter_seconds / total_s,
        100 * st.attention_seconds / total_s, 100 * st.head_seconds / total_s);
  std::printf(
      "  memory               %9.0f MB peak RSS; weights %.0f + adapter, grads, moments %.0f "
      "+ activations %.0f = %.0f MB\n",
      rss / 1e6, weights / 1e6, adapter_bytes / 1e6, act_bytes / 1e6,
      (weights + adapter_bytes + act_bytes) / 1e6);
  if (device.cuda())
    std::printf("  gpu memory           %9.0f MB in use on %s (all processes)\n", gpu_memory / 1e6,
                device.name().c_str());
}

void run_bench(const BenchArgs& args) {
  if (args.train) {
    run_train_bench(args);
    return;
  }
  QL_CHECK(!parse_device(args.model.device).cuda(),
           "--device: inference runs on the CPU for now; --train measures a GPU's training step");
  QL_CHECK(args.prompt_tokens >= 1, "--prompt-tokens must be >= 1, got ", args.prompt_tokens);
  QL_CHECK(args.gen_tokens >= 1, "--gen-tokens must be >= 1, got ", args.gen_tokens);
  const Model model = load_model(args.model);
  const auto adapters = load_adapter_arg(args.model, model);
  std::optional<Model> baseline;
  if (!args.baseline.empty()) {
    ModelArgs b = args.model;
    b.model = args.baseline;
    baseline.emplace(load_model(b));
  }

  QL_CHECK(args.reps >= 1, "--reps must be >= 1, got ", args.reps);
  MemoryProbe probe;
  const Bandwidth bw = probe.measure();
  const double gemm = sgemm_peak_gflops();
  const double gemm_bf16 = ops::gemm_peak_gflops(ops::ComputeType::Bf16);
  const ops::ComputeType type = ops::compute_type();
  const double peak = type == ops::ComputeType::Bf16 ? gemm_bf16 : gemm;
  // The model and the baseline alternate, and each keeps its fastest run: a shared machine's
  // passing load then slows both alike instead of skewing their ratio.
  Speed sp;
  std::optional<Speed> base;
  auto keep_best = [](Speed& best, const Speed& s) {
    if (s.prefill_tps > best.prefill_tps) {
      best.prefill_tps = s.prefill_tps;
      best.linear_gflops = s.linear_gflops;
      best.linear_share = s.linear_share;
    }
    if (s.decode_tps > best.decode_tps) {
      best.decode_tps = s.decode_tps;
      best.decode_linear_share = s.decode_linear_share;
      best.decode_attention_share = s.decode_attention_share;
    }
    best.bytes_per_token = s.bytes_per_token;
  };
  // A shared machine's memory bandwidth moves run to run (42-85 GB/s for the same read on one
  // VM), so the decode's share is taken against reads just before and after it.
  double decode_read_gbs = bw.read_gbs;
  for (int rep = 0; rep < args.reps; ++rep) {
    const double before = probe.read_gbs();
    const Speed s = measure(model, adapters.get(), args);
    if (s.decode_tps > sp.decode_tps) decode_read_gbs = (before + probe.read_gbs()) / 2;
    keep_best(sp, s);
    if (!baseline) continue;
    if (!base) base.emplace();
    keep_best(*base, measure(*baseline, nullptr, args));
  }
  const double weight_gbs = sp.bytes_per_token * sp.decode_tps / 1e9;

  nlohmann::ordered_json j = {{"model", args.model.model},
                              {"quantization", model.quant.empty() ? "none" : model.quant.method},
                              {"kernel_isa", qkernel_isa()},
                              {"blas_core", blas_core_name()},
                              {"threads", num_threads()},
                              {"parameters", model.parameter_count()},
                              {"compute_type", ops::compute_type_name(type)},
                              {"gemm_peak_gflops", gemm},
                              {"bf16_gemm_peak_gflops", gemm_bf16},
                              {"memory_read_gbs", bw.read_gbs},
                              {"memory_copy_gbs", bw.copy_gbs},
                              {"prompt_tokens", args.prompt_tokens},
                              {"prefill_tokens_per_s", sp.prefill_tps},
                              {"prefill_linear_gflops", sp.linear_gflops},
                              {"prefill_linear_share_of_time", sp.linear_share},
                              {"prefill_gemm_efficiency", sp.linear_gflops / peak},
                              {"gen_tokens", args.gen_tokens},
                              {"reps", args.reps},
                              {"decode_tokens_per_s", sp.decode_tps},
                              {"decode_weight_gbs", weight_gbs},
                              {"decode_linear_share_of_time", sp.decode_linear_share},
                              {"decode_attention_share_of_time", sp.decode_attention_share},
                              {"decode_memory_read_gbs", decode_read_gbs},
                              {"decode_bandwidth_efficiency", weight_gbs / decode_read_gbs}};
  if (base) {
    j["baseline"] = args.baseline;
    j["baseline_prefill_tokens_per_s"] = base->prefill_tps;
    j["baseline_decode_tokens_per_s"] = base->decode_tps;
    j["prefill_speedup"] = sp.prefill_tps / base->prefill_tps;
    j["decode_speedup"] = sp.decode_tps / base->decode_tps;
  }
  if (args.json) {
    std::printf("%s\n", j.dump(2).c_str());
    return;
  }
  std::printf("machine (%d threads, quantized kernels: %s, OpenBLAS kernels: %s)\n", num_threads(),
              qkernel_isa(), blas_core_name());
  std::printf("  fp32 GEMM peak       %9.1f GFLOP/s  (cblas_sgemm 2048^3)\n", gemm);
  if (gemm_bf16 > 0)
    std::printf("  bf16 GEMM peak       %9.1f GFLOP/s  (oneDNN %s 2048^3, fp32 accumulation)\n",
                gemm_bf16, ops::bf16_isa_name());
  std::printf("  memory read          %9.1f GB/s\n", bw.read_gbs);
  std::printf("  memory copy          %9.1f GB/s     (read + write)\n", bw.copy_gbs);
  std::printf("prefill (%lld random tokens)\n", static_cast<long long>(args.prompt_tokens));
  std::printf("  throughput           %9.1f tok/s\n", sp.prefill_tps);
  std::printf(
      "  linear layers        %9.1f GFLOP/s  %5.1f%% of the %s GEMM peak, %.0f%% of prefill time\n",
      sp.linear_gflops, 100 * sp.linear_gflops / peak, ops::compute_type_name(type),
      100 * sp.linear_share);
  std::printf("decode (%lld tokens)\n", static_cast<long long>(args.gen_tokens));
  std::printf("  throughput           %9.1f tok/s\n", sp.decode_tps);
  std::printf(
      "  weight bandwidth     %9.2f GB/s     %5.1f%% of the memory read around it (%.1f GB/s;"
      " %.1f MB per token)\n",
      weight_gbs, 100 * weight_gbs / decode_read_gbs, decode_read_gbs, sp.bytes_per_token / 1e6);
  std::printf("  time                 %9.0f%% linear layers, %.0f%% attention\n",
              100 * sp.decode_linear_share, 100 * sp.decode_attention_share);
  if (base) {
    std::printf("against the baseline %s\n", args.baseline.c_str());
    std::printf("  prefill              %9.1f tok/s    this model %.2fx\n", base->prefill_tps,
                sp.prefill_tps / base->prefill_tps);
    std::printf("  decode               %9.1f tok/s    this model %.2fx\n", base->decode_tps,
                sp.decode_tps / base->decode_tps);
  }
}

}  // namespace

void register_bench(CLI::App& app) {
  auto args = std::make_shared<BenchArgs>();
  CLI::App* cmd = add_command(
      app, "bench",
      "Measure prefill/decode speed against the machine's GEMM peak and memory bandwidth");
  add_model_args(cmd, args->model);
  add_compute_arg(cmd, args->model);
  add_device_arg(cmd, args->model);
  add_adapter_arg(cmd, args->model);
  cmd->add_option("--prompt-tokens", args->prompt_tokens, "prefill length")->capture_default_str();
  cmd->add_option("--gen-tokens", args->gen_tokens, "decoded tokens")->capture_default_str();
  cmd->add_option("--baseline", args->baseline,
                  "a second model (e.g. the fp32 source) to run the same way and compare against");
  cmd->add_option("--reps", args->reps,
                  "runs of each model, alternating with the baseline; the fastest counts")
      ->capture_default_str();
  cmd->add_flag("--json", args->json, "machine-readable output");
  cmd->add_flag("--train", args->train, "measure a training step instead of inference");
  cmd->add_option("--train-adapter", args->train_adapter,
                  "--train: lora or qalora (default: qalora on an integer-quantized base)");
  cmd->add_option("--batch", args->batch, "--train: sequences packed into one pass")
      ->capture_default_str();
  cmd->add_option("--seq-len", args->seq_len, "--train: tokens per sequence")
      ->capture_default_str();
  cmd->add_option("--rank", args->rank, "--train: adapter rank (all-linear)")
      ->capture_default_str();
  cmd->add_option("--steps", args->steps, "--train: timed steps")->capture_default_str();
  cmd->add_flag("--grad-checkpoint", args->grad_checkpoint,
                "--train: recompute each block in the backward");
  cmd->callback([args] {
    run_bench(*args);
    print_peak_memory();
  });
}

}  // namespace qalora::cli
