// GSPN scan: CUDA kernels and their launches, templated on the dtype.
//
// Included by one small .cu per dtype (gspn_scan_cuda_<dtype>.cu), which
// instantiates launch_forward / launch_backward for it, so ninja compiles the
// ~230 kernel variants in parallel; gspn_scan_cuda.cu dispatches on dtype.
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
//   row, so a fetched 32-byte sector serves the next loads of the same thread;
//   the column route's launches copy 16 bytes of each row a group of lines
//   ahead into shared memory instead (ColumnStages).
// - Plane starts are 64-bit (a 16K-pixel layer exceeds 2^31 elements); offsets
//   inside one plane are 32-bit (see ThreadSlots).
// - In float the gate sigmoid and normalisation use __expf and approximate
//   reciprocals (gspn_scan.h), and a tile's gates are prepared before its
//   lines, so a line's critical path between barriers is 3 shared loads,
//   3 FMAs and two stores.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

#include "gspn_cuda_api.cuh"
#include "gspn_scan.h"

namespace gspn {
namespace {

// Lines whose inputs are loaded ahead (a tile) per thread; fewer when a thread
// owns more positions per line, so two tiles (the current one and the one in
// flight) stay in registers.
constexpr int forward_tile_lines(int positions_per_thread) {
  return positions_per_thread <= 2 ? 4 : (positions_per_thread == 4 ? 2 : 1);
}
constexpr int backward_tile_lines(int positions_per_thread) {
  return positions_per_thread == 1 ? 4 : (positions_per_thread == 2 ? 2 : 1);
}
// A block of CH channels (pair_channels) holds CH times the inputs per slot:
// tiles as for CH times the positions, but for 16-bit pairs of positions
// (one register per input and channel), whose full tiles fit (SASS, sm_90:
// the others spilled).
template <typename scalar_t, int V, int CH>
constexpr int tile_channels() {
  return V == 2 && sizeof(scalar_t) == 2 ? 1 : CH;
}
// 512 threads leave each thread up to 128 registers for its RPT positions of
// two staged tiles; lines up to 512 * 8 = 4096 positions (32K px).
constexpr int kMaxThreads = 512;
constexpr int kMaxRowsPerThread = 8;
constexpr int64_t kMaxLineLength = int64_t(kMaxThreads) * kMaxRowsPerThread;

// Which (batch, direction, channel, chunk) a block handles.
struct BlockTask {
  int64_t b, d, c, chunk_index;
};

// blk: the block's (plane, chunk) index, blockIdx.x but for split lines
// (segments blocks per chunk, LineWindow). CH channels per block (channel
// pairs, see pair_channels): c is the first of CH neighbouring channels of
// one gate group.
template <int CH = 1>
__device__ inline BlockTask decode_block(const ScanProblem& pb, int64_t chunks_per_plane, int64_t blk) {
  const int64_t plane = blk / chunks_per_plane, groups_of_channels = pb.C / CH;
  BlockTask task;
  task.chunk_index = blk % chunks_per_plane;
  task.c = plane % groups_of_channels * CH;
  task.d = (plane / groups_of_channels) % pb.D;
  task.b = plane / (groups_of_channels * pb.D);
  return task;
}

// pb.dirs[d] without a run-time array index (which would copy the whole
// kernel parameter struct to local memory).
__device__ inline int direction_of(const ScanProblem& pb, int64_t d) {
  return d == 0 ? pb.dirs[0] : d == 1 ? pb.dirs[1] : d == 2 ? pb.dirs[2] : pb.dirs[3];
}

// Where a thread's RPT slots sit in a line: slot r holds the V neighbouring
// positions p = V * (threadIdx.x + r * blockDim.x) + v, v < V (V = 2: row
// scans of even lines, loaded and stored as one 2-element vector; see
// plan_launch), its offset from the line's start, and which of its
// positions' taps have a neighbour. A slot past the line's end (dead) takes
// position 0: its reads of the line in memory and of the block's rows in
// shared memory stay valid (unused), and a live slot's reads and writes of
// those rows share one index, so one address. Offsets inside one (H, W)
// plane are 32-bit (the host checks H * W < 2^31; plane starts stay 64-bit),
// so a load costs one multiply-add into a 64-bit address: with 64-bit offsets
// the address arithmetic was more than half of the kernels' instructions.
// Split lines (LineWindow): the slots cover a block's window of `length`
// positions from the line's position `first`; pos is window-relative, offset
// and the neighbours are the line's.
template <int RPT, int V = 1>
struct ThreadSlots {
  int pos[RPT];
  int offset[RPT];
  bool live[RPT], has_before[RPT], has_after[RPT];  // of the slot's first and last position

  __device__ ThreadSlots(int length, int pos_stride, int first = 0, int line_length = -1) {
    if (line_length < 0) line_length = length;
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
      const int p = static_cast<int>(V * (threadIdx.x + r * blockDim.x));
      live[r] = p < length;
      pos[r] = live[r] ? p : 0;
      offset[r] = (first + pos[r]) * pos_stride;
      has_before[r] = first + pos[r] > 0;
      has_after[r] = first + pos[r] + V - 1 < line_length - 1;
    }
  }
  // Whether position v of slot r has a neighbour before / after it.
  __device__ bool before(int r, int v) const { return v > 0 || has_before[r]; }
  __device__ bool after(int r, int v) const { return v < V - 1 || has_after[r]; }
};

// One input at a slot's V positions, as stored (16-bit types stay 16-bit
// until prepared); at<acc_t>(v) converts position v. 16-bit pairs stay the
// one 32-bit word they were loaded as, so each half converts in one
// instruction (an operand swizzle for fp16, a shift or a mask for bf16),
// where splitting them first took a PRMT per pair to move the high half.
template <typename scalar_t, int V>
struct Stored {
  scalar_t v[V];
  template <typename acc_t>
  __device__ acc_t at(int i) const { return static_cast<acc_t>(v[i]); }
  __device__ scalar_t element(int i) const { return v[i]; }
};
template <>
struct Stored<c10::BFloat16, 2> {
  uint32_t bits;  // position 0 in the low half
  template <typename acc_t>
  __device__ acc_t at(int i) const {
    const uint32_t f = i == 0 ? bits << 16 : bits & 0xffff0000u;  // bf16 is the top half of an fp32
    float out;
    std::memcpy(&out, &f, sizeof(out));
    return static_cast<acc_t>(out);
  }
  __device__ c10::BFloat16 element(int i) const {
    return c10::BFloat16(static_cast<unsigned short>(i == 0 ? bits & 0xffffu : bits >> 16), c10::BFloat16::from_bits());
  }
};
#ifndef GSPN_CUDA_SIM
template <>
struct Stored<c10::Half, 2> {
  __half2 h;
  template <typename acc_t>
  __device__ acc_t at(int i) const { return static_cast<acc_t>(i == 0 ? __low2float(h) : __high2float(h)); }
  __device__ c10::Half element(int i) const { return c10::Half(i == 0 ? __low2half(h) : __high2half(h)); }
};
#endif

// The forward's inputs at one slot's V positions; converted when prepared.
// gate_t: the gates' type, scalar_t or (decayed gates that an elementwise
// pass made, for 16-bit inputs) float: in 16 bits the taps' sum would round
// off the decay it carries (a sum of 1.002 for sigmoid(8) = 0.99966 in bf16).
// CH: channels of one gate group per block (pair_channels), which share the gates.
template <typename scalar_t, int V, typename gate_t = scalar_t, int CH = 1>
struct ForwardSlot {
  Stored<scalar_t, V> x[CH], lam[CH];
  Stored<gate_t, V> g0, g1, g2;
};

// p, hidden from the optimiser: without it nvcc folds each plane's 64-bit
// start into every load's address (a 64-bit add, a sign extension and a
// scaling per load) instead of one multiply-add onto a pointer in a register.
// The pointer then loses its known address space, so accesses through it go
// through load_global / store_global to stay global-memory instructions.
template <typename T>
__device__ inline T* opaque(T* p) {
#ifndef GSPN_CUDA_SIM
  asm("" : "+l"(p));
#endif
  return p;
}

template <typename T>
__device__ inline T load_global(const T* p) {
  return __ldg(p);
}
__device__ inline c10::Half load_global(const c10::Half* p) {
  return c10::Half(__ldg(reinterpret_cast<const unsigned short*>(p)), c10::Half::from_bits());
}
__device__ inline c10::BFloat16 load_global(const c10::BFloat16* p) {
  return c10::BFloat16(__ldg(reinterpret_cast<const unsigned short*>(p)), c10::BFloat16::from_bits());
}

// Plain st.global / red.global: the intrinsics (__stwb, atomicAdd) on a
// pointer of unknown space gave strong-ordered or generic stores and a
// compare-and-swap loop for the add.
#ifdef GSPN_CUDA_SIM
template <typename T>
inline void store_global(T* p, T v) { *p = v; }
template <typename T>
inline void add_global(T* p, T v) { *p += v; }  // the simulator runs one block at a time
#else
__device__ inline void store_global(float* p, float v) { asm volatile("st.global.f32 [%0], %1;" ::"l"(p), "f"(v)); }
__device__ inline void store_global(double* p, double v) { asm volatile("st.global.f64 [%0], %1;" ::"l"(p), "d"(v)); }
__device__ inline void store_global(c10::Half* p, c10::Half v) {
  asm volatile("st.global.b16 [%0], %1;" ::"l"(p), "h"(v.x));
}
__device__ inline void store_global(c10::BFloat16* p, c10::BFloat16 v) {
  asm volatile("st.global.b16 [%0], %1;" ::"l"(p), "h"(v.x));
}
__device__ inline void add_global(float* p, float v) { asm volatile("red.global.add.f32 [%0], %1;" ::"l"(p), "f"(v)); }
__device__ inline void add_global(double* p, double v) {
  asm volatile("red.global.add.f64 [%0], %1;" ::"l"(p), "d"(v));
}
#endif

// V neighbouring elements from p (V = 2: one vector load; the host aligns
// p to 2 elements, which the simulator checks).
template <int V, typename scalar_t>
__device__ inline void load_positions(const scalar_t* p, Stored<scalar_t, V>& out) {
  static_assert(V == 1 || V == 2, "one or two positions per slot");
  if constexpr (V == 1) {
    out.v[0] = load_global(p);
  } else {
#ifdef GSPN_CUDA_SIM
    gspn_sim::device_check(reinterpret_cast<uintptr_t>(p) % (2 * sizeof(scalar_t)) == 0, "misaligned pair load");
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      out.bits = static_cast<uint32_t>(p[0].x) | (static_cast<uint32_t>(p[1].x) << 16);
    } else {
      out.v[0] = p[0];
      out.v[1] = p[1];
    }
#else
    if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      out.h = __ldg(reinterpret_cast<const __half2*>(p));
    } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      out.bits = __ldg(reinterpret_cast<const unsigned int*>(p));
    } else if constexpr (sizeof(scalar_t) == 4) {
      const float2 f = __ldg(reinterpret_cast<const float2*>(p));
      out.v[0] = f.x;
      out.v[1] = f.y;
    } else {
      const double2 d = __ldg(reinterpret_cast<const double2*>(p));
      out.v[0] = d.x;
      out.v[1] = d.y;
    }
#endif
  }
}

// K consecutive elements from p in one or two vector loads (at most 16 bytes
// each; the host aligns p to K elements, which the simulator checks). SHARED:
// p is in shared memory (a plain load, which the compiler makes an LDS), else
// in global memory (__ldg).
template <int K, bool SHARED = false, typename scalar_t>
__device__ inline void load_consecutive(const scalar_t* p, scalar_t (&out)[K]) {
  constexpr int bytes = K * static_cast<int>(sizeof(scalar_t));
#ifdef GSPN_CUDA_SIM
  // a 32-byte vector is two 16-byte accesses
  gspn_sim::device_check(reinterpret_cast<uintptr_t>(p) % (bytes > 16 ? 16 : bytes) == 0,
                         "misaligned line vector load");
  for (int e = 0; e < K; ++e) out[e] = p[e];
#else
  auto load = [](const auto* q) { return SHARED ? *q : __ldg(q); };
  if constexpr (K == 1) {
    out[0] = SHARED ? *p : load_global(p);
  } else if constexpr (bytes <= 16) {
    using Word = std::conditional_t<bytes == 16, uint4, std::conditional_t<bytes == 8, uint2, unsigned int>>;
    static_assert(sizeof(Word) == bytes, "4, 8 or 16 bytes");
    const Word w = load(reinterpret_cast<const Word*>(p));
    std::memcpy(out, &w, bytes);
  } else {
    static_assert(bytes == 32, "two 16-byte words");
    const uint4 lo = load(reinterpret_cast<const uint4*>(p)), hi = load(reinterpret_cast<const uint4*>(p) + 1);
    std::memcpy(out, &lo, 16);
    std::memcpy(reinterpret_cast<unsigned char*>(out) + 16, &hi, 16);
  }
#endif
}

