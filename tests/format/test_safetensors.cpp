// Safetensors reader: round trips, shards, and one test per kind of malformed or hostile file, each
// expecting its specific error naming the file and tensor.
#include <gtest/gtest.h>

#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "format/safetensors.h"
#include "test_util.h"

using namespace trellm;
using trellm::testing::TempDir;
using trellm::testing::write_file;
using json = nlohmann::json;

namespace {

// A file from a raw header string and data bytes.
std::string raw_file(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; i++) out[i] = char((n >> (8 * i)) & 0xff);
  return out + header + data;
}

std::string two_tensor_header(uint64_t a0, uint64_t a1, uint64_t b0, uint64_t b1) {
  json h = {{"a", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {a0, a1}}}},
            {"b", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {b0, b1}}}}};
  return h.dump();
}

TEST(Safetensors, RoundTripAllDtypes) {
  TempDir d;
  float f[3] = {1.5f, -2.0f, 3.25f};
  uint16_t h[4] = {0x3c00, 0xc000, 0x3f80, 0x0001};
  int32_t i32[2] = {-7, 123456};
  int16_t i16[3] = {-1, 2, 32767};
  std::vector<TensorToWrite> ts = {
      {"f32", DType::F32, {3}, f, sizeof f},       {"f16", DType::F16, {2, 2}, h, sizeof h},
      {"bf16", DType::BF16, {4}, h, sizeof h},     {"i32", DType::I32, {2, 1}, i32, sizeof i32},
      {"i16", DType::I16, {3}, i16, sizeof i16},   {"scalar", DType::I32, {}, i32, 4}};
  write_safetensors(d / "x.safetensors", ts, {{"format", "pt"}});
  auto file = SafetensorsFile::open(d / "x.safetensors");
  EXPECT_EQ(file->metadata().at("format"), "pt");
  ASSERT_EQ(file->tensors().size(), ts.size());
  for (auto& t : ts) {
    const TensorInfo* r = file->find(t.name);
    ASSERT_NE(r, nullptr) << t.name;
    EXPECT_EQ(r->dtype, t.dtype);
    EXPECT_EQ(r->shape, t.shape);
    ASSERT_EQ(r->nbytes, t.nbytes);
    EXPECT_EQ(std::memcmp(r->data, t.data, t.nbytes), 0) << t.name;
  }
  EXPECT_EQ(file->find("scalar")->numel(), 1);
}

