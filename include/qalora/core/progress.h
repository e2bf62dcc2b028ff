// Progress reporting for long loops (evaluation windows, training steps) and a JSONL metrics
// log. On a terminal the bar redraws one line in place; in logs (not a TTY) it prints a plain
// line only at every tenth of the work, so redirected output stays short and readable.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>

namespace qalora {

class ProgressBar {
 public:
  // total <= 0: unknown amount of work (no percentage or ETA). `out` is usually stderr.
  ProgressBar(std::string label, int64_t total, std::FILE* out = stderr);
  // Same, with the TTY decision made by the caller (tests, --no-progress).
  ProgressBar(std::string label, int64_t total, std::FILE* out, bool tty);
  ~ProgressBar();
  ProgressBar(const ProgressBar&) = delete;
  ProgressBar& operator=(const ProgressBar&) = delete;

  void update(int64_t done);
  void advance(int64_t n = 1) { update(done_ + n); }
  // Work already done before this bar started (a resumed run): counted in the total, not in
  // the rate.
  void resume_from(int64_t done) { base_ = done_ = done; }
  // Text shown after the counts (e.g. "loss 1.234 lr 2e-4"), from the next redraw on.
  void set_status(std::string status) { status_ = std::move(status); }
  // Prints the final state once (also done by the destructor).
  void finish();

  // "label 30/100 (30%) 12.5 it/s ETA 5.6s": the text of one progress line.
  static std::string format(const std::string& label, int64_t done, int64_t total,
                            double elapsed_seconds, int64_t base = 0);

 private:
  void print(bool final_line);

  using Clock = std::chrono::steady_clock;
  std::string label_;
  int64_t total_;
  std::FILE* out_;
  bool tty_;
  bool finished_ = false;
  int64_t done_ = 0;
  int64_t base_ = 0;
  std::string status_;
  int64_t last_decile_ = 0;  // last tenth of the work reported (not a TTY)
  Clock::time_point start_;
  Clock::time_point last_print_;
};

// Appends one JSON object per line to a file, flushed after each record so a crashed or
// interrupted run keeps everything logged so far.
class JsonlWriter {
 public:
  explicit JsonlWriter(const std::filesystem::path& path, bool append = false);
  ~JsonlWriter();
  JsonlWriter(const JsonlWriter&) = delete;
  JsonlWriter& operator=(const JsonlWriter&) = delete;

  void write(const nlohmann::json& record);
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  std::FILE* file_ = nullptr;
};

}  // namespace qalora
