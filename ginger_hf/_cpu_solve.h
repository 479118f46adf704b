// The small per-block problems of a Ginger step in double (ginger_hf/solve.py's solve_refresh and solve_keep;
// the math is described there). Fixed-size arrays on the stack: no allocation, no zero-filling per block. The
// usual ranks (1, 2, 4, 8) are compiled for their exact size (the small loops unrolled: a refresh's solves took
// 25% less time at tau 4, same numbers); any other rank up to kMaxRank takes the general code. Included by
// _cpu_kernel.cpp after the generated ginger_interface.h.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "_cpu_eigh.h"  // matmul, jacobi_eigh, rank_one_eigh (RankOne, secular_roots)

namespace {

// Named places in a block's row of sums / coefficients (the offset tables of ginger_hf/solve.py's layouts).
struct StatsView {
  int64_t width, gram, uc, um, cc, cm, mm, gg;
  explicit StatsView(const int64_t* o)
      : width(o[StatsAt::width]), gram(o[StatsAt::gram]), uc(o[StatsAt::uc]), um(o[StatsAt::um]),
        cc(o[StatsAt::cc]), cm(o[StatsAt::cm]), mm(o[StatsAt::mm]), gg(o[StatsAt::gg]) {}
};
struct CoefView {
  int64_t width, scale, along, lr, decay, rho, v_c, shrink, shift, v_u;
  explicit CoefView(const int64_t* o)
      : width(o[CoefAt::width]), scale(o[CoefAt::scale]), along(o[CoefAt::along]), lr(o[CoefAt::lr]),
        decay(o[CoefAt::decay]), rho(o[CoefAt::rho]), v_c(o[CoefAt::v_c]), shrink(o[CoefAt::shrink]),
        shift(o[CoefAt::shift]), v_u(o[CoefAt::v_u]) {}
};

// The solves for rank N (0: any rank up to kMaxRank): with N known, the compiler unrolls the small loops
// and the stack arrays are sized for it.
template <int N>
struct Solve {
  static constexpr int NR = N > 0 ? N : kMaxRank;

  // (G^{-1/2}, G^{1/2}) of a symmetric positive definite G near I: a series where G is within 1e-5 of I,
  // else coupled Newton-Schulz until the correction is at rounding level, else an eigen-decomposition.
  static void inverse_sqrt(int n, const double* G, double* Z, double* Y) {
    if constexpr (N > 0) n = N;
    double dev = 0;
    for (int i = 0; i < n; ++i) for (int j = 0; j < n; ++j) dev = std::fmax(dev, std::fabs(G[i * n + j] - (i == j)));
    if (dev < 1e-5) {  // (I + E)^(-1/2) = I - E/2 + 3E^2/8 - 5E^3/16, (I + E)^(1/2) = I + E/2 - E^2/8 + E^3/16
      double E[NR * NR], E2[NR * NR], E3[NR * NR];
      for (int i = 0; i < n * n; ++i) E[i] = G[i] - (i % (n + 1) == 0);
      matmul(E, E, E2, n, n, n);
      const bool third = dev >= 1e-6;  // below, |E|^3 < 1e-18
      if (third) matmul(E2, E, E3, n, n, n);
      for (int i = 0; i < n * n; ++i) {
        const double id = i % (n + 1) == 0;
        Z[i] = id - 0.5 * E[i] + 0.375 * E2[i] - (third ? 0.3125 * E3[i] : 0.0);
        Y[i] = id + 0.5 * E[i] - 0.125 * E2[i] + (third ? 0.0625 * E3[i] : 0.0);
      }
      return;
    }
    double T[NR * NR], tmp[NR * NR];
    std::memcpy(Y, G, sizeof(double) * n * n);
    for (int i = 0; i < n * n; ++i) Z[i] = i % (n + 1) == 0;
    for (int it = 0; it < 8; ++it) {
      matmul(Z, Y, T, n, n, n);
      double step = 0;
      for (int i = 0; i < n * n; ++i) {
        const double id = i % (n + 1) == 0;
        T[i] = 1.5 * id - 0.5 * T[i];
        step = std::fmax(step, std::fabs(T[i] - id));
      }
      if (step == 0) return;
      matmul(Y, T, tmp, n, n, n);
      std::memcpy(Y, tmp, sizeof(double) * n * n);
      matmul(T, Z, tmp, n, n, n);
      std::memcpy(Z, tmp, sizeof(double) * n * n);
      if (step < 1e-9 && it < 7) return;  // the next correction would be below 1e-18: converged
    }
    double e[NR], Q[NR * NR];
    Eigh<NR>::jacobi_eigh(n, G, e, Q);
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) {
        double zs = 0, ys = 0;
        for (int k = 0; k < n; ++k) {
          const double root = std::sqrt(std::fmax(e[k], 1e-300));
          zs += Q[i * n + k] * Q[j * n + k] / root;
          ys += Q[i * n + k] * Q[j * n + k] * root;
        }
        Z[i * n + j] = zs;
        Y[i * n + j] = ys;
      }
  }