// K consecutive elements to p in global memory in one or two vector stores
// (the host aligns p to K elements, which the simulator checks).
template <int K, typename scalar_t>
__device__ inline void store_consecutive(scalar_t* p, const scalar_t (&in)[K]) {
  constexpr int bytes = K * static_cast<int>(sizeof(scalar_t));
#ifdef GSPN_CUDA_SIM
  gspn_sim::device_check(reinterpret_cast<uintptr_t>(p) % (bytes > 16 ? 16 : bytes) == 0,
                         "misaligned line vector store");
  for (int e = 0; e < K; ++e) p[e] = in[e];
#else
  if constexpr (K == 1) {
    store_global(p, in[0]);
  } else if constexpr (bytes == 4) {
    unsigned int w;
    std::memcpy(&w, in, 4);
    asm volatile("st.global.b32 [%0], %1;" ::"l"(p), "r"(w));
  } else if constexpr (bytes == 8) {
    uint2 w;
    std::memcpy(&w, in, 8);
    asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(p), "r"(w.x), "r"(w.y));
  } else {
    static_assert(bytes % 16 == 0 && bytes <= 32, "4, 8, 16 or 32 bytes");
#pragma unroll
    for (int half = 0; half < bytes / 16; ++half) {
      uint4 w;
      std::memcpy(&w, reinterpret_cast<const unsigned char*>(in) + 16 * half, 16);
      asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(reinterpret_cast<unsigned char*>(p) + 16 * half),
                   "r"(w.x), "r"(w.y), "r"(w.z), "r"(w.w));
    }
  }
#endif
}

// BYTES (16, or 8 for narrow groups) from global memory to shared memory
// without passing through registers (cp.async, sm_80 and later: .cg for 16
// bytes, which skips L1, .ca for 8, which .cg does not take; a load and a
// store before sm_80), in the thread's open group of copies;
// copy_async_commit closes the group, copy_async_wait<n>() waits until every
// committed group but the n newest has landed. A thread's copies are visible
// to itself after the wait; other threads would need a barrier as well.
template <int BYTES>
__device__ inline void copy_async(void* shared_dst, const void* global_src) {
  static_assert(BYTES == 16 || BYTES == 8, "cp.async copies of 16 or 8 bytes");
#ifdef GSPN_CUDA_SIM
  gspn_sim::copy_async(shared_dst, global_src, BYTES);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
  if constexpr (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(global_src) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(dst), "l"(global_src) : "memory");
  }
#else
  if constexpr (BYTES == 16) *static_cast<uint4*>(shared_dst) = __ldg(static_cast<const uint4*>(global_src));
  else *static_cast<uint2*>(shared_dst) = __ldg(static_cast<const uint2*>(global_src));
#endif
}
__device__ inline void copy_async_commit() {
#ifdef GSPN_CUDA_SIM
  gspn_sim::copy_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N>
__device__ inline void copy_async_wait() {
#ifdef GSPN_CUDA_SIM
  gspn_sim::copy_async_wait(N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// A column tile's K lines of N inputs at offset o, one vector per input (K
// consecutive columns of a row): calls assign(s, v) for each line s of the
// tile, v[k] being input k there. ascending: the lines run with the
// addresses ("lr"), else against them ("rl"). A line takes its element by a
// select between two constant indices: a run-time index would put the
// vectors in local memory (54-60 spilled accesses per backward variant).
// SHARED: the inputs are a column stage in shared memory (ColumnStages).
template <int K, int N, bool SHARED = false, typename scalar_t, typename Assign>
__device__ inline void load_column_tile(const scalar_t* const (&inputs)[N], int o, bool ascending, Assign&& assign) {
  scalar_t buf[N][K];
#pragma unroll
  for (int k = 0; k < N; ++k) load_consecutive<K, SHARED>(inputs[k] + o, buf[k]);
#pragma unroll
  for (int s = 0; s < K; ++s) {
    scalar_t v[N];
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = ascending ? buf[k][s] : buf[k][K - 1 - s];
    assign(s, v);
  }
}

// K consecutive elements added to p in global memory: one vector reduction
// (red.global.add.v2/v4.f32, sm_90) for 2 or 4 floats, else one add each.
template <int K, typename T>
__device__ inline void add_consecutive(T* p, const T (&in)[K]) {
  // One if-else chain (no return before the loop: nvcc warned it unreachable).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && !defined(GSPN_CUDA_SIM)
  if constexpr (std::is_same_v<T, float> && K == 4) {
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(p), "f"(in[0]), "f"(in[1]), "f"(in[2]),
                 "f"(in[3]) : "memory");
  } else if constexpr (std::is_same_v<T, float> && K == 2) {
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(in[0]), "f"(in[1]) : "memory");
  } else
#endif
  {
#ifdef GSPN_CUDA_SIM
    gspn_sim::device_check(reinterpret_cast<uintptr_t>(p) % (K * sizeof(T) > 16 ? 16 : K * sizeof(T)) == 0,
                           "misaligned line vector add");
#endif
#pragma unroll
    for (int e = 0; e < K; ++e) add_global(p + e, in[e]);
  }
}

// A column tile's K lines of one output, h[s][r] for line s of the tile at
// slot r, stored (ADD: added) as one vector per slot: K consecutive columns
// of its row, from offset low, the tile's lowest address; ascending as in
// load_column_tile.
template <int K, bool ADD = false, int RPT, typename T>
__device__ inline void store_column_tile(T* p, int low, const int (&offset)[RPT], const bool (&live)[RPT],
                                         const T (&h)[K][RPT], bool ascending) {
#pragma unroll
  for (int r = 0; r < RPT; ++r) {
    if (!live[r]) continue;
    T v[K];
#pragma unroll
    for (int s = 0; s < K; ++s) v[s] = ascending ? h[s][r] : h[K - 1 - s][r];
    if constexpr (ADD) add_consecutive<K>(p + (low + offset[r]), v);
    else store_consecutive<K>(p + (low + offset[r]), v);
  }
}

// h (in acc_t) stored as V neighbouring elements of scalar_t from p.
template <int V, typename scalar_t, typename acc_t>
__device__ inline void store_positions(scalar_t* p, const acc_t (&h)[V]) {
  if constexpr (V == 1) {
    store_global(p, static_cast<scalar_t>(h[0]));
  } else {
    const scalar_t a = static_cast<scalar_t>(h[0]), b = static_cast<scalar_t>(h[1]);
#ifdef GSPN_CUDA_SIM
    gspn_sim::device_check(reinterpret_cast<uintptr_t>(p) % (2 * sizeof(scalar_t)) == 0, "misaligned pair store");
    p[0] = a;
    p[1] = b;
#else
    if constexpr (sizeof(scalar_t) == 2) {
      const unsigned int bits = static_cast<unsigned int>(a.x) | (static_cast<unsigned int>(b.x) << 16);
      asm volatile("st.global.b32 [%0], %1;" ::"l"(p), "r"(bits));
    } else if constexpr (sizeof(scalar_t) == 4) {
      asm volatile("st.global.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(a), "f"(b));
    } else {
      asm volatile("st.global.v2.f64 [%0], {%1, %2};" ::"l"(p), "d"(a), "d"(b));
    }
#endif
  }
}

// The lines a block scans, its chunk [begin, end) of one direction's lines,
// and where they lie in the plane, in 32-bit ints (the plane has < 2^31
// elements, which plan_launch checks): with 64-bit line counters every
// compare and add of the line loop took two instructions.
struct BlockLines {
  int begin, end;  // begin == end: this direction has fewer chunks than the widest one
  int length;      // positions per line
  int first, line_stride, pos_stride;
  bool columns;    // "lr" / "rl": lines are columns

  // Offset of line t's first position inside the plane.
  __device__ int offset(int t) const { return first + t * line_stride; }
};

__device__ inline BlockLines block_lines(const ScanProblem& pb, const BlockTask& task) {
  const int dir = direction_of(pb, task.d);
  const LineGeometry geo = line_geometry(dir, pb.H, pb.W);
  const int64_t clen = chunk_length(pb.chunk, geo.lines);
  const int64_t begin = task.chunk_index * clen;
  BlockLines lines;
  lines.begin = static_cast<int>(begin < geo.lines ? begin : geo.lines);
  lines.end = static_cast<int>(begin + clen < geo.lines ? begin + clen : geo.lines);
  lines.length = static_cast<int>(geo.length);
  lines.first = static_cast<int>(geo.first);
  lines.line_stride = static_cast<int>(geo.line_stride);
  lines.pos_stride = static_cast<int>(geo.pos_stride);
  lines.columns = dir == kLeftRight || dir == kRightLeft;
  return lines;
}

// Lines split across a thread block cluster (sm_90; GSPN_CUDA_SPLIT, see
// split_segments): block `rank` of the cluster's `segments` owns the
// segment [seg_begin, seg_end) of every line and computes the window
// [first, first + length), the segment and kSplitHalo positions on each side
// (fewer at the line's ends). Positions near a window's edge that is not the
// line's go wrong by one more position per line (their outer neighbour is
// unknown, taken as 0), so every kSplitHalo lines, after a cluster barrier,
// each block copies its halo (the window outside its segment) from its
// neighbours' segments of the latest line in their shared memory: one
// cluster barrier per kSplitHalo lines, about 2 * kSplitHalo positions of
// redundant work per line and block, for `segments` times the blocks on
// the lines of a launch with fewer planes than SMs. A neighbour may run up
// to kSplitHalo lines ahead of a block reading its row, so split kernels
// keep kSplitRing rows of the hidden state instead of two.
constexpr int kSplitHalo = 8;
constexpr int kSplitRing = 16;
static_assert(kSplitRing > kSplitHalo && (kSplitRing & (kSplitRing - 1)) == 0, "a ring of a power of 2 rows");
constexpr int kMaxSplitRows = 2;  // slots per thread of the split kernels
constexpr int kMaxSplitSegments = 8;  // a portable cluster size
constexpr int kMaxPairedRows = 2;     // slots per thread of the kernels of channel pairs (pair_channels)

struct LineWindow {
  int seg_begin, seg_end, first, length;
  // Whether the line's position p is in this block's segment (its to store).
  __host__ __device__ bool owns(int p) const { return p >= seg_begin && p < seg_end; }
};

// Positions per segment: even (pairs of positions stay in one segment).
__host__ __device__ inline int split_segment_length(int line_length, int segments) {
  const int per = (line_length + segments - 1) / segments;
  return (per + 1) / 2 * 2;
}

__host__ __device__ inline LineWindow line_window(int line_length, int segments, int rank) {
  const int per = split_segment_length(line_length, segments);
  LineWindow w;
  w.seg_begin = rank * per < line_length ? rank * per : line_length;
  w.seg_end = w.seg_begin + per < line_length ? w.seg_begin + per : line_length;
  w.first = w.seg_begin > kSplitHalo ? w.seg_begin - kSplitHalo : 0;
  const int last = w.seg_end + kSplitHalo < line_length ? w.seg_end + kSplitHalo : line_length;
  w.length = last - w.first;
  return w;
}

// Positions in one row of a split kernel's hidden state (the widest window).
__host__ __device__ inline int split_window_length(int line_length, int segments) {
  return split_segment_length(line_length, segments) + 2 * kSplitHalo;
}

// Lines per group of a staged column scan. Wide groups: 16 bytes of each
// row (32 for double: the forward's 4-line tiles). Narrow groups, half
// those, for lines too long for two wide stages in shared memory: only at
// the most positions per thread, whose tiles (K = 2) fit inside them.
template <typename scalar_t>
constexpr int wide_group_lines() {
  return 16 / static_cast<int>(sizeof(scalar_t)) > 4 ? 16 / static_cast<int>(sizeof(scalar_t)) : 4;
}
template <typename scalar_t>
constexpr int narrow_group_lines() {
  return wide_group_lines<scalar_t>() / 2;
}

// Staged column launches have kernels of their own (GK > 0, so that the
// others keep their registers), for single positions at up to
// kMaxStagedRows per thread: packing more slots into fewer threads would not
// fit more stages per SM. Wide groups fit lines up to ~1400 positions forward
// (4 per thread at 512 threads) and ~900 backward (2), narrow ones up to the
// thread limit: 2048 forward, 1024 backward.
constexpr int kMaxStagedRows = 4, kMaxStagedBackwardRows = 2;

// Where the column stages start in a block's dynamic shared memory, after
// `rows` padded rows of the hidden state (16-byte aligned for the copies).
__host__ __device__ inline size_t column_stages_offset(int rows, int64_t length, size_t acc_bytes) {
  return (rows * (length + 2) * acc_bytes + 15) / 16 * 16;
}

// Column scans staged through shared memory (kernels with GK > 0). A group
// of GK lines is GK consecutive columns: one segment of each row per input,
// 16 bytes (32 for double) in wide groups, 8 (16) in narrow ones. While a
// group's lines run, the next group's segments travel into the other of two
// stages by asynchronous copies (cp.async), issued a whole group ahead and
// holding no registers on the way. Each thread copies the rows it owns and
// reads only those, so a group needs its copies' wait and no barrier (a
// thread's own reads of a stage are done before it refills it: a tile's
// lines and their barriers lie between, but for one case that takes a
// barrier of its own, see load_forward_tile).
// Stage j, input k, row p is the segment at base + ((j * N + k) * length +
// p) * GK elements. Groups start at t_begin, the chunk's first line (the
// host checks chunks of whole groups).
template <typename scalar_t, int N, int GK>
struct ColumnStages {
  scalar_t* base;
  int length;          // rows per stage: positions per line
  int t_begin, t_end;  // the chunk's lines

  __device__ int group_of(int t) const { return t_begin + (t - t_begin) / GK * GK; }
  __device__ int stage_of(int g0) const { return ((g0 - t_begin) / GK) & 1; }
  __device__ scalar_t* segment(int stage, int k, int row) const {
    return base + ((stage * N + k) * length + row) * GK;
  }
  // The N segments of this thread's live rows of the group from line g0,
  // into its stage, in the open group of copies.
  template <int RPT>
  __device__ void fetch(const scalar_t* const (&inputs)[N], const BlockLines& lines, const ThreadSlots<RPT, 1>& slots,
                        int g0) const {
    constexpr int segment_bytes = GK * static_cast<int>(sizeof(scalar_t));
    constexpr int copy_bytes = segment_bytes < 16 ? segment_bytes : 16;
    constexpr int per_copy = copy_bytes / static_cast<int>(sizeof(scalar_t));
    const int low = lines.offset(lines.line_stride > 0 ? g0 : g0 + GK - 1);  // the group's lowest column
    const int stage = stage_of(g0);
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
      if (!slots.live[r]) continue;
#pragma unroll
      for (int k = 0; k < N; ++k) {
#pragma unroll
        for (int c = 0; c < GK / per_copy; ++c) {
          copy_async<copy_bytes>(segment(stage, k, slots.pos[r]) + c * per_copy,
                                 inputs[k] + low + slots.offset[r] + c * per_copy);
        }
      }
    }
  }
  // Where, in each input's segment of `row`, the tile of K lines from t0
  // (inside the group from g0) starts: its lowest column.
  template <int K>
  __device__ int tile_offset(int t0, int g0, int row, bool ascending) const {
    const int within = t0 - g0;
    return row * GK + (ascending ? within : GK - K - within);
  }
};

// Lines t0 .. t0 + K - 1 of the forward's inputs; lines past t_last (the
// chunk's last) re-read t_last (valid, unused), so every load is unconditional.
// line_vectors (column scans whose tiles the host found aligned): a tile's K
// lines are K consecutive columns, so each slot takes them in one vector load
// per input instead of K loads that each touch another 32-byte sector of the
// same rows. GK > 0 (staged): the same
// vectors from the tile's group in shared memory; a group's first tile
// starts the next group's copies and waits for its own. Gates of another
// type than the other inputs (gate_t) take the loads per line.
template <typename scalar_t, int RPT, int V, int K, int GK, typename gate_t, int CH>
__device__ inline void load_forward_tile(ForwardSlot<scalar_t, V, gate_t, CH> (&tile)[K][RPT],
                                         const scalar_t* const (&xp)[CH], const scalar_t* const (&lp)[CH],
                                         const gate_t* g0p, const gate_t* g1p, const gate_t* g2p,
                                         const BlockLines& lines, const ThreadSlots<RPT, V>& slots, int t0,
                                         int t_last, bool line_vectors, const ColumnStages<scalar_t, 5, GK>& stages) {
  static_assert(GK == 0 || std::is_same_v<gate_t, scalar_t>, "staged kernels take gates of the inputs' type");
  if constexpr (V == 1 && std::is_same_v<gate_t, scalar_t> && CH == 1) {
    auto assign = [&](int r) {
      return [&, r](int s, const scalar_t(&v)[5]) {
        ForwardSlot<scalar_t, V, gate_t>& in = tile[s][r];
        in.x[0].v[0] = v[0];
        in.lam[0].v[0] = v[1];
        in.g0.v[0] = v[2];
        in.g1.v[0] = v[3];
        in.g2.v[0] = v[4];
      };
    };
    // Ascending addresses are lines t0, t0 + 1, ... for "lr" (line_stride 1), t0 + K - 1, ... for "rl".
    const bool ascending = lines.line_stride > 0;
    const scalar_t* const inputs[5] = {xp[0], lp[0], g0p, g1p, g2p};
    if constexpr (GK > 0) {
      static_assert(GK % K == 0, "a staged group holds whole tiles");
      if (t0 == stages.t_begin) {  // the first group
        stages.fetch(inputs, lines, slots, t0);
        copy_async_commit();
      }
      const int g0 = stages.group_of(t0);
      if (t0 == g0) {
        // The copies go into the stage this thread last read a tile ago, with
        // the line barriers of a tile in between; but for the second tile,
        // when a group is one tile, only the first tile's reads precede them.
        if (t0 == stages.t_begin + K) __syncthreads();
        if (g0 + GK < stages.t_end) stages.fetch(inputs, lines, slots, g0 + GK);
        copy_async_commit();
        copy_async_wait<1>();
      }
      const int stage = stages.stage_of(g0);
      const scalar_t* const staged[5] = {stages.segment(stage, 0, 0), stages.segment(stage, 1, 0),
                                         stages.segment(stage, 2, 0), stages.segment(stage, 3, 0),
                                         stages.segment(stage, 4, 0)};
#pragma unroll
      for (int r = 0; r < RPT; ++r) {
        const int row = slots.pos[r];  // a dead slot reads row 0: valid, unused
        load_column_tile<K, 5, true>(staged, stages.template tile_offset<K>(t0, g0, row, ascending), ascending,
                                     assign(r));
      }
      return;
    }
    if (K > 1 && line_vectors) {  // uniform over the block
      const int low = lines.offset(ascending ? t0 : t0 + K - 1);
#pragma unroll
      for (int r = 0; r < RPT; ++r) load_column_tile<K>(inputs, low + slots.offset[r], ascending, assign(r));
      return;
    }
  }
#pragma unroll
  for (int s = 0; s < K; ++s) {
    const int line = lines.offset(t0 + s < t_last ? t0 + s : t_last);
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
      const int o = line + slots.offset[r];
#pragma unroll
      for (int j = 0; j < CH; ++j) {
        load_positions<V>(xp[j] + o, tile[s][r].x[j]);
        load_positions<V>(lp[j] + o, tile[s][r].lam[j]);
      }
      load_positions<V>(g0p + o, tile[s][r].g0);
      load_positions<V>(g1p + o, tile[s][r].g1);
      load_positions<V>(g2p + o, tile[s][r].g2);
    }
  }
}

