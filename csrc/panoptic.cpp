// Panoptic post-processing on CPU: the per-pixel half of transformers'
// MaskFormerImageProcessor.post_process_panoptic_segmentation (its `compute_segments`), without
// ever building the (Q, H, W) full-resolution mask probabilities.
//
//   maskformer::query_argmax_out(mask_probs (Q,h,w) fp32, weights (Q,) fp32, mask_threshold, resize,
//                                use_fma, channels_last_vec, allow_prune,
//                                labels (H,W) int64 (a!), own_area (Q,) int64 (b!),
//                                scale_h=-1, scale_w=-1)
//       with P = F.interpolate(mask_probs, (H, W), bilinear, align_corners=False) (P = mask_probs
//       when !resize); scale_h/scale_w >= 0: aten's source step for an explicit scale factor
//       (upsample_bilinear2d(..., scales_h, scales_w): static_cast<float>(1.0 / scales_h), computed
//       by the caller), negative: none:
//         labels[y, x] = argmax_q weights[q] * P[q, y, x]   (torch.argmax: first index on ties, NaN wins)
//         own_area[q]  = #{(y, x) : P[q, y, x] >= float32(mask_threshold)}
//       Both outputs are overwritten. allow_prune=false forces the dense sweep (tests, benchmarks).
//       mask_probs with unit column stride (a crop of padded probabilities, [:, :h', :w']) is read
//       in place through its plane and row strides; other layouts are copied contiguous once.
//       The reference allocates P (Q x H x W fp32: 218 MB at Q=100, 640x853) and a bool mask of the
//       same size. Extra memory here: per-thread scratch (dense path: 2*Q*W floats of cached rows)
//       and, when pruning, cell tables of h*w*(list_max + 2) int32. Measured peak extra RSS at
//       Q=100, 100x75 -> 3000x4000: 0.1 MiB pruned, 6 MiB dense (the reference: 6 GB).
//
// Bit-exactness. Every value is computed with aten's own operation order (bilinear.h; the variant -
// fma or not, channels-last SIMD width - is calibrated by
// maskformer.kernels.upsample_argmax.torch_cpu_bilinear_rounding() and chosen per call by
// rounding_for()), the weighting is one fp32 multiply like torch's `P * weights[:, None, None]`,
// and the threshold compares in fp32 like `P >= mask_threshold` (torch casts the python float).
//
// Speed. The dense sweep evaluates Q queries at every output pixel, vectorised over a column tile
// with the horizontally interpolated source rows cached per tile (semantic.cpp's dense path):
// 15 ms for one 640x853 map at Q=100 on 2 cores. On MaskFormer outputs almost every source cell is
// owned by one query and lies clearly above or below the threshold for every other query, so
// with weights >= 0 (class scores) and Q >= kPruneFromQ the kernel first classifies each source
// cell (r, c) - taps rows (r, min(r+1, h-1)) x cols (c, min(c+1, w-1)), a superset of the taps of
// every output pixel mapped to it - per query, from its 4 taps widened by semantic's rounding
// margin (kPruneRel, kPruneAbs):
//   * argmax candidate unless weights[q] * hi4_q < a lower bound of max_j weights[j] * P[j] in the
//     cell (rounding is monotone, so fl(v * w) stays between fl(lo * w) and fl(hi * w) for w >= 0):
//     max_j w_j * lo4_j, raised on region boundaries by the mean of the 2 or 3 strongest
//     candidates (refine_candidates);
//   * threshold: lo4 >= thr -> every output pixel of the cell counts (added once per cell),
//     hi4 < thr -> none does, else "mixed": evaluated per pixel.
// Pixels of a cell with one candidate and no mixed query need no arithmetic at all: 7 ms for the
// same map. Cells with a non-finite tap or too many entries are evaluated densely per pixel; when
// those cover more than a quarter of the output, the whole image takes the dense sweep instead.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "bilinear.h"

