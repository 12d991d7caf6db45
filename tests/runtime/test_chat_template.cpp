#include <gtest/gtest.h>
TEST(ChatTemplate, Placeholder) { EXPECT_TRUE(true); }
