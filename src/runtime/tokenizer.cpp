#include "runtime/tokenizer.h"

#include <algorithm>
#include <functional>
#include <unordered_map>

#include "core/error.h"
#include "runtime/bpe.h"
#include "runtime/regex.h"
#include "runtime/unicode.h"
#include "runtime/unicode_nfc.h"

namespace trellm {

using format::SplitBehavior;

namespace {

// GPT-2's pre-split pattern, used by the ByteLevel pre-tokenizer when use_regex is true.
const char* const kGpt2Pattern = R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// Leftmost-longest matcher over the added tokens' bytes (HF uses Aho-Corasick with LeftmostLongest).
class AddedTokenMatcher {
 public:
  void add(std::string_view s, int index) {
    int node = 0;
    for (unsigned char c : s) {
      uint32_t key = uint32_t(node) << 8 | c;
      auto it = edges_.find(key);
      if (it == edges_.end()) {
        terminal_.push_back(-1);
        it = edges_.emplace(key, int(terminal_.size()) - 1).first;
      }
      node = it->second;
    }
    terminal_[size_t(node)] = index;
    first_[(unsigned char)s[0]] = true;
  }
  bool empty() const { return edges_.empty(); }
  // Finds the leftmost match at or after `from`: returns the token index and sets [begin, end), or -1.
  int find(std::string_view text, size_t from, size_t& begin, size_t& end) const {
    for (size_t i = from; i < text.size(); i++) {
      if (!first_[(unsigned char)text[i]]) continue;
      int node = 0, best = -1;
      size_t best_end = 0;
      for (size_t k = i; k < text.size(); k++) {
        auto it = edges_.find(uint32_t(node) << 8 | (unsigned char)text[k]);
        if (it == edges_.end()) break;
        node = it->second;
        if (terminal_[size_t(node)] >= 0) { best = terminal_[size_t(node)]; best_end = k + 1; }
      }
      if (best >= 0) { begin = i; end = best_end; return best; }
    }
    return -1;
  }

 private:
  std::unordered_map<uint32_t, int> edges_;  // (node << 8 | byte) -> child node
  std::vector<int> terminal_{-1};            // node -> added-token index or -1
  bool first_[256] = {};
};

struct Normalizer {
  std::string type;
  std::vector<Normalizer> children;
  std::string prepend, pattern, content;
  std::unique_ptr<Regex> regex;
  bool strip_left = false, strip_right = false;
};

struct PreStage {
  enum Kind { Split, ByteLevelRegex, PrefixSpace } kind;
  std::unique_ptr<Regex> regex;  // Split (regex) or ByteLevel's GPT-2 pattern
  std::string literal;           // Split on a literal string
  SplitBehavior behavior = SplitBehavior::Isolated;
  bool invert = false;
};

bool word_char_at_edge(std::string_view s, bool at_end) {
  // HF's single_word test is the Unicode regex \w (Rust regex: Alphabetic, marks, Nd, Pc, joiners) on the
  // character next to the match.
  static const Regex word(R"([\p{L}\p{Nl}\p{M}\p{Nd}\p{Pc}\x{200C}\x{200D}])", "single_word pattern");
  if (s.empty()) return false;
  size_t i = 0;
  if (at_end) {
    size_t k = s.size() - 1;
    while (k > 0 && (uint8_t(s[k]) & 0xC0) == 0x80) k--;
    i = k;
  }
  size_t j = i;
  utf8_next(s, j);
  size_t b, e;
  return word.find(s.substr(i, j - i), 0, b, e);
}

}  // namespace

struct Tokenizer::Impl {
  std::string source;
  std::vector<format::AddedToken> added;
  AddedTokenMatcher raw_matcher, normalized_matcher;  // tokens with normalized = false / true
  std::optional<Normalizer> normalizer;
  std::vector<PreStage> stages;
  std::unique_ptr<BpeModel> bpe;
  std::vector<int32_t> prefix_ids, suffix_ids;
  bool byte_level_decoder = false;
  std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>> token_ids;  // token text -> id
  std::vector<std::string> id_tokens;   // id -> token text
  std::vector<std::string> id_bytes;    // id -> decoded bytes
  std::vector<uint8_t> id_flags;        // 1: exists, 2: special
  int32_t vocab_size = 0;

