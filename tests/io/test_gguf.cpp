// GGUF reader/writer: round trips, typed getters, hand-built corrupt files (each must fail with
// a one-line error naming the file and the field), truncation/bit-flip fuzzing, real models.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <random>

#include "qalora/core/error.h"
#include "qalora/io/gguf.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;

bool same_value(const GgufValue& a, const GgufValue& b) {
  const auto* pa = std::get_if<std::shared_ptr<GgufArray>>(&a);
  const auto* pb = std::get_if<std::shared_ptr<GgufArray>>(&b);
  if (pa == nullptr || pb == nullptr) return a == b;
  if ((*pa)->type != (*pb)->type || (*pa)->values.size() != (*pb)->values.size()) return false;
  for (size_t i = 0; i < (*pa)->values.size(); ++i)
    if (!same_value((*pa)->values[i], (*pb)->values[i])) return false;
  return true;
}

GgufValue array(GgufValueType type, std::vector<GgufValue> values) {
  auto a = std::make_shared<GgufArray>();
  a->type = type;
  a->values = std::move(values);
  return a;
}

Tensor random_tensor(Shape shape, uint32_t seed, float scale = 1.0f) {
  Tensor t = Tensor::zeros(std::move(shape));
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  float* p = t.mutable_data();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = dist(rng);
  return t;
}

std::vector<uint8_t> file_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void put_bytes(const fs::path& p, const std::vector<uint8_t>& b) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

// Opening `p` must throw one Error whose single-line message names the file and contains `needle`.
void expect_open_error(const fs::path& p, const std::string& needle) {
  try {
    GgufFile::open(p);
    ADD_FAILURE() << p << ": expected an error containing \"" << needle << "\", file loaded";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_EQ(m.find('\n'), std::string::npos) << m;
    EXPECT_NE(m.find(p.filename().string()), std::string::npos) << m;
    EXPECT_NE(m.find(needle), std::string::npos) << m;
  }
}

// Hand-assembled GGUF bytes, independent of GgufWriter, for the corrupt-file tests.
struct RawGguf {
  std::vector<uint8_t> b;

