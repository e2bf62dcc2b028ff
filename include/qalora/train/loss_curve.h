// The loss curve of a training run as a self-contained SVG picture.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace qalora {

struct LossPoint {
  int64_t step;
  double loss;
};

// Training loss (thin line, with a moving average over ~5% of the steps as a thick line) and
// held-out loss (dots joined by a line) against the optimizer step, with axes and a legend.
std::string loss_curve_svg(const std::vector<LossPoint>& train, const std::vector<LossPoint>& eval,
                           const std::string& title);

}  // namespace qalora
