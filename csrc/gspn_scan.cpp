// GSPN scan: the host side of the custom op (shape checks, allocation, the
// gate-normalisation chain rule) and the CPU kernels.
//
// The op schemas are declared once, in Python (gspn_diffusers/ops/library.py),
// so that the pure-PyTorch reference can stand in when no compiler is present;
// this file only registers kernels for the CPU (and, when built with CUDA, the
// CUDA) dispatch key.
//
// CPU kernels copy a tile of lines at a time into small fp32 (fp64 for
// double) buffers laid out line-major, so the recurrence runs over contiguous
// memory in every direction; for "lr"/"rl" that copy is a transpose that reads
// consecutive columns of each row (cache lines) instead of striding down a
// column. See "tile copies" and "task layout" below.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#define GSPN_SIMD_BLOCKS 1
#else
#define GSPN_SIMD_BLOCKS 0
#endif

#include "gspn_scan.h"

namespace gspn {

#ifdef GSPN_WITH_CUDA
void scan_forward_cuda(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& lam,
                       at::Tensor& out, const ScanProblem& pb, bool columns_staged);
void scan_backward_cuda(const at::Tensor& grad_h, const at::Tensor& h, const at::Tensor& x,
                        const at::Tensor& gates, const at::Tensor& lam, at::Tensor& dx,
                        at::Tensor& dgates, at::Tensor& dlam, const ScanProblem& pb, bool columns_staged);
bool columns_staged_fit_cuda(const ScanProblem& pb, const std::vector<at::Tensor>& tensors, bool backward);
at::Tensor contiguous_cuda(const at::Tensor& t);
at::Tensor decayed_gates_cuda(const at::Tensor& logits, const at::Tensor& decay, const ScanProblem& pb);
std::pair<at::Tensor, at::Tensor> decayed_gates_backward_cuda(const at::Tensor& logits, const at::Tensor& decay,
                                                              const at::Tensor& dgates, const ScanProblem& pb);
void transpose_into_cuda(at::Tensor& dst, const at::Tensor& src);
void side_by_side_cuda(const at::Tensor& on, const std::function<void()>& beside, const std::function<void()>& then);
#endif

namespace {

// Whether t goes to the CUDA kernels: CUDA tensors, and in a build for the CPU
// simulator of the CUDA kernels (GSPN_CUDA_SIM, csrc/sim/) every tensor, so
// that tests run the CUDA kernels' logic on CPU tensors.
inline bool runs_cuda_kernels(const at::Tensor& t) {
#ifdef GSPN_CUDA_SIM
  return t.defined();
#else
  return t.is_cuda();
#endif
}

// float_gates: an internal launch whose gates are the decayed gates in float
// that decayed_gates_cuda made for 16-bit x and lam.
ScanProblem make_problem(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& lam,
                         at::IntArrayRef directions, int64_t chunk, bool normalize, bool float_gates = false) {
  TORCH_CHECK(gates.dim() == 6 && gates.size(3) == 3,
              "gspn::scan: gates must have shape (B, D, G, 3, H, W), got ", gates.sizes());
  ScanProblem pb{};
  pb.B = gates.size(0);
  pb.D = gates.size(1);
  pb.G = gates.size(2);
  pb.H = gates.size(4);
  pb.W = gates.size(5);
  TORCH_CHECK(pb.D >= 1 && pb.D <= 4, "gspn::scan: 1 to 4 directions, got ", pb.D);
  TORCH_CHECK(static_cast<int64_t>(directions.size()) == pb.D,
              "gspn::scan: ", directions.size(), " direction codes for ", pb.D, " gate sets");
  for (int64_t d = 0; d < pb.D; ++d) {
    TORCH_CHECK(directions[d] >= 0 && directions[d] <= 3,
                "gspn::scan: direction codes are 0..3 (tb, bt, lr, rl), got ", directions[d]);
    pb.dirs[d] = static_cast<int>(directions[d]);
  }
  TORCH_CHECK(x.dim() == 4 || x.dim() == 5, "gspn::scan: x must be 4-D or 5-D, got ", x.sizes());
  pb.C = x.size(-3);
  TORCH_CHECK(pb.G >= 1 && pb.C % pb.G == 0, "gspn::scan: gate groups G=", pb.G,
              " must divide channels C=", pb.C);
  const auto check_like_x = [&](const at::Tensor& t, const char* name) {
    const bool shared = t.dim() == 4;
    TORCH_CHECK((shared && t.sizes() == at::IntArrayRef({pb.B, pb.C, pb.H, pb.W})) ||
                    (t.dim() == 5 && t.sizes() == at::IntArrayRef({pb.B, pb.D, pb.C, pb.H, pb.W})),
                "gspn::scan: ", name, " must be (B, C, H, W) or (B, D, C, H, W) = (", pb.B, ", ",
                pb.D, ", ", pb.C, ", ", pb.H, ", ", pb.W, "), got ", t.sizes());
    const at::ScalarType dtype = float_gates ? x.scalar_type() : gates.scalar_type();
    TORCH_CHECK(t.scalar_type() == dtype && t.device() == gates.device(),
                "gspn::scan: ", name, " must match gates in dtype and device");
  };
  check_like_x(x, "x");
  check_like_x(lam, "lam");
  TORCH_CHECK(chunk >= 0, "gspn::scan: chunk must be >= 0 (0 = global), got ", chunk);
  pb.chunk = chunk;
  pb.normalize = normalize;
  pb.Dt = pb.D;
  pb.slots = kIdentitySlots;
  const int64_t plane = pb.H * pb.W;
  pb.x_dir_stride = x.dim() == 4 ? 0 : pb.C * plane;
  pb.x_batch_stride = x.dim() == 4 ? pb.C * plane : pb.D * pb.C * plane;
  pb.lam_dir_stride = lam.dim() == 4 ? 0 : pb.C * plane;
  pb.lam_batch_stride = lam.dim() == 4 ? pb.C * plane : pb.D * pb.C * plane;
  return pb;
}

// ---- tile copies between a strided plane and a line-major buffer ----------
//
// Row scans read their lines in place. Column scans ("lr"/"rl") stage a tile
// of consecutive columns as line-major rows: a transpose. Element by element
// that transpose costs a scalar load and store per value and dominated column
// scans; fp32 tiles therefore go through registers in square blocks of one
// vector's width: 16x16 with AVX-512 (16 row loads, 64 shuffles, 16 stores),
// 8x8 with AVX2 (8 loads, 24 shuffles, 8 stores). Only the ragged edges
// (fewer than a block of lines or positions) take the scalar loops.

// Lines staged per tile of a task with `channels` channels. Row tiles only
// need to amortise the gate staging (16; 8 to 64 measured alike). A column
// tile reads a segment of every row of the plane, rows W floats apart, and
// the best width depends on the CPU (csrc/README.md, CPU kernel):
// - AVX-512 builds, measured on a Zen 4 (1x32xSxS): up to 512 x 512, tasks
//   of a few channels (G = C: one) take 16 lines, 10-25 % faster than 64
//   (their staged buffers stay in L1/L2); more channels per task take 64;
//   larger planes take 128 lines for every task (at 1024 x 1024, every row
//   its own 4 KB page, 16 lines were 1.6x slower than 64, and 128 made
//   column backward 15-20 % and forward 5-15 % faster than 64).
// - AVX2 builds, measured on a Zen 3 (the same runs interleaved in one
//   process): the longer each row's run, the faster, staged buffers in L2 or
//   not. Up to 256 x 256, 256 lines: forward 15-25 % and backward 10-17 %
//   faster than 64 lines (G = 1) or 16 (G = C); above, 128 (at 512 x 512
//   backward 128 beat 256; at 1024 x 1024 128, 256 and 512 measured alike).
//   On the Zen 4 the AVX2 build had gained only a few % from 16 lines.
// Never more than the scan's lines: the task's buffers are sized by it.
int64_t tile_lines(const LineGeometry& geo, int64_t channels) {
  int64_t lines;
  if (geo.pos_stride == 1) {
    lines = 16;
  } else {
#if defined(__AVX512F__)
    lines = geo.lines * geo.length > 512 * 512 ? 128 : (channels <= 4 ? 16 : 64);
#else
    (void)channels;
    lines = geo.lines * geo.length > 256 * 256 ? 128 : 256;
#endif
  }
  return std::max<int64_t>(1, std::min(lines, geo.lines));
}

// Column scans read and write kBlock lines x kBlock positions at a time when
// this is true; the block's lines are consecutive columns of the plane.
bool column_blocks(const LineGeometry& geo) {
  return geo.pos_stride != 1 && (geo.line_stride == 1 || geo.line_stride == -1);
}

#if defined(__AVX512F__)
constexpr bool kRegisterTranspose = true;
constexpr int kBlock = 16;  // floats per vector
using vec_t = __m512;
inline vec_t vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vec_t v) { _mm512_storeu_ps(p, v); }
inline void vstream(float* p, vec_t v) { _mm512_stream_ps(p, v); }
inline vec_t vmul(vec_t a, vec_t b) { return _mm512_mul_ps(a, b); }
inline vec_t vset(float v) { return _mm512_set1_ps(v); }
inline vec_t vmin(vec_t a, vec_t b) { return _mm512_min_ps(a, b); }
inline vec_t vmax(vec_t a, vec_t b) { return _mm512_max_ps(a, b); }
// t's bits shifted left by 23 (its low mantissa bits into the exponent field).
inline vec_t vshift_into_exponent(vec_t t) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_castps_si512(t), 23)); }
inline vec_t vreciprocal_estimate(vec_t a) { return _mm512_rcp14_ps(a); }  // 14 bits
// Whether a <= b in every lane (false where either is NaN).
inline bool vall_at_most(vec_t a, vec_t b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ) == 0xffff; }
constexpr bool kStreamStores = true;

