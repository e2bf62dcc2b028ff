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

namespace {

// The adapters' parameter tensors in a fixed order: A then B of each adapter.
int64_t tensor_count(const AdapterSet& adapters) {
  return 2 * std::ssize(adapters.adapters);
}
template <typename Set>  // AdapterSet, const or not
auto& grad_of(Set& adapters, int64_t k) {
  auto& a = adapters.adapters[static_cast<size_t>(k / 2)];
  return k % 2 == 0 ? a.grad_A : a.grad_B;
}
Tensor& param_of(AdapterSet& adapters, int64_t k) {
  LoraAdapter& a = adapters.adapters[static_cast<size_t>(k / 2)];
  return k % 2 == 0 ? a.A : a.B;
}

}  // namespace

double grad_norm(const AdapterSet& adapters) {
  // Each tensor's sum on one thread, the sums added in order: the same norm for any thread
  // count.
  std::vector<double> sums(static_cast<size_t>(tensor_count(adapters)));
#pragma omp parallel for schedule(dynamic)
  for (int64_t k = 0; k < tensor_count(adapters); ++k) {
    const std::vector<float>& g = grad_of(adapters, k);
    const float* v = g.data();
    const auto n = std::ssize(g);
    double ss = 0;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(v[i]) * v[i];
    sums[static_cast<size_t>(k)] = ss;
  }
  double ss = 0;
  for (double x : sums) ss += x;
  return std::sqrt(ss);
}

void scale_grads(AdapterSet& adapters, float factor) {
#pragma omp parallel for schedule(dynamic)
  for (int64_t k = 0; k < tensor_count(adapters); ++k)
    for (float& x : grad_of(adapters, k)) x *= factor;
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
  for (int64_t k = 0; k < tensor_count(adapters); ++k) {
    QL_CHECK(grad_of(adapters, k).size() == m_[static_cast<size_t>(k)].size(),
             "optimizer: gradient of ", grad_of(adapters, k).size(), " values for a tensor of ",
             m_[static_cast<size_t>(k)].size());
  }
  // Tensors in parallel (most are too small to split), each updated elementwise: the result
  // does not depend on the threads.
#pragma omp parallel for schedule(dynamic)
  for (int64_t k = 0; k < tensor_count(adapters); ++k) {
    float* w = param_of(adapters, k).mutable_data();
    float* m = m_[static_cast<size_t>(k)].data();
    float* v = v_[static_cast<size_t>(k)].data();
    const float* g = grad_of(adapters, k).data();
    const auto n = std::ssize(m_[static_cast<size_t>(k)]);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      m[i] = b1 * m[i] + (1.0f - b1) * g[i];
      v[i] = b2 * v[i] + (1.0f - b2) * g[i] * g[i];
      w[i] = w[i] * decay - step_size * m[i] / (std::sqrt(v[i] * inv_c2) + eps);
    }
  }
}

}  // namespace qalora
