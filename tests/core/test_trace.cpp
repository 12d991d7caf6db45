// trace: spans recorded only while started, on the row of the thread that made them (named or "thread N"), written
// as Chrome trace-event JSON; a path that cannot be written is an error naming it.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/error.h"
#include "core/trace.h"

using namespace trellm;

TEST(Trace, RecordsSpansPerThreadWhileStarted) {
  { const trace::Span before("before the start"); }
  trace::start();
  trace::name_thread("main");
  {
    const trace::Span outer("outer");
    const trace::Span inner("inner");
  }
  std::thread([] {
    trace::name_thread("worker");
    const trace::Span s("on the worker");
  }).join();
  std::thread([] { const trace::Span s("unnamed"); }).join();
  const std::string path = testing::TempDir() + "trace_test.json";
  trace::write(path);
  { const trace::Span after("after the write"); }
  EXPECT_FALSE(trace::on());

  std::ifstream f(path);
  const nlohmann::json j = nlohmann::json::parse(f);
  std::map<int, std::string> rows;
  std::map<std::string, nlohmann::json> spans;
  for (const auto& e : j["traceEvents"]) {
    if (e["ph"] == "M") rows[e["tid"].get<int>()] = e["args"]["name"];
    else spans[e["name"]] = e;
  }
  ASSERT_EQ(spans.size(), 4u) << j.dump();  // not "before the start" nor "after the write"
  EXPECT_EQ(rows[spans["outer"]["tid"].get<int>()], "main");
  EXPECT_EQ(spans["inner"]["tid"], spans["outer"]["tid"]);
  EXPECT_EQ(rows[spans["on the worker"]["tid"].get<int>()], "worker");
  EXPECT_EQ(rows[spans["unnamed"]["tid"].get<int>()].rfind("thread ", 0), 0u);
  const double o0 = spans["outer"]["ts"], o1 = o0 + spans["outer"]["dur"].get<double>();
  const double i0 = spans["inner"]["ts"], i1 = i0 + spans["inner"]["dur"].get<double>();
  EXPECT_LE(o0, i0);
  EXPECT_LE(i1, o1);
  std::remove(path.c_str());
}

TEST(Trace, AnUnwritablePathIsAnError) {
  trace::start();
  try {
    trace::write("/nonexistent-dir/trace.json");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent-dir/trace.json"), std::string::npos) << e.what();
  }
}