// out(i, v): v holds element i of in(0), ..., in(15) -- a 16x16 transpose.
template <typename In, typename Out>
inline void transpose_block(In&& in, Out&& out) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = in(i);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    out(i, _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88));
    out(i + 8, _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd));
  }
}
#elif defined(__AVX2__)
constexpr bool kRegisterTranspose = true;
constexpr int kBlock = 8;  // floats per vector
using vec_t = __m256;
inline vec_t vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vec_t v) { _mm256_storeu_ps(p, v); }
inline void vstream(float* p, vec_t v) { _mm256_stream_ps(p, v); }
inline vec_t vmul(vec_t a, vec_t b) { return _mm256_mul_ps(a, b); }
inline vec_t vset(float v) { return _mm256_set1_ps(v); }
inline vec_t vmin(vec_t a, vec_t b) { return _mm256_min_ps(a, b); }
inline vec_t vmax(vec_t a, vec_t b) { return _mm256_max_ps(a, b); }
inline vec_t vshift_into_exponent(vec_t t) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(t), 23)); }
inline vec_t vreciprocal_estimate(vec_t a) { return _mm256_rcp_ps(a); }  // 12 bits
inline bool vall_at_most(vec_t a, vec_t b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_LE_OQ)) == 0xff; }
// A 32-byte streaming store fills half a cache line; on an EPYC (Zen) the
// partial write-combining made column scans slower (lr 3.5-5.0 ms plain,
// 5.1-6.6 ms streamed at 1x32x256x256).
constexpr bool kStreamStores = false;

// out(i, v): v holds element i of in(0), ..., in(7) -- an 8x8 transpose.
template <typename In, typename Out>
inline void transpose_block(In&& in, Out&& out) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = in(i);
  for (int i = 0; i < 8; i += 2) {  // t[i] = r_i0 r_j0 r_i1 r_j1 | r_i4 r_j4 r_i5 r_j5 (j = i + 1)
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // r[i + k]: element k (and k + 4) of rows i..i+3
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int k = 0; k < 4; ++k) {
    out(k, _mm256_permute2f128_ps(r[k], r[k + 4], 0x20));
    out(k + 4, _mm256_permute2f128_ps(r[k], r[k + 4], 0x31));
  }
}
#endif

// normalize_taps for one position p of a line's three staged taps (logits
// in, gates out), with its signed sum where KeepSums. A compile-time flag,
// not a test of a null sum: vectorised, such a test became masked stores
// through the null pointer, a microcode assist per vector on AMD CPUs
// (logit_gradients below).
template <bool KeepSums, typename acc_t>
inline void normalize_position(acc_t* __restrict__ a0, acc_t* __restrict__ a1, acc_t* __restrict__ a2,
                               acc_t* __restrict__ sum, int64_t p, bool before, bool after) {
  acc_t n0, n1, n2, signed_sum;
  normalize_taps<acc_t>(a0[p], a1[p], a2[p], before, after, n0, n1, n2, signed_sum);
  a0[p] = n0;
  a1[p] = n1;
  a2[p] = n2;
  if constexpr (KeepSums) sum[p] = signed_sum;
}

#if GSPN_SIMD_BLOCKS
// Gate normalisation on whole vectors (GCC/Clang vector operators on the
// intrinsic types). exp(-l) as exp_of(-l) on the CPU (gspn_scan.h), its
// steps on every lane at once, the negation folded into them.
inline vec_t vexp_of_negated(vec_t l) {
  l = vmin(vset(-kExpMin), vmax(vset(-kExpMax), l));  // a NaN l stays NaN (min/max return their second operand)
  const vec_t t = l * -kExpLog2e + kExpRound;
  const vec_t n = t - kExpRound;
  return exp_polynomial(-(l + n * kExpLn2High) - n * kExpLn2Low) * vshift_into_exponent(t);
}

// 1 / v: the hardware's estimate refined by one Newton step, r (2 - v r):
// within a few ulp, where a vector division occupies the divider for ~5
// cycles (Zen 4, 8 lanes).
inline vec_t vreciprocal(vec_t v) {
  const vec_t r = vreciprocal_estimate(v);
  return r * (2.f - v * r);
}

// normalize_taps at the positions [1, L - 1) of one line, whose taps all have
// their neighbour, a vector at a time, with the signed sums where KeepSums;
// returns the first position it left to the scalar loop. normalize_taps'
// product form (gspn_scan.h): one reciprocal per position, two with the
// sums, where the quotient of sigmoids took four and the loop was bound by
// them (~56 cycles per 8 positions on a Zen 4; six divisions before that).
// A vector where the product form does not hold takes normalize_taps
// itself, lane by lane.
template <bool KeepSums>
int64_t normalize_interior(float* __restrict__ a0, float* __restrict__ a1, float* __restrict__ a2,
                           float* __restrict__ sums, int64_t L) {
  int64_t p = 1;
  for (; p + kBlock <= L - 1; p += kBlock) {
    const vec_t u0 = 1.f + vexp_of_negated(vload(a0 + p));
    const vec_t u1 = 1.f + vexp_of_negated(vload(a1 + p));
    const vec_t u2 = 1.f + vexp_of_negated(vload(a2 + p));
    const vec_t q0 = u1 * u2, q1 = u0 * u2, q2 = u0 * u1;
    const vec_t n = q0 + q1 + q2, all = u1 * q1;
    if (!vall_at_most(all, vset(kProductFormMax)) || !vall_at_most(all * static_cast<float>(kGateEps), n)) {
      for (int64_t i = p; i < p + kBlock; ++i) normalize_position<KeepSums>(a0, a1, a2, sums, i, true, true);
      continue;
    }
    const vec_t inv = vreciprocal(n);
    vstore(a0 + p, q0 * inv);
    vstore(a1 + p, q1 * inv);
    vstore(a2 + p, q2 * inv);
    if constexpr (KeepSums) vstore(sums + p, n * vreciprocal(all));
  }
  return p;
}

// Blocks of a column tile: calls block(plane offset of its top-left element,
// buffer offset of its first line, buffer step between its memory columns)
// for every whole kBlock x kBlock block; returns the lines and positions covered.
template <typename Block>
std::pair<int64_t, int64_t> for_each_block(const LineGeometry& geo, int64_t t0, int64_t n, int64_t pitch,
                                           Block&& block) {
  const int64_t lines = n / kBlock * kBlock, positions = geo.length / kBlock * kBlock;
  const bool forward = geo.line_stride > 0;
  const int64_t step = forward ? pitch : -pitch;
  // Positions outer: the blocks of one band of kBlock memory rows are
  // consecutive, so each row's segment of the tile (up to four cache lines) is
  // read in one go, in address order, where the hardware prefetchers follow
  // it. With lines outer every block jumps kBlock rows (16 KB at W = 256 with
  // AVX-512), a stride no prefetcher tracks, and column scans waited on memory.
  for (int64_t p = 0; p < positions; p += kBlock) {
    for (int64_t q = 0; q < lines; q += kBlock) {
      // "rl" runs right to left: the block's leftmost memory column is its last line.
      const int64_t column = geo.first + (forward ? t0 + q : -(t0 + q + kBlock - 1));
      const int64_t line0 = (forward ? q : q + kBlock - 1) * pitch;
      block(column + p * geo.pos_stride, line0 + p, step);
    }
  }
  return {lines, positions};
}

// Column tiles are read band by band, each row a few cache lines, one row
// every W floats: a stride the hardware prefetchers pick up late, so the
// register transposes waited on memory (most of a G = 1 column scan's time).
// A block fetches the rows it will touch two bands later: at 1x32x256x256 (AVX2
// EPYC) column forward 4.1-4.6 -> 2.9-3.8 ms at G = 1, 10.7-11.5 -> 8.1-9.2
// ms at G = C; one, two and three bands ahead measured alike, none clearly worse.
constexpr int kPrefetchBands = 2;
inline void prefetch_rows_ahead(const float* p, const LineGeometry& geo) {
  _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBands * kBlock * geo.pos_stride), _MM_HINT_T0);
}

