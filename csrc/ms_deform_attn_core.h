// The torch-free core of the CPU multi-scale deformable attention (csrc/ms_deform_attn.cpp explains
// the arithmetic and the task layout): one task = queries [q0, q1) of one (image, head), fp32 in,
// fp32 out. Shared by the torch operator (ms_deform_attn.cpp, maskformer._C) and the OpenVINO
// extension (csrc/openvino/msda_extension.cpp), which must not link libtorch: the two run the same
// instructions, so an engine with the extension gives the torch path's numbers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "bilinear.h"

namespace maskformer_msda {

using maskformer_bilinear::cpu_has_avx2_fma;

constexpr int64_t kBlockQ = 64;  // queries per task: ~800 tasks at Q = 6,300 and 8 heads

struct Problem {
  const float* value;  // (B, S, H, D) contiguous fp32
  const float* loc;    // (B, Q, H, L, P, 2) contiguous fp32
  const float* attn;   // (B, Q, H, L, P) contiguous fp32
  const int64_t* shapes;  // (L, 2) h, w
  const int64_t* starts;  // (L,) first token of each level
  int64_t B, S, H, D, Q, L, P;
};

// The D-vector accumulator of one (query, head). NV > 0: D = 8 * NV floats held in NV 8-wide
// registers (GCC vector extensions: AVX2 in the avx2 clone, SSE pairs in the baseline); left to
// the compiler as a plain array, it was kept on the stack (three of four vectors at D = 32,
// store-to-load forwarded on every corner). NV = 0: any D, a plain loop over a buffer.
template <int NV>
struct Acc {
  maskformer_bilinear::v8sf v[NV];
  MF_INLINE void zero(int64_t) {
    for (int i = 0; i < NV; ++i) v[i] = maskformer_bilinear::v8sf{};
  }
  MF_INLINE void axpy(const float* row, float w, int64_t) {
    const auto ws = maskformer_bilinear::splat8(w);
    for (int i = 0; i < NV; ++i) v[i] += ws * maskformer_bilinear::load8(row + 8 * i);
  }
  MF_INLINE void store(float* o, float poison, int64_t) const {
    for (int i = 0; i < NV; ++i) {
      const maskformer_bilinear::v8sf r = v[i] + poison;
      std::memcpy(o + 8 * i, &r, sizeof(r));
    }
  }
};
template <>
struct Acc<0> {
  std::vector<float> v;
  MF_INLINE void zero(int64_t D) { v.assign(D, 0.f); }
  MF_INLINE void axpy(const float* __restrict__ row, float w, int64_t D) {
    float* __restrict__ a = v.data();
    for (int64_t d = 0; d < D; ++d) a[d] += w * row[d];
  }
  MF_INLINE void store(float* o, float poison, int64_t D) const {
    for (int64_t d = 0; d < D; ++d) o[d] = v[d] + poison;
  }
};

// One task: queries [q0, q1) of head h of image b, written to out_rows (fp32 rows of D floats,
// `out_stride` apart): the output itself (fp32) or a scratch block (fp16/bf16).
template <int NV>
MF_INLINE void run_block(const Problem& p, int64_t b, int64_t h, int64_t q0, int64_t q1, float* out_rows,
                         int64_t out_stride) {
  const int64_t D = p.D;
  const int64_t HD = p.H * D;
  const int64_t LP = p.L * p.P;
  const float* value_bh = p.value + b * p.S * HD + h * D;
  Acc<NV> acc;
  for (int64_t q = q0; q < q1; ++q) {
    const int64_t row = (b * p.Q + q) * p.H + h;
    const float* loc = p.loc + row * LP * 2;
    const float* attn = p.attn + row * LP;
    acc.zero(D);
    // grid_sample multiplies an outside corner's 0 by its weight: NaN for a NaN or infinite
    // weight. Summed here as weight * 0 and added to every element at the end (0 or NaN).
    float poison = 0.f;
    for (int64_t l = 0; l < p.L; ++l) {
      const int64_t lh = p.shapes[2 * l], lw = p.shapes[2 * l + 1];
      const float hf = static_cast<float>(lh), wf = static_cast<float>(lw);
      const float* level = value_bh + p.starts[l] * HD;
      for (int64_t pt = 0; pt < p.P; ++pt) {
        const int64_t k = l * p.P + pt;
        const float a = attn[k];
        // align_corners=False: location 0 is the left edge of pixel 0, i.e. pixel -0.5
        const float px = loc[2 * k] * wf - 0.5f;
        const float py = loc[2 * k + 1] * hf - 0.5f;
        const float x0f = std::floor(px), y0f = std::floor(py);
        const float fx = px - x0f, fy = py - y0f;
        // grid_sample's weights: nw = (1-fx)(1-fy), ne = fx(1-fy), sw = (1-fx)fy, se = fx fy
        const float wy0 = a * (1.f - fy), wy1 = a * fy;
        const float w00 = wy0 * (1.f - fx), w01 = wy0 * fx, w10 = wy1 * (1.f - fx), w11 = wy1 * fx;
        // Some corner can be inside only when x0 in [-1, w) and y0 in [-1, h) (false for NaN):
        // only then are the coordinates converted to integers (a far point's cast is undefined).
        if (!(x0f >= -1.f && x0f < wf && y0f >= -1.f && y0f < hf)) {
          poison += w00 * 0.f + w01 * 0.f + w10 * 0.f + w11 * 0.f;
          continue;
        }
        const int64_t x0 = static_cast<int64_t>(x0f), y0 = static_cast<int64_t>(y0f);
        const bool xa = x0 >= 0, xb = x0 + 1 < lw, ya = y0 >= 0, yb = y0 + 1 < lh;
        const float* r0 = level + (y0 * lw + x0) * HD;  // corner (y0, x0); only dereferenced inside
        const float* r1 = r0 + lw * HD;                  // row y0 + 1
        if (ya && xa) acc.axpy(r0, w00, D); else poison += w00 * 0.f;
        if (ya && xb) acc.axpy(r0 + HD, w01, D); else poison += w01 * 0.f;
        if (yb && xa) acc.axpy(r1, w10, D); else poison += w10 * 0.f;
        if (yb && xb) acc.axpy(r1 + HD, w11, D); else poison += w11 * 0.f;
      }
    }
    acc.store(out_rows + (q - q0) * out_stride, poison, D);
  }
}

template <int NV>
void run_block_baseline(const Problem& p, int64_t b, int64_t h, int64_t q0, int64_t q1, float* o, int64_t s) {
  run_block<NV>(p, b, h, q0, q1, o, s);
}

#if MF_X86_DISPATCH
template <int NV>
MF_TARGET_AVX2 void run_block_avx2(const Problem& p, int64_t b, int64_t h, int64_t q0, int64_t q1, float* o,
                                   int64_t s) {
  run_block<NV>(p, b, h, q0, q1, o, s);
}
#endif

using BlockFn = void (*)(const Problem&, int64_t, int64_t, int64_t, int64_t, float*, int64_t);

template <int NV>
BlockFn pick_for() {
#if MF_X86_DISPATCH
  if (cpu_has_avx2_fma()) return &run_block_avx2<NV>;
#endif
  return &run_block_baseline<NV>;
}

inline BlockFn pick(int64_t D) {
  switch (D) {
    case 8: return pick_for<1>();
    case 16: return pick_for<2>();
    case 24: return pick_for<3>();
    case 32: return pick_for<4>();
    case 64: return pick_for<8>();
    default: return pick_for<0>();
  }
}

}  // namespace maskformer_msda
