// AdamW over the adapter parameters, the learning-rate schedules, and gradient clipping.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "qalora/adapters/adapter.h"

namespace qalora {

enum class LrSchedule { Constant, Linear, Cosine };
const char* lr_schedule_name(LrSchedule s);  // "constant", "linear", "cosine"
LrSchedule parse_lr_schedule(std::string_view name);

// The learning rate of optimizer step `step` (0-based) of `total`: a linear warmup over
// `warmup` steps ((step + 1) / (warmup + 1) of the peak, so no step has rate 0), then constant,
// linear decay to 0 at `total`, or a cosine decay to 0 at `total`.
double learning_rate(LrSchedule schedule, double peak, int64_t step, int64_t warmup, int64_t total);

// sqrt of the sum of squares of every adapter gradient (double accumulation, fixed order).
double grad_norm(const AdapterSet& adapters);
// Multiplies every gradient by `factor`.
void scale_grads(AdapterSet& adapters, float factor);

struct AdamWConfig {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
};

// Decoupled weight decay Adam (Loshchilov & Hutter), with bias correction. The moments are
// kept per adapter tensor in the AdapterSet's order.
class AdamW {
 public:
  AdamW(const AdapterSet& adapters, AdamWConfig config);
  // One update of every A and B from its gradient with learning rate `lr`.
  void step(AdapterSet& adapters, double lr);
  int64_t steps() const { return t_; }
  const AdamWConfig& config() const { return config_; }

  // The moments, for checkpoints: [adapter][0 = A, 1 = B].
  std::vector<std::vector<float>>& first_moments() { return m_; }
  std::vector<std::vector<float>>& second_moments() { return v_; }
  void set_steps(int64_t t) { t_ = t; }

 private:
  AdamWConfig config_;
  int64_t t_ = 0;
  std::vector<std::vector<float>> m_, v_;  // 2 per adapter: A then B
};

}  // namespace qalora