  void build_normalizer(Normalizer& out, const format::NormalizerSpec& spec, const std::string& path) {
    out.type = spec.type;
    out.prepend = spec.prepend;
    out.content = spec.content;
    out.strip_left = spec.strip_left;
    out.strip_right = spec.strip_right;
    if (spec.type == "Replace") {
      if (spec.pattern_is_regex) out.regex = std::make_unique<Regex>(spec.pattern, source + ": " + path + ".pattern");
      else out.pattern = spec.pattern;
    }
    for (size_t i = 0; i < spec.children.size(); i++) {
      out.children.emplace_back();
      build_normalizer(out.children.back(), spec.children[i], str_cat(path, ".normalizers[", i, "]"));
    }
  }

  void normalize(const Normalizer& n, std::string& s) const {
    if (n.type == "Sequence") {
      for (const auto& c : n.children) normalize(c, s);
    } else if (n.type == "NFC") {
      if (!nfc_quick_check(s)) s = nfc_normalize(s);
    } else if (n.type == "Prepend") {
      if (!s.empty()) s.insert(0, n.prepend);
    } else if (n.type == "Replace") {
      std::string r;
      size_t pos = 0, b, e;
      while (pos <= s.size()) {
        bool found;
        if (n.regex) {
          found = n.regex->find(s, pos, b, e);
        } else {
          b = n.pattern.empty() ? std::string::npos : s.find(n.pattern, pos);
          found = b != std::string::npos;
          e = found ? b + n.pattern.size() : 0;
        }
        if (!found || e == b) break;
        r.append(s, pos, b - pos);
        r += n.content;
        pos = e;
      }
      if (pos < s.size()) r.append(s, pos, std::string::npos);
      s = std::move(r);
    } else if (n.type == "Strip") {
      size_t b = 0, e = s.size();
      if (n.strip_left) {
        while (b < e) { size_t k = b; if (!is_unicode_whitespace(utf8_next(s, k))) break; b = k; }
      }
      if (n.strip_right) {
        while (e > b) {
          size_t k = e - 1;
          while (k > b && (uint8_t(s[k]) & 0xC0) == 0x80) k--;
          size_t k2 = k;
          if (!is_unicode_whitespace(utf8_next(s, k2))) break;
          e = k;
        }
      }
      s = s.substr(b, e - b);
    } else {
      TRELLM_ASSERT(false, "normalizer type ", n.type, " was not rejected at load");
    }
  }

  void build_stages(const format::PreTokenizerSpec& p, const std::string& path, bool& byte_level_seen) {
    if (p.type == "Sequence") {
      // Nested sequences apply their members in order to every piece: the same as one flat list.
      for (size_t i = 0; i < p.children.size(); i++)
        build_stages(p.children[i], str_cat(path, ".pretokenizers[", i, "]"), byte_level_seen);
      return;
    }
    if (byte_level_seen)
      fail(source, ": ", path, ": a pre-tokenizer after ByteLevel is not supported (ByteLevel must be last)");
    PreStage st;
    if (p.type == "Split") {
      st.kind = PreStage::Split;
      if (p.pattern_is_regex) st.regex = std::make_unique<Regex>(p.pattern, source + ": " + path + ".pattern");
      else st.literal = p.pattern;
      st.behavior = p.behavior;
      st.invert = p.invert;
      stages.push_back(std::move(st));
    } else if (p.type == "Digits") {
      // HF splits on char::is_numeric (categories Nd, Nl, No): single digits isolated, or runs contiguous.
      st.kind = PreStage::Split;
      st.regex = std::make_unique<Regex>(p.individual_digits ? "\\p{N}" : "\\p{N}+", source + ": " + path);
      st.behavior = SplitBehavior::Isolated;
      stages.push_back(std::move(st));
    } else if (p.type == "ByteLevel") {
      byte_level_seen = true;
      if (p.add_prefix_space) stages.push_back(PreStage{PreStage::PrefixSpace, nullptr, {}, {}, false});
      if (p.use_regex) {
        stages.push_back(PreStage{PreStage::ByteLevelRegex,
                                  std::make_unique<Regex>(kGpt2Pattern, "GPT-2 pre-split pattern"), {}, {}, false});
      }
    } else {
      TRELLM_ASSERT(false, "pre-tokenizer type ", p.type, " was not rejected at load");
    }
  }