// One vector of a column tile's output row, which nothing here reads again:
// streamed where that is a whole aligned cache line (no read-for-ownership),
// else stored, its row prefetched two bands ahead like the reads.
inline void store_column_output(float* row, vec_t v, const LineGeometry& geo) {
  if (kStreamStores && reinterpret_cast<uintptr_t>(row) % sizeof(vec_t) == 0) {
    vstream(row, v);
  } else {
    if (!kStreamStores) prefetch_rows_ahead(row, geo);
    vstore(row, v);
  }
}
#else
constexpr bool kRegisterTranspose = false;
#endif

// Runs f(s, p, plane offset) over the part of a tile the register blocks left.
template <typename F>
void for_each_rest(const LineGeometry& geo, int64_t t0, int64_t n, std::pair<int64_t, int64_t> done, F&& f) {
  const int64_t L = geo.length, base = geo.first + t0 * geo.line_stride;
  for (int64_t p = 0; p < L; ++p) {
    const int64_t from = p < done.second ? done.first : 0;  // lines already done at this position
    for (int64_t s = from; s < n; ++s) f(s, p, base + p * geo.pos_stride + s * geo.line_stride);
  }
}

// Tile line number of the i-th memory row of a row tile (n lines from t0):
// row tiles are read and written in address order. "bt" lines run up the
// plane, and taken in scan order they made "bt" 1.8x slower than "tb" even
// without the recurrence: each row began where the prefetchers, running on
// past the previous row's end, were not looking.
inline int64_t row_in_address_order(const LineGeometry& geo, int64_t i, int64_t n) {
  return geo.line_stride > 0 ? i : n - 1 - i;
}

template <typename scalar_t, typename acc_t>
constexpr bool fp32_blocks() {
  return kRegisterTranspose && std::is_same<scalar_t, float>::value && std::is_same<acc_t, float>::value;
}

// dst[s * pitch + p] = plane[line t0 + s, position p] for s < n, p < L.
template <typename scalar_t, typename acc_t>
void gather_lines(const scalar_t* plane, const LineGeometry& geo, int64_t t0, int64_t n,
                  acc_t* dst, int64_t pitch) {
  const int64_t L = geo.length;
  if (geo.pos_stride == 1) {
    const scalar_t* base = plane + geo.first + t0 * geo.line_stride;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t s = row_in_address_order(geo, i, n);
      const scalar_t* src = base + s * geo.line_stride;
      acc_t* out = dst + s * pitch;
      for (int64_t p = 0; p < L; ++p) out[p] = static_cast<acc_t>(src[p]);
    }
    return;
  }
  std::pair<int64_t, int64_t> done{0, 0};
#if GSPN_SIMD_BLOCKS
  if constexpr (fp32_blocks<scalar_t, acc_t>()) {
    if (column_blocks(geo)) {
      done = for_each_block(geo, t0, n, pitch, [&](int64_t at, int64_t line0, int64_t step) {
        transpose_block(
            [&](int i) {
              const float* row = plane + at + i * geo.pos_stride;
              prefetch_rows_ahead(row, geo);
              return vload(row);
            },
            [&](int j, vec_t v) { vstore(dst + line0 + j * step, v); });
      });
    }
  }
#endif
  for_each_rest(geo, t0, n, done, [&](int64_t s, int64_t p, int64_t i) {
    dst[s * pitch + p] = static_cast<acc_t>(plane[i]);
  });
}

// dst[s * pitch + p] = lam * x at line t0 + s, position p (one pass, no staging of lam).
template <typename scalar_t, typename acc_t>
void gather_product(const scalar_t* x, const scalar_t* lam, const LineGeometry& geo, int64_t t0, int64_t n,
                    acc_t* dst, int64_t pitch) {
  if (geo.pos_stride == 1) {
    const int64_t L = geo.length, base = geo.first + t0 * geo.line_stride;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t s = row_in_address_order(geo, i, n);
      const scalar_t* __restrict__ xl = x + base + s * geo.line_stride;
      const scalar_t* __restrict__ ll = lam + base + s * geo.line_stride;
      acc_t* __restrict__ out = dst + s * pitch;
      for (int64_t p = 0; p < L; ++p) out[p] = static_cast<acc_t>(ll[p]) * static_cast<acc_t>(xl[p]);
    }
    return;
  }
  std::pair<int64_t, int64_t> done{0, 0};
#if GSPN_SIMD_BLOCKS
  if constexpr (fp32_blocks<scalar_t, acc_t>()) {
    if (column_blocks(geo)) {
      done = for_each_block(geo, t0, n, pitch, [&](int64_t at, int64_t line0, int64_t step) {
        transpose_block(
            [&](int i) {
              const int64_t k = at + i * geo.pos_stride;
              prefetch_rows_ahead(lam + k, geo);
              prefetch_rows_ahead(x + k, geo);
              return vmul(vload(lam + k), vload(x + k));
            },
            [&](int j, vec_t v) { vstore(dst + line0 + j * step, v); });
      });
    }
  }
#endif
  for_each_rest(geo, t0, n, done, [&](int64_t s, int64_t p, int64_t i) {
    dst[s * pitch + p] = static_cast<acc_t>(lam[i]) * static_cast<acc_t>(x[i]);
  });
}

// The walk of every scatter from a tile's line-major buffer src (pitch
// floats per line) back to lines [t0, t0+n) of the plane: row(s, o) for each
// line s of a row tile, o its plane offset, in address order; for column
// tiles (with Blocks) vec(k, v) for each vector v of a block of src
// transposed into memory row order, k its plane offset; then one(s, p, i)
// for each position the blocks left, i its plane offset.
template <bool Blocks, typename acc_t, typename Row, typename Vec, typename One>
void scatter_tile(const acc_t* src, int64_t pitch, const LineGeometry& geo, int64_t t0, int64_t n, Row&& row,
                  Vec&& vec, One&& one) {
  if (geo.pos_stride == 1) {
    const int64_t base = geo.first + t0 * geo.line_stride;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t s = row_in_address_order(geo, i, n);
      row(s, base + s * geo.line_stride);
    }
    return;
  }
  std::pair<int64_t, int64_t> done{0, 0};
#if GSPN_SIMD_BLOCKS
  if constexpr (Blocks) {
    if (column_blocks(geo)) {
      done = for_each_block(geo, t0, n, pitch, [&](int64_t at, int64_t line0, int64_t step) {
        // In: the block's lines in memory-column order; out: its memory rows.
        transpose_block([&](int j) { return vload(src + line0 + j * step); },
                        [&](int i, vec_t v) { vec(at + i * geo.pos_stride, v); });
      });
    }
  }
#endif
  for_each_rest(geo, t0, n, done, one);
}

// plane[line t0 + s, position p] = src[s * pitch + p].
template <typename out_t, typename acc_t>
void scatter_lines(const acc_t* src, int64_t pitch, const LineGeometry& geo, int64_t t0, int64_t n,
                   out_t* plane) {
  const int64_t L = geo.length;
  scatter_tile<fp32_blocks<out_t, acc_t>()>(
      src, pitch, geo, t0, n,
      [&](int64_t s, int64_t o) {
        for (int64_t p = 0; p < L; ++p) plane[o + p] = static_cast<out_t>(src[s * pitch + p]);
      },
      [&](int64_t k, auto v) {
        if constexpr (fp32_blocks<out_t, acc_t>()) store_column_output(plane + k, v, geo);  // (float planes only)
      },
      [&](int64_t s, int64_t p, int64_t i) { plane[i] = static_cast<out_t>(src[s * pitch + p]); });
}

// grad x = lam * a and grad lam = x * a along one row.
template <typename scalar_t, typename acc_t>
void input_gradients_row(const acc_t* __restrict__ a, const scalar_t* __restrict__ x,
                         const scalar_t* __restrict__ lam, scalar_t* __restrict__ dx, scalar_t* __restrict__ dlam,
                         int64_t L) {
  for (int64_t p = 0; p < L; ++p) {
    dx[p] = static_cast<scalar_t>(static_cast<acc_t>(lam[p]) * a[p]);
    dlam[p] = static_cast<scalar_t>(static_cast<acc_t>(x[p]) * a[p]);
  }
}

