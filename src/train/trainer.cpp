#include "qalora/train/trainer.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <optional>
#include <sstream>

#include "qalora/adapters/adapter_io.h"
#include "qalora/core/atomic_file.h"
#include "qalora/core/clock.h"
#include "qalora/core/error.h"
#include "qalora/core/hash.h"
#include "qalora/core/mapped_file.h"
#include "qalora/core/progress.h"
#include "qalora/core/resources.h"
#include "qalora/io/safetensors.h"
#include "qalora/ops/gemm.h"
#include "qalora/train/loss_curve.h"
#include "qalora/train/train_step.h"

namespace qalora {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kStateFile = "trainer_state.json";
constexpr const char* kOptimizerFile = "optimizer.safetensors";
constexpr const char* kCheckpointPrefix = "checkpoint-";

// Where the per-sequence dropout seeds of the run come from (derive_seed streams).
constexpr uint64_t kDropoutStream = 0xD50F;

json data_identity(const fs::path& path) {
  if (path.empty()) return nullptr;
  return {{"path", path.filename().string()},
          {"bytes", fs::file_size(path)},
          {"fnv1a64", file_fingerprint(path)}};
}

json points_json(const std::vector<LossPoint>& pts) {
  json a = json::array();
  for (const LossPoint& p : pts) a.push_back({p.step, p.loss});
  return a;
}

std::vector<LossPoint> points_from(const json& a) {
  std::vector<LossPoint> pts;
  for (const json& p : a) pts.push_back({p.at(0).get<int64_t>(), p.at(1).get<double>()});
  return pts;
}

int64_t checkpoint_step(const fs::path& dir) {
  const std::string name = dir.filename().string();
  if (!name.starts_with(kCheckpointPrefix)) return -1;
  const std::string digits = name.substr(std::char_traits<char>::length(kCheckpointPrefix));
  if (digits.empty() || !std::all_of(digits.begin(), digits.end(), ::isdigit)) return -1;
  return std::stoll(digits);
}

std::vector<std::pair<int64_t, fs::path>> list_checkpoints(const fs::path& dir) {
  std::vector<std::pair<int64_t, fs::path>> found;
  if (!fs::is_directory(dir)) return found;
  for (const auto& e : fs::directory_iterator(dir)) {
    const int64_t step = checkpoint_step(e.path());
    if (e.is_directory() && step >= 0 && fs::exists(e.path() / kStateFile))
      found.emplace_back(step, e.path());
  }
  std::sort(found.begin(), found.end());
  return found;
}

// The first field where two identity objects differ, as "a.b.c".
std::string first_difference(const json& a, const json& b, const std::string& prefix = "") {
  if (a.is_object() && b.is_object()) {
    for (const auto& [k, v] : a.items()) {
      const std::string name = prefix.empty() ? k : prefix + "." + k;
      if (!b.contains(k)) return name;
      if (std::string d = first_difference(v, b.at(k), name); !d.empty()) return d;
    }
    for (const auto& [k, v] : b.items())
      if (!a.contains(k)) return prefix.empty() ? k : prefix + "." + k;
    return "";
  }
  return a == b ? "" : (prefix.empty() ? "(root)" : prefix);
}

const json& field_at(const json& j, const std::string& dotted) {
  const json* p = &j;
  std::stringstream ss(dotted);
  for (std::string part; std::getline(ss, part, '.');) {
    static const json missing = "(absent)";
    if (!p->is_object() || !p->contains(part)) return missing;
    p = &p->at(part);
  }
  return *p;
}

struct RunState {
  int64_t step = 0;
  int64_t total = 0;  // the run's length when the state was saved
  BatcherState batcher;
  double eval_loss_before = -1;
  std::vector<LossPoint> train_points, eval_points;
};

// The optimizer file's tensors: each adapter's A then B moments, named like the adapter file's
// keys plus ".exp_avg" / ".exp_avg_sq".
struct MomentTensor {
  std::string name;
  Shape shape;
  std::vector<float>* values;
};

std::vector<MomentTensor> moment_tensors(const AdapterSet& adapters, AdamW& opt) {
  std::vector<MomentTensor> tensors;
  for (size_t k = 0; k < opt.first_moments().size(); ++k) {
    const LoraAdapter& a = adapters.adapters[k / 2];
    const std::string base =
        cat("layers.", a.layer, ".", target_name(a.target), k % 2 ? ".B" : ".A");
    const Shape& shape = (k % 2 ? a.B : a.A).shape();
    tensors.push_back({base + ".exp_avg", shape, &opt.first_moments()[k]});
    tensors.push_back({base + ".exp_avg_sq", shape, &opt.second_moments()[k]});
  }
  return tensors;
}

json state_json(const RunState& rs, const AdamW& opt, const json& identity) {
  return {{"step", rs.step},
          {"total_steps", rs.total},
          {"optimizer_steps", opt.steps()},
          {"batcher", {{"epoch", rs.batcher.epoch}, {"position", rs.batcher.position}}},
          {"eval_loss_before", rs.eval_loss_before},
          {"train_loss", points_json(rs.train_points)},
          {"eval_loss", points_json(rs.eval_points)},
          {"identity", identity}};
}

void save_checkpoint(const fs::path& out, const Model& model, const AdapterSet& adapters,
                     AdamW& opt, const RunState& rs, const json& identity, int64_t keep) {
  const fs::path final_dir = out / (kCheckpointPrefix + std::to_string(rs.step));
  const fs::path tmp = out / (final_dir.filename().string() + ".tmp");
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  try {
    save_adapter(adapters, model, tmp);
    std::vector<StWriteTensor> moments;
    for (const MomentTensor& m : moment_tensors(adapters, opt)) {
      StWriteTensor t{m.name, StDtype::F32, m.shape, {}};
      t.bytes.resize(m.values->size() * sizeof(float));
      std::memcpy(t.bytes.data(), m.values->data(), t.bytes.size());
      moments.push_back(std::move(t));
    }
    write_safetensors(tmp / kOptimizerFile, moments);
    write_file_atomic(tmp / kStateFile, state_json(rs, opt, identity).dump(1));
  } catch (...) {
    // A failed write (a full disk) leaves the earlier checkpoints and no partial folder.
    std::error_code ignored;
    fs::remove_all(tmp, ignored);
    throw;
  }
  // The folder appears under its final name only once complete.
  fs::remove_all(final_dir);
  fs::rename(tmp, final_dir);
  if (keep > 0) {
    auto all = list_checkpoints(out);
    for (size_t i = 0; i + static_cast<size_t>(keep) < all.size(); ++i)
      fs::remove_all(all[i].second);
  }
}

RunState load_checkpoint(const fs::path& dir, const Model& model, const json& identity,
                         AdapterSet& adapters, AdamW& opt) {
  const fs::path state_path = dir / kStateFile;
  std::ifstream in(state_path);
  QL_CHECK(in, "--resume: ", state_path.string(), " not found (expected a checkpoint-N folder)");
  json state;
  RunState rs;
  int64_t optimizer_steps = 0;
  try {
    state = json::parse(in);
    json saved = state.at("identity");
    // Checkpoints written before a finished run could be continued held the run's length.
    saved.erase("max_steps");
    saved.erase("num_epochs");
    if (const std::string d = first_difference(saved, identity); !d.empty())
      fail("--resume: ", dir.string(), " is from another run configuration: ", d, " was ",
           field_at(saved, d).dump(), ", this run has ", field_at(identity, d).dump());
    rs.step = state.at("step").get<int64_t>();
    rs.total = state.value("total_steps", int64_t{0});  // absent before runs could be extended
    rs.batcher.epoch = state.at("batcher").at("epoch").get<int64_t>();
    rs.batcher.position = state.at("batcher").at("position").get<int64_t>();
    rs.eval_loss_before = state.at("eval_loss_before").get<double>();
    rs.train_points = points_from(state.at("train_loss"));
    rs.eval_points = points_from(state.at("eval_loss"));
    optimizer_steps = state.at("optimizer_steps").get<int64_t>();
  } catch (const json::exception& e) {
    fail(state_path.string(), ": malformed trainer state: ", e.what());
  }
  adapters = load_adapter(dir, model);
  const fs::path opt_path = dir / kOptimizerFile;
  QL_CHECK(fs::exists(opt_path), "--resume: ", opt_path.string(), " not found");
  const SafetensorsFile st = SafetensorsFile::open(opt_path);
  opt = AdamW(adapters, opt.config());
  opt.set_steps(optimizer_steps);
  for (const MomentTensor& m : moment_tensors(adapters, opt)) {
    const StTensorInfo* info = st.find(m.name);
    QL_CHECK(info != nullptr, opt_path.string(), ": tensor '", m.name, "' missing");
    const Tensor t = st.load_f32(*info);
    QL_CHECK(static_cast<size_t>(t.numel()) == m.values->size(), opt_path.string(), ": tensor '",
             m.name, "' has ", t.numel(), " values, expected ", m.values->size());
    std::copy(t.data(), t.data() + t.numel(), m.values->begin());
  }
  return rs;
}

// Keeps the metrics of steps up to `step` (those a resumed run does not redo).
void truncate_metrics(const fs::path& path, int64_t step) {
  std::ifstream in(path);
  if (!in) return;
  std::string kept, line;
  while (std::getline(in, line)) {
    const json j = json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.value("step", int64_t{0}) <= step) kept += line + "\n";
  }
  write_file_atomic(path, kept);
}

