// The sampling loop: DDIM over a Denoiser, with classifier-free guidance.
//
// Like quest_export.models.sampling: the model sees [uncond half, cond half] in one batch and
// eps = eps_u + w * (eps_c - eps_u) (float32); without guidance (w == 1 or an unconditional
// model) the model sees x with its own conditioning. Images are processed in chunks of at most
// `max_images_per_call`, step by step, so the result does not depend on the chunk size.
#pragma once

#include <cstdint>
#include <functional>
#include <random>
#include <vector>

#include "quest/engine.h"
#include "quest/scheduler.h"
#include "quest/status.h"
#include "quest/tensor.h"

namespace quest {

struct SampleRequest {
  int64_t steps = 50;
  double eta = 0.0;
  double guidance_scale = 1.0;
  // Conditional models: the conditioning row of every image (size N) and the unconditional row.
  std::vector<int64_t> class_rows;
  int64_t uncond_row = -1;
  int64_t max_images_per_call = 0;  // 0 = all images in one call
};

// Fills `out` (n values) with the variance noise z of step `step_index` (eta > 0 only).
using VarianceNoiseFn = std::function<Status(int64_t step_index, float* out, size_t n)>;
// Called before the model calls of each step.
using StepCallback = std::function<void(int64_t step_index, int64_t t)>;

// x_T = noise (N, C, H, W) -> x_0 clamped to [-1, 1].
// conditioning: [R, L, D] rows, or nullptr for unconditional models.
Status Sample(Denoiser& model, const DdimScheduler& scheduler_template, const Tensor& noise,
              const Tensor* conditioning, const SampleRequest& request, const VarianceNoiseFn& variance_noise,
              const StepCallback& on_step, Tensor* x0);

// Deterministic standard-normal numbers: mt19937_64 (fully specified by the C++ standard) and
// Box-Muller on 53-bit uniforms, so a seed gives the same noise on every platform. This is not
// torch's or numpy's stream: pass --noise FILE.npy to reproduce a Python run exactly.
class NormalRng {
 public:
  explicit NormalRng(uint64_t seed);
  void Fill(float* out, size_t n);

 private:
  double Uniform();  // (0, 1]
  std::mt19937_64 gen_;
  bool has_spare_ = false;
  double spare_ = 0.0;
};

}  // namespace quest