// grad x = lam * a and grad lam = x * a at lines [t0, t0+n), from the tile's
// adjoint a (line-major, pitch L), x and lam read where they lie: column
// tiles transpose a alone, block by block. Staging x and lam as well took two
// more gathers (transposes for column tiles) and a pass over the buffers.
template <typename scalar_t, typename acc_t>
void scatter_input_gradients(const acc_t* adj, int64_t pitch, const LineGeometry& geo, int64_t t0, int64_t n,
                             const scalar_t* x, const scalar_t* lam, scalar_t* dx, scalar_t* dlam) {
  scatter_tile<fp32_blocks<scalar_t, acc_t>()>(
      adj, pitch, geo, t0, n,
      [&](int64_t s, int64_t o) {
        input_gradients_row<scalar_t, acc_t>(adj + s * pitch, x + o, lam + o, dx + o, dlam + o, geo.length);
      },
      [&](int64_t k, auto a) {
        if constexpr (fp32_blocks<scalar_t, acc_t>()) {  // (only float planes come here)
          prefetch_rows_ahead(x + k, geo);
          prefetch_rows_ahead(lam + k, geo);
          store_column_output(dx + k, vmul(vload(lam + k), a), geo);
          store_column_output(dlam + k, vmul(vload(x + k), a), geo);
        }
      },
      [&](int64_t s, int64_t p, int64_t i) {
        const acc_t a = adj[s * pitch + p];
        dx[i] = static_cast<scalar_t>(static_cast<acc_t>(lam[i]) * a);
        dlam[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * a);
      });
}

// normalize_taps over one staged line of L positions (logits in, gates out),
// with the signed sums where KeepSums. Interior positions have both
// neighbours: whole vectors, then one at a time; the two ends on their own.
template <bool KeepSums, typename acc_t>
void normalize_line(acc_t* __restrict__ a0, acc_t* __restrict__ a1, acc_t* __restrict__ a2,
                    acc_t* __restrict__ sum, int64_t L) {
  int64_t p = 1;
#if GSPN_SIMD_BLOCKS
  if constexpr (std::is_same_v<acc_t, float>) p = normalize_interior<KeepSums>(a0, a1, a2, sum, L);
#endif
  for (; p < L - 1; ++p) normalize_position<KeepSums>(a0, a1, a2, sum, p, true, true);
  normalize_position<KeepSums>(a0, a1, a2, sum, 0, false, L > 1);
  if (L > 1) normalize_position<KeepSums>(a0, a1, a2, sum, L - 1, true, false);
}

// Loads the three taps of one gate group for lines [t0, t0+n), normalised when
// the problem says the gates are logits; then, where sums is given, also
// normalize_taps' signed sums (for the chain rule in the backward).
template <typename scalar_t, typename acc_t>
void gather_gates(const scalar_t* tap0, int64_t plane, const LineGeometry& geo, int64_t t0, int64_t n,
                  bool normalize, acc_t* g0, acc_t* g1, acc_t* g2, acc_t* sums = nullptr) {
  const int64_t L = geo.length;
  gather_lines(tap0, geo, t0, n, g0, L);
  gather_lines(tap0 + plane, geo, t0, n, g1, L);
  gather_lines(tap0 + 2 * plane, geo, t0, n, g2, L);
  if (!normalize) return;
  for (int64_t s = 0; s < n; ++s) {
    if (sums) normalize_line<true>(g0 + s * L, g1 + s * L, g2 + s * L, sums + s * L, L);
    else normalize_line<false>(g0 + s * L, g1 + s * L, g2 + s * L, sums, L);
  }
}

// Decayed gates (ScanProblem::decay): g_k = normalised_k times the sigmoid of
// the tile's decay logits, which is left in sig. normalised_k may be g_k
// itself (the forward) or the backward's own copy, which its chain rule needs.
template <typename scalar_t, typename acc_t>
void apply_decay(const scalar_t* decay, const LineGeometry& geo, int64_t t0, int64_t n, const acc_t* normalised0,
                 const acc_t* normalised1, const acc_t* normalised2, acc_t* g0, acc_t* g1, acc_t* g2,
                 acc_t* __restrict__ sig) {
  gather_lines(decay, geo, t0, n, sig, geo.length);
  const int64_t count = n * geo.length;
  int64_t i = 0;
#if GSPN_SIMD_BLOCKS
  // A vector at a time (vexp_of_negated, vreciprocal): the scalar sigmoid's
  // exp and division took about a fifth of a per-channel-gates four-direction
  // forward, as long as the four scans' own gate normalisation twice over.
  if constexpr (std::is_same_v<acc_t, float>) {
    for (; i + kBlock <= count; i += kBlock) {
      const vec_t w = vreciprocal(1.f + vexp_of_negated(vload(sig + i)));
      vstore(sig + i, w);
      vstore(g0 + i, vload(normalised0 + i) * w);
      vstore(g1 + i, vload(normalised1 + i) * w);
      vstore(g2 + i, vload(normalised2 + i) * w);
    }
  }
#endif
  for (; i < count; ++i) {
    const acc_t w = sigmoid(sig[i]);
    sig[i] = w;
    g0[i] = normalised0[i] * w;
    g1[i] = normalised1[i] * w;
    g2[i] = normalised2[i] * w;
  }
}

// ---- task layout -----------------------------------------------------------

// A CPU task is (batch, direction, gate group, slice of the group's channels).
// It stages the group's gates for a tile of lines once -- normalising them once
// when fused -- and runs every channel of its slice over those lines, carrying
// each channel's last hidden line (backwards: its adjoint products) to the
// next tile. Slices exist only to give every thread work when B * D * G is
// small. No two tasks write the same memory, so results are deterministic.
struct CpuTasks {
  int64_t slices, per_slice, count;
};

struct TaskIndex {
  int64_t b, d, g, slice, c_begin, c_end;
};

// Slices round their width up, and as many are planned as that width needs
// (6 channels for 4 threads: 3 slices of 2, not 2, 2, 2 and none), so every
// slice has channels and writes all of its partial gate gradients.
CpuTasks plan_tasks(const ScanProblem& pb) {
  const int64_t groups = pb.B * pb.D * pb.G;
  const int64_t Cg = pb.channels_per_group();
  const int64_t wanted =
      std::max<int64_t>(1, std::min<int64_t>(Cg, (at::get_num_threads() + groups - 1) / groups));
  const int64_t per_slice = std::max<int64_t>(1, (Cg + wanted - 1) / wanted);
  const int64_t slices = std::max<int64_t>(1, (Cg + per_slice - 1) / per_slice);
  return {slices, per_slice, groups * slices};
}

TaskIndex task_index(const ScanProblem& pb, const CpuTasks& plan, int64_t task) {
  TaskIndex ti{};
  ti.slice = task % plan.slices;
  ti.g = (task / plan.slices) % pb.G;
  ti.d = (task / (plan.slices * pb.G)) % pb.D;
  ti.b = task / (plan.slices * pb.G * pb.D);
  const int64_t Cg = pb.channels_per_group();
  ti.c_begin = ti.g * Cg + std::min(Cg, ti.slice * plan.per_slice);
  ti.c_end = ti.g * Cg + std::min(Cg, (ti.slice + 1) * plan.per_slice);
  return ti;
}

// Runs body(task, its line geometry, a per-thread scratch vector) for every
// task with channels, in parallel. Threads take the next task as they finish
// one: tasks differ in cost (a column scan takes up to twice a row scan), and
// a static split of a four-direction call gave one thread both column
// directions. Each task writes its own memory, so the order does not change
// the results.
template <typename acc_t, typename Body>
void for_each_task(const ScanProblem& pb, const CpuTasks& plan, Body&& body) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), plan.count);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<acc_t> buf;
    for (int64_t task = next++; task < plan.count; task = next++) {
      const TaskIndex ti = task_index(pb, plan, task);
      if (ti.c_end > ti.c_begin) body(ti, line_geometry(pb.dirs[ti.d], pb.H, pb.W), buf);
    }
#if GSPN_SIMD_BLOCKS
    _mm_sfence();  // streaming stores (store_column_output) visible before the join
#endif
  });
}

// ---- forward ---------------------------------------------------------------

// One line of a row scan read and written in place ("tb"): h = lam * x, plus
// the previous line's three taps where Propagate, kept in row (the next
// line's prev) and stored to out. One pass with restrict parameters: as three
// loops (product into row, recurrence, store) over locals GCC could not
// prove apart, a 1x32x256x256 scan at G = 1 took ~1.4x as long (one thread).
template <bool Propagate, typename scalar_t, typename acc_t>
void forward_line_in_place(const scalar_t* __restrict__ x, const scalar_t* __restrict__ lam,
                           const acc_t* __restrict__ g0, const acc_t* __restrict__ g1,
                           const acc_t* __restrict__ g2, const acc_t* __restrict__ prev, acc_t* __restrict__ row,
                           scalar_t* __restrict__ out, int64_t L) {
  for (int64_t p = 0; p < L; ++p) {
    const acc_t lam_x = static_cast<acc_t>(lam[p]) * static_cast<acc_t>(x[p]);
    const acc_t h = Propagate ? propagate(lam_x, g0[p], g1[p], g2[p], prev + p) : lam_x;
    row[p] = h;
    out[p] = static_cast<scalar_t>(h);
  }
}