// Gates of position v of a slot in acc_t, normalised from logits when NORM
// (signed_sum: normalize_taps', for the backward's chain rule; unset without NORM).
template <typename acc_t, bool NORM, typename scalar_t, int V>
__device__ inline void slot_gates(const Stored<scalar_t, V>& l0, const Stored<scalar_t, V>& l1,
                                  const Stored<scalar_t, V>& l2, int v, bool has_before, bool has_after, acc_t& g0,
                                  acc_t& g1, acc_t& g2, acc_t& signed_sum) {
  g0 = l0.template at<acc_t>(v);
  g1 = l1.template at<acc_t>(v);
  g2 = l2.template at<acc_t>(v);
  if (NORM) normalize_taps<acc_t>(g0, g1, g2, has_before, has_after, g0, g1, g2, signed_sum);
}

// One position's forward step, everything that does not depend on the
// previous line already computed: h = lx + g0 * h[p-1] + g1 * h[p] + g2 * h[p+1]
// (lx of each of the block's CH channels, which share the gates).
template <typename acc_t, int CH = 1>
struct ForwardStep {
  acc_t lx[CH], g0, g1, g2;
};

// Split lines (SPLIT, LineWindow), where a halo refill is due (`due`,
// uniform over the cluster: its blocks scan the same lines): every block of
// the cluster has written the latest line into ROWS rows (row k at
// mine + k * pitch, position p of the window at index p); each block copies
// its halo positions of those rows from its neighbours' segments, the same
// rows in their shared memory, and its threads see them after a block barrier.
template <bool SPLIT, int ROWS, int RPT, int V, typename acc_t>
__device__ inline void refill_halo(bool due, acc_t* mine, const ThreadSlots<RPT, V>& slots, const LineWindow& window,
                                   int line_length, int segments, int rank, int pitch) {
  if constexpr (SPLIT) {
    if (!due) return;
    cluster_sync();
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
      const int p = window.first + slots.pos[r];  // the slot's first position in the line
      if (!slots.live[r] || window.owns(p)) continue;
      const int neighbour = p < window.seg_begin ? rank - 1 : rank + 1;
      // Window index i here is the line's position first + i, there i + first - (its first).
      const acc_t* theirs =
          map_shared_rank(mine, neighbour) + (window.first - line_window(line_length, segments, neighbour).first);
#pragma unroll
      for (int k = 0; k < ROWS; ++k) {
#pragma unroll
        for (int v = 0; v < V; ++v) mine[k * pitch + slots.pos[r] + v] = theirs[k * pitch + slots.pos[r] + v];
      }
    }
    __syncthreads();
  }
}

// V = 2: each slot is two neighbouring positions of a row, moved with one
// 2-element vector load per input and one vector store: half the memory
// instructions and their address arithmetic (plan_launch picks it for row
// scans of even lines). SPLIT: the block is block blockIdx.x % segments of
// a cluster that splits each line in `segments` (LineWindow). CH: the block
// scans CH channels of one gate group side by side (pair_channels): each
// tile's gates are loaded and normalised once for all of them, and one
// barrier per line serves them all; each channel has its own rows of the
// hidden state.
template <typename scalar_t, typename acc_t, int RPT, bool NORM, int V, int GK, typename gate_t = scalar_t,
          bool SPLIT = false, int CH = 1>
