// GSPN scan: the CUDA entry points the op registration calls. They choose the
// dtype; the kernels and their launches are in gspn_scan_cuda.cuh, compiled
// once per dtype by gspn_scan_cuda_<dtype>.cu.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

#include "gspn_cuda_api.cuh"
#include "gspn_scan.h"

namespace gspn {

// Instantiated in gspn_scan_cuda_<dtype>.cu.
template <typename scalar_t>
void launch_forward(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& lam, at::Tensor& out,
                    const ScanProblem& pb, bool staged);
template <typename scalar_t>
void launch_backward(const at::Tensor& grad_h, const at::Tensor& h, const at::Tensor& x, const at::Tensor& gates,
                     const at::Tensor& lam, at::Tensor& dx, at::Tensor& dgates, at::Tensor& dlam,
                     const ScanProblem& pb, bool atomic, bool staged);
template <typename scalar_t>
bool columns_staged_fit(const ScanProblem& pb, const std::vector<at::Tensor>& tensors, bool backward);

namespace {

// Tiled transpose of planes: the column route of the op (gspn_scan.cpp) runs
// the column scans of large planes as row scans of transposed copies, and
// transposed views arrive from callers too. ATen's copy of a transposed view
// ran at ~15% of the copy bandwidth on an H200, and the copies cost 5x the
// scan itself. A block moves a 32x32 tile through shared memory, reading and
// writing along contiguous addresses; source and destination planes may sit
// anywhere in their tensors (a direction's slice of the op's result).
constexpr int kTile = 32, kTileRows = 8, kMaxLeadDims = 6;

// n / d for 32-bit n < 2^31 by a multiply-high, an add and a shift, with the
// multiplier found on the host (Granlund-Montgomery, as torch's IntDivider):
// a 64-bit division is a ~70-instruction subroutine, and with one per leading
// dim and tensor for every tile it was most of the transpose's instructions.
struct FastDivider {
  uint32_t divisor, multiplier, shift;

  static FastDivider of(uint32_t d) {
    FastDivider f{d, 0, 0};
    while ((uint64_t(1) << f.shift) < d) ++f.shift;
    f.multiplier = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << f.shift) - d)) / d + 1);
    return f;
  }
  __device__ uint32_t div(uint32_t n) const {
    const uint32_t high = static_cast<uint32_t>((static_cast<uint64_t>(n) * multiplier) >> 32);
    return (high + n) >> shift;
  }
};

// The leading dims (everything before the plane) of a source and a
// destination of equal sizes, for where plane n of them sits in each
// (row-major order). Dims that both tensors step through as one are merged
// on the host, so a contiguous batch of planes is one dim, a direction's
// slice of the op's result two.
struct LeadLayouts {
  FastDivider sizes[kMaxLeadDims];
  int64_t src[kMaxLeadDims], dst[kMaxLeadDims];
  int dims;

  __device__ void offsets(uint32_t n, int64_t& src_at, int64_t& dst_at) const {
    src_at = dst_at = 0;
#pragma unroll
    for (int d = kMaxLeadDims - 1; d >= 0; --d) {  // unrolled: constant indices keep the layout out of local memory
      if (d < dims) {
        const uint32_t q = sizes[d].div(n), index = n - q * sizes[d].divisor;
        src_at += static_cast<int64_t>(index) * src[d];
        dst_at += static_cast<int64_t>(index) * dst[d];
        n = q;
      }
    }
  }
};

LeadLayouts lead_layouts(const at::Tensor& src, const at::Tensor& dst) {
  LeadLayouts lead{};
  int64_t size[kMaxLeadDims];
  for (int64_t d = 0; d < src.dim() - 2; ++d) {
    if (src.size(d) == 1) continue;
    const int m = lead.dims;
    if (m > 0 && lead.src[m - 1] == src.stride(d) * src.size(d) && lead.dst[m - 1] == dst.stride(d) * src.size(d)) {
      size[m - 1] *= src.size(d);  // one step of the outer dim is a whole run of this one, in both tensors
      lead.src[m - 1] = src.stride(d);
      lead.dst[m - 1] = dst.stride(d);
      continue;
    }
    size[m] = src.size(d);
    lead.src[m] = src.stride(d);
    lead.dst[m] = dst.stride(d);
    ++lead.dims;
  }
  for (int d = 0; d < lead.dims; ++d) lead.sizes[d] = FastDivider::of(static_cast<uint32_t>(size[d]));
  return lead;
}

