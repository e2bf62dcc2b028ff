// Next-token sampling: repetition penalty, temperature, top-k, top-p (nucleus), in that order
// (as llama.cpp). Temperature 0 is greedy decoding: the argmax, lowest id on ties.
#pragma once

#include <cstdint>
#include <deque>
#include <random>
#include <span>
#include <vector>

namespace qalora {

struct SamplerConfig {
  float temperature = 0.8f;
  int32_t top_k = 40;           // 0 = no limit
  float top_p = 0.95f;          // 1 = no limit
  float repeat_penalty = 1.0f;  // 1 = off; > 1 discourages tokens seen in the last repeat_last_n
  int32_t repeat_last_n = 64;
  uint64_t seed = 0;
};

struct TokenProb {
  int32_t id;
  double prob;
};

// Lowest index among the maxima; the deterministic choice for temperature 0.
int32_t argmax(std::span<const float> logits);

class Sampler {
 public:
  // Throws Error when a setting is out of range (temperature < 0, top_p outside (0, 1], ...).
  explicit Sampler(const SamplerConfig& config);

  // The tokens that can be drawn and their probabilities (summing to 1), most likely first,
  // after penalty, temperature, top-k and top-p. Greedy: the single argmax with probability 1.
  std::vector<TokenProb> candidates(std::span<const float> logits) const;
  // Draws the next token and records it for the repetition penalty.
  int32_t sample(std::span<const float> logits);
  // Records a token that was not sampled (the prompt) for the repetition penalty.
  void accept(int32_t token);
  // Forgets the history (the random stream continues).
  void reset_history() { recent_.clear(); }

  const SamplerConfig& config() const { return config_; }

 private:
  SamplerConfig config_;
  std::mt19937_64 rng_;
  std::deque<int32_t> recent_;
};

}  // namespace qalora
