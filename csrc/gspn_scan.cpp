// GSPN scan: the host side of the custom op (shape checks, allocation, the
// gate-normalisation chain rule) and the CPU kernels.
//
// The op schemas are declared once, in Python (gspn_diffusers/ops/library.py),
// so that the pure-PyTorch reference can stand in when no compiler is present;
// this file only registers kernels for the CPU (and, when built with CUDA, the
// CUDA) dispatch key.
//
// CPU kernel layout: one task per (batch, direction, channel) plane for the
// forward scan. A task copies TILE lines at a time into small fp32 (fp64 for
// double) buffers laid out line-major, so the recurrence runs over contiguous
// memory in every direction; for "lr"/"rl" that copy reads TILE consecutive
// columns of each row, one cache line, instead of striding down a column.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "gspn_scan.h"

namespace gspn {

#ifdef GSPN_WITH_CUDA
void scan_forward_cuda(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& lam,
                       at::Tensor& out, const ScanProblem& pb);
void scan_backward_cuda(const at::Tensor& grad_h, const at::Tensor& h, const at::Tensor& x,
                        const at::Tensor& gates, const at::Tensor& lam, at::Tensor& dx,
                        at::Tensor& dgates, at::Tensor& dlam, const ScanProblem& pb);
#endif

namespace {

constexpr int64_t kTile = 16;  // lines staged per copy; 16 fp32 = one 64-byte cache line

ScanProblem make_problem(const at::Tensor& x, const at::Tensor& gates, const at::Tensor& lam,
                         at::IntArrayRef directions, int64_t chunk, bool normalize) {
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
    TORCH_CHECK(t.scalar_type() == gates.scalar_type() && t.device() == gates.device(),
                "gspn::scan: ", name, " must match gates in dtype and device");
  };
  check_like_x(x, "x");
  check_like_x(lam, "lam");
  TORCH_CHECK(chunk >= 0, "gspn::scan: chunk must be >= 0 (0 = global), got ", chunk);
  pb.chunk = chunk;
  pb.normalize = normalize;
  const int64_t plane = pb.H * pb.W;
  pb.x_dir_stride = x.dim() == 4 ? 0 : pb.C * plane;
  pb.x_batch_stride = x.dim() == 4 ? pb.C * plane : pb.D * pb.C * plane;
  pb.lam_dir_stride = lam.dim() == 4 ? 0 : pb.C * plane;
  pb.lam_batch_stride = lam.dim() == 4 ? pb.C * plane : pb.D * pb.C * plane;
  return pb;
}

// ---- tile copies between a strided plane and a line-major buffer ----------

// dst[s * pitch + p] = plane[line t0 + s, position p] for s < n, p < L.
template <typename scalar_t, typename acc_t>
void gather_lines(const scalar_t* plane, const LineGeometry& geo, int64_t t0, int64_t n,
                  acc_t* dst, int64_t pitch) {
  const int64_t L = geo.length;
  const scalar_t* base = plane + geo.first + t0 * geo.line_stride;
  if (geo.pos_stride == 1) {
    for (int64_t s = 0; s < n; ++s) {
      const scalar_t* src = base + s * geo.line_stride;
      acc_t* out = dst + s * pitch;
      for (int64_t p = 0; p < L; ++p) out[p] = static_cast<acc_t>(src[p]);
    }
  } else {
    for (int64_t p = 0; p < L; ++p) {
      const scalar_t* src = base + p * geo.pos_stride;
      for (int64_t s = 0; s < n; ++s) dst[s * pitch + p] = static_cast<acc_t>(src[s * geo.line_stride]);
    }
  }
}

// plane[line t0 + s, position p] = src[s * L + p] (or += when Accumulate).
template <bool Accumulate, typename out_t, typename acc_t>
void scatter_lines(const acc_t* src, const LineGeometry& geo, int64_t t0, int64_t n, out_t* plane) {
  const int64_t L = geo.length;
  out_t* base = plane + geo.first + t0 * geo.line_stride;
  const auto put = [](out_t& o, acc_t v) {
    if constexpr (Accumulate) o = static_cast<out_t>(static_cast<acc_t>(o) + v);
    else o = static_cast<out_t>(v);
  };
  if (geo.pos_stride == 1) {
    for (int64_t s = 0; s < n; ++s) {
      out_t* dst = base + s * geo.line_stride;
      for (int64_t p = 0; p < L; ++p) put(dst[p], src[s * L + p]);
    }
  } else {
    for (int64_t p = 0; p < L; ++p) {
      out_t* dst = base + p * geo.pos_stride;
      for (int64_t s = 0; s < n; ++s) put(dst[s * geo.line_stride], src[s * L + p]);
    }
  }
}

// Loads the three taps of one gate group for lines [t0, t0+n), normalised when
// the problem says the gates are logits.
template <typename scalar_t, typename acc_t>
void gather_gates(const scalar_t* const taps[3], const LineGeometry& geo, int64_t t0, int64_t n,
                  bool normalize, acc_t* g0, acc_t* g1, acc_t* g2) {
  const int64_t L = geo.length;
  gather_lines(taps[0], geo, t0, n, g0, L);
  gather_lines(taps[1], geo, t0, n, g1, L);
  gather_lines(taps[2], geo, t0, n, g2, L);
  if (!normalize) return;
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t p = 0; p < L; ++p) {
      const int64_t i = s * L + p;
      normalize_taps<acc_t>(g0[i], g1[i], g2[i], p > 0, p < L - 1, g0[i], g1[i], g2[i]);
    }
  }
}

