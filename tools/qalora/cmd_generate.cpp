// qalora generate: continue a prompt, streaming the text to stdout as it is produced.
#include <algorithm>
#include <cstdio>
#include <memory>

#include "cli_common.h"
#include "commands.h"
#include "qalora/ops/gemm.h"
#include "qalora/tokenizer/tokenizer.h"

namespace qalora::cli {

namespace {

struct GenerateArgs {
  ModelArgs model;
  std::string prompt;
  SamplingArgs sampling;
  int64_t ctx = 0;
  bool no_bos = false;
};

void run_generate(const GenerateArgs& args) {
  const SamplerConfig sampling = resolve_sampling(args.sampling);
  const Model model = load_model(args.model);
  const Tokenizer& tok = model.require_tokenizer();
  const std::vector<int32_t> prompt = encode_prompt(tok, args.prompt, !args.no_bos);
  const auto adapters = load_adapter_arg(args.model, model);
  // Without --ctx the KV cache holds what this generation can use, not the model's whole
  // context: at 7B a 4096-token fp32 cache alone is 4.3 GB.
  const int64_t needed = static_cast<int64_t>(prompt.size()) + args.sampling.max_tokens;
  const int64_t requested = resolve_ctx(model, args.ctx);
  const int64_t ctx = requested > 0 ? requested : std::min(model.config.context_length, needed);
  InferenceSession session(model, ctx, adapters.get());
  session.keep_weights_resident();
  Sampler sampler(sampling);

  // The prompt goes through the decoder too, so the first generated token is decoded in
  // context (SentencePiece drops the leading space of a text's first piece only).
  StreamDecoder decoder(tok);
  std::string echo;
  for (int32_t t : prompt)
    if (!tok.is_special(t)) echo += decoder.push(t);
  print_now(echo);

  const int32_t stop[] = {tok.eos_id()};
  const GenerationStats stats = generate(session, sampler, prompt, args.sampling.max_tokens, stop,
                                         [&](int32_t t) { print_now(decoder.push(t)); });
  print_now(decoder.flush() + "\n");
  const ModelConfig& c = model.config;
  const int64_t cache_mb = 2 * c.n_layers * c.kv_dim() * ctx * int64_t{sizeof(float)} >> 20;
  std::fprintf(stderr, "%s (seed %llu), KV cache %lld positions (%lld MB), %s prefill\n",
               format_generation_stats(stats).c_str(),
               static_cast<unsigned long long>(sampling.seed), static_cast<long long>(ctx),
               static_cast<long long>(cache_mb), ops::compute_type_name(ops::compute_type()));
}

}  // namespace

void register_generate(CLI::App& app) {
  auto args = std::make_shared<GenerateArgs>();
  CLI::App* cmd = add_command(app, "generate", "Continue a prompt (streams tokens to stdout)");
  add_model_args(cmd, args->model);
  add_compute_arg(cmd, args->model);
  add_adapter_arg(cmd, args->model);
  cmd->add_option("-p,--prompt", args->prompt, "text to continue")->required();
  add_sampling_args(cmd, args->sampling, 128);
  add_ctx_arg(cmd, args->ctx);
  cmd->add_flag("--no-bos", args->no_bos, "do not prepend the BOS token");
  cmd->callback([args] {
    run_generate(*args);
    print_peak_memory();
  });
}

}  // namespace qalora::cli
