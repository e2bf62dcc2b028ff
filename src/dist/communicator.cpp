#include "qalora/dist/communicator.h"

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "qalora/core/error.h"

#ifdef QALORA_WITH_MPI
#include <mpi.h>
#endif

namespace qalora {

std::string Communicator::broadcast_string(std::string s, int root) {
  auto n = static_cast<uint64_t>(s.size());
  broadcast(&n, sizeof n, root);
  s.resize(static_cast<size_t>(n));
  broadcast(s.data(), s.size(), root);
  return s;
}

namespace {

class SingleProcess final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  int local_size() const override { return 1; }
  void all_reduce_sum(float*, size_t) override {}
  void all_reduce_sum(double*, size_t) override {}
  void start_all_reduce_sum(float*, size_t) override {}
  void progress() override {}
  void finish() override {}
  void broadcast(void*, size_t, int) override {}
  void barrier() override {}
  [[noreturn]] void abort(int code) override { std::exit(code); }
  const char* backend() const override { return "single"; }
};

#ifdef QALORA_WITH_MPI
// Whether an MPI launcher (Open MPI's mpirun, MPICH/PMI, PMIx as under srun) started us.
bool launched_by_mpi() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (std::getenv(var) != nullptr) return true;
  return false;
}
#endif

#ifdef QALORA_WITH_MPI
// Seconds a collective operation may wait for the other ranks before this rank gives up
// (QALORA_COMM_TIMEOUT; 0: wait forever). A rank that dies is caught by the launcher; one that
// hangs (a stopped process, a stuck filesystem, a broken link) would otherwise stall every
// other rank for good. The default leaves room for the longest legitimate wait: a step whose
// micro-batches are unequally long on a slow machine.
int comm_timeout_seconds() {
  const char* v = std::getenv("QALORA_COMM_TIMEOUT");
  if (v == nullptr || *v == '\0') return 1800;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  QL_CHECK(*end == '\0' && n >= 0 && n <= 1'000'000,
           "QALORA_COMM_TIMEOUT: expected seconds >= 0, got '", v, "'");
  return static_cast<int>(n);
}

void check_mpi(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  fail("MPI: ", what, " failed: ", std::string(msg, static_cast<size_t>(len)));
}