  // Splits `piece` with stage `si` and hands every resulting piece to the next stage; past the last stage,
  // pieces go to the BPE model.
  struct Segment { size_t b, e; bool match; };
  void run_stages(size_t si, std::string_view piece, std::vector<int32_t>& out,
                  std::vector<std::vector<Segment>>& scratch) const {
    if (piece.empty()) return;
    if (si == stages.size()) {
      bpe->encode_piece(piece, out);
      return;
    }
    const PreStage& st = stages[si];
    if (st.kind == PreStage::PrefixSpace) {
      if (piece[0] == ' ') return run_stages(si + 1, piece, out, scratch);
      std::string with_space;
      with_space.reserve(piece.size() + 1);
      with_space.push_back(' ');
      with_space.append(piece);
      return run_stages(si + 1, with_space, out, scratch);
    }
    // Matches and the gaps between them, in order, covering the whole piece. Empty matches count (they
    // split), but not one right where the previous match ended: that is how the Oniguruma iterator HF uses
    // steps past them.
    std::vector<Segment>& segs = scratch[si];
    segs.clear();
    size_t pos = 0, search = 0, b, e;
    bool have_last = false;
    while (search <= piece.size()) {
      bool found;
      if (st.regex) {
        found = st.regex->find(piece, search, b, e);
      } else {
        b = piece.find(st.literal, search);
        found = b != std::string::npos;
        e = found ? b + st.literal.size() : 0;
      }
      if (!found) break;
      if (e == b && have_last && e == pos) {
        if (search >= piece.size()) break;
        utf8_next(piece, search);
        continue;
      }
      if (b > pos) segs.push_back({pos, b, false});
      segs.push_back({b, e, true});
      pos = search = e;
      have_last = true;
    }
    if (pos < piece.size()) segs.push_back({pos, piece.size(), false});
    if (st.invert)
      for (auto& s : segs) s.match = !s.match;

    auto emit = [&](size_t sb, size_t se) {
      if (se > sb) run_stages(si + 1, piece.substr(sb, se - sb), out, scratch);
    };
    SplitBehavior behavior = st.kind == PreStage::ByteLevelRegex ? SplitBehavior::Isolated : st.behavior;
    // emit() recurses into later stages only, which use scratch[si + 1 ...]: segs stays valid meanwhile.
    const std::vector<Segment>& local = segs;
    switch (behavior) {
      case SplitBehavior::Isolated:
        for (const auto& s : local) emit(s.b, s.e);
        break;
      case SplitBehavior::Removed:
        for (const auto& s : local) if (!s.match) emit(s.b, s.e);
        break;
      case SplitBehavior::Contiguous: {
        size_t cb = 0, ce = 0;
        bool have = false, prev = false;
        for (const auto& s : local) {
          if (have && s.match == prev) { ce = s.e; }
          else { if (have) emit(cb, ce); cb = s.b; ce = s.e; have = true; }
          prev = s.match;
        }
        if (have) emit(cb, ce);
        break;
      }
      case SplitBehavior::MergedWithPrevious: {
        size_t cb = 0, ce = 0;
        bool have = false, prev = false;
        for (const auto& s : local) {
          if (s.match && !prev && have) { ce = s.e; }
          else { if (have) emit(cb, ce); cb = s.b; ce = s.e; have = true; }
          prev = s.match;
        }
        if (have) emit(cb, ce);
        break;
      }
      case SplitBehavior::MergedWithNext: {
        // HF folds from the right: a match joins the piece after it unless the previous (to the right) was a match.
        std::vector<std::pair<size_t, size_t>> acc;
        bool prev = false;
        for (auto it = local.rbegin(); it != local.rend(); ++it) {
          if (it->match && !prev && !acc.empty()) acc.back().first = it->b;
          else acc.emplace_back(it->b, it->e);
          prev = it->match;
        }
        for (auto it = acc.rbegin(); it != acc.rend(); ++it) emit(it->first, it->second);
        break;
      }
    }
  }

