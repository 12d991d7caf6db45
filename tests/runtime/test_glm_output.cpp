// GLM output parsing: reasoning / content / tool calls, whole and streamed in every possible chunking.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "format/tokenizer_json.h"
#include "runtime/glm_output.h"

using namespace trellm;
using nlohmann::ordered_json;

namespace {

struct Collected {
  std::string reasoning, content;
  std::vector<std::pair<std::string, ordered_json>> calls;
  std::vector<GlmEvent> deltas;
};

Collected run_chunks(const std::string& text, const std::vector<size_t>& cuts, bool thinking_open) {
  GlmOutputParser p(thinking_open);
  Collected c;
  size_t prev = 0;
  auto take = [&](std::vector<GlmEvent> evs) {
    for (auto& e : evs) {
      if (e.type == GlmEvent::Reasoning) c.reasoning += e.text;
      else if (e.type == GlmEvent::Content) c.content += e.text;
      else c.calls.emplace_back(e.name, e.arguments);
      c.deltas.push_back(e);
    }
  };
  for (size_t cut : cuts) {
    take(p.feed(std::string_view(text).substr(prev, cut - prev)));
    prev = cut;
  }
  take(p.feed(std::string_view(text).substr(prev)));
  take(p.finish());
  return c;
}

const std::string kOutput =
    "Let me check the weather <tool> first.</think>\nI'll look it up.<tool_call>get_weather\n"
    "<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n"
    "<arg_key>opts</arg_key><arg_value>{\"units\": [\"C\"], \"x\": null}</arg_value>\n</tool_call>\n"
    "<tool_call>search<arg_key>query</arg_key><arg_value>a < b and <think> tags</arg_value></tool_call>";

}  // namespace

TEST(GlmOutput, SplitsReasoningContentAndToolCalls) {
  GlmParsed r = parse_glm_output(kOutput, true);
  EXPECT_EQ(r.reasoning, "Let me check the weather <tool> first.");
  EXPECT_EQ(r.content, "I'll look it up.");
  ASSERT_EQ(r.tool_calls.size(), 2u);
  EXPECT_EQ(r.tool_calls[0].name, "get_weather");
  EXPECT_EQ(r.tool_calls[0].arguments.dump(), R"({"city":"Paris","days":3,"opts":{"units":["C"],"x":null}})");
  EXPECT_EQ(r.tool_calls[1].name, "search");
  EXPECT_EQ(r.tool_calls[1].arguments.dump(), R"({"query":"a < b and <think> tags"})");
}

TEST(GlmOutput, EveryTwoChunkSplitAndCharByCharGiveTheSameResult) {
  Collected whole = run_chunks(kOutput, {}, true);
  for (size_t cut = 0; cut <= kOutput.size(); cut++) {
    Collected c = run_chunks(kOutput, {cut}, true);
    ASSERT_EQ(c.reasoning, whole.reasoning) << "cut " << cut;
    ASSERT_EQ(c.content, whole.content) << "cut " << cut;
    ASSERT_EQ(c.calls, whole.calls) << "cut " << cut;
  }
  std::vector<size_t> every;
  for (size_t i = 1; i < kOutput.size(); i++) every.push_back(i);
  Collected c = run_chunks(kOutput, every, true);
  EXPECT_EQ(c.reasoning, whole.reasoning);
  EXPECT_EQ(c.content, whole.content);
  EXPECT_EQ(c.calls, whole.calls);
  // No delta ever carries part of a tag.
  for (const auto& e : c.deltas) {
    if (e.type == GlmEvent::ToolCall) continue;
    EXPECT_EQ(e.text.find("</thi"), std::string::npos) << e.text;
    EXPECT_EQ(e.text.find("<tool_c"), std::string::npos) << e.text;
  }
  EXPECT_GT(c.deltas.size(), 10u);  // it really streamed
}

TEST(GlmOutput, ThinkingOffAndModelOpenedThink) {
  GlmParsed r = parse_glm_output("Plain answer.", false);
  EXPECT_EQ(r.reasoning, "");
  EXPECT_EQ(r.content, "Plain answer.");
  r = parse_glm_output("<think>inner</think>after", false);
  EXPECT_EQ(r.reasoning, "inner");
  EXPECT_EQ(r.content, "after");
  // Generation cut off inside the reasoning: all of it is reasoning.
  r = parse_glm_output("still thinking </thi", true);
  EXPECT_EQ(r.reasoning, "still thinking </thi");
  EXPECT_EQ(r.content, "");
}

TEST(GlmOutput, MalformedOrUnterminatedToolCallsStayText) {
  GlmParsed r = parse_glm_output("x<tool_call><arg_key>k</arg_key></tool_call>y", false);
  EXPECT_TRUE(r.tool_calls.empty());
  EXPECT_EQ(r.content, "x<tool_call><arg_key>k</arg_key></tool_call>y");
  r = parse_glm_output("x<tool_call>f<arg_key>k</arg_key><arg_value>v", false);
  EXPECT_TRUE(r.tool_calls.empty());
  EXPECT_EQ(r.content, "x<tool_call>f<arg_key>k</arg_key><arg_value>v");
}

TEST(GlmOutput, ParsesWhatTheGlmTemplateRendersForToolCalls) {
  // The assistant turn of the GLM-4.x template as jinja2 rendered it (tests/data/templates/expected.json):
  // the parser must recover the calls of the conversation (tests/py/chat_cases.py).
  ordered_json all = ordered_json::parse(format::read_text_file(std::string(TRELLM_TEST_DATA) + "/templates/expected.json"));
  std::string rendered;
  for (const auto& c : all["templates"]["glm4"])
    if (c["label"] == "tool-call-and-result agp=True thinking=None") rendered = c["expected"];
  ASSERT_FALSE(rendered.empty());
  size_t a = rendered.find("<|assistant|>");
  size_t b = rendered.find("<|observation|>");
  ASSERT_NE(a, std::string::npos);
  ASSERT_NE(b, std::string::npos);
  GlmParsed r = parse_glm_output(rendered.substr(a + 13, b - a - 13), true);
  ASSERT_EQ(r.tool_calls.size(), 2u);
  EXPECT_EQ(r.tool_calls[0].name, "get_weather");
  EXPECT_EQ(r.tool_calls[0].arguments.dump(), R"({"city":"Paris","unit":"celsius"})");
  EXPECT_EQ(r.tool_calls[1].arguments.dump(), "{\"city\":\"東京\"}");
  EXPECT_EQ(r.content, "");
  EXPECT_EQ(r.reasoning, "");
}
