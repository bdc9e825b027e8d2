// Semantic post-processing on CPU: the two halves of transformers'
// MaskFormerImageProcessor.post_process_semantic_segmentation, without ever building the
// (K, H, W) full-resolution class scores.
//
//   maskformer::mask_einsum(class_logits (B,Q,K+1), mask_logits (B,Q,h,w)) -> (B,K,h,w) fp32
//       softmax over classes without the null class, sigmoid of the masks and the contraction over
//       queries in one pass over the masks; fp32 math for fp16/bf16 inputs. Not bit-identical to
//       torch.einsum (MKL sums in its own order): within 8e-7 of it at Q=100, K=150 (scores <= 1).
//       32 ms for batch 2 at 160x213 on 2 cores, vs 27 ms for torch's sigmoid + MKL einsum, which
//       it beats only on memory (no (B, Q, h, w) sigmoid tensor).
//   maskformer::upsample_argmax_out(scores (K,h,w), out (H,W) int, resize, use_fma, channels_last_vec,
//                                   scale_h=-1, scale_w=-1)
//       bilinear resize (align_corners=False) fused with argmax over classes. fp32 scores are read
//       in place through their plane and row strides when stride(2) == 1 (a crop of padded
//       logits, x[:, :h', :w'], is never copied); other layouts and fp16/bf16 are made contiguous
//       fp32 first. scale_h/scale_w: aten's source step for an explicit scale factor
//       (static_cast<float>(1.0 / scales_h), computed by the caller), negative for none (then
//       float(h) / float(H), as F.interpolate(size=...)). Extra memory: the
//       candidate tables (h*w*(max(4, K/16)+1) int32), kRowChunk rows of int32 staging and, on the
//       dense path, 2*K*208 floats per column tile and thread. Measured: 7 MiB peak extra RSS for
//       K=150, 100x75 -> 4000x3000 (the reference's resized scores would be 7.2 GB).
//   maskformer::bilinear_resize(x (C,h,w), H, W, use_fma, channels_last_vec, scale_h=-1, scale_w=-1)
//       -> (C,H,W) fp32: the same per-pixel arithmetic, materialised: the test hook proving the
//       rounding is aten's.
//
// Bit-exactness. The label map must equal argmax(F.interpolate(...)), and two classes' upsampled
// scores can differ by one ulp at a region boundary, so every value we compare is computed with
// aten's own operation order (ATen/native/UpSample.h + native/cpu/UpSampleKernel.cpp, torch 2.13):
//   * generic (separable) kernel: t_r = x[r][w0]*lw0 + x[r][w1]*lw1; v = t_h0*lh0 + t_h1*lh1.
//     aten is built with -mavx2 -mfma and GCC contracts `a*b + c*d` into fma(a, b, c*d) and
//     `scale*(i+0.5) - 0.5` into fma(scale, i+0.5, -0.5): use_fma=true spells exactly that with
//     std::fma; use_fma=false is the uncontracted DEFAULT-capability build and runs in our baseline
//     (SSE2) code, where the compiler has no fma instruction to contract into.
//   * channels-last kernel (aten takes it when H+W <= 128, for 1x1 masks with K > 3 and for K == 3
//     on one thread): w00 = lh0*lw0 ...; channels inside full SIMD vectors of width
//     `channels_last_vec` round as fma(a,w00, fma(b,w01, fma(d,w11, c*w10))), the tail channels
//     as fma(d,w11, fma(c,w10, fma(a,w00, b*w01))).
//   Which variant torch uses on this machine is calibrated at runtime against F.interpolate by
//   maskformer.kernels.upsample_argmax.torch_cpu_bilinear_rounding().
//
// Speed. A dense upsample+argmax evaluates K classes at every output pixel: 164 M evaluations for
// two 640x853 maps at K=150, 42 ms on this 2-core EPYC. But a bilinear value is a convex
// combination of its 4 taps, so class k cannot win anywhere in a source cell when
// max4_k < max_j min4_j (with a rounding margin, see kPruneRel): per source cell we keep only the
// classes that can still win - 1 to 3 on MaskFormer-like outputs, where a cell with one
// candidate needs no arithmetic at all - and evaluate those with the exact formula above: 14 ms
// for the same two maps. A cell's leader (the class with the best min4) also prunes every class it
// beats tap by tap (a convex combination with the same weights keeps the order): on flat scores
// (random logits, K=150) that keeps 8 classes per cell instead of 14, and sparse_cells evaluates
// them 8 output columns at a time. Random logits, 160x216 -> 640x853 + 512x683, AVX2 EPYC
// under load: 104 ms -> 33 ms for both maps (82 ms -> 33 ms on one thread). Tiles where a quarter
// of the cells keep more than 32 classes take the dense sweep; cells with a non-finite tap are
// never pruned (NaN wins in torch.argmax).
//
// Portability: the avx2+fma clones and the contraction argument are x86 (GCC/Clang) specific.
// Elsewhere everything runs in one build, where a compiler that contracts by default (GCC on
// aarch64) may fuse the plain variant; the calibration and the bilinear_resize tests would show it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "bilinear.h"

