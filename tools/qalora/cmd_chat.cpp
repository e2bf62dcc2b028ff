// qalora chat: a conversation with an instruction-tuned model. Reads one user turn per line
// from stdin (a terminal or a pipe) until EOF; "/reset" starts over. --prompt answers a single
// turn and exits. The KV cache is kept across turns: each turn only the tokens after the part
// of the rendered conversation already in the cache are fed.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <memory>
#include <optional>

#include "cli_common.h"
#include "commands.h"
#include "qalora/core/error.h"
#include "qalora/model/chat.h"

namespace qalora::cli {

namespace {

struct ChatArgs {
  ModelArgs model;
  std::string system;
  std::string chat_template;
  std::string prompt;
  SamplingArgs sampling;
  int64_t ctx = 0;
};

ChatTemplate resolve_template(const Tokenizer& tok, const std::string& name) {
  if (!name.empty()) return ChatTemplate::with_format(parse_chat_format(name), tok);
  std::optional<ChatTemplate> detected = ChatTemplate::detect(tok);
  QL_CHECK(detected.has_value(),
           "the model has no chat template: pass --chat-template chatml|llama2|llama3|zephyr");
  return *detected;
}

class Conversation {
 public:
  Conversation(const Model& model, const AdapterSet* adapters, const ChatArgs& args,
               const SamplerConfig& sampling)
      : tok_(model.require_tokenizer()),
        template_(resolve_template(tok_, args.chat_template)),
        session_(model, resolve_ctx(model, args.ctx), adapters),
        sampler_(sampling),
        max_tokens_(args.sampling.max_tokens),
        system_(args.system) {
    session_.keep_weights_resident();
    reset();
  }

  void reset() {
    messages_.clear();
    if (!system_.empty()) messages_.push_back({"system", system_});
    cached_.clear();
    session_.reset();
    sampler_.reset_history();
  }

  // Streams the answer to stdout and keeps it in the history.
  void answer(const std::string& user) {
    messages_.push_back({"user", user});
    const std::vector<int32_t> prompt = render_fitting();

    // Keep the cached prefix the new rendering shares; at least one token must be fed to
    // get logits.
    const auto shared = std::mismatch(cached_.begin(), cached_.end(), prompt.begin(), prompt.end());
    const size_t keep =
        std::min<size_t>(static_cast<size_t>(shared.first - cached_.begin()), prompt.size() - 1);
    session_.truncate(static_cast<int64_t>(keep));
    cached_ = prompt;

    StreamDecoder decoder(tok_);
    std::string text;
    const std::vector<int32_t> stop = template_.stop_tokens();
    const std::span<const int32_t> fresh(prompt.begin() + static_cast<std::ptrdiff_t>(keep),
                                         prompt.end());
    const GenerationStats stats =
        generate(session_, sampler_, fresh, max_tokens_, stop, [&](int32_t t) {
          cached_.push_back(t);
          const std::string piece = decoder.push(t);
          text += piece;
          print_now(piece);
        });
    const std::string tail = decoder.flush();
    text += tail;
    print_now(tail + "\n");
    // The last generated token was sampled but not fed: the cache ends one token earlier.
    if (stats.generated > 0 && !stats.last_token_fed()) cached_.pop_back();
    messages_.push_back({"assistant", text});
    std::fprintf(stderr, "[%s]\n", format_generation_stats(stats).c_str());
  }

 private:
  // The rendered conversation, dropping the oldest exchanges until it leaves room for the
  // answer within the context.
  std::vector<int32_t> render_fitting() {
    const size_t first_turn = messages_.front().role == "system" ? 1 : 0;
    for (;;) {
      std::vector<int32_t> tokens =
          tok_.encode(template_.render(messages_, /*add_generation_prompt=*/true),
                      /*add_bos=*/false, /*parse_special=*/true);
      const bool fits = static_cast<int64_t>(tokens.size()) + std::min<int64_t>(max_tokens_, 64) <=
                        session_.max_context();
      // The newest message alone is kept even when it does not fit; generate() reports that.
      if (fits || messages_.size() <= first_turn + 1) return tokens;
      // History alternates user, assistant and ends with the new user turn: drop the oldest pair.
      const auto oldest = messages_.begin() + static_cast<std::ptrdiff_t>(first_turn);
      messages_.erase(oldest, oldest + 2);
    }
  }

  const Tokenizer& tok_;
  ChatTemplate template_;
  InferenceSession session_;
  Sampler sampler_;
  int64_t max_tokens_;
  std::string system_;
  std::vector<ChatMessage> messages_;
  std::vector<int32_t> cached_;  // tokens whose keys/values are in the session
};

void run_chat(const ChatArgs& args) {
  const SamplerConfig sampling = resolve_sampling(args.sampling);
  const Model model = load_model(args.model);
  const auto adapters = load_adapter_arg(args.model, model);
  Conversation chat(model, adapters.get(), args, sampling);
  if (!args.prompt.empty()) {
    chat.answer(args.prompt);
    return;
  }
  const bool interactive = isatty(fileno(stdin)) != 0;
  if (interactive)
    std::fprintf(stderr, "chat: one message per line, /reset to start over, Ctrl-D to quit\n");
  std::string line;
  for (;;) {
    if (interactive) std::fprintf(stderr, "> ");
    if (!std::getline(std::cin, line)) break;
    if (line.empty()) continue;
    if (line == "/reset") {
      chat.reset();
      continue;
    }
    chat.answer(line);
  }
}

}  // namespace

void register_chat(CLI::App& app) {
  auto args = std::make_shared<ChatArgs>();
  CLI::App* cmd = add_command(app, "chat",
                              "Chat with an instruction-tuned model (stdin, one message per line)");
  add_model_args(cmd, args->model);
  add_compute_arg(cmd, args->model);
  add_adapter_arg(cmd, args->model);
  cmd->add_option("--system", args->system, "system prompt (default: the template's own, if any)");
  cmd->add_option("--chat-template", args->chat_template,
                  "chatml, llama2, llama3 or zephyr (default: detected from the model)");
  auto* prompt = cmd->add_option("-p,--prompt", args->prompt, "answer this one message and exit");
  add_sampling_args(cmd, args->sampling, 512);
  add_ctx_arg(cmd, args->ctx);
  cmd->callback([args, prompt] {
    QL_CHECK(prompt->count() == 0 || !args->prompt.empty(),
             "--prompt is empty: expected a message");
    run_chat(*args);
    print_peak_memory();
  });
}

}  // namespace qalora::cli