// dst element (s, r) of plane n = src element (r, s) of plane n; src planes
// are (R, S), dst planes (S, R), both stored row by row.
template <typename T>
__global__ void transpose_planes_kernel(const T* __restrict__ src, T* __restrict__ dst, uint32_t planes, int64_t R,
                                        int64_t S, const LeadLayouts lead) {
  __shared__ T tile[kTile][kTile + 1];  // [r][s]; the pad keeps a column's reads off one bank
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile, s0 = static_cast<int64_t>(blockIdx.x) * kTile;
  for (uint32_t n = blockIdx.z; n < planes; n += gridDim.z) {
    int64_t src_at, dst_at;
    lead.offsets(n, src_at, dst_at);
    const T* sp = src + src_at;
    T* dp = dst + dst_at;
    const int64_t s = s0 + threadIdx.x;
#pragma unroll
    for (int k = 0; k < kTile; k += kTileRows) {
      const int64_t r = r0 + threadIdx.y + k;
      if (r < R && s < S) tile[threadIdx.y + k][threadIdx.x] = sp[r * S + s];
    }
    __syncthreads();
    const int64_t r = r0 + threadIdx.x;
#pragma unroll
    for (int k = 0; k < kTile; k += kTileRows) {
      const int64_t ss = s0 + threadIdx.y + k;
      if (r < R && ss < S) dp[ss * R + r] = tile[threadIdx.x][threadIdx.y + k];
    }
    __syncthreads();  // the tile is refilled for the next plane
  }
}

bool rows_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 && t.stride(-2) == t.size(-1); }

}  // namespace

// dst = src.transpose(-1, -2) for tensors whose planes are stored row by row
// (any leading strides) through the tiled transpose; other layouts, or
// element sizes it has no kernel for, through ATen's copy.
void transpose_into_cuda(at::Tensor& dst, const at::Tensor& src) {
  TORCH_CHECK(dst.dim() == src.dim() && dst.dim() >= 2 && dst.size(-2) == src.size(-1) &&
                  dst.size(-1) == src.size(-2) && dst.scalar_type() == src.scalar_type(),
              "gspn::scan (CUDA): transpose of ", src.sizes(), " into ", dst.sizes());
  const int64_t R = src.size(-2), S = src.size(-1), item = src.element_size();
  if (src.numel() == 0) return;
  const int64_t planes = src.numel() / (R * S);
  if (src.dim() - 2 > kMaxLeadDims || !rows_contiguous(src) || !rows_contiguous(dst) ||
      (item != 2 && item != 4 && item != 8) || planes >= (int64_t(1) << 31)) {  // the last: FastDivider's range
    dst.copy_(src.transpose(-1, -2));
    return;
  }
  TORCH_CHECK((R + kTile - 1) / kTile <= 65535, "gspn::scan (CUDA): planes of ", R, " rows are too tall to transpose");
  const c10::cuda::CUDAGuard guard(src.device());
  const dim3 grid(static_cast<unsigned>((S + kTile - 1) / kTile), static_cast<unsigned>((R + kTile - 1) / kTile),
                  static_cast<unsigned>(std::min<int64_t>(planes, 65535)));
  const dim3 block(kTile, kTileRows);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto launch = [&](auto zero) {
    using T = decltype(zero);
    GSPN_LAUNCH(transpose_planes_kernel<T>, grid, block, 0, stream)(
        static_cast<const T*>(src.data_ptr()), static_cast<T*>(dst.data_ptr()), static_cast<uint32_t>(planes), R, S,
        lead_layouts(src, dst));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (item == 2) launch(uint16_t{});
  else if (item == 4) launch(uint32_t{});
  else launch(uint64_t{});
}

// t as a contiguous tensor: a tiled transpose when t is a transposed view of
// planes stored row by row, or stores its last three dims (C, H, W) as
// (H, W, C) (channels_last, and the planes a layer makes of (B, N, C)
// tokens): then each (H W, C) matrix is transposed. Else contiguous().
at::Tensor contiguous_cuda(const at::Tensor& t) {
  if (t.is_contiguous() || t.dim() < 2 || t.size(-2) < 2 || t.size(-1) < 2) return t.contiguous();
  const at::Tensor planes = t.transpose(-1, -2);
  if (rows_contiguous(planes)) {
    at::Tensor out = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
    transpose_into_cuda(out, planes);
    return out;
  }
  if (t.dim() >= 3 && t.size(-3) >= 2 && t.stride(-3) == 1 && t.stride(-1) == t.size(-3) &&
      t.stride(-2) == t.size(-1) * t.size(-3)) {
    at::Tensor out = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::Contiguous));
    at::Tensor channels_of_pixels = out.flatten(-2);  // (..., C, H W)
    transpose_into_cuda(channels_of_pixels, t.movedim(-3, -1).flatten(-3, -2));  // from (..., H W, C)
    return out;
  }
  return t.contiguous();
}