// ---- forward ---------------------------------------------------------------

template <typename scalar_t>
void forward_cpu(const ScanProblem& pb, const scalar_t* x, const scalar_t* gates, const scalar_t* lam,
                 scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t planes = pb.B * pb.D * pb.C;
  const int64_t Cg = pb.channels_per_group();
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % pb.C, d = (task / pb.C) % pb.D, b = task / (pb.C * pb.D);
      const LineGeometry geo = line_geometry(pb.dirs[d], pb.H, pb.W);
      const int64_t T = geo.lines, L = geo.length, chunk = chunk_length(pb.chunk, T);
      buf.assign(6 * kTile * L + 2 * (L + 2), acc_t(0));
      acc_t* hx = buf.data();  // lam * x, overwritten by h
      acc_t* lm = hx + kTile * L;
      acc_t* g0 = lm + kTile * L;
      acc_t* g1 = g0 + kTile * L;
      acc_t* g2 = g1 + kTile * L;
      acc_t* state[2] = {g2 + kTile * L + 1, g2 + kTile * L + L + 3};  // padded by one zero each side
      const scalar_t* taps[3];
      for (int k = 0; k < 3; ++k) taps[k] = gates + pb.gate_plane(b, d, c / Cg, k);
      const scalar_t* xp = x + pb.x_plane(b, d, c);
      const scalar_t* lp = lam + pb.lam_plane(b, d, c);
      scalar_t* op = out + pb.out_plane(b, d, c);

      for (int64_t t0 = 0; t0 < T; t0 += kTile) {
        const int64_t n = std::min(kTile, T - t0);
        gather_lines(xp, geo, t0, n, hx, L);
        gather_lines(lp, geo, t0, n, lm, L);
        for (int64_t i = 0; i < n * L; ++i) hx[i] *= lm[i];
        gather_gates(taps, geo, t0, n, pb.normalize, g0, g1, g2);
        for (int64_t s = 0; s < n; ++s) {
          const int64_t t = t0 + s;
          acc_t* __restrict__ cur = state[t & 1];
          const acc_t* __restrict__ prev = state[(t & 1) ^ 1] - 1;  // prev[p] is position p-1
          acc_t* __restrict__ row = hx + s * L;
          if (t % chunk == 0) {
            for (int64_t p = 0; p < L; ++p) cur[p] = row[p];
          } else {
            const acc_t* a0 = g0 + s * L;
            const acc_t* a1 = g1 + s * L;
            const acc_t* a2 = g2 + s * L;
            for (int64_t p = 0; p < L; ++p) {
              const acc_t v = propagate(row[p], a0[p], a1[p], a2[p], prev + p);
              cur[p] = v;
              row[p] = v;
            }
          }
        }
        scatter_lines<false>(hx, geo, t0, n, op);
      }
    }
  });
}

