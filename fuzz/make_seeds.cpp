// Writes the seed corpora of every fuzz target into OUT/<target>/: small valid files of each
// format, made with the project's own writers (a fuzzer mutates from there), laid out as the
// targets read their input (selector bytes, parts joined by kPartSeparator).
//   qalora_fuzz_seeds OUT
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "fixtures.h"
#include "fuzz_util.h"
#include "qalora/adapters/adapter.h"
#include "qalora/adapters/adapter_io.h"
#include "qalora/export/export.h"
#include "qalora/io/gguf.h"
#include "qalora/io/safetensors.h"
#include "qalora/tokenizer/unicode.h"

namespace fs = std::filesystem;
using namespace qalora;

namespace {

fs::path g_out;
fs::path g_scratch;  // where the writers write, before the files become seeds

void seed(const std::string& target, const std::string& name, const std::string& bytes) {
  fuzz::write_file(g_out / target, name, bytes);
}

std::string selector(uint8_t byte) {
  return std::string(1, static_cast<char>(byte));
}

// Reads the named files of `dir` as the parts of one input ("" for a missing one).
std::string parts_of(const fs::path& dir, const std::vector<std::string>& names) {
  std::vector<std::string> parts;
  for (const std::string& n : names)
    parts.push_back(fs::exists(dir / n) ? fuzz::read_file(dir / n) : std::string());
  return fuzz::join_parts(parts);
}

fs::path scratch(const std::string& name) {
  const fs::path p = g_scratch / name;
  fs::remove_all(p);
  return p;
}

std::vector<uint8_t> bytes_of(const std::vector<float>& v) {
  std::vector<uint8_t> b(v.size() * sizeof(float));
  std::memcpy(b.data(), v.data(), b.size());
  return b;
}

void gguf_seeds() {
  // The tiny model as the exporter writes it (hyperparameters and the tokenizer included).
  export_gguf(fuzz::tiny_model(false), scratch("model.gguf"), {});
  seed("gguf", "model", fuzz::read_file(g_scratch / "model.gguf"));

  // Every metadata value type and the block types, on 32- and 256-element rows.
  GgufWriter w;
  w.set("t.u8", uint64_t{7}, GgufValueType::U8);
  w.set("t.i8", int64_t{-7}, GgufValueType::I8);
  w.set("t.u16", uint64_t{700}, GgufValueType::U16);
  w.set("t.i16", int64_t{-700}, GgufValueType::I16);
  w.set("t.i32", int64_t{-70000}, GgufValueType::I32);
  w.set("t.u64", uint64_t{1} << 40, GgufValueType::U64);
  w.set("t.i64", int64_t{-1} << 40, GgufValueType::I64);
  w.set("t.f64", 0.25, GgufValueType::F64);
  w.set_u32("general.alignment", 64);
  w.set_f32("t.f32", 1.5f);
  w.set_bool("t.bool", true);
  w.set_string("general.architecture", "llama");
  w.set_string_array("t.strings", {"a", "", "b c"});
  w.set_f32_array("t.floats", {1, 2, 3});
  w.set_i32_array("t.ints", {-1, 0, 1});
  auto nested = std::make_shared<GgufArray>();
  nested->type = GgufValueType::ARRAY;
  auto inner = std::make_shared<GgufArray>();
  inner->type = GgufValueType::U8;
  inner->values = {uint64_t{1}, uint64_t{2}};
  nested->values = {inner};
  w.set("t.nested", nested, GgufValueType::ARRAY);
  std::vector<float> v(64);
  for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i) * 0.1f - 3.0f;
  const Tensor t = Tensor::view(v.data(), {2, 32}, nullptr);
  w.add_f32_tensor("f32", t);
  for (GgmlType type :
       {GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1})
    w.add_quantized_tensor(ggml_type_name(type), t, type);
  // The other block types as raw bytes: their decoders read whatever a block holds.
  for (GgmlType type :
       {GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K}) {
    const int64_t n = ggml_type_traits(static_cast<uint32_t>(type))->block_size;
    std::vector<uint8_t> raw(ggml_row_bytes(type, n));
    for (size_t i = 0; i < raw.size(); ++i) raw[i] = static_cast<uint8_t>(i * 37 + 11);
    w.add_tensor(ggml_type_name(type), {n}, type, std::move(raw));
  }
  w.write(scratch("types.gguf"));
  seed("gguf", "types", fuzz::read_file(g_scratch / "types.gguf"));
}