// One line of a staged scan: row holds lam * x and becomes h.
template <typename acc_t>
void propagate_line(const acc_t* __restrict__ g0, const acc_t* __restrict__ g1, const acc_t* __restrict__ g2,
                    const acc_t* __restrict__ prev, acc_t* __restrict__ row, int64_t L) {
  for (int64_t p = 0; p < L; ++p) row[p] = propagate(row[p], g0[p], g1[p], g2[p], prev + p);
}

template <typename scalar_t>
void forward_cpu(const ScanProblem& pb, const scalar_t* x, const scalar_t* gates, const scalar_t* lam,
                 const scalar_t* decay, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const CpuTasks plan = plan_tasks(pb);
  for_each_task<acc_t>(pb, plan, [&](const TaskIndex& ti, const LineGeometry& geo, std::vector<acc_t>& buf) {
    const int64_t channels = ti.c_end - ti.c_begin;
    const int64_t T = geo.lines, L = geo.length, chunk = chunk_length(pb.chunk, T);
    const int64_t tile = tile_lines(geo, channels);
    const int64_t TL = tile * L, pitch = L + 2;  // padded rows: one zero on each side
    buf.assign(4 * TL + (tile + channels) * pitch, acc_t(0));
    acc_t* g0 = buf.data();
    acc_t* g1 = g0 + TL;
    acc_t* g2 = g1 + TL;
    acc_t* sig = g2 + TL;                // sigmoids of the decay logits (pb.decay)
    acc_t* hx = sig + TL + 1;            // padded rows: lam * x, overwritten by h
    acc_t* last = hx + tile * pitch;     // padded row per channel: its latest hidden line
    const scalar_t* tap0 = gates + pb.gate_plane(ti.b, ti.d, ti.g, 0);

    for (int64_t t0 = 0; t0 < T; t0 += tile) {
      const int64_t n = std::min(tile, T - t0);
      gather_gates(tap0, pb.plane(), geo, t0, n, pb.normalize, g0, g1, g2);
      if (pb.decay) {
        apply_decay<scalar_t, acc_t>(decay + pb.decay_plane(ti.b, ti.d, ti.g), geo, t0, n, g0, g1, g2, g0, g1, g2,
                                     sig);
      }
      for (int64_t c = ti.c_begin; c < ti.c_end; ++c) {
        acc_t* carry = last + (c - ti.c_begin) * pitch;
        const scalar_t* xp = x + pb.x_plane(ti.b, ti.d, c);
        const scalar_t* lp = lam + pb.lam_plane(ti.b, ti.d, c);
        scalar_t* op = out + pb.out_plane(ti.b, ti.d, c);
        // "tb" reads and writes its lines in place, in scan order. The others
        // stage lam * x for the tile in address order (for column scans a
        // small transpose) and write h back after the tile's recurrence.
        const bool contiguous = geo.pos_stride == 1 && geo.line_stride > 0;
        if (!contiguous) gather_product(xp, lp, geo, t0, n, hx, pitch);
        for (int64_t s = 0; s < n; ++s) {
          const int64_t t = t0 + s;
          const bool propagates = t % chunk != 0;  // the first line of a chunk is just lam * x
          acc_t* row = hx + s * pitch;
          const acc_t* prev = (s == 0 ? carry : row - pitch) - 1;  // prev[p + k]: position p-1+k
          const acc_t *a0 = g0 + s * L, *a1 = g1 + s * L, *a2 = g2 + s * L;
          if (contiguous) {
            const int64_t line = geo.first + t * geo.line_stride;
            if (propagates) forward_line_in_place<true>(xp + line, lp + line, a0, a1, a2, prev, row, op + line, L);
            else forward_line_in_place<false>(xp + line, lp + line, a0, a1, a2, prev, row, op + line, L);
          } else if (propagates) {
            propagate_line(a0, a1, a2, prev, row, L);
          }
        }
        std::copy(hx + (n - 1) * pitch, hx + (n - 1) * pitch + L, carry);
        if (!contiguous) scatter_lines(hx, pitch, geo, t0, n, op);
      }
    }
  });
}

// ---- backward --------------------------------------------------------------

// One line of the adjoint scan: a += (contributions of line t + 1, if any),
// then v_k = g_k * a for the line before. A function of its own, with restrict
// parameters and the branch hoisted into a template flag, so it vectorises.
template <bool HasNext, typename acc_t>
void adjoint_line(acc_t* __restrict__ a, const acc_t* __restrict__ g0, const acc_t* __restrict__ g1,
                  const acc_t* __restrict__ g2, const acc_t* __restrict__ vn0, const acc_t* __restrict__ vn1,
                  const acc_t* __restrict__ vn2, acc_t* __restrict__ v0, acc_t* __restrict__ v1,
                  acc_t* __restrict__ v2, int64_t L) {
  for (int64_t p = 0; p < L; ++p) {
    const acc_t ap = HasNext ? a[p] + gather_adjoint(vn0 + p, vn1 + p, vn2 + p) : a[p];
    a[p] = ap;
    v0[p] = g0[p] * ap;
    v1[p] = g1[p] * ap;
    v2[p] = g2[p] * ap;
  }
}

// Fused normalisation: the gate gradients dg_k of a tile, summed over the
// task's channels, turned into the logits' in place, from the normalised gates
// and signed sums gather_gates kept (normalize_taps_backward_of_scan with
// a = 1 and h_k = dg_k: the chain rule is linear in dg, so it may follow the
// sum over channels, and slices' partial sums stay summable); with decay
// (sig: its sigmoids, not null) also the decay logits' gradients into da
// (decayed_taps_backward). Where a separate pass over the whole gate tensor
// read the logits and gradients back from memory and took exp and four
// divisions per position: ~40 % of a backward with per-channel gates.
// Decay is a template flag, not a test of sig in the loop: GCC vectorised
// that test into masked loads of sig, which at sig = nullptr (masked-off
// lanes on an unmapped page) took a microcode assist per vector on the
// EPYC, 80 % of the loop's samples and about a third of the backward's.
template <bool Decay, typename acc_t>
void logit_gradients(const acc_t* __restrict__ g0, const acc_t* __restrict__ g1, const acc_t* __restrict__ g2,
                     const acc_t* __restrict__ sums, const acc_t* __restrict__ sig, acc_t* __restrict__ d0,
                     acc_t* __restrict__ d1, acc_t* __restrict__ d2, acc_t* __restrict__ da, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    acc_t l0, l1, l2;
    if constexpr (Decay) {
      acc_t a;
      decayed_taps_backward<acc_t>(g0[i], g1[i], g2[i], sums[i], sig[i], d0[i], d1[i], d2[i], l0, l1, l2, a);
      da[i] = a;
    } else {
      normalize_taps_backward_of_scan<acc_t>(g0[i], g1[i], g2[i], sums[i], acc_t(1), d0[i], d1[i], d2[i], l0, l1,
                                             l2);
    }
    d0[i] = l0;
    d1[i] = l1;
    d2[i] = l2;
  }
}

