// A Ginger step on CPU (the math: ginger_hf/fused.py, ginger_hf/solve.py). Plain C++17, no torch
// headers: built once with the system compiler and loaded with ctypes.
//
// Two ways to run a step, each call covering every block of one rank n and one dtype pair:
// - ginger_step, the whole step: after a scan for non-finite inputs, each block's pass 1, small solve
//   and pass 2 run back to back while the block is in cache. Whole blocks are dealt to std::threads in
//   contiguous runs of about equal cost: for many small blocks (rows of weight matrices).
// - the two passes (ginger_pass1, ginger_pass2) with the batched solves between them, called from
//   Python: for huge blocks, whose elements are split between threads in contiguous shares of the
//   work, and for sharded tensors, whose sums are completed across ranks between the passes.
// Blocks are rows of tensors or whole tensors, each described by (k, refresh, U stride) and its data.
//
// Within a chunk of at most CHUNK elements, the passes sweep one basis row at a time (the chunk stays
// in cache), so any rank works with the same code. Pass 1 reads only; pass 2 recomputes the momentum
// from (m, g) instead of reading a stored one. Where the outputs go inside a block's row of sums or
// coefficients comes from the caller (ginger_hf/solve.py's StatsLayout and CoefLayout).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

namespace {

constexpr int W = 16;  // vector width in floats
typedef float vf __attribute__((vector_size(W * 4)));
typedef uint32_t vu __attribute__((vector_size(W * 4)));
typedef uint16_t vh __attribute__((vector_size(W * 2)));
typedef double vd __attribute__((vector_size(W / 2 * 8)));
typedef float vf8 __attribute__((vector_size(W / 2 * 4)));

inline vf ld(const float* p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
inline void st(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
inline vf splat(float x) { return vf{} + x; }
inline double hsum(vf v) {  // pairwise: short dependency chain, smaller rounding error
  float t[W]; std::memcpy(t, &v, sizeof v);
  for (int h = W / 2; h > 0; h /= 2) for (int i = 0; i < h; ++i) t[i] += t[i + h];
  return t[0];
}
inline double hsum(vd v) {
  double t[W / 2]; std::memcpy(t, &v, sizeof v);
  double s = 0; for (int i = 0; i < W / 2; ++i) s += t[i];
  return s;
}
// Squares of a float vector summed in double: exact products, no overflow for any finite float.
inline vd sq2(vf a, vf b) {
  vf8 a0, a1, b0, b1;
  std::memcpy(&a0, &a, sizeof a0); std::memcpy(&a1, (const char*)&a + sizeof a0, sizeof a1);
  std::memcpy(&b0, &b, sizeof b0); std::memcpy(&b1, (const char*)&b + sizeof b0, sizeof b1);
  vd x0 = __builtin_convertvector(a0, vd), x1 = __builtin_convertvector(a1, vd);
  vd y0 = __builtin_convertvector(b0, vd), y1 = __builtin_convertvector(b1, vd);
  return x0 * y0 + x1 * y1;
}
inline vu round_bf16_bits(vf x) {  // round to nearest even bfloat16: the high 16 bits
  vu b = (vu)x;
  return (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
}
inline vf round_bf16(vf x) { return (vf)(round_bf16_bits(x) << 16); }

struct bf16 { uint16_t bits; };
template <class T> constexpr bool is_bf16() { return sizeof(T) == 2; }

// Bring L elements into float (the tensor itself when possible), zero-padded to a multiple of W.
inline const float* src(const float* p, float* buf, int64_t L) {
  if (L % W == 0) return p;
  std::memcpy(buf, p, L * 4);
  for (int64_t i = L; i < (L + W - 1) / W * W; ++i) buf[i] = 0.f;
  return buf;
}
inline const float* src(const bf16* p, float* buf, int64_t L) {
  int64_t x = 0;
  for (; x + W <= L; x += W) {
    vh h; std::memcpy(&h, p + x, sizeof h);
    st(buf + x, (vf)(__builtin_convertvector(h, vu) << 16));
  }
  for (; x < L; ++x) { uint32_t u = uint32_t(p[x].bits) << 16; std::memcpy(buf + x, &u, 4); }
  for (; x < (L + W - 1) / W * W; ++x) buf[x] = 0.f;
  return buf;
}
// Where to compute an output of L elements (the tensor itself when possible), then write it back.
inline float* dst(float* p, float* buf, int64_t L) { return L % W == 0 ? p : buf; }
inline float* dst(bf16*, float* buf, int64_t) { return buf; }
inline void flush(float* p, const float* buf, int64_t L) { if (p != buf) std::memcpy(p, buf, L * 4); }
inline void flush(bf16* p, const float* buf, int64_t L) {
  int64_t x = 0;
  for (; x + W <= L; x += W) {
    vh h = __builtin_convertvector(round_bf16_bits(ld(buf + x)), vh);
    std::memcpy(p + x, &h, sizeof h);
  }
  for (; x < L; ++x) {
    uint32_t u; std::memcpy(&u, buf + x, 4);
    p[x].bits = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
}

// torch.lerp(m, g, w1) in float (its two formulas), rounded like the state dtype.
template <class S>
inline vf lerp(vf m, vf g, float w1) {
  vf r = w1 < 0.5f ? m + splat(w1) * (g - m) : g - splat(1.f - w1) * (g - m);
  return is_bf16<S>() ? round_bf16(r) : r;
}

// Named places in a block's row of sums / coefficients (offsets from the Python layouts).
struct StatsView {
  int64_t width, gram, uc, um, cc, cm, mm, gg;
  explicit StatsView(const int64_t* o) : width(o[0]), gram(o[1]), uc(o[2]), um(o[3]), cc(o[4]), cm(o[5]),
                                         mm(o[6]), gg(o[7]) {}
};
struct CoefView {
  int64_t width, scale, along, lr, decay, rho, v_c, shrink, shift, v_u;
  explicit CoefView(const int64_t* o) : width(o[0]), scale(o[1]), along(o[2]), lr(o[3]), decay(o[4]), rho(o[5]),
                                        v_c(o[6]), shrink(o[7]), shift(o[8]), v_u(o[9]) {}
};

// One block: k elements; basis row j at U + j * ustride; refresh: curvature vector given.
struct Block {
  int64_t k, refresh, ustride;
};

constexpr int64_t CHUNK = 2048;  // elements per chunk: n + 6 rows of it stay in cache

struct Scratch {
  std::vector<float> v;
  explicit Scratch(int rows) : v((size_t)rows * CHUNK + W) {}
  float* at(int i) { return v.data() + (size_t)i * CHUNK; }
};

// The refresh sums need exact products: r^2 = c.c - |k|^2 cancels when c lies near span(U), so the
// Gram and U c are formed from float inputs widened to double (float x float is exact in double).
constexpr int WD = W / 2;  // doubles per vector
inline vd ldd(const double* p) { vd v; std::memcpy(&v, p, sizeof v); return v; }
inline void widen(const float* in, double* out, int64_t Lp) {
  for (int64_t x = 0; x < Lp; x += W) {
    vf v = ld(in + x);
    vf8 lo, hi;
    std::memcpy(&lo, &v, sizeof lo);
    std::memcpy(&hi, (const char*)&v + sizeof lo, sizeof hi);
    vd a = __builtin_convertvector(lo, vd), b = __builtin_convertvector(hi, vd);
    std::memcpy(out + x, &a, sizeof a);
    std::memcpy(out + x + WD, &b, sizeof b);
  }
}
inline double hsumd(vd v) { return hsum(v); }

// Gram entries G[i][j] (i <= j) of rows u[i0..i0+NI) x u[j0..j0+NJ) over Lp elements, in double.
template <int NI, int NJ>
void gram_tile(const double* const* u, int i0, int j0, int64_t Lp, double* G, int n) {
  vd acc[NI][NJ] = {};
  for (int64_t x = 0; x < Lp; x += WD) {
    vd a[NI], b[NJ];
    for (int i = 0; i < NI; ++i) a[i] = ldd(u[i0 + i] + x);
    for (int j = 0; j < NJ; ++j) b[j] = ldd(u[j0 + j] + x);
    for (int i = 0; i < NI; ++i) for (int j = 0; j < NJ; ++j) acc[i][j] += a[i] * b[j];
  }
  for (int i = 0; i < NI; ++i)
    for (int j = 0; j < NJ; ++j)
      if (i0 + i <= j0 + j) G[(i0 + i) * n + j0 + j] += hsumd(acc[i][j]);
}
template <int NI>
void gram_row(const double* const* u, int i0, int n, int64_t Lp, double* G) {
  for (int j0 = i0; j0 < n; j0 += 4) {
    switch (n - j0 >= 4 ? 4 : n - j0) {
      case 4: gram_tile<NI, 4>(u, i0, j0, Lp, G, n); break;
      case 3: gram_tile<NI, 3>(u, i0, j0, Lp, G, n); break;
      case 2: gram_tile<NI, 2>(u, i0, j0, Lp, G, n); break;
      default: gram_tile<NI, 1>(u, i0, j0, Lp, G, n); break;
    }
  }
}
void gram(const double* const* u, int n, int64_t Lp, double* G) {
  for (int i0 = 0; i0 < n; i0 += 4) {
    switch (n - i0 >= 4 ? 4 : n - i0) {
      case 4: gram_row<4>(u, i0, n, Lp, G); break;
      case 3: gram_row<3>(u, i0, n, Lp, G); break;
      case 2: gram_row<2>(u, i0, n, Lp, G); break;
      default: gram_row<1>(u, i0, n, Lp, G); break;
    }
  }
}
inline double dot(const float* a, const float* b, int64_t Lp) {
  vf acc = vf{};
  for (int64_t x = 0; x < Lp; x += W) acc += ld(a + x) * ld(b + x);
  return hsum(acc);
}
inline double dotd(const double* a, const double* b, int64_t Lp) {
  vd acc = vd{};
  for (int64_t x = 0; x < Lp; x += WD) acc += ldd(a + x) * ldd(b + x);
  return hsumd(acc);
}

// Pass 1 on elements [x0, x1) of one block; reads only. With mv = lerp(m, g, w1) it adds
// U m', m'.m', g.g and, on refresh, the Gram U U^T (upper triangle), U c, c.c, c.m' to out.
template <class S, class P>
void pass1(int n, const Block& b, const S* U, const S* m, const P* g, const P* c, float w1, int64_t x0,
           int64_t x1, double* out, const StatsView& sv, Scratch& sc, std::vector<double>& wide) {
  const bool R = b.refresh;
  double cc = 0, cm = 0, mm = 0, gg = 0;
  const float* u[64];
  const double* ud[64];
  for (int64_t xb = x0; xb < x1; xb += CHUNK) {
    const int64_t L = xb + CHUNK < x1 ? CHUNK : x1 - xb, Lp = (L + W - 1) / W * W;
    for (int j = 0; j < n; ++j) u[j] = src(U + j * b.ustride + xb, sc.at(j), L);
    const float* mi = src(m + xb, sc.at(n), L);
    const float* gi = src(g + xb, sc.at(n + 1), L);
    const float* ci = R ? src(c + xb, sc.at(n + 2), L) : nullptr;
    float* mv = sc.at(n + 3);
    vd amm = vd{}, agg = vd{}, acc = vd{};
    vf acm = vf{};
    for (int64_t x = 0; x < Lp; x += W) {
      vf mx = lerp<S>(ld(mi + x), ld(gi + x), w1), gx = ld(gi + x);
      st(mv + x, mx);
      amm += sq2(mx, mx);
      agg += sq2(gx, gx);
      if (R) { vf cx = ld(ci + x); acc += sq2(cx, cx); acm += cx * mx; }
    }
    mm += hsum(amm); gg += hsum(agg);
    if (R) { cc += hsum(acc); cm += hsum(acm); }
    for (int j = 0; j < n; ++j) out[sv.um + j] += dot(u[j], mv, Lp);
    if (R) {
      double* cd = wide.data() + (size_t)n * CHUNK;
      widen(ci, cd, Lp);
      for (int j = 0; j < n; ++j) {
        double* row = wide.data() + (size_t)j * CHUNK;
        widen(u[j], row, Lp);
        ud[j] = row;
        out[sv.uc + j] += dotd(row, cd, Lp);
      }
      gram(ud, n, Lp, out + sv.gram);
    }
  }
  out[sv.mm] += mm; out[sv.gg] += gg;
  if (R) { out[sv.cc] += cc; out[sv.cm] += cm; }
}

// Pass 2 on [x0, x1): m <- lerp(m, g, w1); v = v_u.U + v_c c (refresh); u = scale (m - a.U + along v),
// clipped to [-rho, rho]; p <- p * decay - lr * u; on refresh U <- U - shift v^T (a rank-one reflection).
// Returns how many coordinates the clip cut.
template <class S, class P>
int64_t pass2(int n, const Block& b, S* U, S* m, const P* g, P* p, const P* c, float w1, const float* coef,
              const CoefView& cv, int64_t x0, int64_t x1, Scratch& sc) {
  const bool R = b.refresh;
  const vf scale = splat(coef[cv.scale]), along = splat(coef[cv.along]), nlr = splat(-coef[cv.lr]);
  const vf decay = splat(coef[cv.decay]), rho = splat(coef[cv.rho]), nrho = splat(-coef[cv.rho]);
  const vf v_c = splat(coef[cv.v_c]);
  const bool do_decay = coef[cv.decay] != 1.f;
  int64_t clipped = 0;
  for (int64_t xb = x0; xb < x1; xb += CHUNK) {
    const int64_t L = xb + CHUNK < x1 ? CHUNK : x1 - xb, Lp = (L + W - 1) / W * W;
    const float* mi = src(m + xb, sc.at(0), L);
    const float* gi = src(g + xb, sc.at(1), L);
    const float* pi = src(p + xb, sc.at(2), L);
    const float* ci = R ? src(c + xb, sc.at(3), L) : nullptr;
    float* dir = sc.at(4);
    float* v = sc.at(5);
    float* ubuf = sc.at(6);
    for (int64_t x = 0; x < Lp; x += W) {
      st(dir + x, lerp<S>(ld(mi + x), ld(gi + x), w1));
      if (R) st(v + x, v_c * ld(ci + x));
    }
    float* mo = dst(m + xb, sc.at(0), L);
    for (int64_t x = 0; x < Lp; x += W) st(mo + x, ld(dir + x));  // m' (before dir changes)
    flush(m + xb, mo, L);
    for (int j = 0; j < n; ++j) {
      const float* uj = src(U + j * b.ustride + xb, ubuf, L);
      const vf a = splat(coef[cv.shrink + j]), v_u = splat(coef[cv.v_u + j]);
      for (int64_t x = 0; x < Lp; x += W) {
        vf ux = ld(uj + x);
        st(dir + x, ld(dir + x) - a * ux);
        if (R) st(v + x, ld(v + x) + v_u * ux);
      }
    }
    float* po = dst(p + xb, sc.at(2), L);
    vu nclip = vu{};
    for (int64_t x = 0; x < Lp; x += W) {
      vf d = ld(dir + x);
      if (R) d += along * ld(v + x);
      d *= scale;
      vu cut = (vu)(d > rho) | (vu)(d < nrho);
      nclip += cut & 1u;
      d = d > rho ? rho : d;
      d = d < nrho ? nrho : d;
      vf pv = ld(pi + x);
      if (is_bf16<P>()) d = round_bf16(d);
      if (do_decay) { pv *= decay; if (is_bf16<P>()) pv = round_bf16(pv); }
      st(po + x, pv + nlr * d);
    }
    {
      uint32_t t[W]; std::memcpy(t, &nclip, sizeof t);
      for (int i = 0; i < W; ++i) clipped += t[i];  // padding is 0 there, never cut
    }
    flush(p + xb, po, L);
    if (R) {
      for (int j = 0; j < n; ++j) {
        S* Uj = U + j * b.ustride + xb;
        const float* uj = src(Uj, ubuf, L);
        float* uo = dst(Uj, ubuf, L);
        const vf shift = splat(coef[cv.shift + j]);
        for (int64_t x = 0; x < Lp; x += W) st(uo + x, ld(uj + x) - shift * ld(v + x));
        flush(Uj, uo, L);
      }
    }
  }
  return clipped;
}

// Thread t takes the contiguous share [total * t / nt, total * (t + 1) / nt) of the weighted work;
// within a block the share is an element range, W-aligned.
struct Plan {
  std::vector<int64_t> start;
  std::vector<int64_t> weight;
  int64_t total = 0;
  Plan(int nb, const Block* blocks, int n, bool second) : start(nb), weight(nb) {
    for (int i = 0; i < nb; ++i) {
      const bool r = blocks[i].refresh;
      weight[i] = second ? (r ? 2 * n + 6 : n + 4) : (r ? (n * n + 5 * n) / 2 + 4 : n + 3);
      start[i] = total;
      total += blocks[i].k * weight[i];
    }
  }
  int64_t bound(int i, int64_t k, int t, int nt) const {
    int64_t share = (int64_t)((__int128)total * t / nt) - start[i];
    if (share <= 0) return 0;
    int64_t x = (share + weight[i] - 1) / weight[i];
    x = (x + W - 1) / W * W;
    return x < k ? x : k;
  }
};

template <class F>
void run_threads(int nt, F&& f) {
  std::vector<std::thread> th;
  for (int t = 1; t < nt; ++t) th.emplace_back(f, t);
  f(0);
  for (auto& x : th) x.join();
}

template <class S, class P>
void run_pass1(int n, int nb, const Block* blocks, const int64_t* ptrs, float w1, double* out,
               const StatsView& sv, int nt) {
  Plan plan(nb, blocks, n, false);
  std::mutex lock;
  run_threads(nt, [&](int t) {
    Scratch sc(n + 4);
    std::vector<double> wide((size_t)(n + 1) * CHUNK);
    std::vector<double> part(sv.width);
    for (int i = 0; i < nb; ++i) {
      const Block& b = blocks[i];
      int64_t x0 = plan.bound(i, b.k, t, nt), x1 = plan.bound(i, b.k, t + 1, nt);
      if (x0 >= x1) continue;
      const int64_t* q = ptrs + 4 * i;
      const bool whole = x0 == 0 && x1 == b.k;
      double* o = whole ? out + (int64_t)i * sv.width : part.data();
      if (!whole) std::fill(part.begin(), part.end(), 0.0);
      pass1<S, P>(n, b, (const S*)q[0], (const S*)q[1], (const P*)q[2], (const P*)q[3], w1, x0, x1, o, sv, sc, wide);
      if (!whole) {  // a block split between threads: add this share under the lock
        std::lock_guard<std::mutex> g(lock);
        for (int64_t j = 0; j < sv.width; ++j) out[(int64_t)i * sv.width + j] += part[j];
      }
    }
  });
}

template <class S, class P>
int64_t run_pass2(int n, int nb, const Block* blocks, const int64_t* ptrs, float w1, const float* coef,
                  const CoefView& cv, int nt) {
  Plan plan(nb, blocks, n, true);
  std::vector<int64_t> clipped(nt, 0);
  run_threads(nt, [&](int t) {
    Scratch sc(7);
    for (int i = 0; i < nb; ++i) {
      const Block& b = blocks[i];
      int64_t x0 = plan.bound(i, b.k, t, nt), x1 = plan.bound(i, b.k, t + 1, nt);
      if (x0 >= x1) continue;
      const int64_t* q = ptrs + 5 * i;
      clipped[t] += pass2<S, P>(n, b, (S*)q[0], (S*)q[1], (const P*)q[2], (P*)q[3], (const P*)q[4], w1,
                                coef + (int64_t)i * cv.width, cv, x0, x1, sc);
    }
  });
  int64_t sum = 0;
  for (int64_t c : clipped) sum += c;
  return sum;
}


// ---- The small refresh problem of each block (ginger_hf/solve.py's solve_refresh, in double) ----

// Small dense row-major matrices over a per-thread arena: no allocation per block.
struct Arena {
  std::vector<double> buf;
  size_t top = 0;
  explicit Arena(int n) : buf((size_t)48 * (n + 1) * (n + 1) + 64 * (n + 1)) {}
  double* get(size_t k) {
    if (top + k > buf.size()) throw std::bad_alloc();
    double* p = buf.data() + top;
    top += k;
    std::fill(p, p + k, 0.0);
    return p;
  }
};
struct Mat {
  int r, c;
  double* v;
  double& operator()(int i, int j) { return v[i * c + j]; }
  double operator()(int i, int j) const { return v[i * c + j]; }
};
Mat mat(Arena& A, int r, int c) { return Mat{r, c, A.get((size_t)r * c)}; }
Mat eye(Arena& A, int n) { Mat m = mat(A, n, n); for (int i = 0; i < n; ++i) m(i, i) = 1; return m; }
Mat copy(Arena& A, const Mat& a) { Mat o = mat(A, a.r, a.c); std::memcpy(o.v, a.v, sizeof(double) * a.r * a.c); return o; }
Mat mul(Arena& A, const Mat& a, const Mat& b) {
  Mat o = mat(A, a.r, b.c);
  for (int i = 0; i < a.r; ++i)
    for (int k = 0; k < a.c; ++k) {
      const double x = a(i, k);
      for (int j = 0; j < b.c; ++j) o(i, j) += x * b(k, j);
    }
  return o;
}
Mat tr(Arena& A, const Mat& a) {
  Mat o = mat(A, a.c, a.r);
  for (int i = 0; i < a.r; ++i) for (int j = 0; j < a.c; ++j) o(j, i) = a(i, j);
  return o;
}

// Cyclic Jacobi: S (symmetric, n x n) = V diag(w) V^T, w ascending, eigenvectors in V's columns.
void eigh(Arena& Ar, const Mat& S, double* w, Mat& V) {
  const int n = S.r;
  Mat A = copy(Ar, S);
  Mat U = eye(Ar, n);
  double norm = 0;
  for (int i = 0; i < n * n; ++i) norm += A.v[i] * A.v[i];
  for (int sweep = 0; sweep < 64; ++sweep) {
    double off = 0;
    for (int p = 0; p < n; ++p) for (int q = p + 1; q < n; ++q) off += A(p, q) * A(p, q);
    if (off <= 1e-31 * norm) break;  // off-diagonal at rounding level
    for (int p = 0; p < n; ++p)
      for (int q = p + 1; q < n; ++q) {
        const double apq = A(p, q);
        if (std::fabs(apq) <= 1e-17 * (std::fabs(A(p, p)) + std::fabs(A(q, q)))) {  // negligible: drop it
          A(p, q) = A(q, p) = 0;
          continue;
        }
        const double theta = (A(q, q) - A(p, p)) / (2 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1));
        const double c = 1 / std::sqrt(t * t + 1), s = t * c, tau = s / (1 + c);
        A(p, p) -= t * apq;
        A(q, q) += t * apq;
        A(p, q) = A(q, p) = 0;
        for (int k = 0; k < n; ++k) {
          if (k != p && k != q) {
            const double g = A(k, p), h = A(k, q);
            A(k, p) = A(p, k) = g - s * (h + g * tau);
            A(k, q) = A(q, k) = h + s * (g - h * tau);
          }
          const double g = U(k, p), h = U(k, q);
          U(k, p) = g - s * (h + g * tau);
          U(k, q) = h + s * (g - h * tau);
        }
      }
  }
  int order[65];
  for (int i = 0; i < n; ++i) order[i] = i;
  for (int i = 1; i < n; ++i)  // insertion sort: ascending eigenvalues
    for (int j = i; j > 0 && A(order[j], order[j]) < A(order[j - 1], order[j - 1]); --j) std::swap(order[j], order[j - 1]);
  V = mat(Ar, n, n);
  for (int j = 0; j < n; ++j) {
    w[j] = A(order[j], order[j]);
    for (int k = 0; k < n; ++k) V(k, j) = U(k, order[j]);
  }
}

// (G^{-1/2}, G^{1/2}) of a symmetric positive definite G near I: coupled Newton-Schulz until the
// correction is at rounding level (quadratic: 2-3 iterations from |G - I| ~ 1e-7), eigen fallback.
void inverse_sqrt(Arena& Ar, const Mat& G, Mat& Z, Mat& Y) {
  const int n = G.r;
  double dev = 0;  // |G - I|: tiny in practice, where a series is exact to rounding
  for (int i = 0; i < n; ++i) for (int j = 0; j < n; ++j) dev = std::fmax(dev, std::fabs(G(i, j) - (i == j)));
  if (dev < 1e-5) {  // (I + E)^(-1/2) = I - E/2 + 3E^2/8 - ..., (I + E)^(1/2) = I + E/2 - E^2/8 + ...; |E|^3 < 1e-15
    Mat E = copy(Ar, G);
    for (int i = 0; i < n; ++i) E(i, i) -= 1;
    Mat E2 = mul(Ar, E, E);
    Z = mat(Ar, n, n);
    Y = mat(Ar, n, n);
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) {
        const double id = i == j;
        Z(i, j) = id - 0.5 * E(i, j) + 0.375 * E2(i, j);
        Y(i, j) = id + 0.5 * E(i, j) - 0.125 * E2(i, j);
      }
    if (dev < 1e-6) return;  // the next terms are below 1e-18
    Mat E3 = mul(Ar, E2, E);  // 1e-6 <= |E| < 1e-5: one more term (|E|^4 < 1e-20)
    for (int i = 0; i < n * n; ++i) { Z.v[i] -= 0.3125 * E3.v[i]; Y.v[i] += 0.0625 * E3.v[i]; }
    return;
  }
  Y = copy(Ar, G);
  Z = eye(Ar, n);
  for (int it = 0; it < 8; ++it) {
    Mat T = mul(Ar, Z, Y);
    double dev = 0;
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) {
        T(i, j) = (i == j ? 1.5 : 0.0) - 0.5 * T(i, j);
        dev = std::fmax(dev, std::fabs(T(i, j) - (i == j)));
      }
    if (dev == 0) return;
    Y = mul(Ar, Y, T);
    Z = mul(Ar, T, Z);
    if (dev < 1e-9) {  // the next correction would be below 1e-18: converged
      if (it < 7) return;
    }
  }
  double e[65];
  Mat Q{0, 0, nullptr};
  eigh(Ar, G, e, Q);
  Z = mat(Ar, n, n);
  Y = mat(Ar, n, n);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j)
      for (int k = 0; k < n; ++k) {
        const double root = std::sqrt(std::fmax(e[k], 1e-300));
        Z(i, j) += Q(i, k) * Q(j, k) / root;
        Y(i, j) += Q(i, k) * Q(j, k) * root;
      }
}

inline double powm(double x, double power) {  // x^-power, exact paths for the two usual powers
  return power == 1.0 ? 1 / x : power == 0.5 ? 1 / std::sqrt(x) : std::pow(x, -power);
}

// Per-block parameters: beta2, damping, relative_damping, power, debias (of s), k, momentum_debias,
// tolerance, debias_e (of e).
constexpr int NPARAM = 9;

// e <- beta2 e + (1 - beta2) |g|^2: the gradient's energy, every step (the scale of relative damping).
inline double energy(double e, const double* stats, const StatsView& sv, const double* prm) {
  return prm[0] * e + (1 - prm[0]) * stats[sv.gg];
}

// gamma = damping + relative_damping * e_hat / k, e_hat = e / debias_e.
inline double damping_of(double en, const double* prm) { return prm[1] + prm[2] * en / (prm[8] * prm[5]); }

// u = scale (m' - a.U) = f(G) m_hat over the eigenbasis B = R U (solve.py's _direction): a = R^T (phi * R um),
// scale = gamma^-power / momentum_debias; |u|^2 and its part in span(U) before clipping.
void direction(int n, double gamma, const double* prm, const double* s, const double* R, const double* um, double mm,
               double* a, double& scale, double& update_sq, double& span_sq) {
  const double power = prm[3], debias = prm[4], mdebias = prm[6];
  double phi[64], y[64] = {};
  for (int i = 0; i < n; ++i) {
    phi[i] = 1 - powm((gamma + s[i] / debias) / gamma, power);
    for (int j = 0; j < n; ++j) y[i] += R[i * n + j] * um[j];
  }
  for (int i = 0; i < n; ++i) { a[i] = 0; for (int j = 0; j < n; ++j) a[i] += R[j * n + i] * phi[j] * y[j]; }
  scale = powm(gamma, power) / mdebias;
  double upd = mm, span = 0;
  for (int i = 0; i < n; ++i) {
    upd -= (2 * phi[i] - phi[i] * phi[i]) * y[i] * y[i];
    span += (1 - phi[i]) * (1 - phi[i]) * y[i] * y[i];
  }
  update_sq = scale * scale * std::fmax(upd, 0.0);
  span_sq = scale * scale * span;
}

// Solve one block; out row: coefficients (CoefView places; lr, decay, rho left to the caller), then
// [s (n), R (n*n), e, rotate, update_sq, span_sq] from rest0 on.
void solve_block(Arena& Ar, int n, const double* stats, const StatsView& sv, const double* s, const double* Rin,
                 double e, const double* prm, double* out, const CoefView& cv, int64_t rest0) {
  Ar.top = 0;
  const double beta2 = prm[0], tol = prm[7];
  Mat G = mat(Ar, n, n), R = mat(Ar, n, n);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      G(i, j) = i <= j ? stats[sv.gram + i * n + j] : stats[sv.gram + j * n + i];
      R(i, j) = Rin[i * n + j];
    }
  const double* uc = stats + sv.uc;
  const double* um = stats + sv.um;
  const double cc = stats[sv.cc], cm = stats[sv.cm], mm = stats[sv.mm];
  Mat W{0, 0, nullptr}, Wi{0, 0, nullptr};
  inverse_sqrt(Ar, G, W, Wi);
  double kk[64] = {};
  for (int i = 0; i < n; ++i) for (int j = 0; j < n; ++j) kk[i] += W(i, j) * uc[j];
  Mat RB = mul(Ar, R, Wi);  // the eigenbasis in W U: orthogonal up to rounding, made exactly so
  {
    Mat Z{0, 0, nullptr}, Y{0, 0, nullptr};
    inverse_sqrt(Ar, mul(Ar, tr(Ar, RB), RB), Z, Y);
    RB = mul(Ar, RB, Z);
  }
  double r2 = cc;
  for (int i = 0; i < n; ++i) r2 -= kk[i] * kk[i];
  double r = std::sqrt(std::fmax(r2, 0.0));
  const bool rotate = r > tol * std::sqrt(cc);
  if (!rotate) r = 0;
  const int m = n + 1;
  double z[65] = {};
  for (int i = 0; i < n; ++i) for (int j = 0; j < n; ++j) z[i] += RB(i, j) * kk[j];
  z[n] = r;
  Mat K = mat(Ar, m, m);
  for (int i = 0; i < m; ++i) for (int j = 0; j < m; ++j) K(i, j) = (1 - beta2) * z[i] * z[j];
  for (int i = 0; i < n; ++i) K(i, i) += beta2 * s[i];
  if (!rotate) K(n, n) -= 1;  // in span: pin the residual slot below the rest, so that it is dropped
  double lam[65];
  Mat V{0, 0, nullptr};
  eigh(Ar, K, lam, V);
  double ed[65] = {};  // the dropped eigenvector in coordinates (W U, residual)
  for (int i = 0; i < n; ++i) for (int j = 0; j < n; ++j) ed[i] += RB(j, i) * V(j, 0);
  ed[n] = V(n, 0);
  const double sigma = ed[n] >= 0 ? -1.0 : 1.0;  // reflect far from ed: |v|^2 >= 2
  double v[65], vv = 0;
  for (int i = 0; i < m; ++i) { v[i] = -sigma * ed[i] + (i == n ? 1.0 : 0.0); vv += v[i] * v[i]; }
  Mat Qt = mat(Ar, m, n);  // columns 0..n-1 of H = I - 2 v v^T / vv
  for (int i = 0; i < m; ++i) for (int j = 0; j < n; ++j) Qt(i, j) = (i == j ? 1.0 : 0.0) - 2 * v[i] * v[j] / vv;
  Mat C = mat(Ar, n, m);  // new eigenbasis in (old eigenbasis, residual), then in (W U, residual)
  for (int i = 0; i < n; ++i) for (int j = 0; j < m; ++j) C(i, j) = V(j, i + 1);
  {
    Mat top = mat(Ar, n, n);
    for (int i = 0; i < n; ++i) for (int j = 0; j < n; ++j) top(i, j) = C(i, j);
    top = mul(Ar, top, RB);
    for (int i = 0; i < n; ++i) for (int j = 0; j < n; ++j) C(i, j) = top(i, j);
  }
  Mat Rn = mul(Ar, mul(Ar, C, Qt), W);
  double shift[64] = {}, v_u[64] = {}, sn[64], umn[64];
  double v_c = 0;
  if (rotate) {
    double beta[64], nub[64];
    for (int i = 0; i < n; ++i) { beta[i] = 2 * v[i] / vv; nub[i] = v[i] - v[n] * kk[i] / r; }
    v_c = v[n] / r;
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) { shift[i] += Wi(i, j) * beta[j]; v_u[i] += W(i, j) * nub[j]; }
  }
  double dot_nu_um = v_c * cm;
  for (int i = 0; i < n; ++i) dot_nu_um += v_u[i] * um[i];
  for (int i = 0; i < n; ++i) { sn[i] = std::fmax(lam[i + 1], 0.0); umn[i] = um[i] - shift[i] * dot_nu_um; }
  const double en = energy(e, stats, sv, prm);
  double a[64], scale, update_sq, span_sq;
  direction(n, damping_of(en, prm), prm, sn, Rn.v, umn, mm, a, scale, update_sq, span_sq);
  double along = 0;
  for (int i = 0; i < n; ++i) along += a[i] * shift[i];
  out[cv.scale] = scale;
  out[cv.along] = along;
  out[cv.v_c] = v_c;
  for (int i = 0; i < n; ++i) { out[cv.shrink + i] = a[i]; out[cv.shift + i] = shift[i]; out[cv.v_u + i] = v_u[i]; }
  double* rest = out + rest0;
  for (int i = 0; i < n; ++i) rest[i] = sn[i];
  for (int i = 0; i < n * n; ++i) rest[n + i] = Rn.v[i];
  rest[n + n * n] = en;
  rest[n + n * n + 1] = rotate ? 1.0 : 0.0;
  rest[n + n * n + 2] = update_sq;
  rest[n + n * n + 3] = span_sq;
}