__global__ void __launch_bounds__(kMaxThreads)
scan_forward_kernel(const scalar_t* __restrict__ x, const void* __restrict__ gates_raw,
                    const scalar_t* __restrict__ lam, scalar_t* __restrict__ out, const ScanProblem pb,
                    const int64_t chunks_per_plane, const bool column_vectors, const int segments) {
  static_assert(!SPLIT || GK == 0, "split lines are not staged");
  static_assert(CH == 1 || (GK == 0 && !SPLIT), "channel pairs are neither staged nor split");
  const gate_t* gates = static_cast<const gate_t*>(gates_raw);
  constexpr int K = forward_tile_lines(RPT * V * tile_channels<scalar_t, V, CH>());
  const int rank = SPLIT ? static_cast<int>(blockIdx.x % segments) : 0;
  const BlockTask task = decode_block<CH>(pb, chunks_per_plane, SPLIT ? blockIdx.x / segments : blockIdx.x);
  const BlockLines lines = block_lines(pb, task);
  // GK > 0: a launch of column scans staged in groups of GK lines
  // (ColumnStages), its own kernels so that the others keep their
  // registers; they ignore column_vectors.
  constexpr bool STAGED = GK > 0;
  const bool line_vectors = column_vectors && lines.columns;
  // Staged tiles of K consecutive columns are stored as one vector per slot
  // too (in the other kernels the K outputs held for it cost 12-16 registers
  // and spills at 8 slots per thread).
  constexpr bool tile_vectors = STAGED;
  if (lines.begin == lines.end) return;  // uniform over the block (over the cluster: one chunk)
  const int L = lines.length, t_begin = lines.begin, t_end = lines.end;
  const LineWindow window = SPLIT ? line_window(L, segments, rank) : LineWindow{0, L, 0, L};
  const int W = window.length;  // positions this block computes per line
  const ThreadSlots<RPT, V> slots(W, lines.pos_stride, window.first, L);

  GSPN_DYNAMIC_SHARED(smem_raw);
  const ColumnStages<scalar_t, 5, GK> stages{
      reinterpret_cast<scalar_t*>(smem_raw + column_stages_offset(2, L, sizeof(acc_t))), L, t_begin, t_end};
  // Rows of the hidden state (two per channel; split: kSplitRing, all
  // blocks of a cluster alike), each padded by one zero on both sides; row j
  // of channel i starts at smem + (i * ring + j) * pitch + 1 (computed, not
  // indexed from an array, so nothing goes to local memory).
  constexpr int ring = SPLIT ? kSplitRing : 2;
  const int pitch = (SPLIT ? split_window_length(L, segments) : L) + 2;
  const int channel_rows = ring * pitch;  // one channel's rows
  // Slots whose previous-line neighbours a line reads at once (below): all,
  // up to 32 bytes of inputs' values per thread (16 in 16-bit, 8 in fp32);
  // with more some kernels spilled (SASS), so one slot at a time.
  constexpr int kAroundSlots = RPT * CH * (V + 2) * sizeof(scalar_t) <= 32 ? RPT : 1;

  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  if (threadIdx.x < ring * CH) smem[threadIdx.x * pitch] = smem[threadIdx.x * pitch + W + 1] = acc_t(0);

  const scalar_t *xp[CH], *lp[CH];
  scalar_t* op[CH];
#pragma unroll
  for (int j = 0; j < CH; ++j) {
    xp[j] = opaque(x + pb.x_plane(task.b, task.d, task.c + j));
    lp[j] = opaque(lam + pb.lam_plane(task.b, task.d, task.c + j));
    op[j] = opaque(out + pb.out_plane(task.b, task.d, task.c + j));
  }
  const gate_t* g0p = gates + pb.gate_plane(task.b, task.d, task.c / pb.channels_per_group(), 0);
  const gate_t *g1p = opaque(g0p + pb.plane()), *g2p = opaque(g0p + 2 * pb.plane());
  g0p = opaque(g0p);

  // Software pipeline: the next tile's loads are issued before this tile's
  // lines are computed, so memory latency overlaps the recurrence. A tile's
  // gates are normalised and lam * x formed for all its K * RPT slots before
  // its first line: independent work that then overlaps, where computed inside
  // the line loop it sat on the per-line critical path between barriers.
  ForwardSlot<scalar_t, V, gate_t, CH> next[K][RPT];
  load_forward_tile(next, xp, lp, g0p, g1p, g2p, lines, slots, t_begin, t_end - 1, line_vectors, stages);
  for (int t0 = t_begin; t0 < t_end; t0 += K) {
    ForwardStep<acc_t, CH> step[K][RPT][V];
#pragma unroll
    for (int s = 0; s < K; ++s) {
#pragma unroll
      for (int r = 0; r < RPT; ++r) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const ForwardSlot<scalar_t, V, gate_t, CH>& in = next[s][r];
          ForwardStep<acc_t, CH>& st = step[s][r][v];
          acc_t unused_sum;
          slot_gates<acc_t, NORM>(in.g0, in.g1, in.g2, v, slots.before(r, v), slots.after(r, v), st.g0, st.g1, st.g2,
                                  unused_sum);
#pragma unroll
          for (int j = 0; j < CH; ++j) st.lx[j] = in.lam[j].template at<acc_t>(v) * in.x[j].template at<acc_t>(v);
        }
      }
    }
    if (t0 + K < t_end) {
      load_forward_tile(next, xp, lp, g0p, g1p, g2p, lines, slots, t0 + K, t_end - 1, line_vectors, stages);
    }
    scalar_t tile_h[K][RPT];  // tile_vectors: the tile's output, stored after its lines
#pragma unroll
    for (int s = 0; s < K; ++s) {
      const int t = t0 + s;
      if (t >= t_end) break;  // uniform over the block
      acc_t* row = smem + (t & (ring - 1)) * pitch + 1;
      const acc_t* prev = smem + ((t - 1) & (ring - 1)) * pitch;  // prev[p + k] is position p - 1 + k
      const int line = lines.offset(t);
      const bool first = t == t_begin;
      // The previous line around a group of slots (all of them where their
      // values fit the registers), read before the group's first store: read
      // between the stores (as the compiler must: row and prev may alias for
      // all it knows), each position waited for a shared-memory round trip
      // of its own, in turn (SASS: 6 loads in two rounds per line at 2
      // positions per thread, where 4 in one do).
#pragma unroll
      for (int r0 = 0; r0 < RPT; r0 += kAroundSlots) {
        acc_t around[kAroundSlots][CH][V + 2];  // positions pos - 1 .. pos + V
#pragma unroll
        for (int q = 0; q < kAroundSlots; ++q) {
#pragma unroll
          for (int j = 0; j < CH; ++j) {
#pragma unroll
            for (int i = 0; i < V + 2; ++i) {
              around[q][j][i] = prev[j * channel_rows + slots.pos[r0 + q] + i];
            }
          }
        }
#pragma unroll
        for (int q = 0; q < kAroundSlots; ++q) {
          const int r = r0 + q;
          if (!slots.live[r]) continue;  // with V = 2 lines are even: both positions of a live slot are live
#pragma unroll
          for (int j = 0; j < CH; ++j) {
            acc_t h[V];
#pragma unroll
            for (int v = 0; v < V; ++v) {
              const ForwardStep<acc_t, CH>& st = step[s][r][v];
              h[v] = first ? st.lx[j] : propagate(st.lx[j], st.g0, st.g1, st.g2, around[q][j] + v);
              row[j * channel_rows + slots.pos[r] + v] = h[v];
            }
            if constexpr (tile_vectors) tile_h[s][r] = static_cast<scalar_t>(h[0]);  // CH = 1
            else if (!SPLIT || window.owns(window.first + slots.pos[r]))  // segments hold whole slots
              store_positions<V>(op[j] + (line + slots.offset[r]), h);
          }
        }
      }
      __syncthreads();
      // every kSplitHalo lines, not after the last
      const bool due = ((t - t_begin) & (kSplitHalo - 1)) == kSplitHalo - 1 && t + 1 < t_end;
      refill_halo<SPLIT, 1>(due, row, slots, window, L, segments, rank, pitch);
    }
    if constexpr (tile_vectors) {  // tiles are whole
      const bool ascending = lines.line_stride > 0;
      store_column_tile<K>(op[0], lines.offset(ascending ? t0 : t0 + K - 1), slots.offset, slots.live, tile_h,
                           ascending);
    }
  }
  // A block's shared memory goes with it: none may leave while a neighbour
  // may still copy its last refill's halo from it.
  if constexpr (SPLIT) cluster_sync();
}

// The backward's inputs at one slot's V positions; hprev is h[t-1] there.
// CH: channels of one gate group per block, as in the forward.
template <typename scalar_t, int V, typename gate_t = scalar_t, int CH = 1>
struct BackwardSlot {
  Stored<scalar_t, V> go[CH], x[CH], lam[CH];
  Stored<gate_t, V> g0, g1, g2;
  Stored<scalar_t, V> hprev[CH];
};

// Lines t0 .. t0 + K - 1 of the backward's inputs, clipped to t_last as in
// the forward. The chunk's first line has no previous line: it reads its own
// h for hprev (valid, unused). line_vectors and staging as in the forward
// (the host found the tiles aligned, and then every tile is whole), for the
// six inputs of line t itself; hprev is one line off that alignment:
// line_vectors loads it per line; staged (GK > 0), h's groups are staged too
// and hprev comes from the group of line t, except at the group's first
// line, whose previous line is in the group after it in the backward's
// order: one load from global memory per group. Tiles run from the chunk's
// end backwards, so a group's first tile here is its last in line order.
template <typename scalar_t, int RPT, int V, int K, int GK, typename gate_t, int CH>
__device__ inline void load_backward_tile(BackwardSlot<scalar_t, V, gate_t, CH> (&tile)[K][RPT],
                                          const scalar_t* const (&ghp)[CH], const scalar_t* const (&hp)[CH],
                                          const scalar_t* const (&xp)[CH], const scalar_t* const (&lp)[CH],
                                          const gate_t* g0p, const gate_t* g1p, const gate_t* g2p,
                                          const BlockLines& lines, const ThreadSlots<RPT, V>& slots, int t0,
                                          int t_last, int t_begin, bool line_vectors,
                                          const ColumnStages<scalar_t, 7, GK>& stages) {
  static_assert(GK == 0 || std::is_same_v<gate_t, scalar_t>, "staged kernels take gates of the inputs' type");
  if constexpr (V == 1 && std::is_same_v<gate_t, scalar_t> && CH == 1) {
    auto assign = [&](int r) {
      return [&, r](int s, const scalar_t(&v)[6]) {
        BackwardSlot<scalar_t, V, gate_t>& in = tile[s][r];
        in.go[0].v[0] = v[0];
        in.x[0].v[0] = v[1];
        in.lam[0].v[0] = v[2];
        in.g0.v[0] = v[3];
        in.g1.v[0] = v[4];
        in.g2.v[0] = v[5];
      };
    };
    auto hprev_from_global = [&](int r, int t, Stored<scalar_t, V>& out) {
      load_positions<V>(hp[0] + (lines.offset(t > t_begin ? t - 1 : t) + slots.offset[r]), out);
    };
    const bool ascending = lines.line_stride > 0;
    const scalar_t* const inputs[6] = {ghp[0], xp[0], lp[0], g0p, g1p, g2p};
    if constexpr (GK > 0) {
      static_assert(GK % K == 0, "a staged group holds whole tiles");
      const scalar_t* const copied[7] = {ghp[0], xp[0], lp[0], g0p, g1p, g2p, hp[0]};
      const int g0 = stages.group_of(t0);
      if (t0 + K == stages.t_end) {  // the first tile: the last group
        stages.fetch(copied, lines, slots, g0);
        copy_async_commit();
      }
      if (t0 + K == g0 + GK) {
        if (t0 + 2 * K == stages.t_end) __syncthreads();  // as in the forward
        if (g0 > stages.t_begin) stages.fetch(copied, lines, slots, g0 - GK);
        copy_async_commit();
        copy_async_wait<1>();
      }
      const int stage = stages.stage_of(g0);
      const scalar_t* const staged[6] = {stages.segment(stage, 0, 0), stages.segment(stage, 1, 0),
                                         stages.segment(stage, 2, 0), stages.segment(stage, 3, 0),
                                         stages.segment(stage, 4, 0), stages.segment(stage, 5, 0)};
#pragma unroll
      for (int r = 0; r < RPT; ++r) {
        const int row = slots.pos[r];  // a dead slot reads row 0: valid, unused
        load_column_tile<K, 6, true>(staged, stages.template tile_offset<K>(t0, g0, row, ascending), ascending,
                                     assign(r));
        const scalar_t* h_row = stages.segment(stage, 6, row);
#pragma unroll
        for (int s = 0; s < K; ++s) {
          const int before = t0 + s - 1 - g0;  // line t - 1 in the group
          if (before >= 0) tile[s][r].hprev[0].v[0] = h_row[ascending ? before : GK - 1 - before];
          else hprev_from_global(r, t0 + s, tile[s][r].hprev[0]);
        }
      }
      return;
    }
    if (K > 1 && line_vectors) {  // uniform over the block
      const int low = lines.offset(ascending ? t0 : t0 + K - 1);
#pragma unroll
      for (int r = 0; r < RPT; ++r) {
        load_column_tile<K>(inputs, low + slots.offset[r], ascending, assign(r));
#pragma unroll
        for (int s = 0; s < K; ++s) hprev_from_global(r, t0 + s, tile[s][r].hprev[0]);
      }
      return;
    }
  }
#pragma unroll
  for (int s = 0; s < K; ++s) {
    const int t = t0 + s < t_last ? t0 + s : t_last;
    const int line = lines.offset(t);
    const int prev_line = t > t_begin ? lines.offset(t - 1) : line;
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
      const int o = line + slots.offset[r];
#pragma unroll
      for (int j = 0; j < CH; ++j) {
        load_positions<V>(ghp[j] + o, tile[s][r].go[j]);
        load_positions<V>(xp[j] + o, tile[s][r].x[j]);
        load_positions<V>(lp[j] + o, tile[s][r].lam[j]);
        load_positions<V>(hp[j] + (prev_line + slots.offset[r]), tile[s][r].hprev[j]);
      }
      load_positions<V>(g0p + o, tile[s][r].g0);
      load_positions<V>(g1p + o, tile[s][r].g1);
      load_positions<V>(g2p + o, tile[s][r].g2);
    }
  }
}

