// GSPN 2D linear propagation: the scan mathematics shared by the CPU (.cpp)
// and CUDA (.cu) kernels. No ATen here, only plain arithmetic that both
// compilers inline, so the two backends cannot drift apart.
//
// One scan direction visits the lines of an (H, W) plane in order; line t at
// position p:
//     h[t, p] = lam[t, p] * x[t, p] + sum_k g_k[t, p] * h[t-1, p-1+k],  k = 0, 1, 2
// with h = 0 outside the line and before the first line of a chunk.
// The reverse (adjoint) scan for a = dL/dh, visiting lines backwards:
//     a[t, q] = grad_h[t, q] + sum_k g_k[t+1, q+1-k] * a[t+1, q+1-k]
//     dx = lam * a,  dlam = x * a,  dg_k[t, p] = a[t, p] * h[t-1, p-1+k]
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define GSPN_HD __host__ __device__ __forceinline__
#else
#define GSPN_HD inline
#endif

namespace gspn {

// Same constant as gspn_diffusers.ops.reference.GATE_EPS: the floor of the
// gate-normaliser so that three underflowed sigmoids cannot divide by zero.
constexpr double kGateEps = 1e-12;

enum Direction : int { kTopBottom = 0, kBottomTop = 1, kLeftRight = 2, kRightLeft = 3 };

// Where line t, position p of one contiguous (H, W) plane lives:
//     offset = first + t * line_stride + p * pos_stride.
// Reverse directions walk with a negative line stride instead of a flipped copy,
// and "lr"/"rl" walk columns with pos_stride = W instead of a transposed copy.
struct LineGeometry {
  int64_t lines;        // T: sequential steps
  int64_t length;       // L: positions per line
  int64_t first;
  int64_t line_stride;
  int64_t pos_stride;
};

GSPN_HD LineGeometry line_geometry(int dir, int64_t H, int64_t W) {
  LineGeometry g;
  if (dir == kTopBottom) {
    g.lines = H; g.length = W; g.first = 0; g.line_stride = W; g.pos_stride = 1;
  } else if (dir == kBottomTop) {
    g.lines = H; g.length = W; g.first = (H - 1) * W; g.line_stride = -W; g.pos_stride = 1;
  } else if (dir == kLeftRight) {
    g.lines = W; g.length = H; g.first = 0; g.line_stride = 1; g.pos_stride = W;
  } else {
    g.lines = W; g.length = H; g.first = W - 1; g.line_stride = -1; g.pos_stride = W;
  }
  return g;
}

// Lines per chunk for a scan of `lines` lines; chunk 0 (or any chunk of at
// least `lines`) is one global chunk.
GSPN_HD int64_t chunk_length(int64_t chunk, int64_t lines) {
  return (chunk <= 0 || chunk >= lines) ? lines : chunk;
}

// Sizes of one launch. x and lam are either shared by all D directions
// (dir_stride 0) or given per direction. A launch may run some of the
// directions of its tensors (the op runs row and column directions of large
// CUDA planes as two launches, see scan_forward): its direction d is then the
// tensors' direction slot(d) of Dt; D == Dt and slot(d) == d otherwise.
struct ScanProblem {
  int64_t B, D, C, G, H, W;
  int64_t chunk;            // lines per chunk; >= lines means one global chunk
  int64_t x_batch_stride, x_dir_stride;
  int64_t lam_batch_stride, lam_dir_stride;
  int64_t Dt;               // directions in the tensors
  int slots;                // 2 bits per launch direction: slot(d) = (slots >> 2d) & 3
  int dirs[4];
  bool normalize;           // gates hold logits; normalise on the fly
  bool decay;               // with normalize: a decay logit per gate position (CPU kernels)

