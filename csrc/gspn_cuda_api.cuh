// What the CUDA sources use of the CUDA runtime and of c10's CUDA helpers, or,
// in a build with GSPN_CUDA_SIM, the CPU simulator's stand-ins
// (csrc/sim/cuda_sim.h), which run the same kernels without a GPU for tests.
// Launches and dynamic shared memory are spelt through the macros below, the
// only CUDA syntax a C++ compiler cannot parse; thread block clusters (sm_90)
// through cluster_sync and map_shared_rank.
#pragma once

#ifdef GSPN_CUDA_SIM
#include "sim/cuda_sim.h"
#endif

namespace gspn {

// How many launches this thread queues to run at the same time, sharing the
// GPU's SMs (the column route's two streams, side_by_side_cuda): launch
// planning that balances blocks over the SMs (split_segments) counts a
// share of them.
inline thread_local int side_by_side_launches = 1;

// side_by_side_launches = n for the guard's scope.
struct SideBySide {
  int saved;
  explicit SideBySide(int n) : saved(side_by_side_launches) { side_by_side_launches = n; }
  ~SideBySide() { side_by_side_launches = saved; }
  SideBySide(const SideBySide&) = delete;
  SideBySide& operator=(const SideBySide&) = delete;
};

}  // namespace gspn

#ifndef GSPN_CUDA_SIM
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

// kernel<<<grid, block, shared_bytes, stream>>>(args...)
#define GSPN_LAUNCH(kernel, grid, block, shared_bytes, stream) kernel<<<grid, block, shared_bytes, stream>>>
// The block's dynamic shared memory as `unsigned char name[]`.
#define GSPN_DYNAMIC_SHARED(name) extern __shared__ unsigned char name[]

namespace gspn {

// kernel<<<grid, block, shared_bytes, stream>>>(args...) in clusters of
// `cluster` consecutive blocks along x (sm_90 thread block clusters, at most
// 8; grid a multiple of it), whose blocks run at the same time on one GPC and
// reach each other's shared memory (map_shared_rank). Only launched on
// devices of compute capability 9.0 and later.
template <typename... Params>
struct ClusterLaunch {
  void (*kernel)(Params...);
  dim3 grid, block;
  size_t shared_bytes;
  cudaStream_t stream;
  unsigned cluster;

  template <typename... Args>
  void operator()(Args&&... args) const {
    cudaLaunchConfig_t config{};
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = shared_bytes;
    config.stream = stream;
    cudaLaunchAttribute attribute[1];
    attribute[0].id = cudaLaunchAttributeClusterDimension;
    attribute[0].val.clusterDim.x = cluster;
    attribute[0].val.clusterDim.y = 1;
    attribute[0].val.clusterDim.z = 1;
    config.attrs = attribute;
    config.numAttrs = 1;
    C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
  }
};

template <typename... Params>
ClusterLaunch<Params...> launch_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                                        cudaStream_t stream, unsigned cluster) {
  return ClusterLaunch<Params...>{kernel, grid, block, shared_bytes, stream, cluster};
}

}  // namespace gspn

#define GSPN_LAUNCH_CLUSTER(kernel, grid, block, shared_bytes, stream, cluster) \
  gspn::launch_cluster(kernel, grid, block, shared_bytes, stream, cluster)

// barrier.cluster.arrive + wait (release / acquire by default): every thread
// of every block of the cluster, their shared memory writes seen by all after.
__device__ inline void cluster_sync() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory");
#else
  __trap();  // never launched below sm_90
#endif
}

// The address of *p (in this block's shared memory) in the shared memory of
// the cluster's block `rank` (mapa: a generic address into distributed shared memory).
template <typename T>
__device__ inline T* map_shared_rank(T* p, unsigned rank) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
  unsigned long long out;
  asm volatile("mapa.u64 %0, %1, %2;" : "=l"(out) : "l"(reinterpret_cast<unsigned long long>(p)), "r"(rank));
  return reinterpret_cast<T*>(out);
#else
  __trap();
  return p;
#endif
}
#endif