// One position's backward inputs with its gates already in acc_t (normalised
// when NORM, with normalize_taps' signed sum for the chain rule), ready for
// the line loop. The other inputs stay 16-bit (split from their pairs): kept
// as pairs, or in float, the backward at 8 positions per thread spilled.
template <typename scalar_t, typename acc_t, int CH = 1>
struct BackwardStep {
  scalar_t go[CH], x[CH], lam[CH], hprev[CH];
  acc_t g0, g1, g2, signed_sum;
};

// The adjoint scan of one chunk, lines in reverse. Shared memory holds, for the
// line processed last (t+1), v_k = g_k * a for k = 0..2, and for the current
// line the forward state h[t-1] whose neighbours the gate gradients read.
// ATOMIC: several channels share a gate group and add into an fp32 buffer.
// V = 2: two neighbouring positions per slot, as in the forward.
// gate_t: as in the forward; per-channel gates' gradients are stored in it.
// SPLIT: lines split across a cluster as in the forward (LineWindow): the
// adjoint spreads one position per line as the hidden state does, so each
// block computes its window and every kSplitHalo lines copies the v_k of
// its halo from its neighbours' rows (refill_halo, three rows); h[t-1] comes
// from memory at every window position, so only the window's own edge
// positions (never stored) read an unknown neighbour there.
// CH: CH channels of one (shared) gate group side by side, as in the
// forward; their gate gradients are summed in registers before the one
// atomic add per tap, CH times fewer adds into the buffer that every
// channel of the group adds into.
template <typename scalar_t, typename acc_t, int RPT, bool NORM, bool ATOMIC, int V, int GK,
          typename gate_t = scalar_t, bool SPLIT = false, int CH = 1>
__global__ void __launch_bounds__(kMaxThreads)
scan_backward_kernel(const scalar_t* __restrict__ grad_h, const scalar_t* __restrict__ h,
                     const scalar_t* __restrict__ x, const void* __restrict__ gates_raw,
                     const scalar_t* __restrict__ lam, scalar_t* __restrict__ dx,
                     void* __restrict__ dgates_raw, scalar_t* __restrict__ dlam, const ScanProblem pb,
                     const int64_t chunks_per_plane, const bool column_vectors, const int segments) {
  static_assert(!SPLIT || GK == 0, "split lines are not staged");
  static_assert(CH == 1 || (ATOMIC && GK == 0 && !SPLIT), "channel pairs share a gate group, neither staged nor split");
  using dg_t = typename std::conditional<ATOMIC, acc_t, gate_t>::type;
  const gate_t* gates = static_cast<const gate_t*>(gates_raw);
  constexpr int K = backward_tile_lines(RPT * V * tile_channels<scalar_t, V, CH>());
  const int rank = SPLIT ? static_cast<int>(blockIdx.x % segments) : 0;
  const BlockTask task = decode_block<CH>(pb, chunks_per_plane, SPLIT ? blockIdx.x / segments : blockIdx.x);
  const BlockLines lines = block_lines(pb, task);
  // GK > 0: staged, as in the forward.
  constexpr bool STAGED = GK > 0;
  const bool line_vectors = column_vectors && lines.columns;
  // Staged tiles store dx and dlam as one vector per slot, as the forward h,
  // and the gate gradients too (the shared groups' as vector reductions)
  // where their 3 K outputs per slot fit the registers: in fp32 at 2 slots
  // per thread they made the kernel spill (SASS, sm_90).
  constexpr bool tile_vectors = STAGED;
  constexpr bool gate_tiles = STAGED && (RPT == 1 || sizeof(scalar_t) <= 2);
  if (lines.begin == lines.end) return;  // uniform over the block (over the cluster: one chunk)
  const int L = lines.length, t_begin = lines.begin, t_end = lines.end;
  const LineWindow window = SPLIT ? line_window(L, segments, rank) : LineWindow{0, L, 0, L};
  const int W = window.length;  // positions this block computes per line
  const ThreadSlots<RPT, V> slots(W, lines.pos_stride, window.first, L);
  // Whether slot r's positions are the block's to store (split: its segment; segments hold whole slots).
  auto in_segment = [&](int r) { return window.owns(window.first + slots.pos[r]); };

  GSPN_DYNAMIC_SHARED(smem_raw);
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);
  constexpr int ring = SPLIT ? kSplitRing : 2;  // lines of v_k kept
  const int pitch = (SPLIT ? split_window_length(L, segments) : L) + 2;
  const ColumnStages<scalar_t, 7, GK> stages{
      reinterpret_cast<scalar_t*>(smem_raw + column_stages_offset(8, L, sizeof(acc_t))), L, t_begin, t_end};
  // 3 ring + 2 padded rows per channel (8 unsplit): v_k of line t at row
  // 3 (t % ring) + k, h[t-1] of parity j at row 3 ring + j; channel i's
  // rows follow channel i - 1's. Position p of a row is at row * pitch + 1 + p.
  const int channel_rows = (3 * ring + 2) * pitch;
  for (int i = threadIdx.x; i < (3 * ring + 2) * CH; i += blockDim.x) {
    smem[i * pitch] = acc_t(0);
    smem[i * pitch + W + 1] = acc_t(0);
  }
  __syncthreads();

  const scalar_t *ghp[CH], *hp[CH], *xp[CH], *lp[CH];
  scalar_t *dxp[CH], *dlp[CH];
#pragma unroll
  for (int j = 0; j < CH; ++j) {
    const int64_t plane_out = pb.out_plane(task.b, task.d, task.c + j);
    ghp[j] = opaque(grad_h + plane_out);
    hp[j] = opaque(h + plane_out);
    xp[j] = opaque(x + pb.x_plane(task.b, task.d, task.c + j));
    lp[j] = opaque(lam + pb.lam_plane(task.b, task.d, task.c + j));
    dxp[j] = opaque(dx + plane_out);
    dlp[j] = opaque(dlam + plane_out);
  }
  const int64_t plane = pb.plane();
  const int64_t tap_offset = pb.gate_plane(task.b, task.d, task.c / pb.channels_per_group(), 0);
  const gate_t *g0p = opaque(gates + tap_offset), *g1p = opaque(gates + tap_offset + plane),
               *g2p = opaque(gates + tap_offset + 2 * plane);
  dg_t* dg_base = static_cast<dg_t*>(dgates_raw) + tap_offset;
  dg_t *dg0 = opaque(dg_base), *dg1 = opaque(dg_base + plane), *dg2 = opaque(dg_base + 2 * plane);

  // Tiles of K lines from the chunk's end backwards: [t0, t_hi) clipped to
  // the chunk. The next (earlier) tile's loads fly while this one is
  // computed; a tile's gates are prepared for all its slots before its first
  // line, as in the forward.
  auto tile_start = [&](int t_hi) { return t_hi - K > t_begin ? t_hi - K : t_begin; };
  BackwardSlot<scalar_t, V, gate_t, CH> next[K][RPT];
  load_backward_tile(next, ghp, hp, xp, lp, g0p, g1p, g2p, lines, slots, tile_start(t_end), t_end - 1, t_begin,
                     line_vectors, stages);
  for (int t_hi = t_end; t_hi > t_begin; t_hi -= K) {
    const int t0 = tile_start(t_hi);
    BackwardStep<scalar_t, acc_t, CH> step[K][RPT][V];
#pragma unroll
    for (int s = 0; s < K; ++s) {
#pragma unroll
      for (int r = 0; r < RPT; ++r) {
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const BackwardSlot<scalar_t, V, gate_t, CH>& in = next[s][r];
          BackwardStep<scalar_t, acc_t, CH>& st = step[s][r][v];
#pragma unroll
          for (int j = 0; j < CH; ++j) {
            st.go[j] = in.go[j].element(v);
            st.x[j] = in.x[j].element(v);
            st.lam[j] = in.lam[j].element(v);
            st.hprev[j] = in.hprev[j].element(v);
          }
          slot_gates<acc_t, NORM>(in.g0, in.g1, in.g2, v, slots.before(r, v), slots.after(r, v), st.g0, st.g1, st.g2,
                                  st.signed_sum);
        }
      }
    }
    if (t0 > t_begin) {
      load_backward_tile(next, ghp, hp, xp, lp, g0p, g1p, g2p, lines, slots, tile_start(t0), t0 - 1, t_begin,
                         line_vectors, stages);
    }
    // tile_vectors: stored (the shared groups' gate gradients added) after the tile's lines
    scalar_t tile_dx[K][RPT], tile_dlam[K][RPT];
    dg_t tile_dg[3][K][RPT];
#pragma unroll
    for (int s = K - 1; s >= 0; --s) {
      const int t = t0 + s;
      if (t >= t_hi) continue;  // uniform over the block
      // Channel 0's rows; channel j's at + j * channel_rows.
      acc_t* vc = smem + 3 * (t & (ring - 1)) * pitch + 1;  // v_k of this line at vc + k * pitch
      const acc_t* vn = smem + 3 * ((t + 1) & (ring - 1)) * pitch + 1;  // v_k of line t + 1
      acc_t* hcur = smem + (3 * ring + (t & 1)) * pitch + 1;
      const int line = lines.offset(t);
      const bool last = t == t_end - 1;
      // The line before a chunk's first counts as zero, so its gates' (or
      // logits') gradients a * h[t-1] come out zero through the same code.
      const bool first = t == t_begin;
      acc_t adj[RPT][CH][V];
#pragma unroll
      for (int r = 0; r < RPT; ++r) {
        if (!slots.live[r]) continue;  // with V = 2 lines are even: both positions of a live slot are live
        const int o = line + slots.offset[r];
        // What line t + 1 sends back to the slot's positions, read before
        // its first store, as the forward reads its previous line (SASS: at
        // 2 positions per slot two rounds of loads per line, where one does;
        // all slots at once spilled in some kernels).
#pragma unroll
        for (int j = 0; j < CH; ++j) {
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const int p = j * channel_rows + slots.pos[r] + v;
            adj[r][j][v] = last ? acc_t(0) : gather_adjoint(vn + p, vn + pitch + p, vn + 2 * pitch + p);
          }
        }
#pragma unroll
        for (int j = 0; j < CH; ++j) {
          acc_t dx_v[V], dlam_v[V];
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const int p = j * channel_rows + slots.pos[r] + v;
            const BackwardStep<scalar_t, acc_t, CH>& st = step[s][r][v];
            const acc_t a = static_cast<acc_t>(st.go[j]) + adj[r][j][v];
            adj[r][j][v] = a;
            dx_v[v] = static_cast<acc_t>(st.lam[j]) * a;
            dlam_v[v] = static_cast<acc_t>(st.x[j]) * a;
            vc[p] = st.g0 * a;
            vc[pitch + p] = st.g1 * a;
            vc[2 * pitch + p] = st.g2 * a;
            hcur[p] = first ? acc_t(0) : static_cast<acc_t>(st.hprev[j]);
          }
          if constexpr (tile_vectors) {  // CH = 1
            tile_dx[s][r] = static_cast<scalar_t>(dx_v[0]);
            tile_dlam[s][r] = static_cast<scalar_t>(dlam_v[0]);
          } else if (!SPLIT || in_segment(r)) {
            store_positions<V>(dxp[j] + o, dx_v);
            store_positions<V>(dlp[j] + o, dlam_v);
          }
        }
      }
      __syncthreads();