  GSPN_HD int64_t plane() const { return H * W; }
  GSPN_HD int64_t channels_per_group() const { return C / G; }
  // The tensors' direction that launch direction d reads and writes (a
  // shift, not an array index, so device code keeps it in registers).
  GSPN_HD int64_t slot(int64_t d) const { return (slots >> (2 * d)) & 3; }
  // Offsets (in elements) of the start of one (H, W) plane.
  GSPN_HD int64_t x_plane(int64_t b, int64_t d, int64_t c) const {
    return b * x_batch_stride + slot(d) * x_dir_stride + c * plane();
  }
  GSPN_HD int64_t lam_plane(int64_t b, int64_t d, int64_t c) const {
    return b * lam_batch_stride + slot(d) * lam_dir_stride + c * plane();
  }
  GSPN_HD int64_t out_plane(int64_t b, int64_t d, int64_t c) const {
    return ((b * Dt + slot(d)) * C + c) * plane();
  }
  // Tap k of gate group g.
  GSPN_HD int64_t gate_plane(int64_t b, int64_t d, int64_t g, int k) const {
    return (((b * Dt + slot(d)) * G + g) * 3 + k) * plane();
  }
  // The decay logits of gate group g, (B, Dt, G, H, W).
  GSPN_HD int64_t decay_plane(int64_t b, int64_t d, int64_t g) const {
    return ((b * Dt + slot(d)) * G + g) * plane();
  }
};

// Slots of a launch that runs all its tensors' directions in order.
constexpr int kIdentitySlots = 0 | (1 << 2) | (2 << 4) | (3 << 6);

// The CPU's steps, shared with its vectorised gate normalisation
// (gspn_scan.cpp), which takes them on whole vectors: v clamped to
// [kExpMin, kExpMax] (keeps 2^n a normal float); t = v log2(e) + kExpRound
// rounds v / ln 2 to the integer n in the addition itself (floats near
// 1.5 * 2^23 are whole numbers), so n = t - kExpRound and t's low mantissa
// bits hold n + 127, the exponent field of 2^n (t's bits shifted left by
// 23); r = v - n ln 2 with ln 2 split in two, |r| <= ln 2 / 2, and
// exp(v) = exp_polynomial(r) 2^n.
constexpr float kExpMin = -87.3f, kExpMax = 88.0f, kExpLog2e = 1.44269504f;
constexpr float kExpRound = 12582912.f + 127.f;  // 1.5 * 2^23 + the exponent bias
constexpr float kExpLn2High = 0.693145752f, kExpLn2Low = 1.42860677e-6f;
// exp(r) for |r| <= ln 2 / 2: 1 + r q(r), q of degree 4 fitted for the least
// largest relative error (Lawson's iteration; 9.1e-8, where the Taylor
// polynomial of degree 6 it replaced, a multiply-add more, had 1.6e-7), and
// exactly 1 at r = 0.
template <typename T>
GSPN_HD T exp_polynomial(T r) {
  return 1.f + r * (0.999999702f + r * (0.499991506f + r * (0.166676357f + r * (0.0418979302f + r * 0.00829031505f))));
}

// exp for the gate sigmoid. On the GPU in float the hardware's approximate
// exp2 with denormals flushed (ex2.approx.ftz: a multiply and one MUFU.EX2;
// relative error ~2^-21 plus |v| * 2^-24 from scaling v by log2 e, far inside
// the fp32 tolerance), where expf is a dozen instructions, and __expf, which
// keeps denormals, adds a compare and two scalings around each EX2: the gate
// arithmetic is most of the kernels' instructions. A flushed exp(-l) (l > 87)
// only turns sigmoid(l) = 1 / (1 + 1e-38) into exactly 1. On the CPU, float
// uses straight-line arithmetic instead of a libm call so that the loops over
// it vectorise (libm's expf does not without -ffast-math): the steps above,
// relative error below 1.7e-7 on the whole float range (measured on a 1e-5
// grid of [-88, 87]). double keeps libm's exp (fp64 is the exact path).
GSPN_HD float exp_of(float v) {
#if defined(__CUDA_ARCH__)
  float e;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(v * 1.44269504088896341f));
  return e;
#else
  v = v < kExpMin ? kExpMin : (v > kExpMax ? kExpMax : v);
  const float t = v * kExpLog2e + kExpRound;
  const float n = t - kExpRound;
  const float r = (v - n * kExpLn2High) - n * kExpLn2Low;
  uint32_t bits;
  memcpy(&bits, &t, sizeof(bits));
  bits <<= 23;  // 2^n
  float scale;
  memcpy(&scale, &bits, sizeof(scale));
  return exp_polynomial(r) * scale;
#endif
}
GSPN_HD double exp_of(double v) { return exp(v); }