  // Splits out added tokens of `m`, handing the text between them to `rest`.
  template <typename Rest>
  void split_added(const AddedTokenMatcher& m, std::string_view text, std::vector<int32_t>& out, Rest&& rest) const {
    if (m.empty()) return rest(text);
    size_t start_offset = 0, from = 0, b, e;
    while (from < text.size()) {
      int idx = m.find(text, from, b, e);
      if (idx < 0) break;
      from = e;  // the next search starts after this match even if it is rejected (as Aho-Corasick's iterator)
      const auto& tok = added[size_t(idx)];
      if (tok.single_word) {
        bool start_ok = b == 0 || !word_char_at_edge(text.substr(0, b), true);
        bool stop_ok = e == text.size() || !word_char_at_edge(text.substr(e), false);
        if (!start_ok || !stop_ok) continue;
      }
      if (tok.lstrip) {
        size_t nb = b;
        while (nb > 0) {
          size_t k = nb - 1;
          while (k > 0 && (uint8_t(text[k]) & 0xC0) == 0x80) k--;
          size_t k2 = k;
          if (!is_unicode_whitespace(utf8_next(text, k2))) break;
          nb = k;
        }
        b = std::max(nb, start_offset);
      }
      if (tok.rstrip) {
        while (e < text.size()) {
          size_t k = e;
          if (!is_unicode_whitespace(utf8_next(text, k))) break;
          e = k;
        }
        from = std::max(from, e);
      }
      if (start_offset < b) rest(text.substr(start_offset, b - start_offset));
      out.push_back(tok.id);
      start_offset = e;
    }
    if (start_offset < text.size()) rest(text.substr(start_offset));
  }
};

Tokenizer::Tokenizer(const format::TokenizerJson& spec) : impl_(std::make_unique<Impl>()) {
  Impl& m = *impl_;
  m.source = spec.source;
  const auto& model = spec.model;
  if (!spec.pre_tokenizer)
    fail(spec.source, ": pre_tokenizer: missing; trellm implements byte-level BPE, which needs a ByteLevel pre-tokenizer");
  bool byte_level = false;
  m.build_stages(*spec.pre_tokenizer, "pre_tokenizer", byte_level);
  if (!byte_level)
    fail(spec.source, ": pre_tokenizer: no ByteLevel pre-tokenizer; trellm implements byte-level BPE only");
  if (!model.continuing_subword_prefix.empty() || !model.end_of_word_suffix.empty())
    fail(spec.source, ": model: continuing_subword_prefix/end_of_word_suffix are not supported with byte-level BPE");
  if (spec.normalizer) {
    m.normalizer.emplace();
    m.build_normalizer(*m.normalizer, *spec.normalizer, "normalizer");
  }
  m.byte_level_decoder = spec.decoder.has_value();

  // Added tokens get their ids the way HF's AddedVocabulary assigns them (the ids written in the file are only
  // checked by HF, with a warning): a token already in the model vocabulary takes that id, any other the next
  // id after the vocabulary and the added tokens so far. Real files agree with their written ids.
  m.added = spec.added_tokens;
  {
    const int64_t model_len = int64_t(model.vocab.size());
    std::unordered_map<std::string, int32_t> added_ids;
    int64_t max_added = -1;
    for (auto& a : m.added) {
      int32_t id;
      if (auto it = added_ids.find(a.content); it != added_ids.end()) id = it->second;
      else if (auto mv = model.vocab.find(a.content); mv != model.vocab.end()) id = mv->second;
      else id = int32_t(max_added < 0 ? model_len : (max_added >= model_len ? max_added + 1 : model_len));
      a.id = id;
      added_ids[a.content] = id;
      max_added = std::max<int64_t>(max_added, id);
    }
  }

  // Vocabulary, both directions.
  int32_t max_id = -1;
  for (const auto& [tok, id] : model.vocab) max_id = std::max(max_id, id);
  for (const auto& a : m.added) max_id = std::max(max_id, a.id);
  m.vocab_size = max_id + 1;
  m.id_tokens.assign(size_t(m.vocab_size), {});
  m.id_flags.assign(size_t(m.vocab_size), 0);
  m.token_ids.reserve(model.vocab.size() + m.added.size());
  for (const auto& [tok, id] : model.vocab) {
    m.id_tokens[size_t(id)] = tok;
    m.id_flags[size_t(id)] = 1;
    m.token_ids[tok] = id;
  }
  for (const auto& a : m.added) {
    m.id_tokens[size_t(a.id)] = a.content;
    m.id_flags[size_t(a.id)] = a.special ? 3 : 1;
    m.token_ids[a.content] = a.id;
  }
  // Decoded bytes per id: a token whose every character is in the byte map decodes to those bytes, any other
  // token to its own UTF-8 text (HF's ByteLevel decoder does this per token).
  const ByteLevelMap& bl = byte_level_map();
  m.id_bytes.assign(size_t(m.vocab_size), {});
  std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>> bytes_vocab;
  for (int32_t id = 0; id < m.vocab_size; id++) {
    const std::string& t = m.id_tokens[size_t(id)];
    std::string bytes;
    bool all_mapped = true;
    for (size_t i = 0; i < t.size();) {
      uint32_t cp = utf8_next(t, i);
      if (cp >= bl.cp_to_byte.size() || bl.cp_to_byte[cp] < 0) { all_mapped = false; break; }
      bytes.push_back(char(bl.cp_to_byte[cp]));
    }
    m.id_bytes[size_t(id)] = all_mapped ? bytes : t;
  }
  for (const auto& [tok, id] : model.vocab) {
    const std::string& t = tok;
    std::string bytes;
    bool all_mapped = true;
    for (size_t i = 0; i < t.size();) {
      uint32_t cp = utf8_next(t, i);
      if (cp >= bl.cp_to_byte.size() || bl.cp_to_byte[cp] < 0) { all_mapped = false; break; }
      bytes.push_back(char(bl.cp_to_byte[cp]));
    }
    if (all_mapped) bytes_vocab.emplace(std::move(bytes), id);
  }
  std::vector<int32_t> byte_ids(256, -1);
  for (int b = 0; b < 256; b++) {
    auto it = model.vocab.find(bl.byte_to_utf8[size_t(b)]);
    if (it != model.vocab.end()) byte_ids[size_t(b)] = it->second;
  }
  MergeMap merges;
  merges.reserve(model.merges.size());
  for (size_t r = 0; r < model.merges.size(); r++) {
    const auto& [a, b] = model.merges[r];
    auto ia = model.vocab.find(a), ib = model.vocab.find(b), in = model.vocab.find(a + b);
    if (ia == model.vocab.end() || ib == model.vocab.end() || in == model.vocab.end())
      fail(spec.source, ": model.merges[", r, "]: \"",
           ia == model.vocab.end() ? a : ib == model.vocab.end() ? b : a + b, "\" is not in the vocabulary");
    merges.insert(ia->second, ib->second, int32_t(r), in->second);
  }
  int32_t unk_id = -1;
  if (model.unk_token) {
    auto it = model.vocab.find(*model.unk_token);
    if (it == model.vocab.end()) fail(spec.source, ": model.unk_token \"", *model.unk_token, "\" is not in the vocabulary");
    unk_id = it->second;
  }
  m.bpe = std::make_unique<BpeModel>(std::move(byte_ids), std::move(merges), std::move(bytes_vocab),
                                     model.ignore_merges, unk_id, model.fuse_unk);

  // Added tokens: normalized ones are matched in normalized text, so their content is normalized too.
  for (size_t i = 0; i < m.added.size(); i++) {
    const auto& a = m.added[i];
    if (a.normalized) {
      std::string content = a.content;
      if (m.normalizer) m.normalize(*m.normalizer, content);
      if (!content.empty()) m.normalized_matcher.add(content, int(i));
    } else {
      m.raw_matcher.add(a.content, int(i));
    }
  }
  for (int32_t id : spec.post_processor.prefix_ids)
    if (id < 0 || id >= m.vocab_size) fail(spec.source, ": post_processor: special token id ", id, " is out of range");
  for (int32_t id : spec.post_processor.suffix_ids)
    if (id < 0 || id >= m.vocab_size) fail(spec.source, ": post_processor: special token id ", id, " is out of range");
  m.prefix_ids = spec.post_processor.prefix_ids;
  m.suffix_ids = spec.post_processor.suffix_ids;
}

Tokenizer Tokenizer::from_file(const std::string& path) { return Tokenizer(format::load_tokenizer_json(path)); }
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  const Impl& m = *impl_;
  size_t bad = utf8_find_invalid(text);
  if (bad != std::string_view::npos) fail("tokenizer input: invalid UTF-8 at byte ", bad);
  std::vector<int32_t> out;
  out.reserve(text.size() / 3 + 4);
  if (add_special_tokens) out.insert(out.end(), m.prefix_ids.begin(), m.prefix_ids.end());
  std::vector<std::vector<Impl::Segment>> scratch(m.stages.size());
  auto pre_tokenize = [&](std::string_view piece) { m.run_stages(0, piece, out, scratch); };
  m.split_added(m.raw_matcher, text, out, [&](std::string_view piece) {
    if (!m.normalizer) return m.split_added(m.normalized_matcher, piece, out, pre_tokenize);
    std::string normalized(piece);
    m.normalize(*m.normalizer, normalized);
    m.split_added(m.normalized_matcher, normalized, out, pre_tokenize);
  });
  if (add_special_tokens) out.insert(out.end(), m.suffix_ids.begin(), m.suffix_ids.end());
  return out;
}

