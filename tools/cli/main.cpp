// trellm: the command-line entry point. Each subcommand lives in its own cmd_*.cpp.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "common.h"
#include "core/error.h"
#include "core/log.h"
#include "core/thread_pool.h"

int main(int argc, char** argv) {
  CLI::App app{"trellm: inference for trellis-quantized (EXL3) MoE language models (GLM-4.7-Flash)"};
  app.require_subcommand(1);
  app.set_version_flag("--version", "trellm 0.1.0");
  int threads = 0;
  bool verbose = false, quiet = false;
  app.add_option("-t,--threads", threads, "CPU threads (default: all cores)");
  app.add_flag("-v,--verbose", verbose, "More log output");
  app.add_flag("-q,--quiet", quiet, "Only errors");
  app.parse_complete_callback([&] {
    if (threads > 0) trellm::ThreadPool::set_global_threads(threads);
    if (verbose) trellm::set_log_level(trellm::LogLevel::Debug);
    if (quiet) trellm::set_log_level(trellm::LogLevel::Error);
  });
  trellm::cli::add_inspect(app);
  trellm::cli::add_run(app);
  trellm::cli::add_chat(app);
  trellm::cli::add_tokenize(app);
  trellm::cli::add_quantize(app);
  trellm::cli::add_perplexity(app);
  trellm::cli::add_bench(app);
  trellm::cli::add_serve(app);
  trellm::cli::add_batch(app);
  trellm::cli::record_command_line(argc, argv);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const trellm::Error& e) {
    std::fprintf(stderr, "trellm: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {  // std::filesystem_error (a full disk in copy_file), std::bad_alloc, ...
    std::fprintf(stderr, "trellm: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