void safetensors_seeds() {
  std::vector<StWriteTensor> tensors;
  const std::vector<float> v = {1, -2, 3.5f, 0, 5, 6};
  tensors.push_back({"a.f32", StDtype::F32, {2, 3}, bytes_of(v)});
  tensors.push_back({"b.f16", StDtype::F16, {3}, {0x00, 0x3c, 0x00, 0xc0, 0x00, 0x7c}});
  tensors.push_back({"c.bf16", StDtype::BF16, {1, 2}, {0x80, 0x3f, 0x00, 0x40}});
  tensors.push_back({"d.i32", StDtype::I32, {2}, {1, 0, 0, 0, 2, 0, 0, 0}});
  tensors.push_back({"e.u8", StDtype::U8, {0}, {}});
  tensors.push_back({"f.scalar", StDtype::F32, {}, bytes_of({7})});
  write_safetensors(scratch("one.safetensors"), tensors, {{"format", "pt"}});
  seed("safetensors", "single", selector(0) + fuzz::read_file(g_scratch / "one.safetensors"));

  // Two shards and their index, as Hugging Face writes them.
  const fs::path dir = scratch("sharded");
  fs::create_directories(dir);
  write_safetensors(dir / "model-00001-of-00002.safetensors", {tensors[0], tensors[1]});
  write_safetensors(dir / "model-00002-of-00002.safetensors", {tensors[2]});
  fuzz::write_file(dir, "model.safetensors.index.json",
                   R"({"metadata": {"total_size": 22}, "weight_map": {)"
                   R"("a.f32": "model-00001-of-00002.safetensors",)"
                   R"("b.f16": "model-00001-of-00002.safetensors",)"
                   R"("c.bf16": "model-00002-of-00002.safetensors"}})");
  seed("safetensors", "sharded",
       selector(1) +
           parts_of(dir, {"model.safetensors.index.json", "model-00001-of-00002.safetensors",
                          "model-00002-of-00002.safetensors"}));
}

void hf_folder_seeds() {
  const std::vector<std::string> names = {"config.json", "quantize_config.json",
                                          "model.safetensors", "tokenizer.json"};
  save_hf_model(fuzz::tiny_model(false), scratch("dense"));
  seed("hf_folder", "dense", selector(0) + parts_of(g_scratch / "dense", names));
  // qalora's native quantized folder; also as `qalora info` loads it.
  save_hf_model(fuzz::tiny_model(true), scratch("native"));
  seed("hf_folder", "native", selector(0) + parts_of(g_scratch / "native", names));
  seed("hf_folder", "native_describe", selector(1) + parts_of(g_scratch / "native", names));
  for (const bool v2 : {false, true}) {
    const fs::path dir = scratch(v2 ? "gptq_v2" : "gptq");
    export_gptq(fuzz::tiny_model(true), dir, {v2, false});
    seed("hf_folder", v2 ? "gptq_v2" : "gptq", selector(0) + parts_of(dir, names));
  }
}

// A SentencePiece ModelProto: pieces (piece, score, type), trainer_spec (BPE with byte
// fallback and the special ids) and normalizer_spec, encoded by hand as the format is small.
std::string sentencepiece_model(const TokenizerData& d) {
  const auto varint = [](std::string& out, uint64_t v) {
    for (; v >= 0x80; v >>= 7) out += static_cast<char>((v & 0x7f) | 0x80);
    out += static_cast<char>(v);
  };
  const auto bytes_field = [&](std::string& out, uint32_t field, const std::string& b) {
    varint(out, field << 3 | 2);
    varint(out, b.size());
    out += b;
  };
  const auto varint_field = [&](std::string& out, uint32_t field, uint64_t v) {
    varint(out, field << 3);
    varint(out, v);
  };
  std::string model;
  for (size_t i = 0; i < d.tokens.size(); ++i) {
    std::string piece;
    bytes_field(piece, 1, d.tokens[i]);
    piece += static_cast<char>(2 << 3 | 5);
    char score[4];
    std::memcpy(score, &d.scores[i], 4);
    piece.append(score, 4);
    varint_field(piece, 3, static_cast<uint64_t>(d.types[i]));
    bytes_field(model, 1, piece);
  }
  std::string trainer;
  varint_field(trainer, 3, 2);  // BPE
  varint_field(trainer, 35, 1);
  varint_field(trainer, 40, 0);
  varint_field(trainer, 41, 1);
  varint_field(trainer, 42, 2);
  varint_field(trainer, 43, static_cast<uint64_t>(int64_t{-1}));
  bytes_field(model, 2, trainer);
  std::string normalizer;
  bytes_field(normalizer, 1, "identity");
  varint_field(normalizer, 3, 1);
  varint_field(normalizer, 4, 0);
  bytes_field(model, 3, normalizer);
  return model;
}

