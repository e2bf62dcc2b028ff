// qalora: command-line front end. Each subcommand lives in its own cmd_*.cpp file.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>

#include "commands.h"
#include "qalora/core/error.h"
#include "qalora/ops/blas.h"

int main(int argc, char** argv) {
  qalora::select_blas_kernels(argv);
  CLI::App app{
      "qalora: quantize, fine-tune (LoRA / QLoRA / QA-LoRA), merge, export and evaluate "
      "Llama-family models"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "qalora 0.1.0");
  qalora::cli::register_commands(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const qalora::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: internal: %s\n", e.what());
    return 2;
  }
  return 0;
}