  static inline double powm(double x, double power) {  // x^-power, exact paths for the two usual powers
    return power == 1.0 ? 1 / x : power == 0.5 ? 1 / std::sqrt(x) : std::pow(x, -power);
  }

  // e <- beta2 e + (1 - beta2) |g|^2: the gradient's energy, every step (the scale of relative damping).
  static inline double energy(double e, const double* stats, const StatsView& sv, const double* prm) {
    return prm[Param::beta2] * e + (1 - prm[Param::beta2]) * stats[sv.gg];
  }

  // gamma = damping + relative_damping * e_hat / k, e_hat = e / debias_e.
  static inline double damping_of(double en, const double* prm) {
    return prm[Param::damping] + prm[Param::relative_damping] * en / (prm[Param::debias_e] * prm[Param::k]);
  }

  // u = scale (m' - a.U) = f(G) m_hat over the eigenbasis B = R U (solve.py's _direction): a = R^T (phi * R um),
  // scale = gamma^-power / momentum_debias; |u|^2 and its part in span(U) before clipping.
  static void direction(int n, double gamma, const double* prm, const double* s, const double* R, const double* um, double mm,
                 double* a, double& scale, double& update_sq, double& span_sq) {
    if constexpr (N > 0) n = N;
    const double power = prm[Param::power], debias = prm[Param::debias];
    double phi[NR], y[NR];
    for (int i = 0; i < n; ++i) {
      phi[i] = 1 - powm((gamma + s[i] / debias) / gamma, power);
      y[i] = 0;
      for (int j = 0; j < n; ++j) y[i] += R[i * n + j] * um[j];
    }
    for (int i = 0; i < n; ++i) { a[i] = 0; for (int j = 0; j < n; ++j) a[i] += R[j * n + i] * phi[j] * y[j]; }
    scale = powm(gamma, power) / prm[Param::momentum_debias];
    double upd = mm, span = 0;
    for (int i = 0; i < n; ++i) {
      upd -= (2 * phi[i] - phi[i] * phi[i]) * y[i] * y[i];
      span += (1 - phi[i]) * (1 - phi[i]) * y[i] * y[i];
    }
    update_sq = scale * scale * std::fmax(upd, 0.0);
    span_sq = scale * scale * span;
  }

  // One block's refresh solve between its stages (refresh_begin, then the roots of its eigenproblem, then
  // refresh_end): the roots of many blocks are found side by side (secular_roots).
  struct Refresh {
    double W[NR * NR], Wi[NR * NR], RB[NR * NR], kk[NR], r;
    bool rotate;
    RankOne<NR + 1> eig;
  };

  // Solve blocks [from, to), eight at a time (their roots side by side); block i's out row (width apart):
  // coefficients (CoefView places; lr, decay, rho left to the caller), then the RefreshOut fields (new s, R, e,
  // rotate, update_sq, span_sq).
  static void solve_blocks(int n, int from, int to, const double* stats, const StatsView& sv, const double* s,
                           const double* R, const double* e, const double* prm, double* out, int64_t width,
                           const CoefView& cv) {
    if constexpr (N > 0) n = N;
    std::vector<Refresh> q(WD);
    RankOne<NR + 1>* eig[WD];
    for (int i0 = from; i0 < to; i0 += WD) {
      const int count = std::min(WD, to - i0);
      for (int j = 0; j < count; ++j) {
        const int64_t i = i0 + j;
        refresh_begin(n, stats + i * sv.width, sv, s + i * n, R + i * n * n, prm + i * kSolveParams, q[j]);
        eig[j] = &q[j].eig;
      }
      secular_roots(eig, count);
      for (int j = 0; j < count; ++j) {
        const int64_t i = i0 + j;
        refresh_end(n, stats + i * sv.width, sv, e[i], prm + i * kSolveParams, out + i * width, cv, q[j]);
      }
    }
  }