namespace maskformer_semantic {

using namespace maskformer_bilinear;

// With at most 16 classes the dense sweep is already cheap: no pruning.
constexpr int64_t kDenseBelowK = 16;

// ---------------------------------------------------------------------------------------------
// Two phases per image.
//   A. Candidates (parallel over bands of source cell rows): for every source cell (r, c) - taps
//      rows (r, min(r+1, h-1)) x cols (c, min(c+1, w-1)) - the classes that can still win there.
//      Loops run class-major, streaming each class plane (a band-per-row-pair order read K x 2
//      short strided rows per group and spent half its time waiting on those loads).
//   B. Labels (parallel over bands of output rows): rows sharing one source row pair form a group;
//      per group and column tile, pixels are labelled from their cell's candidates (sparse) or,
//      when a tile has too many dense cells, by the dense sweep over all K classes.
// ---------------------------------------------------------------------------------------------
struct Plan {
  const float* x;  // (K, h, w) fp32, x[k][r][c] at x + k * sk + r * sh + c
  int64_t sk, sh;  // plane and row strides (elements)
  int64_t K, h, w, H, W;
  const Axis* rows;
  const Axis* cols;
  int64_t cl_vec;  // 0: generic rounding; > 0: channels-last rounding with this SIMD width
  int64_t TW;      // column tile of the dense path
  int64_t n_ct;    // number of column tiles
  bool prune;      // phase A ran: cand_n / cand are valid
  int64_t list_max;  // longest candidate list kept; a cell with more is dense (cand_n = -1)
  int32_t* cand_n;   // (h, w) candidates per cell, -1 = all classes
  int32_t* cand;     // (h, w, list_max) ascending classes
};

// Rows labelled per pass; bounds the int32 staging to kRowChunk x W (a 1x1 mask upscaled to 4000
// rows is one group).
constexpr int64_t kRowChunk = 16;

struct Scratch {
  std::vector<float> slots;     // dense generic: per column tile 2 cached source rows, K x TW each
  std::vector<int64_t> tags;    // per column tile: the source rows its 2 slots hold
  std::vector<float> best;      // TW
  std::vector<int32_t> labels;  // kRowChunk x W staging
  std::vector<float> rowt;      // sparse_cells: 2 x 8 horizontally interpolated values per class
};

// Phase A for source cell rows [rb, re): lower bound per cell, then candidate bitsets, then lists.
//
// Most classes are absent from any given band (ADE20k: ~12 of 150 in an image), so classes are
// visited by decreasing band-wide upper bound U_k = max v + max |v| * rel + abs: once U_k of the
// next class is below every cell's lower bound, no remaining class can raise a lower bound or be a
// candidate anywhere in the band, and both passes stop (realistic logits: after ~13 classes, 11x
// less work). A band holding a non-finite score takes the full path, with per-cell flags.
struct ClassBound {
  float upper;
  int32_t k;
};

template <bool FMA>
MF_INLINE void candidates_rows(const Plan& p, int64_t rb, int64_t re, float* lower, float* lead, int32_t* bad,
                               uint32_t* bits, ClassBound* order) {
  const int64_t w = p.w, nrow = re - rb, ncell = nrow * w;
  const int64_t nwords = (p.K + 31) / 32;
  const int64_t nvec = w - 1;  // cells whose right tap is c+1; c = w-1 taps (c, c)
  const int64_t last_row = std::min(re, p.h - 1);  // cell rows read source rows rb .. re (clamped)
  for (int64_t i = 0; i < ncell; ++i) {
    lower[i] = -std::numeric_limits<float>::infinity();
    bad[i] = 0;
  }
  // The leader's 4 taps per cell, each lowered by its margin: planes (a, b, d, e) of ncell floats.
  float* la = lead;
  float* lb = lead + ncell;
  float* ld = lead + 2 * ncell;
  float* le = lead + 3 * ncell;
  std::fill(lead, lead + 4 * ncell, -std::numeric_limits<float>::infinity());
  std::fill(bits, bits + nwords * ncell, 0u);

  // Band-wide bounds per class: max v, max |v|, and whether a value is not finite (v * 0 is NaN
  // exactly for inf and NaN). Rows contiguous within the plane (sh == w): one stream.
  bool band_finite = true;
  const bool one_run = p.sh == w;
  const int64_t runs = one_run ? 1 : last_row - rb + 1, run_len = one_run ? (last_row - rb + 1) * w : w;
  for (int64_t k = 0; k < p.K; ++k) {
    BandStats st;
    for (int64_t t = 0; t < runs; ++t) st.add(p.x + k * p.sk + (rb + t) * p.sh, run_len);
    float mx, mag;
    band_finite &= st.finish(&mx, &mag);
    order[k].upper = mx + mag * kPruneRel + kPruneAbs;
    order[k].k = static_cast<int32_t>(k);
  }
  int64_t n_active = p.K;
  if (band_finite) {
    std::sort(order, order + p.K, [](const ClassBound& a, const ClassBound& b) {
      return a.upper > b.upper || (a.upper == b.upper && a.k < b.k);
    });
  }

  // Pass 1: the best guaranteed value per cell, max_k lower(min4_k), classes by decreasing bound.
  float band_lower_min = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < p.K; ++t) {
    if (band_finite && t > 0 && order[t].upper < band_lower_min) {
      n_active = t;  // classes order[t..] are below every cell's lower bound
      break;
    }
    const int64_t k = order[t].k;
    for (int64_t r = rb; r < re; ++r) {
      const float* x0 = p.x + k * p.sk + r * p.sh;
      const float* x1 = p.x + k * p.sk + std::min(r + 1, p.h - 1) * p.sh;
      const int64_t o = (r - rb) * w;
      float* lo_r = lower + o;
      float* la_r = la + o;
      float* lb_r = lb + o;
      float* ld_r = ld + o;
      float* le_r = le + o;
      int32_t* bad_r = bad + o;
      // Cells c < w - 1 in a plain loop (vectorised), then the last one with taps (c, c).
      const auto cell = [&](int64_t c, float a, float b, float d, float e) MF_INLINE_LAMBDA {
        const float mn = std::min(std::min(a, b), std::min(d, e));
        const float mx = std::max(std::max(a, b), std::max(d, e));
        const float m = std::max(mx, -mn) * kPruneRel + kPruneAbs;  // max |tap| = max(mx, -mn)
        const float lo = mn - m;
        const bool lead_k = lo > lo_r[c];  // ties keep the earlier leader; NaN never leads
        lo_r[c] = lead_k ? lo : lo_r[c];
        la_r[c] = lead_k ? a - m : la_r[c];
        lb_r[c] = lead_k ? b - m : lb_r[c];
        ld_r[c] = lead_k ? d - m : ld_r[c];
        le_r[c] = lead_k ? e - m : le_r[c];
        if (!band_finite) bad_r[c] |= nonfinite(a + b + d + e);  // inf/NaN taps (or an overflow: no pruning)
      };
      for (int64_t c = 0; c < nvec; ++c) cell(c, x0[c], x0[c + 1], x1[c], x1[c + 1]);
      cell(w - 1, x0[w - 1], x0[w - 1], x1[w - 1], x1[w - 1]);
    }
    if (band_finite && t + 1 < p.K && order[t + 1].upper < order[t].upper) {
      // Lower bounds only grow: their minimum now decides whether the next classes matter.
      v8sf vmin = splat8(std::numeric_limits<float>::infinity());
      int64_t i = 0;
      for (; i + 8 <= ncell; i += 8) vmin = min8(vmin, load8(lower + i));
      float lmin = hmin8(vmin);
      for (; i < ncell; ++i) lmin = lower[i] < lmin ? lower[i] : lmin;
      band_lower_min = lmin;
    }
  }
  // Pass 2: keep class k unless upper(max4_k) < lower (the bound above) or the cell's leader
  // dominates it tap by tap, a_k + m_k < a_lead - m_lead for all 4 taps (a bilinear value is a
  // convex combination of the taps with the same weights for both classes, so k is then below the
  // leader at every pixel of the cell, by more than both rounding errors). On flat scores (random
  // logits) the bound alone keeps 14 classes per cell on average (K=150, 160x216), the leader test
  // 8. One bit per class, cells contiguous.
  for (int64_t t = 0; t < n_active; ++t) {
    const int64_t k = order[t].k;
    const int sh = static_cast<int>(k & 31);
    for (int64_t r = rb; r < re; ++r) {
      const float* x0 = p.x + k * p.sk + r * p.sh;
      const float* x1 = p.x + k * p.sk + std::min(r + 1, p.h - 1) * p.sh;
      const int64_t o = (r - rb) * w;
      const float* lo_r = lower + o;
      const float* la_r = la + o;
      const float* lb_r = lb + o;
      const float* ld_r = ld + o;
      const float* le_r = le + o;
      uint32_t* bw = bits + (k >> 5) * ncell + o;
      const auto cell = [&](int64_t c, float a, float b, float d, float e) MF_INLINE_LAMBDA {
        const float mx = std::max(std::max(a, b), std::max(d, e));
        const float mn = std::min(std::min(a, b), std::min(d, e));
        const float m = std::max(mx, -mn) * kPruneRel + kPruneAbs;
        const bool below = (mx + m) < lo_r[c];
        const bool dominated = ((a + m) < la_r[c]) & ((b + m) < lb_r[c]) & ((d + m) < ld_r[c]) & ((e + m) < le_r[c]);
        bw[c] |= static_cast<uint32_t>(!(below | dominated)) << sh;
      };
      for (int64_t c = 0; c < nvec; ++c) cell(c, x0[c], x0[c + 1], x1[c], x1[c + 1]);
      cell(w - 1, x0[w - 1], x0[w - 1], x1[w - 1], x1[w - 1]);
    }
  }
  // Lists, ascending class (the first maximum wins); too long or non-finite -> dense cell.
  for (int64_t i = 0; i < ncell; ++i) {
    const int64_t cell = rb * w + i;
    int32_t* list = p.cand + cell * p.list_max;
    int64_t n = 0;
    bool overflow = bad[i] != 0;
    for (int64_t wd = 0; wd < nwords && !overflow; ++wd) {
      uint32_t m = bits[wd * ncell + i];
      while (m) {
        if (n == p.list_max) {
          overflow = true;
          break;
        }
        list[n++] = static_cast<int32_t>(wd * 32 + __builtin_ctz(m));
        m &= m - 1;
      }
    }
    p.cand_n[cell] = overflow ? -1 : static_cast<int32_t>(n);
  }
}

template <bool FMA>
MF_INLINE void horizontal_row(const Plan& p, int64_t r, int64_t ow_b, int64_t tw, float* dst) {
  const int32_t* iw0 = p.cols->i0.data() + ow_b;
  const int32_t* iw1 = p.cols->i1.data() + ow_b;
  const float* lw0 = p.cols->l0.data() + ow_b;
  const float* lw1 = p.cols->l1.data() + ow_b;
  for (int64_t k = 0; k < p.K; ++k) {
    const float* row = p.x + k * p.sk + r * p.sh;
    float* d = dst + k * p.TW;
    for (int64_t j = 0; j < tw; ++j) d[j] = lerp2<FMA>(row[iw0[j]], lw0[j], row[iw1[j]], lw1[j]);
  }
}

// Dense sweep over all K classes, generic rounding, output rows [oh_b, oh_e) of one source row
// pair, columns of tile `ct`. The tile's two slots cache horizontally-interpolated source rows;
// moving down, the previous group's r1 is this group's r0.
template <bool FMA>
MF_INLINE void dense_generic(const Plan& p, Scratch& s, int64_t ct, int64_t oh_b, int64_t oh_e, int32_t* labels) {
  const int64_t ow_b = ct * p.TW, tw = std::min(p.TW, p.W - ow_b);
  const int64_t r0 = p.rows->i0[oh_b], r1 = p.rows->i1[oh_b];
  const float* A;
  const float* B;
  cached_row_pair(s.slots, s.tags, p.n_ct, p.K, p.TW, ct, r0, r1,
                  [&](int64_t row, float* dst) { horizontal_row<FMA>(p, row, ow_b, tw, dst); }, &A, &B);
  float* best = s.best.data();
  for (int64_t oh = oh_b; oh < oh_e; ++oh) {
    const float lh0 = p.rows->l0[oh], lh1 = p.rows->l1[oh];
    int32_t* idx = labels + (oh - oh_b) * p.W + ow_b;
    for (int64_t j = 0; j < tw; ++j) {
      best[j] = lerp2<FMA>(A[j], lh0, B[j], lh1);
      idx[j] = 0;
    }
    for (int64_t k = 1; k < p.K; ++k) {
      const float* Ak = A + k * p.TW;
      const float* Bk = B + k * p.TW;
      const int32_t kk = static_cast<int32_t>(k);
      for (int64_t j = 0; j < tw; ++j) {
        const float v = lerp2<FMA>(Ak[j], lh0, Bk[j], lh1);
        const bool take = takes_over(v, best[j]);
        best[j] = take ? v : best[j];
        idx[j] = take ? kk : idx[j];
      }
    }
  }
}

