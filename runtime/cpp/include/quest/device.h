// What an engine folder must match on this device (deploy.md B-13, J-5), with the same rules and one-line
// reasons as quest_export's Python check: the TensorRT version (major.minor.patch, as far as both say), the
// GPU's compute capability, and for a Jetson target a Jetson (L4T's /etc/nv_tegra_release) on the JetPack
// release the manifest names, when it names one.
#pragma once

#include <string>
#include <vector>

#include "quest/manifest.h"
#include "quest/status.h"

namespace quest {

// TEST ONLY: a simulated device as JSON, {"trt_version": "10.3.0", "compute_capability": "8.7",
// "jetpack": "6.1"} (jetpack null: not a Jetson). Read by this runtime and by quest_export's Python runtime,
// so both can be checked against tests/fixtures/manifests/ on a machine without a GPU. Never set it on a device.
constexpr const char* kTestDeviceEnv = "QUEST_EXPORT_TEST_DEVICE";

struct DeviceFacts {
  std::string trt_version;         // the loaded TensorRT library, e.g. "10.3.0"
  std::string compute_capability;  // CUDA device's "major.minor"
  bool jetson = false;             // L4T present
  std::string jetpack;             // JetPack release when known ("" otherwise)
};

// The simulated device of $QUEST_EXPORT_TEST_DEVICE if set, else this machine: TensorRT version and compute
// capability through the TensorRT backend (NotBuilt without it), Jetson from /etc/nv_tegra_release.
Status QueryDevice(int cuda_device, DeviceFacts* out);

// Refuses a build-trt manifest made for another TensorRT, GPU or platform: "DIR: reason; rebuild it on this
// device: <rebuild>". rebuild: the command to name ("" = quest-export build --from <bundle> --target <target>).
Status CheckEngineDevice(const Manifest& m, const DeviceFacts& device, const std::string& rebuild = "");

// Leading numeric parts of a version: "10.3.0.30-1+cuda12.5" -> {10, 3, 0, 30}; "10.03" -> {10, 3}; "R36" -> {}.
std::vector<int> VersionParts(const std::string& text);
// Whether an engine built with TensorRT `built` loads on `installed`: major.minor.patch equal as far as `built`
// states them (at least major.minor; the build part is not compared). Python: device.engine_loads_on.
bool EngineLoadsOn(const std::string& built, const std::string& installed);

// The target id of a manifest (`target` as a string or {"id": ...}), "" if absent.
std::string ManifestTargetId(const json::Value& root);

}  // namespace quest