// Lines are visited in reverse. Per channel, v_k = g_k * a of the line visited
// last is carried to the next one; gate gradients of all the slice's channels
// add into a tile, then into the task's own fp32 partial buffer, which the host
// sums over slices.
template <typename scalar_t>
void backward_cpu(const ScanProblem& pb, const CpuTasks& plan, const scalar_t* grad_h, const scalar_t* h,
                  const scalar_t* x, const scalar_t* gates, const scalar_t* lam, const scalar_t* decay,
                  scalar_t* dx, at::opmath_type<scalar_t>* dg_partial, at::opmath_type<scalar_t>* dd_partial,
                  scalar_t* dlam) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = pb.plane();
  for_each_task<acc_t>(pb, plan, [&](const TaskIndex& ti, const LineGeometry& geo, std::vector<acc_t>& buf) {
    const int64_t channels = ti.c_end - ti.c_begin;
    const int64_t T = geo.lines, L = geo.length, chunk = chunk_length(pb.chunk, T);
    const int64_t tile = tile_lines(geo, channels);
    const int64_t TL = tile * L, pitch = L + 2;
    const int64_t decay_buffers = pb.decay ? 5 * TL : 0;
    buf.assign(8 * TL + tile * pitch + 3 * (2 + channels) * pitch + 2 + decay_buffers, acc_t(0));
    acc_t* g0 = buf.data();   // gates
    acc_t* g1 = g0 + TL;
    acc_t* g2 = g1 + TL;
    acc_t* sums = g2 + TL;    // normalize_taps' signed sums (fused normalisation)
    acc_t* d0 = sums + TL;    // gate gradients, summed over the slice's channels
    acc_t* d1 = d0 + TL;
    acc_t* d2 = d1 + TL;
    acc_t* adj = d2 + TL;     // grad_h, then the adjoint a
    acc_t* hp = adj + TL + 1;  // padded rows: row s holds h of line t0 + s - 1
    // Three padded rows v_0, v_1, v_2 per block: two blocks alternate inside
    // a tile, one block per channel carries the tile's last line over.
    acc_t* vloc = hp + tile * pitch;
    acc_t* vcarry = vloc + 6 * pitch;
    // With decay: its sigmoids, the undecayed normalised gates (the scan
    // runs on the decayed ones in g0..g2) and the decay logits' gradients.
    acc_t* sig = pb.decay ? vcarry + 3 * channels * pitch : nullptr;
    acc_t* normalised = pb.decay ? sig + TL : g0;  // tap k at normalised + k * TL
    acc_t* da = pb.decay ? normalised + 3 * TL : nullptr;
    const scalar_t* tap0 = gates + pb.gate_plane(ti.b, ti.d, ti.g, 0);
    const int64_t task_set = ((ti.b * pb.D + ti.d) * pb.G + ti.g) * plan.slices + ti.slice;
    acc_t* dgp = dg_partial + task_set * 3 * plane;

    for (int64_t t0 = ((T - 1) / tile) * tile; t0 >= 0; t0 -= tile) {
      const int64_t n = std::min(tile, T - t0);
      acc_t* n0 = normalised;
      acc_t* n1 = n0 + TL;
      acc_t* n2 = n1 + TL;
      gather_gates(tap0, plane, geo, t0, n, pb.normalize, n0, n1, n2, sums);
      if (pb.decay) apply_decay(decay + pb.decay_plane(ti.b, ti.d, ti.g), geo, t0, n, n0, n1, n2, g0, g1, g2, sig);
      std::fill(d0, d0 + 3 * TL, acc_t(0));
      for (int64_t c = ti.c_begin; c < ti.c_end; ++c) {
        const int64_t plane_out = pb.out_plane(ti.b, ti.d, c);
        gather_lines(grad_h + plane_out, geo, t0, n, adj, L);
        if (t0 > 0) {
          gather_lines(h + plane_out, geo, t0 - 1, n, hp, pitch);
        } else {
          std::fill(hp, hp + L, acc_t(0));
          gather_lines(h + plane_out, geo, 0, n - 1, hp + pitch, pitch);
        }
        acc_t* carry = vcarry + 3 * (c - ti.c_begin) * pitch;
        const acc_t* vn = carry;  // v of line t + 1: row k at vn + k * pitch
        for (int64_t s = n - 1; s >= 0; --s) {
          const int64_t t = t0 + s;
          const bool has_next = t + 1 < T && (t + 1) % chunk != 0;
          const bool has_prev = t % chunk != 0;
          acc_t* vc = vloc + 3 * (s & 1) * pitch;
          acc_t* a = adj + s * L;
          if (has_next) {
            adjoint_line<true>(a, g0 + s * L, g1 + s * L, g2 + s * L, vn, vn + pitch, vn + 2 * pitch, vc,
                               vc + pitch, vc + 2 * pitch, L);
          } else {
            adjoint_line<false>(a, g0 + s * L, g1 + s * L, g2 + s * L, vn, vn + pitch, vn + 2 * pitch, vc,
                                vc + pitch, vc + 2 * pitch, L);
          }
          if (has_prev) {
            const acc_t* __restrict__ hrow = hp + s * pitch - 1;  // hrow[p + k]: position p-1+k
            acc_t* __restrict__ e0 = d0 + s * L;
            acc_t* __restrict__ e1 = d1 + s * L;
            acc_t* __restrict__ e2 = d2 + s * L;
            for (int64_t p = 0; p < L; ++p) {
              e0[p] += a[p] * hrow[p];
              e1[p] += a[p] * hrow[p + 1];
              e2[p] += a[p] * hrow[p + 2];
            }
          }
          vn = vc;
        }
        for (int k = 0; k < 3; ++k) std::copy(vn + k * pitch, vn + k * pitch + L, carry + k * pitch);
        scatter_input_gradients(adj, L, geo, t0, n, x + pb.x_plane(ti.b, ti.d, c), lam + pb.lam_plane(ti.b, ti.d, c),
                                dx + plane_out, dlam + plane_out);
      }
      if (pb.normalize) {
        if (pb.decay) logit_gradients<true>(n0, n1, n2, sums, sig, d0, d1, d2, da, n * L);
        else logit_gradients<false>(n0, n1, n2, sums, sig, d0, d1, d2, da, n * L);
      }
      // Each position of the task's partial planes is written once, by its tile.
      if (pb.decay) scatter_lines(da, L, geo, t0, n, dd_partial + task_set * plane);
      for (int k = 0; k < 3; ++k) scatter_lines(d0 + k * TL, L, geo, t0, n, dgp + k * plane);
    }
  });
}

// ---- host side shared by both devices --------------------------------------

// t with contiguous (H, W) planes for the kernels. On CUDA, transposed views
// and channels-last planes take a tiled transpose (contiguous_cuda).
at::Tensor dense(const at::Tensor& t) {
#ifdef GSPN_WITH_CUDA
  if (runs_cuda_kernels(t)) return contiguous_cuda(t);
#endif
  return t.contiguous();
}

// dst = src.transpose(-1, -2), both with contiguous planes and any leading
// strides (slices of a direction of the op's tensors): on CUDA one tiled
// transpose from the source's planes straight into the destination's.
void copy_transposed(at::Tensor dst, const at::Tensor& src) {
#ifdef GSPN_WITH_CUDA
  if (runs_cuda_kernels(src)) {
    transpose_into_cuda(dst, src);
    return;
  }
#endif
  dst.copy_(src.transpose(-1, -2));
}

// ---- the column route -------------------------------------------------------
//
// A column scan ("lr", "rl") of an (H, W) plane is a row scan ("tb", "bt") of
// the transposed (W, H) plane: the same lines, positions, taps, chunks and
// normalisation edges. On CUDA row scans read along contiguous addresses and
// column scans across them (3-10x slower on an H200 with one load per line,
// BENCHMARKS.md), so from gspn_diffusers.ops.COLUMNS_AS_ROWS_MIN_PIXELS
// pixels per plane (the op's columns_as_rows argument; -1 never) the op runs
// its row directions as one launch on the inputs in place and its column
// directions as another, in one of two ways:
// - staged (small calls whose tensors align for it and whose lines are
//   short enough, columns_staged): in place too, the kernel copying groups
//   of columns into shared memory ahead of their lines (ColumnStages in
//   gspn_scan_cuda.cuh); no copies;
// - else as row scans over transposed copies of their inputs, whose output
//   is transposed into the result's column directions.
// Both launches write into the one (B, D, C, H, W) result (ScanProblem::slot).
// The backward does the same with its gradients.
struct ColumnRoute {
  std::vector<int64_t> rows, columns;  // the call's directions of each kind
  bool taken() const { return !columns.empty(); }
};

ColumnRoute column_route(const ScanProblem& pb, int64_t columns_as_rows) {
  ColumnRoute route;
  // Fused decay is the CPU kernels' (pb.decay), which read columns in place:
  // the route, a CUDA matter that tests may ask of the CPU, does not carry it.
  if (columns_as_rows < 0 || pb.plane() < columns_as_rows || pb.decay) return route;
  for (int64_t d = 0; d < pb.D; ++d) {
    const bool column = pb.dirs[d] == kLeftRight || pb.dirs[d] == kRightLeft;
    (column ? route.columns : route.rows).push_back(d);
  }
  return route;
}

// Whether the column route runs the column directions of `columns` (a
// launch of them) staged, in place, on these tensors: CUDA kernels, tensors
// and lines that fit the staged kernels (columns_staged_fit_cuda), and, by
// default, calls of at most kStagedMaxElements elements per input. On an
// H200 (2026-11-29, BENCHMARKS.md) staged columns beat the transposed copies
// only on small calls (1x32x256x256: 1.2-1.45x faster, forward and
// backward); from 1x320x256x256 (21M elements) and 1x32x1024x1024 (34M) the
// copies won, most in the backward (2.5-5.5x) and on four directions,
// where the staged kernels' low occupancy (one block of a plane per SM, its
// stages filling shared memory) and their per-group waits cost more than the
// copies' extra passes. GSPN_CUDA_COLUMNS=staged stages wherever the tensors
// fit, =transposed never, so that a benchmark can time both with one build.
// Float gates (decayed_gates_cuda's, for 16-bit inputs) are never staged:
// the staged kernels take every input in one dtype. The simulator's limit is 2^12, so that tests reach both sides cheaply.
#ifdef GSPN_CUDA_SIM
constexpr int64_t kStagedMaxElements = int64_t(1) << 12;
#else
constexpr int64_t kStagedMaxElements = int64_t(1) << 22;
#endif

