// OpenVINO extension: our CPU multi-scale deformable attention as an OpenVINO operation, so that an
// OpenVINO engine runs Mask2Former's deformable encoder with the kernel the torch path runs
// (csrc/ms_deform_attn_core.h) instead of the portable export (a grid_sample per level, then a
// weighted sum: maskformer/msda_pixel_decoder.py, ms_deform_attn_for_engines).
//
// Why: the deformable encoder is 54% of OpenVINO's Mask2Former forward on our portable export
// (Swin-T ADE, 512x683, 2 threads, AMD EPYC Zen 4: benchmarks/results/mask2former-engines-profile-cpu.md);
// OpenVINO's GridSample is a per-output-element reference loop, our kernel reads each corner's
// D-row once and accumulates in registers.
//
// Built by setup.py into maskformer/_openvino_msda*.so when OpenVINO's wheel (headers, libopenvino,
// libtbb) is importable at build time; optional like maskformer._C: without it the engines export
// the portable formulation (maskformer/engines/openvino_engine.py says which ran).
//
// The graph node: ONNX `com.maskformer::MultiScaleDeformableAttention(value, spatial_wh,
// sampling_locations, attention_weights)`, written by our export (maskformer/engines/export.py),
// converted by the ONNX frontend extension below into maskformer::MultiScaleDeformableAttention:
//
//   value               (B, S, H, D) f32    S = sum of the levels' h * w
//   spatial_wh          (L, 2) i64          each level's (w, h): the pixel decoder's offset
//                                           normaliser, a tensor the graph already holds
//   sampling_locations  (B, Q, H, L, P, 2)  f32, (x, y) in [0, 1]
//   attention_weights   (B, Q, H, L, P)     f32
//   -> out              (B, Q, H * D)       f32
//
// Semantics: grid_sample's (bilinear, zeros, align_corners=False), as the torch operator
// maskformer::ms_deform_attn_cpu (csrc/ms_deform_attn.cpp). Only f32: the engines run bf16 by
// OpenVINO's inference precision hint, which keeps a custom operation's tensors in f32.
#include <openvino/core/extension.hpp>
#include <openvino/core/op_extension.hpp>
#include <openvino/frontend/extension/conversion.hpp>
#include <openvino/frontend/node_context.hpp>
#include <openvino/frontend/onnx/extension/conversion.hpp>
#include <openvino/op/op.hpp>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#define MASKFORMER_NO_ATEN 1
#include "../ms_deform_attn_core.h"

namespace maskformer_ov {

class MultiScaleDeformableAttention : public ov::op::Op {
 public:
  OPENVINO_OP("MultiScaleDeformableAttention", "maskformer");

  MultiScaleDeformableAttention() = default;
  explicit MultiScaleDeformableAttention(const ov::OutputVector& args) : Op(args) { constructor_validate_and_infer_types(); }

  void validate_and_infer_types() override {
    OPENVINO_ASSERT(get_input_size() == 4, "maskformer::MultiScaleDeformableAttention takes 4 inputs (value, spatial_wh, "
                    "sampling_locations, attention_weights), got ", get_input_size());
    for (size_t i = 0; i < 4; ++i) {
      const auto t = get_input_element_type(i);
      // spatial_wh: i64 in the file; OpenVINO's CPU plugin computes integers in i32 and may hand us that
      const bool ok = t.is_dynamic() || (i == 1 ? (t == ov::element::i64 || t == ov::element::i32)
                                                : t == ov::element::f32);
      OPENVINO_ASSERT(ok, "maskformer::MultiScaleDeformableAttention: input ", i, " must be ",
                      i == 1 ? "i64 or i32" : "f32", ", got ", t);
    }
    const auto& v = get_input_partial_shape(0);
    const auto& loc = get_input_partial_shape(2);
    ov::PartialShape out = ov::PartialShape::dynamic(3);
    if (v.rank().is_static()) {
      OPENVINO_ASSERT(v.rank().get_length() == 4, "maskformer::MultiScaleDeformableAttention: value must be "
                      "(batch, tokens, heads, head_dim), got ", v);
      out[0] = v[0];
      out[2] = v[2] * v[3];
    }
    if (loc.rank().is_static()) {
      OPENVINO_ASSERT(loc.rank().get_length() == 6, "maskformer::MultiScaleDeformableAttention: sampling_locations "
                      "must be (batch, queries, heads, levels, points, 2), got ", loc);
      out[1] = loc[1];
    }
    set_output_type(0, ov::element::f32, out);
  }

  std::shared_ptr<ov::Node> clone_with_new_inputs(const ov::OutputVector& args) const override {
    return std::make_shared<MultiScaleDeformableAttention>(args);
  }

  bool visit_attributes(ov::AttributeVisitor&) override { return true; }

  bool has_evaluate() const override { return true; }

