#include "qalora/train/optimizer.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "qalora/core/error.h"

namespace qalora {

const char* lr_schedule_name(LrSchedule s) {
  switch (s) {
    case LrSchedule::Constant:
      return "constant";
    case LrSchedule::Linear:
      return "linear";
    case LrSchedule::Cosine:
      return "cosine";
  }
  return "?";
}

LrSchedule parse_lr_schedule(std::string_view name) {
  for (LrSchedule s : {LrSchedule::Constant, LrSchedule::Linear, LrSchedule::Cosine})
    if (name == lr_schedule_name(s)) return s;
  fail("--lr-scheduler: unknown schedule '", name, "', expected constant, linear or cosine");
}

double learning_rate(LrSchedule schedule, double peak, int64_t step, int64_t warmup,
                     int64_t total) {
  if (step < warmup) return peak * static_cast<double>(step + 1) / static_cast<double>(warmup + 1);
  if (schedule == LrSchedule::Constant) return peak;
  const double span = static_cast<double>(std::max<int64_t>(1, total - warmup));
  const double progress = std::clamp(static_cast<double>(step - warmup) / span, 0.0, 1.0);
  if (schedule == LrSchedule::Linear) return peak * (1.0 - progress);
  return peak * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
}

double grad_norm(const AdapterSet& adapters) {
  double ss = 0;
  for (const LoraAdapter& a : adapters.adapters)
    for (const std::vector<float>* g : {&a.grad_A, &a.grad_B}) {
      const float* v = g->data();
      const auto n = static_cast<int64_t>(g->size());
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(v[i]) * v[i];
    }
  return std::sqrt(ss);
}

void scale_grads(AdapterSet& adapters, float factor) {
  for (LoraAdapter& a : adapters.adapters)
    for (std::vector<float>* g : {&a.grad_A, &a.grad_B})
      for (float& x : *g) x *= factor;
}

AdamW::AdamW(const AdapterSet& adapters, AdamWConfig config) : config_(config) {
  for (const LoraAdapter& a : adapters.adapters)
    for (const Tensor* p : {&a.A, &a.B}) {
      m_.emplace_back(static_cast<size_t>(p->numel()), 0.0f);
      v_.emplace_back(static_cast<size_t>(p->numel()), 0.0f);
    }
}

void AdamW::step(AdapterSet& adapters, double lr) {
  QL_CHECK(m_.size() == 2 * adapters.adapters.size(), "optimizer: state for ", m_.size() / 2,
           " adapters, the set has ", adapters.adapters.size());
  ++t_;
  const double c1 = 1.0 - std::pow(config_.beta1, static_cast<double>(t_));
  const double c2 = 1.0 - std::pow(config_.beta2, static_cast<double>(t_));
  const auto b1 = static_cast<float>(config_.beta1), b2 = static_cast<float>(config_.beta2);
  const auto step_size = static_cast<float>(lr / c1);
  const auto inv_c2 = static_cast<float>(1.0 / c2);
  const auto eps = static_cast<float>(config_.eps);
  const auto decay = static_cast<float>(1.0 - lr * config_.weight_decay);
  size_t k = 0;
  for (LoraAdapter& a : adapters.adapters) {
    const std::pair<Tensor*, std::vector<float>*> params[] = {{&a.A, &a.grad_A}, {&a.B, &a.grad_B}};
    for (auto [param, grad] : params) {
      float* w = param->mutable_data();
      float* m = m_[k].data();
      float* v = v_[k].data();
      const float* g = grad->data();
      const auto n = static_cast<int64_t>(m_[k].size());
      QL_CHECK(static_cast<int64_t>(grad->size()) == n, "optimizer: gradient of ", grad->size(),
               " values for a tensor of ", n);
      // Elementwise: the result does not depend on how the threads split the range.
#pragma omp parallel for simd if (n > 65536)
      for (int64_t i = 0; i < n; ++i) {
        m[i] = b1 * m[i] + (1.0f - b1) * g[i];
        v[i] = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
        w[i] = w[i] * decay - step_size * m[i] / (std::sqrt(v[i] * inv_c2) + eps);
      }
      ++k;
    }
  }
}

}  // namespace qalora
