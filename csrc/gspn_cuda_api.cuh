// What the CUDA sources use of the CUDA runtime and of c10's CUDA helpers, or,
// in a build with GSPN_CUDA_SIM, the CPU simulator's stand-ins
// (csrc/sim/cuda_sim.h), which run the same kernels without a GPU for tests.
// Launches and dynamic shared memory are spelt through the two macros below,
// the only CUDA syntax a C++ compiler cannot parse.
#pragma once

#ifdef GSPN_CUDA_SIM
#include "sim/cuda_sim.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

// kernel<<<grid, block, shared_bytes, stream>>>(args...)
#define GSPN_LAUNCH(kernel, grid, block, shared_bytes, stream) kernel<<<grid, block, shared_bytes, stream>>>
// The block's dynamic shared memory as `unsigned char name[]`.
#define GSPN_DYNAMIC_SHARED(name) extern __shared__ unsigned char name[]
#endif