  template <typename T>
  RawGguf& put(T v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    b.insert(b.end(), p, p + sizeof v);
    return *this;
  }
  RawGguf& str(const std::string& s) {
    put<uint64_t>(s.size());
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  RawGguf& header(uint32_t version, uint64_t n_tensors, uint64_t n_kv) {
    b.insert(b.end(), {'G', 'G', 'U', 'F'});
    return put(version).put(n_tensors).put(n_kv);
  }
  RawGguf& kv_u32(const std::string& key, uint32_t v) {
    return str(key).put(static_cast<uint32_t>(GgufValueType::U32)).put(v);
  }
  RawGguf& tensor(const std::string& name, std::vector<uint64_t> ne, uint32_t type,
                  uint64_t offset) {
    str(name).put(static_cast<uint32_t>(ne.size()));
    for (uint64_t d : ne) put(d);
    return put(type).put(offset);
  }
  RawGguf& pad(size_t alignment = 32) {
    b.resize((b.size() + alignment - 1) / alignment * alignment);
    return *this;
  }
  RawGguf& data(size_t n) {
    b.resize(b.size() + n, 0x3c);
    return *this;
  }
  fs::path save(const fs::path& dir, const std::string& name) const {
    const fs::path p = dir / name;
    put_bytes(p, b);
    return p;
  }
};

// One F32 tensor of 8 elements: the valid baseline the corrupt variants start from.
RawGguf valid_raw() {
  RawGguf r;
  r.header(3, 1, 1).kv_u32("llama.block_count", 1).tensor("w", {8}, 0, 0).pad().data(32);
  return r;
}

TEST(GgufWriter, RoundTripsMetadataAndTensorsBitExactly) {
  const fs::path dir = test::temp_dir();
  GgufWriter w;
  w.set("t.u8", uint64_t{255}, GgufValueType::U8);
  w.set("t.i8", int64_t{-128}, GgufValueType::I8);
  w.set("t.u16", uint64_t{65535}, GgufValueType::U16);
  w.set("t.i16", int64_t{-32768}, GgufValueType::I16);
  w.set_u32("t.u32", 4000000000u);
  w.set("t.i32", int64_t{-2000000000}, GgufValueType::I32);
  w.set("t.u64", uint64_t{18000000000000000000ull}, GgufValueType::U64);
  w.set("t.i64", int64_t{-9000000000000000000}, GgufValueType::I64);
  w.set_f32("t.f32", 0.1f);
  w.set("t.f64", 0.1, GgufValueType::F64);
  w.set_bool("t.bool", true);
  w.set_string("t.string", std::string("multi\nline \0 text", 17));
  w.set_string_array("t.strings", {"a", "", "\xc3\xa9t\xc3\xa9"});
  w.set_f32_array("t.floats", {0.5f, -1e-8f, 3e38f});
  w.set_i32_array("t.ints", {0, -1, 2147483647});
  w.set("t.nested",
        array(GgufValueType::ARRAY, {array(GgufValueType::U8, {uint64_t{1}, uint64_t{2}}),
                                     array(GgufValueType::STRING, {std::string("x")})}),
        GgufValueType::ARRAY);
  w.set("t.empty", array(GgufValueType::F64, {}), GgufValueType::ARRAY);
  w.set_u32("t.replaced", 1);
  w.set_u32("t.replaced", 2);

  const Tensor f32 = random_tensor({3, 5}, 1);
  const Tensor q8 = random_tensor({3, 64}, 2);
  const Tensor q41 = random_tensor({1, 32}, 3);
  const Tensor q40 = random_tensor({2, 1, 3, 32}, 4);
  const Tensor f16 = random_tensor({7}, 5);
  const Tensor bf16 = random_tensor({2, 3, 4}, 6);
  w.add_f32_tensor("f32", f32);
  w.add_quantized_tensor("q8_0", q8, GgmlType::Q8_0);
  w.add_quantized_tensor("q4_1", q41, GgmlType::Q4_1);
  w.add_quantized_tensor("q4_0", q40, GgmlType::Q4_0);
  w.add_quantized_tensor("f16", f16, GgmlType::F16);
  w.add_quantized_tensor("bf16", bf16, GgmlType::BF16);
  std::vector<uint8_t> q6k(2 * 210);
  for (size_t i = 0; i < q6k.size(); ++i) q6k[i] = static_cast<uint8_t>(i * 7);
  w.add_tensor("q6_k", {1, 512}, GgmlType::Q6_K, q6k);
  const fs::path path = dir / "round.gguf";
  w.write(path);

  const GgufFile f = GgufFile::open(path);
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.alignment(), 32u);
  EXPECT_EQ(f.metadata().size(), 18u);
  EXPECT_EQ(f.get_int("t.u8"), 255);
  EXPECT_EQ(f.get_int("t.i8"), -128);
  EXPECT_EQ(f.get_int("t.u16"), 65535);
  EXPECT_EQ(f.get_int("t.i16"), -32768);
  EXPECT_EQ(f.get_int("t.u32"), 4000000000);
  EXPECT_EQ(f.get_int("t.i32"), -2000000000);
  EXPECT_EQ(std::get<uint64_t>(*f.find("t.u64")), 18000000000000000000ull);
  EXPECT_EQ(f.get_int("t.i64"), -9000000000000000000);
  EXPECT_EQ(f.get_float_or("t.f32", 0), static_cast<double>(0.1f));
  EXPECT_EQ(f.get_float_or("t.f64", 0), 0.1);
  EXPECT_TRUE(f.get_bool_or("t.bool", false));
  EXPECT_EQ(f.get_string("t.string"), std::string("multi\nline \0 text", 17));
  EXPECT_EQ(f.get_string_array("t.strings"),
            (std::vector<std::string>{"a", "", "\xc3\xa9t\xc3\xa9"}));
  EXPECT_EQ(f.get_float_array("t.floats"),
            (std::vector<double>{0.5, static_cast<double>(-1e-8f), static_cast<double>(3e38f)}));
  EXPECT_EQ(f.get_int_array("t.ints"), (std::vector<int64_t>{0, -1, 2147483647}));
  EXPECT_EQ(f.get_int("t.replaced"), 2);
  EXPECT_EQ(f.value_type("t.i16"), GgufValueType::I16);
  EXPECT_EQ(f.value_type("t.nested"), GgufValueType::ARRAY);
  EXPECT_EQ(f.value_type("absent"), std::nullopt);
  EXPECT_TRUE(
      same_value(*f.find("t.nested"),
                 array(GgufValueType::ARRAY, {array(GgufValueType::U8, {uint64_t{1}, uint64_t{2}}),
                                              array(GgufValueType::STRING, {std::string("x")})})));
  EXPECT_TRUE(same_value(*f.find("t.empty"), array(GgufValueType::F64, {})));

