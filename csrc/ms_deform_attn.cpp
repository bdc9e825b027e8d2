// Multi-scale deformable attention forward on CPU (Mask2Former's pixel decoder, Deformable DETR):
//
//   maskformer::ms_deform_attn_cpu(value (B,S,H,D), spatial_shapes int[] (h0,w0,h1,w1,...),
//                                  sampling_locations (B,Q,H,L,P,2), attention_weights (B,Q,H,L,P))
//       -> (B,Q,H*D) in value's dtype
//   maskformer::ms_deform_attn_cpu_out(..., out): the same into `out` (contiguous, value's dtype),
//       returned (tests fill it with a sentinel first)
//
//   out[b,q,h,:] = sum_{l,p} a[b,q,h,l,p] * bilinear(level l of value[b,:,h,:], loc[b,q,h,l,p])
//
// Fuses what the reference (kernels/ms_deform_attn.py: one grid_sample per level, then a weighted
// sum) does in four passes over a (B*H, D, Q, L*P) tensor of samples: per (image, head, block of
// queries) the 4 bilinear corners of every (level, point) are read straight from `value` (a D-row,
// contiguous) and accumulated, weighted by bilinear weight x attention weight, into an fp32
// D-vector; the output row is written once. Semantics are grid_sample's (bilinear, zero padding,
// align_corners=False): pixel = x * w - 0.5, a corner outside the map reads 0 (decided per corner),
// and its weight still multiplies that 0, so a NaN or infinite location (or a NaN weight) gives
// NaN exactly as grid_sample does, while a finite location far outside gives 0.
//
// Arithmetic: fp32 whatever the inputs (fp16/bf16 inputs are converted to fp32 once, up front:
// each value element is read ~48 times at Mask2Former's shapes, so converting per read would cost
// more than the copy); output rounded once to value's dtype (round to nearest even). Not bit-equal
// to the reference (its coordinate goes through 2x - 1 and back, it sums in value's dtype):
// tests/kernels/test_ms_deform_attn.py bounds the difference by the reference's own error.
//
// Threads: tasks of (image, head, 64 queries), head-major so the threads share one head's slice of
// `value` (S rows of D floats: 690 KB at 512x512, D=32) in cache, handed out one at a time by
// maskformer_bilinear::parallel_tasks (see bilinear.h for why not at::parallel_for on a loaded box).
// The inner loop over D runs in an avx2+fma clone when the CPU has it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "bilinear.h"

