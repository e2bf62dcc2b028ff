// llama2.c checkpoints (karpathy/llama2.c "version 0" export): 7 int32 header fields followed
// by fp32 arrays. Weights are used in place from the memory map; RoPE is already in pairs.
#include <array>
#include <cstring>
#include <map>

#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"
#include "qalora/model/model.h"

namespace qalora {

namespace fs = std::filesystem;

namespace {

constexpr size_t kHeaderBytes = 7 * sizeof(int32_t);

struct Header {
  int64_t dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
};

// Bounds keep every size computation below far from int64 overflow on garbage input.
void check_field(const std::string& file, const char* field, int64_t value, int64_t max) {
  QL_CHECK(value > 0 && value <= max, file, ": llama2.c header field ", field, " is ", value,
           ", expected 1..", max);
}

Header read_header(const MappedFile& f) {
  QL_CHECK(f.size() >= kHeaderBytes, f.path(), ": file is ", f.size(), " bytes, too short for the ",
           kHeaderBytes, "-byte llama2.c header");
  std::array<int32_t, 7> v{};
  std::memcpy(v.data(), f.data(), kHeaderBytes);
  const Header h{v[0], v[1], v[2], v[3], v[4], v[5], v[6]};
  const std::string& file = f.path();
  check_field(file, "dim", h.dim, 1 << 20);
  check_field(file, "hidden_dim", h.hidden_dim, 1 << 20);
  check_field(file, "n_layers", h.n_layers, 1 << 12);
  check_field(file, "n_heads", h.n_heads, h.dim);
  check_field(file, "n_kv_heads", h.n_kv_heads, h.n_heads);
  check_field(file, "|vocab_size|", h.vocab_size < 0 ? -h.vocab_size : h.vocab_size, 1 << 24);
  check_field(file, "seq_len", h.seq_len, 1 << 24);
  QL_CHECK(h.dim % h.n_heads == 0 && (h.dim / h.n_heads) % 2 == 0, file, ": llama2.c header dim ",
           h.dim, " must be n_heads (", h.n_heads, ") times an even head size");
  QL_CHECK(h.n_heads % h.n_kv_heads == 0, file, ": llama2.c header n_heads ", h.n_heads,
           " is not a multiple of n_kv_heads ", h.n_kv_heads);
  return h;
}

struct Section {
  const char* name;
  Shape shape;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

// The arrays after the header, in file order.
std::vector<Section> file_sections(const Header& h) {
  const int64_t V = h.vocab_size < 0 ? -h.vocab_size : h.vocab_size;
  const int64_t D = h.dim, H = h.hidden_dim, L = h.n_layers;
  const int64_t head_dim = D / h.n_heads, kv_dim = h.n_kv_heads * head_dim;
  std::vector<Section> s = {
      {"token_embedding_table", {V, D}},
      {"rms_att_weight", {L, D}},
      {"wq", {L, D, D}},
      {"wk", {L, kv_dim, D}},
      {"wv", {L, kv_dim, D}},
      {"wo", {L, D, D}},
      {"rms_ffn_weight", {L, D}},
      {"w1", {L, H, D}},
      {"w2", {L, D, H}},
      {"w3", {L, H, D}},
      {"rms_final_weight", {D}},
      // Legacy RoPE tables, unused: the runtime computes its own frequencies.
      {"freq_cis_real", {h.seq_len, head_dim / 2}},
      {"freq_cis_imag", {h.seq_len, head_dim / 2}},
  };
  if (h.vocab_size < 0) s.push_back({"wcls", {V, D}});  // negative vocab: untied classifier
  return s;
}

std::shared_ptr<const Tokenizer> find_tokenizer_beside(const fs::path& checkpoint, int64_t vocab) {
  const fs::path dir = checkpoint.parent_path();
  // tok<vocab>.bin first: a tokenizer.bin beside a small model is usually Llama 2's 32000 tokens.
  for (const fs::path& p : {dir / cat("tok", vocab, ".bin"), dir / "tokenizer.bin"})
    if (fs::exists(p))
      return std::make_shared<const Tokenizer>(
          read_llama2c_tokenizer(p, static_cast<int32_t>(vocab)));
  return nullptr;
}

}  // namespace

Model load_llama2c_model(const fs::path& path) {
  const std::shared_ptr<MappedFile> file = MappedFile::open(path);
  const Header h = read_header(*file);
  const std::vector<Section> sections = file_sections(h);

  int64_t floats = 0;
  for (const Section& s : sections) floats += s.numel();
  const auto expected = kHeaderBytes + static_cast<size_t>(floats) * sizeof(float);
  QL_CHECK(file->size() == expected, file->path(), ": llama2.c checkpoint should be ", expected,
           " bytes for dim ", h.dim, ", hidden_dim ", h.hidden_dim, ", n_layers ", h.n_layers,
           ", n_heads ", h.n_heads, ", n_kv_heads ", h.n_kv_heads, ", vocab_size ", h.vocab_size,
           ", seq_len ", h.seq_len, ", got ", file->size());

  Model m;
  ModelConfig& c = m.config;
  c.arch = "llama";
  c.name = path.stem().string();
  c.vocab_size = h.vocab_size < 0 ? -h.vocab_size : h.vocab_size;
  c.dim = h.dim;
  c.hidden_dim = h.hidden_dim;
  c.n_layers = h.n_layers;
  c.n_heads = h.n_heads;
  c.n_kv_heads = h.n_kv_heads;
  c.head_dim = h.dim / h.n_heads;
  c.context_length = h.seq_len;
  c.rope_theta = 10000.0f;
  c.norm_eps = 1e-5f;
  c.tied_embeddings = h.vocab_size > 0;
  m.format = ModelFormat::Llama2c;
  m.source_path = path.string();

  // Header is 28 bytes and the map is page aligned, so every array is float aligned.
  std::map<std::string, const float*> at;
  const auto* p = reinterpret_cast<const float*>(file->data() + kHeaderBytes);
  for (const Section& s : sections) {
    at[s.name] = p;
    p += s.numel();
    m.source_tensors.push_back({s.name, "F32", s.shape});
  }
  // Block `index` of `shape` inside the named array: per-layer slices of the stacked arrays.
  const auto view = [&](const char* name, Shape shape, int64_t index = 0) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return Tensor::view(at.at(name) + index * n, std::move(shape), file, true);
  };

  const int64_t D = c.dim, H = c.hidden_dim, KV = c.kv_dim();
  m.tok_embeddings = view("token_embedding_table", {c.vocab_size, D});
  m.layers.resize(static_cast<size_t>(c.n_layers));
  for (int64_t l = 0; l < c.n_layers; ++l) {
    LayerWeights& L = m.layers[static_cast<size_t>(l)];
    L.attn_norm = view("rms_att_weight", {D}, l);
    L.q.weight = view("wq", {D, D}, l);
    L.k.weight = view("wk", {KV, D}, l);
    L.v.weight = view("wv", {KV, D}, l);
    L.o.weight = view("wo", {D, D}, l);
    L.ffn_norm = view("rms_ffn_weight", {D}, l);
    L.gate.weight = view("w1", {H, D}, l);  // llama2.c: w2(silu(w1 x) * w3 x)
    L.down.weight = view("w2", {D, H}, l);
    L.up.weight = view("w3", {H, D}, l);
  }
  m.final_norm = view("rms_final_weight", {D});
  if (!c.tied_embeddings) m.output = view("wcls", {c.vocab_size, D});
  m.tokenizer = find_tokenizer_beside(path, c.vocab_size);
  return m;
}

}  // namespace qalora
