// A CPU simulator for the CUDA kernels in csrc/, so that their logic
// (indexing, tiling, barriers, chunk edges, every dtype and launch variant)
// is tested on machines without a GPU: CI runs the kernel test matrix through
// it (GSPN_CUDA_SIM=1, see gspn_diffusers/ops/build.py). It checks results,
// not speed; timings need a GPU.
//
// The CUDA sources compile unchanged as C++ against this header (through
// csrc/gspn_cuda_api.cuh): a kernel is a plain function, a launch runs the
// grid's blocks one after another, and the threads of a block are fibers
// (ucontext) on one OS thread that switch at every __syncthreads. Each barrier
// phase runs the block's threads in a shuffled order (seeded by the block,
// so a failure reproduces), so a read of shared memory that another thread
// writes in the same phase sees either value and a missing barrier shows up
// as a wrong result. Dynamic shared memory starts as NaN bytes (0xFF) in every
// block, so a read of a shared element nobody wrote poisons the output, and
// so do reads past its end (NaN guard bytes); a write past the end, or an
// asynchronous copy outside it, raises an error. Threads of one block that
// reach __syncthreads different numbers of times (a barrier inside divergent
// code) raise an error. A cluster launch (GSPN_LAUNCH_CLUSTER, sm_90 thread
// block clusters) runs its cluster's blocks together: between two cluster
// barriers (cluster_sync) one block after another, in a shuffled order, each
// through its own __syncthreads phases, so a read of another block's shared
// memory (map_shared_rank) that a missing cluster barrier leaves unordered
// sees the other block either before or after, the ring of rows a kernel
// keeps for such reads shows whether it is deep enough, and a read of a
// block that has ended (its shared memory gone) is an error. Asynchronous copies to shared
// memory (cp.async) land when their thread waits for their group, or earlier,
// as on a GPU: at each barrier of their thread some of them (chosen at random,
// seeded by the block) land. So a read before the wait sees stale bytes, and
// so may a read of a stage after a copy into it was issued; a block that ends
// with copies nobody waited for raises an error. Launches on a second stream
// run when the current stream joins it, after the current stream's launches
// in between (the order that exposes a missing join).
//
// Device code takes the host paths of gspn_scan.h (__CUDA_ARCH__ is not
// defined): exact expf and division instead of __expf and approximate
// reciprocals, within the tests' float32 tolerances of each other.
#pragma once

#include <ucontext.h>

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// Block-wide built-ins. One simulated block runs at a time per OS thread, and
// the scheduler sets threadIdx before it switches to a thread.
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Static shared arrays: one per OS thread, i.e. per running block.
#define __shared__ static thread_local

template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

using cudaStream_t = void*;
using cudaError_t = int;
enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrComputeCapabilityMajor
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
// What an H100/H200 allows a block, so launches too big for them fail here too.
constexpr int kSimSharedMemoryPerBlock = 227 * 1024;
// A small GPU, so that test shapes of a few planes already make the launch
// planning pack several blocks per multiprocessor (and so run the kernels'
// many-slots-per-thread layouts).
constexpr int kSimMultiprocessors = 4;
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return 0;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount      ? kSimMultiprocessors
           : attr == cudaDevAttrComputeCapabilityMajor ? 9  // thread block clusters
                                                       : kSimSharedMemoryPerBlock;
  return 0;
}
template <typename Kernel>
inline cudaError_t cudaFuncSetAttribute(Kernel, cudaFuncAttribute, int) {
  return 0;
}
// The simulated kernels keep nothing in local memory, and are built for sm_90.
struct cudaFuncAttributes {
  size_t localSizeBytes = 0;
  int binaryVersion = 90;
};
template <typename Kernel>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, Kernel) {
  *attributes = cudaFuncAttributes{};
  return 0;
}
// As an H100 would answer for a kernel of 128 registers per thread (the
// kernels' __launch_bounds__ cap): 64K registers, 2048 threads, 32 blocks and
// 228 KB of shared memory per multiprocessor.
template <typename Kernel>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, Kernel, int threads, size_t shared_bytes) {
  int n = std::min({32, 2048 / threads, 65536 / (128 * threads)});
  if (shared_bytes > 0) n = std::min<int>(n, static_cast<int>(228 * 1024 / (shared_bytes + 1024)));
  *blocks = n;
  return 0;
}
#define C10_CUDA_CHECK(expr) (void)(expr)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace cuda
}  // namespace c10