  ASSERT_EQ(f.tensors().size(), 7u);
  const std::vector<std::pair<std::string, Shape>> expected = {
      {"f32", {3, 5}}, {"q8_0", {3, 64}},   {"q4_1", {1, 32}}, {"q4_0", {2, 1, 3, 32}},
      {"f16", {7}},    {"bf16", {2, 3, 4}}, {"q6_k", {1, 512}}};
  for (size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(f.tensors()[i].name, expected[i].first);
    EXPECT_EQ(f.tensors()[i].shape, expected[i].second);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(f.tensor_data(f.tensors()[i])) % 32, 0u);
  }
  const GgufTensorInfo& info = *f.find_tensor("q6_k");
  EXPECT_EQ(info.type, GgmlType::Q6_K);
  ASSERT_EQ(info.nbytes, q6k.size());
  EXPECT_EQ(std::memcmp(f.tensor_data(info), q6k.data(), q6k.size()), 0);

  // F32 is a view of the mapped file; other types dequantize to what quantize_row produced.
  const Tensor f32_back = f.load_f32("f32");
  EXPECT_EQ(f32_back.data(), reinterpret_cast<const float*>(f.tensor_data(*f.find_tensor("f32"))));
  EXPECT_EQ(std::memcmp(f32_back.data(), f32.data(), 15 * sizeof(float)), 0);
  for (const auto& [name, src, type] :
       {std::tuple{"q8_0", &q8, GgmlType::Q8_0}, std::tuple{"q4_0", &q40, GgmlType::Q4_0},
        std::tuple{"bf16", &bf16, GgmlType::BF16}}) {
    const int64_t row = src->shape().back();
    std::vector<uint8_t> enc(ggml_row_bytes(type, row));
    std::vector<float> dec(static_cast<size_t>(row));
    const Tensor back = f.load_f32(name);
    ASSERT_EQ(back.shape(), src->shape());
    for (int64_t r = 0; r < src->numel() / row; ++r) {
      quantize_row(type, src->row(r), enc.data(), row);
      dequantize_row(type, enc.data(), dec.data(), row);
      EXPECT_EQ(std::memcmp(back.row(r), dec.data(), dec.size() * sizeof(float)), 0) << name;
    }
  }
  // The atomic write leaves no temporary file behind.
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 1);
}

TEST(GgufWriter, HonoursGeneralAlignment) {
  const fs::path dir = test::temp_dir();
  for (uint32_t alignment : {1u, 64u}) {
    GgufWriter w;
    w.set_u32("general.alignment", alignment);
    w.add_quantized_tensor("a", random_tensor({3}, 7), GgmlType::F16);
    const Tensor b = random_tensor({2, 5}, 8);
    w.add_f32_tensor("b", b);
    const fs::path path = dir / cat("a", alignment, ".gguf");
    w.write(path);
    const GgufFile f = GgufFile::open(path);
    EXPECT_EQ(f.alignment(), alignment);
    for (const GgufTensorInfo& t : f.tensors()) EXPECT_EQ(t.offset % alignment, 0u);
    // With alignment 1 the F32 data can sit at an odd address: it is then copied, not viewed.
    const Tensor back = f.load_f32("b");
    EXPECT_EQ(std::memcmp(back.data(), b.data(), 10 * sizeof(float)), 0);
  }
}

TEST(GgufWriter, SpilledTensorDataWritesTheSameFile) {
  const fs::path dir = test::temp_dir();
  const auto fill = [](GgufWriter& w) {
    w.set_u32("general.alignment", 64);
    w.add_quantized_tensor("a", random_tensor({3, 64}, 7), GgmlType::Q4_1);
    w.add_f32_tensor("b", random_tensor({2, 5}, 8));  // 40 bytes: padding follows
    w.add_quantized_tensor("c", random_tensor({33}, 9), GgmlType::F16);
  };
  GgufWriter held;
  fill(held);
  held.write(dir / "held.gguf");
  {
    GgufWriter spilled;
    spilled.spill_data_to(dir / "data.partial");
    fill(spilled);
    EXPECT_THROW(spilled.spill_data_to(dir / "again"), Error);
    spilled.write(dir / "spilled.gguf");
    EXPECT_TRUE(fs::exists(dir / "data.partial"));
  }
  EXPECT_FALSE(fs::exists(dir / "data.partial"));  // the writer removes its spill file
  EXPECT_EQ(file_bytes(dir / "spilled.gguf"), file_bytes(dir / "held.gguf"));
}