TEST(Safetensors, ShardedCheckpointThroughIndex) {
  TempDir d;
  float a[2] = {1, 2}, b[3] = {3, 4, 5};
  write_safetensors(d / "model-00001-of-00002.safetensors", {{"a", DType::F32, {2}, a, sizeof a}});
  write_safetensors(d / "model-00002-of-00002.safetensors", {{"b", DType::F32, {3}, b, sizeof b}});
  json idx = {{"metadata", {{"total_size", 20}}},
              {"weight_map", {{"a", "model-00001-of-00002.safetensors"}, {"b", "model-00002-of-00002.safetensors"}}}};
  write_file(d / "model.safetensors.index.json", idx.dump());
  TensorStore s = TensorStore::open(d.str());
  EXPECT_EQ(s.names(), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(static_cast<const float*>(s.get("b").data)[2], 5.0f);
  EXPECT_EQ(s.total_bytes(), 20u);
  EXPECT_ERROR_CONTAINS(s.get("c"), "\"c\"", "missing");
}

// A checkpoint seen with some tensors replaced (the quantizer's finished Linears over the source): the files'
// tensors win, hidden names are gone, the rest is the base's; a name in two files of the overlay is an error.
TEST(Safetensors, OverlayReplacesHidesAndRefusesDuplicates) {
  TempDir d;
  float w[4] = {1, 2, 3, 4}, b[2] = {5, 6}, n[2] = {7, 8}, t[3] = {9, 10, 11}, b2[2] = {12, 13};
  write_safetensors(d / "model.safetensors", {{"x.weight", DType::F32, {2, 2}, w, sizeof w},
                                              {"x.bias", DType::F32, {2}, b, sizeof b},
                                              {"norm.weight", DType::F32, {2}, n, sizeof n}});
  write_safetensors(d / "q.safetensors", {{"x.trellis", DType::F32, {3}, t, sizeof t}, {"x.bias", DType::F32, {2}, b2, sizeof b2}});
  write_safetensors(d / "dup.safetensors", {{"x.trellis", DType::F32, {3}, t, sizeof t}});
  const TensorStore base = TensorStore::open(d.str());
  const TensorStore o = TensorStore::overlay(base, {d / "q.safetensors"}, {"x.weight", "x.bias"});
  EXPECT_EQ(o.names(), (std::vector<std::string>{"norm.weight", "x.bias", "x.trellis"}));
  EXPECT_EQ(static_cast<const float*>(o.get("x.bias").data)[1], 13.0f);       // the file's, not the base's
  EXPECT_EQ(static_cast<const float*>(o.get("norm.weight").data)[0], 7.0f);  // the base's
  EXPECT_FALSE(o.contains("x.weight"));
  EXPECT_EQ(o.path(), base.path());
  EXPECT_TRUE(base.contains("x.weight"));  // the base is unchanged
  EXPECT_ERROR_CONTAINS(TensorStore::overlay(base, {d / "q.safetensors", d / "dup.safetensors"}, {}), "x.trellis",
                        "another file");
  EXPECT_ERROR_CONTAINS(TensorStore::overlay(base, {d / "absent.safetensors"}, {}), "absent.safetensors");
}

TEST(Safetensors, IndexNamesTensorAbsentFromItsShard) {
  TempDir d;
  float a[2] = {1, 2};
  write_safetensors(d / "s1.safetensors", {{"a", DType::F32, {2}, a, sizeof a}});
  write_file(d / "model.safetensors.index.json", json({{"weight_map", {{"a", "s1.safetensors"}, {"ghost", "s1.safetensors"}}}}).dump());
  EXPECT_ERROR_CONTAINS(TensorStore::open(d.str()), "\"ghost\"", "s1.safetensors", "does not contain");
}

TEST(Safetensors, TensorInTwoShards) {
  TempDir d;
  float a[2] = {1, 2};
  write_safetensors(d / "s1.safetensors", {{"a", DType::F32, {2}, a, sizeof a}});
  write_safetensors(d / "s2.safetensors", {{"a", DType::F32, {2}, a, sizeof a}, {"b", DType::F32, {2}, a, sizeof a}});
  write_file(d / "model.safetensors.index.json", json({{"weight_map", {{"a", "s1.safetensors"}, {"b", "s2.safetensors"}}}}).dump());
  EXPECT_ERROR_CONTAINS(TensorStore::open(d.str()), "\"a\"", "more than one shard");
}

TEST(Safetensors, IndexWithPathTraversal) {
  TempDir d;
  write_file(d / "model.safetensors.index.json", json({{"weight_map", {{"a", "../etc/passwd"}}}}).dump());
  EXPECT_ERROR_CONTAINS(TensorStore::open(d.str()), "plain file name");
}

TEST(Safetensors, EmptyDirectory) {
  TempDir d;
  EXPECT_ERROR_CONTAINS(TensorStore::open(d.str()), "no model.safetensors");
}

TEST(Safetensors, FileShorterThanLengthPrefix) {
  TempDir d;
  write_file(d / "t.safetensors", "abc");
  EXPECT_ERROR_CONTAINS(SafetensorsFile::open(d / "t.safetensors"), "t.safetensors", "truncated");
}

TEST(Safetensors, TruncatedData) {
  TempDir d;
  float a[4] = {1, 2, 3, 4};
  write_safetensors(d / "t.safetensors", {{"w", DType::F32, {4}, a, sizeof a}});
  std::string bytes = trellm::testing::read_file(d / "t.safetensors");
  write_file(d / "t.safetensors", bytes.substr(0, bytes.size() - 5));
  EXPECT_ERROR_CONTAINS(SafetensorsFile::open(d / "t.safetensors"), "t.safetensors", "\"w\"", "outside the data buffer");
}

TEST(Safetensors, HeaderLongerThanFile) {
  TempDir d;
  std::string f = raw_file("{}", "");
  f[0] = char(200);  // claims a 200-byte header
  write_file(d / "t.safetensors", f);
  EXPECT_ERROR_CONTAINS(SafetensorsFile::open(d / "t.safetensors"), "truncated", "header claims 200");
}

TEST(Safetensors, HostileHeaderLength) {
  TempDir d;
  std::string f = raw_file("{}", "");
  for (int i = 0; i < 8; i++) f[i] = char(0xff);
  write_file(d / "t.safetensors", f);
  EXPECT_ERROR_CONTAINS(SafetensorsFile::open(d / "t.safetensors"), "exceeds the limit");
}

TEST(Safetensors, BadHeaderJson) {
  TempDir d;
  write_file(d / "t.safetensors", raw_file("{\"a\": {\"dtype\": ", ""));
  EXPECT_ERROR_CONTAINS(SafetensorsFile::open(d / "t.safetensors"), "t.safetensors", "invalid safetensors header JSON");
  write_file(d / "u.safetensors", raw_file("[1, 2]", ""));
  EXPECT_ERROR_CONTAINS(SafetensorsFile::open(d / "u.safetensors"), "not a JSON object");
}

TEST(Safetensors, OffsetOutOfRange) {
  TempDir d;
  write_file(d / "t.safetensors", raw_file(two_tensor_header(0, 8, 8, 16), std::string(12, 'x')));
  EXPECT_ERROR_CONTAINS(SafetensorsFile::open(d / "t.safetensors"), "\"b\"", "[8, 16]", "outside the data buffer");
}

TEST(Safetensors, OverlappingTensors) {
  TempDir d;
  write_file(d / "t.safetensors", raw_file(two_tensor_header(0, 8, 4, 12), std::string(16, 'x')));
  EXPECT_ERROR_CONTAINS(SafetensorsFile::open(d / "t.safetensors"), "\"a\"", "\"b\"", "overlap");
}

TEST(Safetensors, ReversedOffsets) {
  TempDir d;
  write_file(d / "t.safetensors", raw_file(two_tensor_header(8, 0, 8, 16), std::string(16, 'x')));
  EXPECT_ERROR_CONTAINS(SafetensorsFile::open(d / "t.safetensors"), "\"a\"", "reversed");
}

TEST(Safetensors, ShapeDoesNotMatchByteLength) {
  TempDir d;
  json h = {{"w", {{"dtype", "BF16"}, {"shape", {3, 3}}, {"data_offsets", {0, 16}}}}};
  write_file(d / "t.safetensors", raw_file(h.dump(), std::string(16, 'x')));
  EXPECT_ERROR_CONTAINS(SafetensorsFile::open(d / "t.safetensors"), "\"w\"", "byte length 16", "= 18");
}

TEST(Safetensors, UnknownDtypeAndBadFields) {
  TempDir d;
  json h = {{"w", {{"dtype", "F8_E4M3"}, {"shape", {2}}, {"data_offsets", {0, 2}}}}};
  write_file(d / "t.safetensors", raw_file(h.dump(), "xx"));
  EXPECT_ERROR_CONTAINS(SafetensorsFile::open(d / "t.safetensors"), "\"w\"", "unsupported dtype \"F8_E4M3\"");
  h = {{"w", {{"dtype", "F32"}, {"shape", {-2}}, {"data_offsets", {0, 8}}}}};
  write_file(d / "t.safetensors", raw_file(h.dump(), std::string(8, 'x')));
  EXPECT_ERROR_CONTAINS(SafetensorsFile::open(d / "t.safetensors"), "\"w\"", "non-negative");
  h = {{"w", {{"dtype", "F32"}, {"shape", {2}}}}};
  write_file(d / "t.safetensors", raw_file(h.dump(), std::string(8, 'x')));
  EXPECT_ERROR_CONTAINS(SafetensorsFile::open(d / "t.safetensors"), "\"w\"", "data_offsets");
  h = {{"w", {{"dtype", "F32"}, {"shape", {1u << 31, 1u << 31, 1u << 31}}, {"data_offsets", {0, 8}}}}};
  write_file(d / "t.safetensors", raw_file(h.dump(), std::string(8, 'x')));
  EXPECT_ERROR_CONTAINS(SafetensorsFile::open(d / "t.safetensors"), "\"w\"", "too large");
}

// nlohmann::json keeps one of two equal keys: a header naming a tensor twice would silently load either entry.
TEST(Safetensors, TensorNamedTwiceInTheHeader) {
  TempDir d;
  const std::string a = R"("a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})";
  const std::string a2 = R"("a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]})";
  write_file(d / "t.safetensors", raw_file("{" + a + ", " + a2 + "}", std::string(16, 'x')));
  EXPECT_ERROR_CONTAINS(SafetensorsFile::open(d / "t.safetensors"), "t.safetensors", "tensor \"a\" twice");
  // A field of one entry given twice is as ambiguous, and so is a metadata key.
  write_file(d / "u.safetensors",
             raw_file(R"({"b": {"dtype": "F32", "dtype": "I32", "shape": [2], "data_offsets": [0, 8]}})", std::string(8, 'x')));
  EXPECT_ERROR_CONTAINS(SafetensorsFile::open(d / "u.safetensors"), "u.safetensors", "tensor \"b\"", "key \"dtype\" appears twice");
  write_file(d / "v.safetensors", raw_file(R"({"__metadata__": {"format": "pt", "format": "np"}})", ""));
  EXPECT_ERROR_CONTAINS(SafetensorsFile::open(d / "v.safetensors"), "v.safetensors", "__metadata__", "\"format\" twice");
  // Equal names in different objects are fine.
  write_file(d / "w.safetensors", raw_file("{" + a + R"(, "__metadata__": {"a": "x"}})", std::string(8, 'x')));
  EXPECT_EQ(SafetensorsFile::open(d / "w.safetensors")->tensors().size(), 1u);
}

