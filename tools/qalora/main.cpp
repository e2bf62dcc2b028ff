// qalora: command-line front end. Each subcommand lives in its own cmd_*.cpp file.
#include <CLI/CLI.hpp>
#include <csignal>
#include <cstdio>
#include <exception>
#include <filesystem>

#include "commands.h"
#include "qalora/core/error.h"
#include "qalora/ops/blas.h"

int main(int argc, char** argv) {
  qalora::select_blas_kernels(argv);
  // Past a file size limit (ulimit -f) a write fails with EFBIG and the command reports it like a
  // full disk, instead of being killed by SIGXFSZ with its output half written.
  std::signal(SIGXFSZ, SIG_IGN);
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
  } catch (const std::filesystem::filesystem_error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());  // names the path and the system's reason
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