// A step that keeps the model: u = scale (m' - a.U) with a = R^T (phi * R U m'); out row as solve_block's
// coefficients, then [update_sq, span_sq, e] from rest0 on.
void keep_block(int n, const double* stats, const StatsView& sv, const double* s, const double* R, double e,
                const double* prm, double* out, const CoefView& cv, int64_t rest0) {
  const double en = energy(e, stats, sv, prm);
  double a[64];
  direction(n, damping_of(en, prm), prm, s, R, stats + sv.um, stats[sv.mm], a, out[cv.scale], out[rest0],
            out[rest0 + 1]);
  for (int i = 0; i < n; ++i) out[cv.shrink + i] = a[i];
  out[rest0 + 2] = en;
}

// ---- A whole step, block by block: pass 1, the small solve, pass 2 while the block is in cache ----

// One row per tensor (int64): its blocks (B of k elements), whether it refreshes (given a finite c),
// and the addresses of U, m, g, p, c (0 without a refresh), and of the float64 small state s, R, e.
enum { T_B, T_K, T_REFRESH, T_U, T_M, T_G, T_P, T_C, T_S, T_R, T_E, NT };
// Per-tensor parameters: the solve's NPARAM (debias as after a refresh), then lr, decay (1 - lr *
// weight_decay), rho, and debias as without a refresh.
enum { X_LR = NPARAM, X_DECAY, X_RHO, X_DEBIAS_KEEP, NSTEP };
// Per-block results: |u|^2 and its part in span(U) (before the clip), g.g, and 1 where m' was not finite
// after all (an overflow), so the block was left untouched.
constexpr int NRES = 4;

