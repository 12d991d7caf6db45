#include "runtime/glm_output.h"

namespace trellm {
namespace {

constexpr std::string_view kThinkOpen = "<think>", kThinkClose = "</think>";
constexpr std::string_view kCallOpen = "<tool_call>", kCallClose = "</tool_call>";
constexpr std::string_view kKeyOpen = "<arg_key>", kKeyClose = "</arg_key>";
constexpr std::string_view kValOpen = "<arg_value>", kValClose = "</arg_value>";

// Length of the longest suffix of `s` that is a proper prefix of one of `tags` (text to hold back).
size_t partial_tag_suffix(std::string_view s, std::initializer_list<std::string_view> tags) {
  size_t best = 0;
  for (std::string_view tag : tags)
    for (size_t k = std::min(s.size(), tag.size() - 1); k > best; k--)
      if (s.substr(s.size() - k) == tag.substr(0, k)) { best = k; break; }
  return best;
}

bool is_ws(char c) { return c == ' ' || c == '\n' || c == '\r' || c == '\t'; }
std::string_view trim(std::string_view s) {
  while (!s.empty() && is_ws(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_ws(s.back())) s.remove_suffix(1);
  return s;
}

}  // namespace

bool parse_glm_tool_call(std::string_view body, std::string& name, nlohmann::ordered_json& arguments) {
  size_t k = body.find(kKeyOpen);
  name = std::string(trim(body.substr(0, k)));
  if (name.empty() || name.find('<') != std::string::npos) return false;
  arguments = nlohmann::ordered_json::object();
  while (k != std::string_view::npos) {
    size_t ke = body.find(kKeyClose, k);
    if (ke == std::string_view::npos) return false;
    std::string key(trim(body.substr(k + kKeyOpen.size(), ke - k - kKeyOpen.size())));
    size_t v = body.find(kValOpen, ke);
    if (v == std::string_view::npos || !trim(body.substr(ke + kKeyClose.size(), v - ke - kKeyClose.size())).empty())
      return false;
    size_t ve = body.find(kValClose, v);
    if (ve == std::string_view::npos) return false;
    std::string_view raw = body.substr(v + kValOpen.size(), ve - v - kValOpen.size());
    // The template writes strings raw and everything else with tojson: JSON that parses is taken as JSON.
    auto parsed = nlohmann::ordered_json::parse(raw, nullptr, false);
    arguments[key] = parsed.is_discarded() ? nlohmann::ordered_json(std::string(raw)) : parsed;
    k = body.find(kKeyOpen, ve);
    if (!trim(body.substr(ve + kValClose.size(), (k == std::string_view::npos ? body.size() : k) - ve - kValClose.size())).empty())
      return false;
  }
  return true;
}

void GlmOutputParser::emit(std::vector<GlmEvent>& out, GlmEvent::Type t, std::string_view text) {
  if (text.empty()) return;
  if (!out.empty() && out.back().type == t && t != GlmEvent::ToolCall) {
    out.back().text += text;
    return;
  }
  out.push_back(GlmEvent{t, std::string(text), {}, {}});
}

std::vector<GlmEvent> GlmOutputParser::feed(std::string_view chunk) {
  buf_ += chunk;
  std::vector<GlmEvent> out;
  for (;;) {
    std::string_view b = buf_;
    if (state_ == State::Reasoning) {
      size_t p = b.find(kThinkClose);
      if (p == std::string_view::npos) {
        size_t hold = partial_tag_suffix(b, {kThinkClose});
        emit(out, GlmEvent::Reasoning, b.substr(0, b.size() - hold));
        buf_.erase(0, b.size() - hold);
        return out;
      }
      emit(out, GlmEvent::Reasoning, b.substr(0, p));
      buf_.erase(0, p + kThinkClose.size());
      state_ = State::Content;
    } else if (state_ == State::Content) {
      size_t t = b.find(kThinkOpen), c = b.find(kCallOpen);
      size_t p = std::min(t, c);
      if (p == std::string_view::npos) {
        size_t hold = partial_tag_suffix(b, {kThinkOpen, kCallOpen});
        emit(out, GlmEvent::Content, b.substr(0, b.size() - hold));
        buf_.erase(0, b.size() - hold);
        return out;
      }
      emit(out, GlmEvent::Content, b.substr(0, p));
      if (p == t) {
        buf_.erase(0, p + kThinkOpen.size());
        state_ = State::Reasoning;
      } else {
        buf_.erase(0, p);  // keep "<tool_call>" so an unterminated call can be returned verbatim
        state_ = State::ToolCall;
      }
    } else {
      size_t e = b.find(kCallClose);
      if (e == std::string_view::npos) return out;
      std::string_view body = b.substr(kCallOpen.size(), e - kCallOpen.size());
      GlmEvent ev{GlmEvent::ToolCall, {}, {}, {}};
      if (parse_glm_tool_call(body, ev.name, ev.arguments)) out.push_back(std::move(ev));
      else emit(out, GlmEvent::Content, b.substr(0, e + kCallClose.size()));  // malformed: keep the text
      buf_.erase(0, e + kCallClose.size());
      state_ = State::Content;
    }
  }
}

std::vector<GlmEvent> GlmOutputParser::finish() {
  std::vector<GlmEvent> out;
  emit(out, state_ == State::Reasoning ? GlmEvent::Reasoning : GlmEvent::Content, buf_);
  buf_.clear();
  return out;
}

GlmParsed parse_glm_output(std::string_view text, bool thinking_open) {
  GlmOutputParser p(thinking_open);
  std::vector<GlmEvent> evs = p.feed(text);
  for (auto& e : p.finish()) evs.push_back(std::move(e));
  GlmParsed r;
  for (auto& e : evs) {
    if (e.type == GlmEvent::Reasoning) r.reasoning += e.text;
    else if (e.type == GlmEvent::Content) r.content += e.text;
    else r.tool_calls.push_back(std::move(e));
  }
  r.reasoning = std::string(trim(r.reasoning));
  r.content = std::string(trim(r.content));
  return r;
}

}  // namespace trellm
