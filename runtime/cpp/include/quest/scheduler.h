// DDIM (Song et al. 2020, arXiv:2010.02502) built from a diffusers scheduler config.
//
// The arithmetic follows diffusers' DDIMScheduler (set_timesteps + step) term for term. The tables
// are the float32 values diffusers builds (betas rounded to float32, alpha = 1 - beta in float32, the
// alpha-bar product accumulated in float64 and rounded to float32), the same tables as the Python
// runtime (quest_export.runtime.schedulers); each step then runs in float64 and rounds x_{t-1} to
// float32. diffusers steps in float32, so the two agree to float32 rounding (~1e-6 relative over 50 steps).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "quest/json.h"
#include "quest/status.h"

namespace quest {

// The keys of a diffusers DDIMScheduler config that this runtime reads; a missing key takes
// diffusers' default. Keys that DDIM does not use (e.g. DDPM's variance_type) are ignored, as
// DDIMScheduler.from_config ignores them.
struct SchedulerConfig {
  int64_t num_train_timesteps = 1000;
  double beta_start = 0.0001;
  double beta_end = 0.02;
  std::string beta_schedule = "linear";  // linear | scaled_linear | squaredcos_cap_v2
  std::vector<double> trained_betas;     // used instead of beta_schedule when non-empty
  std::string prediction_type = "epsilon";  // epsilon | v_prediction | sample
  bool clip_sample = true;
  double clip_sample_range = 1.0;
  bool set_alpha_to_one = true;
  int64_t steps_offset = 0;
  std::string timestep_spacing = "leading";  // leading | trailing | linspace
};

// Read a scheduler config JSON object; refuses values this runtime does not implement
// (thresholding, rescale_betas_zero_snr, unknown schedules) with the key and the allowed values.
Status SchedulerConfigFromJson(const json::Value& v, SchedulerConfig* out);

class DdimScheduler {
 public:
  // Builds betas and the alpha-bar table: alpha_bar_t = prod_{s<=t} (1 - beta_s)   (Ho et al. 2020, eq. 4).
  static Status Create(const SchedulerConfig& cfg, DdimScheduler* out);

  // The N timesteps of the sampling run, descending (diffusers' set_timesteps).
  Status SetTimesteps(int64_t num_inference_steps);
  const std::vector<int64_t>& timesteps() const { return timesteps_; }
  const std::vector<double>& alphas_cumprod() const { return alphas_cumprod_; }
  const SchedulerConfig& config() const { return cfg_; }

  // One DDIM update x_t -> x_{t-1} (Song et al. eq. 12) for n elements:
  //   x0_hat = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)        (clipped if clip_sample)
  //   sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))          (eq. 16)
  //   x_prev = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev - sigma_t^2) * eps + sigma_t * z
  // model_output is eps (or v, or x_0, per prediction_type). variance_noise z (n values) is
  // required when eta > 0 and ignored otherwise. prev_sample may alias sample.
  Status Step(const float* model_output, int64_t t, const float* sample, size_t n, double eta,
              const float* variance_noise, float* prev_sample) const;

 private:
  SchedulerConfig cfg_;
  std::vector<double> betas_;
  std::vector<double> alphas_cumprod_;
  double final_alpha_cumprod_ = 1.0;
  int64_t num_inference_steps_ = 0;
  std::vector<int64_t> timesteps_;
};

}  // namespace quest
