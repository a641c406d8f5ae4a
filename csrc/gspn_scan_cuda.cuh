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
// - Inputs are loaded a tile of lines ahead (software pipelining): while a
//   tile's lines run through the recurrence, the next tile's loads are in
//   flight. Every load of a tile is unconditional (slots outside the image read
//   a valid dummy address), so none waits behind another's use; a first version
//   with conditional loads that were used at once serialised one memory round
//   trip per line and position slot and ran at 2-5% of copy bandwidth.
// - Coalescing: for "tb"/"bt" consecutive threads read consecutive addresses of
//   a row. For "lr"/"rl" a thread reads a tile's consecutive columns of its
//   row, so a fetched 32-byte sector serves the next loads of the same thread.
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

// Lines whose inputs are loaded ahead (a tile) per thread; fewer when a thread
// owns more positions per line, so two tiles (the current one and the one in
// flight) stay in registers.
template <int RPT>
constexpr int forward_tile_lines() { return RPT <= 2 ? 4 : (RPT == 4 ? 2 : 1); }
template <int RPT>
constexpr int backward_tile_lines() { return RPT == 1 ? 4 : (RPT == 2 ? 2 : 1); }
// 512 threads leave each thread up to 128 registers for its RPT positions of
// two staged tiles; lines up to 512 * 8 = 4096 positions (32K px).
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

// pb.dirs[d] without a run-time array index (which would copy the whole
// kernel parameter struct to local memory).
__device__ inline int direction_of(const ScanProblem& pb, int64_t d) {
  return d == 0 ? pb.dirs[0] : d == 1 ? pb.dirs[1] : d == 2 ? pb.dirs[2] : pb.dirs[3];
}

// Offset of (line t, position p), or of the plane's first element for a slot
// outside the chunk or the line. Every load of a tile is then unconditional,
// so all of them are in flight together; the compute ignores those slots.
__device__ inline int64_t slot_offset(const LineGeometry& geo, int64_t t, int64_t t_end, int64_t p) {
  return (t < t_end && p < geo.length) ? geo.first + t * geo.line_stride + p * geo.pos_stride : geo.first;
}

// The forward's inputs at one position, as stored; converted when used.
template <typename scalar_t>
struct ForwardSlot {
  scalar_t x, lam, g0, g1, g2;
};

template <typename scalar_t, int RPT, int K>
__device__ inline void load_forward_tile(ForwardSlot<scalar_t> (&tile)[K][RPT], const scalar_t* xp,
                                         const scalar_t* lp, const scalar_t* tap0, int64_t plane,
                                         const LineGeometry& geo, int64_t t0, int64_t t_end) {
#pragma unroll
  for (int s = 0; s < K; ++s) {
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
      const int64_t off = slot_offset(geo, t0 + s, t_end, threadIdx.x + static_cast<int64_t>(r) * blockDim.x);
      tile[s][r] = {xp[off], lp[off], tap0[off], tap0[off + plane], tap0[off + 2 * plane]};
    }
  }
}

// Gates of one slot in acc_t, normalised from logits when NORM.
template <typename acc_t, bool NORM, typename scalar_t>
__device__ inline void slot_gates(scalar_t l0, scalar_t l1, scalar_t l2, int64_t p, int64_t L, acc_t& g0,
                                  acc_t& g1, acc_t& g2) {
  g0 = static_cast<acc_t>(l0);
  g1 = static_cast<acc_t>(l1);
  g2 = static_cast<acc_t>(l2);
  if (NORM) normalize_taps<acc_t>(g0, g1, g2, p > 0, p < L - 1, g0, g1, g2);
}

