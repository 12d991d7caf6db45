#include <gtest/gtest.h>

#include "format/json_file.h"
#include "test_util.h"

using namespace trellm;
using trellm::testing::TempDir;

TEST(JsonFile, TypedFieldsAndErrors) {
  TempDir d;
  trellm::testing::write_file(d / "c.json", R"({"a": 3, "b": "x", "c": [1, 2], "d": 1.5, "e": true, "n": null, "o": {"k": "v"}})");
  json j = read_json_file(d / "c.json");
  JsonFields f(j, "c.json");
  EXPECT_EQ(f.get_int("a"), 3);
  EXPECT_EQ(f.get_int("zz", 7), 7);
  EXPECT_EQ(f.get_int("n", 9), 9);  // null = absent
  EXPECT_EQ(f.get_str("b"), "x");
  EXPECT_EQ(f.get_int_list("c"), (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(f.get_int_list("a"), (std::vector<int64_t>{3}));
  EXPECT_DOUBLE_EQ(f.get_num("d"), 1.5);
  EXPECT_TRUE(f.get_bool("e", false));
  EXPECT_EQ(f.sub("o").get_str("k"), "v");
  EXPECT_ERROR_CONTAINS(f.get_int("b"), "c.json", "\"b\"", "expected an integer");
  EXPECT_ERROR_CONTAINS(f.get_int("missing"), "\"missing\"", "is missing");
  EXPECT_ERROR_CONTAINS(f.sub("o").get_int("k"), "\"o.k\"");
  trellm::testing::write_file(d / "bad.json", "{\"a\": ");
  EXPECT_ERROR_CONTAINS(read_json_file(d / "bad.json"), "bad.json", "invalid JSON");
}

// Hostile files found while fuzzing (issue 17): an error naming the file, not a crash.
TEST(JsonFile, HugeNumbersAndDeepNestingAreErrors) {
  TempDir d;
  // nlohmann throws out_of_range (not parse_error) for a number past a double's range.
  trellm::testing::write_file(d / "big.json", R"({"vocab_size": 1e999})");
  EXPECT_ERROR_CONTAINS(read_json_file(d / "big.json"), "big.json", "invalid JSON", "number overflow");
  // 100,000 nested arrays: printing the value for an error message overflowed the stack.
  const std::string deep = std::string(100000, '[') + std::string(100000, ']');
  trellm::testing::write_file(d / "deep.json", "{\"vocab_size\": " + deep + "}");
  EXPECT_ERROR_CONTAINS(read_json_file(d / "deep.json"), "deep.json", "nested deeper than 256 levels");
  // The bound counts brackets outside strings only, and real nesting up to it is fine.
  const std::string ok = std::string(255, '[') + std::string(255, ']');
  trellm::testing::write_file(d / "ok.json", "{\"s\": \"" + std::string(1000, '[') + "\", \"a\": " + ok + "}");
  EXPECT_TRUE(read_json_file(d / "ok.json").contains("a"));
}