namespace gspn_sim {

constexpr size_t kFiberStack = 64 * 1024;  // a kernel's frame is a few KB

// One cp.async of a thread, not yet landed; group: the commit group it joins.
struct PendingCopy {
  void* dst;
  const void* src;
  size_t bytes;
  int64_t group;
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;  // uninitialised: untouched pages cost nothing
  dim3 thread;
  int block = 0;  // its block's index in the running cluster
  int64_t barriers = 0;
  int64_t cluster_barriers = 0;
  bool at_cluster_barrier = false;
  bool done = false;
  std::vector<PendingCopy> copies;
  int64_t committed = 0;  // groups committed so far; the open group's number
};

// One simulated block of the running cluster (a plain launch: a cluster of one).
struct Block {
  dim3 index;
  std::mt19937_64 landing;  // which asynchronous copies land early
  std::vector<unsigned char> dynamic_shared;  // the launch's bytes, then kSharedGuard more
  std::string error;  // the first failed device_check of the block
};

// The cluster being simulated on this OS thread: its blocks' threads are
// fibers, one block's at a time between cluster barriers.
struct Running {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;  // block b's threads at [b * threads, (b + 1) * threads)
  std::vector<Block> blocks;
  Fiber* current = nullptr;
  void (*body)(void*) = nullptr;
  void* args = nullptr;
  size_t dynamic_shared_bytes = 0;
};

inline thread_local Running running;

inline Block& current_block() { return running.blocks[running.current->block]; }

// NaN bytes past a block's dynamic shared memory: a read there poisons the
// result like an unwritten element, a write there fails the launch (the
// kernel's size computation came out short of what it uses).
constexpr size_t kSharedGuard = 4096;

inline unsigned char* dynamic_shared() { return current_block().dynamic_shared.data(); }

// A check inside a kernel. An exception cannot leave a fiber (it would unwind
// into makecontext's frame and terminate the process), so the first failure
// is kept and raised by the launch once the block has finished.
inline void device_check(bool ok, const char* what) {
  if (!ok && current_block().error.empty()) current_block().error = what;
}

inline void fiber_main() {
  running.body(running.args);
  running.current->done = true;  // returning resumes uc_link: the scheduler
}

// Runs block b's threads, __syncthreads phase by phase, until each has ended
// or waits at a cluster barrier; raises if some wait there while others of
// the block went on to another barrier or ended (a barrier in divergent code).
inline void run_until_cluster_barrier(int b, unsigned threads, std::mt19937_64& rng) {
  std::vector<unsigned> order(threads);
  std::iota(order.begin(), order.end(), b * threads);
  blockIdx = running.blocks[b].index;
  for (;;) {
    std::shuffle(order.begin(), order.end(), rng);
    bool any_ran = false;
    for (unsigned i : order) {
      Fiber& f = running.fibers[i];
      if (f.done || f.at_cluster_barrier) continue;
      any_ran = true;
      threadIdx = f.thread;
      running.current = &f;
      swapcontext(&running.scheduler, &f.context);
    }
    if (!any_ran) return;
    const auto first = running.fibers.begin() + static_cast<std::ptrdiff_t>(b * threads);
    const auto waiting = std::count_if(first, first + threads, [](const Fiber& f) { return f.at_cluster_barrier; });
    TORCH_CHECK(waiting == 0 || waiting == static_cast<std::ptrdiff_t>(threads), "CUDA simulator: in block (",
                blockIdx.x, ", ", blockIdx.y, ", ", blockIdx.z, "), ", waiting, " of ", threads,
                " threads wait at a cluster barrier while the others went on (a barrier in divergent code)");
  }
}

// Runs the running cluster's blocks (threads each) to completion: between
// two cluster barriers each block in turn, in a shuffled order.
inline void run_cluster(unsigned threads, uint64_t seed) {
  const int count = static_cast<int>(running.blocks.size());
  running.fibers.resize(static_cast<size_t>(count) * threads);
  for (size_t i = 0; i < running.fibers.size(); ++i) {
    Fiber& f = running.fibers[i];
    const unsigned t = static_cast<unsigned>(i % threads);
    if (!f.stack) f.stack.reset(new char[kFiberStack]);
    f.thread = dim3(t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y));
    f.block = static_cast<int>(i / threads);
    f.barriers = f.cluster_barriers = 0;
    f.at_cluster_barrier = f.done = false;
    f.copies.clear();
    f.committed = 0;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = kFiberStack;
    f.context.uc_link = &running.scheduler;
    makecontext(&f.context, fiber_main, 0);
  }
  std::mt19937_64 rng(seed);
  std::vector<int> blocks(count);
  std::iota(blocks.begin(), blocks.end(), 0);
  for (;;) {
    std::shuffle(blocks.begin(), blocks.end(), rng);
    for (int b : blocks) run_until_cluster_barrier(b, threads, rng);
    const auto waiting = std::count_if(running.fibers.begin(), running.fibers.end(),
                                       [](const Fiber& f) { return f.at_cluster_barrier; });
    if (waiting == 0) break;  // every thread has ended
    TORCH_CHECK(waiting == static_cast<std::ptrdiff_t>(running.fibers.size()), "CUDA simulator: in the cluster of "
                "block (", running.blocks[0].index.x, ", ", running.blocks[0].index.y, ", ",
                running.blocks[0].index.z, "), some blocks ended while others wait at a cluster barrier");
    for (Fiber& f : running.fibers) f.at_cluster_barrier = false;
  }
  // Legal CUDA when threads exit early, but every kernel here runs its barriers
  // uniformly over the block, so unequal counts mean one sat in divergent code.
  for (int b = 0; b < count; ++b) {
    const dim3 at = running.blocks[b].index;
    const auto first = running.fibers.begin() + static_cast<std::ptrdiff_t>(b * threads);
    const auto [fewest, most] = std::minmax_element(
        first, first + threads, [](const Fiber& x, const Fiber& y) { return x.barriers < y.barriers; });
    for (auto f = first; f != first + threads; ++f) {
      TORCH_CHECK(f->copies.empty(), "CUDA simulator: in block (", at.x, ", ", at.y, ", ", at.z, "), thread ",
                  f->thread.x, " ended with ", f->copies.size(), " asynchronous copies it never waited for");
    }
    TORCH_CHECK(fewest->barriers == most->barriers, "CUDA simulator: in block (", at.x, ", ", at.y, ", ", at.z,
                "), thread ", fewest->thread.x, " reached __syncthreads ", fewest->barriers, " times and thread ",
                most->thread.x, " ", most->barriers, " times (a barrier in divergent code)");
  }
}