namespace maskformer_panoptic {

using namespace maskformer_bilinear;

// Cell list entries: the query index plus two flags.
constexpr int32_t kCand = 1 << 30;   // may win the argmax in this cell
constexpr int32_t kMixed = 1 << 29;  // crosses the threshold inside this cell
constexpr int32_t kQueryMask = kMixed - 1;
// Fewer queries: the dense sweep is as fast as the cell pass (see query_argmax_out).
constexpr int64_t kPruneFromQ = 12;

struct Plan {
  const float* x;   // (Q, h, w) fp32, x[q][r][c] at x + q * sq + r * sh + c
  int64_t sq, sh;   // plane and row strides (elements)
  const float* wt;  // (Q,)
  float thr;
  int64_t Q, h, w, H, W;
  const Axis* rows;
  const Axis* cols;
  int64_t cl_vec;  // 0: generic rounding; > 0: channels-last rounding with this SIMD width
  int64_t TW;      // column tile of the dense path
  int64_t n_ct;
  // Pruning tables (phase A): per source cell the number of entries (-1: dense), of candidates,
  // and up to list_max entries (ascending query, with kCand / kMixed flags).
  int64_t list_max;
  int32_t* cell_n;
  int32_t* cell_nc;
  int32_t* cell_list;
};

// ---------------------------------------------------------------------------------------------
// Dense sweep: every query at every output pixel.
// ---------------------------------------------------------------------------------------------
struct DenseScratch {
  std::vector<float> slots;  // per column tile 2 cached source rows, Q x TW each
  std::vector<int64_t> tags;  // per column tile: the source rows its 2 slots hold
  std::vector<float> best;   // TW
  std::vector<int32_t> idx;  // TW
};

template <bool FMA>
MF_INLINE void horizontal_rows(const Plan& p, int64_t r, int64_t ow_b, int64_t tw, float* dst) {
  const int32_t* iw0 = p.cols->i0.data() + ow_b;
  const int32_t* iw1 = p.cols->i1.data() + ow_b;
  const float* lw0 = p.cols->l0.data() + ow_b;
  const float* lw1 = p.cols->l1.data() + ow_b;
  for (int64_t q = 0; q < p.Q; ++q) {
    const float* row = p.x + q * p.sq + r * p.sh;
    float* d = dst + q * p.TW;
    for (int64_t j = 0; j < tw; ++j) d[j] = lerp2<FMA>(row[iw0[j]], lw0[j], row[iw1[j]], lw1[j]);
  }
}

// Output rows [oh_b, oh_e) sharing one source row pair, columns of tile `ct`, generic rounding.
template <bool FMA>
MF_INLINE void dense_generic(const Plan& p, DenseScratch& s, int64_t ct, int64_t oh_b, int64_t oh_e, int64_t* labels,
                             int64_t* counts) {
  const int64_t ow_b = ct * p.TW, tw = std::min(p.TW, p.W - ow_b);
  const int64_t r0 = p.rows->i0[oh_b], r1 = p.rows->i1[oh_b];
  const float* A;
  const float* B;
  cached_row_pair(s.slots, s.tags, p.n_ct, p.Q, p.TW, ct, r0, r1,
                  [&](int64_t row, float* dst) { horizontal_rows<FMA>(p, row, ow_b, tw, dst); }, &A, &B);
  float* best = s.best.data();
  int32_t* idx = s.idx.data();
  const float thr = p.thr;
  for (int64_t oh = oh_b; oh < oh_e; ++oh) {
    const float lh0 = p.rows->l0[oh], lh1 = p.rows->l1[oh];
    {
      const float w0 = p.wt[0];
      int32_t c = 0;
      for (int64_t j = 0; j < tw; ++j) {
        const float v = lerp2<FMA>(A[j], lh0, B[j], lh1);
        c += v >= thr ? 1 : 0;
        best[j] = v * w0;
        idx[j] = 0;
      }
      counts[0] += c;
    }
    for (int64_t q = 1; q < p.Q; ++q) {
      const float* Aq = A + q * p.TW;
      const float* Bq = B + q * p.TW;
      const float wq = p.wt[q];
      const int32_t qq = static_cast<int32_t>(q);
      int32_t c = 0;
      for (int64_t j = 0; j < tw; ++j) {
        const float v = lerp2<FMA>(Aq[j], lh0, Bq[j], lh1);
        c += v >= thr ? 1 : 0;
        const float wv = v * wq;
        const bool take = takes_over(wv, best[j]);
        best[j] = take ? wv : best[j];
        idx[j] = take ? qq : idx[j];
      }
      counts[q] += c;
    }
    int64_t* out = labels + oh * p.W + ow_b;
    for (int64_t j = 0; j < tw; ++j) out[j] = idx[j];
  }
}

// Output row `oh`, columns of tile `ct`, channels-last rounding (small outputs and 1x1 masks).
template <bool FMA>
MF_INLINE void dense_channels_last(const Plan& p, DenseScratch& s, int64_t ct, int64_t oh, int64_t* labels,
                                   int64_t* counts) {
  const int64_t ow_b = ct * p.TW, tw = std::min(p.TW, p.W - ow_b);
  const int64_t full = p.Q - p.Q % p.cl_vec;  // queries inside full SIMD registers of aten's kernel
  const int32_t* iw0 = p.cols->i0.data() + ow_b;
  const int32_t* iw1 = p.cols->i1.data() + ow_b;
  const float* lw0 = p.cols->l0.data() + ow_b;
  const float* lw1 = p.cols->l1.data() + ow_b;
  const int64_t r0 = p.rows->i0[oh], r1 = p.rows->i1[oh];
  const float lh0 = p.rows->l0[oh], lh1 = p.rows->l1[oh];
  const float thr = p.thr;
  float* best = s.best.data();
  int32_t* idx = s.idx.data();
  for (int64_t q = 0; q < p.Q; ++q) {
    const float* x0 = p.x + q * p.sq + r0 * p.sh;
    const float* x1 = p.x + q * p.sq + r1 * p.sh;
    const float wq = p.wt[q];
    const int32_t qq = static_cast<int32_t>(q);
    const bool lane = q < full;
    int32_t c = 0;
    for (int64_t j = 0; j < tw; ++j) {
      const float v = channels_last_value<FMA>(x0[iw0[j]], x0[iw1[j]], x1[iw0[j]], x1[iw1[j]], lh0 * lw0[j],
                                               lh0 * lw1[j], lh1 * lw0[j], lh1 * lw1[j], lane);
      c += v >= thr ? 1 : 0;
      const float wv = v * wq;
      const bool take = (q == 0) || takes_over(wv, best[j]);
      best[j] = take ? wv : best[j];
      idx[j] = take ? qq : idx[j];
    }
    counts[q] += c;
  }
  int64_t* out = labels + oh * p.W + ow_b;
  for (int64_t j = 0; j < tw; ++j) out[j] = idx[j];
}

template <bool FMA>
MF_INLINE void dense_band(const Plan& p, DenseScratch& s, int64_t oh_b, int64_t oh_e, int64_t* labels,
                          int64_t* counts) {
  if (p.cl_vec > 0) {
    for (int64_t oh = oh_b; oh < oh_e; ++oh)
      for (int64_t ct = 0; ct < p.n_ct; ++ct) dense_channels_last<FMA>(p, s, ct, oh, labels, counts);
    return;
  }
  int64_t g_b = oh_b;
  while (g_b < oh_e) {  // groups of rows that read the same source row pair
    const int64_t r0 = p.rows->i0[g_b], r1 = p.rows->i1[g_b];
    int64_t g_e = g_b + 1;
    while (g_e < oh_e && p.rows->i0[g_e] == r0 && p.rows->i1[g_e] == r1) ++g_e;
    for (int64_t ct = 0; ct < p.n_ct; ++ct) dense_generic<FMA>(p, s, ct, g_b, g_e, labels, counts);
    g_b = g_e;
  }
}

// ---------------------------------------------------------------------------------------------
// Pruned path. A: classify source cells (parallel over bands of cell rows, query-major loops that
// stream each query plane). B: label output rows from their cell's entries.
// ---------------------------------------------------------------------------------------------
struct QueryBound {
  float upper;  // weights[q] * (band max + margin): no cell of the band can see a larger value
  int32_t q;
};

struct CellScratch {
  std::vector<float> lower;      // per cell: max_q weights[q] * lo4_q
  std::vector<int32_t> bad;      // per cell: a non-finite tap
  std::vector<uint32_t> cand, above, mixed;  // per cell one bit per query (word-major)
  std::vector<QueryBound> order;
  std::vector<float> hi;  // per query: band max + margin (threshold relevance)
  std::vector<int32_t> entries;  // Q: one cell's entries before they are copied to its list
};

MF_INLINE float lo_bound(float mn, float mag) { return mn - mag * kPruneRel - kPruneAbs; }
MF_INLINE float hi_bound(float mx, float mag) { return mx + mag * kPruneRel + kPruneAbs; }

// A cell on a region boundary: every query's 4 taps include low values, so the best
// single-query lower bound max_q w_q * lo4_q is low and the noise floor of every query passes the
// candidate test. Tighter: the maximum over queries is at least the mean over any set S of them,
// and a mean of bilinear values is the bilinear interpolation of the tap means, so
//   max_q w_q v_q >= min_i mean_{q in S} w_q x_q,i   (i over the 4 taps, bilinear weights >= 0).
// With S = the 2 and 3 candidates of largest upper bound (the regions meeting at this cell) the
// bound is about half (a third) of a region's level. Margin as kPruneRel, doubled for the sum.
MF_INLINE void refine_candidates(const Plan& p, int64_t r, int64_t c, float lower, int32_t* list, int64_t& n,
                                 int64_t& nc) {
  const int64_t o0 = r * p.sh + c, o1 = std::min(r + 1, p.h - 1) * p.sh + c;
  const int64_t dc = c < p.w - 1 ? 1 : 0;
  auto taps = [&](int32_t q, float* t) {
    const float* xq = p.x + q * p.sq;
    const float wq = p.wt[q];
    t[0] = xq[o0] * wq;
    t[1] = xq[o0 + dc] * wq;
    t[2] = xq[o1] * wq;
    t[3] = xq[o1 + dc] * wq;
  };
  // The 3 candidates of largest weighted upper bound (w * max4; margins are irrelevant for the choice).
  float top_v[3] = {-std::numeric_limits<float>::infinity(), -std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()};
  int32_t top_q[3] = {-1, -1, -1};
  for (int64_t t = 0; t < n; ++t) {
    if (!(list[t] & kCand)) continue;
    const int32_t q = list[t] & kQueryMask;
    float v[4];
    taps(q, v);
    const float hi = std::max(std::max(v[0], v[1]), std::max(v[2], v[3]));
    if (hi > top_v[2]) {
      int k = 2;
      while (k > 0 && hi > top_v[k - 1]) {
        top_v[k] = top_v[k - 1];
        top_q[k] = top_q[k - 1];
        --k;
      }
      top_v[k] = hi;
      top_q[k] = q;
    }
  }
  if (top_q[2] < 0) return;
  float a[4], b[4], d[4];
  taps(top_q[0], a);
  taps(top_q[1], b);
  taps(top_q[2], d);
  float mag = 0.f, min2 = std::numeric_limits<float>::infinity(), min3 = min2;
  for (int i = 0; i < 4; ++i) {
    mag = std::max(mag, std::max(std::fabs(a[i]), std::max(std::fabs(b[i]), std::fabs(d[i]))));
    min2 = std::min(min2, (a[i] + b[i]) * 0.5f);
    min3 = std::min(min3, (a[i] + b[i] + d[i]) * (1.f / 3.f));
  }
  if (!std::isfinite(mag)) return;
  const float bound = std::max(min2, min3) - 2.f * mag * kPruneRel - kPruneAbs;
  if (!(bound > lower)) return;
  // Drop candidates whose upper bound is below it (and entries left with no flag).
  int64_t m = 0, mc = 0;
  for (int64_t t = 0; t < n; ++t) {
    int32_t e = list[t];
    if (e & kCand) {
      const int32_t q = e & kQueryMask;
      const float* xq = p.x + q * p.sq;
      const float mx = std::max(std::max(xq[o0], xq[o0 + dc]), std::max(xq[o1], xq[o1 + dc]));
      const float mn = std::min(std::min(xq[o0], xq[o0 + dc]), std::min(xq[o1], xq[o1 + dc]));
      if (hi_bound(mx, std::max(mx, -mn)) * p.wt[q] < bound) e &= ~kCand;
    }
    if (e & (kCand | kMixed)) {
      list[m++] = e;
      mc += (e & kCand) ? 1 : 0;
    }
  }
  n = m;
  nc = mc;
}

// Phase A for cell rows [rb, re). Adds the "every pixel counts" areas of non-dense cells to
// `counts`, returns the number of output pixels in dense cells.
MF_INLINE int64_t classify_rows(const Plan& p, int64_t rb, int64_t re, CellScratch& s, const int64_t* rows_of,
                                const int64_t* cols_of, int64_t* counts) {
  const int64_t w = p.w, ncell = (re - rb) * w;
  const int64_t nwords = (p.Q + 31) / 32;
  const int64_t last_row = std::min(re, p.h - 1);
  const float thr = p.thr;
  float* lower = s.lower.data();
  int32_t* bad = s.bad.data();
  std::fill(lower, lower + ncell, -std::numeric_limits<float>::infinity());
  std::fill(bad, bad + ncell, 0);
  std::fill(s.cand.begin(), s.cand.begin() + nwords * ncell, 0u);
  std::fill(s.above.begin(), s.above.begin() + nwords * ncell, 0u);
  std::fill(s.mixed.begin(), s.mixed.begin() + nwords * ncell, 0u);

  // Band-wide bounds per query: max v, max |v|, finiteness (one stream when the plane's rows
  // are contiguous, sh == w; else one run per row).
  bool band_finite = true;
  const bool one_run = p.sh == w;
  const int64_t runs = one_run ? 1 : last_row - rb + 1, run_len = one_run ? (last_row - rb + 1) * w : w;
  for (int64_t q = 0; q < p.Q; ++q) {
    BandStats st;
    for (int64_t t = 0; t < runs; ++t) st.add(p.x + q * p.sq + (rb + t) * p.sh, run_len);
    float mx, mag;
    band_finite &= st.finish(&mx, &mag);
    s.hi[q] = hi_bound(mx, mag);
    s.order[q].upper = s.hi[q] * p.wt[q];
    s.order[q].q = static_cast<int32_t>(q);
  }
  QueryBound* order = s.order.data();
  if (band_finite) {
    std::sort(order, order + p.Q, [](const QueryBound& a, const QueryBound& b) {
      return a.upper > b.upper || (a.upper == b.upper && a.q < b.q);
    });
  }

  // Pass 1: lower[cell] = max_q weights[q] * lo4_q, queries by decreasing band bound; once the
  // next bound is below every cell's lower bound, the remaining queries cannot matter for it.
  float band_lower_min = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < p.Q; ++t) {
    if (band_finite && t > 0 && order[t].upper < band_lower_min) break;
    const int64_t q = order[t].q;
    const float wq = p.wt[q];
    for (int64_t r = rb; r < re; ++r) {
      const float* x0 = p.x + q * p.sq + r * p.sh;
      const float* x1 = p.x + q * p.sq + std::min(r + 1, p.h - 1) * p.sh;
      float* lo_r = lower + (r - rb) * w;
      int32_t* bad_r = bad + (r - rb) * w;
      // Cells c < w-1 read columns (c, c+1), the last one (w-1, w-1): two loops, so the first
      // vectorises (and a finite band skips the non-finite flags).
      if (band_finite) {
        for (int64_t c = 0; c < w - 1; ++c) {
          const float a = x0[c], b = x0[c + 1], d = x1[c], e = x1[c + 1];
          const float mn = std::min(std::min(a, b), std::min(d, e));
          const float mx = std::max(std::max(a, b), std::max(d, e));
          const float lo = lo_bound(mn, std::max(mx, -mn)) * wq;
          lo_r[c] = lo > lo_r[c] ? lo : lo_r[c];
        }
      } else {
        for (int64_t c = 0; c < w - 1; ++c) {
          const float a = x0[c], b = x0[c + 1], d = x1[c], e = x1[c + 1];
          const float mn = std::min(std::min(a, b), std::min(d, e));
          const float mx = std::max(std::max(a, b), std::max(d, e));
          const float lo = lo_bound(mn, std::max(mx, -mn)) * wq;
          lo_r[c] = lo > lo_r[c] ? lo : lo_r[c];
          bad_r[c] |= nonfinite(a + b + d + e);
        }
        bad_r[w - 1] |= nonfinite(x0[w - 1] + x1[w - 1]);
      }
      {
        const float a = x0[w - 1], d = x1[w - 1];
        const float mn = std::min(a, d), mx = std::max(a, d);
        const float lo = lo_bound(mn, std::max(mx, -mn)) * wq;
        lo_r[w - 1] = lo > lo_r[w - 1] ? lo : lo_r[w - 1];
      }
    }
    if (band_finite && t + 1 < p.Q && !(order[t + 1].upper < band_lower_min)) {
      // Lower bounds only grow: their new minimum decides whether the next queries matter.
      v8sf vmin = splat8(std::numeric_limits<float>::infinity());
      int64_t i = 0;
      for (; i + 8 <= ncell; i += 8) vmin = min8(vmin, load8(lower + i));
      float lmin = hmin8(vmin);
      for (; i < ncell; ++i) lmin = lower[i] < lmin ? lower[i] : lmin;
      band_lower_min = lmin;
    }
  }