TEST(GgufWriter, RejectsInvalidInput) {
  GgufWriter w;
  EXPECT_THROW(w.set("k", uint64_t{256}, GgufValueType::U8), Error);
  EXPECT_THROW(w.set("k", int64_t{1}, GgufValueType::U32), Error);
  EXPECT_THROW(w.set("k", std::string("x"), GgufValueType::F32), Error);
  EXPECT_THROW(w.set("k", array(GgufValueType::I8, {int64_t{200}}), GgufValueType::ARRAY), Error);
  EXPECT_THROW(w.add_tensor("t", {2, 33}, GgmlType::Q4_0, std::vector<uint8_t>(100)), Error);
  EXPECT_THROW(w.add_tensor("t", {2, 32}, GgmlType::Q4_0, std::vector<uint8_t>(35)), Error);
  EXPECT_THROW(w.add_tensor("t", {0, 32}, GgmlType::Q4_0, {}), Error);
  EXPECT_THROW(w.add_tensor("t", {1, 1, 1, 1, 32}, GgmlType::Q4_0, std::vector<uint8_t>(18)),
               Error);
  w.add_tensor("t", {2, 32}, GgmlType::Q4_0, std::vector<uint8_t>(36));
  EXPECT_THROW(w.add_tensor("t", {2, 32}, GgmlType::Q4_0, std::vector<uint8_t>(36)), Error);
  w.set_u32("general.alignment", 24);
  EXPECT_THROW(w.write(test::temp_dir() / "x.gguf"), Error);
}

TEST(GgufWriter, CopiesKeysWithTheirStoredType) {
  const fs::path dir = test::temp_dir();
  GgufWriter a;
  a.set("k.i16", int64_t{-3}, GgufValueType::I16);
  a.set_i32_array("k.ints", {4, 5});
  a.write(dir / "a.gguf");
  const GgufFile fa = GgufFile::open(dir / "a.gguf");
  GgufWriter b;
  b.copy_kv(fa, "k.i16");
  b.copy_kv(fa, "k.ints");
  EXPECT_THROW(b.copy_kv(fa, "k.absent"), Error);
  b.write(dir / "b.gguf");
  const GgufFile fb = GgufFile::open(dir / "b.gguf");
  EXPECT_EQ(fb.value_type("k.i16"), GgufValueType::I16);
  EXPECT_TRUE(same_value(*fb.find("k.ints"), *fa.find("k.ints")));
  EXPECT_EQ(std::get<std::shared_ptr<GgufArray>>(*fb.find("k.ints"))->type, GgufValueType::I32);
}

TEST(GgufFile, TypedGettersNameKeyAndTypes) {
  const fs::path dir = test::temp_dir();
  GgufWriter w;
  w.set_string("s", "text");
  w.set("big", uint64_t{1} << 63, GgufValueType::U64);
  w.set("i", int64_t{7}, GgufValueType::I32);
  w.set_f32_array("floats", {1.5f});
  w.write(dir / "g.gguf");
  const GgufFile f = GgufFile::open(dir / "g.gguf");

  EXPECT_EQ(f.get_int_or("absent", -1), -1);
  EXPECT_EQ(f.get_string_or("absent", "fb"), "fb");
  EXPECT_EQ(f.get_float_or("i", 0), 7.0);  // integers widen to floats
  EXPECT_EQ(f.get_float_array("floats"), std::vector<double>{1.5});
  EXPECT_THROW(f.get_int("absent"), Error);
  EXPECT_THROW(f.get_int("big"), Error);  // does not fit int64
  EXPECT_THROW(f.get_bool_or("i", false), Error);
  EXPECT_THROW(f.get_string_array("floats"), Error);
  EXPECT_THROW(f.load_f32("absent"), Error);
  try {
    f.get_int("s");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("g.gguf"), std::string::npos) << m;
    EXPECT_NE(m.find("'s'"), std::string::npos) << m;
    EXPECT_NE(m.find("expected an integer"), std::string::npos) << m;
    EXPECT_NE(m.find("got string"), std::string::npos) << m;
  }
  try {
    f.get_int_array("floats");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("got array of f32"), std::string::npos) << e.what();
  }
}