// ---- backward --------------------------------------------------------------

// One task per (batch, direction, gate group, slice of the group's channels):
// the slice's channels run one after another and add their gate gradients
// into the task's own fp32 partial buffer, which the host sums over slices.
// No two tasks write the same memory, so the result is deterministic.
template <typename scalar_t>
void backward_cpu(const ScanProblem& pb, int64_t slices, const scalar_t* grad_h, const scalar_t* h,
                  const scalar_t* x, const scalar_t* gates, const scalar_t* lam, scalar_t* dx,
                  at::opmath_type<scalar_t>* dg_partial, scalar_t* dlam) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Cg = pb.channels_per_group();
  const int64_t per_slice = (Cg + slices - 1) / slices;
  const int64_t tasks = pb.B * pb.D * pb.G * slices;
  const int64_t plane = pb.plane();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t sl = task % slices;
      const int64_t g = (task / slices) % pb.G;
      const int64_t d = (task / (slices * pb.G)) % pb.D;
      const int64_t b = task / (slices * pb.G * pb.D);
      const LineGeometry geo = line_geometry(pb.dirs[d], pb.H, pb.W);
      const int64_t T = geo.lines, L = geo.length, chunk = chunk_length(pb.chunk, T);
      const int64_t TL = kTile * L;
      buf.assign(6 * TL + kTile * (L + 2) + 6 * (L + 2), acc_t(0));
      acc_t* adj = buf.data();  // grad_h, then the adjoint a
      acc_t* xs = adj + TL;     // x, then dlam
      acc_t* ls = xs + TL;      // lam, then dx
      acc_t* g0 = ls + TL;      // gates, then their gradients
      acc_t* g1 = g0 + TL;
      acc_t* g2 = g1 + TL;
      acc_t* hp = g2 + TL + 1;  // h of the previous line, rows padded by one zero each side
      acc_t* vbuf = g2 + TL + kTile * (L + 2) + 1;
      // v[j][k]: products g_k * a of the line processed last (j alternates).
      acc_t* v[2][3];
      for (int j = 0; j < 2; ++j)
        for (int k = 0; k < 3; ++k) v[j][k] = vbuf + (j * 3 + k) * (L + 2);
      const scalar_t* taps[3];
      for (int k = 0; k < 3; ++k) taps[k] = gates + pb.gate_plane(b, d, g, k);
      acc_t* dgp = dg_partial + (((b * pb.D + d) * pb.G + g) * slices + sl) * 3 * plane;
      const int64_t c_begin = g * Cg + sl * per_slice;
      const int64_t c_end = std::min(g * Cg + Cg, c_begin + per_slice);

      for (int64_t c = c_begin; c < c_end; ++c) {
        const scalar_t* gp = grad_h + pb.out_plane(b, d, c);
        const scalar_t* hpl = h + pb.out_plane(b, d, c);
        const scalar_t* xp = x + pb.x_plane(b, d, c);
        const scalar_t* lp = lam + pb.lam_plane(b, d, c);
        const int64_t last_tile = ((T - 1) / kTile) * kTile;
        for (int64_t t0 = last_tile; t0 >= 0; t0 -= kTile) {
          const int64_t n = std::min(kTile, T - t0);
          gather_lines(gp, geo, t0, n, adj, L);
          gather_lines(xp, geo, t0, n, xs, L);
          gather_lines(lp, geo, t0, n, ls, L);
          gather_gates(taps, geo, t0, n, pb.normalize, g0, g1, g2);
          // hp row s holds line t0 + s - 1.
          if (t0 > 0) {
            gather_lines(hpl, geo, t0 - 1, n, hp, L + 2);
          } else {
            std::fill(hp, hp + L, acc_t(0));
            gather_lines(hpl, geo, 0, n - 1, hp + (L + 2), L + 2);
          }
          for (int64_t s = n - 1; s >= 0; --s) {
            const int64_t t = t0 + s;
            const bool has_next = t + 1 < T && (t + 1) % chunk != 0;
            const bool has_prev = t % chunk != 0;
            acc_t* const* vn = v[(t & 1) ^ 1];
            acc_t* const* vc = v[t & 1];
            acc_t* a = adj + s * L;
            acc_t* a0 = g0 + s * L;
            acc_t* a1 = g1 + s * L;
            acc_t* a2 = g2 + s * L;
            const acc_t* hrow = hp + s * (L + 2) - 1;  // hrow[p + k] is position p-1+k
            for (int64_t p = 0; p < L; ++p) {
              const acc_t ap = a[p] + (has_next ? gather_adjoint(vn[0] + p, vn[1] + p, vn[2] + p) : acc_t(0));
              a[p] = ap;
              vc[0][p] = a0[p] * ap;
              vc[1][p] = a1[p] * ap;
              vc[2][p] = a2[p] * ap;
              if (has_prev) {
                a0[p] = ap * hrow[p];
                a1[p] = ap * hrow[p + 1];
                a2[p] = ap * hrow[p + 2];
              } else {
                a0[p] = a1[p] = a2[p] = acc_t(0);
              }
            }
          }
          for (int64_t i = 0; i < n * L; ++i) {
            const acc_t ai = adj[i];
            const acc_t xi = xs[i];
            xs[i] = ai * xi;     // dlam
            ls[i] = ai * ls[i];  // dx
          }
          scatter_lines<false>(ls, geo, t0, n, dx + pb.out_plane(b, d, c));
          scatter_lines<false>(xs, geo, t0, n, dlam + pb.out_plane(b, d, c));
          scatter_lines<true>(g0, geo, t0, n, dgp);
          scatter_lines<true>(g1, geo, t0, n, dgp + plane);
          scatter_lines<true>(g2, geo, t0, n, dgp + 2 * plane);
        }
      }
    }
  });
}