// llama2.c's tokenizer.bin of the first `n` tokens: max_token_length, then per token its score,
// length and bytes.
std::string llama2c_tokenizer(const TokenizerData& d, size_t n) {
  std::string out;
  const auto put = [&out](const void* p, size_t n) { out.append(static_cast<const char*>(p), n); };
  const int32_t max_len = 32;
  put(&max_len, 4);
  for (size_t i = 0; i < n; ++i) {
    const auto len = static_cast<int32_t>(d.tokens[i].size());
    put(&d.scores[i], 4);
    put(&len, 4);
    put(d.tokens[i].data(), d.tokens[i].size());
  }
  return out;
}

void tokenizer_seeds() {
  const std::vector<std::string> names = {"tokenizer.json", "tokenizer_config.json",
                                          "generation_config.json"};
  const TokenizerData spm = fuzz::tiny_tokenizer_data();
  write_hf_tokenizer(spm, scratch("spm"));
  fuzz::write_file(g_scratch / "spm", "generation_config.json",
                   R"({"bos_token_id": 1, "eos_token_id": [2, 3]})");
  seed("tokenizer", "hf_sentencepiece", selector(0) + parts_of(g_scratch / "spm", names));

  // GPT-2 byte level: the 256 byte characters, two merges and a special token.
  TokenizerData gpt2;
  gpt2.kind = TokenizerKind::Gpt2;
  for (int b = 0; b < 256; ++b) {
    std::string ch;
    unicode::append_utf8(ch, unicode::byte_to_gpt2_char(static_cast<uint8_t>(b)));
    gpt2.tokens.push_back(ch);
  }
  gpt2.merges = {"H e", "He l"};
  gpt2.tokens.insert(gpt2.tokens.end(), {"He", "Hel", "<|endoftext|>"});
  gpt2.types.assign(gpt2.tokens.size(), TokenType::Normal);
  gpt2.types.back() = TokenType::Control;
  gpt2.pre = "llama3";
  gpt2.add_bos = false;
  gpt2.add_space_prefix = false;
  gpt2.bos_id = gpt2.eos_id = static_cast<int32_t>(gpt2.tokens.size() - 1);
  write_hf_tokenizer(gpt2, scratch("gpt2"));
  seed("tokenizer", "hf_gpt2", selector(0) + parts_of(g_scratch / "gpt2", names));

  seed("tokenizer", "sentencepiece_model", selector(1) + sentencepiece_model(spm));
  seed("tokenizer", "llama2c", selector(2) + selector(255) + llama2c_tokenizer(spm, 255));
}

// A llama2.c checkpoint (no writer exists: the format is a header and fp32 arrays): dim 8,
// hidden 16, one block of one head, a shared classifier, 32 tokens, 4 positions; with the
// tokenizer.bin of those 32 tokens.
void llama2c_seeds() {
  const int32_t dim = 8, hidden = 16, layers = 1, heads = 1, kv_heads = 1, vocab = 32, seq = 4;
  const int64_t floats = vocab * dim + layers * (2 * dim + 4 * dim * dim + 3 * dim * hidden) + dim +
                         seq * dim;  // the last: RoPE's cos and sin tables, head_dim/2 each
  std::string model;
  for (const int32_t v : {dim, hidden, layers, heads, kv_heads, vocab, seq})
    model.append(reinterpret_cast<const char*>(&v), sizeof v);
  for (int64_t i = 0; i < floats; ++i) {
    const float v = static_cast<float>(i % 13) * 0.05f - 0.3f;
    model.append(reinterpret_cast<const char*>(&v), sizeof v);
  }
  seed("llama2c", "tied",
       fuzz::join_parts({model, llama2c_tokenizer(fuzz::tiny_tokenizer_data(), vocab)}));
}

void adapter_seeds() {
  const std::vector<std::string> names = {"qalora_adapter.json", "qalora_adapter.safetensors",
                                          "adapter_config.json", "adapter_model.safetensors"};
  for (const bool quantized : {false, true}) {
    const Model& base = fuzz::tiny_model(quantized);
    AdapterConfig c;
    c.kind = quantized ? AdapterKind::QaLora : AdapterKind::Lora;
    c.rank = 2;
    const fs::path dir = scratch(quantized ? "qalora" : "lora");
    save_adapter(create_adapters(base, c), base, dir);
    const std::string name = quantized ? "qalora" : "lora";
    const uint8_t base_byte = quantized ? 1 : 0;
    seed("adapter", name + "_both", selector(base_byte) + parts_of(dir, names));
    // Only the PEFT files, so that its reader runs too.
    seed("adapter", name + "_peft",
         selector(base_byte) + fuzz::join_parts({"", "", fuzz::read_file(dir / names[2]),
                                                 fuzz::read_file(dir / names[3])}));
  }
}