TEST(GgufFile, ReadsHandBuiltV2AndV3Files) {
  const fs::path dir = test::temp_dir();
  for (uint32_t version : {2u, 3u}) {
    RawGguf r;
    r.header(version, 1, 1).kv_u32("llama.block_count", 1).tensor("w", {8}, 0, 0).pad();
    for (int i = 0; i < 8; ++i) r.put(static_cast<float>(i) * 0.5f);
    const GgufFile f = GgufFile::open(r.save(dir, cat("v", version, ".gguf")));
    EXPECT_EQ(f.version(), version);
    EXPECT_EQ(f.get_int("llama.block_count"), 1);
    const Tensor t = f.load_f32("w");
    ASSERT_EQ(t.shape(), Shape{8});
    EXPECT_EQ(t.data()[7], 3.5f);
  }
}

TEST(GgufFile, RejectsCorruptFilesWithOneLineErrors) {
  const fs::path dir = test::temp_dir();
  RawGguf r;

  r = valid_raw();
  r.b[0] = 'X';
  expect_open_error(r.save(dir, "magic.gguf"), "magic: expected \"GGUF\"");
  expect_open_error(RawGguf{{'G', 'G'}}.save(dir, "tiny.gguf"), "magic");
  expect_open_error(RawGguf{}.save(dir, "empty.gguf"), "magic");

  r = {};
  r.header(1, 0, 0);
  expect_open_error(r.save(dir, "v1.gguf"), "version: expected 2 or 3, got 1");
  r = {};
  r.header(4, 0, 0);
  expect_open_error(r.save(dir, "v4.gguf"), "version: expected 2 or 3, got 4");
  r = {};
  r.header(0x03000000, 0, 0);
  expect_open_error(r.save(dir, "bigendian.gguf"), "big-endian");

  const std::vector<uint8_t> valid = valid_raw().b;
  for (size_t len : {size_t{6}, size_t{20}, size_t{30}, size_t{60}}) {
    RawGguf cut{std::vector<uint8_t>(valid.begin(), valid.begin() + static_cast<long>(len))};
    expect_open_error(cut.save(dir, cat("truncated", len, ".gguf")), "expected");
  }
  RawGguf cut{std::vector<uint8_t>(valid.begin(), valid.end() - 1)};
  expect_open_error(cut.save(dir, "truncated_data.gguf"), "tensor 'w' offset");

  r = {};
  r.header(3, 1, 0).tensor("w", {8}, 0, 64).pad().data(32);
  expect_open_error(r.save(dir, "past_end.gguf"), "tensor 'w' offset");
  r = {};
  r.header(3, 1, 0).tensor("w", {8}, 0, 16).pad().data(64);
  expect_open_error(r.save(dir, "misaligned.gguf"),
                    "tensor 'w' offset: expected a multiple of the alignment 32, got 16");
  r = {};
  r.header(3, 1, 0).tensor("blk.0.attn_q.weight", {32}, 99, 0).pad().data(64);
  expect_open_error(r.save(dir, "type99.gguf"),
                    "tensor 'blk.0.attn_q.weight' type: expected a supported ggml type, got 99");
  r = {};
  r.header(3, 1, 0).tensor("w", {256}, 16, 0).pad().data(256);
  expect_open_error(r.save(dir, "iq2.gguf"), "got 16 (IQ2_XXS)");
  r = {};
  r.header(3, 1, 0).tensor("w", {1, 1, 1, 1, 8}, 0, 0).pad().data(32);
  expect_open_error(r.save(dir, "dims5.gguf"), "tensor 'w' n_dims: expected 1..4, got 5");
  r = {};
  r.header(3, 1, 0).tensor("w", {8, 0}, 0, 0).pad().data(32);
  expect_open_error(r.save(dir, "dim0.gguf"), "tensor 'w' ne[1]");
  r = {};
  r.header(3, 1, 0).tensor("w", {uint64_t{1} << 40, uint64_t{1} << 40}, 0, 0).pad().data(32);
  expect_open_error(r.save(dir, "overflow.gguf"), "tensor 'w' ne[1]");
  r = {};
  r.header(3, 1, 0).tensor("w", {48}, 2, 0).pad().data(64);
  expect_open_error(r.save(dir, "block.gguf"), "tensor 'w' ne[0]: expected a multiple of 32");
  r = {};
  r.header(3, 2, 0).tensor("w", {8}, 0, 0).tensor("w", {8}, 0, 32).pad().data(64);
  expect_open_error(r.save(dir, "dup_tensor.gguf"), "tensor 'w' name: expected unique");
  r = {};
  r.header(3, 0, 2).kv_u32("k", 1).kv_u32("k", 2);
  expect_open_error(r.save(dir, "dup_key.gguf"), "metadata 'k'");
  r = {};
  r.header(3, 0, 1).str("k").put(static_cast<uint32_t>(13)).put(uint32_t{0});
  expect_open_error(r.save(dir, "value_type.gguf"),
                    "metadata 'k' type: expected a value type 0..12, got 13");
  r = {};
  r.header(3, 0, 1)
      .str("k")
      .put(static_cast<uint32_t>(GgufValueType::STRING))
      .put(uint64_t{1000})
      .data(8);
  expect_open_error(r.save(dir, "string_len.gguf"), "metadata 'k' value string length");
  r = {};
  r.header(3, 0, 1)
      .str("k")
      .put(static_cast<uint32_t>(GgufValueType::ARRAY))
      .put(uint32_t{4})
      .put(uint64_t{1} << 60);
  expect_open_error(r.save(dir, "array_count.gguf"),
                    "metadata 'k' array header: expected at most 0 u32");
  r = {};
  r.header(3, 0, 1).str("k").put(static_cast<uint32_t>(GgufValueType::ARRAY));
  for (int i = 0; i < 20; ++i) r.put(static_cast<uint32_t>(GgufValueType::ARRAY)).put(uint64_t{1});
  r.put(static_cast<uint32_t>(GgufValueType::U32)).put(uint64_t{0}).data(64);
  expect_open_error(r.save(dir, "deep.gguf"), "nested");
  r = {};
  r.header(3, 0, 1).str("k").put(static_cast<uint32_t>(GgufValueType::BOOL)).put(uint8_t{2});
  expect_open_error(r.save(dir, "bool.gguf"), "metadata 'k' value: expected a bool");
  r = {};
  r.header(3, uint64_t{1} << 62, 0).data(64);
  expect_open_error(r.save(dir, "n_tensors.gguf"), "tensor count");
  r = {};
  r.header(3, 0, uint64_t{1} << 62).data(64);
  expect_open_error(r.save(dir, "n_kv.gguf"), "metadata count");
  r = {};
  r.header(3, 1, 1).kv_u32("general.alignment", 24).tensor("w", {8}, 0, 0).pad().data(32);
  expect_open_error(r.save(dir, "alignment.gguf"), "general.alignment");
  r = {};
  r.header(3, 1, 0).tensor("bad\nname", {8}, 99, 0).pad().data(32);
  expect_open_error(r.save(dir, "newline.gguf"), "bad\\x0aname");
}

