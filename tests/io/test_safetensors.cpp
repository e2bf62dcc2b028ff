#include <cstring>
#include <fstream>

#include "qalora/core/error.h"
#include "qalora/core/fp16.h"
#include "qalora/io/safetensors.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;

template <typename T>
std::vector<uint8_t> to_bytes(const std::vector<T>& v) {
  std::vector<uint8_t> b(v.size() * sizeof(T));
  if (!b.empty()) std::memcpy(b.data(), v.data(), b.size());
  return b;
}

Tensor make_tensor(Shape shape, float scale) {
  Tensor t = Tensor::zeros(std::move(shape));
  float* d = t.mutable_data();
  for (int64_t i = 0; i < t.numel(); ++i) d[i] = scale * static_cast<float>(i) - 1.25f;
  return t;
}

// A file with exactly this header text and data section, for malformed-input tests.
fs::path write_raw(const fs::path& path, const std::string& header,
                   const std::vector<uint8_t>& data, uint64_t header_len) {
  std::ofstream out(path, std::ios::binary);
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((header_len >> (8 * i)) & 0xffu));
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  return path;
}
fs::path write_raw(const fs::path& path, const std::string& header,
                   const std::vector<uint8_t>& data) {
  return write_raw(path, header, data, header.size());
}

// The open must fail with a one-line message naming the file and containing `what`.
void expect_open_error(const fs::path& path, const std::string& what) {
  try {
    SafetensorsFile::open(path);
    ADD_FAILURE() << "no error for " << path;
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path.string()), std::string::npos) << msg;
    EXPECT_NE(msg.find(what), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
}

TEST(SafetensorsTest, RoundTripsFloatAndIntegerDtypesWithMetadata) {
  const fs::path path = test::temp_dir() / "t.safetensors";
  const Tensor f32 = make_tensor({3, 5, 7}, 0.37f);
  // Values exactly representable in fp16 and bf16 so the round trip is exact.
  const std::vector<float> halves = {0.0f,           -2.5f,  49152.0f, 6.103515625e-05f,
                                     1.0f / 1024.0f, -0.75f, 3.0f};
  std::vector<uint16_t> f16, bf16;
  for (float v : halves) {
    f16.push_back(fp32_to_fp16(v));
    bf16.push_back(fp32_to_bf16(v));
  }
  const std::vector<int32_t> i32 = {-7, 0, 1 << 30};
  const std::vector<uint8_t> u8 = {1, 2, 255};

  write_safetensors(
      path,
      {st_f32("a.f32", f32),
       {"u8", StDtype::U8, {3}, u8},  // leaves later tensors unaligned within the data
       {"b.f16", StDtype::F16, {7}, to_bytes(f16)},
       {"c.bf16", StDtype::BF16, {7, 1}, to_bytes(bf16)},
       {"d.i32", StDtype::I32, {3}, to_bytes(i32)},
       {"empty", StDtype::F32, {0, 4}, {}}},
      {{"format", "pt"}, {"note", "odd shapes"}});

  const SafetensorsFile st = SafetensorsFile::open(path);
  ASSERT_EQ(st.tensors().size(), 6u);
  EXPECT_EQ(st.tensors()[0].name, "a.f32");  // header order is kept
  EXPECT_EQ(st.metadata().at("format"), "pt");
  EXPECT_EQ(st.metadata().at("note"), "odd shapes");
  EXPECT_EQ(st.find("missing"), nullptr);

  const Tensor a = st.load_f32(*st.find("a.f32"));
  EXPECT_EQ(a.shape(), (Shape{3, 5, 7}));
  EXPECT_EQ(std::memcmp(a.data(), f32.data(), sizeof(float) * 105), 0);
  EXPECT_EQ(static_cast<const void*>(a.data()), st.data(*st.find("a.f32")))
      << "aligned F32 is a view";

  const Tensor b = st.load_f32(*st.find("b.f16"));
  const Tensor c = st.load_f32(*st.find("c.bf16"));
  EXPECT_EQ(c.shape(), (Shape{7, 1}));
  for (size_t i = 0; i < halves.size(); ++i) {
    EXPECT_EQ(b.data()[i], halves[i]) << i;
    EXPECT_EQ(c.data()[i], halves[i]) << i;
  }

  const StTensorInfo& d = *st.find("d.i32");
  EXPECT_EQ(d.dtype, StDtype::I32);
  EXPECT_EQ(std::memcmp(st.data(d), i32.data(), 12), 0);
  EXPECT_EQ(std::memcmp(st.data(*st.find("u8")), u8.data(), 3), 0);
  EXPECT_THROW(st.load_f32(d), Error);
  EXPECT_EQ(st.load_f32(*st.find("empty")).shape(), (Shape{0, 4}));

  // The data section starts 8-byte aligned: the header is padded with spaces.
  const std::string raw = read_file(path);
  uint64_t header_len = 0;
  std::memcpy(&header_len, raw.data(), 8);
  EXPECT_EQ(header_len % 8, 0u);
}

TEST(SafetensorsTest, CopiesUnalignedF32AndAcceptsOverlappingUnsortedRanges) {
  const fs::path dir = test::temp_dir();
  std::vector<uint8_t> data(2 + 8);
  const float v[2] = {1.5f, -3.25f};
  std::memcpy(data.data() + 2, v, 8);
  std::string header =
      R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[2,10]},"y":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}})";
  while ((8 + header.size() + 2) % 4 == 0) header += ' ';  // "x" must start unaligned in the file
  const fs::path path = write_raw(dir / "u.safetensors", header, data);
  const SafetensorsFile st = SafetensorsFile::open(path);
  const Tensor x = st.load_f32(*st.find("x"));
  EXPECT_NE(static_cast<const void*>(x.data()), st.data(*st.find("x")));
  EXPECT_EQ(x.data()[0], 1.5f);
  EXPECT_EQ(x.data()[1], -3.25f);
  EXPECT_EQ(st.find("y")->end, 4u);
}