// Dense sweep, channels-last rounding (small outputs and 1x1 masks only): four taps per pixel.
template <bool FMA>
MF_INLINE void dense_channels_last(const Plan& p, Scratch& s, int64_t ct, int64_t oh_b, int64_t oh_e,
                                   int32_t* labels) {
  const int64_t ow_b = ct * p.TW, tw = std::min(p.TW, p.W - ow_b);
  const int64_t full = p.K - p.K % p.cl_vec;  // classes inside full SIMD registers
  const int32_t* iw0 = p.cols->i0.data() + ow_b;
  const int32_t* iw1 = p.cols->i1.data() + ow_b;
  const float* lw0 = p.cols->l0.data() + ow_b;
  const float* lw1 = p.cols->l1.data() + ow_b;
  float* best = s.best.data();
  for (int64_t oh = oh_b; oh < oh_e; ++oh) {
    const int64_t r0 = p.rows->i0[oh], r1 = p.rows->i1[oh];
    const float lh0 = p.rows->l0[oh], lh1 = p.rows->l1[oh];
    int32_t* idx = labels + (oh - oh_b) * p.W + ow_b;
    for (int64_t k = 0; k < p.K; ++k) {
      const float* x0 = p.x + k * p.sk + r0 * p.sh;
      const float* x1 = p.x + k * p.sk + r1 * p.sh;
      const int32_t kk = static_cast<int32_t>(k);
      const bool lane = k < full;
      for (int64_t j = 0; j < tw; ++j) {
        const float v = channels_last_value<FMA>(x0[iw0[j]], x0[iw1[j]], x1[iw0[j]], x1[iw1[j]], lh0 * lw0[j],
                                                 lh0 * lw1[j], lh1 * lw0[j], lh1 * lw1[j], lane);
        const bool take = (k == 0) || takes_over(v, best[j]);
        best[j] = take ? v : best[j];
        idx[j] = take ? kk : idx[j];
      }
    }
  }
}

// Label output rows [oh_b, oh_e) (one source row pair), columns [ow_b, ow_e), from the candidates
// of each pixel's cell; a dense cell (-1) evaluates every class.
template <bool FMA>
MF_INLINE void sparse_tile(const Plan& p, int64_t oh_b, int64_t oh_e, int64_t ow_b, int64_t ow_e, int32_t* labels) {
  const int64_t full = p.cl_vec > 0 ? p.K - p.K % p.cl_vec : 0;
  const int64_t sk = p.sk;
  const int64_t r0 = p.rows->i0[oh_b], r1 = p.rows->i1[oh_b];
  const float* x0 = p.x + r0 * p.sh;
  const float* x1 = p.x + r1 * p.sh;
  const int32_t* cand_n = p.cand_n + r0 * p.w;
  const int32_t* cand = p.cand + r0 * p.w * p.list_max;
  for (int64_t oh = oh_b; oh < oh_e; ++oh) {
    const float lh0 = p.rows->l0[oh], lh1 = p.rows->l1[oh];
    int32_t* idx = labels + (oh - oh_b) * p.W;
    for (int64_t ow = ow_b; ow < ow_e; ++ow) {
      const int32_t a0 = p.cols->i0[ow], a1 = p.cols->i1[ow];
      const float lw0 = p.cols->l0[ow], lw1 = p.cols->l1[ow];
      const int32_t* c = cand + a0 * p.list_max;
      const int64_t nc = cand_n[a0];
      if (nc == 1) {  // the only class that can win in this cell (most cells off region boundaries)
        idx[ow] = c[0];
        continue;
      }
      const int64_t n = nc < 0 ? p.K : nc;
      float best = 0.f;
      int32_t bi = 0;
      for (int64_t t = 0; t < n; ++t) {
        const int32_t k = nc < 0 ? static_cast<int32_t>(t) : c[t];
        const float* y0 = x0 + k * sk;
        const float* y1 = x1 + k * sk;
        const float v = p.cl_vec > 0 ? channels_last_value<FMA>(y0[a0], y0[a1], y1[a0], y1[a1], lh0 * lw0,
                                                                 lh0 * lw1, lh1 * lw0, lh1 * lw1, k < full)
                                     : generic_value<FMA>(y0, y1, a0, a1, lw0, lw1, lh0, lh1);
        if (t == 0 || takes_over(v, best)) {
          best = v;
          bi = k;
        }
      }
      idx[ow] = bi;
    }
  }
}

// 8 lanes of fma: the avx2+fma build compiles the element loop to one vfmadd (no libm call).
template <bool FMA>
MF_INLINE v8sf fma8(v8sf a, v8sf b, v8sf c) {
  if constexpr (FMA) {
    v8sf r;
    for (int i = 0; i < 8; ++i) r[i] = std::fma(a[i], b[i], c[i]);
    return r;
  } else {
    return a * b + c;
  }
}

// sparse_tile for the generic rounding, vectorised over the output columns of one source cell:
// in a cell all pixels share the 4 taps of every class, so class k's horizontal values
// t_r = x_r[c]*lw0 + x_r[c+1]*lw1 (lerp2's rounding) are one vector op over the cell's columns,
// and each output row then costs one lerp2, one compare and two blends per candidate, 8 pixels
// at a time (sparse_tile: a scalar lerp2 chain of 3 per pixel and candidate, which made the
// ~8 candidates per cell of flat scores cost as much as the dense sweep). Same values, same
// ascending order and takes_over as sparse_tile and dense_generic.
template <bool FMA>
MF_INLINE void sparse_cells(const Plan& p, Scratch& s, int64_t oh_b, int64_t oh_e, int64_t ow_b, int64_t ow_e,
                            int32_t* labels) {
  const int64_t sk = p.sk;
  const int64_t r0 = p.rows->i0[oh_b], r1 = p.rows->i1[oh_b];
  const float* x0 = p.x + r0 * p.sh;
  const float* x1 = p.x + r1 * p.sh;
  const int32_t* cand_n = p.cand_n + r0 * p.w;
  const int32_t* cand = p.cand + r0 * p.w * p.list_max;
  const int32_t* i0 = p.cols->i0.data();
  if (s.rowt.empty()) s.rowt.resize(2 * 8 * p.K);
  float* T = s.rowt.data();  // per candidate t: T[16 t .. 16 t + 8) row r0, [+8, +16) row r1
  int64_t ow = ow_b;
  while (ow < ow_e) {
    const int32_t c = i0[ow];
    int64_t ce = ow + 1;  // the cell's output columns in this tile: [ow, ce)
    while (ce < ow_e && i0[ce] == c) ++ce;
    const int32_t c1 = p.cols->i1[ow];  // i1 depends on i0 only
    const int32_t* list = cand + c * p.list_max;
    const int64_t nc = cand_n[c];
    if (nc == 1) {  // the only class that can win in this cell
      for (int64_t oh = oh_b; oh < oh_e; ++oh) std::fill(labels + (oh - oh_b) * p.W + ow, labels + (oh - oh_b) * p.W + ce, list[0]);
      ow = ce;
      continue;
    }
    const int64_t n = nc <= 0 ? p.K : nc;
    for (int64_t j0 = ow; j0 < ce; j0 += 8) {
      const int64_t nj = std::min<int64_t>(8, ce - j0);
      v8sf lw0 = v8sf{}, lw1 = v8sf{};
      for (int64_t j = 0; j < nj; ++j) {
        lw0[j] = p.cols->l0[j0 + j];
        lw1[j] = p.cols->l1[j0 + j];
      }
      for (int64_t t = 0; t < n; ++t) {
        const int64_t k = nc <= 0 ? t : list[t];
        const float* y0 = x0 + k * sk;
        const float* y1 = x1 + k * sk;
        // lerp2<FMA>(a, lw0, b, lw1) = fma(a, lw0, b * lw1), per lane
        const v8sf t0 = fma8<FMA>(splat8(y0[c]), lw0, splat8(y0[c1]) * lw1);
        const v8sf t1 = fma8<FMA>(splat8(y1[c]), lw0, splat8(y1[c1]) * lw1);
        std::memcpy(T + 16 * t, &t0, sizeof(v8sf));
        std::memcpy(T + 16 * t + 8, &t1, sizeof(v8sf));
      }
      for (int64_t oh = oh_b; oh < oh_e; ++oh) {
        const v8sf lh0 = splat8(p.rows->l0[oh]), lh1 = splat8(p.rows->l1[oh]);
        v8sf best = fma8<FMA>(load8(T), lh0, load8(T + 8) * lh1);
        v8si idx = v8si{} + static_cast<int32_t>(nc <= 0 ? 0 : list[0]);
        for (int64_t t = 1; t < n; ++t) {
          const v8sf v = fma8<FMA>(load8(T + 16 * t), lh0, load8(T + 16 * t + 8) * lh1);
          const v8si take = (v > best) | ((v != v) & (best == best));  // takes_over
          best = take ? v : best;
          idx = take ? (v8si{} + static_cast<int32_t>(nc <= 0 ? t : list[t])) : idx;
        }
        int32_t* dst = labels + (oh - oh_b) * p.W + j0;
        for (int64_t j = 0; j < nj; ++j) dst[j] = idx[j];
      }
    }
    ow = ce;
  }
}

