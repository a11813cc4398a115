#include "quest/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace quest {
namespace {

// Rows [begin, end) of a batch-major tensor.
Tensor SliceBatch(const Tensor& t, int64_t begin, int64_t end) {
  const size_t per = t.data.size() / static_cast<size_t>(t.shape[0]);
  std::vector<int64_t> shape = t.shape;
  shape[0] = end - begin;
  std::vector<float> data(t.data.begin() + begin * per, t.data.begin() + end * per);
  return Tensor(std::move(shape), std::move(data));
}

// Conditioning rows -> (rows.size(), L, D).
Tensor GatherRows(const Tensor& table, const std::vector<int64_t>& rows) {
  const size_t per = table.data.size() / static_cast<size_t>(table.shape[0]);
  Tensor out;
  out.shape = {static_cast<int64_t>(rows.size()), table.shape[1], table.shape[2]};
  out.data.resize(rows.size() * per);
  for (size_t i = 0; i < rows.size(); ++i) {
    std::memcpy(out.data.data() + i * per, table.data.data() + rows[i] * per, per * sizeof(float));
  }
  return out;
}

Tensor ConcatBatch(const Tensor& a, const Tensor& b) {
  Tensor out;
  out.shape = a.shape;
  out.shape[0] = a.shape[0] + b.shape[0];
  out.data.reserve(a.data.size() + b.data.size());
  out.data.insert(out.data.end(), a.data.begin(), a.data.end());
  out.data.insert(out.data.end(), b.data.begin(), b.data.end());
  return out;
}

}  // namespace

Status Sample(Denoiser& model, const DdimScheduler& scheduler_template, const Tensor& noise,
              const Tensor* conditioning, const SampleRequest& req, const VarianceNoiseFn& variance_noise,
              const StepCallback& on_step, Tensor* x0) {
  if (noise.shape.size() != 4 || noise.shape[0] <= 0) return InvalidInput("noise must be (N, C, H, W), got " + ShapeString(noise.shape));
  const int64_t n_images = noise.shape[0];
  const bool conditional = conditioning != nullptr;
  if (conditional) {
    if (static_cast<int64_t>(req.class_rows.size()) != n_images) {
      return InvalidInput("need one conditioning row per image (" + std::to_string(n_images) + "), got " +
                          std::to_string(req.class_rows.size()));
    }
    const int64_t rows = conditioning->shape[0];
    for (int64_t r : req.class_rows) {
      if (r < 0 || r >= rows) return InvalidInput("conditioning row " + std::to_string(r) + " is outside [0, " + std::to_string(rows - 1) + "]");
    }
  }
  const bool guided = conditional && req.guidance_scale != 1.0;
  if (guided && (req.uncond_row < 0 || req.uncond_row >= conditioning->shape[0])) {
    return InvalidInput("guidance needs a valid unconditional row (conditioning uncond_index), got " + std::to_string(req.uncond_row));
  }
  if (req.eta > 0 && !variance_noise) return InvalidInput("eta > 0 needs a variance noise source");

  DdimScheduler sched = scheduler_template;
  QUEST_RETURN_IF_ERROR(sched.SetTimesteps(req.steps));

  // Images per model call: the model sees 2 * chunk images under guidance.
  int64_t chunk = n_images;
  if (req.max_images_per_call > 0) chunk = std::min(chunk, req.max_images_per_call);

  Tensor x = noise;
  Tensor eps = Tensor::Zeros(noise.shape);
  std::vector<float> z;
  const size_t per_image = x.data.size() / static_cast<size_t>(n_images);
  const auto& timesteps = sched.timesteps();
  for (size_t i = 0; i < timesteps.size(); ++i) {
    const int64_t t = timesteps[i];
    if (on_step) on_step(static_cast<int64_t>(i), t);
    for (int64_t b0 = 0; b0 < n_images; b0 += chunk) {
      const int64_t b1 = std::min(n_images, b0 + chunk);
      Tensor xb = SliceBatch(x, b0, b1);  // (B, C, H, W)
      Tensor out;
      if (!conditional) {
        QUEST_RETURN_IF_ERROR(model.Predict(xb, static_cast<double>(t), nullptr, &out));
      } else {
        std::vector<int64_t> rows(req.class_rows.begin() + b0, req.class_rows.begin() + b1);
        Tensor cond = GatherRows(*conditioning, rows);  // (B, L, D)
        if (!guided) {
          QUEST_RETURN_IF_ERROR(model.Predict(xb, static_cast<double>(t), &cond, &out));
        } else {
          Tensor uncond = GatherRows(*conditioning, std::vector<int64_t>(rows.size(), req.uncond_row));
          Tensor x2 = ConcatBatch(xb, xb);          // (2B, C, H, W)
          Tensor c2 = ConcatBatch(uncond, cond);    // (2B, L, D): [uncond half, cond half]
          Tensor both;
          QUEST_RETURN_IF_ERROR(model.Predict(x2, static_cast<double>(t), &c2, &both));
          const size_t half = xb.data.size();
          out = Tensor(xb.shape, std::vector<float>(half));
          const float w = static_cast<float>(req.guidance_scale);
          for (size_t k = 0; k < half; ++k) {
            const float eu = both.data[k], ec = both.data[half + k];
            const float diff = ec - eu;  // float32 throughout, as torch computes it
            out.data[k] = eu + w * diff;
          }
        }
      }
      if (out.data.size() != xb.data.size()) return InternalError("model output size differs from its input");
      std::memcpy(eps.data.data() + b0 * per_image, out.data.data(), out.data.size() * sizeof(float));
    }
    const float* zp = nullptr;
    if (req.eta > 0) {
      z.resize(x.data.size());
      QUEST_RETURN_IF_ERROR(variance_noise(static_cast<int64_t>(i), z.data(), z.size()));
      zp = z.data();
    }
    QUEST_RETURN_IF_ERROR(sched.Step(eps.data.data(), t, x.data.data(), x.data.size(), req.eta, zp, x.data.data()));
  }
  for (float& v : x.data) v = std::min(std::max(v, -1.0f), 1.0f);  // x.clamp(-1, 1)
  *x0 = std::move(x);
  return Status::Ok();
}

NormalRng::NormalRng(uint64_t seed) : gen_(seed) {}

double NormalRng::Uniform() {
  // 53 random bits -> (0, 1]
  return (static_cast<double>(gen_() >> 11) + 1.0) * (1.0 / 9007199254740992.0);
}

void NormalRng::Fill(float* out, size_t n) {
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  for (size_t i = 0; i < n; ++i) {
    if (has_spare_) {
      out[i] = static_cast<float>(spare_);
      has_spare_ = false;
      continue;
    }
    const double u1 = Uniform(), u2 = Uniform();
    const double r = std::sqrt(-2.0 * std::log(u1));
    out[i] = static_cast<float>(r * std::cos(kTwoPi * u2));
    spare_ = r * std::sin(kTwoPi * u2);
    has_spare_ = true;
  }
}

}  // namespace quest