// 1 / v. On the GPU in float the approximate reciprocal with denormals
// flushed (one MUFU.RCP, ~1 ulp) instead of the IEEE division's dozen
// instructions and slow-path call (__fdividef added range fix-ups around the
// MUFU); it gives 0 for v = inf, so sigmoid(-inf) stays 0. Its arguments here
// are 1 + exp(-l) >= 1, products and sums of those, and the taps' sum,
// floored at kGateEps: never denormal.
GSPN_HD float reciprocal(float v) {
#if defined(__CUDA_ARCH__)
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
#else
  return 1.0f / v;
#endif
}
GSPN_HD double reciprocal(double v) { return 1.0 / v; }

template <typename acc_t>
GSPN_HD acc_t sigmoid(acc_t v) {
  return reciprocal(acc_t(1) + exp_of(-v));
}

// normalize_taps computes g_k = m_k s_k / sum_j m_j s_j (s_k = sigmoid(l_k),
// m_k: whether tap k's neighbour exists) from u_k = 1 / s_k = 1 + exp(-l_k).
// On the CPU with one reciprocal instead of four: multiplying through by
// P = u0 u1 u2, g_k = m_k q_k / N with q_k the product of the other two u and
// N = sum_j m_j q_j, and the taps' sum is N / P. That holds where P <= 2^124
// (then N <= 3 P keeps 1 / N a normal float) and N >= kGateEps P (the floor
// does not hold): everywhere but where the three logits are very negative
// together (summing below about -86, or all below -27), where the quotient
// of sigmoids, the definition, is taken (as at NaN, which fails both
// comparisons). The reciprocals bound the CPU's vectorised normalisation
// (gspn_scan.cpp, normalize_interior): ~25 % faster with this form. The GPU
// keeps the quotient: there the product form trades 3 of a position's 7
// MUFU instructions (16 a cycle per SM) for a compare and a branch, about
// as many instructions as it saves (SASS, sm_90: csrc/README.md), untimed.
constexpr float kProductFormMax = 2.12676479e37f;  // 2^124

// Stability-context condition for one position: sigmoid of each tap, taps whose
// neighbour lies outside the line left out, divided by the sum of the rest.
// signed_sum: the sum divided by (floored at kGateEps), negative where the
// floor held; a kernel that keeps it and the gates can apply the chain rule
// without the logits (normalize_taps_backward_of_scan).
template <typename acc_t>
GSPN_HD void normalize_taps(acc_t l0, acc_t l1, acc_t l2, bool has_before, bool has_after,
                            acc_t& g0, acc_t& g1, acc_t& g2, acc_t& signed_sum) {
  const acc_t m0 = acc_t(has_before), m2 = acc_t(has_after);
  const acc_t u0 = acc_t(1) + exp_of(-l0);
  const acc_t u1 = acc_t(1) + exp_of(-l1);
  const acc_t u2 = acc_t(1) + exp_of(-l2);
#if !defined(__CUDA_ARCH__)
  const acc_t q0 = m0 * (u1 * u2), q1 = u0 * u2, q2 = m2 * (u0 * u1);
  const acc_t n = q0 + q1 + q2, all = u1 * q1;
  if (all <= acc_t(kProductFormMax) && n >= acc_t(kGateEps) * all) {
    const acc_t inv = reciprocal(n);
    g0 = q0 * inv;
    g1 = q1 * inv;
    g2 = q2 * inv;
    signed_sum = n * reciprocal(all);
    return;
  }
#endif
  const acc_t s0 = reciprocal(u0) * m0;
  const acc_t s1 = reciprocal(u1);
  const acc_t s2 = reciprocal(u2) * m2;
  const acc_t raw = s0 + s1 + s2;
  const acc_t sum = raw < acc_t(kGateEps) ? acc_t(kGateEps) : raw;
  signed_sum = raw > acc_t(kGateEps) ? sum : -sum;
  const acc_t inv = reciprocal(sum);
  g0 = s0 * inv;
  g1 = s1 * inv;
  g2 = s2 * inv;
}