bool all_finite(const float* x, int64_t k) {
  vf acc = vf{};
  int64_t i = 0;
  for (; i + W <= k; i += W) acc += ld(x + i) * 0.f;  // inf * 0 and nan * 0 are nan
  float tail = 0.f;
  for (; i < k; ++i) tail += x[i] * 0.f;
  float t[W];
  std::memcpy(t, &acc, sizeof t);
  for (int j = 0; j < W; ++j) tail += t[j];
  return tail == 0.f;
}
bool all_finite(const bf16* x, int64_t k) {
  for (int64_t i = 0; i < k; ++i)
    if ((x[i].bits & 0x7f80) == 0x7f80) return false;
  return true;
}

struct StepBlock {
  int tensor;
  int64_t b;  // block index in its tensor
};

template <class S, class P>
int64_t step_block(int n, const int64_t* T, int64_t bi, bool refresh, const double* prm_in, float w1,
                   const StatsView& sv, const CoefView& cv, Scratch& sc1, Scratch& sc2, std::vector<double>& wide,
                   Arena& ar, double* stats, double* co, float* cf, double* res) {
  const int64_t B = T[T_B], k = T[T_K];
  Block b{k, refresh, B * k};
  const int64_t off = bi * k;
  S* U = (S*)T[T_U] + off;
  S* m = (S*)T[T_M] + off;
  const P* g = (const P*)T[T_G] + off;
  P* p = (P*)T[T_P] + off;
  const P* c = refresh ? (const P*)T[T_C] + off : nullptr;
  double* s = (double*)T[T_S] + bi * n;
  double* R = (double*)T[T_R] + bi * n * n;
  double* e = (double*)T[T_E] + bi;
  double prm[NSTEP];
  std::memcpy(prm, prm_in, sizeof prm);
  if (!refresh) prm[4] = prm[X_DEBIAS_KEEP];
  std::fill(stats, stats + sv.width, 0.0);
  pass1<S, P>(n, b, U, m, g, c, w1, 0, k, stats, sv, sc1, wide);
  res[2] = stats[sv.gg];
  res[0] = res[1] = 0;
  res[3] = 1;
  if (!std::isfinite(stats[sv.mm])) return 0;
  const int64_t rest0 = cv.width;
  std::fill(co, co + cv.width + n + n * n + 4, 0.0);
  bool rotate = false;
  if (refresh) {
    solve_block(ar, n, stats, sv, s, R, *e, prm, co, cv, rest0);
    const double* rest = co + rest0;
    for (int i = 0; i < n; ++i) s[i] = rest[i];
    for (int i = 0; i < n * n; ++i) R[i] = rest[n + i];
    *e = rest[n + n * n];
    rotate = rest[n + n * n + 1] > 0;
    res[0] = rest[n + n * n + 2];
    res[1] = rest[n + n * n + 3];
  } else {
    keep_block(n, stats, sv, s, R, *e, prm, co, cv, rest0);
    res[0] = co[rest0];
    res[1] = co[rest0 + 1];
    *e = co[rest0 + 2];
  }
  res[3] = 0;
  for (int64_t j = 0; j < cv.width; ++j) cf[j] = (float)co[j];
  cf[cv.lr] = (float)prm[X_LR];
  cf[cv.decay] = (float)prm[X_DECAY];
  cf[cv.rho] = (float)prm[X_RHO];
  b.refresh = rotate;  // a block that adds no direction steps as between refreshes (its shift is 0)
  return pass2<S, P>(n, b, U, m, g, p, c, w1, cf, cv, 0, k, sc2);
}