template <typename out_t>
static void store_rows(const int32_t* src, out_t* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<out_t>(src[j]);
}

// Staged int32 labels -> out (any supported integer dtype), `n` contiguous elements from `at`.
static void store_labels(const int32_t* src, void* out, at::ScalarType st, int64_t at, int64_t n) {
  switch (st) {
    case at::kLong: store_rows(src, static_cast<int64_t*>(out) + at, n); break;
    case at::kInt: store_rows(src, static_cast<int32_t*>(out) + at, n); break;
    case at::kShort: store_rows(src, static_cast<int16_t*>(out) + at, n); break;
    case at::kByte: store_rows(src, static_cast<uint8_t*>(out) + at, n); break;
    default: break;  // rejected by check_out
  }
}

template <bool FMA>
MF_INLINE void label_band(const Plan& p, Scratch& s, int64_t oh_b, int64_t oh_e, void* out, at::ScalarType ost) {
  int64_t g_b = oh_b;
  while (g_b < oh_e) {
    const int64_t r0 = p.rows->i0[g_b], r1 = p.rows->i1[g_b];
    int64_t g_e = g_b + 1;
    while (g_e < oh_e && g_e - g_b < kRowChunk && p.rows->i0[g_e] == r0 && p.rows->i1[g_e] == r1) ++g_e;
    int32_t* labels = s.labels.data();
    for (int64_t ct = 0; ct < p.n_ct; ++ct) {
      const int64_t ow_b = ct * p.TW, ow_e = std::min(p.W, ow_b + p.TW);
      bool dense = !p.prune;
      if (p.prune) {
        // Dense when a quarter of the tile's cells are dense: the vector sweep over K classes
        // then beats K scalar evaluations per pixel of those cells.
        const int64_t c_lo = p.cols->i0[ow_b], c_hi = p.cols->i0[ow_e - 1];
        const int32_t* n = p.cand_n + r0 * p.w;
        int64_t n_dense = 0;
        for (int64_t c = c_lo; c <= c_hi; ++c) n_dense += n[c] < 0;
        dense = 4 * n_dense > (c_hi - c_lo + 1);
      }
      if (!dense && p.cl_vec == 0) {
        sparse_cells<FMA>(p, s, g_b, g_e, ow_b, ow_e, labels);
      } else if (!dense) {
        sparse_tile<FMA>(p, g_b, g_e, ow_b, ow_e, labels);
      } else if (p.cl_vec > 0) {
        dense_channels_last<FMA>(p, s, ct, g_b, g_e, labels);
      } else {
        dense_generic<FMA>(p, s, ct, g_b, g_e, labels);
      }
    }
    store_labels(labels, out, ost, g_b * p.W, (g_e - g_b) * p.W);
    g_b = g_e;
  }
}

// Entry points per phase and ISA. fma rounding runs in the avx2+fma build when the CPU has it
// (else std::fma is a correct but slow libm call); plain rounding always runs in the baseline
// build: with no fma instruction the compiler cannot contract it, which is exactly what torch's
// DEFAULT-capability build computes.
static void candidates_base(const Plan& p, int64_t rb, int64_t re, float* lo, float* lead, int32_t* bad,
                            uint32_t* bits, ClassBound* order) {
  candidates_rows<false>(p, rb, re, lo, lead, bad, bits, order);  // no rounding inside: FMA is irrelevant
}
static void label_base(const Plan& p, Scratch& s, int64_t a, int64_t b, void* o, at::ScalarType st, bool fma) {
  if (fma) label_band<true>(p, s, a, b, o, st); else label_band<false>(p, s, a, b, o, st);
}
#if MF_X86_DISPATCH
MF_TARGET_AVX2 static void candidates_avx2(const Plan& p, int64_t rb, int64_t re, float* lo, float* lead,
                                           int32_t* bad, uint32_t* bits, ClassBound* order) {
  candidates_rows<true>(p, rb, re, lo, lead, bad, bits, order);
}
MF_TARGET_AVX2 static void label_avx2(const Plan& p, Scratch& s, int64_t a, int64_t b, void* o, at::ScalarType st) {
  label_band<true>(p, s, a, b, o, st);
}
#endif

static void candidates_any(const Plan& p, int64_t rb, int64_t re, float* lo, float* lead, int32_t* bad,
                           uint32_t* bits, ClassBound* order) {
#if MF_X86_DISPATCH
  if (cpu_has_avx2_fma()) {
    candidates_avx2(p, rb, re, lo, lead, bad, bits, order);
    return;
  }
#endif
  candidates_base(p, rb, re, lo, lead, bad, bits, order);
}

static void label_any(const Plan& p, Scratch& s, int64_t a, int64_t b, void* o, at::ScalarType st, bool fma) {
#if MF_X86_DISPATCH
  if (fma && cpu_has_avx2_fma()) {
    label_avx2(p, s, a, b, o, st);
    return;
  }
#endif
  label_base(p, s, a, b, o, st, fma);
}

static void check_out(const at::Tensor& out, int64_t K) {
  TORCH_CHECK(out.dim() == 2, "out must be (H, W), got ", out.sizes());
  TORCH_CHECK(out.is_contiguous(), "out must be contiguous");
  TORCH_CHECK(out.device().is_cpu(), "out must be a CPU tensor");
  const auto st = out.scalar_type();
  TORCH_CHECK(st == at::kLong || st == at::kInt || st == at::kShort || st == at::kByte,
              "out dtype must be int64, int32, int16 or uint8, got ", st);
  TORCH_CHECK(!(st == at::kByte && K - 1 > 255) && !(st == at::kShort && K - 1 > 32767), "out dtype ", st,
              " cannot hold class index ", K - 1);
}

static at::Tensor as_float_scores(const at::Tensor& scores) {
  TORCH_CHECK(scores.dim() == 3, "scores must be (K, h, w), got ", scores.sizes());
  TORCH_CHECK(scores.device().is_cpu(), "scores must be a CPU tensor");
  const auto st = scores.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "scores dtype must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(scores.size(0) >= 1 && scores.size(1) >= 1 && scores.size(2) >= 1, "empty scores ", scores.sizes());
  TORCH_CHECK(scores.numel() < (int64_t(1) << 31), "scores too large for int32 indexing");
  // fp32 with unit column stride: read in place through the plane and row strides (a crop of
  // padded logits is a strided view). Anything else: one O(K*h*w) contiguous fp32 copy (the
  // reference interpolates the fp32 upcast too).
  if (st == at::kFloat && scores.stride(2) == 1) return scores;
  return scores.to(at::kFloat).contiguous();
}

// The source step of one axis for make_axis: negative = none given (float(in) / float(out)).
static float axis_scale(double scale, const char* name) {
  TORCH_CHECK(!std::isnan(scale), name, " must not be NaN");
  return scale < 0 ? -1.f : static_cast<float>(scale);
}

// Column tile of the dense path: two cached rows (2 x K x TW floats) should stay in L2 (~256 KiB):
// 32768 / K columns, e.g. 208 at K=150.
static int64_t column_tile(int64_t K, int64_t W) {
  int64_t tw = std::max<int64_t>(16, std::min<int64_t>(512, 32768 / std::max<int64_t>(K, 1)));
  tw = (tw / 16) * 16;
  return std::min(tw, W);
}

