// GSPN scan: the CUDA entry points the op registration calls. They choose the
// dtype; the kernels and their launches are in gspn_scan_cuda.cuh, compiled
// once per dtype by gspn_scan_cuda_<dtype>.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

#include "gspn_cuda_api.cuh"
#include "gspn_scan.h"

namespace gspn {

// Instantiated in gspn_scan_cuda_<dtype>.cu.
template <typename scalar_t>
void launch_forward(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& lam, at::Tensor& out,
                    const ScanProblem& pb);
template <typename scalar_t>
void launch_backward(const at::Tensor& grad_h, const at::Tensor& h, const at::Tensor& x, const at::Tensor& gates,
                     const at::Tensor& lam, at::Tensor& dx, at::Tensor& dgates, at::Tensor& dlam,
                     const ScanProblem& pb, bool atomic);

namespace {

// Tiled transpose of planes, for the transposed views in which column scans of
// large planes arrive (gspn_diffusers.ops runs them as row scans of the
// transpose): ATen's copy of such a view ran at ~15% of the copy bandwidth on
// an H200, and the copies cost 5x the scan itself. A block moves a 32x32 tile
// through shared memory, reading and writing along contiguous addresses.
constexpr int kTile = 32, kTileRows = 8, kMaxLeadDims = 6;

// The source's leading dims (everything before the plane), for the offset of
// plane n of them in row-major order.
struct LeadLayout {
  int64_t sizes[kMaxLeadDims];
  int64_t strides[kMaxLeadDims];
  int dims;
};

// src element (r, s) of plane n is at lead_offset(n) + s * R + r; dst is the
// contiguous (planes, R, S).
template <typename T>
__global__ void transpose_planes_kernel(const T* __restrict__ src, T* __restrict__ dst, int64_t planes, int64_t R,
                                        int64_t S, const LeadLayout lead) {
  __shared__ T tile[kTile][kTile + 1];  // [s][r]; the pad keeps a column's reads off one bank
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile, s0 = static_cast<int64_t>(blockIdx.x) * kTile;
  for (int64_t n = blockIdx.z; n < planes; n += gridDim.z) {
    int64_t src_plane = 0, rest = n;
#pragma unroll
    for (int d = kMaxLeadDims - 1; d >= 0; --d) {  // unrolled: constant indices keep lead out of local memory
      if (d < lead.dims) {
        src_plane += (rest % lead.sizes[d]) * lead.strides[d];
        rest /= lead.sizes[d];
      }
    }
    const T* sp = src + src_plane;
    T* dp = dst + n * R * S;
    const int64_t r = r0 + threadIdx.x;
#pragma unroll
    for (int k = 0; k < kTile; k += kTileRows) {
      const int64_t s = s0 + threadIdx.y + k;
      if (r < R && s < S) tile[threadIdx.y + k][threadIdx.x] = sp[s * R + r];
    }
    __syncthreads();
    const int64_t s = s0 + threadIdx.x;
#pragma unroll
    for (int k = 0; k < kTile; k += kTileRows) {
      const int64_t rr = r0 + threadIdx.y + k;
      if (rr < R && s < S) dp[rr * S + s] = tile[threadIdx.x][threadIdx.y + k];
    }
    __syncthreads();  // the tile is refilled for the next plane
  }
}

}  // namespace

// t as a contiguous tensor: a tiled transpose when t is a transposed view of
// contiguous planes (stride(-2) == 1, stride(-1) == size(-2)), else contiguous().
at::Tensor contiguous_cuda(const at::Tensor& t) {
  const int64_t dims = t.dim();
  if (t.is_contiguous() || dims < 2 || dims - 2 > kMaxLeadDims || t.numel() == 0) return t.contiguous();
  const int64_t R = t.size(-2), S = t.size(-1);
  const int64_t item = t.element_size();
  if (R < 2 || S < 2 || t.stride(-2) != 1 || t.stride(-1) != R || (item != 2 && item != 4 && item != 8)) {
    return t.contiguous();
  }
  LeadLayout lead{};
  lead.dims = static_cast<int>(dims - 2);
  int64_t planes = 1;
  for (int d = 0; d < lead.dims; ++d) {
    lead.sizes[d] = t.size(d);
    lead.strides[d] = t.stride(d);
    planes *= t.size(d);
  }
  const c10::cuda::CUDAGuard guard(t.device());
  at::Tensor out = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
  const dim3 grid(static_cast<unsigned>((S + kTile - 1) / kTile), static_cast<unsigned>((R + kTile - 1) / kTile),
                  static_cast<unsigned>(std::min<int64_t>(planes, 65535)));
  TORCH_CHECK((R + kTile - 1) / kTile <= 65535, "gspn::scan (CUDA): planes of ", R, " rows are too tall to transpose");
  const dim3 block(kTile, kTileRows);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const void* src = t.data_ptr();  // the view's first element (storage start + offset)
  auto launch = [&](auto zero) {
    using T = decltype(zero);
    GSPN_LAUNCH(transpose_planes_kernel<T>, grid, block, 0, stream)(static_cast<const T*>(src),
                                                                    static_cast<T*>(out.data_ptr()), planes, R, S, lead);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (item == 2) launch(uint16_t{});
  else if (item == 4) launch(uint32_t{});
  else launch(uint64_t{});
  return out;
}

void scan_forward_cuda(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& lam, at::Tensor& out,
                       const ScanProblem& pb) {
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_scan_cuda",
                                  [&] { launch_forward<scalar_t>(x, gates, lam, out, pb); });
}

void scan_backward_cuda(const at::Tensor& grad_h, const at::Tensor& h, const at::Tensor& x, const at::Tensor& gates,
                        const at::Tensor& lam, at::Tensor& dx, at::Tensor& dgates, at::Tensor& dlam,
                        const ScanProblem& pb) {
  const c10::cuda::CUDAGuard guard(x.device());
  const bool atomic = dgates.scalar_type() != gates.scalar_type() || pb.G != pb.C;
  TORCH_CHECK(!atomic || dgates.scalar_type() == at::toOpMathType(gates.scalar_type()),
              "gspn::scan_backward (CUDA): shared gate groups accumulate in an fp32 buffer");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_scan_backward_cuda", [&] {
    launch_backward<scalar_t>(grad_h, h, x, gates, lam, dx, dgates, dlam, pb, atomic);
  });
}

}  // namespace gspn
