#include "cli_common.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <random>

#include "qalora/adapters/adapter_io.h"
#include "qalora/core/error.h"
#include "qalora/core/resources.h"
#include "qalora/dist/communicator.h"
#include "qalora/ops/gemm.h"

namespace qalora::cli {

CLI::App* add_command(CLI::App& app, const std::string& name, const std::string& description) {
  app.failure_message([](const CLI::App*, const CLI::Error& e) {
    std::string message = e.what();
    std::replace(message.begin(), message.end(), '\n', ' ');
    return "error: " + message + "\n";
  });
  return app.add_subcommand(name, description);
}

void add_model_args(CLI::App* cmd, ModelArgs& args, bool positional) {
  const char* model_help = "model: .gguf file, Hugging Face folder, or llama2.c .bin";
  if (positional) {
    cmd->add_option("model", args.model, model_help)->required();
  } else {
    cmd->add_option("-m,--model", args.model, model_help)->required();
  }
  cmd->add_option("--tokenizer", args.tokenizer,
                  "tokenizer file (tokenizer.model, tokenizer.json, llama2.c tok*.bin); "
                  "needed for llama2.c checkpoints");
  cmd->add_option("-t,--threads", args.threads, "threads (0 = all cores)")->capture_default_str();
}

void add_compute_arg(CLI::App* cmd, ModelArgs& args) {
  args.compute_dtype = "auto";
  cmd->add_option("--compute-dtype", args.compute_dtype,
                  "inputs of the matrix products: fp32, bf16 (fp32 accumulation; CPUs with "
                  "AVX512-BF16 or AMX), or auto = bf16 where the CPU has it")
      ->check(CLI::IsMember({"fp32", "bf16", "auto"}))
      ->capture_default_str();
}

void add_device_arg(CLI::App* cmd, ModelArgs& args) {
  cmd->add_option("--device", args.device,
                  "where to compute: cpu, or cuda / cuda:N (builds with the CUDA backend)")
      ->capture_default_str();
}

Device resolve_device(const ModelArgs& args) {
  const Device device = parse_device(args.device);
  require_device(device);
  return device;
}

std::string compute_line() {
  if (ops::compute_type() == ops::ComputeType::Bf16)
    return cat("compute:       bf16 products, fp32 accumulation (", ops::bf16_isa_name(),
               ", oneDNN; --compute-dtype fp32 for full precision)");
  return cat("compute:       fp32",
             ops::bf16_available()        ? " (--compute-dtype bf16 is faster on this CPU)"
             : ops::cpu_has_native_bf16() ? " (this build has no oneDNN for bf16)"
                                          : " (this CPU has no native bf16)");
}

Model load_model(const ModelArgs& args, bool describe_only) {
  QL_CHECK(args.threads >= 0, "--threads must be >= 0 (0 = all cores), got ", args.threads);
  if (!args.compute_dtype.empty())
    ops::set_compute_type(ops::parse_compute_type(args.compute_dtype));
  QL_CHECK(std::filesystem::exists(args.model), "model not found: ", args.model);
  QL_CHECK(args.tokenizer.empty() || std::filesystem::exists(args.tokenizer),
           "--tokenizer: file not found: ", args.tokenizer);
  set_num_threads(args.threads);
  return qalora::load_model(args.model,
                            {.tokenizer = args.tokenizer, .describe_only = describe_only});
}

void add_adapter_arg(CLI::App* cmd, ModelArgs& args) {
  cmd->add_option("--adapter", args.adapter,
                  "adapter folder from `qalora train` (or a PEFT adapter), applied unmerged");
}

std::unique_ptr<AdapterSet> load_adapter_arg(const ModelArgs& args, const Model& model) {
  if (args.adapter.empty()) return nullptr;
  QL_CHECK(std::filesystem::is_directory(args.adapter),
           "--adapter: folder not found: ", args.adapter);
  return std::make_unique<AdapterSet>(load_adapter(args.adapter, model));
}

void add_ctx_arg(CLI::App* cmd, int64_t& ctx, int64_t default_ctx) {
  ctx = default_ctx;
  cmd->add_option("-c,--ctx", ctx, "context length (0 = the model's)")->capture_default_str();
}

int64_t resolve_ctx(const Model& model, int64_t requested) {
  const int64_t model_ctx = model.config.context_length;
  QL_CHECK(requested >= 0, "--ctx must be >= 0 (0 = the model's ", model_ctx, "), got ", requested);
  QL_CHECK(requested <= model_ctx, "--ctx ", requested, " exceeds the model's context length ",
           model_ctx);
  return requested;
}

std::vector<int32_t> encode_prompt(const Tokenizer& tok, const std::string& prompt, bool add_bos) {
  QL_CHECK(!prompt.empty(), "--prompt is empty: expected the text to start from");
  return tok.encode(prompt, add_bos && tok.add_bos());
}

void add_sampling_args(CLI::App* cmd, SamplingArgs& args, int64_t default_max_tokens) {
  args.max_tokens = default_max_tokens;
  cmd->add_option("-n,--n-predict", args.max_tokens, "maximum number of tokens to generate")
      ->capture_default_str();
  cmd->add_option("--temp", args.config.temperature, "temperature (0 = greedy)")
      ->capture_default_str();
  cmd->add_option("--top-k", args.config.top_k, "keep the k most likely tokens (0 = all)")
      ->capture_default_str();
  cmd->add_option("--top-p", args.config.top_p, "nucleus sampling mass (1 = off)")
      ->capture_default_str();
  cmd->add_option("--repeat-penalty", args.config.repeat_penalty,
                  "penalty for tokens of the last 64 (1 = off)")
      ->capture_default_str();
  args.seed_option = cmd->add_option("--seed", args.config.seed, "random seed (default: random)");
}

SamplerConfig resolve_sampling(const SamplingArgs& args) {
  QL_CHECK(args.max_tokens >= 1, "-n must be >= 1, got ", args.max_tokens);
  SamplerConfig config = args.config;
  if (args.seed_option->count() == 0) config.seed = std::random_device{}();
  return config;
}

GenerationStats generate(InferenceSession& session, Sampler& sampler,
                         std::span<const int32_t> prompt, int64_t max_tokens,
                         std::span<const int32_t> stop,
                         const std::function<void(int32_t)>& on_token) {
  QL_CHECK(session.position() + static_cast<int64_t>(prompt.size()) <= session.max_context(),
           "prompt of ", prompt.size(), " tokens does not fit the context of ",
           session.max_context(), " (", session.position(), " already used): raise --ctx");
  GenerationStats stats;
  stats.prompt_tokens = static_cast<int64_t>(prompt.size());
  for (int32_t t : prompt) sampler.accept(t);

  auto start = Clock::now();
  std::vector<float> logits = session.forward_last(prompt);
  stats.prompt_seconds = seconds_since(start);

  start = Clock::now();
  while (stats.generated < max_tokens) {
    const int32_t token = sampler.sample(logits);
    if (std::find(stop.begin(), stop.end(), token) != stop.end()) {
      stats.stop = StopReason::StopToken;
      break;
    }
    on_token(token);
    ++stats.generated;
    if (stats.generated == max_tokens) break;
    if (session.position() == session.max_context()) {
      stats.stop = StopReason::ContextFull;
      break;
    }
    const int32_t next[] = {token};
    logits = session.forward_last(next);
  }
  stats.generate_seconds = seconds_since(start);
  return stats;
}

std::string format_generation_stats(const GenerationStats& s) {
  const auto rate = [](int64_t n, double seconds) {
    return seconds > 0 ? static_cast<double>(n) / seconds : 0.0;
  };
  char buf[256];
  std::snprintf(
      buf, sizeof buf,
      "prompt %lld tokens (%.1f tok/s), generated %lld tokens (%.1f tok/s), stopped by %s",
      static_cast<long long>(s.prompt_tokens), rate(s.prompt_tokens, s.prompt_seconds),
      static_cast<long long>(s.generated), rate(s.generated, s.generate_seconds),
      s.stop == StopReason::Limit       ? "the token limit"
      : s.stop == StopReason::StopToken ? "a stop token"
                                        : "the context length");
  return buf;
}

void print_now(const std::string& text) {
  std::fwrite(text.data(), 1, text.size(), stdout);
  std::fflush(stdout);
}

DenseFloats parse_dense_floats(const std::string& type) {
  if (type.empty() || type == "f32") return DenseFloats::F32;
  if (type == "f16") return DenseFloats::F16;
  if (type == "bf16") return DenseFloats::BF16;
  fail("--type: '", type, "' is not a Hugging Face folder type (f32, f16, bf16)");
}

void print_peak_memory() {
  const ResidentSplit now = resident_now();
  std::fprintf(stderr,
               "peak memory:   %.0f MB resident (at the end: %.0f MB private + %.0f MB of mapped "
               "files)\n",
               static_cast<double>(peak_rss_bytes()) / 1e6,
               static_cast<double>(now.private_bytes) / 1e6,
               static_cast<double>(now.file_bytes) / 1e6);
}

void run_ranked(const std::function<void()>& body) {
  Communicator& comm = world();
  try {
    body();
  } catch (const Error& e) {
    if (comm.size() == 1) throw;
    std::fprintf(stderr, "error: rank %d: %s\n", comm.rank(), e.what());
    comm.abort(1);
  }
  if (comm.is_root()) print_peak_memory();
}

}  // namespace qalora::cli