at::Tensor& upsample_argmax_out(const at::Tensor& scores_in, at::Tensor& out, bool resize, bool use_fma,
                                int64_t channels_last_vec, double scale_h, double scale_w) {
  const at::Tensor x = as_float_scores(scores_in);
  const int64_t K = x.size(0), h = x.size(1), w = x.size(2);
  const int64_t sk = x.stride(0), sh = x.stride(1);
  const float step_h = axis_scale(scale_h, "scale_h"), step_w = axis_scale(scale_w, "scale_w");
  check_out(out, K);
  const int64_t H = out.size(0), W = out.size(1);
  TORCH_CHECK(resize || (H == h && W == w), "without resize, out must be (h, w) = (", h, ", ", w, "), got ",
              out.sizes());
  TORCH_CHECK(channels_last_vec >= 0, "channels_last_vec must be >= 0, got ", channels_last_vec);
  TORCH_CHECK(H < (int64_t(1) << 31) && W < (int64_t(1) << 31), "target too large");
  if (H == 0 || W == 0) return out;
  const float* xp = x.data_ptr<float>();
  void* op = out.data_ptr();
  const auto ost = out.scalar_type();

  if (!resize) {
    // transformers' target_sizes=None branch: a plain argmax over classes, in chunks of one run
    // of contiguous pixels (the whole plane when its rows are contiguous, else one row).
    const bool one_run = sh == w;
    const int64_t runs = one_run ? 1 : h, run_len = one_run ? h * w : w;
    const int64_t chunk = 1024;
    const int64_t per_run = (run_len + chunk - 1) / chunk;
    at::parallel_for(0, runs * per_run, 1, [&](int64_t b, int64_t e) {
      std::vector<float> best(chunk);
      std::vector<int32_t> idx(chunk);
      for (int64_t c = b; c < e; ++c) {
        const int64_t run = c / per_run, r0 = (c % per_run) * chunk, n = std::min(chunk, run_len - r0);
        const float* x0 = xp + run * sh + r0;
        const int64_t p0 = run * w + r0;  // first output pixel
        std::memcpy(best.data(), x0, n * sizeof(float));
        std::fill(idx.begin(), idx.begin() + n, 0);
        for (int64_t k = 1; k < K; ++k) {
          const float* xk = x0 + k * sk;
          const int32_t kk = static_cast<int32_t>(k);
          for (int64_t j = 0; j < n; ++j) {
            const bool take = takes_over(xk[j], best[j]);
            best[j] = take ? xk[j] : best[j];
            idx[j] = take ? kk : idx[j];
          }
        }
        store_labels(idx.data(), op, ost, p0, n);
      }
    });
    return out;
  }

  const Axis rows = make_axis(h, H, use_fma, step_h);
  const Axis cols = make_axis(w, W, use_fma, step_w);
  Plan plan;
  plan.x = xp;
  plan.sk = sk;
  plan.sh = sh;
  plan.K = K; plan.h = h; plan.w = w; plan.H = H; plan.W = W;
  plan.rows = &rows; plan.cols = &cols;
  plan.cl_vec = channels_last_vec;
  plan.TW = column_tile(K, W);
  plan.n_ct = (W + plan.TW - 1) / plan.TW;
  // Phase A costs ~2 reads of the K*h*w scores; it pays when there are many classes and at least
  // as many output pixels as source cells (not for a big downscale, where dense is K*H*W).
  plan.prune = K > kDenseBelowK && H * W >= h * w;
  // Lists up to 32 long: flat scores keep ~8 classes per cell (up to ~35 at K=150), and a longer
  // list is labelled as a dense cell, all K classes.
  plan.list_max = std::min<int64_t>(K, 32);
  const int64_t threads = at::get_num_threads();
  std::vector<int32_t> cand_n, cand;
  if (plan.prune) {
    cand_n.resize(h * w);
    cand.resize(h * w * plan.list_max);
    plan.cand_n = cand_n.data();
    plan.cand = cand.data();
    // ~8 bands per thread, handed out dynamically (parallel_tasks).
    const int64_t rband = std::max<int64_t>(2, (h + 8 * threads - 1) / (8 * threads));
    struct BandScratch {
      std::vector<float> lower, lead;
      std::vector<int32_t> bad;
      std::vector<uint32_t> bits;
      std::vector<ClassBound> order;
    };
    parallel_tasks(
        (h + rband - 1) / rband,
        [&] {
          const int64_t nwords = (K + 31) / 32;
          return BandScratch{std::vector<float>(rband * w), std::vector<float>(4 * rband * w),
                             std::vector<int32_t>(rband * w), std::vector<uint32_t>(nwords * rband * w),
                             std::vector<ClassBound>(K)};
        },
        [&](BandScratch& b, int64_t t) {
          candidates_any(plan, t * rband, std::min(h, (t + 1) * rband), b.lower.data(), b.lead.data(), b.bad.data(),
                         b.bits.data(), b.order.data());
        });
  }
  // Full-width output row bands, ~16 per thread, handed out dynamically; a band boundary costs at
  // most the two source rows the dense path re-interpolates.
  const int64_t band = std::max<int64_t>(4, (H + 16 * threads - 1) / (16 * threads));
  const int64_t n_rb = (H + band - 1) / band;
  parallel_tasks(
      n_rb,
      [&] {
        Scratch s;
        s.best.resize(plan.TW);
        s.labels.resize(kRowChunk * W);
        return s;
      },
      [&](Scratch& s, int64_t t) { label_any(plan, s, t * band, std::min(H, (t + 1) * band), op, ost, use_fma); });
  return out;
}

// Test hook: the per-pixel values upsample_argmax_out compares, materialised (C, H, W).
template <bool FMA>
static void resize_values(const float* x, int64_t C, int64_t sc, int64_t sh, const Axis& rows, const Axis& cols,
                          float* y, int64_t H, int64_t W, int64_t vec) {
  const int64_t full = (vec > 0) ? C - C % vec : 0;
  at::parallel_for(0, C, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      for (int64_t oh = 0; oh < H; ++oh) {
        const float* x0 = x + c * sc + rows.i0[oh] * sh;
        const float* x1 = x + c * sc + rows.i1[oh] * sh;
        const float lh0 = rows.l0[oh], lh1 = rows.l1[oh];
        for (int64_t ow = 0; ow < W; ++ow) {
          const int32_t a0 = cols.i0[ow], a1 = cols.i1[ow];
          const float lw0 = cols.l0[ow], lw1 = cols.l1[ow];
          y[(c * H + oh) * W + ow] =
              vec > 0 ? channels_last_value<FMA>(x0[a0], x0[a1], x1[a0], x1[a1], lh0 * lw0, lh0 * lw1, lh1 * lw0,
                                                 lh1 * lw1, c < full)
                      : generic_value<FMA>(x0, x1, a0, a1, lw0, lw1, lh0, lh1);
        }
      }
    }
  });
}

at::Tensor bilinear_resize(const at::Tensor& x_in, int64_t H, int64_t W, bool use_fma, int64_t channels_last_vec,
                           double scale_h, double scale_w) {
  const at::Tensor x = as_float_scores(x_in);
  TORCH_CHECK(H >= 1 && W >= 1, "target size must be positive, got ", H, "x", W);
  TORCH_CHECK(channels_last_vec >= 0, "channels_last_vec must be >= 0");
  const int64_t C = x.size(0), h = x.size(1), w = x.size(2), sc = x.stride(0), sh = x.stride(1);
  at::Tensor y = at::empty({C, H, W}, x.options().memory_format(at::MemoryFormat::Contiguous));
  const Axis rows = make_axis(h, H, use_fma, axis_scale(scale_h, "scale_h"));
  const Axis cols = make_axis(w, W, use_fma, axis_scale(scale_w, "scale_w"));
  // Baseline build on purpose: a test hook, and there the plain variant must not be contracted.
  if (use_fma) {
    resize_values<true>(x.data_ptr<float>(), C, sc, sh, rows, cols, y.data_ptr<float>(), H, W, channels_last_vec);
  } else {
    resize_values<false>(x.data_ptr<float>(), C, sc, sh, rows, cols, y.data_ptr<float>(), H, W, channels_last_vec);
  }
  return y;
}

// ---------------------------------------------------------------------------------------------
// mask_einsum: scores[b,k,p] = sum_q softmax(class_logits[b,q,:])[k] * sigmoid(mask_logits[b,q,p])
// ---------------------------------------------------------------------------------------------

// sigmoid without libm, so it vectorises: Cody-Waite reduction + Cephes expf polynomial, <= 3 ulp
// for |x| <= 80 (measured against double). |x| is clamped to 87 with integer ops (a float clamp
// before the division stops GCC's if-conversion under -ftrapping-math): sigmoid(-87) = 1.6e-38,
// so the clamp moves a score by < 2e-38. NaN stays NaN, sigmoid(+-inf) = 1 / ~0.
MF_INLINE float sigmoid_fast(float x) {
  const int32_t xb = float_bits(x);
  const int32_t mag = xb & 0x7fffffff;
  const int32_t lim = 0x42ae0000;  // 87.0f
  const int32_t xc = (mag > lim && mag <= 0x7f800000) ? ((xb & static_cast<int32_t>(0x80000000u)) | lim) : xb;
  const float z = -bits_float(xc);
  // n = round(z / ln2) with the 1.5 * 2^23 trick; exact for |z| < 2^22.
  const float n = (z * 1.44269504088896341f + 12582912.f) - 12582912.f;
  float r = z - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  q = q * (r * r) + r;
  q = q + 1.0f;
  const int32_t e = (static_cast<int32_t>(n) + 127) * (1 << 23);
  return 1.0f / (1.0f + q * bits_float(e));
}

