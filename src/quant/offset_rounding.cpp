// Group offsets onto fp16 or GPTQ zero points, with error feedback through the Hessian of the
// pooled inputs.
#include "qalora/quant/offset_rounding.h"

#include <algorithm>
#include <cmath>
#include <memory>

#include "qalora/adapters/adapter.h"
#include "qalora/adapters/lora.h"
#include "qalora/core/error.h"
#include "qalora/core/fp16.h"
#include "qalora/model/runtime.h"
#include "qalora/quant/gptq.h"

namespace qalora {

int zero_point(float m, float s, int bits, int zmin) {
  if (s == 0.0f) return 1 << (bits - 1);
  const float z = std::clamp(std::nearbyint(-m / s), static_cast<float>(zmin),
                             static_cast<float>((1 << bits) - 1));
  return static_cast<int>(z);
}

float OffsetGrid::nearest(float m, float s, int bits) const {
  if (kind == Kind::Fp16) return round_to_fp16(m);
  return -s * static_cast<float>(zero_point(m, s, bits, zmin));
}

namespace {

bool pooled(const QMatrix& q) {
  return q.type == QuantType::Affine && q.g_idx.empty() && !q.codes.empty();
}

// sum_{a,b} d_a H_ab d_b
double quadratic_form(const std::vector<double>& d, const std::vector<double>& H) {
  const auto L = static_cast<int64_t>(d.size());
  double sum = 0;
  for (int64_t a = 0; a < L; ++a) {
    double row = 0;
    for (int64_t b = 0; b < L; ++b) row += H[a * L + b] * d[b];
    sum += d[a] * row;
  }
  return sum;
}

}  // namespace

std::vector<std::vector<double>> pooled_input_hessians(
    const Model& model, std::span<const std::vector<int32_t>> windows) {
  const int64_t n_layers = model.config.n_layers;
  std::vector<std::unique_ptr<HessianAccumulator>> acc(static_cast<size_t>(n_layers * kNumTargets));
  int64_t ctx = 0;
  for (const auto& w : windows) ctx = std::max(ctx, static_cast<int64_t>(w.size()));
  QL_CHECK(ctx > 0, "offset rounding: no calibration tokens");
  for (int64_t l = 0; l < n_layers; ++l)
    for (const Target t : all_targets()) {
      const QMatrix& q = target_linear(model.layers[static_cast<size_t>(l)], t).qweight;
      if (pooled(q))
        acc[static_cast<size_t>(l * kNumTargets + static_cast<int>(t))] =
            std::make_unique<HessianAccumulator>(q.n_groups());
    }

  InferenceSession session(model, ctx);
  std::vector<float> sums;
  session.observe_linear_inputs([&](int64_t layer, Target t, const float* x, int64_t T) {
    HessianAccumulator* a = acc[static_cast<size_t>(layer * kNumTargets + static_cast<int>(t))].get();
    if (!a) return;
    const QMatrix& q = target_linear(model.layers[static_cast<size_t>(layer)], t).qweight;
    sums.resize(static_cast<size_t>(T * q.n_groups()));
    pool_groups_forward(sums.data(), x, T, q.cols, q.group_size, AdapterPool::Sum);
    a->add(sums.data(), T);
  });
  std::vector<float> logits(static_cast<size_t>(model.config.vocab_size));
  for (const auto& w : windows) {
    session.reset();
    session.forward(w, logits);
  }
  std::vector<std::vector<double>> H(acc.size());
  for (size_t i = 0; i < acc.size(); ++i)
    if (acc[i]) H[i] = acc[i]->hessian();
  return H;
}

void round_offsets(QMatrix& q, const OffsetGrid& grid, const std::vector<double>* H,
                   OffsetRounding& report, double damp) {
  QL_CHECK(pooled(q), "offset rounding: only affine matrices with contiguous groups have offsets "
                      "to round, got ", quant_type_name(q.type), q.g_idx.empty() ? "" : " (act-order)");
  const int64_t L = q.n_groups();
  QL_CHECK(!H || static_cast<int64_t>(H->size()) == L * L, "offset rounding: Hessian has ",
           H ? H->size() : 0, " entries, expected ", L * L);
  const std::vector<double> U = H ? damped_inverse_cholesky(*H, L, damp) : std::vector<double>{};
  std::vector<double> w(static_cast<size_t>(L)), d(w.size()), d_nearest(w.size());
  float* const offsets = q.offsets.writable();
  std::vector<float> scale_row(static_cast<size_t>(L));
  for (int64_t j = 0; j < q.rows; ++j) {
    float* m = offsets + j * L;
    const float* s = q.scales.read(j * L, L, scale_row.data());
    std::copy(m, m + L, w.begin());
    for (int64_t l = 0; l < L; ++l) {
      const float original = m[l];
      m[l] = grid.nearest(static_cast<float>(w[l]), s[l], q.bits);
      d[l] = static_cast<double>(m[l]) - original;
      d_nearest[l] = static_cast<double>(grid.nearest(original, s[l], q.bits)) - original;
      report.max_abs_dm = std::max(report.max_abs_dm, std::abs(d[l]));
      if (!H) continue;
      // GPTQ's update: what this group's rounding changed in the outputs, undone as far as the
      // groups still to round can.
      const double e = (w[l] - m[l]) / U[l * L + l];
      for (int64_t l2 = l + 1; l2 < L; ++l2) w[l2] -= e * U[l * L + l2];
    }
    if (H) {
      report.output_error += quadratic_form(d, *H);
      report.nearest_error += quadratic_form(d_nearest, *H);
    }
  }
  ++report.linears;
}

int64_t offsets_off_grid(const Model& model, const OffsetGrid& grid,
                         const std::function<bool(const QMatrix&)>& stored) {
  int64_t n = 0;
  for (const LayerWeights& layer : model.layers)
    for (const Target t : all_targets()) {
      const QMatrix& q = target_linear(layer, t).qweight;
      if (!pooled(q) || !stored(q)) continue;
      const std::vector<float> m = q.offsets.to_vector(), s = q.scales.to_vector();
      for (size_t g = 0; g < m.size(); ++g)
        if (grid.nearest(m[g], s[g], q.bits) != m[g]) {
          ++n;
          break;
        }
    }
  return n;
}

OffsetRounding round_model_offsets(Model& model, const OffsetGrid& grid,
                                   const std::vector<std::vector<double>>* hessians,
                                   const std::function<bool(const QMatrix&)>& stored) {
  OffsetRounding report;
  for (size_t l = 0; l < model.layers.size(); ++l)
    for (const Target t : all_targets()) {
      QMatrix& q = target_linear(model.layers[l], t).qweight;
      if (!pooled(q) || !stored(q)) continue;
      const std::vector<double>* H =
          hessians ? &(*hessians)[l * kNumTargets + static_cast<size_t>(t)] : nullptr;
      round_offsets(q, grid, H && !H->empty() ? H : nullptr, report);
    }
  return report;
}

}  // namespace qalora
