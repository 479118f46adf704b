// The small per-block problems of a Ginger step in double (ginger_hf/solve.py's solve_refresh and solve_keep;
// the math is described there). Fixed-size arrays of rank up to kMaxRank on the stack: no allocation, no
// zero-filling per block. Included by _cpu_kernel.cpp after the generated ginger_interface.h.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

constexpr int kMaxDim = kMaxRank + 1;  // the refresh's (n + 1)-sized eigenproblem

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

// Cyclic Jacobi: S (symmetric, n x n) = V diag(w) V^T, w ascending, eigenvectors in V's columns. Only the
// fallback of inverse_sqrt for a Gram matrix far from I (the refresh's eigenproblem is rank_one_eigh's).
void jacobi_eigh(int n, const double* S, double* w, double* V) {
  double A[kMaxDim * kMaxDim], U[kMaxDim * kMaxDim];
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
  int order[kMaxDim];
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
void rank_one_eigh(int m, const double* d, const double* z, double rho, double* lam, double* V) {
  constexpr double eps = std::numeric_limits<double>::epsilon();
  int idx[kMaxDim];
  for (int i = 0; i < m; ++i) idx[i] = i;
  std::sort(idx, idx + m, [&](int a, int b) { return d[a] < d[b]; });
  double dd[kMaxDim], u[kMaxDim], Q[kMaxDim * kMaxDim];  // sorted; Q's column i: slot i in K's coordinates
  double zz = 0, dmax = 0;
  for (int i = 0; i < m; ++i) { zz += z[i] * z[i]; dmax = std::fmax(dmax, std::fabs(d[i])); }
  const double r = rho * zz, zn = std::sqrt(zz), tol = 8 * eps * std::fmax(dmax, r);
  for (int i = 0; i < m * m; ++i) Q[i] = 0;
  bool deflated[kMaxDim];
  for (int i = 0; i < m; ++i) {
    dd[i] = d[idx[i]];
    u[i] = zz > 0 ? z[idx[i]] / zn : 0.0;
    Q[idx[i] * m + i] = 1;
    deflated[i] = r * std::fabs(u[i]) <= tol;
  }
  for (int i = 0, prev = -1; i < m; ++i) {  // close poles: rotate u's weight from prev onto i
    if (deflated[i]) continue;
    if (prev >= 0) {
      const double t = std::hypot(u[prev], u[i]), c = u[i] / t, s = u[prev] / t;
      if (std::fabs((dd[i] - dd[prev]) * c * s) <= tol) {
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
  int J[kMaxDim], K = 0;  // the slots left to the secular equation, ascending poles
  for (int i = 0; i < m; ++i) if (!deflated[i]) J[K++] = i;
  double pole[kMaxDim], w2[kMaxDim], tau[kMaxDim];
  int origin[kMaxDim];
  for (int a = 0; a < K; ++a) { pole[a] = dd[J[a]]; w2[a] = r * u[J[a]] * u[J[a]]; }
  for (int root = 0; root < K; ++root) {
    // The root lies in (pole[root], pole[root + 1]) (the last one in (pole[K-1], pole[K-1] + r]): pick the
    // nearer pole as origin by the sign of f at the middle, then solve for tau = lam - pole[origin].
    const bool last = root == K - 1;
    int o = root;
    double lo, hi;
    if (last) {
      lo = 0; hi = r;
    } else {
      const double mid = (pole[root + 1] - pole[root]) / 2;
      double f = 1;
      for (int a = 0; a < K; ++a) f += w2[a] / ((pole[a] - pole[root]) - mid);
      if (f >= 0) { lo = 0; hi = mid; } else { o = root + 1; lo = (pole[root] - pole[o]) + mid; hi = 0; }
    }
    const int p1 = root, p2 = last ? -1 : root + 1;  // the poles around the root, multiplied out
    const double a1 = pole[p1] - pole[o], a2 = last ? 0.0 : pole[p2] - pole[o];
    // Start where g is zero with the other poles' sum H frozen at the interval's middle (a quadratic).
    const double probe = last ? hi : (a1 + a2) / 2;
    double H0 = 1;
    for (int a = 0; a < K; ++a)
      if (a != p1 && a != p2) H0 += w2[a] / ((pole[a] - pole[o]) - probe);
    double t = (lo + hi) / 2, guess = t;
    if (last) {
      guess = H0 > 0 ? w2[p1] / H0 : t;
    } else {  // H0 (a1 - t)(a2 - t) + w1 (a2 - t) + w2 (a1 - t) = A t^2 + B t + C
      const double A = H0, B = -(H0 * (a1 + a2) + w2[p1] + w2[p2]), C = H0 * a1 * a2 + w2[p1] * a2 + w2[p2] * a1;
      const double disc = B * B - 4 * A * C;
      if (disc >= 0) {
        const double q = -(B + std::copysign(std::sqrt(disc), B)) / 2;
        const double x1 = A != 0 ? q / A : -C / B, x2 = q != 0 ? C / q : x1;
        guess = x1 > lo && x1 < hi ? x1 : x2;
      }
    }
    if (guess > lo && guess < hi) t = guess;
    for (int it = 0; it < 100; ++it) {
      // g = f (a1 - t) (a2 - t) (without the second factor for the last root): decreasing through the bracket.
      double H = 1, dH = 0, Habs = 1;
      for (int a = 0; a < K; ++a) {
        if (a == p1 || a == p2) continue;
        const double q = 1 / ((pole[a] - pole[o]) - t);
        H += w2[a] * q;
        Habs += std::fabs(w2[a] * q);
        dH += w2[a] * q * q;
      }
      double g, dg, err;  // err: g's rounding error, below which its sign says nothing
      if (last) {
        g = (a1 - t) * H + w2[p1];
        dg = -H + (a1 - t) * dH;
        err = std::fabs(a1 - t) * Habs + w2[p1];
      } else {
        const double P = (a1 - t) * (a2 - t);
        g = P * H + w2[p1] * (a2 - t) + w2[p2] * (a1 - t);
        dg = (2 * t - a1 - a2) * H + P * dH - w2[p1] - w2[p2];
        err = std::fabs(P) * Habs + w2[p1] * std::fabs(a2 - t) + w2[p2] * std::fabs(a1 - t);
      }
      if (std::fabs(g) <= (K + 2) * eps * err) break;
      if (g > 0) lo = t; else hi = t;
      double next = dg < 0 ? t - g / dg : (lo + hi) / 2;
      if (!(next > lo && next < hi)) next = (lo + hi) / 2;
      const bool done = std::fabs(next - t) <= 2 * eps * std::fabs(next) || hi - lo <= 2 * eps * std::fabs(t);
      t = next;
      if (done) break;
    }
    origin[root] = o;
    tau[root] = t;
  }
  // Gu-Eisenstat: the z' for which the computed roots are exact; then the eigenvectors (pole - lam)^-1 z'.
  double zp[kMaxDim];
  for (int i = 0; i < K; ++i) {
    double prod = ((pole[origin[i]] - pole[i]) + tau[i]) / r;
    for (int j = 0; j < K; ++j)
      if (j != i) prod *= ((pole[origin[j]] - pole[i]) + tau[j]) / (pole[j] - pole[i]);
    zp[i] = std::copysign(std::sqrt(std::fmax(prod, 0.0)), u[J[i]]);
  }
  struct Pair { double value; int secular; int slot; };  // an eigenpair: secular root, or deflated slot
  Pair pairs[kMaxDim];
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
    double x[kMaxDim], norm = 0;
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

// (G^{-1/2}, G^{1/2}) of a symmetric positive definite G near I: a series where G is within 1e-5 of I,
// else coupled Newton-Schulz until the correction is at rounding level, else an eigen-decomposition.
void inverse_sqrt(int n, const double* G, double* Z, double* Y) {
  double dev = 0;
  for (int i = 0; i < n; ++i) for (int j = 0; j < n; ++j) dev = std::fmax(dev, std::fabs(G[i * n + j] - (i == j)));
  if (dev < 1e-5) {  // (I + E)^(-1/2) = I - E/2 + 3E^2/8 - 5E^3/16, (I + E)^(1/2) = I + E/2 - E^2/8 + E^3/16
    double E[kMaxRank * kMaxRank], E2[kMaxRank * kMaxRank], E3[kMaxRank * kMaxRank];
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
  double T[kMaxRank * kMaxRank], tmp[kMaxRank * kMaxRank];
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
  double e[kMaxRank], Q[kMaxRank * kMaxRank];
  jacobi_eigh(n, G, e, Q);
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

inline double powm(double x, double power) {  // x^-power, exact paths for the two usual powers
  return power == 1.0 ? 1 / x : power == 0.5 ? 1 / std::sqrt(x) : std::pow(x, -power);
}

// e <- beta2 e + (1 - beta2) |g|^2: the gradient's energy, every step (the scale of relative damping).
inline double energy(double e, const double* stats, const StatsView& sv, const double* prm) {
  return prm[Param::beta2] * e + (1 - prm[Param::beta2]) * stats[sv.gg];
}

// gamma = damping + relative_damping * e_hat / k, e_hat = e / debias_e.
inline double damping_of(double en, const double* prm) {
  return prm[Param::damping] + prm[Param::relative_damping] * en / (prm[Param::debias_e] * prm[Param::k]);
}

// u = scale (m' - a.U) = f(G) m_hat over the eigenbasis B = R U (solve.py's _direction): a = R^T (phi * R um),
// scale = gamma^-power / momentum_debias; |u|^2 and its part in span(U) before clipping.
void direction(int n, double gamma, const double* prm, const double* s, const double* R, const double* um, double mm,
               double* a, double& scale, double& update_sq, double& span_sq) {
  const double power = prm[Param::power], debias = prm[Param::debias];
  double phi[kMaxRank], y[kMaxRank];
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

// Solve one block; out row: coefficients (CoefView places; lr, decay, rho left to the caller), then the
// RefreshOut fields (new s, R, e, rotate, update_sq, span_sq).
void solve_block(int n, const double* stats, const StatsView& sv, const double* s, const double* Rin, double e,
                 const double* prm, double* out, const CoefView& cv) {
  constexpr int N2 = kMaxRank * kMaxRank;
  const int m = n + 1;
  const double beta2 = prm[Param::beta2], tol = prm[Param::tolerance];
  double G[N2], W[N2], Wi[N2], RB[N2], tmp[N2], Z[N2], Y[N2];
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) G[i * n + j] = i <= j ? stats[sv.gram + i * n + j] : stats[sv.gram + j * n + i];
  const double* uc = stats + sv.uc;
  const double* um = stats + sv.um;
  const double cc = stats[sv.cc], cm = stats[sv.cm], mm = stats[sv.mm];
  inverse_sqrt(n, G, W, Wi);
  double kk[kMaxRank];  // c in the orthonormal basis W U
  for (int i = 0; i < n; ++i) { kk[i] = 0; for (int j = 0; j < n; ++j) kk[i] += W[i * n + j] * uc[j]; }
  matmul(Rin, Wi, tmp, n, n, n);  // the eigenbasis in W U: orthogonal up to rounding, made exactly so
  matmul_tn(tmp, tmp, G, n, n, n);
  inverse_sqrt(n, G, Z, Y);
  matmul(tmp, Z, RB, n, n, n);
  double r2 = cc;
  for (int i = 0; i < n; ++i) r2 -= kk[i] * kk[i];
  double r = std::sqrt(std::fmax(r2, 0.0));
  const bool rotate = r > tol * std::sqrt(cc);
  if (!rotate) r = 0;
  // K = beta2 diag(s, 0) + (1 - beta2) z z^T in (old eigenbasis, residual); in span, the residual slot is
  // pinned at -1, below the rest, so that it is the one dropped: the n-sized problem is all that is left.
  double z[kMaxDim], dg[kMaxDim], lam[kMaxDim], V[kMaxDim * kMaxDim], Vs[kMaxDim * kMaxDim];
  for (int i = 0; i < n; ++i) {
    z[i] = 0;
    for (int j = 0; j < n; ++j) z[i] += RB[i * n + j] * kk[j];
    dg[i] = beta2 * s[i];
  }
  z[n] = r;
  dg[n] = 0;
  if (rotate) {
    rank_one_eigh(m, dg, z, 1 - beta2, lam, V);
  } else {
    rank_one_eigh(n, dg, z, 1 - beta2, lam + 1, Vs);
    lam[0] = -1;
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < m; ++j) V[i * m + j] = j == 0 ? (i == n) : i == n ? 0.0 : Vs[i * n + j - 1];
  }
  double ed[kMaxDim];  // the dropped eigenvector in coordinates (W U, residual)
  for (int i = 0; i < n; ++i) { ed[i] = 0; for (int j = 0; j < n; ++j) ed[i] += RB[j * n + i] * V[j * m]; }
  ed[n] = V[n * m];
  const double sigma = ed[n] >= 0 ? -1.0 : 1.0;  // reflect far from ed: |v|^2 >= 2
  double v[kMaxDim], vv = 0;
  for (int i = 0; i < m; ++i) { v[i] = -sigma * ed[i] + (i == n ? 1.0 : 0.0); vv += v[i] * v[i]; }
  // The new eigenbasis C (n x m) in (W U, residual): its first n columns are V's top rows (eigenvectors 1..n)
  // times RB, its last V's residual row. Times H = I - 2 v v^T / vv restricted to columns 0..n-1, times W.
  double top[N2], Cv[kMaxRank];
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
  double shift[kMaxRank], v_u[kMaxRank], umn[kMaxRank];
  double* sn = out + ro.s;
  double v_c = 0;
  for (int i = 0; i < n; ++i) shift[i] = v_u[i] = 0;
  if (rotate) {
    double beta[kMaxRank], nub[kMaxRank];
    for (int i = 0; i < n; ++i) { beta[i] = 2 * v[i] / vv; nub[i] = v[i] - v[n] * kk[i] / r; }
    v_c = v[n] / r;
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) { shift[i] += Wi[i * n + j] * beta[j]; v_u[i] += W[i * n + j] * nub[j]; }
  }
  double dot_nu_um = v_c * cm;
  for (int i = 0; i < n; ++i) dot_nu_um += v_u[i] * um[i];
  for (int i = 0; i < n; ++i) { sn[i] = std::fmax(lam[i + 1], 0.0); umn[i] = um[i] - shift[i] * dot_nu_um; }
  const double en = energy(e, stats, sv, prm);
  double a[kMaxRank], scale, update_sq, span_sq;
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
void keep_block(int n, const double* stats, const StatsView& sv, const double* s, const double* R, double e,
                const double* prm, double* out, const CoefView& cv) {
  const double en = energy(e, stats, sv, prm);
  double a[kMaxRank];
  double* rest = out + cv.width;
  direction(n, damping_of(en, prm), prm, s, R, stats + sv.um, stats[sv.mm], a, out[cv.scale],
            rest[KeepOut::update_sq], rest[KeepOut::span_sq]);
  for (int i = 0; i < n; ++i) out[cv.shrink + i] = a[i];
  rest[KeepOut::e] = en;
}

}  // namespace