#pragma unroll
      for (int r = 0; r < RPT; ++r) {
        if (!slots.live[r] || (SPLIT && !in_segment(r))) continue;
        const int o = line + slots.offset[r];
        acc_t d0[V], d1[V], d2[V];
#pragma unroll
        for (int v = 0; v < V; ++v) {
          const int p = slots.pos[r] + v;
          // The gates' gradients are a * h[t-1] at the three neighbours: with
          // one channel the adjoint a times h's, with several the sum over
          // the channels of a * h's, times 1 (the chain rule is linear in them).
          acc_t a, h0, h1, h2;
          if constexpr (CH == 1) {
            a = adj[r][0][v];
            h0 = hcur[p - 1], h1 = hcur[p], h2 = hcur[p + 1];
          } else {
            a = acc_t(1), h0 = h1 = h2 = acc_t(0);
#pragma unroll
            for (int j = 0; j < CH; ++j) {
              const acc_t* hj = hcur + j * channel_rows + p;
              h0 += adj[r][j][v] * hj[-1];
              h1 += adj[r][j][v] * hj[0];
              h2 += adj[r][j][v] * hj[1];
            }
          }
          if constexpr (NORM) {  // the logits' gradients, written in place of the gates'
            const BackwardStep<scalar_t, acc_t, CH>& st = step[s][r][v];
            normalize_taps_backward_of_scan(st.g0, st.g1, st.g2, st.signed_sum, a, h0, h1, h2, d0[v], d1[v], d2[v]);
          } else {
            d0[v] = a * h0;
            d1[v] = a * h1;
            d2[v] = a * h2;
          }
        }
        if constexpr (gate_tiles) {
          tile_dg[0][s][r] = static_cast<dg_t>(d0[0]);
          tile_dg[1][s][r] = static_cast<dg_t>(d1[0]);
          tile_dg[2][s][r] = static_cast<dg_t>(d2[0]);
        } else if constexpr (ATOMIC) {
          if (!first) {  // zeros: no need to add them; a pair as one vector reduction (sm_90)
            add_consecutive<V>(dg0 + o, d0);
            add_consecutive<V>(dg1 + o, d1);
            add_consecutive<V>(dg2 + o, d2);
          }
        } else {
          store_positions<V>(dg0 + o, d0);
          store_positions<V>(dg1 + o, d1);
          store_positions<V>(dg2 + o, d2);
        }
      }
      // Lines run backwards: every kSplitHalo lines from the chunk's end, not after its first line.
      const bool due = ((t_end - 1 - t) & (kSplitHalo - 1)) == kSplitHalo - 1 && t > t_begin;
      refill_halo<SPLIT, 3>(due, vc, slots, window, L, segments, rank, pitch);
    }
    if constexpr (tile_vectors) {  // tiles are whole
      const bool ascending = lines.line_stride > 0;
      const int low = lines.offset(ascending ? t0 : t0 + K - 1);
      store_column_tile<K>(dxp[0], low, slots.offset, slots.live, tile_dx, ascending);
      store_column_tile<K>(dlp[0], low, slots.offset, slots.live, tile_dlam, ascending);
      if constexpr (gate_tiles) {
        store_column_tile<K, ATOMIC>(dg0, low, slots.offset, slots.live, tile_dg[0], ascending);
        store_column_tile<K, ATOMIC>(dg1, low, slots.offset, slots.live, tile_dg[1], ascending);
        store_column_tile<K, ATOMIC>(dg2, low, slots.offset, slots.live, tile_dg[2], ascending);
      }
    }
  }
  if constexpr (SPLIT) cluster_sync();  // as in the forward: neighbours may still read this block's rows
}

// Launch geometry shared by both passes.
struct Launch {
  int64_t chunks_per_plane;
  int64_t blocks;
  int threads;
  int rows_per_thread;  // slots per thread
  int64_t max_length;   // positions of a block's line (split: of its window)
  int positions_per_slot;
  int segments = 1;     // blocks per line (split_lines), a cluster
  int channels = 1;     // channels per block (pair_channels)

  int64_t slots() const { return (max_length + positions_per_slot - 1) / positions_per_slot; }
  // Threads of a block: the line's slots at rows_per_thread each, in whole warps.
  int threads_needed() const {
    const int64_t per_thread = (slots() + rows_per_thread - 1) / rows_per_thread;
    return static_cast<int>(std::min<int64_t>(kMaxThreads, ((per_thread + 31) / 32) * 32));
  }
};

// Whether every plane of the tensors starts on an n-element boundary, given
// rows of a multiple of n elements (so the planes' sizes are multiples of n).
bool planes_aligned(const ScanProblem& pb, std::initializer_list<const at::Tensor*> tensors, int64_t n) {
  for (const at::Tensor* t : tensors) {
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % (n * t->element_size()) != 0) return false;
  }
  return pb.x_batch_stride % n == 0 && pb.x_dir_stride % n == 0 && pb.lam_batch_stride % n == 0 &&
         pb.lam_dir_stride % n == 0;
}

// Whether a launch can run two neighbouring positions per slot (one vector
// load per input): only row scans ("tb", "bt": neighbours are adjacent in
// memory), of even rows, from planes starting on 2-element boundaries.
bool pairs_fit(const ScanProblem& pb, std::initializer_list<const at::Tensor*> tensors) {
  for (int64_t d = 0; d < pb.D; ++d) {
    if (pb.dirs[d] != kTopBottom && pb.dirs[d] != kBottomTop) return false;
  }
  return pb.W % 2 == 0 && planes_aligned(pb, tensors, 2);
}

// Whether column scans ("lr", "rl") can load a tile's K lines,
// K consecutive columns of a row, as one vector per input: every tile must
// start K-aligned from the plane's left edge, so rows of a multiple of K,
// chunks of a multiple of K lines (or one chunk), and K-aligned planes.
bool column_vectors_fit(const ScanProblem& pb, std::initializer_list<const at::Tensor*> tensors, int K) {
  if (K <= 1 || pb.W % K != 0) return false;
  if (chunk_length(pb.chunk, pb.W) % K != 0) return false;
  return planes_aligned(pb, tensors, K);
}

// Dynamic shared memory of a block: `rows` padded rows of the hidden state
// in acc_t, then, for column scans staged in groups of GK lines (GK > 0),
// two stages of the N inputs' groups.
template <typename scalar_t>
size_t shared_bytes(int rows, int64_t length, int GK, int N) {
  using acc_t = at::opmath_type<scalar_t>;
  if (GK == 0) return rows * (length + 2) * sizeof(acc_t);
  return column_stages_offset(rows, length, sizeof(acc_t)) + 2 * N * length * GK * sizeof(scalar_t);
}

int max_shared_bytes() {
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return limit;
}

// Lines per group in which the staged kernels can run pb's column scans, as
// far as its shape goes (0: they cannot): every direction a column scan;
// wide groups where two stages of their N inputs (5 forward, 7 backward)
// fit a block's shared memory beside the hidden rows (lines up to ~1400
// positions forward, ~900 backward on an H100), else narrow ones for lines
// that take the most positions per thread (plan_launch: over half the
// thread limit), so that their tiles fit a group; rows, chunks and strides
// of whole groups. The tensors' alignment is columns_staged_fit's.
template <typename scalar_t>
int staged_group(const ScanProblem& pb, bool backward) {
  for (int64_t d = 0; d < pb.D; ++d) {
    if (pb.dirs[d] != kLeftRight && pb.dirs[d] != kRightLeft) return 0;
  }
  const int most = backward ? kMaxStagedBackwardRows : kMaxStagedRows;
  if (pb.H > int64_t(kMaxThreads) * most) return 0;
  const int rows = backward ? 8 : 2, inputs = backward ? 7 : 5;
  const size_t limit = static_cast<size_t>(max_shared_bytes());
  int group = wide_group_lines<scalar_t>();
  if (shared_bytes<scalar_t>(rows, pb.H, group, inputs) > limit) {
    group = narrow_group_lines<scalar_t>();
    if (pb.H <= int64_t(kMaxThreads) * (most / 2) || shared_bytes<scalar_t>(rows, pb.H, group, inputs) > limit) {
      return 0;
    }
  }
  return column_vectors_fit(pb, {}, group) ? group : 0;
}

Launch plan_launch(const ScanProblem& pb, bool pairs = false) {
  Launch plan{1, 0, 32, 1, 1, pairs ? 2 : 1};
  for (int64_t d = 0; d < pb.D; ++d) {
    const LineGeometry geo = line_geometry(pb.dirs[d], pb.H, pb.W);
    const int64_t clen = chunk_length(pb.chunk, geo.lines);
    plan.chunks_per_plane = std::max(plan.chunks_per_plane, (geo.lines + clen - 1) / clen);
    plan.max_length = std::max(plan.max_length, geo.length);
  }
  TORCH_CHECK(pb.plane() < (int64_t(1) << 31), "gspn::scan (CUDA): a ", pb.H, "x", pb.W, " plane has ",
              pb.plane(), " elements; the kernels address within one plane in 32 bits (2^31 elements): "
              "split the image");
  TORCH_CHECK(plan.max_length <= kMaxLineLength, "gspn::scan (CUDA): lines of ", plan.max_length,
              " positions exceed the kernel's limit of ", kMaxLineLength, "; split the image");
  while (static_cast<int64_t>(plan.rows_per_thread) * kMaxThreads < plan.slots()) plan.rows_per_thread *= 2;
  plan.threads = plan.threads_needed();
  plan.blocks = pb.B * pb.D * pb.C * plan.chunks_per_plane;
  TORCH_CHECK(plan.blocks < (int64_t(1) << 31), "gspn::scan (CUDA): too many blocks (", plan.blocks, ")");
  return plan;
}

// GSPN_CUDA_PACK=0 turns pack_blocks off (the widest blocks, as before it),
// so a benchmark can time both plans with one build.
bool packing_enabled() {
  const char* value = std::getenv("GSPN_CUDA_PACK");
  return value == nullptr || std::strcmp(value, "0") != 0;
}

int multiprocessors() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return std::max(count, 1);
}

// How many blocks of a launch plan one SM holds, and whether its kernel
// spills registers to local memory.
struct Residency {
  int64_t blocks_per_sm;
  bool spills;
};

// A plane's (or chunk's) lines are one block's sequential work, so a launch
// takes as many rounds of blocks ("waves") as the GPU cannot hold at once,
// each as long as a whole plane: on an H200, 320 planes of 512-thread blocks
// (one block per SM at ~100 registers per thread) ran in 3 waves, each line
// waiting on its block's barrier and memory with nothing else to issue. More
// slots per thread means fewer threads per block and more blocks per SM, the
// same instructions in total: the plan takes the fewest slots per thread that
// need the fewest waves. A GPU that holds every block at once keeps the
// widest blocks (the most threads on each line); a launch of many planes runs
// them side by side instead, whose barriers and memory waits then overlap.
// A candidate whose kernel spills registers to local memory is not taken
// (several fp32 and normalising backward variants at 8 positions per thread
// do), unless the widest blocks' kernel spills too.
// residency(plan): how many blocks of that plan one SM holds (the occupancy
// API) and whether its kernel spills.
// most_rows: the most slots per thread a candidate may take.
template <typename ResidencyOf>
void pack_blocks(Launch& plan, ResidencyOf&& residency, int most_rows = kMaxRowsPerThread) {
  const int64_t sms = multiprocessors();
  if (plan.blocks <= sms || !packing_enabled()) return;
  const Residency widest = residency(plan);
  auto waves = [&](const Launch& candidate, const Residency& r) {
    if (r.blocks_per_sm <= 0 || (r.spills && !widest.spills)) return std::numeric_limits<int64_t>::max();
    return (candidate.blocks + sms * r.blocks_per_sm - 1) / (sms * r.blocks_per_sm);
  };
  const int max_rows = std::min(most_rows, plan.positions_per_slot == 2 ? kMaxRowsPerThread / 2 : kMaxRowsPerThread);
  int64_t fewest = waves(plan, widest);
  for (Launch candidate = plan; fewest > 1 && candidate.rows_per_thread < max_rows && candidate.threads > 32;) {
    candidate.rows_per_thread *= 2;
    candidate.threads = candidate.threads_needed();
    const int64_t w = waves(candidate, residency(candidate));
    if (w < fewest) {
      fewest = w;
      plan = candidate;
    }
  }
}

