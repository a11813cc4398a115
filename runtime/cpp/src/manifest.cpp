#include "quest/manifest.h"

#include <algorithm>
#include <sys/stat.h>

#include "quest/sha256.h"

namespace quest {
namespace {

const char* const kStages[] = {"calibrate", "quantize", "export", "build-ort", "build-trt", "bundle"};

bool IsHex64(const std::string& s) {
  if (s.size() != 64) return false;
  return std::all_of(s.begin(), s.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

// A `files` key must stay inside the folder: relative, no "..", no empty or "." parts.
bool IsSafeRelativePath(const std::string& rel) {
  if (rel.empty() || rel[0] == '/' || rel.find('\\') != std::string::npos) return false;
  size_t start = 0;
  while (start <= rel.size()) {
    size_t end = rel.find('/', start);
    if (end == std::string::npos) end = rel.size();
    std::string part = rel.substr(start, end - start);
    if (part.empty() || part == "." || part == "..") return false;
    start = end + 1;
  }
  return true;
}

bool IsRegularFile(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

Status ReadIoList(const json::Value* list, const char* what, std::vector<IoSpec>* out) {
  if (!list || !list->is_array()) return InvalidInput(std::string("manifest io.") + what + " must be a list");
  for (const json::Value& e : list->as_array()) {
    IoSpec spec;
    const json::Value* name = e.find("name");
    const json::Value* dtype = e.find("dtype");
    const json::Value* shape = e.find("shape");
    if (!name || !name->is_string()) return InvalidInput(std::string("manifest io.") + what + " entry without a name");
    spec.name = name->as_string();
    spec.dtype = dtype && dtype->is_string() ? dtype->as_string() : "";
    if (spec.dtype != "float32") {
      return InvalidInput("manifest io: tensor '" + spec.name + "' has dtype '" + spec.dtype +
                          "'; the C++ runtime feeds and reads float32 only (docs/formats.md)");
    }
    if (!shape || !shape->is_array()) return InvalidInput("manifest io: tensor '" + spec.name + "' has no shape list");
    for (const json::Value& d : shape->as_array()) {
      if (d.is_integer()) {
        spec.shape.push_back(d.as_int());
        spec.dim_names.emplace_back();
      } else if (d.is_string()) {
        spec.shape.push_back(-1);
        spec.dim_names.push_back(d.as_string());
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
  const json::Value* schema = m.root.find("schema");
  if (!schema || !schema->is_integer() || schema->as_int() != kManifestSchema) {
    std::string got = schema ? json::Dump(*schema) : "missing";
    return ManifestMismatch(path + " has manifest schema " + got + "; this runtime reads schema " +
                            std::to_string(kManifestSchema) + ": re-create the artifact or use a matching runtime");
  }
  m.schema = schema->as_int();
  const json::Value* stage = m.root.find("stage");
  if (!stage || !stage->is_string() ||
      std::find(std::begin(kStages), std::end(kStages), stage->as_string()) == std::end(kStages)) {
    return ManifestMismatch(path + ": unknown or missing stage " + (stage ? json::Dump(*stage) : "") +
                            "; expected one of calibrate, quantize, export, build-ort, build-trt, bundle");
  }
  m.stage = stage->as_string();
  if (const json::Value* fp = m.root.find("recipe_fingerprint"); fp && fp->is_string()) m.recipe_fingerprint = fp->as_string();
  const json::Value* files = m.root.find("files");
  if (!files || !files->is_object()) return ManifestMismatch(path + ": 'files' must be an object {path: sha256}");
  for (const auto& kv : files->as_object()) {
    if (!IsSafeRelativePath(kv.first)) {
      return ManifestMismatch(path + ": file entry '" + kv.first + "' is not a relative path inside the folder");
    }
    if (!kv.second.is_string() || !IsHex64(kv.second.as_string())) {
      return ManifestMismatch(path + ": file entry '" + kv.first + "' has no lowercase sha256 hex digest");
    }
    m.files[kv.first] = kv.second.as_string();
  }
  *out = std::move(m);
  return Status::Ok();
}

Status VerifyFiles(const Manifest& m) {
  for (const auto& kv : m.files) {
    const std::string p = JoinPath(m.dir, kv.first);
    if (!IsRegularFile(p)) {
      return ManifestMismatch(m.dir + ": file '" + kv.first + "' listed in the manifest is missing; re-copy the whole folder");
    }
    std::string digest;
    QUEST_RETURN_IF_ERROR(Sha256File(p, &digest));
    if (digest != kv.second) {
      return ManifestMismatch(m.dir + ": file '" + kv.first +
                              "' does not match its manifest hash (tampered or truncated); re-copy the folder or "
                              "re-run the stage that wrote it");
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
  const json::Value* profiles = root.find("profiles");
  if (!profiles) {
    if (const json::Value* build = root.find("build")) profiles = build->find("profiles");
  }
  if (!profiles) return 0;
  const json::Value* sample = profiles->find("sample");
  const json::Value* mx = sample ? sample->find("max") : nullptr;
  if (!mx || !mx->is_array() || mx->as_array().empty() || !mx->as_array()[0].is_integer()) return 0;
  return mx->as_array()[0].as_int();
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
  const json::Value* mode = r.find("scale_mode");
  if (!mode || !mode->is_string()) return fail("'scale_mode' is missing");
  md.scale_mode = mode->as_string();
  if (md.scale_mode != "merged" && md.scale_mode != "per-group" && md.scale_mode != "scale-input") {
    return fail("scale_mode '" + md.scale_mode + "' is unknown; expected merged, per-group or scale-input");
  }
  const json::Value* graphs = r.find("graphs");
  if (!graphs || !graphs->is_array() || graphs->as_array().empty()) return fail("'graphs' must be a non-empty list");
  for (const json::Value& g : graphs->as_array()) {
    GraphEntry e;
    const json::Value* file = g.find("file");
    const json::Value* group = g.find("group");
    if (!file || !file->is_string()) return fail("a 'graphs' entry has no file");
    e.file = file->as_string();
    if (group && !group->is_null()) {
      if (!group->is_integer()) return fail("graph '" + e.file + "' has a non-integer group");
      e.group = group->as_int();
    }
    if (m.files.find(e.file) == m.files.end()) return fail("graph '" + e.file + "' is not listed in 'files'");
    md.graphs.push_back(e);
  }

  // timestep groups
  if (const json::Value* groups = r.find("groups"); groups && !groups->is_null()) {
    const json::Value* ts = groups->find("timesteps");
    const json::Value* count = groups->find("count");
    if (!ts || !ts->is_array()) return fail("'groups.timesteps' must be a list");
    for (const json::Value& t : ts->as_array()) {
      if (!t.is_integer()) return fail("'groups.timesteps' must hold integers");
      md.group_timesteps.push_back(t.as_int());
    }
    for (size_t i = 1; i < md.group_timesteps.size(); ++i) {
      if (md.group_timesteps[i] >= md.group_timesteps[i - 1]) {
        return fail("'groups.timesteps' must be strictly descending (t_0 > t_1 > ...)");
      }
    }
    if (count && (!count->is_integer() || count->as_int() != static_cast<int64_t>(md.group_timesteps.size()))) {
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
    const json::Value* sr = r.find("scale_ratios");
    if (!sr || !sr->is_array() || static_cast<int64_t>(sr->as_array().size()) != G) {
      return fail("scale-input mode needs 'scale_ratios' with one row per group (" + std::to_string(G) + ")");
    }
    for (const json::Value& row : sr->as_array()) {
      if (!row.is_array()) return fail("'scale_ratios' rows must be lists");
      std::vector<float> vals;
      for (const json::Value& x : row.as_array()) {
        if (!x.is_number()) return fail("'scale_ratios' must hold numbers");
        vals.push_back(static_cast<float>(x.as_number()));
      }
      if (!md.scale_ratios.empty() && vals.size() != md.scale_ratios[0].size()) return fail("'scale_ratios' rows differ in length");
      md.scale_ratios.push_back(std::move(vals));
    }
  }

  // sampler and scheduler
  const json::Value* sampler = r.find("sampler");
  if (!sampler || !sampler->is_object()) return fail("'sampler' is missing");
  if (const json::Value* v = sampler->find("sampler"); v && v->is_string()) md.sampler.sampler = v->as_string();
  if (const json::Value* v = sampler->find("steps"); v && v->is_integer()) md.sampler.steps = v->as_int();
  if (const json::Value* v = sampler->find("eta"); v && v->is_number()) md.sampler.eta = v->as_number();
  if (const json::Value* v = sampler->find("guidance_scale"); v && v->is_number()) md.sampler.guidance_scale = v->as_number();
  const json::Value* sched = r.find("scheduler_config");
  if (!sched) return fail("'scheduler_config' is missing");
  QUEST_RETURN_IF_ERROR(SchedulerConfigFromJson(*sched, &md.scheduler).WithContext(where));

  // conditioning
  if (const json::Value* c = r.find("conditioning"); c && !c->is_null()) {
    ConditioningSpec cs;
    const json::Value* file = c->find("file");
    const json::Value* ui = c->find("uncond_index");
    const json::Value* labels = c->find("labels");
    if (!file || !file->is_string()) return fail("'conditioning.file' is missing");
    cs.file = file->as_string();
    if (m.files.find(cs.file) == m.files.end()) return fail("conditioning file '" + cs.file + "' is not listed in 'files'");
    if (ui && ui->is_integer()) cs.uncond_index = ui->as_int();
    if (labels && labels->is_array()) {
      for (const json::Value& l : labels->as_array()) cs.labels.push_back(l.is_string() ? l.as_string() : json::Dump(l));
    }
    md.conditioning = cs;
  }

  // io
  const json::Value* io = r.find("io");
  if (!io || !io->is_object()) return fail("'io' is missing");
  QUEST_RETURN_IF_ERROR(ReadIoList(io->find("inputs"), "inputs", &md.inputs).WithContext(where));
  QUEST_RETURN_IF_ERROR(ReadIoList(io->find("outputs"), "outputs", &md.outputs).WithContext(where));
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

  if (const json::Value* target = r.find("target"); target && target->is_object()) {
    if (const json::Value* id = target->find("id"); id && id->is_string()) md.target_id = id->as_string();
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
