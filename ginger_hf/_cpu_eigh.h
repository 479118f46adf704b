// The small dense kernels of the refresh solve, in double: packed matrix products, cyclic Jacobi, and the
// closed-form eigen-decomposition of a diagonal plus a rank-one matrix (the refresh's eigenproblem).
// Included by _cpu_solve.h after the generated ginger_interface.h.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "_cpu_simd.h"  // vd: secular_roots' lanes

namespace {

constexpr int kMaxDim = kMaxRank + 1;  // the refresh's (n + 1)-sized eigenproblem

// Packed row-major matrices: C (r x c) = A (r x k) B (k x c); A^T B with A (k x r).
inline void matmul(const double* A, const double* B, double* C, int r, int k, int c) {
  for (int i = 0; i < r; ++i) {
    double* row = C + i * c;
    for (int j = 0; j < c; ++j) row[j] = 0;
    for (int l = 0; l < k; ++l) {
      const double x = A[i * k + l];
      for (int j = 0; j < c; ++j) row[j] += x * B[l * c + j];
    }
  }
}
inline void matmul_tn(const double* A, const double* B, double* C, int r, int k, int c) {
  for (int i = 0; i < r * c; ++i) C[i] = 0;
  for (int l = 0; l < k; ++l)
    for (int i = 0; i < r; ++i) {
      const double x = A[l * r + i];
      for (int j = 0; j < c; ++j) C[i * c + j] += x * B[l * c + j];
    }
}

// A rank-one eigenproblem between the stages of rank_one_eigh, for up to D slots: setup sorts and deflates,
// leaving K poles and weights to the secular equation; secular_roots (up to WD problems at once) fills origin
// and tau; finish makes the eigenpairs.
template <int D>
struct RankOne {
  int m, K, J[D], origin[D];
  double r, dd[D], u[D], Q[D * D], pole[D], w2[D], tau[D];
  bool deflated[D];
};

// The roots of the secular equations 1 + sum_a w2[a] / (pole[a] - lam) = 0 of up to WD rank-one problems at
// once: problem l in SIMD lane l, root i in vector i, the vectors in lockstep. Root i lies in (pole[i],
// pole[i + 1]) (the last in (pole[K-1], pole[K-1] + r]); its origin is the nearer pole, by the sign of f at the
// middle, and it is held as tau = lam - pole[origin]. From where g is zero with the other poles' sum frozen,
// Newton's method on g = f (a1 - t)(a2 - t) (the two poles around the root multiplied out; smooth on the
// bracket; bisection when a step leaves it; for the last root the second factor is 1) runs until g is at its
// rounding level or the step at t's; each lane stops on its own. One problem's roots one after another were
// chains of dependent divisions; eight problems side by side keep the divider busy (a refresh's roots at tau
// 4: about 1,550 cycles per row one by one, 670 side by side).
template <int D>
void secular_roots(RankOne<D>* const* ps, int count) {
  typedef long long vl __attribute__((vector_size(WD * 8)));
  constexpr double eps = std::numeric_limits<double>::epsilon();
  if (count == 0) return;
  int K = 0;
  double pl[D][WD] = {}, wl[D][WD] = {}, kl[WD], rl[WD];
  for (int l = 0; l < WD; ++l) {  // lanes past count repeat problem 0; they are never active
    const RankOne<D>& p = *ps[l < count ? l : 0];
    for (int a = 0; a < p.K; ++a) { pl[a][l] = p.pole[a]; wl[a][l] = p.w2[a]; }
    kl[l] = l < count ? p.K : 0;
    rl[l] = p.r;
    K = std::max(K, p.K);
  }
  vd pole[D], w[D];
  for (int a = 0; a < K; ++a) { pole[a] = ldd(pl[a]); w[a] = ldd(wl[a]); }
  const vd Kl = ldd(kl), r = ldd(rl), zero = vd{}, one = zero + 1, tol = (Kl + 2) * eps;
  auto vabs = [](vd x) { return x < 0 ? -x : x; };
  vd PO[D], lo[D], hi[D], t[D], a1[D], a2[D], W1[D], W2[D];
  vl last[D], near0[D], active[D];
  bool busy[D];
  // Whether root i's sum takes pole a: a pole of its problem, and not one of the two multiplied out.
  auto other = [&](int i, int a) -> vl { return (Kl > a) & (a != i) & (last[i] | (a != i + 1)); };
  for (int i = 0; i < K; ++i) {
    last[i] = Kl == i + 1;
    active[i] = Kl > i;
    const vd p0 = pole[i], p1 = i + 1 < K ? (last[i] ? p0 : pole[i + 1]) : p0;
    W1[i] = w[i];
    W2[i] = i + 1 < K ? (last[i] ? zero : w[i + 1]) : zero;
    // Origin and bracket: the sign of f at the middle of (pole[i], pole[i + 1]).
    const vd mid = (p1 - p0) / 2;
    vd f = one;
    for (int a = 0; a < K; ++a) f += Kl > a ? w[a] / ((pole[a] - p0) - mid) : zero;
    near0[i] = last[i] | (f >= 0);
    PO[i] = near0[i] ? p0 : p1;
    lo[i] = last[i] ? zero : near0[i] ? zero : (p0 - p1) + mid;
    hi[i] = last[i] ? r : near0[i] ? mid : zero;
    a1[i] = p0 - PO[i];
    a2[i] = last[i] ? zero : p1 - PO[i];
    // Start where g is zero with the other poles' sum frozen at the probe (a quadratic; the last root: linear).
    const vd probe = last[i] ? hi[i] : (a1[i] + a2[i]) / 2;
    vd H0 = one;
    for (int a = 0; a < K; ++a) H0 += other(i, a) ? w[a] / ((pole[a] - PO[i]) - probe) : zero;
    const vd mid_t = (lo[i] + hi[i]) / 2;
    const vd A = H0, B = -(H0 * (a1[i] + a2[i]) + W1[i] + W2[i]);
    const vd C = H0 * a1[i] * a2[i] + W1[i] * a2[i] + W2[i] * a1[i], disc = B * B - 4 * A * C;
    double sq[WD];
    for (int l = 0; l < WD; ++l) sq[l] = std::copysign(std::sqrt(std::fmax(disc[l], 0.0)), B[l]);
    const vd q = -(B + ldd(sq)) / 2, x1 = A != 0 ? q / A : -C / B, x2 = q != 0 ? C / q : x1;
    const vd guess = last[i] ? (H0 > 0 ? W1[i] / H0 : mid_t)
                             : disc >= 0 ? ((x1 > lo[i]) & (x1 < hi[i]) ? x1 : x2) : mid_t;
    t[i] = (guess > lo[i]) & (guess < hi[i]) ? guess : mid_t;
    busy[i] = true;
  }
  for (int it = 0; it < 100; ++it) {
    bool any = false;
    for (int i = 0; i < K; ++i) {
      if (!busy[i]) continue;
      vd H = one, dH = zero, Habs = one;
      for (int a = 0; a < K; ++a) {
        const vd qa = 1 / ((pole[a] - PO[i]) - t[i]), term = other(i, a) ? w[a] * qa : zero;
        H += term;
        Habs += vabs(term);
        dH += term * qa;
      }
      const vd d1 = a1[i] - t[i], f2 = last[i] ? one : a2[i] - t[i], P = d1 * f2;
      const vd g = P * H + W1[i] * f2 + W2[i] * d1;
      const vd dg = (last[i] ? -one : 2 * t[i] - a1[i] - a2[i]) * H + P * dH - (last[i] ? zero : W1[i]) - W2[i];
      const vd err = vabs(P) * Habs + W1[i] * vabs(f2) + W2[i] * vabs(d1);
      const vl step = active[i] & ~(vabs(g) <= tol * err);
      lo[i] = step & (g > 0) ? t[i] : lo[i];
      hi[i] = step & ~(g > 0) ? t[i] : hi[i];
      vd next = dg < 0 ? t[i] - g / dg : (lo[i] + hi[i]) / 2;
      next = (next > lo[i]) & (next < hi[i]) ? next : (lo[i] + hi[i]) / 2;
      const vl done = (vabs(next - t[i]) <= 2 * eps * vabs(next)) | (hi[i] - lo[i] <= 2 * eps * vabs(t[i]));
      t[i] = step ? next : t[i];
      active[i] = step & ~done;
      busy[i] = false;
      for (int l = 0; l < WD; ++l) busy[i] |= active[i][l] != 0;
      any |= busy[i];
    }
    if (!any) break;
  }
  for (int l = 0; l < count; ++l)
    for (int i = 0; i < ps[l]->K; ++i) {
      ps[l]->origin[i] = near0[i][l] ? i : i + 1;
      ps[l]->tau[i] = t[i][l];
    }
}


// Eigen-solvers with stack arrays for matrices up to NR + 1 (the refresh's (n + 1)-sized problem).
template <int NR>
struct Eigh {
  static constexpr int D = NR + 1;