namespace {

// Decayed gates (gspn_scan.h, decayed_taps_backward) for the scan kernels,
// which take normalised logits but no decay: one thread per gate position of
// the whole call (pb: all its directions, identity slots), reading its three
// logits and its decay logit once. Each tap's neighbour exists along the
// position axis: W for row scans, H for column scans.
//
// The grid is (columns, rows, gate sets): a position's row, column and set
// come from the block and thread indices, and a set's direction from one
// 32-bit division. The first version took them from a flat 64-bit index by
// three 64-bit divisions per thread (each a subroutine of dozens of
// instructions), which made this memory-bound pass issue-bound: on an H200
// (2026-11-29) the four-direction forward at 1x320x1024x1024, fp16, G = C,
// took 59.6 ms with decay against 22.1 without, some 8x the pass's bytes at
// copy speed. Blocks are 256 threads, as wide as a row allows (whole warps),
// the rest of the block on the next rows, so narrow planes keep them busy.
// Rows and sets beyond the grid's y and z limits loop (in the simulator
// beyond 3, so that tests run those loops).
constexpr int kDecayThreads = 256;
#ifdef GSPN_CUDA_SIM
constexpr int64_t kMaxGridYZ = 3;
#else
constexpr int64_t kMaxGridYZ = 65535;
#endif

struct DecayGrid {
  dim3 grid, block;
  uint32_t sets;
};

DecayGrid decay_grid(const ScanProblem& pb) {
  const int64_t sets = pb.B * pb.Dt * pb.G;
  TORCH_CHECK(sets < (int64_t(1) << 31), "gspn_scan: too many gate sets for the CUDA decay pass (", sets, ")");
  const int width = static_cast<int>(std::min<int64_t>(kDecayThreads, (pb.W + 31) / 32 * 32));
  const int rows = kDecayThreads / width;
  return {dim3(static_cast<unsigned>((pb.W + width - 1) / width),
               static_cast<unsigned>(std::min<int64_t>((pb.H + rows - 1) / rows, kMaxGridYZ)),
               static_cast<unsigned>(std::min<int64_t>(sets, kMaxGridYZ))),
          dim3(width, rows), static_cast<uint32_t>(sets)};
}

// Calls at(offset of tap 0, offset of the decay logit, before, after) for
// each of this thread's positions: the neighbours before and after it along
// its direction's lines exist.
template <typename Visit>
__device__ inline void for_each_decay_position(const ScanProblem& pb, uint32_t sets, Visit at) {
  const int64_t w = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (w >= pb.W) return;
  const int64_t plane = pb.plane(), G = pb.G, Dt = pb.Dt;
  for (uint32_t set = blockIdx.z; set < sets; set += gridDim.z) {
    const int dir = pb.dirs[(set / static_cast<uint32_t>(G)) % static_cast<uint32_t>(Dt)];
    const bool rows = dir == kTopBottom || dir == kBottomTop;
    for (int64_t h = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; h < pb.H;
         h += static_cast<int64_t>(gridDim.y) * blockDim.y) {
      const int64_t p = rows ? w : h, L = rows ? pb.W : pb.H, within = h * pb.W + w;
      at(set * 3 * plane + within, set * plane + within, p > 0, p < L - 1);
    }
  }
}

// The gates come out in acc_t (float for 16-bit inputs; DecayedGates in
// gspn_scan.cpp says why).
template <typename scalar_t, typename acc_t>
__global__ void decayed_gates_kernel(const scalar_t* __restrict__ logits, const scalar_t* __restrict__ decay,
                                     acc_t* __restrict__ gates, const ScanProblem pb, const uint32_t sets) {
  const int64_t plane = pb.plane();
  for_each_decay_position(pb, sets, [&](int64_t k0, int64_t i, bool before, bool after) {
    acc_t g0, g1, g2;
    normalize_taps<acc_t>(static_cast<acc_t>(logits[k0]), static_cast<acc_t>(logits[k0 + plane]),
                          static_cast<acc_t>(logits[k0 + 2 * plane]), before, after, g0, g1, g2);
    const acc_t w = sigmoid(static_cast<acc_t>(decay[i]));
    gates[k0] = g0 * w;
    gates[k0 + plane] = g1 * w;
    gates[k0 + 2 * plane] = g2 * w;
  });
}

// dgates: the scan kernels' gate gradients, in scalar_t or (channels
// sharing a group, added with atomics) in acc_t.
template <typename scalar_t, typename acc_t, typename dg_t>
__global__ void decayed_gates_backward_kernel(const scalar_t* __restrict__ logits,
                                              const scalar_t* __restrict__ decay, const dg_t* __restrict__ dgates,
                                              scalar_t* __restrict__ dlogits, scalar_t* __restrict__ ddecay,
                                              const ScanProblem pb, const uint32_t sets) {
  const int64_t plane = pb.plane();
  for_each_decay_position(pb, sets, [&](int64_t k0, int64_t i, bool before, bool after) {
    const int64_t k1 = k0 + plane, k2 = k1 + plane;
    acc_t g0, g1, g2, signed_sum, dl0, dl1, dl2, da;
    normalize_taps<acc_t>(static_cast<acc_t>(logits[k0]), static_cast<acc_t>(logits[k1]),
                          static_cast<acc_t>(logits[k2]), before, after, g0, g1, g2, signed_sum);
    decayed_taps_backward<acc_t>(g0, g1, g2, signed_sum, sigmoid(static_cast<acc_t>(decay[i])),
                                 static_cast<acc_t>(dgates[k0]), static_cast<acc_t>(dgates[k1]),
                                 static_cast<acc_t>(dgates[k2]), dl0, dl1, dl2, da);
    dlogits[k0] = static_cast<scalar_t>(dl0);
    dlogits[k1] = static_cast<scalar_t>(dl1);
    dlogits[k2] = static_cast<scalar_t>(dl2);
    ddecay[i] = static_cast<scalar_t>(da);
  });
}

}  // namespace

