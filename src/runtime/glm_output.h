// Incremental parser of GLM-4.x generated text (after detokenization): splits reasoning (<think>…</think>)
// from content and turns <tool_call>NAME<arg_key>K</arg_key><arg_value>V</arg_value>…</tool_call> blocks into
// a name and JSON arguments, so a server can stream both. Text is never emitted while it could still be the
// start of a tag: a partial tag at the end of a chunk waits for the next chunk.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace trellm {

struct GlmEvent {
  enum Type { Reasoning, Content, ToolCall } type;
  std::string text;                   // Reasoning / Content delta
  std::string name;                   // ToolCall
  nlohmann::ordered_json arguments;   // ToolCall: object; a value that parses as JSON stays JSON, else a string
};

class GlmOutputParser {
 public:
  // thinking_open: the prompt's generation prompt ended with <think> (GLM-4.7's default with thinking on), so
  // the output starts inside the reasoning. With enable_thinking=false the prompt ends with </think>: pass false.
  explicit GlmOutputParser(bool thinking_open = true) : state_(thinking_open ? State::Reasoning : State::Content) {}
  // Feeds a chunk of generated text; returns the events it completes (adjacent deltas of one kind merged).
  std::vector<GlmEvent> feed(std::string_view chunk);
  // End of generation: flushes held-back text. An unterminated tool call is returned as content, unparsed.
  std::vector<GlmEvent> finish();

 private:
  enum class State { Reasoning, Content, ToolCall };
  State state_;
  std::string buf_;
  void emit(std::vector<GlmEvent>& out, GlmEvent::Type t, std::string_view text);
};

// Parses a complete tool-call body (between <tool_call> and </tool_call>). Returns false if it is malformed.
bool parse_glm_tool_call(std::string_view body, std::string& name, nlohmann::ordered_json& arguments);

// Whole-output convenience: reasoning and content with surrounding whitespace trimmed, plus the tool calls.
struct GlmParsed {
  std::string reasoning, content;
  std::vector<GlmEvent> tool_calls;
};
GlmParsed parse_glm_output(std::string_view text, bool thinking_open = true);

}  // namespace trellm
