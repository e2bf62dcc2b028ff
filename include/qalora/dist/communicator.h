// The one seam between training and inter-process communication: data-parallel ranks sum
// their adapter gradients, check that they run the same job, and split evaluation. The MPI
// implementation serves CPU processes on one machine or many (mpirun, Slurm's srun); a GPU
// backend adds NCCL behind the same interface, its unique id broadcast over this one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace qalora {

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Ranks on this machine: its cores are split between them.
  virtual int local_size() const = 0;
  // Elementwise sum over the ranks, in place; every rank gets the same result.
  virtual void all_reduce_sum(float* data, size_t n) = 0;
  virtual void all_reduce_sum(double* data, size_t n) = 0;
  // The same without waiting: the sum may land in `data` any time until finish(), which
  // completes every one started. progress() lets them advance (MPI moves them only inside
  // its own calls).
  virtual void start_all_reduce_sum(float* data, size_t n) = 0;
  virtual void progress() = 0;
  virtual void finish() = 0;
  virtual void broadcast(void* data, size_t bytes, int root) = 0;
  virtual void barrier() = 0;
  // Ends every rank of the job with `code` (a failed rank must not leave the others waiting
  // in a collective operation).
  [[noreturn]] virtual void abort(int code) = 0;
  // "mpi" or "single".
  virtual const char* backend() const = 0;

  bool is_root() const { return rank() == 0; }
  // root's string on every rank.
  std::string broadcast_string(std::string s, int root);
};

// How the evaluation commands split their items: item k is rank k % ranks's. A null
// communicator is one process with all of them.
struct Share {
  int rank = 0, ranks = 1;
  explicit Share(const Communicator* comm)
      : rank(comm ? comm->rank() : 0), ranks(comm ? comm->size() : 1) {}
  // Items of n that are this rank's.
  int64_t count(int64_t n) const { return (n - rank + ranks - 1) / ranks; }
  bool owns(int64_t k) const { return k % ranks == rank; }
  // f(k) for this rank's items k of n, in order.
  template <typename F>
  void for_each(int64_t n, F&& f) const {
    for (int64_t k = rank; k < n; k += ranks) f(k);
  }
};

// The process's communicator: MPI when the build has it (-DQALORA_MPI=ON) and an MPI launcher
// started the process (its environment is present), else a single process. MPI is initialised
// on the first call and finalised at exit.
Communicator& world();
// Whether this build can run distributed.
bool mpi_available();

}  // namespace qalora
