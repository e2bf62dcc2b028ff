#include "qalora/core/progress.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "qalora/core/error.h"

namespace qalora {

namespace {

std::string format_seconds(double s) {
  char buf[32];
  if (s < 60) {
    std::snprintf(buf, sizeof buf, "%.1fs", s);
  } else if (s < 3600) {
    std::snprintf(buf, sizeof buf, "%dm%02ds", static_cast<int>(s / 60), static_cast<int>(s) % 60);
  } else {
    std::snprintf(buf, sizeof buf, "%dh%02dm", static_cast<int>(s / 3600),
                  static_cast<int>(s / 60) % 60);
  }
  return buf;
}

}  // namespace

ProgressBar::ProgressBar(std::string label, int64_t total, std::FILE* out)
    : ProgressBar(std::move(label), total, out, isatty(fileno(out)) != 0) {}

ProgressBar::ProgressBar(std::string label, int64_t total, std::FILE* out, bool tty)
    : label_(std::move(label)),
      total_(total),
      out_(out),
      tty_(tty),
      start_(Clock::now()),
      last_print_(start_) {}

ProgressBar::~ProgressBar() {
  finish();
}

std::string ProgressBar::format(const std::string& label, int64_t done, int64_t total,
                                double elapsed_seconds, int64_t base) {
  const double rate =
      elapsed_seconds > 0 ? static_cast<double>(done - base) / elapsed_seconds : 0.0;
  std::string line = label + " " + std::to_string(done);
  char buf[96];
  if (total > 0) {
    std::snprintf(buf, sizeof buf, "/%lld (%d%%)", static_cast<long long>(total),
                  static_cast<int>(100 * done / total));
    line += buf;
  }
  std::snprintf(buf, sizeof buf, " %.3g it/s", rate);
  line += buf;
  if (total > 0 && done < total && rate > 0) {
    line += " ETA " + format_seconds(static_cast<double>(total - done) / rate);
  } else {
    line += " elapsed " + format_seconds(elapsed_seconds);
  }
  return line;
}

void ProgressBar::update(int64_t done) {
  done_ = done;
  if (finished_) return;
  const auto now = Clock::now();
  if (tty_) {
    // Redrawing faster than the eye can follow only costs time.
    if (now - last_print_ < std::chrono::milliseconds(100) && done_ != total_) return;
  } else if (total_ > 0) {
    const int64_t decile = 10 * done_ / total_;
    if (decile == last_decile_) return;
    last_decile_ = decile;
  } else if (now - last_print_ < std::chrono::seconds(10)) {
    return;
  }
  last_print_ = now;
  print(false);
}

void ProgressBar::finish() {
  if (finished_) return;
  finished_ = true;
  // Off a TTY the last decile line already shows the final state when the work completed.
  if (!tty_ && total_ > 0 && last_decile_ == 10 && done_ >= total_) return;
  print(true);
}

void ProgressBar::print(bool final_line) {
  const double elapsed = std::chrono::duration<double>(Clock::now() - start_).count();
  std::string line = format(label_, done_, total_, elapsed, base_);
  if (!status_.empty()) line += "  " + status_;
  if (tty_) {
    // \033[K clears what a longer previous line left behind.
    std::fprintf(out_, "\r%s\033[K%s", line.c_str(), final_line ? "\n" : "");
  } else {
    std::fprintf(out_, "%s\n", line.c_str());
  }
  std::fflush(out_);
}

JsonlWriter::JsonlWriter(const std::filesystem::path& path, bool append) : path_(path) {
  file_ = std::fopen(path.c_str(), append ? "a" : "w");
  QL_CHECK(file_ != nullptr, "cannot open metrics file ", path,
           " for writing: ", std::strerror(errno));
}

JsonlWriter::~JsonlWriter() {
  if (file_) std::fclose(file_);
}

void JsonlWriter::write(const nlohmann::json& record) {
  const std::string line = record.dump() + "\n";
  const bool ok =
      std::fwrite(line.data(), 1, line.size(), file_) == line.size() && std::fflush(file_) == 0;
  QL_CHECK(ok, "cannot write metrics file ", path_, ": ", std::strerror(errno));
}

}  // namespace qalora
