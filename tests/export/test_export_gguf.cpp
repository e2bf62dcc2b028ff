// GGUF export: read back by our loader and by gguf-py, every weight decodes to the model's own
// value (the Q4_1 path from the codes, offsets rounded to fp16 and reported for a merged QA-LoRA
// model), the logits are those of the model, and lossy conversions are refused.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "export/export_test_util.h"
#include "qalora/core/error.h"
#include "qalora/core/fp16.h"
#include "qalora/export/export.h"
#include "qalora/io/gguf.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;
using test::all_logits;
using test::same_bits;

const char* const kLinearNames[] = {"attn_q",   "attn_k", "attn_v",  "attn_output",
                                    "ffn_gate", "ffn_up", "ffn_down"};

std::string linear_name(size_t l, size_t t) {
  return cat("blk.", l, ".", kLinearNames[t], ".weight");
}

// `m` with every offset that Q4_1 stores rounded to fp16 (linears of a multiple of 32 inputs).
Model with_fp16_offsets(Model m) {
  for (LayerWeights& L : m.layers)
    for (const Target t : all_targets()) {
      QMatrix& q = target_linear(L, t).qweight;
      if (q.codes.empty() || q.cols % 32 != 0) continue;
      float* o = q.offsets.writable();
      for (int64_t g = 0; g < q.offsets.size(); ++g) o[g] = fp16_to_fp32(fp32_to_fp16(o[g]));
    }
  return m;
}

// Every linear of `back` holds exactly the values of `want`.
void expect_same_linears(const Model& back, const Model& want) {
  ASSERT_EQ(back.layers.size(), want.layers.size());
  for (size_t l = 0; l < want.layers.size(); ++l) {
    const std::vector<Tensor> b = test::dense_linears(back, l), w = test::dense_linears(want, l);
    for (size_t t = 0; t < w.size(); ++t) EXPECT_TRUE(same_bits(b[t], w[t])) << linear_name(l, t);
  }
}

// gguf-py decodes every tensor of `path` to `want`'s values; returns the metadata (empty when
// python is missing, after recording the skip reason).
std::map<std::string, std::string> expect_gguf_py_reads(const fs::path& path, const Model& want) {
  std::string skip;
  const auto r = test::gguf_py_readback(path, skip);
  if (!r) {
    if (!skip.empty()) std::printf("[gguf-py check skipped] %s\n", skip.c_str());
    return {};
  }
  for (size_t l = 0; l < want.layers.size(); ++l) {
    const std::vector<Tensor> w = test::dense_linears(want, l);
    for (size_t t = 0; t < w.size(); ++t) {
      const auto it = r->tensors.find(linear_name(l, t));
      EXPECT_NE(it, r->tensors.end()) << linear_name(l, t);
      if (it != r->tensors.end()) {
        EXPECT_TRUE(same_bits(it->second, w[t])) << "gguf-py: " << linear_name(l, t);
      }
    }
  }
  EXPECT_TRUE(same_bits(r->tensors.at("token_embd.weight"), want.tok_embeddings));
  EXPECT_TRUE(same_bits(r->tensors.at("output_norm.weight"), want.final_norm));
  EXPECT_EQ(r->tensors.count("output.weight"), want.output.empty() ? 0u : 1u);
  if (!want.output.empty()) {
    EXPECT_TRUE(same_bits(r->tensors.at("output.weight"), want.output));
  }
  return r->metadata;
}