// fp16/bf16 -> fp32 with integer ops only (c10's conversions do not vectorise here).
MF_INLINE float load_float(float v) { return v; }
MF_INLINE float load_float(c10::BFloat16 v) { return bits_float(static_cast<int32_t>(v.x) << 16); }
MF_INLINE float load_float(c10::Half v) {
  // Exponent rebias through a float multiply: exact for normals and subnormals; inf/NaN fixed up.
  const int32_t hb = v.x;
  const int32_t sign = (hb & 0x8000) << 16;
  const int32_t em = (hb & 0x7fff) << 13;
  const float mag = bits_float(em) * 5.192296858534828e+33f;  // 2^112
  const int32_t special = (hb & 0x7c00) == 0x7c00;
  const int32_t bits = special ? (em | 0x7f800000) : float_bits(mag);
  return bits_float(bits | sign);
}


// out[k * out_stride + j] = sum_q probs[q * KP + k] * sig[q * PT + j] for j < n: a sigmoid tile
// (Q x PT, columns n..PT zero) swept once per block of 6 classes (GCC vector extensions, compiled
// for avx2+fma or baseline). Shared by mask_einsum and mask2former_scores.
template <bool FMA>
MF_INLINE void contract_tile(const float* __restrict sig, const float* __restrict probs, float* __restrict out,
                             int64_t Q, int64_t K, int64_t KP, int64_t out_stride, int64_t n, int64_t PT) {
  // 6 classes x 16 pixels of accumulators as named values: GCC keeps them in 12 registers, an
  // array of them it spilled (3x slower, every fma through memory).
  constexpr int64_t KB = 6;
  for (int64_t k0 = 0; k0 < K; k0 += KB) {
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
      v8sf c00{}, c01{}, c10{}, c11{}, c20{}, c21{}, c30{}, c31{}, c40{}, c41{}, c50{}, c51{};
      const float* sq = sig + j0;
      const float* pq = probs + k0;
      for (int64_t q = 0; q < Q; ++q, sq += PT, pq += KP) {
        v8sf s0, s1;
        std::memcpy(&s0, sq, sizeof(v8sf));
        std::memcpy(&s1, sq + 8, sizeof(v8sf));
        v8sf pk = v8sf{} + pq[0];
        c00 = fma8<FMA>(pk, s0, c00);
        c01 = fma8<FMA>(pk, s1, c01);
        pk = v8sf{} + pq[1];
        c10 = fma8<FMA>(pk, s0, c10);
        c11 = fma8<FMA>(pk, s1, c11);
        pk = v8sf{} + pq[2];
        c20 = fma8<FMA>(pk, s0, c20);
        c21 = fma8<FMA>(pk, s1, c21);
        pk = v8sf{} + pq[3];
        c30 = fma8<FMA>(pk, s0, c30);
        c31 = fma8<FMA>(pk, s1, c31);
        pk = v8sf{} + pq[4];
        c40 = fma8<FMA>(pk, s0, c40);
        c41 = fma8<FMA>(pk, s1, c41);
        pk = v8sf{} + pq[5];
        c50 = fma8<FMA>(pk, s0, c50);
        c51 = fma8<FMA>(pk, s1, c51);
      }
      const v8sf acc[KB][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
      const int64_t jn = std::min<int64_t>(16, n - j0);
      const int64_t kb = std::min<int64_t>(KB, K - k0);
      for (int64_t kk = 0; kk < kb; ++kk) {
        float tmp[16];
        std::memcpy(tmp, &acc[kk][0], sizeof(v8sf));
        std::memcpy(tmp + 8, &acc[kk][1], sizeof(v8sf));
        float* o = out + (k0 + kk) * out_stride + j0;
        for (int64_t jj = 0; jj < jn; ++jj) o[jj] = tmp[jj];
      }
    }
  }
}

// One task of mask_einsum: image b, pixels [p0, p0 + n). The sigmoid tile (Q x PT) is built once,
// then contracted (contract_tile).
template <bool FMA, typename T>
MF_INLINE void einsum_tile(const T* __restrict masks, const float* __restrict probs, float* __restrict out, int64_t Q,
                           int64_t K, int64_t KP, int64_t hw, int64_t p0, int64_t n, float* __restrict sig,
                           int64_t PT) {
  for (int64_t q = 0; q < Q; ++q) {
    const T* m = masks + q * hw + p0;
    float* s = sig + q * PT;
    for (int64_t j = 0; j < n; ++j) s[j] = sigmoid_fast(load_float(m[j]));
    for (int64_t j = n; j < PT; ++j) s[j] = 0.f;
  }
  contract_tile<FMA>(sig, probs, out + p0, Q, K, KP, hw, n, PT);
}

template <typename T>
static void einsum_tile_base(const T* m, const float* pr, float* o, int64_t Q, int64_t K, int64_t KP, int64_t hw,
                             int64_t p0, int64_t n, float* sig, int64_t PT) {
  // Baseline x86-64 has no fma instruction (std::fma would be a libm call per element).
  einsum_tile<false, T>(m, pr, o, Q, K, KP, hw, p0, n, sig, PT);
}
#if MF_X86_DISPATCH
template <typename T>
MF_TARGET_AVX2 static void einsum_tile_avx2(const T* m, const float* pr, float* o, int64_t Q, int64_t K, int64_t KP,
                                            int64_t hw, int64_t p0, int64_t n, float* sig, int64_t PT) {
  einsum_tile<true, T>(m, pr, o, Q, K, KP, hw, p0, n, sig, PT);
}
#endif

at::Tensor mask_einsum(const at::Tensor& class_logits, const at::Tensor& mask_logits) {
  TORCH_CHECK(class_logits.dim() == 3, "class_queries_logits must be (B, Q, K+1), got ", class_logits.sizes());
  TORCH_CHECK(mask_logits.dim() == 4, "masks_queries_logits must be (B, Q, h, w), got ", mask_logits.sizes());
  TORCH_CHECK(class_logits.device().is_cpu() && mask_logits.device().is_cpu(), "inputs must be CPU tensors");
  const int64_t B = class_logits.size(0), Q = class_logits.size(1), K = class_logits.size(2) - 1;
  TORCH_CHECK(K >= 1, "need at least one class besides the null class, got K+1 = ", class_logits.size(2));
  TORCH_CHECK(mask_logits.size(0) == B && mask_logits.size(1) == Q, "batch/query mismatch: ", class_logits.sizes(),
              " vs ", mask_logits.sizes());
  const auto st = mask_logits.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "masks_queries_logits dtype must be float32, float16 or bfloat16, got ", st);
  const auto cst = class_logits.scalar_type();
  TORCH_CHECK(cst == at::kFloat || cst == at::kHalf || cst == at::kBFloat16,
              "class_queries_logits dtype must be float32, float16 or bfloat16, got ", cst);
  const int64_t h = mask_logits.size(2), w = mask_logits.size(3), hw = h * w;
  constexpr int64_t KB = 6;
  const int64_t KP = (K + KB - 1) / KB * KB;  // classes padded to the register block, zeros

  // Class probabilities (B, Q, KP) in fp32: softmax over K+1 (max-subtracted), null class dropped.
  at::Tensor logits = class_logits.to(at::kFloat).contiguous();
  at::Tensor probs = at::zeros({B, Q, KP}, logits.options());
  {
    const float* lp = logits.data_ptr<float>();
    float* pp = probs.data_ptr<float>();
    at::parallel_for(0, B * Q, 64, [&](int64_t b, int64_t e) {
      std::vector<float> ex(K + 1);
      for (int64_t r = b; r < e; ++r) {
        const float* l = lp + r * (K + 1);
        float mx = l[0];
        for (int64_t c = 1; c <= K; ++c) mx = (l[c] > mx || l[c] != l[c]) ? l[c] : mx;
        float sum = 0.f;
        for (int64_t c = 0; c <= K; ++c) {
          ex[c] = std::exp(l[c] - mx);
          sum += ex[c];
        }
        for (int64_t c = 0; c < K; ++c) pp[r * KP + c] = ex[c] / sum;
      }
    });
  }

  at::Tensor masks = mask_logits.contiguous();
  at::Tensor out = at::empty({B, K, h, w}, logits.options());
  if (B == 0 || hw == 0) return out;
  if (Q == 0) return out.zero_();
  // 128 pixels x Q queries of sigmoid = 50 KiB at Q=100: stays in L2 while the class blocks sweep it.
  const int64_t PT = 128;
  const int64_t n_pt = (hw + PT - 1) / PT;
  const float* pp = probs.data_ptr<float>();
  float* op = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "maskformer_mask_einsum", [&] {
    const scalar_t* mp = masks.data_ptr<scalar_t>();
    at::parallel_for(0, B * n_pt, 1, [&](int64_t tb, int64_t te) {
      std::vector<float> sig(Q * PT);
      for (int64_t t = tb; t < te; ++t) {
        const int64_t b = t / n_pt, p0 = (t % n_pt) * PT, n = std::min(PT, hw - p0);
        const scalar_t* m = mp + b * Q * hw;
        const float* pr = pp + b * Q * KP;
        float* o = op + b * K * hw;
#if MF_X86_DISPATCH
        if (cpu_has_avx2_fma()) {
          einsum_tile_avx2<scalar_t>(m, pr, o, Q, K, KP, hw, p0, n, sig.data(), PT);
          continue;
        }
#endif
        einsum_tile_base<scalar_t>(m, pr, o, Q, K, KP, hw, p0, n, sig.data(), PT);
      }
    });
  });
  return out;
}