// Checked before anything is saved: a checkpoint or adapter never holds a NaN or an infinity.
void check_finite(const AdapterSet& adapters, int64_t step) {
  for (const LoraAdapter& a : adapters.adapters)
    for (const Tensor* t : {&a.A, &a.B})
      QL_CHECK(
          std::all_of(t->data(), t->data() + t->numel(), [](float v) { return std::isfinite(v); }),
          "train: step ", step, ": the adapter of layer ", a.layer, " ", target_name(a.target),
          " holds a non-finite value (learning rate too high?); nothing was saved for this step");
}

void write_loss_curve(const fs::path& out, const RunState& rs, const std::string& title) {
  write_file_atomic(out / "loss.svg", loss_curve_svg(rs.train_points, rs.eval_points, title));
}

}  // namespace

const char* non_finite_name(NonFinite n) {
  return n == NonFinite::Stop ? "stop" : "skip";
}

NonFinite parse_non_finite(std::string_view name) {
  for (NonFinite n : {NonFinite::Stop, NonFinite::Skip})
    if (name == non_finite_name(n)) return n;
  fail("--on-non-finite: unknown action '", name, "', expected stop or skip");
}

json TrainConfig::identity(int ranks) const {
  const AdapterConfig& a = adapter;
  json targets = json::array();
  for (Target t : a.targets) targets.push_back(target_name(t));
  return {
      {"data", data_identity(data)},
      {"eval_data", data_identity(eval_data)},
      {"eval_fraction", eval_data.empty() ? eval_fraction : 0.0},
      {"data_options", data_options_to_json(data_options)},
      {"adapter",
       {{"kind", adapter_kind_name(a.kind)},
        {"rank", a.rank},
        {"alpha", a.alpha},
        {"dropout", a.dropout},
        {"rslora", a.rslora},
        {"targets", targets},
        {"init", adapter_init_name(a.init)},
        {"pool", adapter_pool_name(a.pool)},
        {"seed", a.seed}}},
      {"learning_rate", learning_rate},
      {"lr_scheduler", lr_schedule_name(lr_schedule)},
      {"warmup_ratio", warmup_ratio},
      {"max_grad_norm", max_grad_norm},
      {"adamw",
       {{"beta1", adamw.beta1},
        {"beta2", adamw.beta2},
        {"eps", adamw.eps},
        {"weight_decay", adamw.weight_decay}}},
      {"batch_size", batch_size},
      // Micro-batches per optimizer step over all ranks: a run resumes at another world size
      // that keeps it (2 ranks x --grad-accum 2 = 1 rank x 4).
      {"grad_accum", grad_accum * ranks},
      {"group_by_length", group_by_length},
      {"seed", seed},
  };
}

