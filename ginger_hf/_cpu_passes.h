// The streaming passes over one block's elements (ginger_hf/fused.py describes the step): pass 1 (the sums)
// and pass 2 (the writes). A block is worked on in chunks of at most CHUNK elements; within a chunk, one sweep
// reads m, g, c and up to kGroup basis rows together, their accumulators in registers: every stream advances
// at once, which is what keeps memory busy (a sweep per basis row, one stream at a time, ran at half the
// bandwidth). A higher rank takes several sweeps, the later ones reading the chunk from cache. Pass 1 reads
// only; pass 2 recomputes the momentum from (m, g) instead of reading a stored one. Included by
// _cpu_kernel.cpp after ginger_interface.h and _cpu_solve.h.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "_cpu_simd.h"

namespace {

// One block: k elements; basis row j at U + j * ustride; refresh: curvature vector given. A row block's data
// lies in n + 4 streams far apart; the sweeps read them together, and the hardware prefetchers keep up
// (asking for the next row's lines by hand made the step slower once the streams were read together).
struct Block {
  int64_t k, refresh, ustride;
};

std::vector<Block> block_rows(int nb, const int64_t* rows) {  // from BlockRow rows
  std::vector<Block> out(nb);
  for (int i = 0; i < nb; ++i, rows += BlockRow::count)
    out[i] = {rows[BlockRow::k], rows[BlockRow::refresh], rows[BlockRow::ustride]};
  return out;
}

constexpr int64_t CHUNK = 2048;  // elements per chunk: n + 6 rows of it stay in cache
constexpr int kGroup = 4;        // basis rows per sweep

// Rows of CHUNK floats, a cache line apart from a multiple of 4 KiB, so that row i and row j of the same
// element do not fall into the same cache set.
struct Scratch {
  static constexpr int64_t kStride = CHUNK + W;
  std::vector<float> v;
  explicit Scratch(int rows) : v((size_t)rows * kStride + W) {}
  float* at(int i) { return v.data() + (size_t)i * kStride; }
};
constexpr int64_t kWideStride = CHUNK + WD;  // the same for the rows widened to double

// Gram entries G[i][j] (i <= j) of rows u[i0..i0+NI) x u[j0..j0+NJ) over Lp elements, in double: for
// ranks above kGroup, from the rows widened to double after the sweeps.
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

// The streams of a block that a later pass 1 reads, which this block's passes prefetch meanwhile: they work
// from cache, and memory would idle.
struct Ahead {
  const char* p[kMaxRank + 4];
  int size[kMaxRank + 4];
  int count = 0;
  int64_t span = 0;  // its elements
  template <class T> void add(const T* x) { if (x) { p[count] = (const char*)x; size[count++] = (int)sizeof(T); } }
  // Its streams at element xb (as far into it as a chunk is into the block that prefetches); none past its end.
  int at(int64_t xb, const char** out) const {
    if (xb >= span) return 0;
    for (int i = 0; i < count; ++i) out[i] = p[i] + xb * size[i];
    return count;
  }
};

// Pass 1's inputs and outputs for one chunk of Lp elements.
struct Sums1 {
  const float* const* u;  // basis rows of this sweep
  const float *m, *g, *c;
  float* mv;              // m' for the later sweeps (written by the first when there are more)
  double *um, *uc, *gram;  // this sweep's u.m', u.c, and its Gram block (row stride n; GRAM only)
  int n;
  const char* next;        // the parameter's bytes of this chunk, which pass 2 reads next (or null)
  int next_size;           // bytes per element there
  const char* const* ahead = nullptr;  // another block's streams at this chunk, prefetched (first sweep only)
  const int* ahead_size = nullptr;     // their bytes per element
  int nahead = 0;
};

// One sweep of pass 1 over basis rows u[0..NJ). FIRST: it forms m' = lerp(m, g) and the block sums
// (m'.m', g.g, and on refresh c.c, c.m'); R: U c in double; GRAM: the rows' Gram (single-sweep ranks).
template <class S, int NJ, bool FIRST, bool R, bool GRAM>
void sweep1(const Sums1& a, float w1, int64_t Lp, bool keep_mv, double* sums) {
  vf adot[NJ] = {}, acm = vf{};
  vd auc[NJ] = {}, agr[NJ][NJ] = {}, amm = vd{}, agg = vd{}, acc = vd{};
  for (int64_t x = 0; x < Lp; x += W) {
    vf mx, cx = vf{};
    if (FIRST) {
      const vf gx = ld(a.g + x);
      mx = lerp<S>(ld(a.m + x), gx, w1);
      if (keep_mv) st(a.mv + x, mx);
      if (a.next) __builtin_prefetch(a.next + x * a.next_size, 1, 3);  // one more stream while these run
      for (int i = 0; i < a.nahead; ++i) __builtin_prefetch(a.ahead[i] + x * a.ahead_size[i], 0, 2);
      amm += sq2(mx, mx);
      agg += sq2(gx, gx);
      if (R) { cx = ld(a.c + x); acc += sq2(cx, cx); acm += cx * mx; }
    } else {
      mx = ld(a.mv + x);
      if (R) cx = ld(a.c + x);
    }
    vd clo, chi, lo[NJ], hi[NJ];
    if (R) halves(cx, clo, chi);
    for (int j = 0; j < NJ; ++j) {
      const vf ux = ld(a.u[j] + x);
      adot[j] += ux * mx;
      if (R) { halves(ux, lo[j], hi[j]); auc[j] += lo[j] * clo; auc[j] += hi[j] * chi; }
    }
    if (GRAM)
      for (int i = 0; i < NJ; ++i)
        for (int j = i; j < NJ; ++j) { agr[i][j] += lo[i] * lo[j]; agr[i][j] += hi[i] * hi[j]; }
  }
  for (int j = 0; j < NJ; ++j) {
    a.um[j] += hsum(adot[j]);
    if (R) a.uc[j] += hsumd(auc[j]);
    if (GRAM) for (int i = 0; i <= j; ++i) a.gram[i * a.n + j] += hsumd(agr[i][j]);
  }
  if (FIRST) {
    sums[0] += hsum(amm); sums[1] += hsum(agg);
    if (R) { sums[2] += hsum(acc); sums[3] += hsum(acm); }
  }
}

// sweep1 with its flags from run-time values.
template <class S, int NJ>
void sweep1_rows(const Sums1& a, float w1, int64_t Lp, bool first, bool R, bool one_sweep, double* sums) {
  if (first && R && one_sweep) sweep1<S, NJ, true, true, true>(a, w1, Lp, false, sums);
  else if (first && R) sweep1<S, NJ, true, true, false>(a, w1, Lp, true, sums);
  else if (first) sweep1<S, NJ, true, false, false>(a, w1, Lp, !one_sweep, sums);
  else if (R) sweep1<S, NJ, false, true, false>(a, w1, Lp, false, sums);
  else sweep1<S, NJ, false, false, false>(a, w1, Lp, false, sums);
}

// Pass 1 on elements [x0, x1) of one block; reads only. With m' = lerp(m, g, w1) it adds U m', m'.m', g.g
// and, on refresh, the Gram U U^T (upper triangle), U c, c.c, c.m' to out.
template <class S, class P>
void pass1(int n, const Block& b, const S* U, const S* m, const P* g, const P* c, float w1, int64_t x0,
           int64_t x1, double* out, const StatsView& sv, Scratch& sc, std::vector<double>& wide,
           const P* next = nullptr, const Ahead* later = nullptr) {
  const bool R = b.refresh, one_sweep = n <= kGroup;
  double sums[4] = {};  // m'.m', g.g, c.c, c.m'
  const float* u[kMaxRank];
  for (int64_t xb = x0; xb < x1; xb += CHUNK) {
    const int64_t L = xb + CHUNK < x1 ? CHUNK : x1 - xb, Lp = (L + W - 1) / W * W;
    for (int j = 0; j < n; ++j) u[j] = src(U + j * b.ustride + xb, sc.at(j), L);
    Sums1 a{nullptr, src(m + xb, sc.at(n), L), src(g + xb, sc.at(n + 1), L),
            R ? src(c + xb, sc.at(n + 2), L) : nullptr, sc.at(n + 3), nullptr, nullptr, nullptr, n,
            next ? (const char*)(next + xb) : nullptr, (int)sizeof(P)};
    const char* ahead[kMaxRank + 4];
    a.nahead = later ? later->at(xb, ahead) : 0;
    a.ahead = ahead;
    a.ahead_size = later ? later->size : nullptr;
    for (int j0 = 0; j0 < n; j0 += kGroup) {
      a.u = u + j0;
      a.um = out + sv.um + j0;
      a.uc = out + sv.uc + j0;
      a.gram = out + sv.gram;
      switch (n - j0 < kGroup ? n - j0 : kGroup) {
        case 4: sweep1_rows<S, 4>(a, w1, Lp, j0 == 0, R, one_sweep, sums); break;
        case 3: sweep1_rows<S, 3>(a, w1, Lp, j0 == 0, R, one_sweep, sums); break;
        case 2: sweep1_rows<S, 2>(a, w1, Lp, j0 == 0, R, one_sweep, sums); break;
        default: sweep1_rows<S, 1>(a, w1, Lp, j0 == 0, R, one_sweep, sums); break;
      }
    }
    if (R && !one_sweep) {  // the Gram across sweeps: the rows widened to double, from cache
      const double* ud[kMaxRank];
      for (int j = 0; j < n; ++j) {
        double* row = wide.data() + (size_t)j * kWideStride;
        widen(u[j], row, Lp);
        ud[j] = row;
      }
      gram(ud, n, Lp, out + sv.gram);
    }
  }
  out[sv.mm] += sums[0]; out[sv.gg] += sums[1];
  if (R) { out[sv.cc] += sums[2]; out[sv.cm] += sums[3]; }
}

// Pass 2's inputs and outputs for one chunk.
struct Sums2 {
  const float* const* u;  // basis rows of this sweep (read)
  float* const* uo;       // where their new values go (LAST && ROT in a single sweep)
  const float *m, *g, *c, *p;
  float *mo, *po, *dir, *v;  // m' out, p out; the direction and v between sweeps
  const float* shrink;       // a, v_u and shift of this sweep's rows
  const float* v_u;
  const float* shift;
  const char* const* ahead;  // another block's streams at this chunk, prefetched (first sweep only)
  const int* ahead_size;     // their bytes per element
  int nahead;
};

struct Scalars2 {
  vf scale, along, nlr, decay, rho, nrho, v_c;
  bool do_decay;
};

// One sweep of pass 2 over basis rows u[0..NJ): dir = m' - a.U and (ROT) v = v_c c + v_u.U, carried in
// dir/v between sweeps. FIRST forms m' (and writes it); LAST finishes: u = scale (dir + along v), clipped,
// p <- p * decay - lr * u, and (UPD: a single sweep) U <- U - shift v^T. Returns the coordinates clipped.
template <class S, class P, int NJ, bool FIRST, bool LAST, bool ROT, bool UPD>
int64_t sweep2(const Sums2& a, const Scalars2& k, float w1, int64_t Lp) {
  vf A[NJ], VU[NJ], SH[NJ];
  for (int j = 0; j < NJ; ++j) { A[j] = splat(a.shrink[j]); VU[j] = splat(a.v_u[j]); SH[j] = splat(a.shift[j]); }
  vu nclip = vu{};
  for (int64_t x = 0; x < Lp; x += W) {
    for (int i = 0; i < a.nahead; ++i) __builtin_prefetch(a.ahead[i] + x * a.ahead_size[i], 0, 2);
    vf dx, vx = vf{};
    if (FIRST) {
      dx = lerp<S>(ld(a.m + x), ld(a.g + x), w1);
      st(a.mo + x, dx);
      if (ROT) {
        vx = k.v_c * ld(a.c + x);
        round_here(vx);  // v_c c rounded on its own, then each basis row's term fused: the sweep-per-row order
      }
    } else {
      dx = ld(a.dir + x);
      if (ROT) vx = ld(a.v + x);
    }
    vf ux[NJ];
    for (int j = 0; j < NJ; ++j) {
      ux[j] = ld(a.u[j] + x);
      dx = dx - A[j] * ux[j];
      if (ROT) vx = vx + VU[j] * ux[j];
    }
    if (!LAST) {
      st(a.dir + x, dx);
      if (ROT) st(a.v + x, vx);
      continue;
    }
    vf d = dx;
    if (ROT) d += k.along * vx;
    d *= k.scale;
    vu cut = (vu)(d > k.rho) | (vu)(d < k.nrho);
    nclip += cut & 1u;
    d = d > k.rho ? k.rho : d;
    d = d < k.nrho ? k.nrho : d;
    vf pv = ld(a.p + x);
    if (is_bf16<P>()) d = round_bf16(d);
    if (k.do_decay && !is_bf16<P>()) {  // p * decay + (-lr u) in one rounding (the previous kernel's order)
      vf step = k.nlr * d;
      round_here(step);
      st(a.po + x, pv * k.decay + step);
    } else {
      if (k.do_decay) pv = round_bf16(pv * k.decay);
      st(a.po + x, pv + k.nlr * d);
    }
    if (ROT && UPD) for (int j = 0; j < NJ; ++j) st(a.uo[j] + x, ux[j] - SH[j] * vx);
    else if (ROT) st(a.v + x, vx);
  }
  uint32_t t[W];
  std::memcpy(t, &nclip, sizeof t);
  int64_t clipped = 0;
  for (int i = 0; i < W; ++i) clipped += t[i];  // padding is 0 there, never cut
  return clipped;
}

// sweep2 with its flags from run-time values.
template <class S, class P, int NJ>
int64_t sweep2_rows(const Sums2& a, const Scalars2& k, float w1, int64_t Lp, bool first, bool last, bool R,
                    bool one_sweep) {
  if (one_sweep) return R ? sweep2<S, P, NJ, true, true, true, true>(a, k, w1, Lp)
                          : sweep2<S, P, NJ, true, true, false, false>(a, k, w1, Lp);
  if (first) return R ? sweep2<S, P, NJ, true, false, true, false>(a, k, w1, Lp)
                      : sweep2<S, P, NJ, true, false, false, false>(a, k, w1, Lp);
  if (!last) return R ? sweep2<S, P, NJ, false, false, true, false>(a, k, w1, Lp)
                      : sweep2<S, P, NJ, false, false, false, false>(a, k, w1, Lp);
  return R ? sweep2<S, P, NJ, false, true, true, false>(a, k, w1, Lp)
           : sweep2<S, P, NJ, false, true, false, false>(a, k, w1, Lp);
}

// Pass 2 on [x0, x1): m <- lerp(m, g, w1); v = v_u.U + v_c c (refresh); u = scale (m - a.U + along v),
// clipped to [-rho, rho]; p <- p * decay - lr * u; on refresh U <- U - shift v^T (a rank-one reflection).
// Returns how many coordinates the clip cut.
template <class S, class P>
int64_t pass2(int n, const Block& b, S* U, S* m, const P* g, P* p, const P* c, float w1, const float* coef,
              const CoefView& cv, int64_t x0, int64_t x1, Scratch& sc, const Ahead* later = nullptr) {
  const bool R = b.refresh, one_sweep = n <= kGroup;
  const Scalars2 k{splat(coef[cv.scale]), splat(coef[cv.along]), splat(-coef[cv.lr]), splat(coef[cv.decay]),
                   splat(coef[cv.rho]), splat(-coef[cv.rho]), splat(coef[cv.v_c]), coef[cv.decay] != 1.f};
  int64_t clipped = 0;
  const float* u[kGroup];
  float* uo[kGroup];
  for (int64_t xb = x0; xb < x1; xb += CHUNK) {
    const int64_t L = xb + CHUNK < x1 ? CHUNK : x1 - xb, Lp = (L + W - 1) / W * W;
    Sums2 a{u, uo, src(m + xb, sc.at(0), L), src(g + xb, sc.at(1), L), R ? src(c + xb, sc.at(3), L) : nullptr,
            src(p + xb, sc.at(2), L), dst(m + xb, sc.at(0), L), dst(p + xb, sc.at(2), L), sc.at(4), sc.at(5),
            nullptr, nullptr, nullptr, nullptr, nullptr, 0};
    const char* ahead[kMaxRank + 4];
    const int nahead = later ? later->at(xb, ahead) : 0;
    a.ahead = ahead;
    a.ahead_size = later ? later->size : nullptr;
    for (int j0 = 0; j0 < n; j0 += kGroup) {
      a.nahead = j0 == 0 ? nahead : 0;  // the first sweep prefetches
      const int nj = n - j0 < kGroup ? n - j0 : kGroup;
      for (int j = 0; j < nj; ++j) {
        S* Uj = U + (j0 + j) * b.ustride + xb;
        u[j] = src(Uj, sc.at(6 + j), L);
        uo[j] = dst(Uj, sc.at(6 + j), L);
      }
      a.shrink = coef + cv.shrink + j0;
      a.v_u = coef + cv.v_u + j0;
      a.shift = coef + cv.shift + j0;
      const bool first = j0 == 0, last = j0 + kGroup >= n;
      switch (nj) {
        case 4: clipped += sweep2_rows<S, P, 4>(a, k, w1, Lp, first, last, R, one_sweep); break;
        case 3: clipped += sweep2_rows<S, P, 3>(a, k, w1, Lp, first, last, R, one_sweep); break;
        case 2: clipped += sweep2_rows<S, P, 2>(a, k, w1, Lp, first, last, R, one_sweep); break;
        default: clipped += sweep2_rows<S, P, 1>(a, k, w1, Lp, first, last, R, one_sweep); break;
      }
      if (first) flush(m + xb, a.mo, L);
      if (one_sweep && R) for (int j = 0; j < nj; ++j) flush(U + (j0 + j) * b.ustride + xb, uo[j], L);
    }
    flush(p + xb, a.po, L);
    if (R && !one_sweep) {  // the reflection of every basis row, with the final v, from cache
      for (int j = 0; j < n; ++j) {
        S* Uj = U + j * b.ustride + xb;
        const float* uj = src(Uj, sc.at(6), L);
        float* out = dst(Uj, sc.at(6), L);
        const vf shift = splat(coef[cv.shift + j]);
        for (int64_t x = 0; x < Lp; x += W) st(out + x, ld(uj + x) - shift * ld(a.v + x));
        flush(Uj, out, L);
      }
    }
  }
  return clipped;
}

}  // namespace
