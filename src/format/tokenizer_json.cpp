#include "format/tokenizer_json.h"

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"

namespace trellm::format {

using nlohmann::json;

std::string line_col(const std::string& text, size_t offset) {
  size_t line = 1, col = 1;
  for (size_t i = 0; i < offset && i < text.size(); i++) {
    if (text[i] == '\n') { line++; col = 1; } else { col++; }
  }
  return str_cat(line, ":", col);
}

std::string read_text_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) fail(path, ": cannot open file");
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) fail(path, ": read error");
  return ss.str();
}

namespace {

// Field access that names the JSON path of whatever is wrong.
struct Ctx {
  const std::string& source;
  [[noreturn]] void error(const std::string& path, const std::string& what) const {
    fail(source, ": ", path, ": ", what);
  }
  const json& field(const json& j, const std::string& key, const std::string& path) const {
    if (!j.is_object()) error(path, "expected an object");
    auto it = j.find(key);
    if (it == j.end()) error(path, str_cat("missing field \"", key, "\""));
    return *it;
  }
  std::string str(const json& j, const std::string& key, const std::string& path) const {
    const json& v = field(j, key, path);
    if (!v.is_string()) error(path + "." + key, str_cat("expected a string, got ", v.type_name()));
    return v.get<std::string>();
  }
  bool boolean(const json& j, const std::string& key, const std::string& path, bool dflt) const {
    if (!j.is_object()) error(path, "expected an object");
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) return dflt;
    if (!it->is_boolean()) error(path + "." + key, str_cat("expected true/false, got ", it->type_name()));
    return it->get<bool>();
  }
  std::string type_of(const json& j, const std::string& path) const {
    if (!j.is_object()) error(path, str_cat("expected an object, got ", j.type_name()));
    return str(j, "type", path);
  }
  // Split/Replace patterns: {"Regex": "..."} or {"String": "..."}.
  void pattern(const json& j, const std::string& path, std::string& out, bool& is_regex) const {
    const json& p = field(j, "pattern", path);
    std::string pp = path + ".pattern";
    if (!p.is_object() || p.size() != 1) error(pp, "expected {\"Regex\": ...} or {\"String\": ...}");
    if (p.contains("Regex")) { out = str(p, "Regex", pp); is_regex = true; }
    else if (p.contains("String")) { out = str(p, "String", pp); is_regex = false; }
    else error(pp, str_cat("unknown pattern kind \"", p.begin().key(), "\" (expected Regex or String)"));
  }
};

NormalizerSpec parse_normalizer(const Ctx& c, const json& j, const std::string& path) {
  NormalizerSpec n;
  n.type = c.type_of(j, path);
  if (n.type == "Sequence") {
    const json& arr = c.field(j, "normalizers", path);
    if (!arr.is_array()) c.error(path + ".normalizers", "expected an array");
    for (size_t i = 0; i < arr.size(); i++)
      n.children.push_back(parse_normalizer(c, arr[i], str_cat(path, ".normalizers[", i, "]")));
  } else if (n.type == "Prepend") {
    n.prepend = c.str(j, "prepend", path);
  } else if (n.type == "Replace") {
    c.pattern(j, path, n.pattern, n.pattern_is_regex);
    n.content = c.str(j, "content", path);
  } else if (n.type == "Strip") {
    n.strip_left = c.boolean(j, "strip_left", path, true);
    n.strip_right = c.boolean(j, "strip_right", path, true);
  } else if (n.type != "NFC") {
    c.error(path, str_cat("unsupported normalizer type \"", n.type,
                          "\" (trellm implements NFC, Sequence, Prepend, Replace, Strip)"));
  }
  return n;
}

PreTokenizerSpec parse_pre_tokenizer(const Ctx& c, const json& j, const std::string& path) {
  PreTokenizerSpec p;
  p.type = c.type_of(j, path);
  if (p.type == "Sequence") {
    const json& arr = c.field(j, "pretokenizers", path);
    if (!arr.is_array()) c.error(path + ".pretokenizers", "expected an array");
    for (size_t i = 0; i < arr.size(); i++)
      p.children.push_back(parse_pre_tokenizer(c, arr[i], str_cat(path, ".pretokenizers[", i, "]")));
  } else if (p.type == "Split") {
    c.pattern(j, path, p.pattern, p.pattern_is_regex);
    std::string b = c.str(j, "behavior", path);
    if (b == "Removed") p.behavior = SplitBehavior::Removed;
    else if (b == "Isolated") p.behavior = SplitBehavior::Isolated;
    else if (b == "MergedWithPrevious") p.behavior = SplitBehavior::MergedWithPrevious;
    else if (b == "MergedWithNext") p.behavior = SplitBehavior::MergedWithNext;
    else if (b == "Contiguous") p.behavior = SplitBehavior::Contiguous;
    else c.error(path + ".behavior", str_cat("unknown split behavior \"", b, "\""));
    p.invert = c.boolean(j, "invert", path, false);
  } else if (p.type == "ByteLevel") {
    p.add_prefix_space = c.boolean(j, "add_prefix_space", path, true);
    p.use_regex = c.boolean(j, "use_regex", path, true);
  } else if (p.type == "Digits") {
    p.individual_digits = c.boolean(j, "individual_digits", path, false);
  } else {
    c.error(path, str_cat("unsupported pre_tokenizer type \"", p.type,
                          "\" (trellm implements Split, ByteLevel, Digits, Sequence)"));
  }
  return p;
}