  // Pass 2: the bits. A query below every cell's lower bound and below the threshold everywhere in
  // the band (most queries: masks are mostly ~0) has no bit anywhere.
  for (int64_t q = 0; q < p.Q; ++q) {
    if (band_finite && s.hi[q] * p.wt[q] < band_lower_min && s.hi[q] < thr) continue;
    const float wq = p.wt[q];
    const uint32_t bit = 1u << (q & 31);
    for (int64_t r = rb; r < re; ++r) {
      const float* x0 = p.x + q * p.sq + r * p.sh;
      const float* x1 = p.x + q * p.sq + std::min(r + 1, p.h - 1) * p.sh;
      const float* lo_r = lower + (r - rb) * w;
      const int64_t off = (q >> 5) * ncell + (r - rb) * w;
      uint32_t* cb = s.cand.data() + off;
      uint32_t* ab = s.above.data() + off;
      uint32_t* mb = s.mixed.data() + off;
      auto classify = [&](int64_t c, float mn, float mx) {
        const float mag = std::max(mx, -mn);
        const float lo = lo_bound(mn, mag), hi = hi_bound(mx, mag);
        const bool is_above = lo >= thr;
        cb[c] |= (hi * wq < lo_r[c]) ? 0u : bit;
        ab[c] |= is_above ? bit : 0u;
        mb[c] |= (!is_above && !(hi < thr)) ? bit : 0u;
      };
      for (int64_t c = 0; c < w - 1; ++c) {
        const float a = x0[c], b = x0[c + 1], d = x1[c], e = x1[c + 1];
        classify(c, std::min(std::min(a, b), std::min(d, e)), std::max(std::max(a, b), std::max(d, e)));
      }
      classify(w - 1, std::min(x0[w - 1], x1[w - 1]), std::max(x0[w - 1], x1[w - 1]));
    }
  }