TEST(Safetensors, IndexNamesTensorTwice) {
  TempDir d;
  float a[2] = {1, 2};
  write_safetensors(d / "s1.safetensors", {{"a", DType::F32, {2}, a, sizeof a}});
  write_safetensors(d / "s2.safetensors", {{"b", DType::F32, {2}, a, sizeof a}});
  write_file(d / "model.safetensors.index.json",
             R"({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors", "a": "s2.safetensors"}})");
  EXPECT_ERROR_CONTAINS(TensorStore::open(d.str()), "model.safetensors.index.json", "weight_map names tensor \"a\" twice");
  write_file(d / "model.safetensors.index.json", R"({"weight_map": {"a": "s1.safetensors"}, "weight_map": {}})");
  EXPECT_ERROR_CONTAINS(TensorStore::open(d.str()), "model.safetensors.index.json", "\"weight_map\" appears twice");
}

// Found by tests/fuzz/fuzz_safetensors and fuzz_safetensors_index: a number past a double's range makes nlohmann
// throw out_of_range, which is not a parse_error, and escaped the loader (std::terminate).
TEST(Safetensors, FuzzNumberOutOfRange) {
  const std::string data = std::string(TRELLM_TEST_DATA) + "/fuzz/";
  EXPECT_ERROR_CONTAINS(SafetensorsFile::open(data + "fuzz_safetensors/number_out_of_range.safetensors"),
                        "number_out_of_range.safetensors", "invalid safetensors header JSON", "number overflow");
  TempDir d;
  write_file(d / "model.safetensors.index.json",
             trellm::testing::read_file(data + "fuzz_safetensors_index/number_out_of_range.json"));
  EXPECT_ERROR_CONTAINS(TensorStore::open(d.str()), "model.safetensors.index.json", "invalid JSON", "number overflow");
}