  bool evaluate(ov::TensorVector& outputs, const ov::TensorVector& inputs) const override {
    const ov::Tensor& value = inputs[0];
    const ov::Tensor& wh = inputs[1];
    const ov::Tensor& loc = inputs[2];
    const ov::Tensor& attn = inputs[3];
    const ov::Shape vs = value.get_shape(), ls = loc.get_shape(), as = attn.get_shape(), ws = wh.get_shape();
    OPENVINO_ASSERT(vs.size() == 4 && ls.size() == 6 && as.size() == 5 && ws.size() == 2 && ws[1] == 2,
                    "maskformer::MultiScaleDeformableAttention: bad input ranks ", vs, ls, as, ws);
    const int64_t B = vs[0], S = vs[1], H = vs[2], D = vs[3], Q = ls[1], L = ls[3], P = ls[4];
    OPENVINO_ASSERT(static_cast<int64_t>(ws[0]) == L && ls[0] == vs[0] && ls[2] == vs[2] && ls[5] == 2 &&
                        as[0] == vs[0] && static_cast<int64_t>(as[1]) == Q && as[2] == vs[2] &&
                        static_cast<int64_t>(as[3]) == L && static_cast<int64_t>(as[4]) == P,
                    "maskformer::MultiScaleDeformableAttention: shapes do not agree: value ", vs, ", spatial_wh ", ws,
                    ", sampling_locations ", ls, ", attention_weights ", as);
    const bool wide = wh.get_element_type() == ov::element::i64;
    OPENVINO_ASSERT(wide || wh.get_element_type() == ov::element::i32,
                    "maskformer::MultiScaleDeformableAttention: spatial_wh must be i64 or i32, got ", wh.get_element_type());
    const auto side = [&](int64_t i) -> int64_t {
      return wide ? wh.data<const int64_t>()[i] : static_cast<int64_t>(wh.data<const int32_t>()[i]);
    };
    std::vector<int64_t> shapes(2 * L), starts(L);
    int64_t tokens = 0;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t w = side(2 * l), h = side(2 * l + 1);
      // < 2**24: the kernel scales locations by the sides in float32, exact below that
      OPENVINO_ASSERT(w >= 1 && h >= 1 && w < (int64_t(1) << 24) && h < (int64_t(1) << 24),
                      "maskformer::MultiScaleDeformableAttention: level ", l, " has sides (w, h) = (", w, ", ", h,
                      "), not in [1, 2**24)");
      shapes[2 * l] = h;
      shapes[2 * l + 1] = w;
      starts[l] = tokens;
      tokens += shapes[2 * l] * shapes[2 * l + 1];
    }
    OPENVINO_ASSERT(tokens == S, "maskformer::MultiScaleDeformableAttention: the levels cover ", tokens,
                    " tokens but value has ", S);
    ov::Tensor& out = outputs[0];
    out.set_shape(ov::Shape{static_cast<size_t>(B), static_cast<size_t>(Q), static_cast<size_t>(H * D)});
    if (out.get_size() == 0) return true;
    const maskformer_msda::Problem p{value.data<const float>(), loc.data<const float>(), attn.data<const float>(),
                                     shapes.data(), starts.data(), B, S, H, D, Q, L, P};
    const maskformer_msda::BlockFn fn = maskformer_msda::pick(D);
    const int64_t block = maskformer_msda::kBlockQ;
    const int64_t n_qb = (Q + block - 1) / block;
    float* o = out.data<float>();
    const int64_t HD = H * D;
    // Tasks in the torch operator's order (image, head, 64 queries), handed out by TBB inside
    // OpenVINO's own arena: the engine's thread count holds here too.
    tbb::parallel_for(tbb::blocked_range<int64_t>(0, B * H * n_qb, 1), [&](const tbb::blocked_range<int64_t>& r) {
      for (int64_t t = r.begin(); t < r.end(); ++t) {
        const int64_t b = t / (H * n_qb), h = (t / n_qb) % H, qb = t % n_qb;
        const int64_t q0 = qb * block, q1 = std::min(Q, q0 + block);
        fn(p, b, h, q0, q1, o + (b * Q + q0) * HD + h * D, HD);
      }
    });
    return true;
  }
};

}  // namespace maskformer_ov

OPENVINO_CREATE_EXTENSIONS(std::vector<ov::Extension::Ptr>({
    std::make_shared<ov::OpExtension<maskformer_ov::MultiScaleDeformableAttention>>(),
    std::make_shared<ov::frontend::onnx::ConversionExtension>(
        "MultiScaleDeformableAttention", "com.maskformer",
        [](const ov::frontend::NodeContext& node) -> ov::OutputVector {
          ov::OutputVector inputs;
          for (size_t i = 0; i < node.get_input_size(); ++i) inputs.push_back(node.get_input(static_cast<int>(i)));
          return std::make_shared<maskformer_ov::MultiScaleDeformableAttention>(inputs)->outputs();
        }),
}));
