// A whole step's blocks, eight at a time (ginger_step in _cpu_kernel.cpp deals them to threads): the eight
// blocks' passes 1, their small solves with a refresh's eigenproblem roots side by side (secular_roots, one
// block per SIMD lane), then their passes 2, while the eight blocks are in cache; the passes of each one
// prefetch the block in its lane of the next eight. Included by _cpu_kernel.cpp after _cpu_solve.h and
// _cpu_passes.h.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

struct StepBlock {
  int tensor;
  int64_t b;  // block index in its tensor
};

// Block bi of one tensor in a whole step: where its data and small state are.
template <class S, class P>
struct RowBlock {
  Block b;
  S *U, *m;
  const P *g, *c;
  P* p;
  double *s, *R, *e;
  RowBlock(int n, const int64_t* T, int64_t bi, bool refresh) {
    const int64_t B = T[TensorRow::B], k = T[TensorRow::k], off = bi * k;
    b = {k, refresh, B * k};
    U = (S*)T[TensorRow::U] + off;
    m = (S*)T[TensorRow::m] + off;
    g = (const P*)T[TensorRow::g] + off;
    p = (P*)T[TensorRow::p] + off;
    c = refresh ? (const P*)T[TensorRow::c] + off : nullptr;
    s = (double*)T[TensorRow::s] + bi * n;
    R = (double*)T[TensorRow::R] + bi * n * n;
    e = (double*)T[TensorRow::e] + bi;
  }
};

// A thread's run of whole blocks, eight at a time: each one's pass 1; their solves, a refresh's eigenproblem
// roots side by side (secular_roots); each one's pass 2. Eight blocks' data stay in cache meanwhile.
template <class Sv, class S, class P>
int64_t step_blocks(int n, const std::vector<StepBlock>& blocks, int from, int to, const int64_t* tensors,
                    const int64_t* finite, const double* params, float w1, const StatsView& sv, const CoefView& cv,
                    double* results) {
  auto row = [&](int t) { return tensors + (int64_t)TensorRow::count * t; };
  auto steps = [&](int t) { return finite[Finite::count * t + Finite::grad] != 0; };
  auto refreshes = [&](int t) { return row(t)[TensorRow::refresh] && finite[Finite::count * t + Finite::curvature]; };
  constexpr int kBatch = WD;  // one block per lane of secular_roots
  const RefreshOut ro(n, cv.width);
  Scratch sc1(n + 4), sc2(10);
  std::vector<double> wide((size_t)n * kWideStride), stats(kBatch * sv.width), co(kBatch * ro.width);
  std::vector<float> cf(cv.width);
  std::vector<typename Sv::Refresh> solves(kBatch);
  std::vector<RowBlock<S, P>> rows;
  rows.reserve(kBatch);
  double prm[kBatch][Param::count];  // each block's solve parameters (a keep step's debias in place)
  int64_t clipped = 0;
  // Memory would idle while a pass works from cache: pass 1 of lane j prefetches the streams of the block in
  // lane j of the next eight that its pass 1 reads first (m, g, c), pass 2 the rest (p, U), so that both
  // passes keep memory busy (all of them from pass 2: 4% slower; docs/performance.md 22).
  Ahead later[kBatch];
  auto ahead_of = [&](int next, Ahead& first, Ahead& second) {
    first.count = second.count = 0;  // not Ahead{}: that clears the whole arrays, per row
    first.span = second.span = 0;
    if (next >= to || !steps(blocks[next].tensor)) return;
    const StepBlock& nb = blocks[next];
    const RowBlock<S, P> r(n, row(nb.tensor), nb.b, refreshes(nb.tensor));
    first.add(r.m); first.add(r.g); first.add(r.c);
    second.add(r.p);
    for (int u = 0; u < n; ++u) second.add(r.U + u * r.b.ustride);
    first.span = second.span = r.b.k;
  };
  for (int i0 = from; i0 < to; i0 += kBatch) {
    const int count = std::min(kBatch, to - i0);
    rows.clear();
    bool live[kBatch];
    RankOne<Sv::NR + 1>* eig[kBatch];
    int neig = 0;
    for (int j = 0; j < count; ++j) {  // pass 1, and a refresh's solve up to its eigenproblem
      const int tensor = blocks[i0 + j].tensor;
      double* res = results + (int64_t)Result::count * (i0 + j);
      rows.emplace_back(n, row(tensor), blocks[i0 + j].b, refreshes(tensor));
      RowBlock<S, P>& q = rows.back();
      std::memcpy(prm[j], params + (int64_t)Param::count * tensor, sizeof prm[j]);
      if (!q.b.refresh) prm[j][Param::debias] = prm[j][Param::debias_keep];
      double* st = stats.data() + j * sv.width;
      std::fill(res, res + Result::count, 0.0);
      res[Result::untouched] = 1;
      live[j] = false;
      if (!steps(tensor)) continue;
      std::fill(st, st + sv.width, 0.0);
      Ahead early;
      ahead_of(i0 + kBatch + j, early, later[j]);
      pass1<S, P>(n, q.b, q.U, q.m, q.g, q.c, w1, 0, q.b.k, st, sv, sc1, wide, q.p, &early);
      res[Result::grad_sq] = st[sv.gg];
      live[j] = std::isfinite(st[sv.mm]);
      if (!live[j] || !q.b.refresh) continue;
      Sv::refresh_begin(n, st, sv, q.s, q.R, prm[j], solves[j]);
      eig[neig++] = &solves[j].eig;
    }
    secular_roots(eig, neig);
    for (int j = 0; j < count; ++j) {  // the rest of each solve, the new small state, pass 2
      if (!live[j]) continue;
      RowBlock<S, P>& q = rows[j];
      const double* st = stats.data() + j * sv.width;
      double* o = co.data() + j * ro.width;
      double* res = results + (int64_t)Result::count * (i0 + j);
      std::fill(o, o + ro.width, 0.0);
      bool rotate = false;
      if (q.b.refresh) {
        Sv::refresh_end(n, st, sv, *q.e, prm[j], o, cv, solves[j]);
        std::memcpy(q.s, o + ro.s, sizeof(double) * n);
        std::memcpy(q.R, o + ro.R, sizeof(double) * n * n);
        *q.e = o[ro.e];
        rotate = o[ro.rotate] > 0;
        res[Result::update_sq] = o[ro.update_sq];
        res[Result::span_sq] = o[ro.span_sq];
      } else {
        Sv::keep_block(n, st, sv, q.s, q.R, *q.e, prm[j], o, cv);
        const double* rest = o + cv.width;
        res[Result::update_sq] = rest[KeepOut::update_sq];
        res[Result::span_sq] = rest[KeepOut::span_sq];
        *q.e = rest[KeepOut::e];
      }
      res[Result::untouched] = 0;
      for (int64_t x = 0; x < cv.width; ++x) cf[x] = (float)o[x];
      cf[cv.lr] = (float)prm[j][Param::lr];
      cf[cv.decay] = (float)prm[j][Param::decay];
      cf[cv.rho] = (float)prm[j][Param::rho];
      q.b.refresh = rotate;  // a block that adds no direction steps as between refreshes (its shift is 0)
      clipped += pass2<S, P>(n, q.b, q.U, q.m, q.g, q.p, q.c, w1, cf.data(), cv, 0, q.b.k, sc2,
                             &later[j]);
    }
  }
  return clipped;
}

}  // namespace