DecoderSpec parse_decoder(const Ctx& c, const json& j, const std::string& path) {
  DecoderSpec d;
  d.type = c.type_of(j, path);
  if (d.type == "Sequence") {
    // Only a Sequence made of ByteLevel decoders is the same as one ByteLevel decoder.
    const json& arr = c.field(j, "decoders", path);
    if (!arr.is_array()) c.error(path + ".decoders", "expected an array");
    for (size_t i = 0; i < arr.size(); i++) {
      DecoderSpec sub = parse_decoder(c, arr[i], str_cat(path, ".decoders[", i, "]"));
      if (sub.type != "ByteLevel")
        c.error(str_cat(path, ".decoders[", i, "]"), "only ByteLevel decoders are supported inside a Sequence");
    }
    d.type = "ByteLevel";
  } else if (d.type != "ByteLevel") {
    c.error(path, str_cat("unsupported decoder type \"", d.type, "\" (trellm implements ByteLevel)"));
  }
  return d;
}

int32_t special_token_id(const Ctx& c, const json& specials, const std::string& name, const std::string& path,
                         std::vector<int32_t>& out) {
  if (!specials.is_object() || !specials.contains(name))
    c.error(path, str_cat("special token \"", name, "\" is not in special_tokens"));
  const json& ids = c.field(specials[name], "ids", path + ".special_tokens." + name);
  if (!ids.is_array()) c.error(path + ".special_tokens." + name + ".ids", "expected an array");
  for (const auto& v : ids) {
    if (!v.is_number_integer()) c.error(path + ".special_tokens." + name + ".ids", "expected integers");
    out.push_back(v.get<int32_t>());
  }
  return 0;
}

void parse_post_processor(const Ctx& c, const json& j, const std::string& path, PostProcessorSpec& pp,
                          const BpeModelSpec& model) {
  std::string type = c.type_of(j, path);
  pp.present = true;
  if (type == "ByteLevel") return;  // only trims offsets: adds no ids
  if (type == "Sequence") {
    const json& arr = c.field(j, "processors", path);
    if (!arr.is_array()) c.error(path + ".processors", "expected an array");
    for (size_t i = 0; i < arr.size(); i++)
      parse_post_processor(c, arr[i], str_cat(path, ".processors[", i, "]"), pp, model);
    return;
  }
  if (type == "TemplateProcessing") {
    const json& single = c.field(j, "single", path);
    if (!single.is_array()) c.error(path + ".single", "expected an array");
    const json& specials = c.field(j, "special_tokens", path);
    bool seen_sequence = false;
    for (size_t i = 0; i < single.size(); i++) {
      std::string ip = str_cat(path, ".single[", i, "]");
      const json& item = single[i];
      if (item.is_object() && item.contains("Sequence")) {
        if (seen_sequence) c.error(ip, "more than one Sequence in a single-input template");
        seen_sequence = true;
      } else if (item.is_object() && item.contains("SpecialToken")) {
        std::string name = c.str(item["SpecialToken"], "id", ip + ".SpecialToken");
        special_token_id(c, specials, name, path, seen_sequence ? pp.suffix_ids : pp.prefix_ids);
      } else {
        c.error(ip, "expected {\"Sequence\": ...} or {\"SpecialToken\": ...}");
      }
    }
    if (!seen_sequence) c.error(path + ".single", "template has no Sequence");
    return;
  }
  if (type == "BertProcessing" || type == "RobertaProcessing") {
    // {"cls": [token, id], "sep": [token, id]}: single input becomes cls A sep.
    for (const char* key : {"cls", "sep"}) {
      const json& v = c.field(j, key, path);
      if (!v.is_array() || v.size() != 2 || !v[1].is_number_integer())
        c.error(path + "." + key, "expected [token, id]");
      (std::string(key) == "cls" ? pp.prefix_ids : pp.suffix_ids).push_back(v[1].get<int32_t>());
    }
    return;
  }
  c.error(path, str_cat("unsupported post_processor type \"", type,
                        "\" (trellm implements ByteLevel, TemplateProcessing, BertProcessing, "
                        "RobertaProcessing, Sequence)"));
}