TEST(ExportGguf, Int4G32GoesToQ4_1FromTheCodes) {
  QL_REQUIRE_DATA("models/stories260K/stories260K.bin");
  const Model src = test::quantized(test::load_stories(), "rtn", 4, 32);
  const fs::path path = test::temp_dir() / "q4.gguf";
  const ExportReport report = export_gguf(src, path, {});
  EXPECT_TRUE(report.exact()) << report.to_json().dump();

  const GgufFile f = GgufFile::open(path);
  for (size_t l = 0; l < src.layers.size(); ++l)
    for (size_t t = 0; t < 7; ++t) {
      // stories260K's down projection has 172 inputs: no block type, F32 (exact).
      const GgmlType want = t == 6 ? GgmlType::F32 : GgmlType::Q4_1;
      EXPECT_EQ(f.find_tensor(linear_name(l, t))->type, want) << linear_name(l, t);
    }
  EXPECT_EQ(f.find_tensor("output.weight"), nullptr) << "stories260K ties its head";
  EXPECT_EQ(f.get_string("general.architecture"), "llama");
  EXPECT_EQ(f.get_int("llama.block_count"), 5);
  EXPECT_EQ(f.get_int("llama.attention.head_count_kv"), 4);
  EXPECT_EQ(f.get_int("general.file_type"), 3);  // mostly Q4_1

  const Model back = load_gguf_model(path);
  expect_same_linears(back, src);
  const Model dense = dequantized_model(src);
  EXPECT_EQ(all_logits(back), all_logits(dense));
  EXPECT_LE(test::max_abs_diff(all_logits(back), all_logits(src)), 1e-4);
  const std::string text = "Once upon a time, a girl saw a big dog.";
  EXPECT_EQ(back.require_tokenizer().encode(text, true),
            src.require_tokenizer().encode(text, true));

  const auto meta = expect_gguf_py_reads(path, dense);
  if (!meta.empty()) {
    EXPECT_EQ(meta.at("kv:general.architecture"), "llama");
    EXPECT_EQ(meta.at("kv:llama.embedding_length"), "64");
    EXPECT_EQ(meta.at("kv:llama.feed_forward_length"), "172");
    EXPECT_EQ(meta.at("kv:llama.rope.dimension_count"), "8");
    EXPECT_EQ(meta.at("kv:tokenizer.ggml.model"), "llama");
    EXPECT_EQ(meta.at("len:tokenizer.ggml.tokens"), "512");
    EXPECT_EQ(meta.at("len:tokenizer.ggml.scores"), "512");
    EXPECT_EQ(meta.at("kv:tokenizer.ggml.bos_token_id"), "1");
    EXPECT_EQ(meta.at("type:blk.0.attn_q.weight"), "Q4_1");
  }
}

TEST(ExportGguf, MergedQaLoraRoundsOnlyTheOffsetsAndReportsIt) {
  QL_REQUIRE_DATA("models/stories260K/stories260K.bin");
  const Model src = test::merged_qalora(test::quantized(test::load_stories(), "rtn", 4, 32), 21);
  const fs::path path = test::temp_dir() / "merged.gguf";
  const ExportReport report = export_gguf(src, path, {});
  const Model want = with_fp16_offsets(src);

  // The report states what rounding the offsets does, in m and in w.
  double dm = 0, dw = 0;
  for (size_t l = 0; l < src.layers.size(); ++l) {
    const std::vector<Tensor> a = test::dense_linears(src, l), b = test::dense_linears(want, l);
    for (size_t t = 0; t < a.size(); ++t)
      dw = std::max(dw, test::max_abs_diff(a[t].data(), b[t].data(), a[t].numel()));
    for (const Target t : all_targets()) {
      const QMatrix& q = target_linear(src.layers[l], t).qweight;
      const QMatrix& r = target_linear(want.layers[l], t).qweight;
      dm = std::max(dm, test::max_abs_diff(q.offsets.to_vector().data(),
                                           r.offsets.to_vector().data(), q.offsets.size()));
    }
  }
  EXPECT_GT(dm, 0) << "merged offsets are fp32";
  EXPECT_EQ(report.max_abs_dm(), dm);
  EXPECT_EQ(report.max_abs_dw(), dw);
  EXPECT_GT(report.relative_error(), 0);
  EXPECT_LT(report.relative_error(), 1e-3);

  const Model back = load_gguf_model(path);
  expect_same_linears(back, want);
  EXPECT_EQ(all_logits(back), all_logits(dequantized_model(want)));
  EXPECT_LE(test::max_abs_diff(all_logits(back), all_logits(src)), 1e-2);
  expect_gguf_py_reads(path, dequantized_model(want));
}