  // Lists: ascending query (the first maximum wins).
  int64_t dense_pixels = 0;
  int32_t* tmp = s.entries.data();
  for (int64_t i = 0; i < ncell; ++i) {
    const int64_t r = rb + i / w, c = i % w;
    const int64_t cell = r * w + c;
    const int64_t npix = rows_of[r] * cols_of[c];
    int64_t n = 0, nc = 0;
    bool dense = bad[i] != 0;
    for (int64_t wd = 0; wd < nwords && !dense; ++wd) {
      const uint32_t cw = s.cand[wd * ncell + i], mw = s.mixed[wd * ncell + i];
      uint32_t m = cw | mw;
      while (m) {
        const int sh = __builtin_ctz(m);
        const uint32_t b = 1u << sh;
        tmp[n++] = static_cast<int32_t>(wd * 32 + sh) | ((cw & b) ? kCand : 0) | ((mw & b) ? kMixed : 0);
        nc += (cw & b) ? 1 : 0;
        m &= m - 1;
      }
    }
    if (!dense && nc > 2) refine_candidates(p, r, c, lower[i], tmp, n, nc);
    dense = dense || nc == 0 || n > p.list_max;
    if (dense) {
      p.cell_n[cell] = -1;
      p.cell_nc[cell] = 0;
      dense_pixels += npix;
      continue;
    }
    std::copy(tmp, tmp + n, p.cell_list + cell * p.list_max);
    p.cell_n[cell] = static_cast<int32_t>(n);
    p.cell_nc[cell] = static_cast<int32_t>(nc);
    if (npix == 0) continue;
    for (int64_t wd = 0; wd < nwords; ++wd) {
      uint32_t m = s.above[wd * ncell + i];
      while (m) {
        counts[wd * 32 + __builtin_ctz(m)] += npix;
        m &= m - 1;
      }
    }
  }
  return dense_pixels;
}

