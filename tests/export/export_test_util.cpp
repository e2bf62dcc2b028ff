#include "export/export_test_util.h"

#include <cmath>
#include <cstring>

#include "qalora/adapters/merge.h"
#include "qalora/io/safetensors.h"
#include "qalora/model/runtime.h"
#include "qalora/quant/quantize_model.h"
#include "test_util.h"

namespace qalora::test {

namespace fs = std::filesystem;

RandomModelShape aligned_shape(bool tied) {
  RandomModelShape s;
  s.vocab = 97;
  s.dim = 64;
  s.hidden = 96;
  s.layers = 2;
  s.heads = 4;
  s.kv_heads = 2;
  s.head_dim = 16;
  s.tied = tied;
  return s;
}

fs::path stories_dir() {
  return data_dir() / "models" / "stories260K";
}

Model load_stories() {
  LoadOptions o;
  o.tokenizer = stories_dir() / "tok512.bin";
  return load_model(stories_dir() / "stories260K.bin", o);
}

Model quantized(Model m, const std::string& method, int bits, int64_t group_size, bool sym) {
  QuantizeOptions q;
  q.method = method;
  q.bits = bits;
  q.group_size = group_size;
  q.sym = sym;
  quantize_model(m, q, {});
  return m;
}

AdapterSet random_qalora(const Model& base, uint64_t seed) {
  AdapterConfig cfg;
  cfg.kind = AdapterKind::QaLora;
  cfg.rank = 4;
  cfg.alpha = 8;
  AdapterSet set = create_adapters(base, cfg);
  randomize_adapter_b(set, seed);
  return set;
}

Model merged_qalora(const Model& base, uint64_t seed) {
  Model m = base;
  merge_qalora(m, random_qalora(base, seed));
  return m;
}

std::vector<float> all_logits(const Model& m, const AdapterSet* set) {
  const std::vector<int32_t> tokens = {1, 4, 30, 7, 7, 12, 0, 19, 3, 22, 28, 5, 16, 9, 96, 40};
  InferenceSession session(m, 32, set);
  std::vector<float> out(tokens.size() * static_cast<size_t>(m.config.vocab_size));
  session.forward(tokens, out, /*all_logits=*/true);
  return out;
}

bool same_bits(const float* a, const float* b, int64_t n) {
  return n == 0 || std::memcmp(a, b, static_cast<size_t>(n) * sizeof(float)) == 0;
}

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && same_bits(a.data(), b.data(), a.numel());
}

double max_abs_diff(const float* a, const float* b, int64_t n) {
  double d = 0;
  for (int64_t i = 0; i < n; ++i)
    d = std::max(d, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
  return d;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  return max_abs_diff(a.data(), b.data(), static_cast<int64_t>(std::min(a.size(), b.size())));
}

std::vector<Tensor> dense_linears(const Model& m, size_t l) {
  std::vector<Tensor> out;
  for (const Target t : all_targets()) out.push_back(target_linear(m.layers[l], t).dense_weight());
  return out;
}

std::optional<GgufReadback> gguf_py_readback(const fs::path& gguf, std::string& skip) {
  const fs::path script = fs::path(__FILE__).parent_path() / "gguf_readback.py";
  const fs::path out = gguf.string() + ".readback.safetensors";
  std::string err;
  const int rc = run_python(script, {gguf.string(), out.string()}, err);
  if (rc == kPythonMissing) {
    skip = "python3 with gguf and numpy is not available (pip install gguf numpy): " + err;
    return std::nullopt;
  }
  EXPECT_EQ(rc, 0) << err;
  if (rc != 0) return std::nullopt;
  const SafetensorsFile st = SafetensorsFile::open(out);
  GgufReadback r;
  for (const StTensorInfo& t : st.tensors()) {
    const Tensor view = st.load_f32(t);
    Tensor copy = Tensor::zeros(view.shape());
    std::memcpy(copy.mutable_data(), view.data(), static_cast<size_t>(view.numel()) * 4);
    r.tensors.emplace(t.name, std::move(copy));
  }
  r.metadata = st.metadata();
  return r;
}

}  // namespace qalora::test
