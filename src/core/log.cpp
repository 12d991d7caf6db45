#include "core/log.h"

#include <atomic>

namespace trellm {

namespace {
std::atomic<int> g_level{int(LogLevel::Info)};
}

void set_log_level(LogLevel level) { g_level = int(level); }
LogLevel log_level() { return LogLevel(g_level.load()); }

void log_write(LogLevel level, const std::string& msg) {
  static const char* names[] = {"debug", "info", "warning", "error"};
  std::fprintf(stderr, "trellm %s: %s\n", names[int(level)], msg.c_str());
}

}  // namespace trellm