// ---- host side shared by both devices --------------------------------------

// Chain rule from the normalised gates back to their logits (fused
// normalisation). Elementwise over the gate tensor, so plain ATen serves both
// devices; it mirrors gspn_diffusers.ops.reference.normalize_gates.
at::Tensor normalize_backward(const at::Tensor& logits, const at::Tensor& dgates, const ScanProblem& pb) {
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor s = at::sigmoid(logits.to(acc));
  at::Tensor mask = at::ones({pb.D, 3, pb.H, pb.W}, s.options());
  for (int64_t d = 0; d < pb.D; ++d) {
    // Positions run along W for row scans and along H for column scans.
    const bool rows = pb.dirs[d] == kTopBottom || pb.dirs[d] == kBottomTop;
    const int64_t axis = rows ? 1 : 0;  // of an (H, W) plane
    mask[d][0].select(axis, 0).zero_();
    mask[d][2].select(axis, (rows ? pb.W : pb.H) - 1).zero_();
  }
  mask = mask.unsqueeze(0).unsqueeze(2);  // (1, D, 1, 3, H, W)
  const at::Tensor sm = s * mask;
  const at::Tensor sum = sm.sum(3, true);
  const at::Tensor denom = sum.clamp_min(kGateEps);
  const at::Tensor g = sm / denom;
  const at::Tensor dg = dgates.to(acc);
  const at::Tensor inner = (dg * g).sum(3, true) * (sum > kGateEps).to(acc);
  return ((dg - inner) / denom * mask * s * (1 - s)).to(logits.scalar_type());
}