void dataset_seeds() {
  // Selector: format index (auto, alpaca, io, chat, sharegpt, text) + 6 * extension index
  // (.json, .jsonl, .txt).
  seed("dataset", "alpaca_jsonl",
       selector(1 + 6) + R"({"instruction": "Say hello", "input": "", "output": "Hello the earth"})"
                         "\n"
                         R"({"instruction": "Repeat", "input": "a", "output": "a",)"
                         R"( "history": [["hi", "hello"]]})"
                         "\n");
  seed("dataset", "io_json",
       selector(2) + R"([{"input": "Hello", "output": " the"}, {"input": "a", "output": "b"}])");
  seed("dataset", "chat_jsonl",
       selector(3 + 6) + R"({"messages": [{"role": "user", "content": "Hello"}, )"
                         R"({"role": "assistant", "content": "Hi"}]})"
                         "\n");
  seed("dataset", "sharegpt_json",
       selector(4) + R"([{"conversations": [{"from": "human", "value": "Hello"}, )"
                     R"({"from": "gpt", "value": "Hi"}]}])");
  seed("dataset", "text_txt", selector(5 + 12) + "Hello the earth.\nAnother line of text here.\n");
  seed("dataset", "auto_jsonl",
       selector(0 + 6 + 18) + R"({"input": "q", "output": "r"})"
                              "\n\n"
                              R"({"input": "s", "output": "t"})");
}

void eval_task_seeds() {
  // Selector: mc, arc, hellaswag, piqa, boolq, winogrande, mmlu, cloze, gsm8k.
  const std::string mc = R"({"query": "Sky is", "choices": ["blue", "green"], "gold": 0})"
                         "\n";
  seed("eval_tasks", "mc", selector(0) + selector(0) + mc);
  seed("eval_tasks", "arc_ai2",
       selector(1) + selector(0) +
           R"({"question": {"stem": "Q?", "choices": [{"text": "x", "label": "A"}, )"
           R"({"text": "y", "label": "B"}]}, "answerKey": "B"})"
           "\n");
  seed("eval_tasks", "arc", selector(1) + selector(0) + mc);
  seed("eval_tasks", "hellaswag",
       selector(2) + selector(0) +
           R"({"activity_label": "Cooking", "ctx_a": "He [title] cuts.", "ctx_b": "then",)"
           R"( "endings": ["eats.", "[header] sleeps."], "label": 1})"
           "\n");
  seed("eval_tasks", "piqa", selector(3) + selector(0) + mc);
  seed("eval_tasks", "boolq",
       selector(4) + selector(0) +
           R"({"query": "Is it?", "choices": ["no", "yes"], "gold": 1})"
           "\n");
  seed("eval_tasks", "winogrande",
       selector(5) + selector(0) +
           R"({"context_options": ["Ann", "Bob"], "continuation": "ran.", "gold": 1})"
           "\n");
  const std::string csv =
      "question,choice0,choice1,choice2,choice3,answer\n"
      "\"What is 1+1, \"\"roughly\"\"?\",1,2,3,4,1\n"
      "Q2,a,b,c,d,3\n";
  seed("eval_tasks", "mmlu", selector(6) + selector(2 + 6) + fuzz::join_parts({csv, csv}));
  seed("eval_tasks", "cloze",
       selector(7) + selector(0) +
           R"({"context": "The cat sat", "continuation": " down"})"
           "\n");
  seed("eval_tasks", "gsm8k",
       selector(8) + selector(0) +
           R"({"question": "2+2?", "answer": "Two and two.\n#### 4"})"
           "\n");
}

void chat_seeds() {
  const std::string conversation = "sBe brief.\nuHello\naHi there\nuAnd?\n";
  seed("chat", "chatml",
       fuzz::join_parts({fuzz::tiny_tokenizer_data().chat_template, conversation}));
  seed("chat", "chatml_system",
       fuzz::join_parts({"{{'<|im_start|>system\\nYou are helpful.<|im_end|>\\n'}}", "uHi\n"}));
  seed("chat", "llama3",
       fuzz::join_parts(
           {"{{'<|start_header_id|>' + role + '<|end_header_id|>'}}<|eot_id|>", conversation}));
  seed("chat", "llama2", fuzz::join_parts({"[INST] {{ content }} [/INST]", conversation}));
  seed("chat", "zephyr", fuzz::join_parts({"<|user|>\n{{ content }}</s>", "tool\tcall\n"}));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT\n", argv[0]);
    return 2;
  }
  g_out = argv[1];
  g_scratch = fuzz::fresh_dir();
  try {
    gguf_seeds();
    safetensors_seeds();
    hf_folder_seeds();
    tokenizer_seeds();
    llama2c_seeds();
    adapter_seeds();
    dataset_seeds();
    eval_task_seeds();
    chat_seeds();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
