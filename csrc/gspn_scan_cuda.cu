// GSPN scan: the CUDA entry points the op registration calls. They choose the
// dtype; the kernels and their launches are in gspn_scan_cuda.cuh, compiled
// once per dtype by gspn_scan_cuda_<dtype>.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>

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