// The running thread's pending asynchronous copies for which lands(copy) holds
// land now; the others stay pending.
template <typename Predicate>
inline void land_copies(Predicate&& lands) {
  Fiber* f = running.current;
  std::vector<PendingCopy> still;
  for (const PendingCopy& c : f->copies) {
    if (lands(c)) std::memcpy(c.dst, c.src, c.bytes);
    else still.push_back(c);
  }
  f->copies.swap(still);
}

// Each of the thread's pending asynchronous copies lands now with
// probability 1/2 (a GPU may complete a copy any time before its wait).
inline void land_some_copies() {
  land_copies([](const PendingCopy&) { return (current_block().landing() & 1) != 0; });
}
}  // namespace gspn_sim

inline void __syncthreads() {
  gspn_sim::Fiber* f = gspn_sim::running.current;
  ++f->barriers;
  gspn_sim::land_some_copies();
  swapcontext(&f->context, &gspn_sim::running.scheduler);
}

// barrier.cluster.arrive + wait: every thread of every block of the cluster
// (sm_90 thread block clusters; a plain launch is a cluster of one block).
inline void cluster_sync() {
  gspn_sim::Fiber* f = gspn_sim::running.current;
  ++f->cluster_barriers;
  f->at_cluster_barrier = true;
  gspn_sim::land_some_copies();
  swapcontext(&f->context, &gspn_sim::running.scheduler);
}