// A dense model in F16 and Q8_0, with a tied and an untied head.
TEST(ExportGguf, DenseModelInF16AndQ8_0) {
  for (const bool tied : {true, false})
    for (const GgmlType type : {GgmlType::F16, GgmlType::Q8_0}) {
      SCOPED_TRACE(testing::Message() << ggml_type_name(type) << (tied ? " tied" : " untied"));
      const Model src = test::make_random_model(test::aligned_shape(tied), 5);
      const fs::path path = test::temp_dir() / "dense.gguf";
      const ExportReport report = export_gguf(src, path, {type, false});
      EXPECT_FALSE(report.exact()) << "random fp32 weights do not fit " << ggml_type_name(type);
      const GgufFile f = GgufFile::open(path);
      EXPECT_EQ(f.find_tensor("blk.1.ffn_down.weight")->type, type);
      EXPECT_EQ(f.find_tensor("token_embd.weight")->type, GgmlType::F32) << "not --type's";
      EXPECT_EQ(f.find_tensor("output.weight") != nullptr, !tied);

      // What a consumer should see: fp16-rounded weights, or gguf-py's decoding of the Q8_0
      // blocks (an independent dequantizer) within half a Q8_0 step of the source.
      Model want = src;
      std::string skip;
      const auto py = test::gguf_py_readback(path, skip);
      if (type == GgmlType::Q8_0 && !py) GTEST_SKIP() << skip;
      for (size_t l = 0; l < want.layers.size(); ++l)
        for (size_t t = 0; t < 7; ++t) {
          Tensor& w = target_linear(want.layers[l], all_targets()[t]).weight;
          const Tensor original = w;
          w = Tensor::zeros(original.shape());
          for (int64_t i = 0; i < w.numel(); ++i)
            w.mutable_data()[i] = type == GgmlType::F16
                                      ? fp16_to_fp32(fp32_to_fp16(original.data()[i]))
                                      : py->tensors.at(linear_name(l, t)).data()[i];
          if (type == GgmlType::Q8_0)
            for (int64_t b = 0; b < w.numel() / 32; ++b) {
              float amax = 0;
              for (int k = 0; k < 32; ++k)
                amax = std::max(amax, std::abs(original.data()[b * 32 + k]));
              EXPECT_LE(test::max_abs_diff(w.data() + b * 32, original.data() + b * 32, 32),
                        0.55 * amax / 127)
                  << linear_name(l, t) << " block " << b;
            }
        }
      const Model back = load_gguf_model(path);
      expect_same_linears(back, want);
      EXPECT_EQ(all_logits(back), all_logits(want));
      if (py) expect_gguf_py_reads(path, want);
    }
}

// A model read from a Hugging Face folder (q/k rows permuted to pairs on load) exports in the
// pair layout GGUF llama uses: same weights, same logits.
TEST(ExportGguf, HfSourcedModelsKeepThePairLayout) {
  for (const bool quantize : {false, true}) {
    SCOPED_TRACE(quantize ? "INT4 g32 native folder" : "dense folder");
    Model src = test::make_random_model(test::aligned_shape(false), 6);
    if (quantize) src = test::quantized(std::move(src), "rtn", 4, 32);
    const fs::path dir = test::temp_dir();
    save_hf_model(src, dir / "hf");
    const Model hf = load_hf_model(dir / "hf");
    const ExportReport report = export_gguf(hf, dir / "m.gguf", {});
    EXPECT_TRUE(report.exact());
    const Model back = load_gguf_model(dir / "m.gguf");
    expect_same_linears(back, src);
    EXPECT_EQ(all_logits(back), all_logits(dequantized_model(src)));
  }
}