TEST(Safetensors, MissingFile) {
  EXPECT_ERROR_CONTAINS(SafetensorsFile::open("/nonexistent/x.safetensors"), "/nonexistent/x.safetensors", "cannot open");
}

}  // namespace

#if defined(__SANITIZE_ADDRESS__)
#define TRELLM_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TRELLM_TEST_ASAN 1
#endif
#endif
#ifndef TRELLM_TEST_ASAN
#define TRELLM_TEST_ASAN 0
#endif

// A file truncated after it was mapped (a download or copy over a model in use): reading its lost pages raises
// SIGBUS, which the map guard turns into a message naming the file and the offset and exit status 1. The
// read happens in a forked child (a death test); the parent checks the child's stderr and status.
TEST(SafetensorsDeathTest, TruncatedWhileMappedIsAClearError) {
  TempDir d;
  std::vector<float> big(1 << 16, 1.0f);  // 256 KiB: 64 pages, so the truncation removes mapped pages
  write_safetensors(d / "m.safetensors", {{"w", DType::F32, {int64_t(big.size())}, big.data(), big.size() * 4}});
  auto file = SafetensorsFile::open(d / "m.safetensors");
  const TensorInfo* w = file->find("w");
  ASSERT_NE(w, nullptr);
  ASSERT_EQ(::truncate((d / "m.safetensors").c_str(), 4096), 0);
  const auto* p = static_cast<const volatile float*>(w->data);
  EXPECT_EXIT(
      {
        float s = 0;
        for (size_t i = 0; i < big.size(); i += 1024) s += p[i];
        std::fprintf(stderr, "read everything: %f\n", double(s));
        std::exit(0);
      },
      ::testing::ExitedWithCode(1), "m\\.safetensors: reading byte [0-9]+ of the mapped file failed \\(SIGBUS\\)");
  // A fault outside any checkpoint mapping goes on to the handler that was there before (the guard does not swallow
  // it): the default action, or under AddressSanitizer its report and abort.
#if TRELLM_TEST_ASAN
  EXPECT_EXIT(raise(SIGBUS), ::testing::KilledBySignal(SIGABRT), "AddressSanitizer: BUS");
#else
  EXPECT_EXIT(raise(SIGBUS), ::testing::KilledBySignal(SIGBUS), "");
#endif
}

// Replacing the file by renaming a new copy into place (the documented way) leaves the open mapping intact.
TEST(Safetensors, ReplacedByRenameKeepsTheMappedContents) {
  TempDir d;
  float a[4] = {1, 2, 3, 4}, b[2] = {9, 9};
  write_safetensors(d / "m.safetensors", {{"a", DType::F32, {4}, a, sizeof a}});
  auto file = SafetensorsFile::open(d / "m.safetensors");
  write_safetensors(d / "new.safetensors", {{"b", DType::F32, {2}, b, sizeof b}});
  std::filesystem::rename(d / "new.safetensors", d / "m.safetensors");
  EXPECT_EQ(std::memcmp(file->find("a")->data, a, sizeof a), 0);
  EXPECT_NE(SafetensorsFile::open(d / "m.safetensors")->find("b"), nullptr);
}
