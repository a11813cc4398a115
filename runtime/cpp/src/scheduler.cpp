#include "quest/scheduler.h"

#include <algorithm>
#include <cmath>

namespace quest {
namespace {

constexpr double kPi = 3.14159265358979323846;
constexpr double kCosineMaxBeta = 0.999;  // diffusers betas_for_alpha_bar(max_beta)
constexpr double kCosineOffset = 0.008;   // Nichol & Dhariwal 2021, eq. 17: s = 0.008

Status ReadNumber(const json::Value& v, const char* key, double* out) {
  const json::Value* x = json::Find(v, key);
  if (!x || x->is_null()) return Status::Ok();
  if (!x->is_number()) return InvalidInput(std::string("scheduler_config.") + key + " must be a number");
  *out = x->get<double>();
  return Status::Ok();
}

Status ReadInt(const json::Value& v, const char* key, int64_t* out) {
  const json::Value* x = json::Find(v, key);
  if (!x || x->is_null()) return Status::Ok();
  if (!json::IsInteger(*x)) return InvalidInput(std::string("scheduler_config.") + key + " must be an integer");
  *out = json::AsInt(*x);
  return Status::Ok();
}

Status ReadBool(const json::Value& v, const char* key, bool* out) {
  const json::Value* x = json::Find(v, key);
  if (!x || x->is_null()) return Status::Ok();
  if (!x->is_boolean()) return InvalidInput(std::string("scheduler_config.") + key + " must be true or false");
  *out = x->get<bool>();
  return Status::Ok();
}

Status ReadChoice(const json::Value& v, const char* key, const std::vector<std::string>& allowed, std::string* out) {
  const json::Value* x = json::Find(v, key);
  if (!x || x->is_null()) return Status::Ok();
  std::string list;
  for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + a;
  if (!x->is_string()) return InvalidInput(std::string("scheduler_config.") + key + " must be one of " + list);
  if (std::find(allowed.begin(), allowed.end(), json::AsString(*x)) == allowed.end()) {
    return InvalidInput(std::string("scheduler_config.") + key + " = '" + json::AsString(*x) +
                        "' is not supported by the C++ runtime; supported: " + list);
  }
  *out = json::AsString(*x);
  return Status::Ok();
}

// numpy.round / np.rint: round half to even (the default floating-point rounding mode).
int64_t RoundHalfEven(double x) { return static_cast<int64_t>(std::nearbyint(x)); }

}  // namespace

Status SchedulerConfigFromJson(const json::Value& v, SchedulerConfig* out) {
  if (!v.is_object()) return InvalidInput("scheduler_config must be a JSON object");
  SchedulerConfig c;
  QUEST_RETURN_IF_ERROR(ReadInt(v, "num_train_timesteps", &c.num_train_timesteps));
  QUEST_RETURN_IF_ERROR(ReadNumber(v, "beta_start", &c.beta_start));
  QUEST_RETURN_IF_ERROR(ReadNumber(v, "beta_end", &c.beta_end));
  QUEST_RETURN_IF_ERROR(ReadChoice(v, "beta_schedule", {"linear", "scaled_linear", "squaredcos_cap_v2"}, &c.beta_schedule));
  QUEST_RETURN_IF_ERROR(ReadChoice(v, "prediction_type", {"epsilon", "v_prediction", "sample"}, &c.prediction_type));
  QUEST_RETURN_IF_ERROR(ReadBool(v, "clip_sample", &c.clip_sample));
  QUEST_RETURN_IF_ERROR(ReadNumber(v, "clip_sample_range", &c.clip_sample_range));
  QUEST_RETURN_IF_ERROR(ReadBool(v, "set_alpha_to_one", &c.set_alpha_to_one));
  QUEST_RETURN_IF_ERROR(ReadInt(v, "steps_offset", &c.steps_offset));
  QUEST_RETURN_IF_ERROR(ReadChoice(v, "timestep_spacing", {"leading", "trailing", "linspace"}, &c.timestep_spacing));
  if (const json::Value* tb = json::Find(v, "trained_betas"); tb && !tb->is_null()) {
    if (!tb->is_array()) return InvalidInput("scheduler_config.trained_betas must be a list of numbers or null");
    for (const json::Value& b : *tb) {
      if (!b.is_number()) return InvalidInput("scheduler_config.trained_betas must be a list of numbers or null");
      // diffusers stores them as float32 (torch.tensor(trained_betas, dtype=torch.float32)).
      c.trained_betas.push_back(b.get<double>());  // rounded to float32 in Create, as diffusers
    }
    if (static_cast<int64_t>(c.trained_betas.size()) != c.num_train_timesteps) {
      return InvalidInput("scheduler_config.trained_betas has " + std::to_string(c.trained_betas.size()) +
                          " entries but num_train_timesteps is " + std::to_string(c.num_train_timesteps));
    }
  }
  bool flag = false;
  QUEST_RETURN_IF_ERROR(ReadBool(v, "thresholding", &flag));
  if (flag) return InvalidInput("scheduler_config.thresholding = true (dynamic thresholding) is not implemented by the C++ runtime; use the Python runtime or a config with thresholding false");
  flag = false;
  QUEST_RETURN_IF_ERROR(ReadBool(v, "rescale_betas_zero_snr", &flag));
  if (flag) return InvalidInput("scheduler_config.rescale_betas_zero_snr = true is not implemented by the C++ runtime; use the Python runtime");
  if (c.num_train_timesteps <= 0) return InvalidInput("scheduler_config.num_train_timesteps must be positive");
  if (c.steps_offset < 0) return InvalidInput("scheduler_config.steps_offset must be >= 0");
  *out = c;
  return Status::Ok();
}

Status DdimScheduler::Create(const SchedulerConfig& cfg, DdimScheduler* out) {
  DdimScheduler s;
  s.cfg_ = cfg;
  const int64_t T = cfg.num_train_timesteps;
  // Tables as diffusers builds them: betas rounded to float32, alpha = 1 - beta in float32, the
  // cumulative product accumulated in float64 and rounded to float32 (the values the model was trained
  // with; quest_export.runtime.schedulers builds the same). Steps then run in float64.
  std::vector<float> betas(T);
  // np.linspace(a, b, T): y_i = i * ((b - a) / (T - 1)) + a, and y_{T-1} = b exactly.
  auto linspace = [T](double a, double b, int64_t i) {
    if (T == 1) return a;
    if (i == T - 1) return b;
    return static_cast<double>(i) * ((b - a) / static_cast<double>(T - 1)) + a;
  };
  if (!cfg.trained_betas.empty()) {
    for (int64_t i = 0; i < T; ++i) betas[i] = static_cast<float>(cfg.trained_betas[i]);
  } else if (cfg.beta_schedule == "linear") {  // DDPM section 4: beta linear in t
    for (int64_t i = 0; i < T; ++i) betas[i] = static_cast<float>(linspace(cfg.beta_start, cfg.beta_end, i));
  } else if (cfg.beta_schedule == "scaled_linear") {  // latent diffusion: sqrt(beta) linear, squared in float32
    for (int64_t i = 0; i < T; ++i) {
      const float r = static_cast<float>(linspace(std::sqrt(cfg.beta_start), std::sqrt(cfg.beta_end), i));
      betas[i] = r * r;
    }
  } else if (cfg.beta_schedule == "squaredcos_cap_v2") {  // cosine alpha-bar, Nichol & Dhariwal eq. 17
    auto alpha_bar = [](double t) {
      const double c = std::cos((t + kCosineOffset) / (1.0 + kCosineOffset) * kPi / 2.0);
      return c * c;
    };
    for (int64_t i = 0; i < T; ++i) {
      const double t1 = static_cast<double>(i) / T, t2 = static_cast<double>(i + 1) / T;
      betas[i] = static_cast<float>(std::min(1.0 - alpha_bar(t2) / alpha_bar(t1), kCosineMaxBeta));
    }
  } else {
    return InvalidInput("beta_schedule '" + cfg.beta_schedule + "' is not supported");
  }
  s.betas_.resize(T);
  s.alphas_cumprod_.resize(T);
  double prod = 1.0;
  for (int64_t i = 0; i < T; ++i) {
    const float alpha = 1.0f - betas[i];  // float32, as diffusers
    prod *= static_cast<double>(alpha);
    s.betas_[i] = betas[i];
    s.alphas_cumprod_[i] = static_cast<double>(static_cast<float>(prod));
  }
  // At the last step there is no previous alpha-bar: 1 (set_alpha_to_one) or alpha_bar_0.
  s.final_alpha_cumprod_ = cfg.set_alpha_to_one ? 1.0 : s.alphas_cumprod_[0];
  *out = std::move(s);
  return Status::Ok();
}

Status DdimScheduler::SetTimesteps(int64_t n) {
  const int64_t T = cfg_.num_train_timesteps;
  if (n <= 0) return InvalidInput("the number of sampling steps must be positive, got " + std::to_string(n));
  if (n > T) {
    return InvalidInput("steps = " + std::to_string(n) + " cannot be larger than num_train_timesteps = " + std::to_string(T));
  }
  std::vector<int64_t> ts;
  if (cfg_.timestep_spacing == "linspace") {
    // np.linspace(0, T - 1, n).round()[::-1]: y_i = i * step + start, last element = stop exactly.
    const double stop = static_cast<double>(T - 1);
    for (int64_t i = 0; i < n; ++i) {
      double y = (n == 1) ? 0.0 : static_cast<double>(i) * (stop / static_cast<double>(n - 1));
      if (n > 1 && i == n - 1) y = stop;
      ts.push_back(RoundHalfEven(y));
    }
    std::reverse(ts.begin(), ts.end());
  } else if (cfg_.timestep_spacing == "leading") {
    const int64_t ratio = T / n;  // integer step ratio
    for (int64_t i = n - 1; i >= 0; --i) ts.push_back(i * ratio + cfg_.steps_offset);
  } else {  // trailing: np.round(np.arange(T, 0, -T / n)) - 1
    const double step = -static_cast<double>(T) / static_cast<double>(n);
    const double start = static_cast<double>(T);
    // numpy arange: length ceil((stop - start) / step); values start + i * delta, delta = (start + step) - start.
    const int64_t len = static_cast<int64_t>(std::ceil((0.0 - start) / step));
    const double delta = (start + step) - start;
    for (int64_t i = 0; i < len; ++i) ts.push_back(RoundHalfEven(start + static_cast<double>(i) * delta) - 1);
  }
  for (int64_t t : ts) {
    if (t < 0 || t >= T) {
      return InvalidInput("timestep " + std::to_string(t) + " from timestep_spacing '" + cfg_.timestep_spacing +
                          "' (steps_offset " + std::to_string(cfg_.steps_offset) + ") is outside [0, " +
                          std::to_string(T - 1) + "]");
    }
  }
  num_inference_steps_ = n;
  timesteps_ = std::move(ts);
  return Status::Ok();
}

Status DdimScheduler::Step(const float* model_output, int64_t t, const float* sample, size_t n, double eta,
                           const float* variance_noise, float* prev_sample) const {
  if (num_inference_steps_ == 0) return InternalError("DdimScheduler::Step called before SetTimesteps");
  const int64_t T = cfg_.num_train_timesteps;
  if (t < 0 || t >= T) return InvalidInput("timestep " + std::to_string(t) + " outside [0, " + std::to_string(T - 1) + "]");
  if (eta < 0) return InvalidInput("eta must be >= 0");
  if (eta > 0 && variance_noise == nullptr) return InvalidInput("DDIM with eta > 0 needs variance noise");

  // 1. previous timestep: t - T // N, whatever the spacing (as diffusers)
  const int64_t prev_t = t - T / num_inference_steps_;
  // 2. alpha-bar at t and t_prev
  const double a_t = alphas_cumprod_[t];
  const double a_prev = prev_t >= 0 ? alphas_cumprod_[prev_t] : final_alpha_cumprod_;
  const double b_t = 1.0 - a_t;
  const double b_prev = 1.0 - a_prev;
  // 5. sigma_t(eta), eq. 16
  const double variance = (b_prev / b_t) * (1.0 - a_t / a_prev);
  const double sigma = eta * std::sqrt(variance);
  const double sqrt_a_t = std::sqrt(a_t), sqrt_b_t = std::sqrt(b_t), sqrt_a_prev = std::sqrt(a_prev);
  const double dir_coef = std::sqrt(std::max(1.0 - a_prev - sigma * sigma, 0.0));  // guard rounding below 0
  const double clip = cfg_.clip_sample_range;
  const int kind = cfg_.prediction_type == "epsilon" ? 0 : (cfg_.prediction_type == "sample" ? 1 : 2);

  for (size_t i = 0; i < n; ++i) {
    const double x = sample[i], m = model_output[i];
    double x0, eps;
    // 3. predicted x_0 ("f_theta(x_t, t)", eq. 12) and eps
    if (kind == 0) {
      x0 = (x - sqrt_b_t * m) / sqrt_a_t;
      eps = m;
    } else if (kind == 1) {
      x0 = m;
      eps = (x - sqrt_a_t * x0) / sqrt_b_t;
    } else {  // v-prediction (Salimans & Ho 2022)
      x0 = sqrt_a_t * x - sqrt_b_t * m;
      eps = sqrt_a_t * m + sqrt_b_t * x;
    }
    // 4. clip x_0
    if (cfg_.clip_sample) x0 = std::min(std::max(x0, -clip), clip);
    // 6.-7. direction pointing to x_t, then x_{t-1}
    double prev = sqrt_a_prev * x0 + dir_coef * eps;
    if (eta > 0) prev += sigma * static_cast<double>(variance_noise[i]);
    prev_sample[i] = static_cast<float>(prev);
  }
  return Status::Ok();
}

}  // namespace quest
