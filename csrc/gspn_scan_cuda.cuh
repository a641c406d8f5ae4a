// GSPN scan: CUDA kernels and their launches, templated on the dtype.
//
// Included by one small .cu per dtype (gspn_scan_cuda_<dtype>.cu), which
// instantiates launch_forward / launch_backward for it, so ninja compiles the
// ~100 kernel variants in parallel; gspn_scan_cuda.cu dispatches on dtype.
//
// Design (see csrc/README.md for the byte count and what is left to tune):
// - One launch per call covers every direction, channel and chunk: one thread
//   block per (batch, direction, channel, chunk). The block loops over the
//   lines of its chunk inside the kernel; a chunked (local) scan therefore has
//   one independent block per chunk and plenty of parallelism.
// - Thread i of a block owns positions i, i + blockDim, ... (RPT of them) of
//   every line. The previous line's hidden state lives in shared memory in
//   fp32 (fp64 for double), double-buffered so one __syncthreads per line
//   suffices.
// - Inputs for kLinesPerTile lines are loaded into registers before they are
//   used: they do not depend on the recurrence, so the loads of the next lines
//   are in flight while the current line is computed.
// - Coalescing: for "tb"/"bt" consecutive threads read consecutive addresses of
//   a row. For "lr"/"rl" a thread reads kLinesPerTile consecutive columns of
//   its row in a row, so each fetched 32-byte sector is used by the next loads
//   of the same thread instead of being re-fetched per column.
// - 64-bit offsets everywhere (a 16K-pixel layer exceeds 2^31 elements).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <type_traits>

#include "gspn_scan.h"

