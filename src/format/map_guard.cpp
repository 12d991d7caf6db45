#include "format/map_guard.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>

namespace trellm {

namespace {

// Read by the signal handler without a lock: `base` is published last (release) and cleared first.
struct Slot {
  std::atomic<const char*> base{nullptr};
  size_t size = 0;
  char path[480] = {};
};
Slot g_slots[kMaxGuardedMappings];
std::mutex g_mu;
struct sigaction g_previous;

void put(const char* s) {
  size_t n = std::strlen(s);
  while (n > 0) {
    ssize_t w = ::write(STDERR_FILENO, s, n);
    if (w <= 0) return;
    s += w;
    n -= size_t(w);
  }
}

void put_number(size_t v) {
  char buf[24];
  int i = 23;
  buf[i] = 0;
  do {
    buf[--i] = char('0' + v % 10);
    v /= 10;
  } while (v && i > 0);
  put(buf + i);
}

// Only async-signal-safe calls from here on: write(2), _exit(2), sigaction(2), raise(3).
void on_sigbus(int sig, siginfo_t* info, void* ctx) {
  const char* addr = static_cast<const char*>(info->si_addr);
  for (const Slot& s : g_slots) {
    const char* base = s.base.load(std::memory_order_acquire);
    if (!base || addr < base || addr >= base + s.size) continue;
    put("trellm: error: ");
    put(s.path);
    put(": reading byte ");
    put_number(size_t(addr - base));
    put(" of the mapped file failed (SIGBUS): the file was truncated or rewritten while trellm was using it. "
        "Replace model files by renaming a new copy into place, never by writing over them.\n");
    _exit(1);
  }
  // Not one of ours: hand the fault to whoever handled it before (the default action kills the process).
  sigaction(SIGBUS, &g_previous, nullptr);
  if (!(g_previous.sa_flags & SA_SIGINFO) && g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN)
    g_previous.sa_handler(sig);
  else if ((g_previous.sa_flags & SA_SIGINFO) && g_previous.sa_sigaction)
    g_previous.sa_sigaction(sig, info, ctx);
  else
    raise(sig);  // SIG_DFL (SA_NODEFER: delivered now) or SIG_IGN

}

void install() {
  struct sigaction sa;
  std::memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_sigbus;
  sa.sa_flags = SA_SIGINFO | SA_NODEFER;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGBUS, &sa, &g_previous);
}

}  // namespace

void guard_mapping(const void* base, size_t size, const std::string& path) {
  static std::once_flag once;
  std::call_once(once, install);
  std::lock_guard lk(g_mu);
  for (Slot& s : g_slots) {
    if (s.base.load(std::memory_order_relaxed)) continue;
    s.size = size;
    const size_t n = std::min(path.size(), sizeof s.path - 1);
    std::memcpy(s.path, path.data(), n);
    s.path[n] = 0;
    s.base.store(static_cast<const char*>(base), std::memory_order_release);
    return;
  }
}

void unguard_mapping(const void* base) {
  std::lock_guard lk(g_mu);
  for (Slot& s : g_slots)
    if (s.base.load(std::memory_order_relaxed) == base) s.base.store(nullptr, std::memory_order_release);
}

}  // namespace trellm
