// The CUDA sources of csrc/ compiled as C++ against the CPU simulator
// (cuda_sim.h): one translation unit, built only with GSPN_CUDA_SIM=1 (see
// gspn_diffusers/ops/build.py), together with gspn_scan.cpp, whose host code
// then sends CPU tensors to these kernels.
#ifndef GSPN_CUDA_SIM
#error "build this file with -DGSPN_CUDA_SIM"
#endif

#include "../gspn_scan_cuda.cu"
#include "../gspn_scan_cuda_float64.cu"
#include "../gspn_scan_cuda_float32.cu"
#include "../gspn_scan_cuda_float16.cu"
#include "../gspn_scan_cuda_bfloat16.cu"

#include <torch/library.h>

namespace {
// The launches since the last call, as blocks, cluster size (1: a plain
// launch), blocks, cluster size, ...: for tests of which kernels a call
// ran; only in simulator builds.
std::vector<int64_t> take_launches() {
  std::vector<gspn_sim::LaunchRecord> records;
  records.swap(gspn_sim::launch_records());
  std::vector<int64_t> flat;
  for (const gspn_sim::LaunchRecord& r : records) {
    flat.push_back(r.blocks);
    flat.push_back(r.cluster);
  }
  return flat;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(gspn_sim, m) { m.def("launches() -> int[]", &take_launches); }
