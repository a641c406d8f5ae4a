// The float16 instantiation of the CUDA launches (one file per dtype so they compile in parallel).
#include "gspn_scan_cuda.cuh"

namespace gspn {
GSPN_INSTANTIATE_CUDA_LAUNCHES(c10::Half)
}  // namespace gspn
