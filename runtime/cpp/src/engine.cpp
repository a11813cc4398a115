#include "quest/engine.h"

#include <cstdio>
#include <cstring>

#include "quest/device.h"
#include "quest/json.h"
#include "quest/safetensors.h"

namespace quest {
namespace {

// model.onnx -> unet.plan, model_g03.onnx -> unet_g03.plan (docs/formats.md, engine folder).
std::string PlanNameForGraph(const std::string& graph_file, int64_t group) {
  if (group < 0) return "unet.plan";
  char buf[32];
  std::snprintf(buf, sizeof buf, "unet_g%02lld.plan", static_cast<long long>(group));
  (void)graph_file;
  return buf;
}

}  // namespace

Status ReadConditioning(const std::string& path, const ConditioningSpec& spec, Tensor* ehs) {
  SafetensorsFile f;
  QUEST_RETURN_IF_ERROR(ReadSafetensors(path, &f));
  auto it = f.tensors.find("encoder_hidden_states");
  if (it == f.tensors.end()) return InvalidInput(path + ": no tensor 'encoder_hidden_states'");
  if (f.dtypes["encoder_hidden_states"] != "F32") {
    return InvalidInput(path + ": encoder_hidden_states must be float32 (F32), found " + f.dtypes["encoder_hidden_states"]);
  }
  Tensor t = it->second;
  if (t.shape.size() != 3 || t.shape[0] <= 0) {
    return InvalidInput(path + ": encoder_hidden_states must be [R, L, D], got " + ShapeString(t.shape));
  }
  auto ui = f.metadata.find("uncond_index");
  if (ui != f.metadata.end()) {
    char* end = nullptr;
    long long v = std::strtoll(ui->second.c_str(), &end, 10);
    if (end == ui->second.c_str() || *end != '\0') return InvalidInput(path + ": metadata uncond_index '" + ui->second + "' is not an integer");
    if (spec.uncond_index >= 0 && v != spec.uncond_index) {
      return ManifestMismatch(path + ": metadata uncond_index " + ui->second + " differs from the manifest's " +
                              std::to_string(spec.uncond_index));
    }
  }
  if (spec.uncond_index >= t.shape[0]) {
    return ManifestMismatch(path + ": uncond_index " + std::to_string(spec.uncond_index) + " is outside the " +
                            std::to_string(t.shape[0]) + " conditioning rows");
  }
  auto labels = f.metadata.find("labels");
  if (labels != f.metadata.end()) {
    json::Value lv;
    QUEST_RETURN_IF_ERROR(json::Parse(labels->second, &lv).WithContext(path + " metadata labels"));
    if (!lv.is_array() || static_cast<int64_t>(lv.size()) != t.shape[0]) {
      return InvalidInput(path + ": metadata labels must be a JSON list with one name per row (" + std::to_string(t.shape[0]) + ")");
    }
  }
  *ehs = std::move(t);
  return Status::Ok();
}

Engine::Engine(std::string bundle_dir, EngineOptions options)
    : bundle_dir_(std::move(bundle_dir)), options_(std::move(options)) {}

Engine::~Engine() { Deactivate(); }

Status Engine::MakeBackend(const std::string& graph_file, std::unique_ptr<Backend>* out) {
  if (options_.factory) return options_.factory(graph_file, out);
  BackendOptions bo;
  bo.intra_op_threads = options_.intra_op_threads;
  bo.device = options_.device;
  if (options_.backend == "ort") {
    bo.model_path = JoinPath(bundle_dir_, graph_file);
    return CreateBackend("ort", bo, out);
  }
  if (options_.backend == "trt") {
    int64_t group = -1;
    for (const GraphEntry& g : metadata_.graphs) {
      if (g.file == graph_file) group = g.group;
    }
    const std::string plan = PlanNameForGraph(graph_file, group);
    if (engine_manifest_.files.find(plan) == engine_manifest_.files.end()) {
      return ManifestMismatch(options_.engine_dir + ": no '" + plan + "' for graph '" + graph_file +
                              "' in the engine manifest; rebuild: quest-export build --from " + bundle_dir_);
    }
    bo.model_path = JoinPath(options_.engine_dir, plan);
    bo.rebuild_command = RebuildCommand();
    return CreateBackend("trt", bo, out);
  }
  return InvalidInput("unknown backend '" + options_.backend + "'; use ort or trt");
}

std::string Engine::RebuildCommand() const {
  return "quest-export build --from " + bundle_dir_ + (metadata_.target_id.empty() ? "" : " --target " + metadata_.target_id);
}

Status Engine::Activate() {
  if (active_) return Status::Ok();
  // 1. the bundle: schema and every file hash before anything is loaded
  QUEST_RETURN_IF_ERROR(OpenArtifact(bundle_dir_, &manifest_));
  QUEST_RETURN_IF_ERROR(ReadSamplingMetadata(manifest_, &metadata_));
  if (metadata_.sampler.sampler != "ddim") {
    return NotBuilt("the bundle's sampler is '" + metadata_.sampler.sampler +
                    "'; the C++ runtime implements DDIM only: use the Python runtime or export with sampler ddim");
  }
  // 2. a backend this build does not contain is refused before anything else is asked for
  if (!options_.factory) {
    std::string why;
    if (options_.backend != "ort" && options_.backend != "trt") return InvalidInput("unknown backend '" + options_.backend + "'; use ort or trt");
    if (!BackendBuilt(options_.backend, &why)) {
      return NotBuilt("the " + std::string(options_.backend == "ort" ? "ONNX Runtime" : "TensorRT") +
                      " backend is not part of this build: " + why);
    }
  }
  // 3. trt: the engine folder, checked the same way, and built from the same recipe
  if (!options_.factory && options_.backend == "trt") {
    if (options_.engine_dir.empty()) {
      return InvalidInput("--backend trt needs the engine folder built on this device (--engine DIR); build it with "
                          "`quest-export build --from " + bundle_dir_ + "` or `bash " + JoinPath(bundle_dir_, "build.sh") + "`");
    }
    QUEST_RETURN_IF_ERROR(OpenArtifact(options_.engine_dir, &engine_manifest_));
    if (engine_manifest_.stage != "build-trt") {
      return InvalidInput(options_.engine_dir + " holds a '" + engine_manifest_.stage + "' artifact, not a 'build-trt' engine folder");
    }
    if (!manifest_.recipe_fingerprint.empty() && !engine_manifest_.recipe_fingerprint.empty() &&
        manifest_.recipe_fingerprint != engine_manifest_.recipe_fingerprint) {
      return ManifestMismatch(options_.engine_dir + " was built from another recipe (fingerprint " +
                              engine_manifest_.recipe_fingerprint.substr(0, 12) + " vs the bundle's " +
                              manifest_.recipe_fingerprint.substr(0, 12) + "); rebuild: quest-export build --from " + bundle_dir_);
    }
    // deploy.md B-13, J-5: the TensorRT version, GPU and platform the engine was built for (the shared check)
    DeviceFacts device;
    QUEST_RETURN_IF_ERROR(QueryDevice(options_.device, &device));
    QUEST_RETURN_IF_ERROR(CheckEngineDevice(engine_manifest_, device, RebuildCommand()));
    if (metadata_.max_batch == 0) metadata_.max_batch = MaxBatchFromProfiles(engine_manifest_.root);
  }
  // 4. conditioning
  if (metadata_.conditioning) {
    Tensor ehs;
    QUEST_RETURN_IF_ERROR(ReadConditioning(JoinPath(bundle_dir_, metadata_.conditioning->file), *metadata_.conditioning, &ehs));
    if (const IoSpec* spec = metadata_.input("encoder_hidden_states"); spec && spec->shape.size() == 3) {
      for (int i = 1; i < 3; ++i) {
        if (spec->shape[i] >= 0 && spec->shape[i] != ehs.shape[i]) {
          return ManifestMismatch("conditioning rows are " + ShapeString(ehs.shape) +
                                  " but the graph's encoder_hidden_states is [batch, L, D] with " + ShapeString(spec->shape));
        }
      }
    }
    conditioning_ = std::move(ehs);
  }
  // 5. one backend per graph
  backends_.clear();
  const int64_t G = metadata_.num_groups();
  if (metadata_.scale_mode == "per-group") {
    backends_.resize(G);
    for (const GraphEntry& g : metadata_.graphs) QUEST_RETURN_IF_ERROR(MakeBackend(g.file, &backends_[g.group]));
  } else {
    backends_.resize(1);
    QUEST_RETURN_IF_ERROR(MakeBackend(metadata_.graphs[0].file, &backends_[0]));
  }
  for (size_t i = 0; i < backends_.size(); ++i) {
    QUEST_RETURN_IF_ERROR(backends_[i]->Activate());
    // the I/O the manifest promises is what the graph has
    std::vector<std::string> names = backends_[i]->InputNames();
    for (const IoSpec& spec : metadata_.inputs) {
      bool found = false;
      for (const auto& n : names) found = found || n == spec.name;
      if (!found) return ManifestMismatch("graph of group " + std::to_string(i) + " has no input '" + spec.name + "' listed in the manifest io");
    }
    if (names.size() != metadata_.inputs.size()) {
      return ManifestMismatch("graph of group " + std::to_string(i) + " has " + std::to_string(names.size()) +
                              " inputs but the manifest io lists " + std::to_string(metadata_.inputs.size()));
    }
  }
  active_ = true;
  return Status::Ok();
}

Status Engine::Predict(const Tensor& x, double t, const Tensor* ehs, Tensor* noise_pred) {
  if (!active_) return InternalError("Engine::Predict called before Activate");
  const IoSpec* sample_spec = metadata_.input("sample");
  if (x.shape.size() != 4) return InvalidInput("sample must be (B, C, H, W), got " + ShapeString(x.shape));
  for (int i = 1; i < 4; ++i) {
    if (x.shape[i] != sample_spec->shape[i]) {
      return InvalidInput("sample " + ShapeString(x.shape) + " does not match the graph's " + ShapeString(sample_spec->shape));
    }
  }
  const int64_t b = x.shape[0];
  const int64_t g = GroupForTimestep(metadata_.group_timesteps, t);
  groups_used_.push_back(g);
  TensorMap feeds;
  feeds["sample"] = x;
  feeds["timestep"] = Tensor({b}, std::vector<float>(b, static_cast<float>(t)));
  if (metadata_.conditioning) {
    if (!ehs || ehs->shape.size() != 3 || ehs->shape[0] != b) {
      return InvalidInput("this model is conditional: encoder_hidden_states (B, L, D) with B = " + std::to_string(b) + " is required");
    }
    feeds["encoder_hidden_states"] = *ehs;
  }
  if (metadata_.scale_mode == "scale-input") {
    const std::vector<float>& row = metadata_.scale_ratios[g];
    feeds["act_scale_ratios"] = Tensor({static_cast<int64_t>(row.size())}, row);
  }
  Backend& backend = *backends_[metadata_.scale_mode == "per-group" ? g : 0];
  TensorMap outputs;
  QUEST_RETURN_IF_ERROR(backend.Infer(feeds, &outputs));
  auto it = outputs.find("noise_pred");
  if (it == outputs.end()) return BackendError(backend.name() + ": the graph returned no 'noise_pred'");
  if (it->second.shape != x.shape) {
    return BackendError(backend.name() + ": noise_pred is " + ShapeString(it->second.shape) + ", expected " + ShapeString(x.shape));
  }
  *noise_pred = std::move(it->second);
  return Status::Ok();
}

void Engine::Deactivate() {
  for (auto& b : backends_) {
    if (b) b->Deactivate();
  }
  backends_.clear();
  active_ = false;
}

}  // namespace quest