class Mpi final : public Communicator {
 public:
  Mpi() : timeout_s_(comm_timeout_seconds()) {
    int provided = 0;
    check_mpi(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
    // Errors come back as codes (thrown as Error) instead of aborting inside the library.
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
    MPI_Comm_size(MPI_COMM_WORLD, &size_);
    MPI_Comm local;
    check_mpi(
        MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &local),
        "MPI_Comm_split_type");
    MPI_Comm_size(local, &local_size_);
    MPI_Comm_free(&local);
    if (timeout_s_ > 0) watchdog_ = std::thread([this] { watch(); });
  }
  ~Mpi() override {
    {
      const std::lock_guard lock(mutex_);
      closing_ = true;
    }
    wake_.notify_all();
    if (watchdog_.joinable()) watchdog_.join();
    MPI_Finalize();
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_size() const override { return local_size_; }
  void all_reduce_sum(float* data, size_t n) override { reduce(data, n, MPI_FLOAT); }
  void all_reduce_sum(double* data, size_t n) override { reduce(data, n, MPI_DOUBLE); }
  void start_all_reduce_sum(float* data, size_t n) override {
    for (size_t done = 0; done < n;) {
      const int count = static_cast<int>(std::min<size_t>(n - done, kMaxCount));
      check_mpi(MPI_Iallreduce(MPI_IN_PLACE, data + done, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD,
                               &pending_.emplace_back()),
                "MPI_Iallreduce");
      done += static_cast<size_t>(count);
    }
  }
  void progress() override {
    int done = 0;
    if (!pending_.empty())
      check_mpi(MPI_Testall(static_cast<int>(pending_.size()), pending_.data(), &done,
                            MPI_STATUSES_IGNORE),
                "MPI_Testall");
  }
  void finish() override {
    const Waiting waiting(*this, "MPI_Waitall");
    check_mpi(MPI_Waitall(static_cast<int>(pending_.size()), pending_.data(), MPI_STATUSES_IGNORE),
              "MPI_Waitall");
    pending_.clear();
  }
  void broadcast(void* data, size_t bytes, int root) override {
    const Waiting waiting(*this, "MPI_Bcast");
    for (size_t done = 0; done < bytes;) {  // MPI counts are ints
      const int n = static_cast<int>(std::min<size_t>(bytes - done, kMaxCount));
      check_mpi(MPI_Bcast(static_cast<char*>(data) + done, n, MPI_BYTE, root, MPI_COMM_WORLD),
                "MPI_Bcast");
      done += static_cast<size_t>(n);
    }
  }
  void barrier() override {
    const Waiting waiting(*this, "MPI_Barrier");
    check_mpi(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier");
  }
  [[noreturn]] void abort(int code) override {
    std::fflush(nullptr);
    MPI_Abort(MPI_COMM_WORLD, code);
    std::exit(code);  // not reached
  }
  const char* backend() const override { return "mpi"; }

 private:
  static constexpr size_t kMaxCount = size_t{1} << 30;
  // Marks a collective operation in progress for the watchdog.
  class Waiting {
   public:
    Waiting(Mpi& mpi, const char* what) : mpi_(mpi) {
      const std::lock_guard lock(mpi_.mutex_);
      mpi_.op_ = what;
      mpi_.since_ = std::chrono::steady_clock::now();
    }
    ~Waiting() {
      const std::lock_guard lock(mpi_.mutex_);
      mpi_.op_ = nullptr;
    }
    Waiting(const Waiting&) = delete;
    Waiting& operator=(const Waiting&) = delete;

   private:
    Mpi& mpi_;
  };

  // Ends this rank when a collective operation has waited longer than the timeout; the launcher
  // then ends the others (MPI_Abort may only be called from the main thread here).
  void watch() {
    std::unique_lock lock(mutex_);
    while (!wake_.wait_for(lock, std::chrono::seconds(1), [this] { return closing_; })) {
      if (op_ == nullptr ||
          std::chrono::steady_clock::now() - since_ < std::chrono::seconds(timeout_s_))
        continue;
      std::fprintf(
          stderr,
          "error: rank %d: no answer from the other ranks for %d s in %s (a rank hangs, or "
          "the network is down); ending the job (QALORA_COMM_TIMEOUT sets the limit)\n",
          rank_, timeout_s_, op_);
      std::fflush(nullptr);
      std::_Exit(1);
    }
  }

  template <typename T>
  void reduce(T* data, size_t n, MPI_Datatype type) {
    const Waiting waiting(*this, "MPI_Allreduce");
    for (size_t done = 0; done < n;) {
      const int count = static_cast<int>(std::min<size_t>(n - done, kMaxCount));
      check_mpi(MPI_Allreduce(MPI_IN_PLACE, data + done, count, type, MPI_SUM, MPI_COMM_WORLD),
                "MPI_Allreduce");
      done += static_cast<size_t>(count);
    }
  }
  int rank_ = 0, size_ = 1, local_size_ = 1;
  const int timeout_s_;
  std::mutex mutex_;
  std::condition_variable wake_;
  bool closing_ = false;
  const char* op_ = nullptr;  // the collective operation in progress, if any
  std::chrono::steady_clock::time_point since_;
  std::thread watchdog_;
  std::vector<MPI_Request> pending_;  // started by start_all_reduce_sum
};
#endif

}  // namespace

Communicator& world() {
  static const std::unique_ptr<Communicator> comm = []() -> std::unique_ptr<Communicator> {
#ifdef QALORA_WITH_MPI
    if (launched_by_mpi()) return std::make_unique<Mpi>();
#endif
    return std::make_unique<SingleProcess>();
  }();
  return *comm;
}

bool mpi_available() {
#ifdef QALORA_WITH_MPI
  return true;
#else
  return false;
#endif
}

}  // namespace qalora
