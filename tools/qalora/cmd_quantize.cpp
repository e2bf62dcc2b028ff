// qalora quantize: RTN / GPTQ / NF4 / FP4 / INT8 quantization of a model's linear layers into a
// native quantized model folder (SPEC §3).
#include <cstdio>
#include <filesystem>
#include <memory>

#include "cli_common.h"
#include "commands.h"
#include "qalora/core/clock.h"
#include "qalora/core/error.h"
#include "quantize_args.h"

namespace qalora::cli {

namespace {

struct QuantizeCommandArgs {
  ModelArgs model;
  QuantizeArgs quant;
  std::string out;
  std::string metrics;
};

void run_quantize(QuantizeCommandArgs& a) {
  resolve_quantize_args(a.quant);
  QL_CHECK(!std::filesystem::exists(a.out) || std::filesystem::is_directory(a.out), "--out: ",
           a.out, " exists and is not a folder");
  const auto t0 = Clock::now();
  Model model = load_model(a.model);
  const auto calibration = load_calibration(a.quant, model);
  // Each block is written as soon as it is quantized and then dropped: the source stays mapped
  // and memory holds about one block of output (docs/memory.md).
  ModelFolderWriter writer(model, a.out);
  quantize_with_progress(model, a.quant, calibration, a.metrics,
                         [&](int64_t index, LayerWeights& block) {
                           writer.write_block(index, block);
                           block = LayerWeights{};
                         });
  writer.finish();
  std::printf("time:          %.1f s\n", seconds_since(t0));
  std::printf("saved:         %s\n", a.out.c_str());
  print_peak_memory();
}

}  // namespace

void register_quantize(CLI::App& app) {
  auto a = std::make_shared<QuantizeCommandArgs>();
  CLI::App* cmd = add_command(app, "quantize", "Quantize a model's linear layers (RTN, GPTQ, NF4, FP4, INT8)");
  add_model_args(cmd, a->model);
  cmd->add_option("--method", a->quant.options.method, "rtn, gptq, nf4, fp4 or int8")
      ->capture_default_str();
  add_quantize_args(cmd, a->quant);
  cmd->add_option("-o,--out", a->out, "output folder (native quantized model)")->required();
  cmd->add_option("--metrics", a->metrics, "write one JSON line per quantized linear to this file");
  cmd->callback([a] { run_quantize(*a); });
}

}  // namespace qalora::cli
