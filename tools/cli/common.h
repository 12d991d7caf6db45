// Shared pieces of the trellm CLI subcommands.
#pragma once
#include <CLI/CLI.hpp>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "runtime/tokenizer.h"

namespace trellm::cli {

// The model shipped in the repository, used when --model is not given.
std::string default_model_dir();
// --model or the default (with a note on stderr saying which).
std::string resolve_model(const std::string& given);

std::vector<int32_t> parse_ids(const std::string& csv);  // "1,2,3" or "1 2 3"

// `cuda` applies when the device is a GPU.
std::unique_ptr<Backend> make_backend(const std::string& device, const CudaOptions& cuda = {});
// Registers the CUDA backend's tunables (--mla-prefill) on a subcommand.
void add_cuda_options(CLI::App* cmd, CudaOptions& cuda);

// DIR/tokenizer.json, or an Error saying the model has none (and what to use instead).
Tokenizer load_tokenizer(const std::string& dir);

// Registration of each subcommand (one file each).
void add_inspect(CLI::App& app);
void add_run(CLI::App& app);
void add_tokenize(CLI::App& app);
void add_quantize(CLI::App& app);
void add_chat(CLI::App& app);
void add_bench(CLI::App& app);
void record_command_line(int argc, char** argv);  // for the "command" field of benchmark figures
void add_perplexity(CLI::App& app);
void add_serve(CLI::App& app);
void add_batch(CLI::App& app);

}  // namespace trellm::cli
