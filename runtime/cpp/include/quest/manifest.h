// manifest.json of a quest-export artifact (docs/formats.md): loading, schema check, the sha256 of
// every listed file, and the sampling metadata of an export / bundle folder.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "quest/json.h"
#include "quest/scheduler.h"
#include "quest/status.h"

namespace quest {

constexpr int64_t kManifestSchema = 1;
constexpr const char* kManifestName = "manifest.json";

struct Manifest {
  std::string dir;                           // the artifact folder
  json::Value root;                          // the whole document
  int64_t schema = 0;
  std::string stage;                         // calibrate | quantize | export | build-ort | build-trt | bundle
  std::string recipe_fingerprint;            // may be empty (null in the file)
  std::map<std::string, std::string> files;  // relative posix path -> sha256 hex
};

// The manifest check shared with quest_export's Python runtime and `quest-export verify` (same rules, same
// one-line reasons; tests/fixtures/manifests/cases.json):
//   1. LoadManifest: schema, stage, and every `files` key a plain relative path (no absolute path, no '..');
//   2. VerifyFiles, in key order: the file exists, its real path (symlinks resolved) stays inside DIR, its
//      sha256 matches; then no engine file (*.plan, *.engine, *.trt) in DIR is left out of `files`;
//   3. CheckEngineDevice (device.h), for build-trt folders: TensorRT version, compute capability, Jetson.
// Every refusal is "DIR: reason".

// Reads DIR/manifest.json and checks the schema version and the `files` table (relative paths
// inside DIR, 64-hex digests). Nothing else in DIR is read.
Status LoadManifest(const std::string& dir, Manifest* out);

// Step 2 above. Run this before anything in the folder is loaded.
Status VerifyFiles(const Manifest& m);

// LoadManifest + VerifyFiles.
Status OpenArtifact(const std::string& dir, Manifest* out);

struct IoSpec {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;  // -1 for a symbolic dimension
  std::vector<std::string> dim_names;  // symbolic name per dimension ("" for fixed ones)
};

struct GraphEntry {
  std::string file;
  int64_t group = -1;  // -1: one graph for every group (JSON null)
};

struct SamplerSpec {
  std::string sampler = "ddim";
  int64_t steps = 50;
  double eta = 0.0;
  double guidance_scale = 1.0;
};

struct ConditioningSpec {
  std::string file;
  int64_t uncond_index = -1;
  std::vector<std::string> labels;
};

// What a runtime needs from an export or bundle manifest to sample.
struct SamplingMetadata {
  std::string scale_mode;                       // merged | per-group | scale-input
  std::vector<GraphEntry> graphs;
  std::vector<int64_t> group_timesteps;         // t_0 > t_1 > ... > t_{G-1}; empty: one group
  std::vector<std::vector<float>> scale_ratios; // [G][K], scale-input only
  SamplerSpec sampler;
  SchedulerConfig scheduler;
  std::optional<ConditioningSpec> conditioning;
  std::vector<IoSpec> inputs, outputs;
  std::string target_id;                        // target.id, for messages ("" if absent)
  int64_t max_batch = 0;                        // build.profiles.sample.max[0] (UNet batch); 0 = unknown

  int64_t num_groups() const { return group_timesteps.empty() ? 1 : static_cast<int64_t>(group_timesteps.size()); }
  const IoSpec* input(const std::string& name) const;
};

// Parses the sampling keys of an `export` or `bundle` manifest and checks them against each other
// (graphs per group, scale_ratios shape, conditioning file listed, io names).
Status ReadSamplingMetadata(const Manifest& m, SamplingMetadata* out);

// Reads `profiles.sample.max[0]` (the largest UNet batch an engine accepts) from a manifest's
// top level or its `build` section; 0 when absent.
int64_t MaxBatchFromProfiles(const json::Value& root);

// Timestep-group rule of docs/formats.md: g(t) = max{g : t_g >= t}, and 0 when t > t_0.
// group_timesteps must be strictly descending; an empty list maps every t to 0.
int64_t GroupForTimestep(const std::vector<int64_t>& group_timesteps, double t);

// Joins a bundle-relative posix path onto a folder.
std::string JoinPath(const std::string& dir, const std::string& rel);

}  // namespace quest
