// A checkpoint is used in place from its mapping. If the file shrinks or is rewritten after it was mapped, reading
// a page past its new end raises SIGBUS, which would kill the process with a bare "Bus error". The guard turns
// that into a message naming the file and the byte offset, then exits with status 1 like any other error.
// What remains (docs/architecture.md, "Model files on disk"): a file rewritten in place at the same size is not
// detected — MAP_PRIVATE does not snapshot pages that were never written — so replace model files by renaming a
// new copy into place (the mapping keeps the old inode), never by writing over them.
#pragma once
#include <cstddef>
#include <string>

namespace trellm {

// Registers [base, base + size) as a mapping of `path`; the first call installs the SIGBUS handler. Up to
// kMaxGuardedMappings at a time (a sharded checkpoint has tens of files); further ones are left unguarded.
void guard_mapping(const void* base, size_t size, const std::string& path);
void unguard_mapping(const void* base);
constexpr int kMaxGuardedMappings = 512;

}  // namespace trellm