namespace gspn {
namespace {

constexpr int kLinesPerTile = 4;
// 512 threads leave each thread up to 128 registers for its RPT positions of
// kLinesPerTile staged lines; lines up to 512 * 8 = 4096 positions (32K px).
constexpr int kMaxThreads = 512;
constexpr int kMaxRowsPerThread = 8;
constexpr int64_t kMaxLineLength = int64_t(kMaxThreads) * kMaxRowsPerThread;

// Which (batch, direction, channel, chunk) a block handles.
struct BlockTask {
  int64_t b, d, c, chunk_index;
};

__device__ inline BlockTask decode_block(const ScanProblem& pb, int64_t chunks_per_plane) {
  const int64_t blk = blockIdx.x;
  const int64_t plane = blk / chunks_per_plane;
  BlockTask task;
  task.chunk_index = blk % chunks_per_plane;
  task.c = plane % pb.C;
  task.d = (plane / pb.C) % pb.D;
  task.b = plane / (pb.C * pb.D);
  return task;
}

// tap0 points at tap 0 of a gate group; taps 1 and 2 follow one plane apart.
template <typename scalar_t, typename acc_t, bool NORM>
__device__ inline void load_taps(const scalar_t* tap0, int64_t plane, int64_t off, int64_t p, int64_t L,
                                 acc_t& g0, acc_t& g1, acc_t& g2) {
  g0 = static_cast<acc_t>(tap0[off]);
  g1 = static_cast<acc_t>(tap0[off + plane]);
  g2 = static_cast<acc_t>(tap0[off + 2 * plane]);
  if (NORM) normalize_taps<acc_t>(g0, g1, g2, p > 0, p < L - 1, g0, g1, g2);
}

template <typename scalar_t, typename acc_t, int RPT, bool NORM>
__global__ void __launch_bounds__(kMaxThreads)
scan_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ gates,
                    const scalar_t* __restrict__ lam, scalar_t* __restrict__ out, const ScanProblem pb,
                    const int64_t chunks_per_plane) {
  const BlockTask task = decode_block(pb, chunks_per_plane);
  const LineGeometry geo = line_geometry(pb.dirs[task.d], pb.H, pb.W);
  const int64_t L = geo.length;
  const int64_t clen = chunk_length(pb.chunk, geo.lines);
  const int64_t t_begin = task.chunk_index * clen;
  if (t_begin >= geo.lines) return;  // this direction has fewer chunks than the widest one
  const int64_t t_end = t_begin + clen < geo.lines ? t_begin + clen : geo.lines;

  extern __shared__ unsigned char smem_raw[];
  // Two rows of the hidden state, each padded by one zero on both sides; row j
  // starts at smem + j * (L + 2) + 1 (computed, not indexed from an array, so
  // nothing goes to local memory).
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  if (threadIdx.x == 0) smem[0] = smem[L + 1] = smem[L + 2] = smem[2 * L + 3] = acc_t(0);

  const scalar_t* xp = x + pb.x_plane(task.b, task.d, task.c);
  const scalar_t* lp = lam + pb.lam_plane(task.b, task.d, task.c);
  scalar_t* op = out + pb.out_plane(task.b, task.d, task.c);
  const scalar_t* tap0 = gates + pb.gate_plane(task.b, task.d, task.c / pb.channels_per_group(), 0);
  const int64_t plane = pb.plane();

  for (int64_t t0 = t_begin; t0 < t_end; t0 += kLinesPerTile) {
    acc_t lx[kLinesPerTile][RPT], g0[kLinesPerTile][RPT], g1[kLinesPerTile][RPT], g2[kLinesPerTile][RPT];
#pragma unroll
    for (int s = 0; s < kLinesPerTile; ++s) {
#pragma unroll
      for (int r = 0; r < RPT; ++r) {
        const int64_t p = threadIdx.x + static_cast<int64_t>(r) * blockDim.x;
        lx[s][r] = g0[s][r] = g1[s][r] = g2[s][r] = acc_t(0);
        if (t0 + s < t_end && p < L) {
          const int64_t off = geo.first + (t0 + s) * geo.line_stride + p * geo.pos_stride;
          lx[s][r] = static_cast<acc_t>(lp[off]) * static_cast<acc_t>(xp[off]);
          load_taps<scalar_t, acc_t, NORM>(tap0, plane, off, p, L, g0[s][r], g1[s][r], g2[s][r]);
        }
      }
    }
#pragma unroll
    for (int s = 0; s < kLinesPerTile; ++s) {
      const int64_t t = t0 + s;
      if (t >= t_end) break;  // uniform over the block
      acc_t* cur = smem + (t & 1) * (L + 2) + 1;
      const acc_t* prev = smem + ((t & 1) ^ 1) * (L + 2);  // prev[p + k] is position p - 1 + k
      const bool first = t == t_begin;
#pragma unroll
      for (int r = 0; r < RPT; ++r) {
        const int64_t p = threadIdx.x + static_cast<int64_t>(r) * blockDim.x;
        if (p < L) {
          const acc_t v = first ? lx[s][r] : propagate(lx[s][r], g0[s][r], g1[s][r], g2[s][r], prev + p);
          cur[p] = v;
          op[geo.first + t * geo.line_stride + p * geo.pos_stride] = static_cast<scalar_t>(v);
        }
      }
      __syncthreads();
    }
  }
}

// The adjoint scan of one chunk, lines in reverse. Shared memory holds, for the
// line processed last (t+1), v_k = g_k * a for k = 0..2, and for the current
// line the forward state h[t-1] whose neighbours the gate gradients read.
// ATOMIC: several channels share a gate group and add into an fp32 buffer.
template <typename scalar_t, typename acc_t, int RPT, bool NORM, bool ATOMIC>
__global__ void __launch_bounds__(kMaxThreads)
scan_backward_kernel(const scalar_t* __restrict__ grad_h, const scalar_t* __restrict__ h,
                     const scalar_t* __restrict__ x, const scalar_t* __restrict__ gates,
                     const scalar_t* __restrict__ lam, scalar_t* __restrict__ dx,
                     void* __restrict__ dgates_raw, scalar_t* __restrict__ dlam, const ScanProblem pb,
                     const int64_t chunks_per_plane) {
  using dg_t = typename std::conditional<ATOMIC, acc_t, scalar_t>::type;
  const BlockTask task = decode_block(pb, chunks_per_plane);
  const LineGeometry geo = line_geometry(pb.dirs[task.d], pb.H, pb.W);
  const int64_t L = geo.length;
  const int64_t clen = chunk_length(pb.chunk, geo.lines);
  const int64_t t_begin = task.chunk_index * clen;
  if (t_begin >= geo.lines) return;
  const int64_t t_end = t_begin + clen < geo.lines ? t_begin + clen : geo.lines;

  extern __shared__ unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t pitch = L + 2;
  // Eight padded rows: v_k of parity j at row 3j + k, h[t-1] of parity j at
  // row 6 + j (j alternates with the line). Position p of a row is at
  // row * pitch + 1 + p.
  for (int64_t i = threadIdx.x; i < 8; i += blockDim.x) {
    smem[i * pitch] = acc_t(0);
    smem[i * pitch + L + 1] = acc_t(0);
  }
  __syncthreads();

  const int64_t plane_out = pb.out_plane(task.b, task.d, task.c);
  const scalar_t* ghp = grad_h + plane_out;
  const scalar_t* hp = h + plane_out;
  const scalar_t* xp = x + pb.x_plane(task.b, task.d, task.c);
  const scalar_t* lp = lam + pb.lam_plane(task.b, task.d, task.c);
  scalar_t* dxp = dx + plane_out;
  scalar_t* dlp = dlam + plane_out;
  const int64_t plane = pb.plane();
  const int64_t tap_offset = pb.gate_plane(task.b, task.d, task.c / pb.channels_per_group(), 0);
  const scalar_t* tap0 = gates + tap_offset;
  dg_t* dg0 = static_cast<dg_t*>(dgates_raw) + tap_offset;

  for (int64_t t_hi = t_end; t_hi > t_begin; t_hi -= kLinesPerTile) {
    const int64_t t0 = t_hi - kLinesPerTile > t_begin ? t_hi - kLinesPerTile : t_begin;
    acc_t go[kLinesPerTile][RPT], xs[kLinesPerTile][RPT], ls[kLinesPerTile][RPT], hprev[kLinesPerTile][RPT];
    acc_t g0[kLinesPerTile][RPT], g1[kLinesPerTile][RPT], g2[kLinesPerTile][RPT];
#pragma unroll
    for (int s = 0; s < kLinesPerTile; ++s) {
#pragma unroll
      for (int r = 0; r < RPT; ++r) {
        const int64_t p = threadIdx.x + static_cast<int64_t>(r) * blockDim.x;
        const int64_t t = t0 + s;
        go[s][r] = xs[s][r] = ls[s][r] = hprev[s][r] = g0[s][r] = g1[s][r] = g2[s][r] = acc_t(0);
        if (t < t_hi && p < L) {
          const int64_t off = geo.first + t * geo.line_stride + p * geo.pos_stride;
          go[s][r] = static_cast<acc_t>(ghp[off]);
          xs[s][r] = static_cast<acc_t>(xp[off]);
          ls[s][r] = static_cast<acc_t>(lp[off]);
          load_taps<scalar_t, acc_t, NORM>(tap0, plane, off, p, L, g0[s][r], g1[s][r], g2[s][r]);
          if (t > t_begin) hprev[s][r] = static_cast<acc_t>(hp[off - geo.line_stride]);
        }
      }
    }
#pragma unroll
    for (int s = kLinesPerTile - 1; s >= 0; --s) {
      const int64_t t = t0 + s;
      if (t >= t_hi) continue;  // uniform over the block
      const int64_t j = t & 1;
      acc_t* vc = smem + 3 * j * pitch + 1;  // v_k of this line at vc + k * pitch
      const acc_t* vn = smem + 3 * (j ^ 1) * pitch + 1;  // v_k of line t + 1
      acc_t* hcur = smem + (6 + j) * pitch + 1;
      const bool last = t == t_end - 1;
      acc_t adj[RPT];
#pragma unroll
      for (int r = 0; r < RPT; ++r) {
        const int64_t p = threadIdx.x + static_cast<int64_t>(r) * blockDim.x;
        adj[r] = acc_t(0);
        if (p < L) {
          const acc_t a = go[s][r] + (last ? acc_t(0) : gather_adjoint(vn + p, vn + pitch + p, vn + 2 * pitch + p));
          adj[r] = a;
          const int64_t off = geo.first + t * geo.line_stride + p * geo.pos_stride;
          dxp[off] = static_cast<scalar_t>(ls[s][r] * a);
          dlp[off] = static_cast<scalar_t>(xs[s][r] * a);
          vc[p] = g0[s][r] * a;
          vc[pitch + p] = g1[s][r] * a;
          vc[2 * pitch + p] = g2[s][r] * a;
          hcur[p] = hprev[s][r];
        }
      }
      __syncthreads();
#pragma unroll
      for (int r = 0; r < RPT; ++r) {
        const int64_t p = threadIdx.x + static_cast<int64_t>(r) * blockDim.x;
        if (p >= L) continue;
        const int64_t off = geo.first + t * geo.line_stride + p * geo.pos_stride;
        if (t > t_begin) {
          const acc_t a = adj[r];
          const acc_t d0 = a * hcur[p - 1], d1 = a * hcur[p], d2 = a * hcur[p + 1];
          if constexpr (ATOMIC) {
            atomicAdd(dg0 + off, d0);
            atomicAdd(dg0 + off + plane, d1);
            atomicAdd(dg0 + off + 2 * plane, d2);
          } else {
            dg0[off] = static_cast<dg_t>(d0);
            dg0[off + plane] = static_cast<dg_t>(d1);
            dg0[off + 2 * plane] = static_cast<dg_t>(d2);
          }
        } else if (!ATOMIC) {  // the first line of a chunk has no previous line: its gates act on zeros
          dg0[off] = dg0[off + plane] = dg0[off + 2 * plane] = static_cast<dg_t>(acc_t(0));
        }
      }
    }
  }
}

// Launch geometry shared by both passes.
struct Launch {
  int64_t chunks_per_plane;
  int64_t blocks;
  int threads;
  int rows_per_thread;
  int64_t max_length;
};

Launch plan_launch(const ScanProblem& pb) {
  Launch plan{1, 0, 32, 1, 1};
  for (int64_t d = 0; d < pb.D; ++d) {
    const LineGeometry geo = line_geometry(pb.dirs[d], pb.H, pb.W);
    const int64_t clen = chunk_length(pb.chunk, geo.lines);
    plan.chunks_per_plane = std::max(plan.chunks_per_plane, (geo.lines + clen - 1) / clen);
    plan.max_length = std::max(plan.max_length, geo.length);
  }
  TORCH_CHECK(plan.max_length <= kMaxLineLength, "gspn::scan (CUDA): lines of ", plan.max_length,
              " positions exceed the kernel's limit of ", kMaxLineLength, "; split the image");
  while (static_cast<int64_t>(plan.rows_per_thread) * kMaxThreads < plan.max_length) plan.rows_per_thread *= 2;
  const int64_t per_thread = (plan.max_length + plan.rows_per_thread - 1) / plan.rows_per_thread;
  plan.threads = static_cast<int>(std::min<int64_t>(kMaxThreads, ((per_thread + 31) / 32) * 32));
  plan.blocks = pb.B * pb.D * pb.C * plan.chunks_per_plane;
  TORCH_CHECK(plan.blocks < (int64_t(1) << 31), "gspn::scan (CUDA): too many blocks (", plan.blocks, ")");
  return plan;
}

template <typename Kernel>
void set_shared_memory(Kernel kernel, size_t bytes) {
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= static_cast<size_t>(limit), "gspn::scan (CUDA): lines this long need ", bytes,
              " bytes of shared memory per block; this GPU allows ", limit);
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

// Calls f with RPT (1, 2, 4 or 8) as a compile-time constant.
template <typename F>
void with_rows_per_thread(int rpt, F&& f) {
  switch (rpt) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

template <typename F>
void with_bool(bool value, F&& f) {
  if (value) f(std::true_type{});
  else f(std::false_type{});
}

}  // namespace

template <typename scalar_t>
void launch_forward(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& lam, at::Tensor& out,
                    const ScanProblem& pb) {
  using acc_t = at::opmath_type<scalar_t>;
  const Launch plan = plan_launch(pb);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t smem = 2 * (plan.max_length + 2) * sizeof(acc_t);
  with_rows_per_thread(plan.rows_per_thread, [&](auto rpt) {
    with_bool(pb.normalize, [&](auto norm) {
      auto kernel = scan_forward_kernel<scalar_t, acc_t, decltype(rpt)::value, decltype(norm)::value>;
      set_shared_memory(kernel, smem);
      kernel<<<plan.blocks, plan.threads, smem, stream>>>(x.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
                                                          lam.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), pb,
                                                          plan.chunks_per_plane);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

// atomic: gate gradients of channels sharing a group are added into an fp32 buffer.
template <typename scalar_t>
void launch_backward(const at::Tensor& grad_h, const at::Tensor& h, const at::Tensor& x, const at::Tensor& gates,
                     const at::Tensor& lam, at::Tensor& dx, at::Tensor& dgates, at::Tensor& dlam,
                     const ScanProblem& pb, bool atomic) {
  using acc_t = at::opmath_type<scalar_t>;
  const Launch plan = plan_launch(pb);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t smem = 8 * (plan.max_length + 2) * sizeof(acc_t);
  with_rows_per_thread(plan.rows_per_thread, [&](auto rpt) {
    with_bool(pb.normalize, [&](auto norm) {
      with_bool(atomic, [&](auto use_atomic) {
        auto kernel = scan_backward_kernel<scalar_t, acc_t, decltype(rpt)::value, decltype(norm)::value,
                                           decltype(use_atomic)::value>;
        set_shared_memory(kernel, smem);
        kernel<<<plan.blocks, plan.threads, smem, stream>>>(
            grad_h.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
            lam.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(), dgates.data_ptr(), dlam.data_ptr<scalar_t>(), pb,
            plan.chunks_per_plane);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

// One line per dtype file: instantiates both launches for SCALAR.
#define GSPN_INSTANTIATE_CUDA_LAUNCHES(SCALAR)                                                                  \
  template void launch_forward<SCALAR>(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,   \
                                       const ScanProblem&);                                                    \
  template void launch_backward<SCALAR>(const at::Tensor&, const at::Tensor&, const at::Tensor&,               \
                                        const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,        \
                                        at::Tensor&, const ScanProblem&, bool);

}  // namespace gspn
