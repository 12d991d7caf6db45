// The built-in model (models/tiny-glm-3bit, chat fine-tuned in issue 14) greedy on the CPU, on the held-out prompts
// of tests/data/chat/fixtures.json (scripts/make_chat_corpus.py: facts, cities, search words and numbers no training
// conversation uses), its output split by src/runtime/glm_output as the server splits it:
//  - a tool-use conversation gives well-formed tool calls of the tools offered, and the right function first;
//  - where the arguments are numbers taken from the question (the calculator), the exact name and JSON arguments;
//  - thinking on gives non-empty reasoning and content, thinking off no reasoning at all.
// What the model does NOT do (measured, models/tiny-glm/README.md): copy a city or a search word it never saw in
// training into the arguments; it writes one it knows (e.g. "Boston" for Berlin). Those arguments are not asserted.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <set>

#include "model/glm4_moe_lite.h"
#include "runtime/generate.h"
#include "runtime/glm_output.h"
#include "runtime/tokenizer.h"
#include "test_util.h"

using namespace trellm;
using json = nlohmann::ordered_json;

namespace {

const std::string kModel = std::string(TRELLM_MODELS_DIR) + "/tiny-glm-3bit";

struct Fixture {
  std::unique_ptr<Backend> be = make_cpu_backend();
  std::unique_ptr<Model> model = Model::load(kModel, *be);
  Tokenizer tok = Tokenizer::from_file(kModel + "/tokenizer.json");
  json cases = json::parse(trellm::testing::read_file(std::string(TRELLM_TEST_DATA) + "/chat/fixtures.json"));
};
Fixture& fx() {
  static Fixture f;
  return f;
}

struct Reply {
  std::string text;      // decoded, special tokens kept, without the stop token
  int32_t stop = -1;     // the stop id it ended on (-1: the token limit)
  GlmParsed parsed;
};

Reply greedy(const json& c, int max_tokens = 200) {
  Fixture& f = fx();
  const std::vector<int32_t> prompt = c["prompt_ids"].get<std::vector<int32_t>>();
  Generator g(*f.model, int(prompt.size()) + max_tokens + 1);
  GenerateOptions o;
  o.max_tokens = max_tokens;
  o.sampling.temperature = 0;
  std::vector<int32_t> out = g.generate(prompt, o);
  Reply r;
  const auto& eos = f.model->config().eos_token_id;
  if (!out.empty() && std::find(eos.begin(), eos.end(), out.back()) != eos.end()) r.stop = out.back(), out.pop_back();
  r.text = f.tok.decode(out, /*skip_special_tokens=*/false);
  r.parsed = parse_glm_output(r.text, c["enable_thinking"].get<bool>());
  return r;
}

int32_t token_id(const std::string& s) {
  const std::vector<int32_t> ids = fx().tok.encode(s);
  EXPECT_EQ(ids.size(), 1u) << s;
  return ids.empty() ? -1 : ids[0];
}

class ToolCall : public ::testing::TestWithParam<int> {};

TEST_P(ToolCall, WellFormedCallsOfTheOfferedToolsRightFunctionFirst) {
  const json& c = fx().cases["tool_calls"][size_t(GetParam())];
  const Reply r = greedy(c);
  SCOPED_TRACE(c["label"].get<std::string>() + ": " + r.text);
  // The turn ends where GLM hands over to the tool: <|observation|>.
  EXPECT_EQ(r.stop, token_id("<|observation|>"));
  ASSERT_FALSE(r.parsed.tool_calls.empty());
  EXPECT_EQ(r.text.find("<tool_call>", r.text.rfind("</tool_call>") + 1), std::string::npos) << "an unterminated call";
  EXPECT_EQ(r.parsed.content.find("tool_call"), std::string::npos) << "tags leaked into the content";
  std::map<std::string, const json*> tools;
  for (const json& t : c["tools"]) tools[t["function"]["name"].get<std::string>()] = &t["function"]["parameters"];
  for (const GlmEvent& call : r.parsed.tool_calls) {
    ASSERT_TRUE(tools.count(call.name)) << "not an offered tool: " << call.name;
    const json& params = *tools[call.name];
    ASSERT_TRUE(call.arguments.is_object());
    for (auto& [k, v] : call.arguments.items()) EXPECT_TRUE(params["properties"].contains(k)) << call.name << ": " << k;
    for (const json& req : params["required"]) EXPECT_TRUE(call.arguments.contains(req.get<std::string>())) << req;
  }
  EXPECT_EQ(r.parsed.tool_calls[0].name, c["expected_tool_calls"][0]["name"].get<std::string>());
  if (c["enable_thinking"].get<bool>()) EXPECT_FALSE(r.parsed.reasoning.empty());
  else EXPECT_TRUE(r.parsed.reasoning.empty()) << r.parsed.reasoning;
}

INSTANTIATE_TEST_SUITE_P(HeldOut, ToolCall, ::testing::Range(0, 8));

TEST(ToolCallArguments, CalculatorCallsAreExact) {
  int checked = 0;
  for (const json& c : fx().cases["tool_calls"]) {
    if (c["label"].get<std::string>().rfind("tool_calc", 0) != 0) continue;
    const Reply r = greedy(c);
    SCOPED_TRACE(c["label"].get<std::string>() + ": " + r.text);
    ASSERT_EQ(r.parsed.tool_calls.size(), c["expected_tool_calls"].size());
    for (size_t i = 0; i < r.parsed.tool_calls.size(); i++) {
      EXPECT_EQ(r.parsed.tool_calls[i].name, c["expected_tool_calls"][i]["name"].get<std::string>());
      EXPECT_EQ(r.parsed.tool_calls[i].arguments, c["expected_tool_calls"][i]["arguments"]);
    }
    checked++;
  }
  EXPECT_EQ(checked, 2);  // one with thinking on, one off
}

class Thinking : public ::testing::TestWithParam<int> {};

TEST_P(Thinking, OnSplitsIntoReasoningAndContentOffHasNoReasoning) {
  const json& c = fx().cases["thinking"][size_t(GetParam())];
  const Reply r = greedy(c);
  SCOPED_TRACE(c["label"].get<std::string>() + ": " + r.text);
  EXPECT_EQ(r.stop, token_id("<|user|>"));  // the answer ends the turn
  EXPECT_TRUE(r.parsed.tool_calls.empty());
  EXPECT_FALSE(r.parsed.content.empty());
  EXPECT_EQ(r.parsed.content.find("think>"), std::string::npos);
  if (c["expect_reasoning"].get<bool>()) {
    ASSERT_TRUE(c["enable_thinking"].get<bool>());
    EXPECT_FALSE(r.parsed.reasoning.empty());
    EXPECT_NE(r.text.find("</think>"), std::string::npos);
  } else {
    ASSERT_FALSE(c["enable_thinking"].get<bool>());
    EXPECT_TRUE(r.parsed.reasoning.empty()) << r.parsed.reasoning;
    EXPECT_EQ(r.text.find("think>"), std::string::npos);
  }
}

INSTANTIATE_TEST_SUITE_P(HeldOut, Thinking, ::testing::Range(0, 4));

TEST(Fixtures, CountsAreWhatTheTestsIterate) {
  EXPECT_EQ(fx().cases["tool_calls"].size(), 8u);
  EXPECT_EQ(fx().cases["thinking"].size(), 4u);
}

}  // namespace