namespace maskformer_msda {

using maskformer_bilinear::cpu_has_avx2_fma;
using maskformer_bilinear::parallel_tasks;

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

BlockFn pick(int64_t D) {
  switch (D) {
    case 8: return pick_for<1>();
    case 16: return pick_for<2>();
    case 24: return pick_for<3>();
    case 32: return pick_for<4>();
    case 64: return pick_for<8>();
    default: return pick_for<0>();
  }
}

at::Tensor& ms_deform_attn_cpu_out(const at::Tensor& value_in, at::IntArrayRef spatial_shapes,
                                   const at::Tensor& loc_in, const at::Tensor& attn_in, at::Tensor& out) {
  TORCH_CHECK(value_in.device().is_cpu() && loc_in.device().is_cpu() && attn_in.device().is_cpu(),
              "ms_deform_attn_cpu: inputs must be CPU tensors, got value on ", value_in.device(),
              ", sampling_locations on ", loc_in.device(), ", attention_weights on ", attn_in.device());
  const auto st = value_in.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "ms_deform_attn_cpu: value dtype must be float32, float16 or bfloat16, got ", st);
  TORCH_CHECK(loc_in.scalar_type() == st && attn_in.scalar_type() == st,
              "ms_deform_attn_cpu: one dtype for all three tensors, got value ", st, ", sampling_locations ",
              loc_in.scalar_type(), ", attention_weights ", attn_in.scalar_type());
  TORCH_CHECK(value_in.dim() == 4, "ms_deform_attn_cpu: value must be (batch, tokens, heads, head_dim), got ",
              value_in.sizes());
  TORCH_CHECK(spatial_shapes.size() % 2 == 0 && !spatial_shapes.empty(),
              "ms_deform_attn_cpu: spatial_shapes must be (h0, w0, h1, w1, ...), got ", spatial_shapes);
  const int64_t B = value_in.size(0), S = value_in.size(1), H = value_in.size(2), D = value_in.size(3);
  const int64_t L = static_cast<int64_t>(spatial_shapes.size()) / 2;
  std::vector<int64_t> starts(L);
  int64_t tokens = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t lh = spatial_shapes[2 * l], lw = spatial_shapes[2 * l + 1];
    TORCH_CHECK(lh >= 1 && lw >= 1, "ms_deform_attn_cpu: every level needs height and width >= 1, got ",
                spatial_shapes);
    TORCH_CHECK(lh < (int64_t(1) << 24) && lw < (int64_t(1) << 24),
                "ms_deform_attn_cpu: level sides must be < 2**24 (exact in float32), got ", spatial_shapes);
    starts[l] = tokens;
    tokens += lh * lw;
  }
  TORCH_CHECK(tokens == S, "ms_deform_attn_cpu: spatial_shapes ", spatial_shapes, " cover ", tokens,
              " tokens but value has ", S);
  TORCH_CHECK(loc_in.dim() == 6 && loc_in.size(0) == B && loc_in.size(2) == H && loc_in.size(3) == L &&
                  loc_in.size(5) == 2,
              "ms_deform_attn_cpu: sampling_locations must be (", B, ", queries, ", H, ", ", L, ", points, 2), got ",
              loc_in.sizes());
  const int64_t Q = loc_in.size(1), P = loc_in.size(4);
  TORCH_CHECK(attn_in.dim() == 5 && attn_in.size(0) == B && attn_in.size(1) == Q && attn_in.size(2) == H &&
                  attn_in.size(3) == L && attn_in.size(4) == P,
              "ms_deform_attn_cpu: attention_weights must be (", B, ", ", Q, ", ", H, ", ", L, ", ", P, "), got ",
              attn_in.sizes());

  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == st && out.is_contiguous() && out.dim() == 3 &&
                  out.size(0) == B && out.size(1) == Q && out.size(2) == H * D,
              "ms_deform_attn_cpu: out must be a contiguous CPU ", st, " tensor of shape (", B, ", ", Q, ", ", H * D,
              "), got ", out.scalar_type(), " ", out.sizes(), " on ", out.device(),
              out.is_contiguous() ? "" : " (not contiguous)");
  if (out.numel() == 0) return out;
  // fp32 contiguous views (a copy only when needed: fp16/bf16 inputs or strided views).
  const at::Tensor value = value_in.to(at::kFloat).contiguous();
  const at::Tensor loc = loc_in.to(at::kFloat).contiguous();
  const at::Tensor attn = attn_in.to(at::kFloat).contiguous();
  std::vector<int64_t> shapes(spatial_shapes.begin(), spatial_shapes.end());
  const Problem p{value.data_ptr<float>(), loc.data_ptr<float>(), attn.data_ptr<float>(), shapes.data(),
                  starts.data(), B, S, H, D, Q, L, P};
  const BlockFn fn = pick(D);
  const int64_t n_qb = (Q + kBlockQ - 1) / kBlockQ;
  const int64_t HD = H * D;
  const bool direct = st == at::kFloat;
  float* out32 = direct ? out.data_ptr<float>() : nullptr;
  void* out_raw = out.data_ptr();
  const auto init = [&] { return std::vector<float>(direct ? 0 : kBlockQ * D); };
  parallel_tasks(B * H * n_qb, init, [&](std::vector<float>& scratch, int64_t t) {
    const int64_t b = t / (H * n_qb), h = (t / n_qb) % H, qb = t % n_qb;
    const int64_t q0 = qb * kBlockQ, q1 = std::min(Q, q0 + kBlockQ);
    if (direct) {
      fn(p, b, h, q0, q1, out32 + (b * Q + q0) * HD + h * D, HD);
      return;
    }
    fn(p, b, h, q0, q1, scratch.data(), D);
    for (int64_t q = q0; q < q1; ++q) {
      const float* src = scratch.data() + (q - q0) * D;
      const int64_t o = (b * Q + q) * HD + h * D;
      if (st == at::kHalf) {
        c10::Half* dst = static_cast<c10::Half*>(out_raw) + o;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<c10::Half>(src[d]);
      } else {
        c10::BFloat16* dst = static_cast<c10::BFloat16*>(out_raw) + o;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<c10::BFloat16>(src[d]);
      }
    }
  });
  return out;
}

at::Tensor ms_deform_attn_cpu(const at::Tensor& value, at::IntArrayRef spatial_shapes, const at::Tensor& loc,
                              const at::Tensor& attn) {
  TORCH_CHECK(value.dim() == 4 && loc.dim() >= 2,
              "ms_deform_attn_cpu: value must be (batch, tokens, heads, head_dim), got ", value.sizes(),
              ", sampling_locations (batch, queries, heads, levels, points, 2), got ", loc.sizes());
  auto out = at::empty({value.size(0), loc.size(1), value.size(2) * value.size(3)}, value.options());
  return ms_deform_attn_cpu_out(value, spatial_shapes, loc, attn, out);
}

}  // namespace maskformer_msda

TORCH_LIBRARY_FRAGMENT(maskformer, m) {
  m.def(
      "ms_deform_attn_cpu(Tensor value, int[] spatial_shapes, Tensor sampling_locations, "
      "Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_cpu_out(Tensor value, int[] spatial_shapes, Tensor sampling_locations, "
      "Tensor attention_weights, Tensor(a!) out) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(maskformer, CPU, m) {
  m.impl("ms_deform_attn_cpu", &maskformer_msda::ms_deform_attn_cpu);
  m.impl("ms_deform_attn_cpu_out", &maskformer_msda::ms_deform_attn_cpu_out);
}