  // Cyclic Jacobi: S (symmetric, n x n) = V diag(w) V^T, w ascending, eigenvectors in V's columns. Only the
  // fallback of inverse_sqrt for a Gram matrix far from I (the refresh's eigenproblem is rank_one_eigh's).
  static void jacobi_eigh(int n, const double* S, double* w, double* V) {
    double A[D * D], U[D * D];
    std::memcpy(A, S, sizeof(double) * n * n);
    double norm = 0;
    for (int i = 0; i < n * n; ++i) { norm += A[i] * A[i]; U[i] = i % (n + 1) == 0; }
    for (int sweep = 0; sweep < 64; ++sweep) {
      double off = 0;
      for (int p = 0; p < n; ++p) for (int q = p + 1; q < n; ++q) off += A[p * n + q] * A[p * n + q];
      if (off <= 1e-31 * norm) break;  // off-diagonal at rounding level
      for (int p = 0; p < n; ++p)
        for (int q = p + 1; q < n; ++q) {
          const double apq = A[p * n + q];
          if (std::fabs(apq) <= 1e-17 * (std::fabs(A[p * n + p]) + std::fabs(A[q * n + q]))) {
            A[p * n + q] = A[q * n + p] = 0;
            continue;
          }
          const double theta = (A[q * n + q] - A[p * n + p]) / (2 * apq);
          const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1));
          const double c = 1 / std::sqrt(t * t + 1), s = t * c, tau = s / (1 + c);
          A[p * n + p] -= t * apq;
          A[q * n + q] += t * apq;
          A[p * n + q] = A[q * n + p] = 0;
          for (int k = 0; k < n; ++k) {
            if (k != p && k != q) {
              const double g = A[k * n + p], h = A[k * n + q];
              A[k * n + p] = A[p * n + k] = g - s * (h + g * tau);
              A[k * n + q] = A[q * n + k] = h + s * (g - h * tau);
            }
            const double g = U[k * n + p], h = U[k * n + q];
            U[k * n + p] = g - s * (h + g * tau);
            U[k * n + q] = h + s * (g - h * tau);
          }
        }
    }
    int order[D];
    for (int i = 0; i < n; ++i) order[i] = i;
    std::sort(order, order + n, [&](int a, int b) { return A[a * n + a] < A[b * n + b]; });
    for (int j = 0; j < n; ++j) {
      w[j] = A[order[j] * n + order[j]];
      for (int k = 0; k < n; ++k) V[k * n + j] = U[k * n + order[j]];
    }
  }

  // K = diag(d) + rho z z^T (m x m, rho >= 0) = V diag(lam) V^T, lam ascending, eigenvectors in V's columns.
  // The rank-one update of a diagonal in closed form (the secular equation, as LAPACK's dlaed2-4):
  // deflation where rho |z_i| or (d_j - d_i) c s is at rounding level, then per root Newton's method on
  // the secular function with its two poles multiplied out (smooth on the root's interval; bisection when a
  // step leaves the bracket), each root held as an offset from its nearer pole; the eigenvectors
  // (d - lam)^-1 z' use Gu and Eisenstat's z' recomputed from the roots, so they are orthogonal to rounding.
  static void rank_one_eigh(int m, const double* d, const double* z, double rho, double* lam, double* V) {
    RankOne<D> p, *one = &p;
    setup(m, d, z, rho, p);
    secular_roots(&one, 1);
    finish(p, lam, V);
  }

  // Sorts and deflates: what is left to the secular equation goes to p.pole, p.w2 (p.K of them).
  static void setup(int m, const double* d, const double* z, double rho, RankOne<D>& p) {
    constexpr double eps = std::numeric_limits<double>::epsilon();
    p.m = m;
    double* dd = p.dd; double* u = p.u; double* Q = p.Q; bool* deflated = p.deflated;
    int idx[D];
    for (int i = 0; i < m; ++i) idx[i] = i;
    std::sort(idx, idx + m, [&](int a, int b) { return d[a] < d[b]; });
    // dd, u: sorted; Q's column i: slot i in K's coordinates
    double zz = 0, dmax = 0;
    for (int i = 0; i < m; ++i) { zz += z[i] * z[i]; dmax = std::fmax(dmax, std::fabs(d[i])); }
    const double r = p.r = rho * zz, zn = std::sqrt(zz), tol = 8 * eps * std::fmax(dmax, r);
    for (int i = 0; i < m * m; ++i) Q[i] = 0;
    for (int i = 0; i < m; ++i) {
      dd[i] = d[idx[i]];
      u[i] = zz > 0 ? z[idx[i]] / zn : 0.0;
      Q[idx[i] * m + i] = 1;
      deflated[i] = r * std::fabs(u[i]) <= tol;
    }
    for (int i = 0, prev = -1; i < m; ++i) {  // close poles: rotate u's weight from prev onto i
      if (deflated[i]) continue;
      if (prev >= 0) {
        // |(dd[i] - dd[prev]) c s| <= tol, with c s = u[i] u[prev] / t^2 (no hypot unless they deflate)
        const double t2 = u[prev] * u[prev] + u[i] * u[i];
        if (std::fabs((dd[i] - dd[prev]) * u[i] * u[prev]) <= tol * t2) {
          const double t = std::hypot(u[prev], u[i]), c = u[i] / t, s = u[prev] / t;
          const double dp = dd[prev], di = dd[i];
          dd[prev] = c * c * dp + s * s * di;
          dd[i] = s * s * dp + c * c * di;
          for (int k = 0; k < m; ++k) {
            const double qp = Q[k * m + prev], qi = Q[k * m + i];
            Q[k * m + prev] = c * qp - s * qi;
            Q[k * m + i] = s * qp + c * qi;
          }
          u[prev] = 0;
          u[i] = t;
          deflated[prev] = true;
        }
      }
      prev = i;
    }
    int K = 0;  // the slots left to the secular equation, ascending poles
    for (int i = 0; i < m; ++i) if (!deflated[i]) p.J[K++] = i;
    p.K = K;
    for (int a = 0; a < K; ++a) { p.pole[a] = dd[p.J[a]]; p.w2[a] = r * u[p.J[a]] * u[p.J[a]]; }
  }

  // The eigenpairs from the roots (lam ascending, eigenvectors in V's columns).
  static void finish(const RankOne<D>& p, double* lam, double* V) {
    const int m = p.m, K = p.K, *J = p.J, *origin = p.origin;
    const double r = p.r, *pole = p.pole, *tau = p.tau, *dd = p.dd, *u = p.u, *Q = p.Q;
    const bool* deflated = p.deflated;
    // Gu-Eisenstat: the z' for which the computed roots are exact; then the eigenvectors (pole - lam)^-1 z'.
    double zp[D];
    for (int i = 0; i < K; ++i) {
      double prod = ((pole[origin[i]] - pole[i]) + tau[i]) / r;
      for (int j = 0; j < K; ++j)
        if (j != i) prod *= ((pole[origin[j]] - pole[i]) + tau[j]) / (pole[j] - pole[i]);
      zp[i] = std::copysign(std::sqrt(std::fmax(prod, 0.0)), u[J[i]]);
    }
    struct Pair { double value; int secular; int slot; };  // an eigenpair: secular root, or deflated slot
    Pair pairs[D];
    int count = 0;
    for (int i = 0; i < m; ++i) if (deflated[i]) pairs[count++] = {dd[i], -1, i};
    for (int j = 0; j < K; ++j) pairs[count++] = {pole[origin[j]] + tau[j], j, -1};
    std::sort(pairs, pairs + m, [](const Pair& a, const Pair& b) { return a.value < b.value; });
    for (int c = 0; c < m; ++c) {
      lam[c] = pairs[c].value;
      if (pairs[c].secular < 0) {
        for (int k = 0; k < m; ++k) V[k * m + c] = Q[k * m + pairs[c].slot];
        continue;
      }
      const int j = pairs[c].secular;
      double x[D], norm = 0;
      for (int i = 0; i < K; ++i) {
        x[i] = zp[i] / ((pole[i] - pole[origin[j]]) - tau[j]);
        norm += x[i] * x[i];
      }
      norm = 1 / std::sqrt(norm);
      for (int k = 0; k < m; ++k) {
        double v = 0;
        for (int i = 0; i < K; ++i) v += Q[k * m + J[i]] * x[i];
        V[k * m + c] = v * norm;
      }
    }
  }
};

inline void rank_one_eigh(int m, const double* d, const double* z, double rho, double* lam, double* V) {
  Eigh<kMaxRank>::rank_one_eigh(m, d, z, rho, lam, V);
}

}  // namespace