at::Tensor scan_forward(const at::Tensor& x_in, const at::Tensor& gates_in, const at::Tensor& lam_in,
                        at::IntArrayRef directions, int64_t chunk, bool normalize) {
  const ScanProblem pb = make_problem(x_in, gates_in, lam_in, directions, chunk, normalize);
  const at::Tensor x = x_in.contiguous(), gates = gates_in.contiguous(), lam = lam_in.contiguous();
  at::Tensor out = at::empty({pb.B, pb.D, pb.C, pb.H, pb.W}, x.options());
  if (out.numel() == 0) return out;
  if (x.is_cuda()) {
#ifdef GSPN_WITH_CUDA
    scan_forward_cuda(x, gates, lam, out, pb);
#else
    TORCH_CHECK(false, "gspn::scan: this build has no CUDA kernels");
#endif
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_scan_cpu", [&] {
    forward_cpu<scalar_t>(pb, x.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(),
                          lam.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> scan_backward(
    const at::Tensor& grad_h_in, const at::Tensor& h_in, const at::Tensor& x_in,
    const at::Tensor& gates_in, const at::Tensor& lam_in, at::IntArrayRef directions, int64_t chunk,
    bool normalize) {
  const ScanProblem pb = make_problem(x_in, gates_in, lam_in, directions, chunk, normalize);
  const std::vector<int64_t> full{pb.B, pb.D, pb.C, pb.H, pb.W};
  TORCH_CHECK(grad_h_in.sizes() == at::IntArrayRef(full) && h_in.sizes() == at::IntArrayRef(full),
              "gspn::scan_backward: grad_h and h must be (B, D, C, H, W)");
  const at::Tensor grad_h = grad_h_in.contiguous().to(x_in.scalar_type()), h = h_in.contiguous();
  const at::Tensor x = x_in.contiguous(), gates = gates_in.contiguous(), lam = lam_in.contiguous();
  // Per-direction gradients of x and lam; shared inputs are summed over D below.
  at::Tensor dx = at::empty(full, x.options());
  at::Tensor dlam = at::empty(full, x.options());
  at::Tensor dgates;
  if (x.numel() == 0 || gates.numel() == 0) {
    dx.zero_();
    dlam.zero_();
    dgates = at::zeros_like(gates);
  } else if (x.is_cuda()) {
#ifdef GSPN_WITH_CUDA
    // Channels sharing a gate group add into one fp32 buffer with atomics;
    // per-channel gates are written directly in the input dtype.
    if (pb.G == pb.C) {
      dgates = at::empty_like(gates);
    } else {
      dgates = at::zeros(gates.sizes(), gates.options().dtype(at::toOpMathType(gates.scalar_type())));
    }
    scan_backward_cuda(grad_h, h, x, gates, lam, dx, dgates, dlam, pb);
#else
    TORCH_CHECK(false, "gspn::scan_backward: this build has no CUDA kernels");
#endif
  } else {
    const int64_t Cg = pb.channels_per_group();
    const int64_t groups = pb.B * pb.D * pb.G;
    const int64_t slices =
        std::max<int64_t>(1, std::min<int64_t>(Cg, (at::get_num_threads() + groups - 1) / groups));
    const auto acc = at::toOpMathType(x.scalar_type());
    at::Tensor partial = at::zeros({pb.B, pb.D, pb.G, slices, 3, pb.H, pb.W}, x.options().dtype(acc));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gspn_scan_backward_cpu", [&] {
      backward_cpu<scalar_t>(pb, slices, grad_h.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(),
                             x.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(), lam.data_ptr<scalar_t>(),
                             dx.data_ptr<scalar_t>(), partial.data_ptr<at::opmath_type<scalar_t>>(),
                             dlam.data_ptr<scalar_t>());
    });
    dgates = partial.sum(3);
  }
  if (normalize) dgates = normalize_backward(gates, dgates, pb);
  dgates = dgates.to(gates.scalar_type());
  if (x_in.dim() == 4) dx = pb.D == 1 ? dx.squeeze(1) : dx.sum(1);
  if (lam_in.dim() == 4) dlam = pb.D == 1 ? dlam.squeeze(1) : dlam.sum(1);
  return {dx, dgates, dlam};
}

}  // namespace

TORCH_LIBRARY_IMPL(gspn, CPU, m) {
  m.impl("scan", &scan_forward);
  m.impl("scan_backward", &scan_backward);
}

#ifdef GSPN_WITH_CUDA
TORCH_LIBRARY_IMPL(gspn, CUDA, m) {
  m.impl("scan", &scan_forward);
  m.impl("scan_backward", &scan_backward);
}
#endif

}  // namespace gspn
