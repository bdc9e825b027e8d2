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
#include "ms_deform_attn_core.h"

namespace maskformer_msda {

using maskformer_bilinear::parallel_tasks;

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