bool columns_staged(const ScanProblem& columns, const at::Tensor& gates, const std::vector<at::Tensor>& tensors,
                    bool backward) {
  const char* how = std::getenv("GSPN_CUDA_COLUMNS");
  TORCH_CHECK(how == nullptr || std::strcmp(how, "staged") == 0 || std::strcmp(how, "transposed") == 0,
              "GSPN_CUDA_COLUMNS=", how, " is not a way to run column scans: use \"staged\" (wherever the "
              "tensors fit) or \"transposed\" (always), or leave it unset (staged for small calls)");
  if (how != nullptr && std::strcmp(how, "transposed") == 0) return false;
  if (how == nullptr && columns.B * columns.C * columns.plane() > kStagedMaxElements) return false;
  if (gates.scalar_type() != tensors.front().scalar_type()) return false;
#ifdef GSPN_WITH_CUDA
  return runs_cuda_kernels(tensors.front()) && columns_staged_fit_cuda(columns, tensors, backward);
#else
  return false;
#endif
}

// The launch of the given directions of pb, on pb's tensors in place.
ScanProblem launch_of(const ScanProblem& pb, const std::vector<int64_t>& which) {
  ScanProblem sub = pb;
  sub.D = static_cast<int64_t>(which.size());
  sub.slots = 0;
  for (int64_t d = 0; d < sub.D; ++d) {
    sub.dirs[d] = pb.dirs[which[d]];
    sub.slots |= static_cast<int>(pb.slot(which[d])) << (2 * d);
  }
  return sub;
}

// dst's directions to (dim 1) = src's directions from, each plane
// transposed: one launch when both are ascending runs (the default order's
// "lr", "rl" are), whose slices are then one view each.
void copy_directions_transposed(const at::Tensor& dst, const std::vector<int64_t>& to, const at::Tensor& src,
                                const std::vector<int64_t>& from) {
  const int64_t count = static_cast<int64_t>(to.size());
  bool runs = true;
  for (int64_t j = 0; j < count; ++j) runs = runs && to[j] == to[0] + j && from[j] == from[0] + j;
  if (runs) {
    copy_transposed(dst.narrow(1, to[0], count), src.narrow(1, from[0], count));
  } else {
    for (int64_t j = 0; j < count; ++j) copy_transposed(dst.select(1, to[j]), src.select(1, from[j]));
  }
}

// 0, 1, ..., n - 1: the directions of the compact column launch.
std::vector<int64_t> first(size_t n) {
  std::vector<int64_t> all(n);
  for (size_t j = 0; j < n; ++j) all[j] = static_cast<int64_t>(j);
  return all;
}

// The column directions' planes of t transposed, as a compact tensor: a
// shared (B, C, H, W) input once; a per-direction one (directions in dim 1)
// as (B, Dc, ..., W, H).
at::Tensor columns_transposed(const at::Tensor& t, const std::vector<int64_t>& columns, bool per_direction) {
  if (!per_direction) return dense(t.transpose(-1, -2));
  std::vector<int64_t> sizes = t.sizes().vec();
  sizes[1] = static_cast<int64_t>(columns.size());
  std::swap(sizes[sizes.size() - 1], sizes[sizes.size() - 2]);
  at::Tensor out = at::empty(sizes, t.options());
  copy_directions_transposed(out, first(columns.size()), t, columns);
  return out;
}

// The compact column launch's per-direction result back into the call's
// column directions of `into`.
void put_back_columns(const at::Tensor& into, const at::Tensor& transposed, const std::vector<int64_t>& columns) {
  copy_directions_transposed(into, columns, transposed, first(columns.size()));
}

// The launch of pb's column directions as the row scans of the transposed
// planes that they are, with its compact transposed inputs.
struct ColumnLaunch {
  at::Tensor x, gates, lam;
  ScanProblem pb;
};

ColumnLaunch column_launch(const ScanProblem& pb, const ColumnRoute& route, const at::Tensor& x,
                           const at::Tensor& gates, const at::Tensor& lam) {
  ColumnLaunch launch{columns_transposed(x, route.columns, x.dim() == 5),
                      columns_transposed(gates, route.columns, true),
                      columns_transposed(lam, route.columns, lam.dim() == 5), ScanProblem{}};
  std::vector<int64_t> codes;
  for (int64_t d : route.columns) codes.push_back(pb.dirs[d] == kLeftRight ? kTopBottom : kBottomTop);
  launch.pb = make_problem(launch.x, launch.gates, launch.lam, codes, pb.chunk, pb.normalize,
                           launch.gates.scalar_type() != launch.x.scalar_type());
  return launch;
}

// The route's row launch (rows; none when `route` has no row directions) and
// its column directions (columns): on CUDA side by side on two streams
// (side_by_side_cuda; each launch alone leaves most of the GPU to one block
// per SM), else one after the other.
void rows_beside_columns(const ColumnRoute& route, const at::Tensor& on, const std::function<void()>& rows,
                         const std::function<void()>& columns) {
  if (route.rows.empty()) return columns();
#ifdef GSPN_WITH_CUDA
  if (runs_cuda_kernels(on)) return side_by_side_cuda(on, rows, columns);
#endif
  rows();
  columns();
}

// ---- forward and backward of one launch ------------------------------------

// h of pb's directions into out (pb.Dt directions). columns_staged: pb's
// directions are columns that columns_staged() found fit to run staged.
void forward_into(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& lam, at::Tensor& out,
                  const ScanProblem& pb, bool columns_staged = false, const at::Tensor& decay = at::Tensor()) {
  if (runs_cuda_kernels(x)) {
#ifdef GSPN_WITH_CUDA
    scan_forward_cuda(x, gates, lam, out, pb, columns_staged);
#else
    TORCH_CHECK(false, "gspn::scan: this build has no CUDA kernels");
#endif
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_scan_cpu", [&] {
    forward_cpu<scalar_t>(pb, x.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(), lam.data_ptr<scalar_t>(),
                          pb.decay ? decay.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>());
  });
}

// Per-direction gradients of one call: dx and dlam (B, Dt, C, H, W), and the
// gates' in `dgates` (B, Dt, G, 3, H, W), whose dtype says how they are
// accumulated: the input dtype where each channel has its own gates on CUDA,
// else float32 (float64 for double) -- CUDA channels sharing a group add
// into it with atomics, CPU tasks write partial sums that are then added.
// With fused decay (CPU) also ddecay (B, Dt, G, H, W) in float32 (float64).
struct Gradients {
  at::Tensor dx, dgates, dlam, ddecay;
};

Gradients allocate_gradients(const at::Tensor& x, const at::Tensor& gates, const ScanProblem& pb) {
  const std::vector<int64_t> per_direction{pb.B, pb.Dt, pb.C, pb.H, pb.W};
  Gradients g{at::empty(per_direction, x.options()), at::Tensor(), at::empty(per_direction, x.options())};
  const auto acc = gates.options().dtype(at::toOpMathType(gates.scalar_type()));
  if (!runs_cuda_kernels(x)) g.dgates = at::empty(gates.sizes(), acc);  // each launch fills its directions
  else if (pb.G == pb.C) g.dgates = at::empty_like(gates);
  else g.dgates = at::zeros(gates.sizes(), acc);
  return g;
}

// The gradients of pb's directions into g (columns_staged as in
// forward_into). With fused normalisation they are the logits' already: the
// kernels apply the chain rule (linear in the gates' gradients, so the
// channels of a group may add theirs) where a separate pass over the gate
// tensor read the logits and the gradients again -- CUDA per position, the
// CPU per tile (logit_gradients).
void backward_into(const at::Tensor& grad_h, const at::Tensor& h, const at::Tensor& x, const at::Tensor& gates,
                   const at::Tensor& lam, Gradients& g, const ScanProblem& pb, bool columns_staged = false,
                   const at::Tensor& decay = at::Tensor()) {
  if (runs_cuda_kernels(x)) {
#ifdef GSPN_WITH_CUDA
    scan_backward_cuda(grad_h, h, x, gates, lam, g.dx, g.dgates, g.dlam, pb, columns_staged);
#else
    TORCH_CHECK(false, "gspn::scan_backward: this build has no CUDA kernels");
#endif
    return;
  }
  const CpuTasks plan = plan_tasks(pb);
  // Every task writes every position of its partial planes: no zero fill
  // (at G = C a pass over three gate planes per channel and direction).
  at::Tensor partial = at::empty({pb.B, pb.D, pb.G, plan.slices, 3, pb.H, pb.W}, g.dgates.options());
  at::Tensor decay_partial;
  if (pb.decay) decay_partial = at::empty({pb.B, pb.D, pb.G, plan.slices, pb.H, pb.W}, g.dgates.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_scan_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_cpu<scalar_t>(pb, plan, grad_h.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                           gates.data_ptr<scalar_t>(), lam.data_ptr<scalar_t>(),
                           pb.decay ? decay.data_ptr<scalar_t>() : nullptr, g.dx.data_ptr<scalar_t>(),
                           partial.data_ptr<acc_t>(), pb.decay ? decay_partial.data_ptr<acc_t>() : nullptr,
                           g.dlam.data_ptr<scalar_t>());
  });
  if (pb.decay) g.ddecay = plan.slices == 1 ? decay_partial.squeeze(3) : decay_partial.sum(3);  // route: not taken
  const at::Tensor summed = plan.slices == 1 ? partial.squeeze(3) : partial.sum(3);
  if (pb.D == pb.Dt) {
    g.dgates = summed;  // every direction: no copy
  } else {
    for (int64_t d = 0; d < pb.D; ++d) g.dgates.select(1, pb.slot(d)).copy_(summed.select(1, d));
  }
}