// ---------------------------------------------------------------------------------------------
// mask2former_scores: transformers' Mask2Former semantic scores on the 384x384 grid, fused.
//   scores[k, p] = sum_q probs[q, k] * sigmoid(bilinear(mask_logits[q])(p)),  p on the (H, W) grid
// The bilinear resize (align_corners=False) is aten's generic formula (generic_value's order, the
// caller's calibrated fma variant). Tasks are tiles of kM2FRows rows x 32 columns: the horizontal
// lerps of the tile's source rows once (m2f_horizontal; a 128 -> 384 resize shares each source
// row among ~3 output rows), then per output row the vertical lerps and
// sigmoid_fast for the Q queries (Q x 32 floats: 25 KiB at Q=200, in L1) and the contraction of
// mask_einsum (contract_tile): neither the (Q, H, W) resized logits nor their sigmoid ever exist
// (transformers: 2 x 118 MB at Q=200, 384x384). fp16/bf16 logits are interpolated in fp32 (the
// reference interpolates in their own dtype).
//
// Pruning (prune=true). Before contracting, a
// tile bounds every class over the tile and its 1-pixel halo: a bilinear value lies within its
// source taps and sigmoid is increasing, so with smin_q / smax_q the sigmoid of query q's least /
// largest source logit under that window, lo_k = sum_q probs[q,k] smin_q <= score_k <= hi_k =
// sum_q probs[q,k] smax_q. A class with hi_k + m_k < max_j (lo_j - m_j) (m: a rounding margin,
// kM2FMarginUlps) is below that class j at every pixel of the window, so it cannot win any
// output pixel whose taps touch the tile; its scores here are written as 0, a lower bound of
// every score (probabilities and sigmoids are >= 0, and fp rounding is monotone): a class that
// wins a pixel is never pruned at its taps, so its value there is exact, and every other class's
// interpolated value can only be lower than with its exact scores. The labels are therefore those
// of the unpruned scores; the scores themselves are not (use prune=false to get them all).
// A window holding a non-finite logit is not pruned. Measured on this 2-core EPYC (Zen 4), Q=200,
// K=150, realistic logits 128x171 -> 384x384: 33% of the (class, pixel) sums kept (50 classes per
// pixel on average: a tile across a region boundary keeps every class its bounds cannot separate),
// 73 ms vs 94 ms unpruned; 128-column tiles kept 88% (tiles a third of the image wide). Of the
// rest, ~12 ms is the resize and sigmoid (measured with K=1), the (K, H, W) output the remainder.
// ---------------------------------------------------------------------------------------------
constexpr int64_t kM2FRows = 8;
// Relative margin of the class bounds, in fp32 ulps of hi_k: the fp32 sum of Q terms (Q - 1), the
// products and sigmoid_fast (4), and a logit interpolated a few ulps beyond its source taps, which
// moves sigmoid(x) by up to |x| * 2 ulps relative (|x| <= 87 after sigmoid_fast's clamp): 174.
constexpr int64_t kM2FMarginUlps = 256;

struct M2FPlan {
  const Axis* rows;
  const Axis* cols;
  int64_t sq, sh;  // query and row strides of the mask logits (elements)
  const float* probs;  // (Q, KP) fp32, classes padded with zeros to KP
  float* out;          // (K, H, W) fp32
  int64_t Q, K, KP, H, W, PT, n_ct;
  bool prune;
};

struct M2FScratch {
  std::vector<float> sig, hor, tmp, pc, smin, smax;
  std::vector<float> lo, hi;
  std::vector<int32_t> cand;
};

// The horizontal half of aten's generic formula for the tile's source rows [sr0, sr0 + nsr):
// hor[(q * nsr + r) * PT + j] = lerp2(x[q][sr0 + r][a0[c0 + j]], lw0, x[...][a1[...]], lw1). Shared
// by the ~3 output rows per source row of a 128 -> 384 resize (4 gathers per value, the costly part).
template <bool RFMA, typename T>
MF_INLINE void m2f_horizontal(const M2FPlan& p, const T* __restrict m, int64_t sr0, int64_t nsr, int64_t c0,
                              int64_t n, float* __restrict hor) {
  const int32_t* a0 = p.cols->i0.data() + c0;
  const int32_t* a1 = p.cols->i1.data() + c0;
  const float* lw0 = p.cols->l0.data() + c0;
  const float* lw1 = p.cols->l1.data() + c0;
  for (int64_t q = 0; q < p.Q; ++q) {
    for (int64_t r = 0; r < nsr; ++r) {
      const T* x = m + q * p.sq + (sr0 + r) * p.sh;
      float* d = hor + (q * nsr + r) * p.PT;
      for (int64_t j = 0; j < n; ++j) d[j] = lerp2<RFMA>(load_float(x[a0[j]]), lw0[j], load_float(x[a1[j]]), lw1[j]);
    }
  }
}

// sig[q * PT + j] = sigmoid(bilinear(mask_logits[q])(oh, c0 + j)) for j < n, 0 up to PT: the
// vertical half of generic_value on m2f_horizontal's rows, then sigmoid_fast (both vectorised).
template <bool RFMA>
MF_INLINE void m2f_fill(const M2FPlan& p, const float* __restrict hor, int64_t sr0, int64_t nsr, int64_t oh,
                        int64_t n, float* __restrict sig) {
  const int64_t r0 = p.rows->i0[oh] - sr0, r1 = p.rows->i1[oh] - sr0;
  const float lh0 = p.rows->l0[oh], lh1 = p.rows->l1[oh];
  for (int64_t q = 0; q < p.Q; ++q) {
    const float* t0 = hor + (q * nsr + r0) * p.PT;
    const float* t1 = hor + (q * nsr + r1) * p.PT;
    float* s = sig + q * p.PT;
    for (int64_t j = 0; j < n; ++j) s[j] = sigmoid_fast(lerp2<RFMA>(t0[j], lh0, t1[j], lh1));
    for (int64_t j = n; j < p.PT; ++j) s[j] = 0.f;
  }
}

// The candidate classes of tile rows [r0, r1) x columns [c0, c0 + n) (see the header); returns
// their number (K: no pruning), the ascending list in s.cand and their probabilities, padded to a
// multiple of 6 classes, in s.pc (Q x KPc).
template <typename T>
MF_INLINE int64_t m2f_candidates(const M2FPlan& p, M2FScratch& s, const T* __restrict m, int64_t r0, int64_t r1,
                                 int64_t c0, int64_t n) {
  const Axis& rows = *p.rows;
  const Axis& cols = *p.cols;
  const int64_t ra = std::max<int64_t>(r0 - 1, 0), rb = std::min(r1, p.H - 1);
  const int64_t ca = std::max<int64_t>(c0 - 1, 0), cb = std::min(c0 + n, p.W - 1);
  const int64_t sr0 = rows.i0[ra], sr1 = rows.i1[rb], sc0 = cols.i0[ca], sc1 = cols.i1[cb];
  for (int64_t q = 0; q < p.Q; ++q) {
    float mn = std::numeric_limits<float>::infinity(), mx = -mn, probe = 0.f;
    for (int64_t r = sr0; r <= sr1; ++r) {
      const T* x = m + q * p.sq + r * p.sh;
      for (int64_t c = sc0; c <= sc1; ++c) {
        const float v = load_float(x[c]);
        mn = v < mn ? v : mn;
        mx = v > mx ? v : mx;
        probe += v * 0.f;
      }
    }
    if (probe != 0.f) return p.K;  // inf or NaN in the window: no pruning
    s.smin[q] = sigmoid_fast(mn);
    s.smax[q] = sigmoid_fast(mx);
  }
  // fp32 sums (vectorised over classes; double ones took ~20 ms of a 384x384 image at Q=200,
  // K=150): their own rounding, Q ulps of hi_k, is one more Q in the margin.
  std::fill(s.lo.begin(), s.lo.end(), 0.f);
  std::fill(s.hi.begin(), s.hi.end(), 0.f);
  float* lo = s.lo.data();
  float* hi = s.hi.data();
  for (int64_t q = 0; q < p.Q; ++q) {
    const float* pr = p.probs + q * p.KP;
    const float a = s.smin[q], b = s.smax[q];
    for (int64_t k = 0; k < p.K; ++k) {
      lo[k] += pr[k] * a;
      hi[k] += pr[k] * b;
    }
  }
  const float rel = static_cast<float>(2 * p.Q + kM2FMarginUlps) * 5.9604644775390625e-08f;  // 2^-24
  float best = -std::numeric_limits<float>::infinity();
  for (int64_t k = 0; k < p.K; ++k) best = std::max(best, lo[k] - (rel * hi[k] + 1e-30f));
  int64_t nc = 0;
  for (int64_t k = 0; k < p.K; ++k) {
    if (hi[k] + (rel * hi[k] + 1e-30f) >= best) s.cand[nc++] = static_cast<int32_t>(k);
  }
  if (nc == p.K) return nc;
  const int64_t kpc = (nc + 5) / 6 * 6;
  for (int64_t q = 0; q < p.Q; ++q) {
    float* d = s.pc.data() + q * kpc;
    const float* pr = p.probs + q * p.KP;
    for (int64_t c = 0; c < nc; ++c) d[c] = pr[s.cand[c]];
    for (int64_t c = nc; c < kpc; ++c) d[c] = 0.f;
  }
  return nc;
}

