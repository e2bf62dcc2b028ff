// Adapter folders: native and PEFT round trips (LoRA, QA-LoRA avg/sum, ragged groups), the PEFT
// files checked against the layout PEFT expects, an adapter written by an independent Python
// writer, and one-line errors for bad input.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <ostream>
#include <string>
#include <vector>

#include "model/random_model.h"
#include "model/safetensors_edit.h"
#include "qalora/adapters/adapter_io.h"
#include "qalora/core/atomic_file.h"
#include "qalora/core/error.h"
#include "qalora/core/mapped_file.h"
#include "qalora/io/safetensors.h"
#include "qalora/model/model.h"
#include "qalora/quant/quantize_model.h"
#include "test_util.h"

namespace qalora {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// Every input size (64, 96) divisible by 16 and 32; by 24 only for down_proj (96).
constexpr test::RandomModelShape kShape = {
    .vocab = 61, .dim = 64, .hidden = 96, .layers = 2, .heads = 4, .kv_heads = 2, .head_dim = 16};

// 4-bit RTN with `group` (-1 per channel); 0 keeps the model dense.
Model make_model(const test::RandomModelShape& shape, int64_t group, uint64_t seed = 7) {
  Model m = test::make_random_model(shape, seed);
  if (group != 0) {
    QuantizeOptions q;
    q.method = "rtn";
    q.bits = 4;
    q.group_size = group;
    quantize_model(m, q, {});
  }
  return m;
}

// create_adapters, then random A and B (B starts at zero, which would hide layout mistakes).
AdapterSet random_adapters(const Model& m, AdapterConfig c) {
  AdapterSet set = create_adapters(m, c);
  uint64_t seed = 100;
  for (LoraAdapter& a : set.adapters)
    for (Tensor* t : {&a.A, &a.B}) {
      const std::vector<float> v = test::random_normal(t->numel(), seed++);
      std::memcpy(t->mutable_data(), v.data(), v.size() * sizeof(float));
    }
  return set;
}

AdapterConfig config_of(AdapterKind kind, AdapterPool pool, const char* targets, bool rslora,
                        AdapterInit init) {
  AdapterConfig c;
  c.kind = kind;
  c.pool = pool;
  c.targets = parse_targets(targets);
  c.rslora = rslora;
  c.init = init;
  c.rank = 5;
  c.alpha = 7.25f;
  c.dropout = 0.1f;
  c.seed = 0xfedcba9876543210ULL;  // above INT64_MAX: the JSON keeps it unsigned
  return c;
}

void expect_same_floats(const Tensor& actual, const Tensor& expected, const std::string& what) {
  ASSERT_EQ(actual.shape(), expected.shape()) << what;
  for (int64_t i = 0; i < expected.numel(); ++i)
    if (std::memcmp(actual.data() + i, expected.data() + i, sizeof(float)) != 0) {
      ADD_FAILURE() << what << ": element " << i << " is " << actual.data()[i] << ", expected "
                    << expected.data()[i];
      return;
    }
}

std::string name_of(const LoraAdapter& a) {
  return cat("layer ", a.layer, " ", target_name(a.target));
}

void expect_same_layout(const LoraAdapter& a, const LoraAdapter& b) {
  EXPECT_EQ(a.layer, b.layer);
  EXPECT_EQ(a.target, b.target);
  EXPECT_EQ(a.in, b.in) << name_of(b);
  EXPECT_EQ(a.out, b.out) << name_of(b);
  EXPECT_EQ(a.group_size, b.group_size) << name_of(b);
  EXPECT_EQ(a.n_groups, b.n_groups) << name_of(b);
}

// Everything, bit for bit (the native layout).
void expect_same_set(const AdapterSet& actual, const AdapterSet& expected) {
  const AdapterConfig &a = actual.config, &e = expected.config;
  EXPECT_EQ(a.kind, e.kind);
  EXPECT_EQ(a.rank, e.rank);
  EXPECT_EQ(a.alpha, e.alpha);
  EXPECT_EQ(a.dropout, e.dropout);
  EXPECT_EQ(a.rslora, e.rslora);
  EXPECT_EQ(a.targets, e.targets);
  EXPECT_EQ(a.init, e.init);
  EXPECT_EQ(a.pool, e.pool);
  EXPECT_EQ(a.seed, e.seed);
  const BaseIdentity &ab = actual.base, &eb = expected.base;
  EXPECT_EQ(ab.name, eb.name);
  EXPECT_EQ(ab.arch, eb.arch);
  EXPECT_EQ(ab.vocab_size, eb.vocab_size);
  EXPECT_EQ(ab.dim, eb.dim);
  EXPECT_EQ(ab.hidden_dim, eb.hidden_dim);
  EXPECT_EQ(ab.n_layers, eb.n_layers);
  EXPECT_EQ(ab.n_heads, eb.n_heads);
  EXPECT_EQ(ab.n_kv_heads, eb.n_kv_heads);
  EXPECT_EQ(ab.quant_method, eb.quant_method);
  EXPECT_EQ(ab.bits, eb.bits);
  EXPECT_EQ(ab.group_size, eb.group_size);
  ASSERT_EQ(actual.adapters.size(), expected.adapters.size());
  for (size_t i = 0; i < expected.adapters.size(); ++i) {
    const LoraAdapter &x = actual.adapters[i], &y = expected.adapters[i];
    expect_same_layout(x, y);
    EXPECT_EQ(x.pool, y.pool) << name_of(y);
    expect_same_floats(x.A, y.A, name_of(y) + " A");
    expect_same_floats(x.B, y.B, name_of(y) + " B");
  }
}

double scale_of(const AdapterConfig& c) {
  const auto r = static_cast<double>(c.rank);
  return static_cast<double>(c.alpha) / (c.rslora ? std::sqrt(r) : r);
}

// The dense [out, in] change the adapter makes to W, in double: scale * B A, where QA-LoRA's
// column i is column (i / G) of B A, divided by the group's true size for average pooling.
std::vector<double> effective_delta(const LoraAdapter& a, double scale) {
  const int64_t r = a.A.dim(0), C = a.A.dim(1);
  std::vector<double> d(static_cast<size_t>(a.out * a.in));
  for (int64_t j = 0; j < a.out; ++j)
    for (int64_t i = 0; i < a.in; ++i) {
      const int64_t col = a.pooled() ? i / a.group_size : i;
      double s = 0;
      for (int64_t k = 0; k < r; ++k)
        s += static_cast<double>(a.B.data()[j * r + k]) * a.A.data()[k * C + col];
      if (a.pooled() && a.pool == AdapterPool::Average)
        s /= static_cast<double>(std::min(a.group_size, a.in - col * a.group_size));
      d[static_cast<size_t>(j * a.in + i)] = scale * s;
    }
  return d;
}

void expect_close(const std::vector<double>& actual, const std::vector<double>& expected,
                  double rel, const std::string& what) {
  ASSERT_EQ(actual.size(), expected.size()) << what;
  double max_abs = 0;
  for (double v : expected) max_abs = std::max(max_abs, std::abs(v));
  for (size_t i = 0; i < expected.size(); ++i)
    if (std::abs(actual[i] - expected[i]) > rel * max_abs) {
      ADD_FAILURE() << what << ": element " << i << " is " << actual[i] << ", expected "
                    << expected[i];
      return;
    }
}

json read_json(const fs::path& p) {
  return json::parse(read_file(p));
}

void edit_json(const fs::path& p, const std::function<void(json&)>& edit) {
  json j = read_json(p);
  edit(j);
  write_file_atomic(p, j.dump(2));
}

// Moves the native files away so that load_adapter reads the PEFT files.
void hide_native(const fs::path& dir) {
  fs::rename(dir / "qalora_adapter.json", dir / "hidden_qalora_adapter.json");
}

std::string peft_key(int64_t layer, Target t, const char* matrix) {
  const bool attn = t == Target::Q || t == Target::K || t == Target::V || t == Target::O;
  return cat("base_model.model.model.layers.", layer, attn ? ".self_attn." : ".mlp.",
             target_name(t), ".lora_", matrix, ".weight");
}

// ---- round trips ------------------------------------------------------------------------------

struct RoundTripCase {
  const char* name;
  AdapterKind kind = AdapterKind::Lora;
  AdapterPool pool = AdapterPool::Average;
  const char* targets = "all-linear";
  bool rslora = false;
  AdapterInit init = AdapterInit::Kaiming;
  int64_t group = 0;            // base quantization group; 0 = dense, -1 = per channel
  bool divisible_shape = true;  // kShape, else the default random shape (dim 52, hidden 100)
  bool peft = true;             // PEFT files expected
  std::vector<std::string> readme_mentions = {};  // when not
};

void PrintTo(const RoundTripCase& c, std::ostream* os) {
  *os << c.name;
}

class AdapterIoRoundTrip : public ::testing::TestWithParam<RoundTripCase> {};

// adapter_config.json and adapter_model.safetensors as PEFT reads them.
void check_peft_files(const fs::path& dir, const AdapterSet& set, const Model& m) {
  const AdapterConfig& c = set.config;
  const json j = read_json(dir / "adapter_config.json");
  EXPECT_EQ(j["peft_type"], "LORA");
  EXPECT_EQ(j["task_type"], "CAUSAL_LM");
  EXPECT_EQ(j["r"], c.rank);
  EXPECT_EQ(static_cast<float>(j["lora_alpha"].get<double>()), c.alpha);
  EXPECT_EQ(static_cast<float>(j["lora_dropout"].get<double>()), c.dropout);
  EXPECT_EQ(j["use_rslora"], c.rslora);
  EXPECT_EQ(j["bias"], "none");
  EXPECT_EQ(j["fan_in_fan_out"], false);
  EXPECT_EQ(j["inference_mode"], true);
  EXPECT_TRUE(j.contains("modules_to_save") && j["modules_to_save"].is_null());
  EXPECT_EQ(j["base_model_name_or_path"], m.config.name);
  EXPECT_EQ(j["init_lora_weights"],
            c.init == AdapterInit::Gaussian ? json("gaussian") : json(true));
  json targets = json::array();
  for (Target t : c.targets) targets.push_back(target_name(t));
  EXPECT_EQ(j["target_modules"], targets);
  const bool qalora = c.kind == AdapterKind::QaLora;
  if (qalora) {
    EXPECT_EQ(j["use_qalora"], true);
    EXPECT_EQ(j["qalora_group_size"], set.adapters.front().group_size);
  } else {
    EXPECT_FALSE(j.contains("use_qalora"));
  }

  const SafetensorsFile st = SafetensorsFile::open(dir / "adapter_model.safetensors");
  EXPECT_EQ(st.tensors().size(), 2 * set.adapters.size());
  for (const LoraAdapter& a : set.adapters) {
    const StTensorInfo* ia = st.find(peft_key(a.layer, a.target, "A"));
    const StTensorInfo* ib = st.find(peft_key(a.layer, a.target, "B"));
    ASSERT_TRUE(ia != nullptr && ib != nullptr) << peft_key(a.layer, a.target, "A");
    EXPECT_EQ(ia->dtype, StDtype::F32);
    EXPECT_EQ(ib->dtype, StDtype::F32);
    // PEFT's QA-LoRA A has in / G columns.
    EXPECT_EQ(ia->shape, (Shape{c.rank, qalora ? a.in / a.group_size : a.in})) << name_of(a);
    EXPECT_EQ(ib->shape, (Shape{a.out, c.rank})) << name_of(a);

    // lora_A: ours (LoRA), / L (avg), * G / L (sum).
    Tensor expected_a = Tensor::zeros(a.A.shape());
    for (int64_t i = 0; i < a.A.numel(); ++i) {
      double v = a.A.data()[i];
      if (qalora) {
        const auto L = static_cast<double>(a.in / a.group_size);
        v = a.pool == AdapterPool::Average ? v / L : v * static_cast<double>(a.group_size) / L;
      }
      expected_a.mutable_data()[i] = static_cast<float>(v);
    }
    expect_same_floats(st.load_f32(*ia), expected_a, name_of(a) + " lora_A");

    // lora_B: q/k rows in the halves layout, row (h, j * d/2 + i) = our row (h, 2 i + j).
    const Tensor b = st.load_f32(*ib);
    const bool rope = a.target == Target::Q || a.target == Target::K;
    const int64_t d = m.config.head_dim, half = d / 2, r = c.rank;
    for (int64_t row = 0; row < a.out; ++row) {
      int64_t ours = row;
      if (rope) {
        const int64_t h = row / d, which = row % d / half, i = row % half;
        ours = h * d + 2 * i + which;
      }
      ASSERT_EQ(std::memcmp(b.row(row), a.B.row(ours), static_cast<size_t>(r) * sizeof(float)), 0)
          << name_of(a) << " lora_B row " << row << " should be our row " << ours;
    }
  }
}

TEST_P(AdapterIoRoundTrip, NativeIsBitIdenticalAndPeftComputesTheSame) {
  const RoundTripCase& tc = GetParam();
  const Model m = make_model(tc.divisible_shape ? kShape : test::RandomModelShape{}, tc.group);
  const AdapterSet set =
      random_adapters(m, config_of(tc.kind, tc.pool, tc.targets, tc.rslora, tc.init));
  const fs::path dir = test::temp_dir() / "adapter";
  save_adapter(set, m, dir);

  ASSERT_TRUE(fs::exists(dir / "qalora_adapter.json"));
  ASSERT_TRUE(fs::exists(dir / "qalora_adapter.safetensors"));
  const json native = read_json(dir / "qalora_adapter.json");
  EXPECT_EQ(native["format_version"], 1);
  EXPECT_EQ(native["kind"], adapter_kind_name(tc.kind));
  EXPECT_EQ(native["seed"].get<uint64_t>(), set.config.seed);
  EXPECT_EQ(native["adapters"].size(), set.adapters.size());
  const SafetensorsFile nst = SafetensorsFile::open(dir / "qalora_adapter.safetensors");
  EXPECT_NE(nst.find("layers.1." + std::string(target_name(set.config.targets.back())) + ".A"),
            nullptr);
  expect_same_set(load_adapter(dir, m), set);

  EXPECT_EQ(fs::exists(dir / "adapter_config.json"), tc.peft);
  EXPECT_EQ(fs::exists(dir / "adapter_model.safetensors"), tc.peft);
  EXPECT_EQ(fs::exists(dir / "README.md"), !tc.peft);
  if (!tc.peft) {
    const std::string readme = read_file(dir / "README.md");
    for (const std::string& s : tc.readme_mentions)
      EXPECT_NE(readme.find(s), std::string::npos) << "README.md lacks '" << s << "':\n" << readme;
    return;
  }
  check_peft_files(dir, set, m);

  hide_native(dir);
  const AdapterSet peft = load_adapter(dir, m);
  EXPECT_EQ(peft.config.kind, set.config.kind);
  EXPECT_EQ(peft.config.rank, set.config.rank);
  EXPECT_EQ(peft.config.alpha, set.config.alpha);
  EXPECT_EQ(peft.config.dropout, set.config.dropout);
  EXPECT_EQ(peft.config.rslora, set.config.rslora);
  EXPECT_EQ(peft.config.targets, set.config.targets);
  EXPECT_EQ(peft.config.init, set.config.init);
  EXPECT_EQ(peft.config.pool, AdapterPool::Average);  // PEFT's mean pooling
  EXPECT_EQ(peft.base.dim, m.config.dim);
  ASSERT_EQ(peft.adapters.size(), set.adapters.size());
  for (size_t i = 0; i < set.adapters.size(); ++i) {
    const LoraAdapter &x = peft.adapters[i], &y = set.adapters[i];
    expect_same_layout(x, y);
    expect_same_floats(x.B, y.B, name_of(y) + " B");
    if (!y.pooled()) {
      expect_same_floats(x.A, y.A, name_of(y) + " A");
    } else {
      // A went through one division and one multiplication by L (and G): same function, up to
      // float rounding.
      expect_close(effective_delta(x, scale_of(peft.config)),
                   effective_delta(y, scale_of(set.config)), 1e-6, name_of(y) + " B A");
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    AdapterIo, AdapterIoRoundTrip,
    ::testing::Values(
        RoundTripCase{.name = "lora_all_dense"},
        RoundTripCase{.name = "lora_rslora_subset_gaussian",
                      .targets = "q_proj,k_proj,down_proj",
                      .rslora = true,
                      .init = AdapterInit::Gaussian,
                      .divisible_shape = false},
        RoundTripCase{.name = "lora_on_rtn", .targets = "k_proj,o_proj,up_proj", .group = 16},
        RoundTripCase{.name = "qalora_avg", .kind = AdapterKind::QaLora, .group = 16},
        RoundTripCase{.name = "qalora_sum_subset_rslora",
                      .kind = AdapterKind::QaLora,
                      .pool = AdapterPool::Sum,
                      .targets = "q_proj,v_proj,down_proj",
                      .rslora = true,
                      .group = 16},
        RoundTripCase{.name = "qalora_sum_down_g24",
                      .kind = AdapterKind::QaLora,
                      .pool = AdapterPool::Sum,
                      .targets = "down_proj",
                      .group = 24},
        // 64 inputs in groups of 24: the last holds 16; down_proj (96) divides.
        RoundTripCase{.name = "qalora_avg_ragged",
                      .kind = AdapterKind::QaLora,
                      .targets = "q_proj,down_proj",
                      .group = 24,
                      .peft = false,
                      .readme_mentions = {"q_proj (layers 0, 1)", "64 inputs in groups of 24",
                                          "qalora_group_size", "qalora_adapter.safetensors"}},
        // Per channel: G = in differs between q_proj (52) and down_proj (100).
        RoundTripCase{.name = "qalora_per_channel",
                      .kind = AdapterKind::QaLora,
                      .pool = AdapterPool::Sum,
                      .targets = "q_proj,down_proj",
                      .init = AdapterInit::Gaussian,
                      .group = -1,
                      .divisible_shape = false,
                      .peft = false,
                      .readme_mentions = {"group size 52", "group size 100"}}),
    [](const ::testing::TestParamInfo<RoundTripCase>& p) { return p.param.name; });

TEST(AdapterIo, RaggedSaveRemovesStalePeftFilesAndLaterSavesRemoveTheReadme) {
  const fs::path dir = test::temp_dir() / "adapter";
  const Model even = make_model(kShape, 16), ragged = make_model(kShape, 24);
  const AdapterConfig c =
      config_of(AdapterKind::QaLora, AdapterPool::Average, "q_proj", false, AdapterInit::Kaiming);
  save_adapter(random_adapters(even, c), even, dir);
  ASSERT_TRUE(fs::exists(dir / "adapter_config.json"));
  ASSERT_FALSE(fs::exists(dir / "README.md"));

  save_adapter(random_adapters(ragged, c), ragged, dir);
  EXPECT_FALSE(fs::exists(dir / "adapter_config.json"));
  EXPECT_FALSE(fs::exists(dir / "adapter_model.safetensors"));
  ASSERT_TRUE(fs::exists(dir / "README.md"));
  EXPECT_EQ(load_adapter(dir, ragged).adapters.front().group_size, 24);
  hide_native(dir);
  EXPECT_THROW(load_adapter(dir, ragged), Error);  // nothing stale to fall back to

  save_adapter(random_adapters(even, c), even, dir);
  EXPECT_TRUE(fs::exists(dir / "adapter_config.json"));
  EXPECT_FALSE(fs::exists(dir / "README.md"));

  // A README the user wrote stays.
  write_file_atomic(dir / "README.md", "# my adapter\n");
  save_adapter(random_adapters(even, c), even, dir);
  EXPECT_EQ(read_file(dir / "README.md"), "# my adapter\n");
}

// ---- an adapter written independently, in PEFT's layout ---------------------------------------

struct WriterCase {
  const char* name;
  const char* targets;
  bool rslora;
  int64_t qalora_group;  // 0 = LoRA on a dense base
};

void PrintTo(const WriterCase& c, std::ostream* os) {
  *os << c.name;
}

class AdapterIoPeftWriter : public ::testing::TestWithParam<WriterCase> {};

TEST_P(AdapterIoPeftWriter, LoadsWhatPeftComputes) {
  const WriterCase& wc = GetParam();
  const fs::path dir = test::temp_dir() / "peft", expected_file = test::temp_dir() / "exp.st";
  const int64_t rank = 3;
  const double alpha = 6.5;
  std::vector<std::string> args = {dir.string(),     expected_file.string(),
                                   "--dim",          std::to_string(kShape.dim),
                                   "--hidden",       std::to_string(kShape.hidden),
                                   "--layers",       std::to_string(kShape.layers),
                                   "--heads",        std::to_string(kShape.heads),
                                   "--kv-heads",     std::to_string(kShape.kv_heads),
                                   "--head-dim",     std::to_string(kShape.head_dim),
                                   "--rank",         std::to_string(rank),
                                   "--alpha",        "6.5",
                                   "--targets",      wc.targets,
                                   "--qalora-group", std::to_string(wc.qalora_group),
                                   "--seed",         "11"};
  if (wc.rslora) args.push_back("--rslora");
  std::string err;
  const int rc = test::run_python(fs::path(__FILE__).parent_path() / "peft_writer.py", args, err);
  if (rc == test::kPythonMissing) GTEST_SKIP() << "python3 with numpy: " << err;
  ASSERT_EQ(rc, 0) << err;

  const Model m = make_model(kShape, wc.qalora_group);
  const AdapterSet set = load_adapter(dir, m);
  EXPECT_EQ(set.config.kind, wc.qalora_group ? AdapterKind::QaLora : AdapterKind::Lora);
  EXPECT_EQ(set.config.rank, rank);
  EXPECT_EQ(set.config.alpha, static_cast<float>(alpha));
  EXPECT_EQ(set.config.dropout, 0.05f);
  EXPECT_EQ(set.config.rslora, wc.rslora);
  EXPECT_EQ(set.config.targets, parse_targets(wc.targets));

  const SafetensorsFile expected = SafetensorsFile::open(expected_file);
  EXPECT_EQ(expected.tensors().size(), 3 * set.adapters.size());
  for (const LoraAdapter& a : set.adapters) {
    const std::string prefix = cat("layers.", a.layer, ".", target_name(a.target));
    const StTensorInfo* ea = expected.find(prefix + ".A");
    const StTensorInfo* eb = expected.find(prefix + ".B");
    const StTensorInfo* ed = expected.find(prefix + ".delta");
    ASSERT_TRUE(ea != nullptr && eb != nullptr && ed != nullptr) << prefix;
    expect_same_floats(a.A, expected.load_f32(*ea), prefix + " A");
    expect_same_floats(a.B, expected.load_f32(*eb), prefix + " B");
    const Tensor delta = expected.load_f32(*ed);
    const std::vector<double> want(delta.data(), delta.data() + delta.numel());
    expect_close(effective_delta(a, scale_of(set.config)), want, 1e-6, prefix + " delta");
  }
}

INSTANTIATE_TEST_SUITE_P(
    AdapterIo, AdapterIoPeftWriter,
    ::testing::Values(WriterCase{"lora_attention", "q_proj,k_proj,v_proj,o_proj", false, 0},
                      WriterCase{"lora_all_linear_rslora", "all-linear", true, 0},
                      WriterCase{"qalora_g16", "q_proj,k_proj,down_proj", false, 16}),
    [](const ::testing::TestParamInfo<WriterCase>& p) { return p.param.name; });

// ---- bad input --------------------------------------------------------------------------------

// The message of the Error load_adapter throws (one line), or a failure when it does not throw.
std::string load_error(const fs::path& dir, const Model& m) {
  try {
    load_adapter(dir, m);
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "expected one line: " << msg;
    return msg;
  }
  ADD_FAILURE() << "load_adapter(" << dir << ") did not throw";
  return {};
}

#define EXPECT_MENTIONS(msg, ...)                                                   \
  do {                                                                              \
    const std::string m_ = (msg);                                                   \
    for (const std::string& s_ : std::vector<std::string>{__VA_ARGS__})             \
      EXPECT_NE(m_.find(s_), std::string::npos) << "'" << s_ << "' not in: " << m_; \
  } while (0)

// A LoRA adapter (q_proj, up_proj; rank 5) in both layouts, for breaking.
struct Saved {
  Model model = make_model(kShape, 0);
  fs::path dir = test::temp_dir() / "adapter";
  Saved() {
    save_adapter(random_adapters(model, config_of(AdapterKind::Lora, AdapterPool::Average,
                                                  "q_proj,up_proj", false, AdapterInit::Kaiming)),
                 model, dir);
  }
  fs::path native() const { return dir / "qalora_adapter.json"; }
  fs::path peft() const { return dir / "adapter_config.json"; }
  fs::path peft_weights() const { return dir / "adapter_model.safetensors"; }
};

TEST(AdapterIoErrors, MissingFolderAndNeitherFile) {
  const Model m = make_model(kShape, 0);
  const fs::path dir = test::temp_dir();
  EXPECT_MENTIONS(load_error(dir / "nope", m), "nope", "not found");
  EXPECT_MENTIONS(load_error(dir, m), dir.string(), "qalora_adapter.json", "adapter_config.json",
                  "adapter_model.safetensors");
}

TEST(AdapterIoErrors, MalformedJsonAndWrongTypes) {
  Saved s;
  write_file_atomic(s.native(), "{\"rank\": ");
  EXPECT_MENTIONS(load_error(s.dir, s.model), "qalora_adapter.json", "JSON");
  fs::remove(s.native());
  write_file_atomic(s.peft(), "[1, 2]");
  EXPECT_MENTIONS(load_error(s.dir, s.model), "adapter_config.json", "object");

  Saved t;
  edit_json(t.native(), [](json& j) { j["rank"] = "5"; });
  EXPECT_MENTIONS(load_error(t.dir, t.model), "qalora_adapter.json", "'rank'", "integer", "\"5\"");
  edit_json(t.native(), [](json& j) {
    j["rank"] = 5;
    j["base"]["dim"] = 64.5;
  });
  EXPECT_MENTIONS(load_error(t.dir, t.model), "qalora_adapter.json", "base", "'dim'", "64.5");
  edit_json(t.native(), [](json& j) {
    j["base"]["dim"] = 64;
    j["pool"] = "max";
  });
  EXPECT_MENTIONS(load_error(t.dir, t.model), "qalora_adapter.json", "'pool'", "max");
  edit_json(t.native(), [](json& j) {
    j["pool"] = "avg";
    j["adapters"][1]["n_groups"] = 3;
  });
  EXPECT_MENTIONS(load_error(t.dir, t.model), "qalora_adapter.json", "adapters[1]", "n_groups");

  hide_native(t.dir);
  edit_json(t.peft(), [](json& j) { j["r"] = 2.5; });
  EXPECT_MENTIONS(load_error(t.dir, t.model), "adapter_config.json", "'r'", "2.5");
  edit_json(t.peft(), [](json& j) {
    j["r"] = 5;
    j["lora_alpha"] = "16";
  });
  EXPECT_MENTIONS(load_error(t.dir, t.model), "adapter_config.json", "'lora_alpha'", "\"16\"");
  edit_json(t.peft(), [](json& j) {
    j["lora_alpha"] = 16;
    j["use_rslora"] = "yes";
  });
  EXPECT_MENTIONS(load_error(t.dir, t.model), "adapter_config.json", "'use_rslora'", "yes");
}

TEST(AdapterIoErrors, RankDifferentFromTheTensors) {
  Saved s;
  edit_json(s.native(), [](json& j) { j["rank"] = 4; });
  EXPECT_MENTIONS(load_error(s.dir, s.model), "qalora_adapter.safetensors", "layers.0.q_proj.A",
                  "[5, 64]", "expected [4, 64]");
  hide_native(s.dir);
  edit_json(s.peft(), [](json& j) { j["r"] = 6; });
  EXPECT_MENTIONS(load_error(s.dir, s.model), "adapter_model.safetensors",
                  "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", "[5, 64]",
                  "expected [6, 64]");
}

TEST(AdapterIoErrors, AnotherModelsDimensions) {
  Saved s;
  test::RandomModelShape other = kShape;
  other.hidden = 80;
  const Model m = make_model(other, 0);
  EXPECT_MENTIONS(load_error(s.dir, m), "qalora_adapter.json", "base.hidden_dim", "96", "80");
  hide_native(s.dir);
  // up_proj's lora_A [5, 64] fits, its lora_B [96, 5] does not.
  EXPECT_MENTIONS(load_error(s.dir, m), "adapter_model.safetensors",
                  "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight", "[96, 5]",
                  "expected [80, 5]");
}

TEST(AdapterIoErrors, QaloraGroupSizeOfAnotherBase) {
  const Model m16 = make_model(kShape, 16), m32 = make_model(kShape, 32);
  const fs::path dir = test::temp_dir() / "adapter";
  save_adapter(random_adapters(m16, config_of(AdapterKind::QaLora, AdapterPool::Average, "v_proj",
                                              false, AdapterInit::Kaiming)),
               m16, dir);
  EXPECT_MENTIONS(load_error(dir, m32), dir.string(), "v_proj", "group size", "32", "16");
  hide_native(dir);
  EXPECT_MENTIONS(load_error(dir, m32), dir.string(), "v_proj", "group size", "32", "16");
  // Not divisible at all: PEFT's QA-LoRA cannot hold it.
  edit_json(dir / "adapter_config.json", [](json& j) { j["qalora_group_size"] = 24; });
  EXPECT_MENTIONS(load_error(dir, m16), "adapter_config.json", "qalora_group_size", "24", "64");
}

TEST(AdapterIoErrors, UnknownTargetsAndTensors) {
  Saved s;
  edit_json(s.native(), [](json& j) { j["targets"] = {"q_proj", "lm_head", "up_proj"}; });
  EXPECT_MENTIONS(load_error(s.dir, s.model), "qalora_adapter.json", "'targets'", "lm_head");
  edit_json(s.native(), [](json& j) {
    j["targets"] = {"up_proj"};  // adapters list q_proj too
  });
  EXPECT_MENTIONS(load_error(s.dir, s.model), "q_proj");
  edit_json(s.native(), [](json& j) { j["targets"] = {"q_proj", "up_proj"}; });
  test::edit_safetensors(s.dir / "qalora_adapter.safetensors", [](std::vector<StWriteTensor>& t) {
    t.push_back(st_f32("layers.0.v_proj.A", Tensor::zeros({5, 64})));
  });
  EXPECT_MENTIONS(load_error(s.dir, s.model), "qalora_adapter.safetensors", "layers.0.v_proj.A",
                  "not an adapter listed");

  hide_native(s.dir);
  edit_json(s.peft(), [](json& j) { j["target_modules"] = {"q_proj", "lm_head"}; });
  EXPECT_MENTIONS(load_error(s.dir, s.model), "adapter_config.json", "'target_modules'", "lm_head");
  edit_json(s.peft(), [](json& j) { j["target_modules"] = {"q_proj"}; });
  EXPECT_MENTIONS(load_error(s.dir, s.model), "adapter_model.safetensors",
                  "layers.0.mlp.up_proj.lora_A.weight", "target_modules");
  edit_json(s.peft(), [](json& j) { j["target_modules"] = "all-linear"; });
  EXPECT_MENTIONS(load_error(s.dir, s.model), "adapter_model.safetensors", "missing tensor",
                  "k_proj.lora_A.weight");
  edit_json(s.peft(), [](json& j) { j["target_modules"] = {"up_proj", "q_proj"}; });
  ASSERT_NO_THROW(load_adapter(s.dir, s.model));

  const std::string qkv = "base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight";
  test::edit_safetensors(s.peft_weights(), [&](std::vector<StWriteTensor>& t) {
    t.push_back(st_f32(qkv, Tensor::zeros({5, 64})));
  });
  EXPECT_MENTIONS(load_error(s.dir, s.model), "adapter_model.safetensors", qkv);
  const std::string layer7 = "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight";
  test::edit_safetensors(s.peft_weights(), [&](std::vector<StWriteTensor>& t) {
    t.back() = st_f32(layer7, Tensor::zeros({5, 64}));
  });
  EXPECT_MENTIONS(load_error(s.dir, s.model), "adapter_model.safetensors", layer7, "layer 7",
                  "0..1");
  test::edit_safetensors(s.peft_weights(), [&](std::vector<StWriteTensor>& t) { t.pop_back(); });
  ASSERT_NO_THROW(load_adapter(s.dir, s.model));
  test::edit_safetensors(s.peft_weights(), [&](std::vector<StWriteTensor>& t) { t.pop_back(); });
  EXPECT_MENTIONS(load_error(s.dir, s.model), "adapter_model.safetensors", "missing tensor",
                  "layers.1.mlp.up_proj.lora_B.weight");
}

TEST(AdapterIoErrors, UnsupportedPeftFeatures) {
  Saved s;
  hide_native(s.dir);
  const auto refused = [&](const char* field, const json& value) {
    edit_json(s.peft(), [&](json& j) { j[field] = value; });
    EXPECT_MENTIONS(load_error(s.dir, s.model), "adapter_config.json", field);
    edit_json(s.peft(), [&](json& j) { j.erase(field); });
  };
  refused("bias", "all");
  refused("modules_to_save", {"lm_head"});
  refused("layers_to_transform", {0});
  refused("use_dora", true);
  refused("rank_pattern", {{"q_proj", 8}});
  refused("init_lora_weights", "pissa");
  edit_json(s.peft(), [](json& j) { j["peft_type"] = "IA3"; });
  EXPECT_MENTIONS(load_error(s.dir, s.model), "adapter_config.json", "peft_type", "IA3");
  edit_json(s.peft(), [](json& j) { j["peft_type"] = "LORA"; });
  ASSERT_NO_THROW(load_adapter(s.dir, s.model));
  // What PEFT writes by default is accepted.
  edit_json(s.peft(), [](json& j) {
    j["layers_to_transform"] = nullptr;
    j["modules_to_save"] = json::array();
    j["rank_pattern"] = json::object();
    j["use_dora"] = false;
  });
  ASSERT_NO_THROW(load_adapter(s.dir, s.model));
}

}  // namespace
}  // namespace qalora