template <class S, class P>
int64_t run_step(int n, int nt_tensors, const int64_t* tensors, const double* params, float w1,
                 const StatsView& sv, const CoefView& cv, double* results, int64_t* flags, int nt) {
  std::vector<StepBlock> blocks;
  std::vector<double> cum(1, 0.0);
  std::vector<int64_t> first(nt_tensors + 1, 0);
  for (int t = 0; t < nt_tensors; ++t) {
    const int64_t* T = tensors + (int64_t)NT * t;
    const bool r = T[T_REFRESH];
    const double cost = (double)T[T_K] * (r ? 3 * n + 10 : 2 * n + 8) + (r ? 400.0 * (n + 1) * (n + 1) : 20.0 * n);
    for (int64_t b = 0; b < T[T_B]; ++b) {
      blocks.push_back({t, b});
      cum.push_back(cum.back() + cost);
    }
    first[t + 1] = (int64_t)blocks.size();
  }
  const int nb = (int)blocks.size();
  std::vector<int> edge(nt + 1, nb);  // contiguous runs of whole blocks per thread, of about equal cost
  edge[0] = 0;
  for (int t = 1; t < nt; ++t) edge[t] = (int)(std::lower_bound(cum.begin(), cum.end(), cum[nb] * t / nt) - cum.begin());
  // Phase 1: which tensors have a non-finite gradient (skipped) or curvature vector (no refresh).
  std::vector<std::vector<char>> bad(nt, std::vector<char>(2 * nt_tensors, 0));
  run_threads(nt, [&](int t) {
    for (int i = edge[t]; i < edge[t + 1]; ++i) {
      const int64_t* T = tensors + (int64_t)NT * blocks[i].tensor;
      const int64_t off = blocks[i].b * T[T_K];
      char* f = bad[t].data() + 2 * blocks[i].tensor;
      if (!f[0] && !all_finite((const P*)T[T_G] + off, T[T_K])) f[0] = 1;
      if (T[T_REFRESH] && !f[1] && !all_finite((const P*)T[T_C] + off, T[T_K])) f[1] = 1;
    }
  });
  for (int t = 0; t < nt_tensors; ++t) {
    bool g_bad = false, c_bad = false;
    for (int h = 0; h < nt; ++h) { g_bad |= bad[h][2 * t] != 0; c_bad |= bad[h][2 * t + 1] != 0; }
    flags[2 * t] = !g_bad;
    flags[2 * t + 1] = !c_bad;
  }
  // Phase 2: the step of every block of the tensors that take one.
  std::vector<int64_t> clipped(nt, 0);
  run_threads(nt, [&](int t) {
    Scratch sc1(n + 4), sc2(7);
    std::vector<double> wide((size_t)(n + 1) * CHUNK), stats(sv.width), co(cv.width + n + n * n + 4);
    std::vector<float> cf(cv.width);
    Arena ar(n);
    for (int i = edge[t]; i < edge[t + 1]; ++i) {
      const int tensor = blocks[i].tensor;
      double* res = results + (int64_t)NRES * i;
      if (!flags[2 * tensor]) {
        res[0] = res[1] = res[2] = 0;
        res[3] = 1;
        continue;
      }
      const int64_t* T = tensors + (int64_t)NT * tensor;
      const bool refresh = T[T_REFRESH] && flags[2 * tensor + 1];
      clipped[t] += step_block<S, P>(n, T, blocks[i].b, refresh, params + (int64_t)NSTEP * tensor, w1, sv, cv, sc1,
                                     sc2, wide, ar, stats.data(), co.data(), cf.data(), res);
    }
  });
  int64_t sum = 0;
  for (int64_t c : clipped) sum += c;
  return sum;
}

}  // namespace

