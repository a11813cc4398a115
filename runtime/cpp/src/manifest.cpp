#include "quest/manifest.h"

#include <sys/stat.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>

#include "quest/sha256.h"

namespace quest {
namespace {

const char* const kEngineSuffixes[] = {".plan", ".engine", ".trt"};  // TensorRT engine files
const char* const kStages[] = {"calibrate", "quantize", "export", "build-ort", "build-trt", "bundle"};

bool IsHex64(const std::string& s) {
  if (s.size() != 64) return false;
  return std::all_of(s.begin(), s.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

// Why a `files` key is not a plain relative path inside the folder, or "" when it is. The same rules and
// words as quest_export's Python check (tests/fixtures/manifests/cases.json holds the expected lines).
std::string UnsafePathReason(const std::string& rel) {
  if (!rel.empty() && rel[0] == '/') {
    return "file entry '" + rel + "' is an absolute path; manifest paths are relative to the folder: re-run the stage that wrote it";
  }
  bool dotdot = false, odd = rel.empty() || rel.find('\\') != std::string::npos;
  size_t start = 0;
  while (start <= rel.size()) {
    size_t end = rel.find('/', start);
    if (end == std::string::npos) end = rel.size();
    const std::string part = rel.substr(start, end - start);
    dotdot = dotdot || part == "..";
    odd = odd || part.empty() || part == ".";
    start = end + 1;
  }
  if (dotdot) {
    return "file entry '" + rel + "' leaves the folder ('..'); manifest paths must stay inside the folder: re-run the stage that wrote it";
  }
  if (odd) {
    return "file entry '" + rel + "' is not a plain relative path (empty or '.' parts, backslashes); re-run the stage that wrote it";
  }
  return "";
}

bool IsRegularFile(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool IsEngineFile(const std::string& name) {
  for (const char* suffix : kEngineSuffixes) {
    const std::string s(suffix);
    if (name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0) return true;
  }
  return false;
}

// Every engine file under dir (relative posix paths, sorted), skipping hidden folders and nested
// artifacts (folders with their own manifest.json, e.g. a bundle's engine/ folder). Links are not followed.
std::vector<std::string> EngineFilesUnder(const std::string& dir) {
  namespace fs = std::filesystem;
  std::vector<std::string> out;
  std::error_code ec;
  fs::recursive_directory_iterator it(dir, ec), end;
  for (; !ec && it != end; it.increment(ec)) {
    const fs::path& p = it->path();
    const std::string name = p.filename().string();
    if (it->is_directory(ec)) {  // links to folders are neither entered nor counted (as Python's os.walk)
      if (!it->is_symlink(ec) && (name[0] == '.' || fs::exists(p / kManifestName, ec))) it.disable_recursion_pending();
      continue;
    }
    if (IsEngineFile(name)) out.push_back(p.lexically_relative(dir).generic_string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

Status ReadIoList(const json::Value* list, const char* what, std::vector<IoSpec>* out) {
  if (!list || !list->is_array()) return InvalidInput(std::string("manifest io.") + what + " must be a list");
  for (const json::Value& e : *list) {
    IoSpec spec;
    const json::Value* name = json::Find(e, "name");
    const json::Value* dtype = json::Find(e, "dtype");
    const json::Value* shape = json::Find(e, "shape");
    if (!name || !name->is_string()) return InvalidInput(std::string("manifest io.") + what + " entry without a name");
    spec.name = json::AsString(*name);
    spec.dtype = dtype && dtype->is_string() ? json::AsString(*dtype) : "";
    if (spec.dtype != "float32") {
      return InvalidInput("manifest io: tensor '" + spec.name + "' has dtype '" + spec.dtype +
                          "'; the C++ runtime feeds and reads float32 only (docs/formats.md)");
    }
    if (!shape || !shape->is_array()) return InvalidInput("manifest io: tensor '" + spec.name + "' has no shape list");
    for (const json::Value& d : *shape) {
      if (json::IsInteger(d)) {
        spec.shape.push_back(json::AsInt(d));
        spec.dim_names.emplace_back();
      } else if (d.is_string()) {
        spec.shape.push_back(-1);
        spec.dim_names.push_back(json::AsString(d));
      } else {
        return InvalidInput("manifest io: tensor '" + spec.name + "' has a shape entry that is neither int nor name");
      }
    }
    out->push_back(std::move(spec));
  }
  return Status::Ok();
}

}  // namespace

std::string JoinPath(const std::string& dir, const std::string& rel) {
  if (dir.empty()) return rel;
  if (dir.back() == '/') return dir + rel;
  return dir + "/" + rel;
}

Status LoadManifest(const std::string& dir, Manifest* out) {
  const std::string path = JoinPath(dir, kManifestName);
  if (!IsRegularFile(path)) {
    return InvalidInput(dir + " is not a quest-export artifact (no " + std::string(kManifestName) +
                        "); point at a folder written by quest-export");
  }
  Manifest m;
  m.dir = dir;
  Status st = json::ParseFile(path, &m.root);
  if (!st.ok()) return ManifestMismatch(path + " is corrupt (" + st.message() + "); re-run the stage that wrote it");
  if (!m.root.is_object()) return ManifestMismatch(path + " is not a JSON object; re-run the stage that wrote it");
  const json::Value* schema = json::Find(m.root, "schema");
  if (!schema || !json::IsInteger(*schema) || json::AsInt(*schema) != kManifestSchema) {
    std::string got = schema ? json::Dump(*schema) : "missing";
    return ManifestMismatch(dir + ": manifest schema " + got + "; this quest-export reads schema " +
                            std::to_string(kManifestSchema) + ": re-create the artifact or use a matching quest-export");
  }
  m.schema = json::AsInt(*schema);
  const json::Value* stage = json::Find(m.root, "stage");
  if (!stage || !stage->is_string() ||
      std::find(std::begin(kStages), std::end(kStages), json::AsString(*stage)) == std::end(kStages)) {
    return ManifestMismatch(path + ": unknown or missing stage " + (stage ? json::Dump(*stage) : "") +
                            "; expected one of calibrate, quantize, export, build-ort, build-trt, bundle");
  }
  m.stage = json::AsString(*stage);
  if (const json::Value* fp = json::Find(m.root, "recipe_fingerprint"); fp && fp->is_string()) m.recipe_fingerprint = json::AsString(*fp);
  const json::Value* files = json::Find(m.root, "files");
  if (!files || !files->is_object()) return ManifestMismatch(path + ": 'files' must be an object {path: sha256}");
  for (const auto& kv : files->items()) {  // sorted by key, as the Python check walks them
    if (std::string why = UnsafePathReason(kv.key()); !why.empty()) return ManifestMismatch(dir + ": " + why);
    if (!kv.value().is_string() || !IsHex64(json::AsString(kv.value()))) {
      return ManifestMismatch(dir + ": file entry '" + kv.key() + "' has no lowercase sha256 hex digest; re-run the stage that wrote it");
    }
    m.files[kv.key()] = json::AsString(kv.value());
  }
  *out = std::move(m);
  return Status::Ok();
}

Status VerifyFiles(const Manifest& m) {
  char* real_dir = ::realpath(m.dir.c_str(), nullptr);
  if (!real_dir) return IoError("cannot resolve " + m.dir);
  const std::string inside = std::string(real_dir) + "/";
  std::free(real_dir);
  for (const auto& kv : m.files) {
    const std::string p = JoinPath(m.dir, kv.first);
    if (!IsRegularFile(p)) {
      return ManifestMismatch(m.dir + ": file '" + kv.first + "' listed in the manifest is missing; re-copy the whole folder");
    }
    char* real = ::realpath(p.c_str(), nullptr);
    const bool escapes = !real || std::string(real).rfind(inside, 0) != 0;
    std::free(real);
    if (escapes) {
      return ManifestMismatch(m.dir + ": file '" + kv.first +
                              "' is a symlink that leaves the folder; copy the file itself into the folder");
    }
    std::string digest;
    QUEST_RETURN_IF_ERROR(Sha256File(p, &digest));
    if (digest != kv.second) {
      return ManifestMismatch(m.dir + ": file '" + kv.first +
                              "' does not match its manifest hash (tampered or truncated); re-copy the folder or "
                              "re-run the stage that wrote it");
    }
  }
  for (const std::string& rel : EngineFilesUnder(m.dir)) {
    if (m.files.find(rel) == m.files.end()) {
      return ManifestMismatch(m.dir + ": engine file '" + rel +
                              "' is not listed in the manifest, so nothing vouches for it; delete it or rebuild the engine folder");
    }
  }
  return Status::Ok();
}

Status OpenArtifact(const std::string& dir, Manifest* out) {
  Manifest m;
  QUEST_RETURN_IF_ERROR(LoadManifest(dir, &m));
  QUEST_RETURN_IF_ERROR(VerifyFiles(m));
  *out = std::move(m);
  return Status::Ok();
}

const IoSpec* SamplingMetadata::input(const std::string& name) const {
  for (const IoSpec& s : inputs) {
    if (s.name == name) return &s;
  }
  return nullptr;
}

int64_t MaxBatchFromProfiles(const json::Value& root) {
  const json::Value* profiles = json::Find(root, "profiles");
  if (!profiles) {
    if (const json::Value* build = json::Find(root, "build")) profiles = json::Find(*build, "profiles");
  }
  if (!profiles) return 0;
  const json::Value* sample = json::Find(*profiles, "sample");
  const json::Value* mx = sample ? json::Find(*sample, "max") : nullptr;
  if (!mx || !mx->is_array() || mx->empty() || !json::IsInteger(mx->at(0))) return 0;
  return json::AsInt(mx->at(0));
}

Status ReadSamplingMetadata(const Manifest& m, SamplingMetadata* out) {
  const std::string where = JoinPath(m.dir, kManifestName);
  if (m.stage != "export" && m.stage != "bundle") {
    return InvalidInput(m.dir + " holds a '" + m.stage + "' artifact; sampling needs an 'export' or 'bundle' folder");
  }
  const json::Value& r = m.root;
  SamplingMetadata md;
  auto fail = [&](const std::string& what) { return ManifestMismatch(where + ": " + what); };

  // scale mode and graphs
  const json::Value* mode = json::Find(r, "scale_mode");
  if (!mode || !mode->is_string()) return fail("'scale_mode' is missing");
  md.scale_mode = json::AsString(*mode);
  if (md.scale_mode != "merged" && md.scale_mode != "per-group" && md.scale_mode != "scale-input") {
    return fail("scale_mode '" + md.scale_mode + "' is unknown; expected merged, per-group or scale-input");
  }
  const json::Value* graphs = json::Find(r, "graphs");
  if (!graphs || !graphs->is_array() || graphs->empty()) return fail("'graphs' must be a non-empty list");
  for (const json::Value& g : *graphs) {
    GraphEntry e;
    const json::Value* file = json::Find(g, "file");
    const json::Value* group = json::Find(g, "group");
    if (!file || !file->is_string()) return fail("a 'graphs' entry has no file");
    e.file = json::AsString(*file);
    if (group && !group->is_null()) {
      if (!json::IsInteger(*group)) return fail("graph '" + e.file + "' has a non-integer group");
      e.group = json::AsInt(*group);
    }
    if (m.files.find(e.file) == m.files.end()) return fail("graph '" + e.file + "' is not listed in 'files'");
    md.graphs.push_back(e);
  }

  // timestep groups
  if (const json::Value* groups = json::Find(r, "groups"); groups && !groups->is_null()) {
    const json::Value* ts = json::Find(*groups, "timesteps");
    const json::Value* count = json::Find(*groups, "count");
    if (!ts || !ts->is_array()) return fail("'groups.timesteps' must be a list");
    for (const json::Value& t : *ts) {
      if (!json::IsInteger(t)) return fail("'groups.timesteps' must hold integers");
      md.group_timesteps.push_back(json::AsInt(t));
    }
    for (size_t i = 1; i < md.group_timesteps.size(); ++i) {
      if (md.group_timesteps[i] >= md.group_timesteps[i - 1]) {
        return fail("'groups.timesteps' must be strictly descending (t_0 > t_1 > ...)");
      }
    }
    if (count && (!json::IsInteger(*count) || json::AsInt(*count) != static_cast<int64_t>(md.group_timesteps.size()))) {
      return fail("'groups.count' does not equal the number of group timesteps");
    }
  }
  const int64_t G = md.num_groups();
  if (md.scale_mode == "per-group") {
    std::vector<bool> seen(G, false);
    for (const GraphEntry& e : md.graphs) {
      if (e.group < 0 || e.group >= G) return fail("per-group graph '" + e.file + "' has group outside [0, " + std::to_string(G - 1) + "]");
      seen[e.group] = true;
    }
    for (int64_t g = 0; g < G; ++g) {
      if (!seen[g]) return fail("per-group mode but no graph for group " + std::to_string(g));
    }
  } else if (md.graphs.size() != 1) {
    return fail("scale_mode '" + md.scale_mode + "' needs exactly one graph, found " + std::to_string(md.graphs.size()));
  }
  if (md.scale_mode == "scale-input") {
    const json::Value* sr = json::Find(r, "scale_ratios");
    if (!sr || !sr->is_array() || static_cast<int64_t>(sr->size()) != G) {
      return fail("scale-input mode needs 'scale_ratios' with one row per group (" + std::to_string(G) + ")");
    }
    for (const json::Value& row : *sr) {
      if (!row.is_array()) return fail("'scale_ratios' rows must be lists");
      std::vector<float> vals;
      for (const json::Value& x : row) {
        if (!x.is_number()) return fail("'scale_ratios' must hold numbers");
        vals.push_back(static_cast<float>(x.get<double>()));
      }
      if (!md.scale_ratios.empty() && vals.size() != md.scale_ratios[0].size()) return fail("'scale_ratios' rows differ in length");
      md.scale_ratios.push_back(std::move(vals));
    }
  }

  // sampler and scheduler
  const json::Value* sampler = json::Find(r, "sampler");
  if (!sampler || !sampler->is_object()) return fail("'sampler' is missing");
  if (const json::Value* v = json::Find(*sampler, "sampler"); v && v->is_string()) md.sampler.sampler = json::AsString(*v);
  if (const json::Value* v = json::Find(*sampler, "steps"); v && json::IsInteger(*v)) md.sampler.steps = json::AsInt(*v);
  if (const json::Value* v = json::Find(*sampler, "eta"); v && v->is_number()) md.sampler.eta = v->get<double>();
  if (const json::Value* v = json::Find(*sampler, "guidance_scale"); v && v->is_number()) md.sampler.guidance_scale = v->get<double>();
  const json::Value* sched = json::Find(r, "scheduler_config");
  if (!sched) return fail("'scheduler_config' is missing");
  QUEST_RETURN_IF_ERROR(SchedulerConfigFromJson(*sched, &md.scheduler).WithContext(where));

  // conditioning
  if (const json::Value* c = json::Find(r, "conditioning"); c && !c->is_null()) {
    ConditioningSpec cs;
    const json::Value* file = json::Find(*c, "file");
    const json::Value* ui = json::Find(*c, "uncond_index");
    const json::Value* labels = json::Find(*c, "labels");
    if (!file || !file->is_string()) return fail("'conditioning.file' is missing");
    cs.file = json::AsString(*file);
    if (m.files.find(cs.file) == m.files.end()) return fail("conditioning file '" + cs.file + "' is not listed in 'files'");
    if (ui && json::IsInteger(*ui)) cs.uncond_index = json::AsInt(*ui);
    if (labels && labels->is_array()) {
      for (const json::Value& l : *labels) cs.labels.push_back(l.is_string() ? json::AsString(l) : json::Dump(l));
    }
    md.conditioning = cs;
  }

  // io
  const json::Value* io = json::Find(r, "io");
  if (!io || !io->is_object()) return fail("'io' is missing");
  QUEST_RETURN_IF_ERROR(ReadIoList(json::Find(*io, "inputs"), "inputs", &md.inputs).WithContext(where));
  QUEST_RETURN_IF_ERROR(ReadIoList(json::Find(*io, "outputs"), "outputs", &md.outputs).WithContext(where));
  if (!md.input("sample") || !md.input("timestep")) return fail("io.inputs must contain 'sample' and 'timestep'");
  if (md.outputs.size() != 1 || md.outputs[0].name != "noise_pred") return fail("io.outputs must be exactly ['noise_pred']");
  const bool has_ehs = md.input("encoder_hidden_states") != nullptr;
  if (has_ehs != md.conditioning.has_value()) {
    return fail(has_ehs ? "the graph takes encoder_hidden_states but 'conditioning' is null"
                        : "'conditioning' is set but the graph has no encoder_hidden_states input");
  }
  const IoSpec* ratios = md.input("act_scale_ratios");
  if ((ratios != nullptr) != (md.scale_mode == "scale-input")) {
    return fail("the act_scale_ratios input must be present exactly in scale-input mode");
  }
  if (ratios && ratios->shape.size() == 1 && ratios->shape[0] >= 0 &&
      static_cast<size_t>(ratios->shape[0]) != md.scale_ratios[0].size()) {
    return fail("act_scale_ratios has " + std::to_string(ratios->shape[0]) + " entries but scale_ratios rows have " +
                std::to_string(md.scale_ratios[0].size()));
  }
  const IoSpec* sample = md.input("sample");
  if (sample->shape.size() != 4) return fail("io input 'sample' must be 4-D [batch, C, H, W]");
  for (size_t i = 1; i < 4; ++i) {
    if (sample->shape[i] <= 0) return fail("io input 'sample' must have fixed C, H, W");
  }

  if (const json::Value* target = json::Find(r, "target"); target && target->is_object()) {
    if (const json::Value* id = json::Find(*target, "id"); id && id->is_string()) md.target_id = json::AsString(*id);
  }
  md.max_batch = MaxBatchFromProfiles(r);
  *out = std::move(md);
  return Status::Ok();
}

int64_t GroupForTimestep(const std::vector<int64_t>& ts, double t) {
  // ts is descending, so {g : t_g >= t} is a prefix 0..k; its max is the last index with t_g >= t.
  int64_t g = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    if (static_cast<double>(ts[i]) >= t) g = static_cast<int64_t>(i);
    else break;
  }
  return g;  // t > t_0: no g qualifies -> 0
}

}  // namespace quest