// qwen2 in GGUF uses llama.cpp's NEOX (halves) rope: q/k rows and biases go back to halves,
// and our loader brings them to pairs again.
TEST(ExportGguf, Qwen2KeepsItsHalvesLayoutAndBiases) {
  test::RandomModelShape shape = test::aligned_shape(true);
  shape.qkv_bias = true;
  Model src = test::make_random_model(shape, 8);
  src.config.arch = "qwen2";
  const fs::path path = test::temp_dir() / "qwen2.gguf";
  export_gguf(src, path, {});
  const GgufFile f = GgufFile::open(path);
  EXPECT_EQ(f.get_string("general.architecture"), "qwen2");
  EXPECT_TRUE(same_bits(f.load_f32("blk.0.attn_q.weight"),
                        permute_rope_rows(src.layers[0].q.weight, 4, 16, true)));
  const Model back = load_gguf_model(path);
  expect_same_linears(back, src);
  EXPECT_TRUE(same_bits(back.layers[1].k.bias, src.layers[1].k.bias));
  EXPECT_EQ(all_logits(back), all_logits(src));
}

// A head kept in its source quantization (Model::head_q) is written back byte for byte.
TEST(ExportGguf, QuantizedHeadIsWrittenBackByteForByte) {
  for (const bool tied : {true, false}) {
    SCOPED_TRACE(tied ? "tied Q8_0 embedding" : "untied Q4_0 head");
    Model src = test::make_random_model(test::aligned_shape(tied), 9);
    const GgmlType type = tied ? GgmlType::Q8_0 : GgmlType::Q4_0;
    const Tensor& head = tied ? src.tok_embeddings : src.output;
    const int64_t rows = head.dim(0), cols = head.dim(1);
    std::vector<uint8_t> bytes(ggml_row_bytes(type, cols) * static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r)
      quantize_row(type, head.data() + r * cols, bytes.data() + r * ggml_row_bytes(type, cols),
                   cols);
    src.head_q = *ggml_to_qmatrix(type, bytes.data(), rows, cols);
    (tied ? src.tok_embeddings : src.output) = dequantize(src.head_q);

    const fs::path path = test::temp_dir() / "head.gguf";
    export_gguf(src, path, {GgmlType::F32, false});
    const GgufFile f = GgufFile::open(path);
    const GgufTensorInfo* t = f.find_tensor(tied ? "token_embd.weight" : "output.weight");
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->type, type);
    ASSERT_EQ(t->nbytes, bytes.size());
    EXPECT_EQ(std::memcmp(f.tensor_data(*t), bytes.data(), bytes.size()), 0);
    const Model back = load_gguf_model(path);
    EXPECT_EQ(back.head_q.codes, src.head_q.codes);
    EXPECT_EQ(all_logits(back), all_logits(src));
  }
}

// The default model, a Q4_1 GGUF with a Q8_0 embedding: every tensor is re-encoded in its source
// type, byte for byte.
TEST(ExportGguf, SmolLm2ReexportsByteForByte) {
  QL_REQUIRE_SMOLLM2();
  const Model src = load_gguf_model(test::smollm2_path());
  const fs::path path = test::temp_dir() / "smol.gguf";
  const ExportReport report = export_gguf(src, path, {});
  EXPECT_TRUE(report.exact());
  const GgufFile a = GgufFile::open(test::smollm2_path()), b = GgufFile::open(path);
  for (const GgufTensorInfo& t : a.tensors()) {
    const GgufTensorInfo* u = b.find_tensor(t.name);
    ASSERT_NE(u, nullptr) << t.name;
    EXPECT_EQ(u->type, t.type) << t.name;
    ASSERT_EQ(u->nbytes, t.nbytes) << t.name;
    EXPECT_EQ(std::memcmp(a.tensor_data(t), b.tensor_data(*u), t.nbytes), 0) << t.name;
  }
  EXPECT_EQ(b.get_string_array("tokenizer.ggml.merges"),
            a.get_string_array("tokenizer.ggml.merges"));
  EXPECT_EQ(b.get_string("tokenizer.chat_template"), a.get_string("tokenizer.chat_template"));
}