namespace {

// A run stopped before its first checkpoint left only its train_config.json: `--resume` then
// starts it over from step 0 in its folder, when that file holds this run's configuration
// (anything else in the folder is rewritten by the new start).
bool started_without_checkpoint(const fs::path& dir, const json& identity) {
  const fs::path config_path = dir / "train_config.json";
  if (!fs::is_directory(dir) || fs::exists(dir / kStateFile) || !list_checkpoints(dir).empty() ||
      !fs::exists(config_path))
    return false;
  json saved;
  try {
    saved = json::parse(read_file(config_path));
  } catch (const json::exception& e) {
    fail(config_path.string(), ": malformed run configuration: ", e.what());
  }
  json same_fields = json::object();  // train_config.json adds fields outside the identity
  for (const auto& [k, v] : identity.items())
    if (saved.contains(k)) same_fields[k] = saved[k];
  if (const std::string d = first_difference(same_fields, identity); !d.empty())
    fail("--resume: ", dir.string(), " is from another run configuration: ", d, " was ",
         field_at(same_fields, d).dump(), ", this run has ", field_at(identity, d).dump());
  return true;
}

}  // namespace

fs::path find_checkpoint(const fs::path& dir) {
  QL_CHECK(fs::is_directory(dir), "--resume: ", dir.string(), " is not a folder");
  if (fs::exists(dir / kStateFile)) return dir;
  const auto all = list_checkpoints(dir);
  QL_CHECK(!all.empty(), "--resume: ", dir.string(), " holds no ", kStateFile,
           " and no checkpoint-N folder");
  return all.back().second;
}

