// Options and steps shared by the inference subcommands: loading a model, encoding a prompt,
// sampling settings, and the token-by-token generation loop.
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "qalora/adapters/adapter.h"
#include "qalora/core/clock.h"
#include "qalora/core/device.h"
#include "qalora/model/model.h"
#include "qalora/model/runtime.h"
#include "qalora/model/sampler.h"

namespace qalora::cli {

// Adds a subcommand. Also makes CLI11's own parse errors (unknown option, missing value) one
// "error: ..." line like every other failure.
CLI::App* add_command(CLI::App& app, const std::string& name, const std::string& description);

struct ModelArgs {
  std::string model;
  std::string tokenizer;
  int threads = 0;
  std::string adapter;  // --adapter DIR (inference commands)
  // --compute-dtype (commands that run the model's products); empty: fp32, not offered.
  std::string compute_dtype;
  std::string device = "cpu";  // --device (commands with a GPU path)
};
// --model (or a positional MODEL), --tokenizer, --threads.
void add_model_args(CLI::App* cmd, ModelArgs& args, bool positional = false);
// --compute-dtype fp32|bf16|auto for the commands whose time goes into matrix products.
void add_compute_arg(CLI::App* cmd, ModelArgs& args);
// --device cpu|cuda[:N] for the commands that can run on a GPU.
void add_device_arg(CLI::App* cmd, ModelArgs& args);
// The parsed --device, checked usable here (the build has the backend, the GPU exists).
Device resolve_device(const ModelArgs& args);
// "compute:       bf16 products, ..." or "compute:       fp32 ...": what the products run in,
// for a command's report.
std::string compute_line();
// Sets the thread count and the compute type, and loads the model; a missing file is reported with
// its option. `describe_only`: see LoadOptions (qalora info).
Model load_model(const ModelArgs& args, bool describe_only = false);
// --adapter DIR: a trained adapter (native or PEFT folder) run unmerged on the model.
void add_adapter_arg(CLI::App* cmd, ModelArgs& args);
// The adapter of --adapter checked against `model`; null without --adapter.
std::unique_ptr<AdapterSet> load_adapter_arg(const ModelArgs& args, const Model& model);

// --ctx: KV cache length; 0 = the model's context length. Throws when above it.
void add_ctx_arg(CLI::App* cmd, int64_t& ctx, int64_t default_ctx = 0);
int64_t resolve_ctx(const Model& model, int64_t requested);

// Token ids of a non-empty prompt, with BOS when the tokenizer adds one and add_bos is set.
std::vector<int32_t> encode_prompt(const Tokenizer& tok, const std::string& prompt, bool add_bos);

struct SamplingArgs {
  SamplerConfig config;
  int64_t max_tokens = 128;
  CLI::Option* seed_option = nullptr;
};
// -n, --temp, --top-k, --top-p, --repeat-penalty, --seed.
void add_sampling_args(CLI::App* cmd, SamplingArgs& args, int64_t default_max_tokens);
// The sampler config; a random seed when --seed was not given.
SamplerConfig resolve_sampling(const SamplingArgs& args);

enum class StopReason { Limit, StopToken, ContextFull };

struct GenerationStats {
  int64_t prompt_tokens = 0;
  double prompt_seconds = 0;
  int64_t generated = 0;
  double generate_seconds = 0;
  StopReason stop = StopReason::Limit;
  // Every generated token is in the cache, except the last one when the limit or the context
  // ended generation (a stop token is never fed nor passed on).
  bool last_token_fed() const { return stop == StopReason::StopToken; }
};

// Feeds `prompt` at the session's position, then samples up to `max_tokens` tokens, calling
// `on_token` for each. Ends early at a token of `stop` (not passed on, not fed) or when the
// cache is full.
GenerationStats generate(InferenceSession& session, Sampler& sampler,
                         std::span<const int32_t> prompt, int64_t max_tokens,
                         std::span<const int32_t> stop,
                         const std::function<void(int32_t)>& on_token);
// "prompt 3 tokens (1234.5 tok/s), generated 60 tokens (567.8 tok/s), stopped by the token limit"
std::string format_generation_stats(const GenerationStats& stats);

// Writes text to stdout at once, so streamed tokens appear as they are produced.
void print_now(const std::string& text);
// "peak memory:   N MB resident" (getrusage), at the end of every long command, so a user sees
// what a run needs.
void print_peak_memory();

// --type of a dense Hugging Face folder: f32 (or empty), f16 or bf16; anything else is an Error.
DenseFloats parse_dense_floats(const std::string& type);

// The body of a command that may run as one rank of an MPI job (train, perplexity): an Error on
// any rank ends the whole job with that rank's line (the others may be waiting in a collective
// operation); rank 0 alone prints the peak memory at the end.
void run_ranked(const std::function<void()>& body);

}  // namespace qalora::cli