TEST(GgufFile, SurvivesTruncationAndBitFlipsFuzz) {
  const fs::path dir = test::temp_dir();
  GgufWriter w;
  w.set_string("general.architecture", "llama");
  w.set_u32("llama.block_count", 2);
  w.set_string_array("tokenizer.ggml.tokens", {"a", "bc"});
  w.set_f32_array("tokenizer.ggml.scores", {0.5f, -1.0f});
  w.set("nested", array(GgufValueType::ARRAY, {array(GgufValueType::I8, {int64_t{1}})}),
        GgufValueType::ARRAY);
  w.add_f32_tensor("f32", random_tensor({2, 3}, 9));
  w.add_quantized_tensor("q4_1", random_tensor({2, 32}, 10), GgmlType::Q4_1);
  w.add_quantized_tensor("q8_0", random_tensor({1, 32}, 11), GgmlType::Q8_0);
  const fs::path src = dir / "valid.gguf";
  w.write(src);
  const std::vector<uint8_t> valid = file_bytes(src);

  int loaded = 0, rejected = 0;
  auto attempt = [&](const std::vector<uint8_t>& bytes) {
    // A fresh name each time: truncating a file in place makes ext4 flush it to disk (slow).
    const fs::path p = dir / cat("fuzz", loaded + rejected, ".gguf");
    put_bytes(p, bytes);
    try {
      const GgufFile f = GgufFile::open(p);
      for (const GgufTensorInfo& t : f.tensors()) {
        const Tensor x = f.load_f32(t);
        EXPECT_EQ(x.shape(), t.shape);
      }
      (void)f.get_string_or("general.architecture", "");
      ++loaded;
    } catch (const Error& e) {
      EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << e.what();
      ++rejected;
    }
    fs::remove(p);
  };
  for (size_t len = 0; len < valid.size(); ++len)
    attempt(std::vector<uint8_t>(valid.begin(), valid.begin() + static_cast<long>(len)));
  for (size_t i = 0; i < valid.size(); ++i) {
    for (uint8_t mask : {uint8_t{0x01}, uint8_t{0x80}, uint8_t{0xff}}) {
      std::vector<uint8_t> b = valid;
      b[i] ^= mask;
      attempt(b);
    }
  }
  EXPECT_GT(loaded, 0);
  EXPECT_GT(rejected, static_cast<int>(valid.size()) / 2);
}