// Phase B for output rows [oh_b, oh_e): generic rounding (the pruned path is only taken then).
template <bool FMA>
MF_INLINE void sparse_rows(const Plan& p, int64_t oh_b, int64_t oh_e, int64_t* labels, int64_t* counts) {
  const int64_t sq = p.sq;
  const float thr = p.thr;
  for (int64_t oh = oh_b; oh < oh_e; ++oh) {
    const int64_t r0 = p.rows->i0[oh], r1 = p.rows->i1[oh];
    const float lh0 = p.rows->l0[oh], lh1 = p.rows->l1[oh];
    const float* x0 = p.x + r0 * p.sh;
    const float* x1 = p.x + r1 * p.sh;
    const int32_t* cell_n = p.cell_n + r0 * p.w;
    const int32_t* cell_nc = p.cell_nc + r0 * p.w;
    const int32_t* cell_list = p.cell_list + r0 * p.w * p.list_max;
    int64_t* out = labels + oh * p.W;
    for (int64_t ow = 0; ow < p.W; ++ow) {
      const int32_t a0 = p.cols->i0[ow];
      const int32_t n = cell_n[a0];
      const int32_t* list = cell_list + a0 * p.list_max;
      if (n == 1) {  // one candidate (always: nc >= 1) - most pixels
        if (!(list[0] & kMixed)) {
          out[ow] = list[0] & kQueryMask;
          continue;
        }
      }
      const int32_t a1 = p.cols->i1[ow];
      const float lw0 = p.cols->l0[ow], lw1 = p.cols->l1[ow];
      float best = 0.f;
      int32_t bi = 0;
      if (n < 0) {  // dense cell: every query, both questions
        for (int64_t q = 0; q < p.Q; ++q) {
          const float v = generic_value<FMA>(x0 + q * sq, x1 + q * sq, a0, a1, lw0, lw1, lh0, lh1);
          counts[q] += v >= thr ? 1 : 0;
          const float wv = v * p.wt[q];
          if (q == 0 || takes_over(wv, best)) {
            best = wv;
            bi = static_cast<int32_t>(q);
          }
        }
        out[ow] = bi;
        continue;
      }
      const bool one = cell_nc[a0] == 1;
      bool first = true;
      for (int32_t t = 0; t < n; ++t) {
        const int32_t e = list[t];
        const int32_t q = e & kQueryMask;
        const bool cand = (e & kCand) != 0, mixed = (e & kMixed) != 0;
        if (cand && one) bi = q;
        if (!mixed && !(cand && !one)) continue;
        const float v = generic_value<FMA>(x0 + q * sq, x1 + q * sq, a0, a1, lw0, lw1, lh0, lh1);
        if (mixed) counts[q] += v >= thr ? 1 : 0;
        if (cand && !one) {
          const float wv = v * p.wt[q];
          if (first || takes_over(wv, best)) {
            best = wv;
            bi = q;
            first = false;
          }
        }
      }
      out[ow] = bi;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Entry points per ISA: fma rounding runs in the avx2+fma build when the CPU has it, plain
// rounding in the baseline build (no fma instruction to contract into; see semantic.cpp).
// ---------------------------------------------------------------------------------------------
static void dense_base(const Plan& p, DenseScratch& s, int64_t a, int64_t b, int64_t* l, int64_t* c, bool fma) {
  if (fma) dense_band<true>(p, s, a, b, l, c); else dense_band<false>(p, s, a, b, l, c);
}
static void sparse_base(const Plan& p, int64_t a, int64_t b, int64_t* l, int64_t* c, bool fma) {
  if (fma) sparse_rows<true>(p, a, b, l, c); else sparse_rows<false>(p, a, b, l, c);
}
static int64_t classify_base(const Plan& p, int64_t rb, int64_t re, CellScratch& s, const int64_t* ro,
                             const int64_t* co, int64_t* c) {
  return classify_rows(p, rb, re, s, ro, co, c);
}
#if MF_X86_DISPATCH
MF_TARGET_AVX2 static void dense_avx2(const Plan& p, DenseScratch& s, int64_t a, int64_t b, int64_t* l, int64_t* c) {
  dense_band<true>(p, s, a, b, l, c);
}
MF_TARGET_AVX2 static void sparse_avx2(const Plan& p, int64_t a, int64_t b, int64_t* l, int64_t* c) {
  sparse_rows<true>(p, a, b, l, c);
}
MF_TARGET_AVX2 static int64_t classify_avx2(const Plan& p, int64_t rb, int64_t re, CellScratch& s, const int64_t* ro,
                                            const int64_t* co, int64_t* c) {
  return classify_rows(p, rb, re, s, ro, co, c);  // no rounding inside: only the vector width
}
#endif

static void dense_any(const Plan& p, DenseScratch& s, int64_t a, int64_t b, int64_t* l, int64_t* c, bool fma) {
#if MF_X86_DISPATCH
  if (fma && cpu_has_avx2_fma()) return dense_avx2(p, s, a, b, l, c);
#endif
  dense_base(p, s, a, b, l, c, fma);
}
static void sparse_any(const Plan& p, int64_t a, int64_t b, int64_t* l, int64_t* c, bool fma) {
#if MF_X86_DISPATCH
  if (fma && cpu_has_avx2_fma()) return sparse_avx2(p, a, b, l, c);
#endif
  sparse_base(p, a, b, l, c, fma);
}
static int64_t classify_any(const Plan& p, int64_t rb, int64_t re, CellScratch& s, const int64_t* ro,
                            const int64_t* co, int64_t* c) {
#if MF_X86_DISPATCH
  if (cpu_has_avx2_fma()) return classify_avx2(p, rb, re, s, ro, co, c);
#endif
  return classify_base(p, rb, re, s, ro, co, c);
}

// Column tile of the dense path: two cached rows (2 x Q x TW floats) stay in L2 (~256 KiB).
static int64_t column_tile(int64_t Q, int64_t W) {
  int64_t tw = std::max<int64_t>(16, std::min<int64_t>(512, 32768 / std::max<int64_t>(Q, 1)));
  tw = (tw / 16) * 16;
  return std::min(tw, W);
}

// No resize (transformers' target_sizes=None): P is mask_probs itself. Pixels go in chunks of one
// run of contiguous floats (the whole plane when its rows are contiguous, sh == w; else a row),
// chunks in bands (>= 4 per thread), one row of `band_counts` (Q counts) per band.
static void identity_labels(const float* x, int64_t sq, int64_t sh, int64_t h, int64_t w, const float* wt, float thr,
                            int64_t Q, int64_t* labels, std::vector<int64_t>& band_counts, int64_t threads) {
  constexpr int64_t chunk = 1024;
  const bool one_run = sh == w;
  const int64_t runs = one_run ? 1 : h, run_len = one_run ? h * w : w;
  const int64_t per_run = (run_len + chunk - 1) / chunk, n_chunks = runs * per_run;
  const int64_t n_bands = std::max<int64_t>(1, std::min<int64_t>(4 * threads, n_chunks));
  const int64_t band = (n_chunks + n_bands - 1) / n_bands;
  band_counts.assign(n_bands * Q, 0);
  at::parallel_for(0, n_bands, 1, [&](int64_t b, int64_t e) {
    std::vector<float> best(chunk);
    std::vector<int32_t> idx(chunk);
    for (int64_t t = b; t < e; ++t) {
      int64_t* counts = band_counts.data() + t * Q;
      const int64_t ce = std::min(n_chunks, (t + 1) * band);
      for (int64_t ch = t * band; ch < ce; ++ch) {
        const int64_t run = ch / per_run, r0 = (ch % per_run) * chunk, n = std::min(chunk, run_len - r0);
        const float* x0 = x + run * sh + r0;
        for (int64_t q = 0; q < Q; ++q) {
          const float* xq = x0 + q * sq;
          const float wq = wt[q];
          const int32_t qq = static_cast<int32_t>(q);
          int32_t c = 0;
          for (int64_t j = 0; j < n; ++j) {
            const float v = xq[j];
            c += v >= thr ? 1 : 0;
            const float wv = v * wq;
            const bool take = (q == 0) || takes_over(wv, best[j]);
            best[j] = take ? wv : best[j];
            idx[j] = take ? qq : idx[j];
          }
          counts[q] += c;
        }
        int64_t* out = labels + run * w + r0;
        for (int64_t j = 0; j < n; ++j) out[j] = idx[j];
      }
    }
  });
}

// allow_prune=false forces the dense sweep (tests and benchmarks check both paths on one input).
// scale_h / scale_w: aten's source step for an explicit scale factor, negative for none (make_axis).
void query_argmax_out(const at::Tensor& mask_probs_in, const at::Tensor& weights_in, double mask_threshold, bool resize,
                      bool use_fma, int64_t channels_last_vec, bool allow_prune, at::Tensor& labels,
                      at::Tensor& own_area, double scale_h, double scale_w) {
  TORCH_CHECK(mask_probs_in.dim() == 3, "mask_probs must be (Q, h, w), got ", mask_probs_in.sizes());
  TORCH_CHECK(mask_probs_in.scalar_type() == at::kFloat, "mask_probs must be float32, got ",
              mask_probs_in.scalar_type());
  TORCH_CHECK(weights_in.scalar_type() == at::kFloat, "weights must be float32, got ", weights_in.scalar_type());
  TORCH_CHECK(mask_probs_in.device().is_cpu() && weights_in.device().is_cpu(), "inputs must be CPU tensors");
  const int64_t Q = mask_probs_in.size(0), h = mask_probs_in.size(1), w = mask_probs_in.size(2);
  TORCH_CHECK(Q >= 1 && h >= 1 && w >= 1, "mask_probs must have Q, h, w >= 1, got ", mask_probs_in.sizes());
  TORCH_CHECK(mask_probs_in.numel() < (int64_t(1) << 31), "mask_probs too large for int32 indexing");
  TORCH_CHECK(weights_in.dim() == 1 && weights_in.size(0) == Q, "weights must be (Q,) = (", Q, ",), got ",
              weights_in.sizes());
  TORCH_CHECK(labels.dim() == 2 && labels.scalar_type() == at::kLong && labels.is_contiguous() &&
                  labels.device().is_cpu(),
              "labels must be a contiguous (H, W) int64 CPU tensor, got ", labels.sizes(), " ", labels.scalar_type());
  TORCH_CHECK(own_area.dim() == 1 && own_area.size(0) == Q && own_area.scalar_type() == at::kLong &&
                  own_area.is_contiguous() && own_area.device().is_cpu(),
              "own_area must be a contiguous (Q,) int64 CPU tensor, got ", own_area.sizes(), " ",
              own_area.scalar_type());
  TORCH_CHECK(channels_last_vec >= 0, "channels_last_vec must be >= 0, got ", channels_last_vec);
  const int64_t H = labels.size(0), W = labels.size(1);
  TORCH_CHECK(resize || (H == h && W == w), "without resize, labels must be (h, w) = (", h, ", ", w, "), got ",
              labels.sizes());
  TORCH_CHECK(H < (int64_t(1) << 31) && W < (int64_t(1) << 31), "target too large");
  TORCH_CHECK(!std::isnan(scale_h) && !std::isnan(scale_w), "scale_h / scale_w must not be NaN");
  // Unit column stride: read in place through the plane and row strides (a crop of padded
  // probabilities is a strided view); anything else is copied contiguous once.
  const at::Tensor x = mask_probs_in.stride(2) == 1 ? mask_probs_in : mask_probs_in.contiguous();
  const int64_t sq = x.stride(0), sh = x.stride(1);
  const at::Tensor wt = weights_in.contiguous();
  const float* xp = x.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
  // torch compares a float32 tensor with a python float in float32.
  const float thr = static_cast<float>(mask_threshold);
  int64_t* lp = labels.data_ptr<int64_t>();
  int64_t* own = own_area.data_ptr<int64_t>();
  const int64_t threads = at::get_num_threads();
  if (H == 0 || W == 0) {
    std::fill(own, own + Q, 0);
    return;
  }

  std::vector<int64_t> band_counts;
  auto finish = [&]() {
    std::fill(own, own + Q, 0);
    for (size_t i = 0; i < band_counts.size(); ++i) own[i % Q] += band_counts[i];
  };
  if (!resize) {
    identity_labels(xp, sq, sh, h, w, wp, thr, Q, lp, band_counts, threads);
    finish();
    return;
  }

  const Axis rows = make_axis(h, H, use_fma, scale_h < 0 ? -1.f : static_cast<float>(scale_h));
  const Axis cols = make_axis(w, W, use_fma, scale_w < 0 ? -1.f : static_cast<float>(scale_w));
  Plan plan;
  plan.x = xp;
  plan.sq = sq;
  plan.sh = sh;
  plan.wt = wp;
  plan.thr = thr;
  plan.Q = Q; plan.h = h; plan.w = w; plan.H = H; plan.W = W;
  plan.rows = &rows; plan.cols = &cols;
  plan.cl_vec = channels_last_vec;
  plan.TW = column_tile(Q, W);
  plan.n_ct = (W + plan.TW - 1) / plan.TW;
  plan.list_max = std::max<int64_t>(8, Q / 8);
  plan.cell_n = plan.cell_nc = plan.cell_list = nullptr;

  // Output row bands, >= 4 per thread for balance.
  const int64_t band = std::max<int64_t>(1, (H + 4 * threads - 1) / (4 * threads));
  const int64_t n_rb = (H + band - 1) / band;

  // Pruning needs weights >= 0 (monotone weighting). Its cell pass costs ~1.2 ms + 0.06 ms per
  // query for a 160x213 mask against 0.15 ms per query for the dense sweep to 640x853 (2 cores):
  // it pays from ~12 queries and an upscale of 2 per side. The channels-last rounding only serves
  // small outputs (and 1x1 masks).
  bool prune = allow_prune && channels_last_vec == 0 && H * W >= 4 * h * w && Q >= kPruneFromQ;
  for (int64_t q = 0; q < Q && prune; ++q) prune = std::isfinite(wp[q]) && wp[q] >= 0.f;
  if (prune) {
    std::vector<int32_t> cell_n(h * w), cell_nc(h * w), cell_list(h * w * plan.list_max);
    plan.cell_n = cell_n.data();
    plan.cell_nc = cell_nc.data();
    plan.cell_list = cell_list.data();
    // Output pixels per source cell row / column (0 for cells a downscale skips).
    std::vector<int64_t> rows_of(h, 0), cols_of(w, 0);
    for (int64_t oh = 0; oh < H; ++oh) ++rows_of[rows.i0[oh]];
    for (int64_t ow = 0; ow < W; ++ow) ++cols_of[cols.i0[ow]];
    const int64_t rband = std::max<int64_t>(1, (h + 2 * threads - 1) / (2 * threads));
    const int64_t n_ab = (h + rband - 1) / rband;
    std::vector<int64_t> a_counts(n_ab * Q, 0), a_dense(n_ab, 0);
    at::parallel_for(0, n_ab, 1, [&](int64_t b, int64_t e) {
      const int64_t nwords = (Q + 31) / 32, ncell = rband * w;
      CellScratch s;
      s.lower.resize(ncell);
      s.bad.resize(ncell);
      s.cand.resize(nwords * ncell);
      s.above.resize(nwords * ncell);
      s.mixed.resize(nwords * ncell);
      s.order.resize(Q);
      s.hi.resize(Q);
      s.entries.resize(Q);
      for (int64_t t = b; t < e; ++t) {
        a_dense[t] = classify_any(plan, t * rband, std::min(h, (t + 1) * rband), s, rows_of.data(), cols_of.data(),
                                  a_counts.data() + t * Q);
      }
    });
    int64_t dense_pixels = 0;
    for (int64_t v : a_dense) dense_pixels += v;
    // Dense cells are evaluated one pixel and query at a time; when they cover more than a quarter
    // of the output the vectorised sweep below is faster.
    if (4 * dense_pixels <= H * W) {
      band_counts.assign(n_rb * Q, 0);
      at::parallel_for(0, n_rb, 1, [&](int64_t b, int64_t e) {
        for (int64_t t = b; t < e; ++t) {
          sparse_any(plan, t * band, std::min(H, (t + 1) * band), lp, band_counts.data() + t * Q, use_fma);
        }
      });
      band_counts.insert(band_counts.end(), a_counts.begin(), a_counts.end());
      finish();
      return;
    }
  }

  band_counts.assign(n_rb * Q, 0);
  at::parallel_for(0, n_rb, 1, [&](int64_t b, int64_t e) {
    DenseScratch s;
    s.best.resize(plan.TW);
    s.idx.resize(plan.TW);
    for (int64_t t = b; t < e; ++t) {
      dense_any(plan, s, t * band, std::min(H, (t + 1) * band), lp, band_counts.data() + t * Q, use_fma);
    }
  });
  finish();
}

}  // namespace maskformer_panoptic

TORCH_LIBRARY_FRAGMENT(maskformer, m) {
  m.def(
      "query_argmax_out(Tensor mask_probs, Tensor weights, float mask_threshold, bool resize, bool use_fma, "
      "int channels_last_vec, bool allow_prune, Tensor(a!) labels, Tensor(b!) own_area, float scale_h=-1., "
      "float scale_w=-1.) -> ()");
}

TORCH_LIBRARY_IMPL(maskformer, CPU, m) { m.impl("query_argmax_out", &maskformer_panoptic::query_argmax_out); }