// ---- the op ---------------------------------------------------------------

// The decay logits of a call ((B, D, G, H, W), fused with the gate
// normalisation), checked, and what the kernels take with them: the CPU
// kernels fuse them (pb.decay); the CUDA scan kernels (which do not yet) take
// the decayed gates, made in one pass by decayed_gates_cuda, as plain gates,
// in float for 16-bit inputs (in 16 bits the taps' sum rounds off the decay
// it carries: a sum of 1.002 for sigmoid(8) = 0.99966 in bf16, and a scan of
// 1024 lines 3x off), which the staged column kernels do not take.
struct DecayedGates {
  at::Tensor logits, gates, decay;
  bool apart;  // gates = decayed_gates_cuda(logits, decay)
};

DecayedGates decayed_gates(const at::Tensor& gates_in, const std::optional<at::Tensor>& decay_in, ScanProblem& pb) {
  DecayedGates in{dense(gates_in), at::Tensor(), at::Tensor(), false};
  in.gates = in.logits;
  if (!decay_in.has_value() || !decay_in->defined()) return in;
  const at::Tensor& decay = *decay_in;
  TORCH_CHECK(pb.normalize, "gspn::scan: decay weighs the normalised gates, so it needs normalize=True (gates "
              "given as logits); with gates given as they are, multiply them by sigmoid(decay) instead");
  TORCH_CHECK(decay.sizes() == at::IntArrayRef({pb.B, pb.D, pb.G, pb.H, pb.W}), "gspn::scan: decay must be "
              "(B, D, G, H, W) = (", pb.B, ", ", pb.D, ", ", pb.G, ", ", pb.H, ", ", pb.W, "), got ", decay.sizes());
  TORCH_CHECK(decay.scalar_type() == gates_in.scalar_type() && decay.device() == gates_in.device(),
              "gspn::scan: decay must match gates in dtype and device");
  in.decay = dense(decay);
  if (runs_cuda_kernels(in.logits)) {
#ifdef GSPN_WITH_CUDA
    in.gates = decayed_gates_cuda(in.logits, in.decay, pb);
    in.apart = true;
    pb.normalize = false;
#else
    TORCH_CHECK(false, "gspn::scan: this build has no CUDA kernels");
#endif
  } else {
    pb.decay = true;
  }
  return in;
}

at::Tensor scan_forward(const at::Tensor& x_in, const at::Tensor& gates_in, const at::Tensor& lam_in,
                        at::IntArrayRef directions, int64_t chunk, bool normalize, int64_t columns_as_rows,
                        const std::optional<at::Tensor>& decay_in) {
  ScanProblem pb = make_problem(x_in, gates_in, lam_in, directions, chunk, normalize);
  const DecayedGates in = decayed_gates(gates_in, decay_in, pb);
  const at::Tensor x = dense(x_in), gates = in.gates, lam = dense(lam_in);
  at::Tensor out = at::empty({pb.B, pb.D, pb.C, pb.H, pb.W}, x.options());
  if (out.numel() == 0) return out;
  const ColumnRoute route = column_route(pb, columns_as_rows);
  if (!route.taken()) {
    forward_into(x, gates, lam, out, pb, false, in.decay);
    return out;
  }
  auto rows = [&] { forward_into(x, gates, lam, out, launch_of(pb, route.rows)); };
  auto columns = [&] {
    const ScanProblem in_place = launch_of(pb, route.columns);
    if (columns_staged(in_place, gates, {x, gates, lam, out}, false)) {
      forward_into(x, gates, lam, out, in_place, true);
      return;
    }
    const ColumnLaunch launch = column_launch(pb, route, x, gates, lam);
    at::Tensor ht = at::empty({pb.B, launch.pb.D, pb.C, pb.W, pb.H}, x.options());
    forward_into(launch.x, launch.gates, launch.lam, ht, launch.pb);
    put_back_columns(out, ht, route.columns);
  };
  rows_beside_columns(route, x, rows, columns);
  return out;
}

// Gradients of x, of the gates (their logits with normalize) and of lam,
// then of the decay logits (an empty tensor for a call without them).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> scan_backward(
    const at::Tensor& grad_h_in, const at::Tensor& h_in, const at::Tensor& x_in,
    const at::Tensor& gates_in, const at::Tensor& lam_in, at::IntArrayRef directions, int64_t chunk,
    bool normalize, int64_t columns_as_rows, const std::optional<at::Tensor>& decay_in) {
  ScanProblem pb = make_problem(x_in, gates_in, lam_in, directions, chunk, normalize);
  const std::vector<int64_t> full{pb.B, pb.D, pb.C, pb.H, pb.W};
  TORCH_CHECK(grad_h_in.sizes() == at::IntArrayRef(full) && h_in.sizes() == at::IntArrayRef(full),
              "gspn::scan_backward: grad_h and h must be (B, D, C, H, W)");
  const DecayedGates in = decayed_gates(gates_in, decay_in, pb);
  const at::Tensor grad_h = dense(grad_h_in).to(x_in.scalar_type()), h = dense(h_in);
  const at::Tensor x = dense(x_in), gates = in.gates, lam = dense(lam_in);
  Gradients g = allocate_gradients(x, gates, pb);
  const ColumnRoute route = column_route(pb, columns_as_rows);
  if (x.numel() == 0 || gates.numel() == 0) {
    g.dx.zero_();
    g.dlam.zero_();
    g.dgates.zero_();
    if (in.decay.defined()) g.ddecay = at::zeros_like(in.decay);
  } else if (!route.taken()) {
    backward_into(grad_h, h, x, gates, lam, g, pb, false, in.decay);
  } else {
    auto rows = [&] { backward_into(grad_h, h, x, gates, lam, g, launch_of(pb, route.rows)); };
    auto columns = [&] {
      const ScanProblem in_place = launch_of(pb, route.columns);
      if (columns_staged(in_place, gates, {grad_h, h, x, gates, lam, g.dx, g.dgates, g.dlam}, true)) {
        backward_into(grad_h, h, x, gates, lam, g, in_place, true);
        return;
      }
      const ColumnLaunch launch = column_launch(pb, route, x, gates, lam);
      Gradients gc = allocate_gradients(launch.x, launch.gates, launch.pb);
      backward_into(columns_transposed(grad_h, route.columns, true), columns_transposed(h, route.columns, true),
                    launch.x, launch.gates, launch.lam, gc, launch.pb);
      put_back_columns(g.dx, gc.dx, route.columns);
      put_back_columns(g.dlam, gc.dlam, route.columns);
      put_back_columns(g.dgates, gc.dgates, route.columns);
    };
    rows_beside_columns(route, x, rows, columns);
  }
#ifdef GSPN_WITH_CUDA
  if (in.apart) std::tie(g.dgates, g.ddecay) = decayed_gates_backward_cuda(in.logits, in.decay, g.dgates, pb);
#endif
  const at::Tensor dgates = g.dgates.to(gates_in.scalar_type());
  const at::Tensor ddecay =
      in.decay.defined() ? g.ddecay.to(gates_in.scalar_type()) : at::empty({0}, gates_in.options());
  at::Tensor dx = g.dx, dlam = g.dlam;
  if (x_in.dim() == 4) dx = pb.D == 1 ? dx.squeeze(1) : dx.sum(1);
  if (lam_in.dim() == 4) dlam = pb.D == 1 ? dlam.squeeze(1) : dlam.sum(1);
  return {dx, dgates, dlam, ddecay};
}

}  // namespace

TORCH_LIBRARY_IMPL(gspn, CPU, m) {
  m.impl("scan", &scan_forward);
  m.impl("scan_backward", &scan_backward);
}

#if defined(GSPN_WITH_CUDA) && !defined(GSPN_CUDA_SIM)
TORCH_LIBRARY_IMPL(gspn, CUDA, m) {
  m.impl("scan", &scan_forward);
  m.impl("scan_backward", &scan_backward);
}
#endif

}  // namespace gspn