namespace {

// Stops every rank with one line when a rank runs another configuration or base than rank 0.
void check_same_job(Communicator& comm, const json& identity, const Model& model) {
  json job = identity;
  job["base"] = {{"model", fs::path(model.source_path).filename().string()},
                 {"parameters", model.parameter_count()},
                 {"quantization", model.quant.empty() ? "none" : model.quant.method}};
  const std::string mine = job.dump();
  const std::string root_job = comm.broadcast_string(mine, 0);
  double differ = root_job == mine ? 0.0 : 1.0;
  if (differ > 0)
    std::fprintf(stderr, "rank %d: %s\n", comm.rank(),
                 first_difference(json::parse(root_job), job).c_str());
  comm.all_reduce_sum(&differ, 1);
  QL_CHECK(differ == 0, "train: ", differ, " of ", comm.size(),
           " ranks run another configuration or base than rank 0 (see each rank's line above)");
}

// Sums the adapter gradients over the ranks layer by layer, as soon as each layer's are final:
// the backward of the rank's last sequence in a step reaches the layers top down, and the
// layer's adapters (packed into one bucket) start summing while the layers below compute.
class GradientSum {
 public:
  GradientSum(Communicator& comm, AdapterSet& adapters, int64_t layers)
      : comm_(comm),
        adapters_(adapters),
        buckets_(static_cast<size_t>(layers)),
        started_(static_cast<size_t>(layers), false) {}
  void begin_step() { std::fill(started_.begin(), started_.end(), false); }
  // Layer li's gradients are final on this rank.
  void layer_done(int64_t li) {
    std::vector<float>& bucket = buckets_[static_cast<size_t>(li)];
    bucket.clear();
    for (const LoraAdapter& a : adapters_.adapters)
      if (a.layer == li)
        for (const std::vector<float>* g : {&a.grad_A, &a.grad_B})
          bucket.insert(bucket.end(), g->begin(), g->end());
    comm_.start_all_reduce_sum(bucket.data(), bucket.size());
    started_[static_cast<size_t>(li)] = true;
    comm_.progress();
  }
  // Starts the layers not started yet (a rank whose last sequence scored nothing), waits for
  // every sum and puts them back into the adapters.
  void finish() {
    for (size_t li = 0; li < buckets_.size(); ++li)
      if (!started_[li]) layer_done(static_cast<int64_t>(li));
    comm_.finish();
    std::vector<size_t> at(buckets_.size(), 0);
    for (LoraAdapter& a : adapters_.adapters)
      for (std::vector<float>* g : {&a.grad_A, &a.grad_B}) {
        const std::vector<float>& bucket = buckets_[static_cast<size_t>(a.layer)];
        size_t& i = at[static_cast<size_t>(a.layer)];
        std::copy_n(bucket.begin() + static_cast<std::ptrdiff_t>(i), g->size(), g->begin());
        i += g->size();
      }
  }

 private:
  Communicator& comm_;
  AdapterSet& adapters_;
  std::vector<std::vector<float>> buckets_;
  std::vector<bool> started_;
};

}  // namespace

