#include "quantize_args.h"

#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>

#include "qalora/core/clock.h"
#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"
#include "qalora/core/progress.h"
#include "qalora/ops/blas.h"

namespace qalora::cli {

void add_quantize_args(CLI::App* cmd, QuantizeArgs& a) {
  QuantizeOptions& o = a.options;
  a.bits = cmd->add_option("--bits", o.bits, "2, 3, 4 or 8 (default 4; int8: 8)");
  a.group_size = cmd->add_option(
      "--group-size,-g", o.group_size,
      "inputs per group, -1 = per channel (default 128; nf4/fp4 blocks: 64; int8: -1)");
  cmd->add_flag("--sym", o.sym, "symmetric (zero point 2^(bits-1)); default asymmetric");
  cmd->add_flag("--act-order", o.act_order, "GPTQ: quantize columns by decreasing Hessian diagonal");
  cmd->add_flag("--static-groups", o.static_groups,
                "GPTQ act-order: fix group parameters up front so groups stay contiguous");
  cmd->add_option("--damp", o.damp, "GPTQ: dampening, fraction of the mean Hessian diagonal")
      ->capture_default_str();
  cmd->add_flag("--double-quant", o.double_quant, "nf4/fp4: 8-bit quantize the absmax constants");
  cmd->add_option("--calib", a.calib, "GPTQ: calibration text file");
  cmd->add_option("--calib-samples", a.calib_samples, "GPTQ: calibration windows")
      ->capture_default_str();
  cmd->add_option("--calib-len", a.calib_len, "GPTQ: tokens per calibration window")
      ->capture_default_str();
  cmd->add_option("--seed", a.seed, "GPTQ: seed of the random calibration windows")
      ->capture_default_str();
}

void resolve_quantize_args(QuantizeArgs& a) {
  QuantizeOptions& o = a.options;
  if (a.bits->count() == 0) o.bits = o.method == "int8" ? 8 : 4;
  if (a.group_size->count() == 0)
    o.group_size = o.method == "int8" ? -1 : (o.method == "nf4" || o.method == "fp4") ? 64 : 128;
  validate_quantize_options(o);
}

std::vector<std::vector<int32_t>> load_calibration(const QuantizeArgs& a, const Model& model) {
  if (a.options.method != "gptq") {
    QL_CHECK(a.calib.empty(), "--calib: only gptq uses calibration data, not ", a.options.method);
    return {};
  }
  QL_CHECK(!a.calib.empty(), "--calib: gptq needs a calibration text file");
  QL_CHECK(std::filesystem::is_regular_file(a.calib), "--calib: cannot open ", a.calib,
           ": no such file");
  const std::vector<int32_t> tokens =
      model.require_tokenizer().encode(read_file(a.calib), /*add_bos=*/false);
  QL_CHECK(a.calib_len <= model.config.context_length, "--calib-len ", a.calib_len,
           " exceeds the model's context length ", model.config.context_length);
  return calibration_windows(tokens, a.calib_samples, a.calib_len, a.seed, a.calib);
}

void quantize_with_progress(Model& model, const QuantizeArgs& a,
                            const std::vector<std::vector<int32_t>>& calibration,
                            const std::string& metrics_path, const BlockCallback& on_block,
                            const BeforeBlock& before_block) {
  const QuantizeOptions& o = a.options;
  std::optional<JsonlWriter> metrics;
  if (!metrics_path.empty()) metrics.emplace(metrics_path);
  const int64_t n_linears = model.config.n_layers * 7;
  ProgressBar bar(cat("quantize ", o.method, " ", o.bits, "-bit"), n_linears);
  double err_sum = 0.0;
  int64_t err_count = 0;
  int64_t quant_bytes = 0, fp32_bytes = 0;
  const auto count_block = [&](int64_t index, LayerWeights& L) {
    for (const Linear* l : {&L.q, &L.k, &L.v, &L.o, &L.gate, &L.up, &L.down}) {
      quant_bytes += l->qweight.storage_bytes();
      fp32_bytes += 4 * l->qweight.rows * l->qweight.cols;
    }
    if (on_block) on_block(index, L);
  };
  const auto on_linear = [&](const LayerReport& r) {
    bar.advance();
    if (r.relative_error >= 0) {
      err_sum += r.relative_error;
      ++err_count;
    }
    if (metrics) {
      nlohmann::json rec = {{"layer", r.layer}, {"linear", r.name}, {"seconds", r.seconds}};
      if (r.relative_error >= 0) rec["relative_output_error"] = r.relative_error;
      metrics->write(rec);
    }
  };
  const auto t0 = Clock::now();
  const QuantizeWork work =
      quantize_model(model, o, calibration, on_linear, count_block, before_block);
  const double seconds = seconds_since(t0);
  bar.finish();
  model.quant.calibration =
      calibration.empty() ? std::string()
                          : cat(std::filesystem::path(a.calib).filename().string(), ": ",
                                calibration.size(), " x ", a.calib_len, " tokens, seed ", a.seed);

  std::printf("method:        %s, %d-bit, group %lld%s%s\n", o.method.c_str(), o.bits,
              static_cast<long long>(o.group_size), o.sym ? ", sym" : "",
              o.act_order ? (o.static_groups ? ", act-order (static groups)" : ", act-order") : "");
  std::printf("linear layers: %lld, %.1f MB (fp32 %.1f MB, %.2f bits/weight)\n",
              static_cast<long long>(n_linears), static_cast<double>(quant_bytes) / 1e6,
              static_cast<double>(fp32_bytes) / 1e6,
              32.0 * static_cast<double>(quant_bytes) / static_cast<double>(fp32_bytes));
  if (err_count > 0)
    std::printf("output error:  %.4f mean relative ||WX - QX|| / ||WX|| on calibration inputs\n",
                err_sum / static_cast<double>(err_count));
  if (work.flops > 0) {
    // Measured after the run, on the machine as it is now: a shared machine's speed drifts.
    const double gflops = work.flops / seconds / 1e9, peak = sgemm_peak_gflops();
    std::printf("arithmetic:    %.3g TFLOP in %.1f s: %.1f GFLOP/s, %.0f%% of the fp32 GEMM peak "
                "(%.1f GFLOP/s)\n",
                work.flops / 1e12, seconds, gflops, 100.0 * gflops / peak, peak);
  }
}

}  // namespace qalora::cli