extern "C" {
// dtype codes: 0 = float32, 1 = bfloat16. blocks: (k, refresh, ustride) per block. Returns 0 on success.
int ginger_max_rank() { return 64; }

// ptrs per block: U, m, g, c (c may be 0 when the block does not refresh). out: nb rows of sums, zeroed.
int ginger_pass1(int sdt, int pdt, int n, int nb, const int64_t* blocks, const int64_t* ptrs, float w1, double* out,
                 const int64_t* stats_layout, int nt) {
  if (n < 0 || n > 64) return 2;
  const Block* b = (const Block*)blocks;
  StatsView sv(stats_layout);
  if (sdt == 0 && pdt == 0) run_pass1<float, float>(n, nb, b, ptrs, w1, out, sv, nt);
  else if (sdt == 0 && pdt == 1) run_pass1<float, bf16>(n, nb, b, ptrs, w1, out, sv, nt);
  else if (sdt == 1 && pdt == 0) run_pass1<bf16, float>(n, nb, b, ptrs, w1, out, sv, nt);
  else if (sdt == 1 && pdt == 1) run_pass1<bf16, bf16>(n, nb, b, ptrs, w1, out, sv, nt);
  else return 1;
  return 0;
}

// ptrs per block: U, m, g, p, c. coef: nb rows of float coefficients. *clipped: coordinates cut by rho.
int ginger_pass2(int sdt, int pdt, int n, int nb, const int64_t* blocks, const int64_t* ptrs, float w1,
                 const float* coef, const int64_t* coef_layout, int nt, int64_t* clipped) {
  if (n < 0 || n > 64) return 2;
  const Block* b = (const Block*)blocks;
  CoefView cv(coef_layout);
  int64_t c = 0;
  if (sdt == 0 && pdt == 0) c = run_pass2<float, float>(n, nb, b, ptrs, w1, coef, cv, nt);
  else if (sdt == 0 && pdt == 1) c = run_pass2<float, bf16>(n, nb, b, ptrs, w1, coef, cv, nt);
  else if (sdt == 1 && pdt == 0) c = run_pass2<bf16, float>(n, nb, b, ptrs, w1, coef, cv, nt);
  else if (sdt == 1 && pdt == 1) c = run_pass2<bf16, bf16>(n, nb, b, ptrs, w1, coef, cv, nt);
  else return 1;
  *clipped = c;
  return 0;
}

// The refresh solve of nb blocks of rank n: stats (nb x stats width), s (nb x n), R (nb x n x n), e (nb),
// params (nb x 8), out (nb x out_width): coefficient row then [s, R, e, rotate, update_sq, span_sq].
int ginger_solve_refresh(int n, int nb, const double* stats, const int64_t* stats_layout, const double* s,
                         const double* R, const double* e, const double* params, double* out, int64_t out_width,
                         const int64_t* coef_layout, int nt) {
  if (n < 1 || n > 64) return 2;
  StatsView sv(stats_layout);
  CoefView cv(coef_layout);
  run_threads(nt, [&](int t) {  // contiguous shares: no cache line of out is written by two threads
    Arena arena(n);
    for (int i = (int)((int64_t)nb * t / nt); i < (int)((int64_t)nb * (t + 1) / nt); ++i)
      solve_block(arena, n, stats + (int64_t)i * sv.width, sv, s + (int64_t)i * n, R + (int64_t)i * n * n, e[i],
                  params + (int64_t)i * NPARAM, out + (int64_t)i * out_width, cv, cv.width);
  });
  return 0;
}

// The keep solve of nb blocks of rank n (see keep_block); out (nb x out_width).
int ginger_solve_keep(int n, int nb, const double* stats, const int64_t* stats_layout, const double* s,
                      const double* R, const double* e, const double* params, double* out, int64_t out_width,
                      const int64_t* coef_layout) {
  if (n < 1 || n > 64) return 2;
  StatsView sv(stats_layout);
  CoefView cv(coef_layout);
  for (int i = 0; i < nb; ++i)
    keep_block(n, stats + (int64_t)i * sv.width, sv, s + (int64_t)i * n, R + (int64_t)i * n * n, e[i],
               params + (int64_t)i * NPARAM, out + (int64_t)i * out_width, cv, cv.width);
  return 0;
}

// A whole step of the tensors of rank n: tensors (count x NT), params (count x NSTEP), results (one
// NRES row per block, tensor by tensor), flags (count x 2: gradient finite, curvature vector finite). A
// tensor with a non-finite gradient is left untouched; one with a non-finite curvature vector steps
// without its refresh. Whole blocks per thread: for many small blocks (rows); a few huge ones take the
// two-pass calls above.
int ginger_step(int sdt, int pdt, int n, int count, const int64_t* tensors, const double* params, float w1,
                const int64_t* stats_layout, const int64_t* coef_layout, double* results, int64_t* flags, int nt,
                int64_t* clipped) {
  if (n < 1 || n > 64) return 2;
  StatsView sv(stats_layout);
  CoefView cv(coef_layout);
  int64_t c = 0;
  if (sdt == 0 && pdt == 0) c = run_step<float, float>(n, count, tensors, params, w1, sv, cv, results, flags, nt);
  else if (sdt == 0 && pdt == 1) c = run_step<float, bf16>(n, count, tensors, params, w1, sv, cv, results, flags, nt);
  else if (sdt == 1 && pdt == 0) c = run_step<bf16, float>(n, count, tensors, params, w1, sv, cv, results, flags, nt);
  else if (sdt == 1 && pdt == 1) c = run_step<bf16, bf16>(n, count, tensors, params, w1, sv, cv, results, flags, nt);
  else return 1;
  *clipped = c;
  return 0;
}
}