TrainResult train(const Model& model, const TrainConfig& cfg, const std::atomic<bool>* stop,
                  Communicator& comm) {
  const Tokenizer& tok = model.require_tokenizer();
  const bool root = comm.is_root();
  const int ranks = comm.size();
  const Share share(&comm);
  QL_CHECK(!cfg.out.empty(), "train: --out is required");
  QL_CHECK(cfg.learning_rate > 0 && std::isfinite(cfg.learning_rate),
           "--learning-rate: expected a positive number, got ", cfg.learning_rate);
  QL_CHECK(cfg.batch_size >= 1, "--batch-size: expected >= 1, got ", cfg.batch_size);
  QL_CHECK(cfg.grad_accum >= 1, "--grad-accum: expected >= 1, got ", cfg.grad_accum);
  QL_CHECK(cfg.warmup_ratio >= 0 && cfg.warmup_ratio <= 1,
           "--warmup-ratio: expected a value in [0, 1], got ", cfg.warmup_ratio);
  QL_CHECK(cfg.max_steps > 0 || cfg.num_epochs >= 1,
           "--num-epochs: expected >= 1 (or --max-steps > 0), got ", cfg.num_epochs);
  QL_CHECK(cfg.eval_fraction >= 0 && cfg.eval_fraction < 1,
           "--eval-fraction: expected a value in [0, 1), got ", cfg.eval_fraction);

  Dataset train_set = load_dataset(cfg.data, tok, cfg.data_options);
  if (root)
    std::printf("data: %s (%s): %s\n", cfg.data.string().c_str(),
                data_format_name(train_set.format), train_set.stats.summary().c_str());
  Dataset eval_set = cfg.eval_data.empty() ? split_heldout(train_set, cfg.eval_fraction, cfg.seed)
                                           : load_dataset(cfg.eval_data, tok, cfg.data_options);
  QL_CHECK(!train_set.examples.empty(), cfg.data.string(), ": no training examples left");
  if (root)
    std::printf("split: %zu training, %zu held-out examples%s\n", train_set.examples.size(),
                eval_set.examples.size(),
                cfg.eval_data.empty() ? "" : (" (from " + cfg.eval_data.string() + ")").c_str());

  // Every rank draws the same global order; an optimizer step takes grad_accum micro-batches
  // per rank, and rank r runs micro-batches r, r + ranks, ... of them.
  Batcher batcher(train_set, cfg.batch_size, cfg.group_by_length, cfg.seed);
  const int64_t step_batches = cfg.grad_accum * ranks;
  const int64_t steps_per_epoch = (batcher.batches_per_epoch() + step_batches - 1) / step_batches;
  const int64_t total = cfg.max_steps > 0 ? cfg.max_steps : cfg.num_epochs * steps_per_epoch;
  const auto warmup =
      static_cast<int64_t>(std::ceil(cfg.warmup_ratio * static_cast<double>(total)));

  const json identity = cfg.identity(ranks);
  if (ranks > 1) check_same_job(comm, identity, model);
  AdapterSet adapters;
  RunState rs;
  AdamW opt(adapters, cfg.adamw);
  fs::path resumed_from;
  const bool start_over = !cfg.resume.empty() && started_without_checkpoint(cfg.resume, identity);
  if (start_over && root)
    std::printf("--resume: %s has no checkpoint yet: the run starts over from step 0\n",
                cfg.resume.string().c_str());
  if (!cfg.resume.empty() && !start_over) {
    resumed_from = find_checkpoint(cfg.resume);
    rs = load_checkpoint(resumed_from, model, identity, adapters, opt);
    QL_CHECK(rs.step <= total, "train: ", resumed_from.string(), " is at step ", rs.step,
             ", past this run's ", total, " steps (raise --max-steps to continue it)");
    batcher.restore(rs.batcher);
  } else {
    adapters = create_adapters(model, cfg.adapter);
    opt = AdamW(adapters, cfg.adamw);
  }
  json run_config = identity;
  run_config["model"] = model.source_path;
  // Where the data was, for tools that read a slice of it later (merge's fidelity check); the
  // identity above keeps only the file name so that a moved file still resumes.
  run_config["data_path"] = fs::absolute(cfg.data).string();
  run_config["total_steps"] = total;
  run_config["warmup_steps"] = warmup;
  run_config["grad_checkpoint"] = cfg.grad_checkpoint;
  run_config["ranks"] = ranks;
  // Not part of the identity: a bf16 run may continue in fp32 (another machine) and back.
  run_config["compute_type"] = ops::compute_type_name(ops::compute_type());
  run_config["device"] = cfg.device.name();
  // Only rank 0 writes: the run's files, metrics, checkpoints, the adapter.
  if (root) {
    fs::create_directories(cfg.out);
    write_file_atomic(cfg.out / "train_config.json", run_config.dump(1));
  }

  int64_t max_len = 1;
  for (const Dataset* d : {&train_set, &eval_set})
    for (const Example& e : d->examples) max_len = std::max<int64_t>(max_len, std::ssize(e.tokens));
  // A batch's sequences run packed into one pass: buffers for batch_size of the longest.
  TrainSession session(
      model, adapters, cfg.batch_size * max_len,
      {.grad_checkpoint = cfg.grad_checkpoint, .max_sequence = max_len, .device = cfg.device});

  const AdapterConfig& ac = adapters.config;
  if (root) {
    std::printf(
        "adapter: %s r %lld alpha %g (scale %g%s) dropout %g, %lld parameters on %zu layers\n",
        adapter_kind_name(ac.kind), static_cast<long long>(ac.rank), ac.alpha, ac.scale(),
        ac.rslora ? ", rsLoRA" : "", ac.dropout, static_cast<long long>(adapters.parameter_count()),
        adapters.adapters.size());
    std::printf(
        "optimizer: AdamW lr %g %s, warmup %lld steps, max grad norm %g, weight decay %g; batch "
        "%lld "
        "x accum %lld x %d ranks (%s) = %lld sequences per step; %lld steps (%lld per epoch)%s; "
        "seed %llu\n",
        cfg.learning_rate, lr_schedule_name(cfg.lr_schedule), static_cast<long long>(warmup),
        cfg.max_grad_norm, cfg.adamw.weight_decay, static_cast<long long>(cfg.batch_size),
        static_cast<long long>(cfg.grad_accum), ranks, comm.backend(),
        static_cast<long long>(cfg.batch_size * step_batches), static_cast<long long>(total),
        static_cast<long long>(steps_per_epoch), cfg.grad_checkpoint ? ", grad checkpointing" : "",
        static_cast<unsigned long long>(cfg.seed));
    if (!resumed_from.empty())
      std::printf("resumed from %s at step %lld\n", resumed_from.string().c_str(),
                  static_cast<long long>(rs.step));
    if (!resumed_from.empty() && rs.total > 0 && rs.total != total)
      std::printf(
          "continuing a run of %lld steps to %lld: the learning rate schedule now spans %lld "
          "steps%s\n",
          static_cast<long long>(rs.total), static_cast<long long>(total),
          static_cast<long long>(total),
          cfg.lr_schedule == LrSchedule::Constant ? ""
                                                  : " (steps already taken used the old span)");
    std::fflush(stdout);
  }

  const fs::path metrics_path = cfg.out / "metrics.jsonl";
  std::optional<JsonlWriter> metrics;
  if (root) {
    if (!resumed_from.empty()) truncate_metrics(metrics_path, rs.step);
    metrics.emplace(metrics_path, !resumed_from.empty());
  }
  auto write_metrics = [&](const json& j) {
    if (metrics) metrics->write(j);
  };

  // Each rank scores every ranks-th held-out example; the sums are added up.
  auto eval_loss = [&]() {
    double sums[2] = {0, 0};  // loss, scored tokens
    share.for_each(std::ssize(eval_set.examples), [&](int64_t i) {
      const Example& e = eval_set.examples[static_cast<size_t>(i)];
      int64_t count = 0;
      sums[0] += session.loss(e.tokens, e.target, count);
      sums[1] += static_cast<double>(count);
    });
    comm.all_reduce_sum(sums, 2);
    return sums[1] > 0 ? sums[0] / sums[1] : -1.0;
  };
  auto record_eval = [&](int64_t step) {
    const auto t0 = Clock::now();
    const double loss = eval_loss();
    if (loss < 0) return loss;
    rs.eval_points.push_back({step, loss});
    write_metrics({{"step", step}, {"eval_loss", loss}, {"eval_seconds", seconds_since(t0)}});
    return loss;
  };

  TrainResult result;
  result.total_steps = total;
  result.first_step = rs.step;
  result.checkpoint = resumed_from;
  rs.total = total;
  if (resumed_from.empty()) {
    rs.eval_loss_before = record_eval(0);
    if (rs.eval_loss_before >= 0 && root)
      std::printf("held-out loss before training: %.4f\n", rs.eval_loss_before);
  }
  result.eval_loss_before = rs.eval_loss_before;
  const std::string title =
      cat(adapter_kind_name(ac.kind), " r", ac.rank, " on ",
          fs::path(model.source_path).filename().string(), ", ", cfg.data.filename().string());

  const auto t_start = Clock::now();
  std::optional<ProgressBar> bar;
  if (cfg.progress && root) {
    bar.emplace("train", total, stderr);
    bar->resume_from(rs.step);
  }
  std::vector<const Example*> step_examples;
  std::vector<int64_t> batch_of;  // the batch of step_examples[i] within the step
  std::vector<TrainSequence> packed;
  GradientSum gradient_sum(comm, adapters, model.config.n_layers);
  while (rs.step < total) {
    const auto t_data = Clock::now();
    step_examples.clear();
    batch_of.clear();
    int64_t last_mine = -1;  // this rank's last batch
    for (int64_t m = 0; m < step_batches; ++m) {
      for (int64_t i : batcher.next()) {
        step_examples.push_back(&train_set.examples[static_cast<size_t>(i)]);
        batch_of.push_back(m);
      }
      if (share.owns(m)) last_mine = m;
    }
    int64_t step_targets = 0, step_tokens = 0;
    for (const Example* e : step_examples) {
      step_targets += e->target_count();
      step_tokens += std::ssize(e->tokens);
    }
    const double data_s = seconds_since(t_data);

    zero_adapter_grads(adapters);
    const auto t_fb = Clock::now();
    double loss_sum = 0;
    const uint64_t step_seed =
        derive_seed(derive_seed(cfg.seed, kDropoutStream), static_cast<uint64_t>(rs.step));
    // The ranks' gradients (each divided by the global scored-token count) are summed, each
    // layer's from when the backward of this rank's last sequence is done with it.
    gradient_sum.begin_step();
    for (int64_t m = 0; m < step_batches; ++m) {
      if (!share.owns(m)) continue;
      // The seed of each example's place in the global step: any split gives the same dropout.
      packed.clear();
      for (size_t i = 0; i < step_examples.size(); ++i)
        if (batch_of[i] == m)
          packed.push_back(
              {step_examples[i]->tokens, step_examples[i]->target, derive_seed(step_seed, i)});
      int64_t n = 0;
      std::function<void(int64_t)> on_layer_done;
      if (ranks > 1 && m == last_mine)
        on_layer_done = [&](int64_t li) { gradient_sum.layer_done(li); };
      loss_sum += session.forward_backward(packed, 1.0f / static_cast<float>(step_targets), n,
                                           on_layer_done);
    }
    const double fb_s = seconds_since(t_fb);

    // What the summing still takes after the backward, and the losses and stop requests (every
    // rank stops at the same step).
    const auto t_comm = Clock::now();
    double shared[2] = {loss_sum, stop != nullptr && stop->load() ? 1.0 : 0.0};
    if (ranks > 1) {
      gradient_sum.finish();
      comm.all_reduce_sum(shared, 2);
    }
    loss_sum = shared[0];
    const double comm_s = seconds_since(t_comm);
    result.all_reduce_seconds += comm_s;

    const auto t_opt = Clock::now();
    const double norm = grad_norm(adapters);
    const double loss = loss_sum / static_cast<double>(std::max<int64_t>(1, step_targets));
    const double lr = learning_rate(cfg.lr_schedule, cfg.learning_rate, rs.step, warmup, total);
    // Every rank sees the same summed loss and gradients, so all stop or skip together.
    const bool finite = std::isfinite(loss) && std::isfinite(norm);
    if (!finite) {
      const std::string what = cat("the ", std::isfinite(loss) ? "gradient norm" : "loss", " is ",
                                   std::isfinite(loss) ? norm : loss);
      write_metrics({{"step", rs.step + 1}, {"non_finite", what}, {"lr", lr}});
      QL_CHECK(cfg.on_non_finite == NonFinite::Skip, "train: step ", rs.step + 1, ": ", what,
               " (learning rate ", lr, " too high?); stopped before updating the adapter, ",
               result.checkpoint.empty() ? std::string("the run has no checkpoint yet")
                                         : "the last checkpoint is " + result.checkpoint.string(),
               " (--on-non-finite skip steps over such steps)");
      ++result.skipped_steps;
      if (root)
        std::fprintf(stderr, "step %lld: %s, skipped\n", static_cast<long long>(rs.step + 1),
                     what.c_str());
    } else {
      if (cfg.max_grad_norm > 0 && norm > cfg.max_grad_norm)
        scale_grads(adapters, static_cast<float>(cfg.max_grad_norm / norm));
      opt.step(adapters, lr);
    }
    const double opt_s = seconds_since(t_opt);

    ++rs.step;
    rs.batcher = batcher.state();
    if (finite) rs.train_points.push_back({rs.step, loss});
    result.tokens += step_tokens;
    result.target_tokens += step_targets;
    if (finite) result.train_loss_last = loss;
    const double step_s = data_s + fb_s + comm_s + opt_s;
    if (finite)
      write_metrics({{"step", rs.step},
                     {"loss", loss},
                     {"lr", lr},
                     {"grad_norm", norm},
                     {"tokens", step_tokens},
                     {"target_tokens", step_targets},
                     {"tokens_per_second", static_cast<double>(step_tokens) / step_s},
                     {"seconds",
                      {{"data", data_s},
                       {"forward_backward", fb_s},
                       {"all_reduce", comm_s},
                       {"optimizer", opt_s}}},
                     {"epoch", rs.batcher.epoch}});
    char status[128];
    std::snprintf(status, sizeof status, "loss %.4f lr %.2e %.0f tok/s", loss, lr,
                  static_cast<double>(result.tokens) / seconds_since(t_start));
    if (bar) {
      bar->set_status(status);
      bar->update(rs.step);
    }

    const bool last = rs.step == total;
    if (!last && cfg.eval_steps > 0 && rs.step % cfg.eval_steps == 0) record_eval(rs.step);
    const bool stopping = shared[1] > 0;
    // The last step always leaves a checkpoint: a finished run continues to more steps.
    if (last || (cfg.save_steps > 0 && rs.step % cfg.save_steps == 0) || stopping) {
      if (root) {
        check_finite(adapters, rs.step);
        save_checkpoint(cfg.out, model, adapters, opt, rs, identity, cfg.save_total_limit);
        write_loss_curve(cfg.out, rs, title);
      }
      result.checkpoint = cfg.out / (kCheckpointPrefix + std::to_string(rs.step));
    }
    if (stopping && !last) {
      result.interrupted = true;
      break;
    }
  }
  if (bar) bar->finish();
  result.steps = rs.step;
  result.seconds = seconds_since(t_start);

  if (!result.interrupted) {
    result.eval_loss_after = record_eval(rs.step);
    if (root) {
      check_finite(adapters, rs.step);
      save_adapter(adapters, model, cfg.out);
    }
  }
  if (root) write_loss_curve(cfg.out, rs, title);
  // The files are complete when any rank returns.
  comm.barrier();
  write_metrics(
      {{"step", rs.step},
       {"summary",
        {{"tokens", result.tokens},
         {"target_tokens", result.target_tokens},
         {"seconds", result.seconds},
         {"tokens_per_second", static_cast<double>(result.tokens) / std::max(1e-9, result.seconds)},
         {"eval_loss_before", result.eval_loss_before},
         {"eval_loss_after", result.eval_loss_after},
         {"peak_rss_mb", static_cast<double>(peak_rss_bytes()) / 1e6},
         {"ranks", ranks},
         {"all_reduce_seconds", result.all_reduce_seconds},
         {"skipped_steps", result.skipped_steps},
         {"interrupted", result.interrupted}}}});
  return result;
}

}  // namespace qalora