void parse_model(const Ctx& c, const json& j, BpeModelSpec& m) {
  const std::string path = "model";
  if (!j.is_object()) c.error(path, "expected an object");
  // Old files omit "type"; the tokenizers library then recognises BPE by its fields.
  std::string type = j.contains("type") ? c.str(j, "type", path) : (j.contains("merges") ? "BPE" : "?");
  if (type != "BPE")
    c.error(path + ".type", str_cat("unsupported model type \"", type, "\" (trellm implements BPE)"));
  if (j.contains("dropout") && !j["dropout"].is_null()) {
    if (!j["dropout"].is_number() || j["dropout"].get<double>() != 0.0)
      c.error(path + ".dropout", "BPE dropout is random at encode time; trellm requires null");
  }
  const json& vocab = c.field(j, "vocab", path);
  if (!vocab.is_object()) c.error(path + ".vocab", "expected an object {token: id}");
  m.vocab.reserve(vocab.size());
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 || it.value().get<int64_t>() > INT32_MAX)
      c.error(path + ".vocab[\"" + it.key() + "\"]", "expected a non-negative integer id");
    m.vocab.emplace(it.key(), it.value().get<int32_t>());
  }
  const json& merges = c.field(j, "merges", path);
  if (!merges.is_array()) c.error(path + ".merges", "expected an array");
  m.merges.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); i++) {
    const json& e = merges[i];
    if (e.is_string()) {
      // "a b": exactly one space separates the two parts (tokens never contain a raw space in byte-level BPE).
      const std::string& s = e.get_ref<const std::string&>();
      size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        c.error(str_cat(path, ".merges[", i, "]"), str_cat("expected \"a b\", got \"", s, "\""));
      m.merges.emplace_back(s.substr(0, sp), s.substr(sp + 1));
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      m.merges.emplace_back(e[0].get<std::string>(), e[1].get<std::string>());
    } else {
      c.error(str_cat(path, ".merges[", i, "]"), "expected \"a b\" or [\"a\", \"b\"]");
    }
  }
  if (j.contains("unk_token") && !j["unk_token"].is_null()) m.unk_token = c.str(j, "unk_token", path);
  auto opt_str = [&](const char* key) {
    return j.contains(key) && !j[key].is_null() ? c.str(j, key, path) : std::string();
  };
  m.continuing_subword_prefix = opt_str("continuing_subword_prefix");
  m.end_of_word_suffix = opt_str("end_of_word_suffix");
  m.fuse_unk = c.boolean(j, "fuse_unk", path, false);
  m.byte_fallback = c.boolean(j, "byte_fallback", path, false);
  m.ignore_merges = c.boolean(j, "ignore_merges", path, false);
}

}  // namespace

TokenizerJson parse_tokenizer_json(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    // e.byte is 1-based and points just past the offending character.
    size_t off = e.byte > 0 ? e.byte - 1 : 0;
    std::string msg = e.what();
    auto p = msg.find("parse error");
    fail(source, ":", line_col(text, off), ": malformed JSON: ", p == std::string::npos ? msg : msg.substr(p));
  } catch (const json::exception& e) {  // out_of_range.406: a number too large for a double
    fail(source, ": malformed JSON: ", e.what());
  }
  Ctx c{source};
  if (!j.is_object()) c.error("(top level)", "expected a JSON object");
  TokenizerJson t;
  t.source = source;
  parse_model(c, c.field(j, "model", "(top level)"), t.model);
  if (j.contains("added_tokens") && !j["added_tokens"].is_null()) {
    const json& arr = j["added_tokens"];
    if (!arr.is_array()) c.error("added_tokens", "expected an array");
    for (size_t i = 0; i < arr.size(); i++) {
      std::string p = str_cat("added_tokens[", i, "]");
      const json& a = arr[i];
      AddedToken at;
      const json& id = c.field(a, "id", p);
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX)
        c.error(p + ".id", "expected a non-negative integer");
      at.id = id.get<int32_t>();
      at.content = c.str(a, "content", p);
      if (at.content.empty()) c.error(p + ".content", "empty added token");
      at.special = c.boolean(a, "special", p, false);
      at.normalized = c.boolean(a, "normalized", p, !at.special);
      at.lstrip = c.boolean(a, "lstrip", p, false);
      at.rstrip = c.boolean(a, "rstrip", p, false);
      at.single_word = c.boolean(a, "single_word", p, false);
      t.added_tokens.push_back(std::move(at));
    }
  }
  if (j.contains("normalizer") && !j["normalizer"].is_null())
    t.normalizer = parse_normalizer(c, j["normalizer"], "normalizer");
  if (j.contains("pre_tokenizer") && !j["pre_tokenizer"].is_null())
    t.pre_tokenizer = parse_pre_tokenizer(c, j["pre_tokenizer"], "pre_tokenizer");
  if (j.contains("decoder") && !j["decoder"].is_null()) t.decoder = parse_decoder(c, j["decoder"], "decoder");
  if (j.contains("post_processor") && !j["post_processor"].is_null())
    parse_post_processor(c, j["post_processor"], "post_processor", t.post_processor, t.model);
  return t;
}

TokenizerJson load_tokenizer_json(const std::string& path) { return parse_tokenizer_json(read_text_file(path), path); }

}  // namespace trellm::format
