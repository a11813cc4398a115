// Engine: a bundle (or export folder) opened for sampling. It verifies the manifest before anything
// is loaded, owns one backend per graph (one, or one per timestep group in per-group mode), and turns
// (x_t, t, conditioning) into the graph feeds: the timestep group g(t) picks the graph (per-group) or
// the act_scale_ratios row (scale-input).
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "quest/backend.h"
#include "quest/manifest.h"
#include "quest/status.h"
#include "quest/tensor.h"

namespace quest {

// Anything that predicts the model output for a batch: the Engine, or a test's fake model.
class Denoiser {
 public:
  virtual ~Denoiser() = default;
  // x: (B, C, H, W); t: the scheduler timestep; ehs: (B, L, D) or nullptr for unconditional models.
  virtual Status Predict(const Tensor& x, double t, const Tensor* ehs, Tensor* noise_pred) = 0;
};

// Builds the backend for one graph of the bundle (its path relative to the bundle folder).
using BackendFactory = std::function<Status(const std::string& graph_file, std::unique_ptr<Backend>* out)>;

struct EngineOptions {
  std::string backend = "ort";  // ort | trt
  std::string engine_dir;       // trt: the build-trt folder holding unet.plan / unet_gNN.plan
  int intra_op_threads = 0;
  int device = 0;
  BackendFactory factory;       // tests only: replaces CreateBackend
};

class Engine : public Denoiser {
 public:
  Engine(std::string bundle_dir, EngineOptions options);
  ~Engine() override;

  // Checks the manifest (schema, every file hash; for trt also the engine folder), reads the
  // sampling metadata and conditioning, creates and activates the backends.
  Status Activate();
  Status Predict(const Tensor& x, double t, const Tensor* ehs, Tensor* noise_pred) override;
  void Deactivate();

  const SamplingMetadata& metadata() const { return metadata_; }
  const Manifest& manifest() const { return manifest_; }
  // encoder_hidden_states [R, L, D] of conditioning.safetensors, or nullptr.
  const Tensor* conditioning() const { return conditioning_ ? &*conditioning_ : nullptr; }
  // Number of UNet calls and the groups used so far (for logs and tests).
  const std::vector<int64_t>& groups_used() const { return groups_used_; }

 private:
  Status MakeBackend(const std::string& graph_file, std::unique_ptr<Backend>* out);
  std::string RebuildCommand() const;

  std::string bundle_dir_;
  EngineOptions options_;
  Manifest manifest_;
  Manifest engine_manifest_;  // trt only
  SamplingMetadata metadata_;
  std::optional<Tensor> conditioning_;
  std::vector<std::unique_ptr<Backend>> backends_;  // index: group (per-group) or 0
  std::vector<int64_t> groups_used_;
  bool active_ = false;
};

// Reads conditioning.safetensors: the tensor encoder_hidden_states [R, L, D] (float32) and the
// metadata uncond_index / labels, checked against the manifest's conditioning entry.
Status ReadConditioning(const std::string& path, const ConditioningSpec& spec, Tensor* ehs);

}  // namespace quest