bool Tokenizer::token_bytes(int32_t id, std::string& out) const {
  const Impl& m = *impl_;
  if (id < 0 || id >= m.vocab_size || !(m.id_flags[size_t(id)] & 1)) return false;
  out += m.byte_level_decoder ? m.id_bytes[size_t(id)] : m.id_tokens[size_t(id)];
  return true;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  const Impl& m = *impl_;
  std::string bytes;
  bool first = true;
  for (int32_t id : ids) {
    if (skip_special_tokens && is_special(id)) continue;
    if (!m.byte_level_decoder && !first) bytes.push_back(' ');  // no decoder: HF joins tokens with spaces
    if (token_bytes(id, bytes)) first = false;
  }
  return utf8_lossy(bytes);
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  auto it = impl_->token_ids.find(token);
  if (it == impl_->token_ids.end()) return std::nullopt;
  return it->second;
}

std::optional<std::string> Tokenizer::id_to_token(int32_t id) const {
  if (id < 0 || id >= impl_->vocab_size || !(impl_->id_flags[size_t(id)] & 1)) return std::nullopt;
  return impl_->id_tokens[size_t(id)];
}

bool Tokenizer::is_special(int32_t id) const {
  return id >= 0 && id < impl_->vocab_size && (impl_->id_flags[size_t(id)] & 2);
}

