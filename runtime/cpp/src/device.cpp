#include "quest/device.h"

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "quest/build_config.h"

namespace quest {

#if QUEST_HAVE_TRT
Status TrtDeviceFacts(int cuda_device, std::string* trt_version, std::string* compute_capability);
#endif

namespace {

constexpr const char* kJetsonReleaseFile = "/etc/nv_tegra_release";

// "10.3.0" -> {"10", "3", "0"}
std::vector<std::string> Split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  while (true) {
    size_t end = s.find(sep, start);
    out.push_back(s.substr(start, end == std::string::npos ? std::string::npos : end - start));
    if (end == std::string::npos) return out;
    start = end + 1;
  }
}

}  // namespace

std::vector<int> VersionParts(const std::string& text) {
  size_t a = text.find_first_not_of(" \t\n");
  const std::string s = a == std::string::npos ? "" : text.substr(a);
  const std::string head = s.substr(0, s.find_first_not_of("0123456789."));
  std::vector<int> out;
  for (const std::string& p : Split(head, '.')) {
    if (p.empty() || p.size() > 9 || p.find_first_not_of("0123456789") != std::string::npos) break;
    out.push_back(std::atoi(p.c_str()));
  }
  return out;
}

bool EngineLoadsOn(const std::string& built, const std::string& installed) {
  std::vector<int> b = VersionParts(built), i = VersionParts(installed);
  if (b.size() > 3) b.resize(3);
  if (i.size() > 3) i.resize(3);
  if (b.size() < 2 || i.size() < b.size()) return false;
  return std::equal(b.begin(), b.end(), i.begin());
}

namespace {

// "8.7", 8.7, [8, 7], "87", "sm_87" -> "8.7"; "" when it is none of these.
std::string NormalizeComputeCapability(const json::Value* v) {
  if (!v) return "";
  if (v->is_array() && v->size() == 2 && json::IsInteger(v->at(0)) && json::IsInteger(v->at(1))) {
    return std::to_string(json::AsInt(v->at(0))) + "." + std::to_string(json::AsInt(v->at(1)));
  }
  std::string s = v->is_string() ? json::AsString(*v) : v->is_number() ? json::Dump(*v) : "";
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (s.rfind("sm_", 0) == 0) s = s.substr(3);
  const size_t dot = s.find('.');
  if (dot == std::string::npos && s.size() >= 2 && s.size() <= 3 && s.find_first_not_of("0123456789") == std::string::npos) {
    s.insert(s.size() - 1, ".");
  }
  return s;
}

std::string ScalarText(const json::Value* v) {
  if (!v || v->is_null()) return "";
  if (v->is_string()) return json::AsString(*v);
  return json::Dump(*v);
}

// A key at the top level of an engine manifest, or in its "build" section.
const json::Value* EngineKey(const json::Value& root, const char* key) {
  const json::Value* v = json::Find(root, key);
  if ((!v || v->is_null()) && json::Find(root, "build")) v = json::Find(*json::Find(root, "build"), key);
  return v && !v->is_null() ? v : nullptr;
}

// "6.1.0" vs "6.1": the same release when the common leading components agree (major.minor at most).
bool SameRelease(const std::string& a, const std::string& b) {
  const std::vector<std::string> x = Split(a, '.'), y = Split(b, '.');
  const size_t n = std::min<size_t>(std::min(x.size(), y.size()), 2);
  for (size_t k = 0; k < n; ++k) {
    if (x[k] != y[k]) return false;
  }
  return true;
}

}  // namespace

std::string ManifestTargetId(const json::Value& root) {
  const json::Value* t = json::Find(root, "target");
  if (t && t->is_string()) return json::AsString(*t);
  if (t && t->is_object()) {
    const json::Value* id = json::Find(*t, "id");
    if (id && id->is_string()) return json::AsString(*id);
  }
  return "";
}

Status QueryDevice(int cuda_device, DeviceFacts* out) {
  DeviceFacts d;
  if (const char* sim = std::getenv(kTestDeviceEnv); sim && *sim) {
    json::Value v;
    Status st = json::Parse(sim, &v);
    if (!st.ok() || !v.is_object()) {
      return InvalidInput(std::string("$") + kTestDeviceEnv + " (test only) must be a JSON object with trt_version, "
                          "compute_capability and jetpack; unset it on a real device");
    }
    d.trt_version = ScalarText(json::Find(v, "trt_version"));
    d.compute_capability = NormalizeComputeCapability(json::Find(v, "compute_capability"));
    d.jetpack = ScalarText(json::Find(v, "jetpack"));
    d.jetson = !d.jetpack.empty();
    *out = d;
    return Status::Ok();
  }
#if QUEST_HAVE_TRT
  QUEST_RETURN_IF_ERROR(TrtDeviceFacts(cuda_device, &d.trt_version, &d.compute_capability));
#else
  (void)cuda_device;
  return NotBuilt(std::string("cannot check a TensorRT engine against this device: the TensorRT backend is not part "
                              "of this build: ") + QUEST_TRT_NOTE);
#endif
  if (std::FILE* f = std::fopen(kJetsonReleaseFile, "rb")) {
    d.jetson = true;
    std::fclose(f);
  }
  *out = d;
  return Status::Ok();
}

Status CheckEngineDevice(const Manifest& m, const DeviceFacts& device, const std::string& rebuild) {
  const std::string target = ManifestTargetId(m.root);
  const std::string cmd = rebuild.empty()
                              ? "quest-export build --from <bundle> --target " + (target.empty() ? "<target-id>" : target)
                              : rebuild;
  const std::string built_trt = ScalarText(EngineKey(m.root, "trt_version"));
  const std::string built_cc = NormalizeComputeCapability(EngineKey(m.root, "compute_capability"));
  if (built_trt.empty() || built_cc.empty()) {
    return ManifestMismatch(m.dir + ": engine manifest lacks trt_version or compute_capability; rebuild the engine: " + cmd);
  }
  const std::string again = "; rebuild it on this device: " + cmd;
  if (!EngineLoadsOn(built_trt, device.trt_version)) {
    return ManifestMismatch(m.dir + ": engine built with TensorRT " + built_trt + ", this device has TensorRT " +
                            device.trt_version + again);
  }
  if (built_cc != device.compute_capability) {
    return ManifestMismatch(m.dir + ": engine built for SM " + built_cc + ", this GPU is SM " + device.compute_capability + again);
  }
  if (target.rfind("jetson", 0) == 0 && !device.jetson) {
    return ManifestMismatch(m.dir + ": engine built for " + target +
                            ", but this machine is not a Jetson (no /etc/nv_tegra_release)" + again);
  }
  const std::string built_jp = ScalarText(EngineKey(m.root, "jetpack"));
  if (!built_jp.empty() && !device.jetpack.empty() && !SameRelease(built_jp, device.jetpack)) {
    return ManifestMismatch(m.dir + ": engine built on JetPack " + built_jp + ", this device runs JetPack " +
                            device.jetpack + again);
  }
  return Status::Ok();
}

}  // namespace quest
