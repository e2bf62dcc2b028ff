#include "qalora/dist/communicator.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>

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
  void broadcast(void*, size_t, int) override {}
  void barrier() override {}
  [[noreturn]] void abort(int code) override { std::exit(code); }
  const char* backend() const override { return "single"; }
};

// Whether an MPI launcher (Open MPI's mpirun, MPICH/PMI, PMIx as under srun) started us.
bool launched_by_mpi() {
  for (const char* var : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (std::getenv(var) != nullptr) return true;
  return false;
}

#ifdef QALORA_WITH_MPI
void check_mpi(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  fail("MPI: ", what, " failed: ", std::string(msg, static_cast<size_t>(len)));
}

class Mpi final : public Communicator {
 public:
  Mpi() {
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
  }
  ~Mpi() override { MPI_Finalize(); }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int local_size() const override { return local_size_; }
  void all_reduce_sum(float* data, size_t n) override { reduce(data, n, MPI_FLOAT); }
  void all_reduce_sum(double* data, size_t n) override { reduce(data, n, MPI_DOUBLE); }
  void broadcast(void* data, size_t bytes, int root) override {
    for (size_t done = 0; done < bytes;) {  // MPI counts are ints
      const int n = static_cast<int>(std::min<size_t>(bytes - done, kMaxCount));
      check_mpi(MPI_Bcast(static_cast<char*>(data) + done, n, MPI_BYTE, root, MPI_COMM_WORLD),
                "MPI_Bcast");
      done += static_cast<size_t>(n);
    }
  }
  void barrier() override { check_mpi(MPI_Barrier(MPI_COMM_WORLD), "MPI_Barrier"); }
  [[noreturn]] void abort(int code) override {
    std::fflush(nullptr);
    MPI_Abort(MPI_COMM_WORLD, code);
    std::exit(code);  // not reached
  }
  const char* backend() const override { return "mpi"; }

 private:
  static constexpr size_t kMaxCount = size_t{1} << 30;
  template <typename T>
  void reduce(T* data, size_t n, MPI_Datatype type) {
    for (size_t done = 0; done < n;) {
      const int count = static_cast<int>(std::min<size_t>(n - done, kMaxCount));
      check_mpi(MPI_Allreduce(MPI_IN_PLACE, data + done, count, type, MPI_SUM, MPI_COMM_WORLD),
                "MPI_Allreduce");
      done += static_cast<size_t>(count);
    }
  }
  int rank_ = 0, size_ = 1, local_size_ = 1;
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