TEST(GgufFile, LoadsStories260K) {
  QL_REQUIRE_DATA("models/stories260K/stories260K.gguf");
  const GgufFile f = GgufFile::open(test::data_dir() / "models/stories260K/stories260K.gguf");
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.get_string("general.architecture"), "llama");
  EXPECT_EQ(f.get_int("llama.block_count"), 5);
  EXPECT_EQ(f.get_int("llama.embedding_length"), 64);
  EXPECT_EQ(f.get_int("llama.attention.head_count_kv"), 4);
  EXPECT_FLOAT_EQ(static_cast<float>(f.get_float_or("llama.attention.layer_norm_rms_epsilon", 0)),
                  1e-5f);
  EXPECT_EQ(f.get_string_array("tokenizer.ggml.tokens").size(), 512u);
  EXPECT_EQ(f.get_float_array("tokenizer.ggml.scores").size(), 512u);
  EXPECT_EQ(f.get_int("tokenizer.ggml.padding_token_id"), 4294967295);
  ASSERT_EQ(f.tensors().size(), 48u);
  for (const GgufTensorInfo& t : f.tensors()) {
    EXPECT_EQ(t.type, GgmlType::F32) << t.name;
    const Tensor x = f.load_f32(t);
    EXPECT_EQ(x.data(), reinterpret_cast<const float*>(f.tensor_data(t))) << t.name;
    for (float v : x.span()) ASSERT_TRUE(std::isfinite(v)) << t.name;
  }
  EXPECT_EQ(f.find_tensor("token_embd.weight")->shape, (Shape{512, 64}));
}

TEST(GgufFile, LoadsSmolLM2Q4_1) {
  QL_REQUIRE_SMOLLM2();
  const GgufFile f = GgufFile::open(test::smollm2_path());
  EXPECT_EQ(f.get_string("general.architecture"), "llama");
  EXPECT_EQ(f.get_int("llama.block_count"), 30);
  EXPECT_EQ(f.get_string("tokenizer.ggml.model"), "gpt2");
  EXPECT_EQ(f.get_string_array("tokenizer.ggml.tokens").size(), 49152u);
  EXPECT_EQ(f.get_string_array("tokenizer.ggml.merges").size(), 48900u);
  EXPECT_EQ(f.get_int_array("tokenizer.ggml.token_type").size(), 49152u);
  ASSERT_EQ(f.tensors().size(), 272u);
  const GgufTensorInfo* embd = f.find_tensor("token_embd.weight");
  ASSERT_NE(embd, nullptr);
  EXPECT_EQ(embd->type, GgmlType::Q8_0);
  EXPECT_EQ(embd->shape, (Shape{49152, 576}));
  for (const char* name : {"token_embd.weight", "blk.0.ffn_down.weight", "blk.29.attn_q.weight"}) {
    const Tensor x = f.load_f32(name);
    double sum_sq = 0;
    for (float v : x.span()) {
      ASSERT_TRUE(std::isfinite(v)) << name;
      sum_sq += static_cast<double>(v) * v;
    }
    EXPECT_GT(sum_sq, 0.0) << name;
  }
  EXPECT_EQ(f.find_tensor("blk.0.ffn_down.weight")->type, GgmlType::Q4_1);
  EXPECT_EQ(f.find_tensor("blk.0.ffn_down.weight")->shape, (Shape{576, 1536}));
}

}  // namespace
}  // namespace qalora