template <typename scalar_t, typename acc_t, int RPT, bool NORM>
__global__ void __launch_bounds__(kMaxThreads)
scan_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ gates,
                    const scalar_t* __restrict__ lam, scalar_t* __restrict__ out, const ScanProblem pb,
                    const int64_t chunks_per_plane) {
  constexpr int K = forward_tile_lines<RPT>();
  const BlockTask task = decode_block(pb, chunks_per_plane);
  const LineGeometry geo = line_geometry(direction_of(pb, task.d), pb.H, pb.W);
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

  // Software pipeline: the next tile's loads are issued before this tile's
  // lines are computed, so memory latency overlaps the recurrence.
  ForwardSlot<scalar_t> cur[K][RPT], next[K][RPT];
  load_forward_tile<scalar_t, RPT, K>(cur, xp, lp, tap0, plane, geo, t_begin, t_end);
  for (int64_t t0 = t_begin; t0 < t_end; t0 += K) {
    if (t0 + K < t_end) load_forward_tile<scalar_t, RPT, K>(next, xp, lp, tap0, plane, geo, t0 + K, t_end);
#pragma unroll
    for (int s = 0; s < K; ++s) {
      const int64_t t = t0 + s;
      if (t >= t_end) break;  // uniform over the block
      acc_t* row = smem + (t & 1) * (L + 2) + 1;
      const acc_t* prev = smem + ((t & 1) ^ 1) * (L + 2);  // prev[p + k] is position p - 1 + k
      const bool first = t == t_begin;
#pragma unroll
      for (int r = 0; r < RPT; ++r) {
        const int64_t p = threadIdx.x + static_cast<int64_t>(r) * blockDim.x;
        if (p < L) {
          const ForwardSlot<scalar_t>& in = cur[s][r];
          acc_t g0, g1, g2;
          slot_gates<acc_t, NORM>(in.g0, in.g1, in.g2, p, L, g0, g1, g2);
          const acc_t lx = static_cast<acc_t>(in.lam) * static_cast<acc_t>(in.x);
          const acc_t v = first ? lx : propagate(lx, g0, g1, g2, prev + p);
          row[p] = v;
          op[geo.first + t * geo.line_stride + p * geo.pos_stride] = static_cast<scalar_t>(v);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int s = 0; s < K; ++s) {
#pragma unroll
      for (int r = 0; r < RPT; ++r) cur[s][r] = next[s][r];
    }
  }
}

// The backward's inputs at one position, as stored; hprev is h[t-1] there.
template <typename scalar_t>
struct BackwardSlot {
  scalar_t go, x, lam, g0, g1, g2, hprev;
};

template <typename scalar_t, int RPT, int K>
__device__ inline void load_backward_tile(BackwardSlot<scalar_t> (&tile)[K][RPT], const scalar_t* ghp,
                                          const scalar_t* hp, const scalar_t* xp, const scalar_t* lp,
                                          const scalar_t* tap0, int64_t plane, const LineGeometry& geo,
                                          int64_t t0, int64_t t_hi, int64_t t_begin) {
#pragma unroll
  for (int s = 0; s < K; ++s) {
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
      const int64_t t = t0 + s;
      const int64_t p = threadIdx.x + static_cast<int64_t>(r) * blockDim.x;
      const int64_t off = slot_offset(geo, t, t_hi, p);
      // The chunk's first line has no previous line, and slots outside the
      // tile none that exists: they read their own h (valid, unused).
      const int64_t prev_off = (t > t_begin && t < t_hi && p < geo.length) ? off - geo.line_stride : off;
      tile[s][r] = {ghp[off], xp[off], lp[off], tap0[off], tap0[off + plane], tap0[off + 2 * plane], hp[prev_off]};
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
  constexpr int K = backward_tile_lines<RPT>();
  const BlockTask task = decode_block(pb, chunks_per_plane);
  const LineGeometry geo = line_geometry(direction_of(pb, task.d), pb.H, pb.W);
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

  // Tiles of K lines from the chunk's end backwards: [t0, t0 + K) clipped to
  // the chunk. The next (earlier) tile's loads fly while this one is computed.
  auto tile_start = [&](int64_t t_hi) { return t_hi - K > t_begin ? t_hi - K : t_begin; };
  BackwardSlot<scalar_t> cur[K][RPT], next[K][RPT];
  load_backward_tile<scalar_t, RPT, K>(cur, ghp, hp, xp, lp, tap0, plane, geo, tile_start(t_end), t_end, t_begin);
  for (int64_t t_hi = t_end; t_hi > t_begin; t_hi -= K) {
    const int64_t t0 = tile_start(t_hi);
    if (t0 > t_begin) {
      load_backward_tile<scalar_t, RPT, K>(next, ghp, hp, xp, lp, tap0, plane, geo, tile_start(t0), t0, t_begin);
    }
#pragma unroll
    for (int s = K - 1; s >= 0; --s) {
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
          const BackwardSlot<scalar_t>& in = cur[s][r];
          acc_t g0, g1, g2;
          slot_gates<acc_t, NORM>(in.g0, in.g1, in.g2, p, L, g0, g1, g2);
          const acc_t go = static_cast<acc_t>(in.go);
          const acc_t a = go + (last ? acc_t(0) : gather_adjoint(vn + p, vn + pitch + p, vn + 2 * pitch + p));
          adj[r] = a;
          const int64_t off = geo.first + t * geo.line_stride + p * geo.pos_stride;
          dxp[off] = static_cast<scalar_t>(static_cast<acc_t>(in.lam) * a);
          dlp[off] = static_cast<scalar_t>(static_cast<acc_t>(in.x) * a);
          vc[p] = g0 * a;
          vc[pitch + p] = g1 * a;
          vc[2 * pitch + p] = g2 * a;
          hcur[p] = static_cast<acc_t>(in.hprev);
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
#pragma unroll
    for (int s = 0; s < K; ++s) {
#pragma unroll
      for (int r = 0; r < RPT; ++r) cur[s][r] = next[s][r];
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