TEST(SafetensorsTest, RejectsMalformedFilesWithOneLineErrors) {
  const fs::path dir = test::temp_dir();
  const std::vector<uint8_t> data(16, 0);
  const auto entry = [](const std::string& body) { return "{\"w\":{" + body + "}}"; };

  {
    const fs::path p = dir / "short.safetensors";
    std::ofstream(p, std::ios::binary) << "abc";
    expect_open_error(p, "too short");
  }
  const std::string ok = entry(R"("dtype":"F32","shape":[4],"data_offsets":[0,16])");
  write_raw(dir / "truncated.safetensors", ok, {data.begin(), data.begin() + 9});
  expect_open_error(dir / "truncated.safetensors", "past the end of the data section");
  write_raw(dir / "hlen.safetensors", ok, data, 1u << 20);
  expect_open_error(dir / "hlen.safetensors", "header length 1048576");
  write_raw(dir / "json.safetensors", "{\"w\": [1, 2", data);
  expect_open_error(dir / "json.safetensors", "not valid JSON");
  write_raw(dir / "notobj.safetensors", "[1]", data);
  expect_open_error(dir / "notobj.safetensors", "must be a JSON object");
  write_raw(dir / "dtype.safetensors",
            entry(R"("dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4])"), data);
  expect_open_error(dir / "dtype.safetensors", "unknown dtype 'F8_E4M3'");
  write_raw(dir / "mismatch.safetensors",
            entry(R"("dtype":"F32","shape":[3],"data_offsets":[0,16])"), data);
  expect_open_error(dir / "mismatch.safetensors", "needs 12 bytes");
  write_raw(dir / "past.safetensors", entry(R"("dtype":"U8","shape":[4],"data_offsets":[14,18])"),
            data);
  expect_open_error(dir / "past.safetensors", "[14, 18] run past the end");
  write_raw(dir / "reversed.safetensors", entry(R"("dtype":"U8","shape":[0],"data_offsets":[8,4])"),
            data);
  expect_open_error(dir / "reversed.safetensors", "begin > end");
  write_raw(dir / "negshape.safetensors",
            entry(R"("dtype":"U8","shape":[-4],"data_offsets":[0,4])"), data);
  expect_open_error(dir / "negshape.safetensors", "non-negative integers");
  write_raw(dir / "noshape.safetensors", entry(R"("dtype":"U8","data_offsets":[0,4])"), data);
  expect_open_error(dir / "noshape.safetensors", "'shape'");
  write_raw(dir / "meta.safetensors", R"({"__metadata__":{"n":1}})", data);
  expect_open_error(dir / "meta.safetensors", "__metadata__");
}

TEST(SafetensorsTest, WriterRejectsBytesThatDoNotMatchTheShape) {
  const fs::path path = test::temp_dir() / "bad.safetensors";
  EXPECT_THROW(write_safetensors(path, {{"w", StDtype::F16, {3}, std::vector<uint8_t>(4)}}), Error);
  EXPECT_THROW(
      write_safetensors(path, {st_f32("w", make_tensor({2}, 1)), st_f32("w", make_tensor({2}, 1))}),
      Error);
  EXPECT_FALSE(fs::exists(path));
}

// Streamed: the header from the specs, the tensors one at a time; what it writes reads back as the
// whole-vector writer's file, and a producer that strays from the specs leaves no file.
TEST(SafetensorsTest, StreamedWriterMatchesTheSpecsOrWritesNothing) {
  const fs::path dir = test::temp_dir();
  const std::vector<StWriteTensor> tensors = {st_f32("a", make_tensor({2, 3}, 1)),
                                              {"b", StDtype::U8, {5}, {1, 2, 3, 4, 5}}};
  std::vector<StTensorSpec> specs;
  for (const StWriteTensor& t : tensors) specs.push_back({t.name, t.dtype, t.shape});
  auto produce = [&](size_t from, size_t to) {
    return [&tensors, from, to](const StTensorSink& write) {
      for (size_t i = from; i < to; ++i) write(tensors[i]);
    };
  };
  write_safetensors(dir / "whole.safetensors", tensors, {{"k", "v"}});
  write_safetensors(dir / "streamed.safetensors", specs, produce(0, 2), {{"k", "v"}});
  EXPECT_EQ(read_file(dir / "whole.safetensors"), read_file(dir / "streamed.safetensors"));

  const fs::path bad = dir / "bad.safetensors";
  EXPECT_THROW(write_safetensors(bad, specs, produce(0, 1)), Error);  // one missing
  EXPECT_THROW(write_safetensors(bad, specs, produce(1, 2)), Error);  // out of order
  std::vector<StTensorSpec> wider = specs;
  wider[1].shape = {6};
  EXPECT_THROW(write_safetensors(bad, wider, produce(0, 2)), Error);  // bytes do not match
  EXPECT_THROW(write_safetensors(bad, {specs[0]}, produce(0, 2)), Error);  // one extra
  EXPECT_FALSE(fs::exists(bad));
}

}  // namespace
}  // namespace qalora