// The address of *p (in this block's dynamic shared memory) in the dynamic
// shared memory of the cluster's block `rank` (mapa).
template <typename T>
inline T* map_shared_rank(T* p, unsigned rank) {
  auto& r = gspn_sim::running;
  const unsigned char* mine = gspn_sim::dynamic_shared();
  const auto offset = reinterpret_cast<const unsigned char*>(p) - mine;
  gspn_sim::device_check(rank < r.blocks.size(), "map_shared_rank: no such block in the cluster");
  gspn_sim::device_check(offset >= 0 && static_cast<size_t>(offset) < r.dynamic_shared_bytes,
                         "map_shared_rank: not an address in the block's dynamic shared memory");
  if (rank >= r.blocks.size()) rank = 0;
  // On a GPU a block's shared memory is gone once all its threads have ended.
  const size_t threads = r.fibers.size() / r.blocks.size();
  const auto first = r.fibers.begin() + static_cast<std::ptrdiff_t>(rank * threads);
  gspn_sim::device_check(!std::all_of(first, first + static_cast<std::ptrdiff_t>(threads),
                                      [](const gspn_sim::Fiber& f) { return f.done; }),
                         "map_shared_rank: the block has ended (a cluster barrier missing before its exit)");
  return reinterpret_cast<T*>(r.blocks[rank].dynamic_shared.data() + offset);
}

namespace gspn_sim {

// cp.async of `bytes` from global src to shared dst, in the thread's open group.
inline void copy_async(void* dst, const void* src, size_t bytes) {
  Fiber* f = running.current;
  device_check(reinterpret_cast<uintptr_t>(dst) % bytes == 0 && reinterpret_cast<uintptr_t>(src) % bytes == 0,
               "misaligned asynchronous copy");
  const unsigned char* shared = current_block().dynamic_shared.data();
  device_check(static_cast<unsigned char*>(dst) >= shared &&
                   static_cast<unsigned char*>(dst) + bytes <= shared + running.dynamic_shared_bytes,
               "asynchronous copy outside the block's dynamic shared memory");
  f->copies.push_back(PendingCopy{dst, src, bytes, f->committed});
}

// cp.async.commit_group: closes the open group.
inline void copy_async_commit() { ++running.current->committed; }

// cp.async.wait_group n: the copies of every committed group but the n newest land.
inline void copy_async_wait(int n) {
  const int64_t newest_waited = running.current->committed - n;
  land_copies([&](const PendingCopy& c) { return c.group < newest_waited; });
}

// Launches queued on a second stream (side_by_side_cuda in gspn_scan_cuda.cu):
// while set, a launch is kept here instead of run, and runs when the current
// stream joins that stream, after everything the current stream ran in
// between: the order of a GPU on which the second stream is the slower, so
// a result read before the join is stale, and a join that is missing leaves
// it unwritten.
inline thread_local std::vector<std::function<void()>>* side_stream_launches = nullptr;

// The blocks and the cluster size of every launch run since the tests last
// asked (torch.ops.gspn_sim.launches, gspn_scan_cuda_sim.cpp), so that a
// test can tell which way a call ran.
struct LaunchRecord {
  int64_t blocks, cluster;
};
inline std::vector<LaunchRecord>& launch_records() {
  static std::vector<LaunchRecord> records;
  return records;
}

// kernel<<<grid, block, shared_bytes>>>(args...), in clusters of `cluster`
// consecutive blocks along x (1: a plain launch): the arguments are converted
// to the kernel's parameter types once, as a launch copies them, and every
// thread calls the kernel with them.
template <typename... Params>
struct Launch {
  using Packed = std::tuple<std::decay_t<Params>...>;
  void (*kernel)(Params...);
  dim3 grid, threads;
  size_t shared_bytes;
  unsigned cluster = 1;

