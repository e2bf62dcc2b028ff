#include "qalora/train/loss_curve.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>

namespace qalora {

namespace {

constexpr double kWidth = 720, kHeight = 420, kLeft = 64, kRight = 24, kTop = 40, kBottom = 48;

std::string fmt(const char* f, double v) {
  std::string out(static_cast<size_t>(std::snprintf(nullptr, 0, f, v)), '\0');
  std::snprintf(out.data(), out.size() + 1, f, v);
  return out;
}

std::string escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '<')
      out += "&lt;";
    else if (c == '>')
      out += "&gt;";
    else if (c == '&')
      out += "&amp;";
    else
      out += c;
  }
  return out;
}

// A "nice" tick step near range / 5 (1, 2 or 5 times a power of ten).
double tick_step(double range) {
  const double raw = range / 5.0;
  const double p = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0})
    if (raw <= m * p) return m * p;
  return 10.0 * p;
}

}  // namespace

std::string loss_curve_svg(const std::vector<LossPoint>& train, const std::vector<LossPoint>& eval,
                           const std::string& title) {
  double x0 = std::numeric_limits<double>::max(), x1 = std::numeric_limits<double>::lowest();
  double y0 = x0, y1 = x1;
  for (const auto* series : {&train, &eval})
    for (const LossPoint& p : *series) {
      if (!std::isfinite(p.loss)) continue;
      x0 = std::min(x0, static_cast<double>(p.step)),
      x1 = std::max(x1, static_cast<double>(p.step));
      y0 = std::min(y0, p.loss), y1 = std::max(y1, p.loss);
    }
  if (x0 > x1) x0 = 0, x1 = 1, y0 = 0, y1 = 1;
  if (x1 - x0 < 1) x1 = x0 + 1;
  if (y1 - y0 < 1e-6) y0 -= 0.5, y1 += 0.5;
  const double pad = 0.05 * (y1 - y0);
  y0 -= pad, y1 += pad;
  const double pw = kWidth - kLeft - kRight, ph = kHeight - kTop - kBottom;
  auto px = [&](double x) { return kLeft + (x - x0) / (x1 - x0) * pw; };
  auto py = [&](double y) { return kTop + (y1 - y) / (y1 - y0) * ph; };
  auto polyline = [&](const std::vector<LossPoint>& pts, const char* style) {
    std::string s = "<polyline fill=\"none\" " + std::string(style) + " points=\"";
    for (const LossPoint& p : pts)
      if (std::isfinite(p.loss))
        s += fmt("%.1f", px(static_cast<double>(p.step))) + "," + fmt("%.1f", py(p.loss)) + " ";
    return s + "\"/>\n";
  };

  std::string svg = fmt("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%.0f\"", kWidth) +
                    fmt(" height=\"%.0f\" font-family=\"sans-serif\" font-size=\"12\">\n", kHeight);
  svg += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
  svg += fmt("<text x=\"%.0f\" y=\"24\" font-size=\"15\">", kLeft) + escape(title) + "</text>\n";
  const double ys = tick_step(y1 - y0), xs = std::max(1.0, std::round(tick_step(x1 - x0)));
  for (double y = std::ceil(y0 / ys) * ys; y <= y1; y += ys) {
    svg += fmt("<line x1=\"%.1f\"", kLeft) + fmt(" x2=\"%.1f\"", kLeft + pw) +
           fmt(" y1=\"%.1f\"", py(y)) + fmt(" y2=\"%.1f\" stroke=\"#e4e4e4\"/>\n", py(y));
    svg += fmt("<text x=\"%.1f\"", kLeft - 6) + fmt(" y=\"%.1f\" text-anchor=\"end\">", py(y) + 4) +
           fmt("%g", y) + "</text>\n";
  }
  for (double x = std::ceil(x0 / xs) * xs; x <= x1; x += xs)
    svg += fmt("<text x=\"%.1f\"", px(x)) +
           fmt(" y=\"%.1f\" text-anchor=\"middle\">", kTop + ph + 18) + fmt("%g", x) + "</text>\n";
  svg += fmt("<rect x=\"%.1f\"", kLeft) + fmt(" y=\"%.1f\"", kTop) + fmt(" width=\"%.1f\"", pw) +
         fmt(" height=\"%.1f\" fill=\"none\" stroke=\"#888\"/>\n", ph);
  svg += fmt("<text x=\"%.1f\"", kLeft + pw / 2) +
         fmt(" y=\"%.1f\" text-anchor=\"middle\">optimizer step</text>\n", kHeight - 8);
  svg += fmt("<text x=\"14\" y=\"%.1f\" text-anchor=\"middle\"", kTop + ph / 2) +
         fmt(" transform=\"rotate(-90 14 %.1f)\">loss (nats per target token)</text>\n",
             kTop + ph / 2);

  svg += polyline(train, "stroke=\"#9ecae1\" stroke-width=\"1\"");
  // Moving average, so the trend shows through the noise of single steps.
  const auto window = std::max<size_t>(1, train.size() / 20);
  std::vector<LossPoint> smooth;
  double sum = 0;
  for (size_t i = 0; i < train.size(); ++i) {
    sum += train[i].loss;
    if (i >= window) sum -= train[i - window].loss;
    smooth.push_back({train[i].step, sum / static_cast<double>(std::min(i + 1, window))});
  }
  svg += polyline(smooth, "stroke=\"#1f77b4\" stroke-width=\"2.5\"");
  svg += polyline(eval, "stroke=\"#d62728\" stroke-width=\"2\"");
  for (const LossPoint& p : eval)
    svg += fmt("<circle cx=\"%.1f\"", px(static_cast<double>(p.step))) +
           fmt(" cy=\"%.1f\" r=\"3.5\" fill=\"#d62728\"/>\n", py(p.loss));
  const double lx = kLeft + pw - 170, ly = kTop + 14;
  svg += fmt("<line x1=\"%.1f\"", lx) + fmt(" x2=\"%.1f\"", lx + 24) + fmt(" y1=\"%.1f\"", ly) +
         fmt(" y2=\"%.1f\" stroke=\"#1f77b4\" stroke-width=\"2.5\"/>\n", ly);
  svg +=
      fmt("<text x=\"%.1f\"", lx + 30) + fmt(" y=\"%.1f\">training (moving avg)</text>\n", ly + 4);
  svg += fmt("<line x1=\"%.1f\"", lx) + fmt(" x2=\"%.1f\"", lx + 24) +
         fmt(" y1=\"%.1f\"", ly + 18) +
         fmt(" y2=\"%.1f\" stroke=\"#d62728\" stroke-width=\"2\"/>\n", ly + 18);
  svg += fmt("<text x=\"%.1f\"", lx + 30) + fmt(" y=\"%.1f\">held-out</text>\n", ly + 22);
  return svg + "</svg>\n";
}

}  // namespace qalora
