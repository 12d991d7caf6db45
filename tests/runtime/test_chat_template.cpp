// Chat template tests. Expected renders come from jinja2 configured like transformers
// (tests/data/templates/expected.json, made by scripts/make_template_fixtures.py), not from trellm.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "format/tokenizer_json.h"
#include "runtime/chat_template.h"

using namespace trellm;
using nlohmann::ordered_json;

namespace {

std::string render_error(const std::string& source, const ordered_json& messages = ordered_json::array()) {
  try {
    ChatTemplate t(source, "t.jinja");
    t.render(messages, nullptr, true);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

class JinjaParity : public ::testing::TestWithParam<std::string> {};

TEST_P(JinjaParity, RendersLikeJinja2) {
  const std::string name = GetParam();
  ordered_json all = ordered_json::parse(format::read_text_file(std::string(TRELLM_TEST_DATA) + "/templates/expected.json"));
  const auto& cases = all["templates"][name];
  ASSERT_GE(cases.size(), 2u);
  // The real models' templates are read the way the engine reads them: from the model folder.
  ChatTemplate tpl = (name == "glm4" || name == "features")
                         ? ChatTemplate(format::read_text_file(std::string(TRELLM_TEST_DATA) + "/templates/" + name + ".jinja"), name)
                         : ChatTemplate::from_model_dir(std::string(TRELLM_TOKENIZER_DIR) + "/" + name);
  for (const auto& c : cases) {
    ChatTemplate t = tpl;
    if (c.contains("bos_token")) t.bos_token = c["bos_token"].get<std::string>();
    if (c.contains("eos_token")) t.eos_token = c["eos_token"].get<std::string>();
    std::string got = t.render(c["messages"], c["tools"], c["add_generation_prompt"].get<bool>(), c["extra"]);
    EXPECT_EQ(got, c["expected"].get<std::string>()) << name << ": " << c["label"].get<std::string>();
  }
}

INSTANTIATE_TEST_SUITE_P(Templates, JinjaParity, ::testing::Values("glm4", "qwen3", "deepseek-v3", "features"),
                         [](const auto& info) {
                           std::string s = info.param;
                           for (auto& ch : s) if (ch == '-') ch = '_';
                           return s;
                         });

TEST(ChatTemplate, DeepSeekBosAndEosComeFromTokenizerConfig) {
  ChatTemplate t = ChatTemplate::from_model_dir(std::string(TRELLM_TOKENIZER_DIR) + "/deepseek-v3");
  ASSERT_TRUE(t.bos_token.has_value());
  EXPECT_EQ(*t.bos_token, "<｜begin▁of▁sentence｜>");
  std::string s = t.render(ordered_json::parse(R"([{"role":"user","content":"hi"}])"), nullptr, true);
  EXPECT_EQ(s, "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>");
}

TEST(ChatTemplateErrors, SyntaxErrorsNameLineAndColumn) {
  EXPECT_EQ(render_error("Hello {{ x + }}"), "t.jinja:1:14: expected an expression, got '}}'");
  EXPECT_EQ(render_error("line one\n  {% if x %}\nabc"),
            "t.jinja:3:4: unexpected end of template, expected '{% endif %}'");
  EXPECT_EQ(render_error("a\nb {% endfor %}"), "t.jinja:2:3: unexpected '{% endfor %}'");
  EXPECT_EQ(render_error("{{ 'abc }}"), "t.jinja:1:4: unterminated string literal");
  EXPECT_EQ(render_error("ok\n{{ x"), "t.jinja:2:1: unclosed '{{'");
  EXPECT_EQ(render_error("{% for in xs %}{% endfor %}"), "t.jinja:1:11: expected 'in', got 'xs'");
  EXPECT_EQ(render_error("{% include 'x' %}"), "t.jinja:1:1: unsupported tag 'include'");
  EXPECT_EQ(render_error("{{ a ? b }}"), "t.jinja:1:6: unexpected character '?'");
}

TEST(ChatTemplateErrors, RenderErrorsNameLineAndColumn) {
  EXPECT_EQ(render_error("\n\n  {{ messages|nosuch }}"), "t.jinja:3:14: unknown filter 'nosuch'");
  EXPECT_EQ(render_error("{% if true %}\n{{ raise_exception('Only user and assistant roles') }}{% endif %}"),
            "t.jinja:2:4: raise_exception: Only user and assistant roles");
  EXPECT_EQ(render_error("{{ 'a' + 1 }}"), "t.jinja:1:8: unsupported operand type(s) for +: 'str' and 'int'");
  EXPECT_EQ(render_error("{{ foo.bar }}"), "t.jinja:1:7: 'foo' is undefined");
  EXPECT_EQ(render_error("{% for m in 3 %}{% endfor %}"), "t.jinja:1:1: 'int' object is not iterable");
}

// Hostile templates found while fuzzing (tests/fuzz/fuzz_jinja; reproducers in tests/data/fuzz/fuzz_jinja): each
// overflowed the stack, ran for minutes, exhausted memory or hit undefined behaviour; now each is an error.
TEST(ChatTemplateErrors, FuzzReproducersAreErrors) {
  const std::string dir = std::string(TRELLM_TEST_DATA) + "/fuzz/fuzz_jinja/";
  const std::vector<std::pair<const char*, const char*>> cases = {
      {"binary_chain.jinja", "expression nests deeper than 100 levels"},       // eval and ~Expr recursed per term
      {"nested_parens.jinja", "the template nests deeper than 100 levels"},   // the parser recursed per '('
      {"recursive_macro.jinja", "evaluation nests deeper than 500 levels"},
      {"nested_loops.jinja", "more than 2000000 steps"},                       // 10^12 iterations
      {"string_repeat.jinja", "the string would exceed 16 MB"},                // a 100 GB allocation
      {"int_overflow.jinja", "integer overflow in +"},                         // signed overflow (UB)
      {"float_to_int.jinja", "cannot convert float 1e+300 to a 64-bit integer"},  // float-cast overflow (UB)
      // Found by fuzz_jinja itself: std::stoul / std::stoll threw exceptions that were not trellm::Errors.
      {"truncated_u_escape.jinja", "truncated \\x/\\u escape"},
      {"attribute_index_out_of_range.jinja", "attribute index 99999999999999999999 is out of range"},
  };
  for (const auto& [file, want] : cases) {
    const std::string msg = render_error(format::read_text_file(dir + file));
    EXPECT_NE(msg.find(want), std::string::npos) << file << ": " << msg;
    EXPECT_EQ(msg.rfind("t.jinja:", 0), 0u) << file << ": errors keep their line:column: " << msg;
  }
  EXPECT_EQ(ChatTemplate(R"({{ '\u00e9\x41\U0001F642' }})").render(ordered_json::array(), nullptr, true), "éA🙂");
  EXPECT_NE(render_error(R"({{ '\x4' }})").find("truncated"), std::string::npos);
  EXPECT_NE(render_error(R"({{ '\U00110000' }})").find("illegal Unicode character"), std::string::npos);
  // Found by fuzz_jinja: a UTF-8 sequence cut off by the end of a string was decoded past its end.
  try {
    (void)ChatTemplate(format::read_text_file(dir + "truncated_utf8.jinja")).render(ordered_json::array(), nullptr, true);
  } catch (const Error&) {
  }
  EXPECT_EQ(ChatTemplate(std::string("{{ 'a\xC3' | list | length }}")).render(ordered_json::array(), nullptr, true), "2");
  // 1 ** 10^18 looped 10^18 times; by squaring it is immediate.
  EXPECT_EQ(ChatTemplate(format::read_text_file(dir + "power_loop.jinja")).render(ordered_json::array(), nullptr, true), "1");
  // Below the limits (which real templates stay far from): 90 levels of parentheses, 50 recursive macro calls.
  EXPECT_EQ(ChatTemplate("{{ " + std::string(90, '(') + "2" + std::string(90, ')') + " }}").render(ordered_json::array(), nullptr, true), "2");
  EXPECT_EQ(ChatTemplate("{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{% else %}done{% endif %}{% endmacro %}{{ f(50) }}")
                .render(ordered_json::array(), nullptr, true),
            "done");
}

TEST(ChatTemplateErrors, DeeplyNestedTokenizerConfig) {
  // ordered_json copies nested values recursively while parsing: 100,000 levels overflowed the stack.
  const std::string dir = ::testing::TempDir() + "/trellm_deep_tokenizer_config";
  std::filesystem::create_directories(dir);
  {
    std::ofstream f(dir + "/tokenizer_config.json");
    f << "{\"x\": " << std::string(100000, '[') << std::string(100000, ']') << "}";
  }
  try {
    ChatTemplate::from_model_dir(dir);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("nested deeper than 256 levels"), std::string::npos) << e.what();
  }
  std::filesystem::remove_all(dir);
}

TEST(ChatTemplateErrors, ModelDirWithoutTemplate) {
  try {
    ChatTemplate::from_model_dir(std::string(TRELLM_TOKENIZER_DIR) + "/glm4-synthetic");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no chat_template.jinja and no chat_template in tokenizer_config.json"),
              std::string::npos) << e.what();
  }
}
