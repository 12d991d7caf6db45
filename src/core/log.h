// Minimal leveled logging to stderr. The level is set once from the CLI (--verbose / --quiet).
#pragma once
#include <cstdio>
#include <string>

#include "core/error.h"

namespace trellm {

enum class LogLevel { Debug = 0, Info = 1, Warn = 2, Error = 3, Quiet = 4 };

void set_log_level(LogLevel level);
LogLevel log_level();
void log_write(LogLevel level, const std::string& msg);

template <typename... Args> void log_debug(Args&&... a) { if (log_level() <= LogLevel::Debug) log_write(LogLevel::Debug, str_cat(a...)); }
template <typename... Args> void log_info(Args&&... a) { if (log_level() <= LogLevel::Info) log_write(LogLevel::Info, str_cat(a...)); }
template <typename... Args> void log_warn(Args&&... a) { if (log_level() <= LogLevel::Warn) log_write(LogLevel::Warn, str_cat(a...)); }

}  // namespace trellm
