// Test helper (not part of the product): drives trellm::Tokenizer from a pytest oracle comparison.
//   tokenizer_tool batch TOKENIZER.json   < requests.jsonl > replies.jsonl
//     each request: {"encode": "text", "special": bool} or {"decode": [ids], "skip": bool}
//     each reply:   {"ids": [...]} / {"text": "...", "stream": "..."} / {"error": "..."}
//     (for decode, "stream" is the concatenated output of StreamDecoder fed one id at a time)
//   tokenizer_tool bench TOKENIZER.json TEXT_FILE [repeats]   -> one JSON line with MB/s
#include <chrono>
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>

#include "core/error.h"
#include "format/tokenizer_json.h"
#include "runtime/tokenizer.h"

using nlohmann::json;

static int batch(const trellm::Tokenizer& tok) {
  std::string line;
  while (std::getline(std::cin, line)) {
    json reply;
    try {
      json req = json::parse(line);
      if (req.contains("encode")) {
        reply["ids"] = tok.encode(req["encode"].get<std::string>(), req.value("special", false));
      } else {
        std::vector<int32_t> ids = req["decode"].get<std::vector<int32_t>>();
        bool skip = req.value("skip", false);
        reply["text"] = tok.decode(ids, skip);
        trellm::StreamDecoder sd(tok, skip);
        std::string s;
        for (int32_t id : ids) s += sd.push(id);
        s += sd.finish();
        reply["stream"] = s;
      }
    } catch (const std::exception& e) {
      reply["error"] = e.what();
    }
    std::cout << reply.dump(-1, ' ', false, json::error_handler_t::strict) << '\n';
  }
  return 0;
}

static int bench(const trellm::Tokenizer& tok, const std::string& path, int repeats) {
  std::string text = trellm::format::read_text_file(path);
  size_t n_ids = tok.encode(text).size();  // warm-up (fills the piece cache, as HF's own cache is warm too)
  double best = 1e30;
  for (int r = 0; r < repeats; r++) {
    auto t0 = std::chrono::steady_clock::now();
    n_ids = tok.encode(text).size();
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::min(best, s);
  }
  json j{{"bytes", text.size()}, {"tokens", n_ids}, {"seconds", best}, {"mb_per_s", text.size() / best / 1e6}};
  std::cout << j.dump() << std::endl;
  return 0;
}

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: tokenizer_tool batch|bench TOKENIZER.json [TEXT_FILE [repeats]]\n");
    return 2;
  }
  try {
    std::string mode = argv[1];
    auto t0 = std::chrono::steady_clock::now();
    trellm::Tokenizer tok = trellm::Tokenizer::from_file(argv[2]);
    double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (mode == "batch") return batch(tok);
    if (mode == "bench" && argc >= 4) {
      std::fprintf(stderr, "load: %.3f s\n", load_s);
      return bench(tok, argv[3], argc >= 5 ? std::atoi(argv[4]) : 3);
    }
    std::fprintf(stderr, "unknown mode %s\n", argv[1]);
    return 2;
  } catch (const trellm::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