at::Tensor decayed_gates_cuda(const at::Tensor& logits, const at::Tensor& decay, const ScanProblem& pb) {
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor gates = at::empty_like(logits, logits.options().dtype(at::toOpMathType(logits.scalar_type())));
  const int64_t count = decay.numel();
  if (count == 0) return gates;
  const DecayGrid where = decay_grid(pb);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gspn_decayed_gates_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto kernel = decayed_gates_kernel<scalar_t, acc_t>;
    GSPN_LAUNCH(kernel, where.grid, where.block, 0, stream)(
        logits.data_ptr<scalar_t>(), decay.data_ptr<scalar_t>(), gates.data_ptr<acc_t>(), pb, where.sets);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gates;
}

std::pair<at::Tensor, at::Tensor> decayed_gates_backward_cuda(const at::Tensor& logits, const at::Tensor& decay,
                                                              const at::Tensor& dgates, const ScanProblem& pb) {
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor dlogits = at::empty_like(logits), ddecay = at::empty_like(decay);
  const int64_t count = decay.numel();
  if (count == 0) return {dlogits, ddecay};
  const DecayGrid where = decay_grid(pb);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "gspn_decayed_gates_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto* dg) {
      using dg_t = std::remove_const_t<std::remove_pointer_t<decltype(dg)>>;
      const auto kernel = decayed_gates_backward_kernel<scalar_t, acc_t, dg_t>;
      GSPN_LAUNCH(kernel, where.grid, where.block, 0, stream)(
          logits.data_ptr<scalar_t>(), decay.data_ptr<scalar_t>(), dg, dlogits.data_ptr<scalar_t>(),
          ddecay.data_ptr<scalar_t>(), pb, where.sets);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (dgates.scalar_type() == logits.scalar_type()) launch(dgates.data_ptr<scalar_t>());
    else launch(dgates.data_ptr<acc_t>());
  });
  return {dlogits, ddecay};
}