template <typename Kernel>
void set_shared_memory(Kernel kernel, size_t bytes) {
  const int limit = max_shared_bytes();
  TORCH_CHECK(bytes <= static_cast<size_t>(limit), "gspn::scan (CUDA): lines this long need ", bytes,
              " bytes of shared memory per block; this GPU allows ", limit);
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

// Calls f(RPT, V) with the plan's slots per thread and positions per slot
// as compile-time constants: only the layouts plan_launch makes (RPT 1, 2, 4
// or 8 single positions; pairs need at most 2048 slots, so RPT 1, 2 or 4).
template <typename F>
void with_slot_layout(const Launch& plan, F&& f) {
  using single = std::integral_constant<int, 1>;
  using pair = std::integral_constant<int, 2>;
  if (plan.positions_per_slot == 2) {
    switch (plan.rows_per_thread) {
      case 1: f(std::integral_constant<int, 1>{}, pair{}); break;
      case 2: f(std::integral_constant<int, 2>{}, pair{}); break;
      default: f(std::integral_constant<int, 4>{}, pair{}); break;
    }
    return;
  }
  switch (plan.rows_per_thread) {
    case 1: f(std::integral_constant<int, 1>{}, single{}); break;
    case 2: f(std::integral_constant<int, 2>{}, single{}); break;
    case 4: f(std::integral_constant<int, 4>{}, single{}); break;
    default: f(std::integral_constant<int, 8>{}, single{}); break;
  }
}

template <typename F>
void with_bool(bool value, F&& f) {
  if (value) f(std::true_type{});
  else f(std::false_type{});
}

// Blocks of `plan` one SM holds with kernel (which uses `shared_bytes` of
// dynamic shared memory), and whether the kernel spills to local memory.
// Asked of the runtime once per kernel, block size, shared memory and device
// (the answers do not change; a launch of small planes is over in a few
// microseconds, about what the four queries of a plan cost).
template <typename Kernel>
Residency residency_of(Kernel kernel, const Launch& plan, size_t shared_bytes) {
  using Key = std::tuple<const void*, int, size_t, int>;
  static std::mutex mutex;
  static std::map<Key, Residency> known;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const Key key{reinterpret_cast<const void*>(kernel), plan.threads, shared_bytes, device};
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = known.find(key);
  if (found != known.end()) return found->second;
  set_shared_memory(kernel, shared_bytes);
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, plan.threads, shared_bytes));
  cudaFuncAttributes attributes{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  return known[key] = Residency{blocks, attributes.localSizeBytes > 0};
}

// Calls f(kernel) with the forward kernel of plan's slot layout (group > 0:
// the column kernel staged in groups of that many lines, wide or narrow;
// the plan must be single positions, at most kMaxStagedRows per thread,
// exactly that many for narrow groups). float_gates: 16-bit inputs with
// float gates as given (decayed gates), neither normalised nor staged.
template <typename scalar_t, typename F>
void with_forward_kernel(const Launch& plan, bool normalize, int group, bool float_gates, F&& f) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int wide = wide_group_lines<scalar_t>(), narrow = narrow_group_lines<scalar_t>();
  TORCH_CHECK(!float_gates || (sizeof(scalar_t) == 2 && !normalize && group == 0),
              "gspn::scan (CUDA): float gates go with 16-bit inputs, as given and not staged");
  const bool split = plan.segments > 1;
  TORCH_CHECK(!split || (group == 0 && plan.rows_per_thread <= kMaxSplitRows),
              "gspn::scan (CUDA): split lines are not staged and take at most ", kMaxSplitRows, " slots per thread");
  TORCH_CHECK(plan.channels == 1 || (group == 0 && !split && plan.rows_per_thread <= kMaxPairedRows),
              "gspn::scan (CUDA): channel pairs are neither staged nor split and take at most ", kMaxPairedRows,
              " slots per thread");
  with_slot_layout(plan, [&](auto rpt, auto positions) {
    with_bool(normalize, [&](auto norm) {
      // decay: in a nested generic lambda GCC gives decltype of the outer parameters as references
      constexpr int R = std::decay_t<decltype(rpt)>::value, V = std::decay_t<decltype(positions)>::value;
      constexpr bool N = std::decay_t<decltype(norm)>::value;
      if constexpr (R <= kMaxPairedRows) {
        if (plan.channels == 2) {
          if constexpr (sizeof(scalar_t) == 2 && !N) {
            if (float_gates) return f(scan_forward_kernel<scalar_t, acc_t, R, N, V, 0, float, false, 2>);
          }
          return f(scan_forward_kernel<scalar_t, acc_t, R, N, V, 0, scalar_t, false, 2>);
        }
      }
      if constexpr (R <= kMaxSplitRows) {
        if (split) {
          if constexpr (sizeof(scalar_t) == 2 && !N) {
            if (float_gates) return f(scan_forward_kernel<scalar_t, acc_t, R, N, V, 0, float, true>);
          }
          return f(scan_forward_kernel<scalar_t, acc_t, R, N, V, 0, scalar_t, true>);
        }
      }
      if constexpr (sizeof(scalar_t) == 2 && !N) {
        if (float_gates) return f(scan_forward_kernel<scalar_t, acc_t, R, N, V, 0, float>);
      }
      if constexpr (V == 1 && R <= kMaxStagedRows) {
        if (group == wide) return f(scan_forward_kernel<scalar_t, acc_t, R, N, V, wide>);
      }
      if constexpr (V == 1 && R == kMaxStagedRows) {
        if (group == narrow) return f(scan_forward_kernel<scalar_t, acc_t, R, N, V, narrow>);
      }
      TORCH_CHECK(group == 0, "gspn::scan (CUDA): no kernel staged in groups of ", group, " lines for ", R,
                  " slots of ", V, " positions per thread");
      f(scan_forward_kernel<scalar_t, acc_t, R, N, V, 0>);
    });
  });
}

// Calls f(kernel) with the backward kernel of plan's slot layout (group and
// float_gates as in with_forward_kernel, at most kMaxStagedBackwardRows per
// thread).
template <typename scalar_t, typename F>
void with_backward_kernel(const Launch& plan, bool normalize, bool atomic, int group, bool float_gates, F&& f) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int wide = wide_group_lines<scalar_t>(), narrow = narrow_group_lines<scalar_t>();
  TORCH_CHECK(!float_gates || (sizeof(scalar_t) == 2 && !normalize && group == 0),
              "gspn::scan_backward (CUDA): float gates go with 16-bit inputs, as given and not staged");
  const bool split = plan.segments > 1;
  TORCH_CHECK(!split || (group == 0 && plan.rows_per_thread <= kMaxSplitRows),
              "gspn::scan_backward (CUDA): split lines are not staged and take at most ", kMaxSplitRows,
              " slots per thread");
  TORCH_CHECK(plan.channels == 1 || (atomic && group == 0 && !split && plan.rows_per_thread <= kMaxPairedRows),
              "gspn::scan_backward (CUDA): channel pairs share a gate group, are neither staged nor split and take "
              "at most ", kMaxPairedRows, " slots per thread");
  with_slot_layout(plan, [&](auto rpt, auto positions) {
    with_bool(normalize, [&](auto norm) {
      with_bool(atomic, [&](auto use_atomic) {
        constexpr int R = std::decay_t<decltype(rpt)>::value, V = std::decay_t<decltype(positions)>::value;
        constexpr bool N = std::decay_t<decltype(norm)>::value, A = std::decay_t<decltype(use_atomic)>::value;
        if constexpr (A && R <= kMaxPairedRows) {
          if (plan.channels == 2) {
            if constexpr (sizeof(scalar_t) == 2 && !N) {
              if (float_gates) return f(scan_backward_kernel<scalar_t, acc_t, R, N, A, V, 0, float, false, 2>);
            }
            return f(scan_backward_kernel<scalar_t, acc_t, R, N, A, V, 0, scalar_t, false, 2>);
          }
        }
        if constexpr (R <= kMaxSplitRows) {
          if (split) {
            if constexpr (sizeof(scalar_t) == 2 && !N) {
              if (float_gates) return f(scan_backward_kernel<scalar_t, acc_t, R, N, A, V, 0, float, true>);
            }
            return f(scan_backward_kernel<scalar_t, acc_t, R, N, A, V, 0, scalar_t, true>);
          }
        }
        if constexpr (sizeof(scalar_t) == 2 && !N) {
          if (float_gates) return f(scan_backward_kernel<scalar_t, acc_t, R, N, A, V, 0, float>);
        }
        if constexpr (V == 1 && R <= kMaxStagedBackwardRows) {
          if (group == wide) return f(scan_backward_kernel<scalar_t, acc_t, R, N, A, V, wide>);
        }
        if constexpr (V == 1 && R == kMaxStagedBackwardRows) {
          if (group == narrow) return f(scan_backward_kernel<scalar_t, acc_t, R, N, A, V, narrow>);
        }
        TORCH_CHECK(group == 0, "gspn::scan_backward (CUDA): no kernel staged in groups of ", group, " lines for ",
                    R, " slots of ", V, " positions per thread");
        f(scan_backward_kernel<scalar_t, acc_t, R, N, A, V, 0>);
      });
    });
  });
}

}  // namespace

// Whether a launch's column scans read a tile's K lines as vectors: single
// positions per slot whose tiles align (the staged kernels ignore it).
inline bool column_vectors(const ScanProblem& pb, std::initializer_list<const at::Tensor*> tensors, int K,
                           const Launch& plan) {
  return plan.positions_per_slot == 1 && column_vectors_fit(pb, tensors, K);
}

