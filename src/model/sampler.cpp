#include "qalora/model/sampler.h"

#include <algorithm>
#include <cmath>

#include "qalora/core/error.h"

namespace qalora {

int32_t argmax(std::span<const float> logits) {
  QL_CHECK(!logits.empty(), "argmax of empty logits");
  // max_element returns the first maximum, which is the lowest id.
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

Sampler::Sampler(const SamplerConfig& config) : config_(config), rng_(config.seed) {
  QL_CHECK(std::isfinite(config.temperature) && config.temperature >= 0,
           "sampling temperature must be >= 0, got ", config.temperature);
  QL_CHECK(config.top_k >= 0, "sampling top-k must be >= 0 (0 = off), got ", config.top_k);
  QL_CHECK(config.top_p > 0 && config.top_p <= 1, "sampling top-p must be in (0, 1], got ",
           config.top_p);
  QL_CHECK(std::isfinite(config.repeat_penalty) && config.repeat_penalty > 0,
           "repetition penalty must be > 0, got ", config.repeat_penalty);
  QL_CHECK(config.repeat_last_n >= 0, "repetition window must be >= 0, got ", config.repeat_last_n);
}

std::vector<TokenProb> Sampler::candidates(std::span<const float> logits) const {
  QL_CHECK(!logits.empty(), "sampling from empty logits");
  std::vector<float> adjusted(logits.begin(), logits.end());
  if (config_.repeat_penalty != 1.0f) {
    std::vector<int32_t> seen(recent_.begin(), recent_.end());
    std::sort(seen.begin(), seen.end());
    seen.erase(std::unique(seen.begin(), seen.end()), seen.end());
    for (int32_t id : seen) {
      if (id < 0 || static_cast<size_t>(id) >= adjusted.size()) continue;
      // Dividing a negative logit would raise it, so negatives are multiplied instead.
      float& l = adjusted[id];
      l = l > 0 ? l / config_.repeat_penalty : l * config_.repeat_penalty;
    }
  }
  if (config_.temperature == 0.0f) return {{argmax(adjusted), 1.0}};

  std::vector<TokenProb> c(adjusted.size());
  for (size_t i = 0; i < adjusted.size(); ++i) c[i] = {static_cast<int32_t>(i), adjusted[i]};
  const auto by_logit = [](const TokenProb& a, const TokenProb& b) {
    return a.prob != b.prob ? a.prob > b.prob : a.id < b.id;
  };
  const size_t k = config_.top_k > 0 ? std::min<size_t>(config_.top_k, c.size()) : c.size();
  std::partial_sort(c.begin(), c.begin() + static_cast<std::ptrdiff_t>(k), c.end(), by_logit);
  c.resize(k);

  // Softmax of logit / temperature over the kept tokens, in double, shifted by the max.
  const double max_logit = c.front().prob;
  double sum = 0;
  for (auto& t : c) {
    t.prob = std::exp((t.prob - max_logit) / config_.temperature);
    sum += t.prob;
  }
  for (auto& t : c) t.prob /= sum;

  if (config_.top_p < 1.0f) {
    // Smallest prefix whose mass reaches top_p.
    double mass = 0;
    size_t keep = 0;
    while (keep < c.size() && mass < config_.top_p) mass += c[keep++].prob;
    c.resize(keep);
    for (auto& t : c) t.prob /= mass;
  }
  return c;
}

int32_t Sampler::sample(std::span<const float> logits) {
  const std::vector<TokenProb> c = candidates(logits);
  int32_t token = c.back().id;  // reached only when rounding leaves u above the summed mass
  const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng_);
  double cumulative = 0;
  for (const auto& t : c) {
    cumulative += t.prob;
    if (u < cumulative) {
      token = t.id;
      break;
    }
  }
  accept(token);
  return token;
}

void Sampler::accept(int32_t token) {
  if (config_.repeat_last_n == 0) return;
  recent_.push_back(token);
  if (recent_.size() > static_cast<size_t>(config_.repeat_last_n)) recent_.pop_front();
}

}  // namespace qalora