  template <typename... Args>
  void operator()(Args&&... args) const {
    TORCH_CHECK(shared_bytes <= static_cast<size_t>(kSimSharedMemoryPerBlock), "CUDA simulator: ", shared_bytes,
                " bytes of dynamic shared memory per block");
    TORCH_CHECK(threads.x * threads.y * threads.z <= 1024, "CUDA simulator: more than 1024 threads per block");
    TORCH_CHECK(cluster >= 1 && cluster <= 8 && grid.x % cluster == 0, "CUDA simulator: clusters of ", cluster,
                " blocks for a grid of ", grid.x, " along x (at most 8, dividing it)");
    Packed packed(std::forward<Args>(args)...);
    if (side_stream_launches != nullptr) {
      side_stream_launches->push_back([launch = *this, packed]() mutable { launch.run(packed); });
      return;
    }
    run(packed);
  }

  void run(Packed& packed) const {
    struct Call {
      void (*kernel)(Params...);
      Packed* packed;
    } call{kernel, &packed};
    running.body = [](void* p) {
      Call* c = static_cast<Call*>(p);
      std::apply(c->kernel, *c->packed);
    };
    running.args = &call;
    running.dynamic_shared_bytes = shared_bytes;
    launch_records().push_back({int64_t(grid.x) * grid.y * grid.z, cluster});
    gridDim = grid;
    blockDim = threads;
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x0 = 0; x0 < grid.x; x0 += cluster) {
          running.blocks.resize(cluster);
          for (unsigned k = 0; k < cluster; ++k) {
            Block& b = running.blocks[k];
            b.index = dim3(x0 + k, y, z);
            b.dynamic_shared.assign(shared_bytes + kSharedGuard, 0xFF);
            b.error.clear();
            const uint64_t linear = (uint64_t(z) * grid.y + y) * grid.x + x0 + k;
            b.landing.seed((0x9E3779B97F4A7C15ull * (linear + 1)) ^ 0x5DEECE66Dull);
          }
          const uint64_t first = (uint64_t(z) * grid.y + y) * grid.x + x0;
          run_cluster(threads.x * threads.y * threads.z, 0x9E3779B97F4A7C15ull * (first + 1));
          for (const Block& b : running.blocks) {
            const dim3 at = b.index;
            TORCH_CHECK(b.error.empty(), "CUDA simulator: in block (", at.x, ", ", at.y, ", ", at.z, "): ", b.error);
            const auto guard = b.dynamic_shared.begin() + static_cast<std::ptrdiff_t>(shared_bytes);
            TORCH_CHECK(std::all_of(guard, b.dynamic_shared.end(), [](unsigned char v) { return v == 0xFF; }),
                        "CUDA simulator: in block (", at.x, ", ", at.y, ", ", at.z, "): written past its ",
                        shared_bytes, " bytes of dynamic shared memory");
          }
        }
      }
    }
  }
};

template <typename... Params>
Launch<Params...> launch(void (*kernel)(Params...), dim3 grid, dim3 threads, size_t shared_bytes,
                         unsigned cluster = 1) {
  return Launch<Params...>{kernel, grid, threads, shared_bytes, cluster};
}

}  // namespace gspn_sim

#define GSPN_LAUNCH(kernel, grid, block, shared_bytes, stream) gspn_sim::launch(kernel, grid, block, shared_bytes)
#define GSPN_LAUNCH_CLUSTER(kernel, grid, block, shared_bytes, stream, cluster) \
  gspn_sim::launch(kernel, grid, block, shared_bytes, cluster)
#define GSPN_DYNAMIC_SHARED(name) unsigned char* name = gspn_sim::dynamic_shared()