// Whether the device runs thread block clusters (compute capability 9.0 and
// later) and `kernel` was built for one (a build for older GPUs only would
// run its sm_80 code, which traps at a cluster barrier).
template <typename Kernel>
bool clusters_run(Kernel kernel) {
  int device = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  cudaFuncAttributes attributes{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  return major >= 9 && attributes.binaryVersion >= 90;
}

// Blocks per line for a launch (GSPN_CUDA_SPLIT; 1: not split). Each block
// of a plane (or chunk) scans every line of it, so a launch of fewer planes
// than SMs leaves SMs idle, and one of a few more than a multiple of them
// leaves most SMs idle for its last round: on an H200 a 32-channel scan ran
// on 32 of 132 SMs at 9-20 % of the copy bandwidth, against 60 % for 320
// channels, and each SM processed about one position per cycle however
// many blocks it held (BENCHMARKS.md). Split, `segments` blocks of a cluster
// share each line (LineWindow). Unset, "0" or "1": never (the default until
// a GPU has timed it); "auto": the segments whose busiest SM has the fewest
// positions to compute (split_cost; of this launch's share of the SMs where
// another runs beside it, side_by_side_launches), if at least 10 % fewer than unsplit
// (the margin for the cluster barriers); "2", "4" or "8": that many (or the
// most of fewer that the lines allow). Segments hold at least kSplitHalo
// positions, windows at most kMaxSplitRows slots per thread; not for
// staged column launches, nor on GPUs without clusters (clusters_run).
inline int split_segments(const ScanProblem& pb, const Launch& plan, bool staged) {
  const char* how = std::getenv("GSPN_CUDA_SPLIT");
  if (how == nullptr || std::strcmp(how, "0") == 0 || std::strcmp(how, "1") == 0) return 1;
  const bool automatic = std::strcmp(how, "auto") == 0;
  TORCH_CHECK(automatic || std::strcmp(how, "2") == 0 || std::strcmp(how, "4") == 0 || std::strcmp(how, "8") == 0,
              "GSPN_CUDA_SPLIT=", how, " is not a way to split lines: use \"auto\" (as many blocks per line as "
              "balance the SMs best), \"2\", \"4\" or \"8\", or leave it unset (lines not split)");
  if (staged) return 1;
  int64_t shortest = plan.max_length;
  for (int64_t d = 0; d < pb.D; ++d) shortest = std::min(shortest, line_geometry(pb.dirs[d], pb.H, pb.W).length);
  const int64_t sms = std::max<int64_t>(1, multiprocessors() / side_by_side_launches);  // this launch's share
  const int most_positions = kMaxThreads * kMaxSplitRows * plan.positions_per_slot;
  auto fits = [&](int segments) {
    const int per = split_segment_length(static_cast<int>(shortest), segments);
    if (per < kSplitHalo || int64_t(segments - 1) * per >= shortest) return false;  // short or empty segments
    return split_window_length(static_cast<int>(plan.max_length), segments) <= most_positions;
  };
  if (!automatic) {
    for (int segments = std::atoi(how); segments > 1; segments /= 2) {
      if (fits(segments)) return segments;
    }
    return 1;
  }
  // Positions per line of the busiest SM: its blocks (the launch's spread
  // evenly, rounded up) times a block's window.
  auto split_cost = [&](int segments) {
    const int64_t window =
        segments == 1 ? plan.max_length : split_window_length(static_cast<int>(plan.max_length), segments);
    return double((plan.blocks * segments + sms - 1) / sms) * double(window);
  };
  int best = 1;
  for (int segments = 2; segments <= kMaxSplitSegments; segments *= 2) {
    if (fits(segments) && split_cost(segments) < split_cost(best)) best = segments;
  }
  return split_cost(best) <= 0.9 * split_cost(1) ? best : 1;
}

// plan with its lines split in `segments` (split_segments).
inline Launch split_lines(Launch plan, int segments) {
  plan.segments = segments;
  plan.blocks *= segments;
  plan.max_length = split_window_length(static_cast<int>(plan.max_length), segments);
  plan.rows_per_thread = 1;
  while (static_cast<int64_t>(plan.rows_per_thread) * kMaxThreads < plan.slots()) plan.rows_per_thread *= 2;
  plan.threads = plan.threads_needed();
  return plan;
}

// Channels per block (GSPN_CUDA_CHANNELS). Channels of one gate group
// share its gates, yet each block scanned one channel: it loaded and
// normalised the group's gates for itself (the normalisation is about a
// third of a forward's instructions per position, SASS), and in the
// backward added its gate gradients into the group's one fp32 buffer, as
// many atomic adds per position as the group has channels: on an H200 the
// backward of 320 channels sharing one group ran at 16 % of copy against
// 61 % with per-channel gates, whose bytes are double (BENCHMARKS.md). A
// pair of channels per block loads and normalises the gates once for both,
// waits at one barrier per line for both, and sums both channels' gate
// gradients before adding them: half the adds. Half the blocks, though, so
// a launch of fewer pairs than SMs leaves SMs idle. Unset or "1": one channel
// per block (the default until a GPU has timed pairs); "2": pairs wherever
// the group has an even number of channels and the lines take at most
// kMaxPairedRows slots per thread (a pair's registers), unstaged and unsplit;
// the launches take them where the pair's rows fit shared memory and its
// kernel does not spill registers (fp32's backward at 2 slots of 2
// positions and most fp64 kernels do, SASS).

inline Launch pair_channels(const ScanProblem& pb, Launch plan, bool staged) {
  const char* how = std::getenv("GSPN_CUDA_CHANNELS");
  if (how == nullptr || std::strcmp(how, "1") == 0) return plan;
  TORCH_CHECK(std::strcmp(how, "2") == 0, "GSPN_CUDA_CHANNELS=", how, " is not a number of channels per block: "
              "use \"2\" (pairs of channels of one gate group, where they fit) or leave it unset (one channel "
              "per block)");
  if (staged || pb.G == pb.C || pb.channels_per_group() % 2 != 0 || plan.rows_per_thread > kMaxPairedRows) {
    return plan;
  }
  plan.channels = 2;
  plan.blocks /= 2;
  return plan;
}

// Launches kernel on plan's grid with its arguments and plan.segments last:
// in clusters of plan.segments blocks where the lines are split.
template <typename Kernel, typename... Args>
void launch_planned(Kernel kernel, const Launch& plan, size_t smem, cudaStream_t stream, Args... args) {
  set_shared_memory(kernel, smem);
  if (plan.segments > 1) {
    GSPN_LAUNCH_CLUSTER(kernel, plan.blocks, plan.threads, smem, stream, plan.segments)(args..., plan.segments);
  } else {
    GSPN_LAUNCH(kernel, plan.blocks, plan.threads, smem, stream)(args..., 1);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// plan, or the alternative that pair_channels, else split_segments, offers
// where its kernel can run it: a pair of channels whose shared memory
// (unsplit_bytes(paired plan, 0): pairs are unstaged) fits and whose kernel
// does not spill; lines split where the kernel runs in clusters.
// with_kernel(candidate, staged lines, f) calls f with a plan's kernel.
template <typename UnsplitBytes, typename WithKernel>
Launch plan_with_alternatives(const ScanProblem& pb, Launch plan, bool staged, UnsplitBytes&& unsplit_bytes,
                              WithKernel&& with_kernel) {
  if (const Launch paired = pair_channels(pb, plan, staged); paired.channels > 1) {
    const size_t bytes = unsplit_bytes(paired, 0);
    if (bytes <= static_cast<size_t>(max_shared_bytes())) {
      with_kernel(paired, 0, [&](auto kernel) {
        if (!residency_of(kernel, paired, bytes).spills) plan = paired;
      });
    }
  }
  if (const int segments = plan.channels == 1 ? split_segments(pb, plan, staged) : 1; segments > 1) {
    const Launch split = split_lines(plan, segments);
    with_kernel(split, 0, [&](auto kernel) {
      if (clusters_run(kernel)) plan = split;
    });
  }
  return plan;
}

// staged: run the column scans staged (ColumnStages, in the groups
// staged_group picks); the caller found them fit (columns_staged_fit, for
// these tensors).
template <typename scalar_t>
void launch_forward(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& lam, at::Tensor& out,
                    const ScanProblem& pb, bool staged) {
  Launch plan = plan_launch(pb, pairs_fit(pb, {&x, &gates, &lam, &out}));
  const int group = staged ? staged_group<scalar_t>(pb, false) : 0;
  TORCH_CHECK(group > 0 || !staged, "gspn::scan (CUDA): column scans asked to run staged that do not fit it");
  const bool float_gates = gates.scalar_type() != x.scalar_type();
  const auto with_kernel = [&](const Launch& candidate, int staged_lines, auto&& f) {
    with_forward_kernel<scalar_t>(candidate, pb.normalize, staged_lines, float_gates, f);
  };
  // Two rows of h per channel (the kernel's ring), inputs staged 5 to a group.
  const auto unsplit_bytes = [&](const Launch& l, int staged_lines) {
    return shared_bytes<scalar_t>(2 * l.channels, l.max_length, staged_lines, 5);
  };
  plan = plan_with_alternatives(pb, plan, staged, unsplit_bytes, with_kernel);
  // Split: a ring of kSplitRing rows of the window, no packing (split_segments balanced the SMs).
  const size_t smem = plan.segments > 1 ? shared_bytes<scalar_t>(kSplitRing, plan.max_length, 0, 5)
                                        : unsplit_bytes(plan, group);
  if (plan.segments == 1) pack_blocks(
      plan,
      [&](const Launch& candidate) {
        Residency r{};
        with_kernel(candidate, group, [&](auto kernel) { r = residency_of(kernel, candidate, smem); });
        return r;
      },
      staged ? kMaxStagedRows : (plan.channels > 1 ? kMaxPairedRows : kMaxRowsPerThread));
  const bool vectors =
      !float_gates && column_vectors(pb, {&x, &gates, &lam}, forward_tile_lines(plan.rows_per_thread), plan);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_kernel(plan, group, [&](auto kernel) {
    launch_planned(kernel, plan, smem, stream, x.data_ptr<scalar_t>(), gates.data_ptr(), lam.data_ptr<scalar_t>(),
                   out.data_ptr<scalar_t>(), pb, plan.chunks_per_plane, vectors);
  });
}

// atomic: gate gradients of channels sharing a group are added into an fp32
// buffer. staged: as in launch_forward.
template <typename scalar_t>
void launch_backward(const at::Tensor& grad_h, const at::Tensor& h, const at::Tensor& x, const at::Tensor& gates,
                     const at::Tensor& lam, at::Tensor& dx, at::Tensor& dgates, at::Tensor& dlam,
                     const ScanProblem& pb, bool atomic, bool staged) {
  Launch plan = plan_launch(pb, pairs_fit(pb, {&grad_h, &h, &x, &gates, &lam, &dx, &dgates, &dlam}));
  const int group = staged ? staged_group<scalar_t>(pb, true) : 0;
  TORCH_CHECK(group > 0 || !staged,
              "gspn::scan_backward (CUDA): column scans asked to run staged that do not fit it");
  const bool float_gates = gates.scalar_type() != x.scalar_type();
  const auto with_kernel = [&](const Launch& candidate, int staged_lines, auto&& f) {
    with_backward_kernel<scalar_t>(candidate, pb.normalize, atomic, staged_lines, float_gates, f);
  };
  // Eight rows per channel (the kernel's v_k ring and h[t-1]), inputs staged 7 to a group.
  const auto unsplit_bytes = [&](const Launch& l, int staged_lines) {
    return shared_bytes<scalar_t>(8 * l.channels, l.max_length, staged_lines, 7);
  };
  plan = plan_with_alternatives(pb, plan, staged, unsplit_bytes, with_kernel);
  // Split: the v_k ring (3 kSplitRing rows) and h[t-1] (2), no packing.
  const size_t smem = plan.segments > 1 ? shared_bytes<scalar_t>(3 * kSplitRing + 2, plan.max_length, 0, 7)
                                        : unsplit_bytes(plan, group);
  if (plan.segments == 1) pack_blocks(
      plan,
      [&](const Launch& candidate) {
        Residency r{};
        with_kernel(candidate, group, [&](auto kernel) { r = residency_of(kernel, candidate, smem); });
        return r;
      },
      staged ? kMaxStagedBackwardRows : (plan.channels > 1 ? kMaxPairedRows : kMaxRowsPerThread));
  const bool vectors = !float_gates && column_vectors(pb, {&grad_h, &x, &gates, &lam},
                                                      backward_tile_lines(plan.rows_per_thread), plan);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_kernel(plan, group, [&](auto kernel) {
    launch_planned(kernel, plan, smem, stream, grad_h.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
                   x.data_ptr<scalar_t>(), gates.data_ptr(), lam.data_ptr<scalar_t>(), dx.data_ptr<scalar_t>(),
                   dgates.data_ptr(), dlam.data_ptr<scalar_t>(), pb, plan.chunks_per_plane, vectors);
  });
}

// Whether launch_forward (backward: launch_backward) can run pb's column
// scans staged on these tensors (theirs, in that order).
template <typename scalar_t>
bool columns_staged_fit(const ScanProblem& pb, const std::vector<at::Tensor>& tensors, bool backward) {
  const int group = staged_group<scalar_t>(pb, backward);
  if (group == 0) return false;
  for (const at::Tensor& t : tensors) {
    if (!planes_aligned(pb, {&t}, group)) return false;
  }
  return true;
}

// One line per dtype file: instantiates the launches for SCALAR.
#define GSPN_INSTANTIATE_CUDA_LAUNCHES(SCALAR)                                                                  \
  template void launch_forward<SCALAR>(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&,   \
                                       const ScanProblem&, bool);                                              \
  template void launch_backward<SCALAR>(const at::Tensor&, const at::Tensor&, const at::Tensor&,               \
                                        const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,        \
                                        at::Tensor&, const ScanProblem&, bool, bool);                          \
  template bool columns_staged_fit<SCALAR>(const ScanProblem&, const std::vector<at::Tensor>&, bool);

}  // namespace gspn