template <bool RFMA, bool FMA, typename T>
MF_INLINE void m2f_task(const M2FPlan& p, M2FScratch& s, const T* __restrict m, int64_t t) {
  const int64_t r0 = (t / p.n_ct) * kM2FRows, r1 = std::min(p.H, r0 + kM2FRows);
  const int64_t c0 = (t % p.n_ct) * p.PT, n = std::min(p.PT, p.W - c0);
  const int64_t HW = p.H * p.W;
  const int64_t nc = p.prune ? m2f_candidates<T>(p, s, m, r0, r1, c0, n) : p.K;
  const int64_t kpc = (nc + 5) / 6 * 6;
  const int64_t sr0 = p.rows->i0[r0], nsr = p.rows->i1[r1 - 1] - sr0 + 1;  // i0, i1 never decrease
  if (static_cast<int64_t>(s.hor.size()) < p.Q * nsr * p.PT) s.hor.resize(p.Q * nsr * p.PT);
  m2f_horizontal<RFMA, T>(p, m, sr0, nsr, c0, n, s.hor.data());
  for (int64_t oh = r0; oh < r1; ++oh) {
    m2f_fill<RFMA>(p, s.hor.data(), sr0, nsr, oh, n, s.sig.data());
    float* o = p.out + oh * p.W + c0;
    if (nc == p.K) {
      contract_tile<FMA>(s.sig.data(), p.probs, o, p.Q, p.K, p.KP, HW, n, p.PT);
      continue;
    }
    if (nc > 0) contract_tile<FMA>(s.sig.data(), s.pc.data(), s.tmp.data(), p.Q, nc, kpc, p.PT, n, p.PT);
    int64_t c = 0;
    for (int64_t k = 0; k < p.K; ++k) {
      float* ok = o + k * HW;
      if (c < nc && s.cand[c] == k) {
        std::memcpy(ok, s.tmp.data() + c * p.PT, n * sizeof(float));
        ++c;
      } else {
        std::memset(ok, 0, n * sizeof(float));  // pruned: 0 <= every score (see the header)
      }
    }
  }
}

template <bool RFMA, typename T>
static void m2f_task_base(const M2FPlan& p, M2FScratch& s, const T* m, int64_t t) {
  m2f_task<RFMA, false, T>(p, s, m, t);
}
#if MF_X86_DISPATCH
template <bool RFMA, typename T>
MF_TARGET_AVX2 static void m2f_task_avx2(const M2FPlan& p, M2FScratch& s, const T* m, int64_t t) {
  m2f_task<RFMA, true, T>(p, s, m, t);
}
#endif

at::Tensor mask2former_scores(const at::Tensor& class_probs, const at::Tensor& mask_logits, int64_t H, int64_t W,
                              bool use_fma, double scale_h, double scale_w, bool prune) {
  TORCH_CHECK(class_probs.dim() == 2, "class_probs must be (Q, K), got ", class_probs.sizes());
  TORCH_CHECK(mask_logits.dim() == 3, "mask_logits must be (Q, h, w), got ", mask_logits.sizes());
  TORCH_CHECK(class_probs.device().is_cpu() && mask_logits.device().is_cpu(), "inputs must be CPU tensors");
  TORCH_CHECK(class_probs.scalar_type() == at::kFloat, "class_probs must be float32, got ", class_probs.scalar_type());
  const int64_t Q = class_probs.size(0), K = class_probs.size(1);
  TORCH_CHECK(Q >= 1 && K >= 1, "need at least one query and one class, got ", class_probs.sizes());
  TORCH_CHECK(mask_logits.size(0) == Q, "class_probs ", class_probs.sizes(), " and mask_logits ", mask_logits.sizes(),
              " disagree on the queries");
  const auto st = mask_logits.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "mask_logits dtype must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(mask_logits.size(1) >= 1 && mask_logits.size(2) >= 1, "empty mask_logits ", mask_logits.sizes());
  TORCH_CHECK(H >= 1 && W >= 1, "output size must be positive, got ", H, "x", W);
  TORCH_CHECK(K * H * W < (int64_t(1) << 31), "scores too large for int32 indexing");
  // A crop (x[:, :h', :w']) is read in place through its strides; other layouts are copied.
  const at::Tensor m = mask_logits.stride(2) == 1 ? mask_logits : mask_logits.contiguous();
  const int64_t h = m.size(1), w = m.size(2);
  const Axis rows = make_axis(h, H, use_fma, axis_scale(scale_h, "scale_h"));
  const Axis cols = make_axis(w, W, use_fma, axis_scale(scale_w, "scale_w"));
  constexpr int64_t KB = 6;
  const int64_t KP = (K + KB - 1) / KB * KB;  // classes padded to contract_tile's register block
  at::Tensor probs = at::zeros({Q, KP}, class_probs.options());
  probs.narrow(1, 0, K).copy_(class_probs);
  at::Tensor out = at::empty({K, H, W}, class_probs.options());
  M2FPlan plan;
  plan.rows = &rows;
  plan.cols = &cols;
  plan.sq = m.stride(0);
  plan.sh = m.stride(1);
  plan.probs = probs.data_ptr<float>();
  plan.out = out.data_ptr<float>();
  plan.Q = Q; plan.K = K; plan.KP = KP; plan.H = H; plan.W = W;
  plan.PT = 32;  // 384 = 12 column tiles
  plan.n_ct = (W + plan.PT - 1) / plan.PT;
  plan.prune = prune && K > 1;
  const int64_t tasks = (H + kM2FRows - 1) / kM2FRows * plan.n_ct;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "maskformer_mask2former_scores", [&] {
    const scalar_t* mp = m.data_ptr<scalar_t>();
    parallel_tasks(
        tasks,
        [&] {
          M2FScratch s;
          s.sig.resize(Q * plan.PT);
          if (plan.prune) {
            s.tmp.resize(KP * plan.PT);
            s.pc.resize(Q * KP);
            s.smin.resize(Q);
            s.smax.resize(Q);
            s.lo.resize(K);
            s.hi.resize(K);
            s.cand.resize(K);
          }
          return s;
        },
        [&](M2FScratch& s, int64_t t) {
#if MF_X86_DISPATCH
          if (cpu_has_avx2_fma()) {
            (use_fma ? m2f_task_avx2<true, scalar_t> : m2f_task_avx2<false, scalar_t>)(plan, s, mp, t);
            return;
          }
#endif
          (use_fma ? m2f_task_base<true, scalar_t> : m2f_task_base<false, scalar_t>)(plan, s, mp, t);
        });
  });
  return out;
}

}  // namespace maskformer_semantic

// Ops live in the `maskformer` namespace; a fragment, so other files of the extension can add
// theirs.
TORCH_LIBRARY_FRAGMENT(maskformer, m) {
  m.def("mask_einsum(Tensor class_queries_logits, Tensor masks_queries_logits) -> Tensor");
  m.def(
      "mask2former_scores(Tensor class_probs, Tensor mask_logits, int H, int W, bool use_fma, float scale_h=-1., "
      "float scale_w=-1., bool prune=False) -> Tensor");
  m.def(
      "upsample_argmax_out(Tensor scores, Tensor(a!) out, bool resize, bool use_fma, int channels_last_vec, "
      "float scale_h=-1., float scale_w=-1.) -> Tensor(a!)");
  m.def(
      "bilinear_resize(Tensor x, int H, int W, bool use_fma, int channels_last_vec, float scale_h=-1., "
      "float scale_w=-1.) -> Tensor");
}

TORCH_LIBRARY_IMPL(maskformer, CPU, m) {
  m.impl("mask_einsum", &maskformer_semantic::mask_einsum);
  m.impl("mask2former_scores", &maskformer_semantic::mask2former_scores);
  m.impl("upsample_argmax_out", &maskformer_semantic::upsample_argmax_out);
  m.impl("bilinear_resize", &maskformer_semantic::bilinear_resize);
}
