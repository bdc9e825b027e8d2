// Shared by the CPU post-processing kernels (semantic.cpp, panoptic.cpp): PyTorch's bilinear
// interpolation arithmetic (aten's CPU upsample_bilinear2d, align_corners=False, torch 2.13) at
// one output pixel, bit for bit, plus the ISA-dispatch helpers. See semantic.cpp's header for why
// each operation order is what it is; maskformer.kernels.upsample_argmax.torch_cpu_bilinear_rounding()
// decides at runtime which variant (fma or not, channels-last SIMD width) torch uses.
#pragma once

// MASKFORMER_NO_ATEN: the torch-free parts only (the OpenVINO extension, csrc/openvino/, does not
// link libtorch); parallel_tasks needs torch's thread pool.
#ifndef MASKFORMER_NO_ATEN
#include <ATen/Parallel.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <thread>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__GNUC__)
#define MF_INLINE inline __attribute__((always_inline))
#define MF_INLINE_LAMBDA __attribute__((always_inline))
#else
#define MF_INLINE inline
#define MF_INLINE_LAMBDA
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define MF_X86_DISPATCH 1
#define MF_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define MF_X86_DISPATCH 0
#define MF_TARGET_AVX2
#endif

namespace maskformer_bilinear {

#ifndef MASKFORMER_NO_ATEN
// Tasks [0, n) shared between the calling thread and get_num_threads() - 1 helpers from torch's
// inter-op pool, handed out one at a time; the caller waits only for tasks a helper has claimed,
// never for a helper the OS has not scheduled yet. Why not at::parallel_for: on this 2-core EPYC
// with another process busy, one 2-thread OpenMP region (x.fill_ of 4 MiB) took 8 ms against
// 66 us on one thread - the join waits for the worker's next time slice - and its static halves
// made upsample_argmax on random logits slower on 2 threads than on 1 (104 ms vs 82 ms).
// `init()` makes one thread's scratch, `body(scratch, task)` runs a task; body must not throw.
template <typename Init, typename Body>
inline void parallel_tasks(int64_t n, Init init, Body body) {
  if (n <= 0) return;
  const int64_t helpers =
      at::in_parallel_region() ? 0 : std::min<int64_t>(n, static_cast<int64_t>(at::get_num_threads())) - 1;
  if (helpers <= 0) {
    auto scratch = init();
    for (int64_t t = 0; t < n; ++t) body(scratch, t);
    return;
  }
  // The counters outlive this call (a helper may start after it returned); the job does not, so a
  // helper touches it only between claiming a task (next < n) and counting it done.
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  struct Job {
    Init* init;
    Body* body;
  };
  auto counters = std::make_shared<Counters>();
  Job job{&init, &body};
  const auto run = [](Counters& c, const Job* job, int64_t n) {
    int64_t t = c.next.fetch_add(1);
    if (t >= n) return;
    auto scratch = (*job->init)();
    for (; t < n; t = c.next.fetch_add(1)) {
      (*job->body)(scratch, t);
      c.done.fetch_add(1, std::memory_order_release);  // the last access to the job for this task
    }
  };
  for (int64_t i = 0; i < helpers; ++i) {
    at::launch([counters, jp = &job, n, run] { run(*counters, jp, n); });
  }
  run(*counters, &job, n);
  while (counters->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}
#endif  // MASKFORMER_NO_ATEN

// Whether the avx2+fma clones may run (checked once).
inline bool cpu_has_avx2_fma() {
#if MF_X86_DISPATCH
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

MF_INLINE int32_t float_bits(float v) {
  int32_t b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}
MF_INLINE float bits_float(int32_t b) {
  float v;
  std::memcpy(&v, &b, sizeof(v));
  return v;
}
MF_INLINE int32_t nonfinite(float v) { return (float_bits(v) & 0x7f800000) == 0x7f800000; }

// ---------------------------------------------------------------------------------------------
// Source indices and lambdas: aten's area_pixel_compute_scale / area_pixel_compute_source_index /
// guard_index_and_lambda / compute_source_index_and_lambda for scalar_t = opmath_t = float,
// align_corners=False.
// ---------------------------------------------------------------------------------------------
struct Axis {
  std::vector<int32_t> i0, i1;
  std::vector<float> l0, l1;
};

// `scale`: the source step aten uses. Negative: none given, aten's compute_scales_value takes
// static_cast<float>(input_size) / output_size (F.interpolate(size=...) passes no scale factor).
// >= 0: the step for an explicit scale factor s, static_cast<float>(1.0 / s), computed by the
// caller (a crop of `in` rows holding a fractional extent of e rows passes s = out / e).
inline Axis make_axis(int64_t in, int64_t out, bool use_fma, float scale = -1.f) {
  Axis a;
  a.i0.resize(out);
  a.i1.resize(out);
  a.l0.resize(out);
  a.l1.resize(out);
  // compute_scales_value: static_cast<float>(input_size) / output_size, a float division.
  if (!(scale >= 0.f)) scale = static_cast<float>(in) / static_cast<float>(out);
  for (int64_t i = 0; i < out; ++i) {
    if (in == out) {  // aten: "scale_factor = 1, simply copy", whatever the scale
      a.i0[i] = a.i1[i] = static_cast<int32_t>(i);
      a.l0[i] = 1.f;
      a.l1[i] = 0.f;
      continue;
    }
    const float di = static_cast<float>(i) + 0.5f;
    float src;
    if (use_fma) {
      src = std::fma(scale, di, -0.5f);
    } else {
      volatile float prod = scale * di;  // volatile: never contracted, whatever the target
      src = prod - 0.5f;
    }
    if (src < 0.f) src = 0.f;
    const int64_t i0 = std::min(static_cast<int64_t>(std::floor(src)), in - 1);
    const float l1 = std::min(std::max(src - static_cast<float>(i0), 0.f), 1.f);
    a.i0[i] = static_cast<int32_t>(i0);
    a.i1[i] = static_cast<int32_t>(i0 + ((i0 < in - 1) ? 1 : 0));
    a.l1[i] = l1;
    a.l0[i] = 1.f - l1;
  }
  return a;
}

// aten Interpolate<..., interp_size=2>: `t0 * w0 + t1 * w1`.
template <bool FMA>
MF_INLINE float lerp2(float t0, float w0, float t1, float w1) {
  if constexpr (FMA) {
    return std::fma(t0, w0, t1 * w1);
  } else {
    return t0 * w0 + t1 * w1;
  }
}

// aten generic kernel at one output pixel (x0/x1: source rows r0/r1 of one class).
template <bool FMA>
MF_INLINE float generic_value(const float* x0, const float* x1, int32_t a0, int32_t a1, float lw0, float lw1,
                              float lh0, float lh1) {
  const float t0 = lerp2<FMA>(x0[a0], lw0, x0[a1], lw1);
  const float t1 = lerp2<FMA>(x1[a0], lw0, x1[a1], lw1);
  return lerp2<FMA>(t0, lh0, t1, lh1);
}

// aten cpu_upsample_linear_channels_last at one output pixel. `lane`: the class sits in a full
// Vectorized<float> register (interpolate(i00,w00, ...) = i00*w00 + (i01*w01 + (i10*w10 +
// i11*w11))) rather than in the scalar tail loop (i00*w00 + i01*w01 + i10*w10 + i11*w11).
template <bool FMA>
MF_INLINE float channels_last_value(float a, float b, float c, float d, float w00, float w01, float w10, float w11,
                                    bool lane) {
  if constexpr (FMA) {
    return lane ? std::fma(a, w00, std::fma(b, w01, std::fma(d, w11, c * w10)))
                : std::fma(d, w11, std::fma(c, w10, std::fma(a, w00, b * w01)));
  } else {
    return lane ? a * w00 + (b * w01 + (c * w10 + d * w11)) : ((a * w00 + b * w01) + c * w10) + d * w11;
  }
}

// torch.argmax semantics: NaN is the maximum and the first maximum wins.
MF_INLINE bool takes_over(float v, float best) { return (v > best) | ((v != v) & (best == best)); }

// Pruning margin. Both aten formulas compute the value as sum_i w_i * x_i over the 4 taps with
// weights >= 0 summing to 1 +- 3u (u = 2^-24) and at most 6 roundings, so the computed value is
// within ~9u * max_i |x_i| of [min4, max4]. We widen by 2^-18 = 64u times max|tap| plus 1e-30
// absolute (subnormal products): pruning can never drop a class that ties or wins.
constexpr float kPruneRel = 3.814697265625e-06f;
constexpr float kPruneAbs = 1e-30f;

// 8 floats as one value (GCC/Clang vector extensions): for the reductions and the einsum
// micro-kernel that GCC does not vectorise from plain loops without -ffast-math. Compiled to
// AVX2 in the avx2 clones and to SSE pairs in the baseline ones. The helpers are always inlined,
// so the psABI note about passing 32-byte vectors without AVX does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef float v8sf __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8si __attribute__((vector_size(32), aligned(4)));
MF_INLINE v8sf load8(const float* p) {
  v8sf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
MF_INLINE v8sf splat8(float x) { return v8sf{} + x; }
MF_INLINE v8sf max8(v8sf a, v8sf b) { return a > b ? a : b; }
MF_INLINE v8sf min8(v8sf a, v8sf b) { return a < b ? a : b; }
MF_INLINE v8sf abs8(v8sf a) { return reinterpret_cast<v8sf>(reinterpret_cast<v8si>(a) & 0x7fffffff); }
MF_INLINE float hmax8(v8sf v) {
  float m = v[0];
  for (int i = 1; i < 8; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
MF_INLINE float hmin8(v8sf v) {
  float m = v[0];
  for (int i = 1; i < 8; ++i) m = v[i] < m ? v[i] : m;
  return m;
}

// Band-wide bounds of the pruning passes (semantic.cpp phase A, panoptic.cpp classify_rows) over
// one or more runs of contiguous floats: max v, max |v|, and a probe that is NaN exactly when some
// value is inf or NaN (v * 0). A crop's rows are separate runs; a contiguous plane is one.
struct BandStats {
  v8sf vmx = splat8(-std::numeric_limits<float>::infinity()), vmag = v8sf{}, vprobe = v8sf{};
  float mx = -std::numeric_limits<float>::infinity(), mag = 0.f, probe = 0.f;

  MF_INLINE void add(const float* xs, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const v8sf v = load8(xs + i);
      vmx = max8(vmx, v);
      vmag = max8(vmag, abs8(v));
      vprobe += v * 0.f;
    }
    for (; i < n; ++i) {
      mx = xs[i] > mx ? xs[i] : mx;
      mag = std::fabs(xs[i]) > mag ? std::fabs(xs[i]) : mag;
      probe += xs[i] * 0.f;
    }
  }
  // (max v, max |v|) of everything added; returns whether every value was finite.
  MF_INLINE bool finish(float* max_v, float* max_abs) const {
    const float vm = hmax8(vmx), va = hmax8(vmag);
    *max_v = vm > mx ? vm : mx;
    *max_abs = va > mag ? va : mag;
    float pr = probe;
    for (int k = 0; k < 8; ++k) pr += vprobe[k];
    return pr == 0.f;
  }
};

// Two-slot cache of horizontally interpolated source rows, one pair of slots per column tile
// (the dense sweeps of semantic.cpp and panoptic.cpp). An output row needs source rows r0 and
// r1; moving down, the previous group's r1 is usually this group's r0, so each source row is
// interpolated once per tile instead of once per output row. `fill(row, dst)` writes the
// `channels * tile_w` horizontally interpolated values of source row `row` into `dst`.
// On return *A holds row r0 and *B row r1 (the same slot when r0 == r1).
template <typename Fill>
MF_INLINE void cached_row_pair(std::vector<float>& slots, std::vector<int64_t>& tags, int64_t n_tiles, int64_t channels,
                               int64_t tile_w, int64_t ct, int64_t r0, int64_t r1, Fill fill, const float** A,
                               const float** B) {
  if (slots.empty()) {
    slots.resize(n_tiles * 2 * channels * tile_w);
    tags.assign(n_tiles * 2, -1);
  }
  int64_t* tag = tags.data() + 2 * ct;
  float* slot[2] = {slots.data() + (2 * ct) * channels * tile_w, slots.data() + (2 * ct + 1) * channels * tile_w};
  int s0 = (tag[0] == r0) ? 0 : (tag[1] == r0) ? 1 : -1;
  if (s0 < 0) {
    s0 = (tag[0] == r1) ? 1 : 0;
    fill(r0, slot[s0]);
    tag[s0] = r0;
  }
  int s1 = (r1 == r0) ? s0 : (tag[s0 ^ 1] == r1) ? (s0 ^ 1) : -1;
  if (s1 < 0) {
    s1 = s0 ^ 1;
    fill(r1, slot[s1]);
    tag[s1] = r1;
  }
  *A = slot[s0];
  *B = slot[s1];
}

}  // namespace maskformer_bilinear