// A GPT-2 tokenizer not read from GGUF (here SmolLM2's, on a small random model marked as a
// Hugging Face model) is written with the keys llama.cpp's converter writes.
TEST(ExportGguf, Gpt2TokenizerMetadataAsLlamaCppWritesIt) {
  QL_REQUIRE_SMOLLM2();
  test::RandomModelShape shape = test::aligned_shape(true);
  shape.vocab = 49152;
  Model src = test::make_random_model(shape, 10);
  src.tokenizer = load_gguf_tokenizer(test::smollm2_path());
  src.format = ModelFormat::HuggingFace;
  const fs::path path = test::temp_dir() / "tok.gguf";
  export_gguf(src, path, {});
  const GgufFile a = GgufFile::open(test::smollm2_path()), b = GgufFile::open(path);
  for (const char* key : {"tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"})
    EXPECT_EQ(b.get_string(key), a.get_string(key)) << key;
  for (const char* key : {"tokenizer.ggml.tokens", "tokenizer.ggml.merges"})
    EXPECT_EQ(b.get_string_array(key), a.get_string_array(key)) << key;
  EXPECT_EQ(b.get_int_array("tokenizer.ggml.token_type"),
            a.get_int_array("tokenizer.ggml.token_type"));
  for (const char* key : {"tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                          "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id"})
    EXPECT_EQ(b.get_int(key), a.get_int(key)) << key;
  EXPECT_EQ(b.get_bool_or("tokenizer.ggml.add_bos_token", true),
            a.get_bool_or("tokenizer.ggml.add_bos_token", true));
  const std::string text = "<|im_start|>user\nHello, wörld! 12345<|im_end|>";
  EXPECT_EQ(load_gguf_model(path).require_tokenizer().encode(text, true, true),
            src.tokenizer->encode(text, true, true));
}

TEST(ExportGguf, LossyConversionsNeedAllowLossy) {
  QL_REQUIRE_DATA("models/stories260K/stories260K.bin");
  const Model stories = test::load_stories();
  const Model int4 = test::quantized(stories, "rtn", 4, 32);
  const fs::path path = test::temp_dir() / "x.gguf";
  const auto expect_refused = [&](const Model& m, GgmlType type, const std::string& what) {
    try {
      export_gguf(m, path, {type, false});
      ADD_FAILURE() << what << " to " << ggml_type_name(type) << " was not refused";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("--allow-lossy"), std::string::npos) << e.what();
      EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << e.what();
    }
    EXPECT_FALSE(fs::exists(path)) << "nothing is written";
  };
  expect_refused(int4, GgmlType::Q4_0, "asymmetric INT4");
  expect_refused(test::quantized(stories, "int8", 8, -1), GgmlType::Q4_1, "INT8");
  expect_refused(test::quantized(stories, "nf4", 4, 64), GgmlType::Q8_0, "NF4");
  expect_refused(test::quantized(stories, "rtn", 4, 16), GgmlType::Q4_1, "INT4 g16");

  // Allowed, the error is reported and is what the file holds.
  const ExportReport r = export_gguf(int4, path, {GgmlType::Q4_0, true});
  EXPECT_GT(r.relative_error(), 0);
  const Model back = load_gguf_model(path);
  double dw = 0;
  for (size_t l = 0; l < int4.layers.size(); ++l) {
    const std::vector<Tensor> a = test::dense_linears(back, l), b = test::dense_linears(int4, l);
    for (size_t t = 0; t < a.size(); ++t)
      dw = std::max(dw, test::max_abs_diff(a[t].data(), b[t].data(), a[t].numel()));
  }
  EXPECT_EQ(r.max_abs_dw(), dw);

  // What fits needs no flag: NF4 and act-order-free INT4 g16 under auto go to an exact float
  // type, and ragged rows forced to Q4_1 fall back to one, with a note.
  EXPECT_TRUE(export_gguf(test::quantized(stories, "nf4", 4, 64), path, {}).exact());
  const ExportReport ragged = export_gguf(int4, path, {GgmlType::Q4_1, false});
  EXPECT_TRUE(ragged.exact());
  for (const TensorExport& t : ragged.tensors)
    EXPECT_EQ(t.note.empty(), t.name.find("ffn_down") == std::string::npos) << t.name;
}

}  // namespace
}  // namespace qalora