void scan_forward_cuda(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& lam, at::Tensor& out,
                       const ScanProblem& pb, bool columns_staged) {
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_scan_cuda",
                                  [&] { launch_forward<scalar_t>(x, gates, lam, out, pb, columns_staged); });
}

void scan_backward_cuda(const at::Tensor& grad_h, const at::Tensor& h, const at::Tensor& x, const at::Tensor& gates,
                        const at::Tensor& lam, at::Tensor& dx, at::Tensor& dgates, at::Tensor& dlam,
                        const ScanProblem& pb, bool columns_staged) {
  const c10::cuda::CUDAGuard guard(x.device());
  const bool atomic = dgates.scalar_type() != gates.scalar_type() || pb.G != pb.C;
  TORCH_CHECK(!atomic || dgates.scalar_type() == at::toOpMathType(gates.scalar_type()),
              "gspn::scan_backward (CUDA): shared gate groups accumulate in an fp32 buffer");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_scan_backward_cuda", [&] {
    launch_backward<scalar_t>(grad_h, h, x, gates, lam, dx, dgates, dlam, pb, atomic, columns_staged);
  });
}

namespace {

// GSPN_CUDA_STREAMS=1 runs side_by_side_cuda's two parts one after the other
// on the current stream, so that a benchmark can time both ways with one
// build; 2 (the default) on two streams.
bool second_stream_enabled() {
  const char* value = std::getenv("GSPN_CUDA_STREAMS");
  TORCH_CHECK(value == nullptr || std::strcmp(value, "1") == 0 || std::strcmp(value, "2") == 0,
              "GSPN_CUDA_STREAMS=", value, " is not a number of streams for the column route: use 2 (the default) "
              "or 1");
  return value == nullptr || std::strcmp(value, "2") == 0;
}

}  // namespace

// Queues `beside` on a second stream of `on`'s device and `then` on the
// current one, the current stream waiting for both before its next work:
// the column route's row and column launches, each one block per plane, of
// which a layer's call (B = 2, C = 40, two directions each: 160 planes) fills
// 132 SMs once, most of them with one block, for as long as a whole plane
// takes; side by side the two launches share that time. `beside` starts after
// everything queued before the call, and no tensor it uses can be freed and
// reused before it ends: the current stream waits on it (also when `then`
// throws) before anything queued after the call, which is where the caching
// allocator's reuse of a freed block is ordered. In the CPU simulator
// `beside`'s launches run after `then` (cuda_sim.h).
void side_by_side_cuda(const at::Tensor& on, const std::function<void()>& beside, const std::function<void()>& then) {
  if (!second_stream_enabled()) {
    beside();
    then();
    return;
  }
  const SideBySide sharing(2);
#ifdef GSPN_CUDA_SIM
  (void)on;
  std::vector<std::function<void()>> queued;
  gspn_sim::side_stream_launches = &queued;
  try {
    beside();
  } catch (...) {
    gspn_sim::side_stream_launches = nullptr;
    throw;
  }
  gspn_sim::side_stream_launches = nullptr;
  then();
  for (std::function<void()>& launch : queued) launch();
#else
  const c10::cuda::CUDAGuard guard(on.device());
  const cudaStream_t current = c10::cuda::getCurrentCUDAStream();
  const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool(false, on.device().index());
  // One stream waits for the other's work queued so far (an event of no timing: the cheapest kind).
  auto wait = [](cudaStream_t waiting, cudaStream_t on_work) {
    cudaEvent_t done;
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(done, on_work));
    C10_CUDA_CHECK(cudaStreamWaitEvent(waiting, done, 0));
    C10_CUDA_CHECK(cudaEventDestroy(done));  // released once the wait has passed it
  };
  wait(side, current);
  try {
    {
      const c10::cuda::CUDAStreamGuard on_side(side);
      beside();
    }
    then();
  } catch (...) {
    wait(current, side);
    throw;
  }
  wait(current, side);
#endif
}

bool columns_staged_fit_cuda(const ScanProblem& pb, const std::vector<at::Tensor>& tensors, bool backward) {
  const c10::cuda::CUDAGuard guard(tensors.front().device());
  bool fit = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tensors.front().scalar_type(), "gspn_columns_staged_fit",
                                  [&] { fit = columns_staged_fit<scalar_t>(pb, tensors, backward); });
  return fit;
}

}  // namespace gspn