  // Up to the eigenproblem K = beta2 diag(s, 0) + (1 - beta2) z z^T, sorted and deflated in q.eig.
  static void refresh_begin(int n, const double* stats, const StatsView& sv, const double* s, const double* Rin,
                            const double* prm, Refresh& q) {
    if constexpr (N > 0) n = N;
    constexpr int N2 = NR * NR;
    const int m = n + 1;
    const double beta2 = prm[Param::beta2], tol = prm[Param::tolerance];
    double G[N2], tmp[N2], Z[N2], Y[N2];
    double *W = q.W, *Wi = q.Wi, *RB = q.RB, *kk = q.kk;  // kk: c in the orthonormal basis W U
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) G[i * n + j] = i <= j ? stats[sv.gram + i * n + j] : stats[sv.gram + j * n + i];
    const double* uc = stats + sv.uc;
    const double cc = stats[sv.cc];
    inverse_sqrt(n, G, W, Wi);
    for (int i = 0; i < n; ++i) { kk[i] = 0; for (int j = 0; j < n; ++j) kk[i] += W[i * n + j] * uc[j]; }
    matmul(Rin, Wi, tmp, n, n, n);  // the eigenbasis in W U: orthogonal up to rounding, made exactly so
    matmul_tn(tmp, tmp, G, n, n, n);
    inverse_sqrt(n, G, Z, Y);
    matmul(tmp, Z, RB, n, n, n);
    double r2 = cc;
    for (int i = 0; i < n; ++i) r2 -= kk[i] * kk[i];
    q.r = std::sqrt(std::fmax(r2, 0.0));
    q.rotate = q.r > tol * std::sqrt(cc);
    if (!q.rotate) q.r = 0;
    // K in (old eigenbasis, residual); in span, the residual slot is pinned at -1, below the rest, so that it
    // is the one dropped: the n-sized problem is all that is left.
    double z[NR + 1], dg[NR + 1];
    for (int i = 0; i < n; ++i) {
      z[i] = 0;
      for (int j = 0; j < n; ++j) z[i] += RB[i * n + j] * kk[j];
      dg[i] = beta2 * s[i];
    }
    z[n] = q.r;
    dg[n] = 0;
    Eigh<NR>::setup(q.rotate ? m : n, dg, z, 1 - beta2, q.eig);
  }

  // From the eigenproblem's roots to the coefficients and the new state (solve_blocks' out row).
  static void refresh_end(int n, const double* stats, const StatsView& sv, double e, const double* prm, double* out,
                          const CoefView& cv, const Refresh& q) {
    if constexpr (N > 0) n = N;
    constexpr int N2 = NR * NR;
    const int m = n + 1;
    const double *W = q.W, *Wi = q.Wi, *RB = q.RB, *kk = q.kk, r = q.r;
    const bool rotate = q.rotate;
    const double* um = stats + sv.um;
    const double cm = stats[sv.cm], mm = stats[sv.mm];
    double lam[NR + 1], V[(NR + 1) * (NR + 1)], Vs[(NR + 1) * (NR + 1)], tmp[N2];
    if (rotate) {
      Eigh<NR>::finish(q.eig, lam, V);
    } else {
      Eigh<NR>::finish(q.eig, lam + 1, Vs);
      lam[0] = -1;
      for (int i = 0; i < m; ++i)
        for (int j = 0; j < m; ++j) V[i * m + j] = j == 0 ? (i == n) : i == n ? 0.0 : Vs[i * n + j - 1];
    }
    double ed[(NR + 1)];  // the dropped eigenvector in coordinates (W U, residual)
    for (int i = 0; i < n; ++i) { ed[i] = 0; for (int j = 0; j < n; ++j) ed[i] += RB[j * n + i] * V[j * m]; }
    ed[n] = V[n * m];
    const double sigma = ed[n] >= 0 ? -1.0 : 1.0;  // reflect far from ed: |v|^2 >= 2
    double v[(NR + 1)], vv = 0;
    for (int i = 0; i < m; ++i) { v[i] = -sigma * ed[i] + (i == n ? 1.0 : 0.0); vv += v[i] * v[i]; }
    // The new eigenbasis C (n x m) in (W U, residual): its first n columns are V's top rows (eigenvectors 1..n)
    // times RB, its last V's residual row. Times H = I - 2 v v^T / vv restricted to columns 0..n-1, times W.
    double top[N2], Cv[NR];
    for (int i = 0; i < n; ++i) for (int j = 0; j < n; ++j) tmp[i * n + j] = V[j * m + i + 1];
    matmul(tmp, RB, top, n, n, n);
    for (int i = 0; i < n; ++i) {
      Cv[i] = V[n * m + i + 1] * v[n];
      for (int j = 0; j < n; ++j) Cv[i] += top[i * n + j] * v[j];
    }
    for (int i = 0; i < n; ++i) for (int j = 0; j < n; ++j) top[i * n + j] -= 2 * Cv[i] * v[j] / vv;
    RefreshOut ro(n, cv.width);
    double* Rn = out + ro.R;
    matmul(top, W, Rn, n, n, n);
    double shift[NR], v_u[NR], umn[NR];
    double* sn = out + ro.s;
    double v_c = 0;
    for (int i = 0; i < n; ++i) shift[i] = v_u[i] = 0;
    if (rotate) {
      double beta[NR], nub[NR];
      for (int i = 0; i < n; ++i) { beta[i] = 2 * v[i] / vv; nub[i] = v[i] - v[n] * kk[i] / r; }
      v_c = v[n] / r;
      for (int i = 0; i < n; ++i)
        for (int j = 0; j < n; ++j) { shift[i] += Wi[i * n + j] * beta[j]; v_u[i] += W[i * n + j] * nub[j]; }
    }
    double dot_nu_um = v_c * cm;
    for (int i = 0; i < n; ++i) dot_nu_um += v_u[i] * um[i];
    for (int i = 0; i < n; ++i) { sn[i] = std::fmax(lam[i + 1], 0.0); umn[i] = um[i] - shift[i] * dot_nu_um; }
    const double en = energy(e, stats, sv, prm);
    double a[NR], scale, update_sq, span_sq;
    direction(n, damping_of(en, prm), prm, sn, Rn, umn, mm, a, scale, update_sq, span_sq);
    double along = 0;
    for (int i = 0; i < n; ++i) along += a[i] * shift[i];
    out[cv.scale] = scale;
    out[cv.along] = along;
    out[cv.v_c] = v_c;
    for (int i = 0; i < n; ++i) { out[cv.shrink + i] = a[i]; out[cv.shift + i] = shift[i]; out[cv.v_u + i] = v_u[i]; }
    out[ro.e] = en;
    out[ro.rotate] = rotate ? 1.0 : 0.0;
    out[ro.update_sq] = update_sq;
    out[ro.span_sq] = span_sq;
  }

  // A step that keeps the model: u = scale (m' - a.U) with a = R^T (phi * R U m'); out row: the coefficients,
  // then the KeepOut fields.
  static void keep_block(int n, const double* stats, const StatsView& sv, const double* s, const double* R, double e,
                  const double* prm, double* out, const CoefView& cv) {
    if constexpr (N > 0) n = N;
    const double en = energy(e, stats, sv, prm);
    double a[NR];
    double* rest = out + cv.width;
    direction(n, damping_of(en, prm), prm, s, R, stats + sv.um, stats[sv.mm], a, out[cv.scale],
              rest[KeepOut::update_sq], rest[KeepOut::span_sq]);
    for (int i = 0; i < n; ++i) out[cv.shrink + i] = a[i];
    rest[KeepOut::e] = en;
  }
};

template <class F>
void by_rank(int n, F&& f) {  // f(Solve<N>{}) with N = n where it is instantiated
  switch (n) {
    case 1: f(Solve<1>{}); break;
    case 2: f(Solve<2>{}); break;
    case 4: f(Solve<4>{}); break;
    case 8: f(Solve<8>{}); break;
    default: f(Solve<0>{}); break;
  }
}
inline void solve_blocks(int n, int from, int to, const double* stats, const StatsView& sv, const double* s,
                         const double* R, const double* e, const double* prm, double* out, int64_t width,
                         const CoefView& cv) {
  by_rank(n, [&](auto k) { decltype(k)::solve_blocks(n, from, to, stats, sv, s, R, e, prm, out, width, cv); });
}
inline void keep_block(int n, const double* stats, const StatsView& sv, const double* s, const double* R,
                       double e, const double* prm, double* out, const CoefView& cv) {
  by_rank(n, [&](auto k) { decltype(k)::keep_block(n, stats, sv, s, R, e, prm, out, cv); });
}

}  // namespace