int32_t Tokenizer::vocab_size() const { return impl_->vocab_size; }
const std::vector<format::AddedToken>& Tokenizer::added_tokens() const { return impl_->added; }

std::string StreamDecoder::push(int32_t id) {
  if (skip_special_ && tok_->is_special(id)) return {};
  tok_->token_bytes(id, pending_);
  // Emit everything up to a trailing sequence that more bytes could still complete.
  size_t i = 0, settled = 0;
  while (i < pending_.size()) {
    if (uint8_t(pending_[i]) < 0x80) { i++; settled = i; continue; }
    int n = utf8_sequence_length(std::string_view(pending_).substr(i));
    if (n == -1) break;
    if (n > 0) { i += size_t(n); settled = i; continue; }
    // Ill-formed: its maximal subpart is final once a byte that breaks it has arrived, which it has.
    size_t k = 1;
    while (i + k < pending_.size() && k < 4 &&
           utf8_sequence_length(std::string_view(pending_).substr(i, k + 1)) == -1)
      k++;
    i += k;
    settled = i;
  }
  std::string out = utf8_lossy(std::string_view(pending_).substr(0, settled));
  pending_.erase(0, settled);
  return out;
}

std::string StreamDecoder::finish() {
  std::string out = utf8_lossy(pending_);
  pending_.clear();
  return out;
}

}  // namespace trellm