template <typename acc_t>
GSPN_HD void normalize_taps(acc_t l0, acc_t l1, acc_t l2, bool has_before, bool has_after,
                            acc_t& g0, acc_t& g1, acc_t& g2) {
  acc_t signed_sum;  // unused: inlined, its arithmetic is dropped
  normalize_taps(l0, l1, l2, has_before, has_after, g0, g1, g2, signed_sum);
}

// Chain rule of normalize_taps for one position, from what the scan's
// forward arithmetic keeps instead of the logits: the normalised gates
// g_k = s_k m_k / S and normalize_taps' signed_sum (S, negative where the
// floor held), for gate gradients dg_k = a h_k (a: the position's adjoint,
// h_k: the previous line's state at its three neighbours). Since s_k = g_k S
// where m_k = 1 (and g_k = 0 where m_k = 0), dl_k = (dg_k - inner) g_k (1 - g_k S)
// with inner = sum_j dg_j g_j (zero where the floor held: its slope is 0),
// i.e. dl_k = a (h_k - m) g_k (1 - g_k S) with m = sum_j g_j h_j: a factored
// out, which the compiler may not do for us. (a = 1, h_k = dg_k: the chain
// rule of gradients already summed.)
template <typename acc_t>
GSPN_HD void normalize_taps_backward_of_scan(acc_t g0, acc_t g1, acc_t g2, acc_t signed_sum, acc_t a, acc_t h0,
                                             acc_t h1, acc_t h2, acc_t& dl0, acc_t& dl1, acc_t& dl2) {
  const acc_t sum = signed_sum < acc_t(0) ? -signed_sum : signed_sum;
  const acc_t m = signed_sum > acc_t(0) ? g0 * h0 + g1 * h1 + g2 * h2 : acc_t(0);
  dl0 = a * ((h0 - m) * (g0 - g0 * g0 * sum));
  dl1 = a * ((h1 - m) * (g1 - g1 * g1 * sum));
  dl2 = a * ((h2 - m) * (g2 - g2 * g2 * sum));
}

// Chain rule of decayed gates, G_k = sigmoid(a) g_k with g_k = normalize_taps'
// (the decay logit a of the position weighs all three taps, so that they sum
// to sigmoid(a) < 1): from the gradients dG_k, the logits' dl_k (the chain
// rule above with the adjoint a replaced by sigmoid(a) and h_k by dG_k:
// dg_k = sigmoid(a) dG_k) and the decay logit's
// da = sigmoid(a) (1 - sigmoid(a)) sum_k g_k dG_k (the floor does not matter here).
template <typename acc_t>
GSPN_HD void decayed_taps_backward(acc_t g0, acc_t g1, acc_t g2, acc_t signed_sum, acc_t sigmoid_a, acc_t dG0,
                                   acc_t dG1, acc_t dG2, acc_t& dl0, acc_t& dl1, acc_t& dl2, acc_t& da) {
  normalize_taps_backward_of_scan(g0, g1, g2, signed_sum, sigmoid_a, dG0, dG1, dG2, dl0, dl1, dl2);
  da = sigmoid_a * (acc_t(1) - sigmoid_a) * (g0 * dG0 + g1 * dG1 + g2 * dG2);
}

// Forward step. prev points at the previous line's hidden state for position p
// in a buffer padded by one zero on each side: prev[0], prev[1], prev[2] are
// positions p-1, p, p+1.
template <typename acc_t>
GSPN_HD acc_t propagate(acc_t lam_x, acc_t g0, acc_t g1, acc_t g2, const acc_t* prev) {
  return lam_x + g0 * prev[0] + g1 * prev[1] + g2 * prev[2];
}

// Adjoint step. The next line (t+1) stores v_k[q] = g_k[t+1, q] * a[t+1, q] in
// padded buffers; position q of line t gathers v_0[q+1] + v_1[q] + v_2[q-1].
// v0, v1, v2 point at position q (padded index q+1).
template <typename acc_t>
GSPN_HD acc_t gather_adjoint(const acc_t* v0, const acc_t* v1, const acc_t* v2) {
  return v0[1] + v1[0] + v2[-1];
}

}  // namespace gspn
