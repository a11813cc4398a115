// quest_selftest: drives the core library from files, for tests/cpp/test_cpp_runtime.py.
// Not installed and not part of the runtime's user interface.
//
//   quest_selftest sha256 FILE...
//   quest_selftest json FILE                       canonical JSON of FILE on stdout
//   quest_selftest timesteps --config CFG.json --steps N
//   quest_selftest ddim --config CFG.json --steps N --eta E --x NOISE.npy --eps EPS.npy [--z Z.npy] --out OUT.npy
//   quest_selftest groups --timesteps 800,500,200 --t 999,800,...
//   quest_selftest png --in X.npy --out FILE.png [--nrow K] [--raw]
//   quest_selftest safetensors FILE --tensor NAME --out X.npy
//   quest_selftest sample-fake --bundle DIR --noise X.npy --classes 1,2 [--steps N --eta E --guidance W --z Z.npy --batch B] --out OUT.npy
//   quest_selftest ort-run --model M.onnx --feeds name=FILE.npy,... --out-dir DIR
//   quest_selftest engine-loads-on BUILT INSTALLED      prints true or false (device.h EngineLoadsOn)
//
// sample-fake runs the real Engine and sampling loop with a deterministic fake model in place of a
// backend (see FakeBackend), so guidance, group selection and scale-ratio feeds are checked without
// ONNX Runtime or TensorRT.
#include <cmath>
#include <cstdio>
#include <string>

#include "args.h"
#include "quest/backend.h"
#include "quest/device.h"
#include "quest/engine.h"
#include "quest/json.h"
#include "quest/manifest.h"
#include "quest/png.h"
#include "quest/safetensors.h"
#include "quest/sampler.h"
#include "quest/scheduler.h"
#include "quest/sha256.h"

namespace quest {
namespace {

Status LoadScheduler(const cli::Args& a, DdimScheduler* s) {
  json::Value cfg;
  QUEST_RETURN_IF_ERROR(json::ParseFile(a.get("--config"), &cfg));
  SchedulerConfig sc;
  QUEST_RETURN_IF_ERROR(SchedulerConfigFromJson(cfg, &sc));
  return DdimScheduler::Create(sc, s);
}

Status CmdSha256(const cli::Args& a) {
  for (const std::string& f : a.positional) {
    std::string hex;
    QUEST_RETURN_IF_ERROR(Sha256File(f, &hex));
    std::printf("%s  %s\n", hex.c_str(), f.c_str());
  }
  return Status::Ok();
}

Status CmdJson(const cli::Args& a) {
  if (a.positional.size() != 1) return InvalidInput("json needs one FILE");
  json::Value v;
  QUEST_RETURN_IF_ERROR(json::ParseFile(a.positional[0], &v));
  std::printf("%s\n", json::Dump(v).c_str());
  return Status::Ok();
}

Status CmdTimesteps(const cli::Args& a) {
  DdimScheduler s;
  QUEST_RETURN_IF_ERROR(LoadScheduler(a, &s));
  int64_t steps = 0;
  QUEST_RETURN_IF_ERROR(cli::ToInt("--steps", a.get("--steps"), &steps));
  QUEST_RETURN_IF_ERROR(s.SetTimesteps(steps));
  std::string line;
  for (int64_t t : s.timesteps()) line += (line.empty() ? "" : ",") + std::to_string(t);
  std::printf("%s\n", line.c_str());
  return Status::Ok();
}

// x_T and per-step model outputs from files -> the trajectory x_{t_1}, ..., x_0 of the DDIM loop,
// stacked as (S, *x.shape) (no final clamp).
Status CmdDdim(const cli::Args& a) {
  DdimScheduler s;
  QUEST_RETURN_IF_ERROR(LoadScheduler(a, &s));
  int64_t steps = 0;
  double eta = 0.0;
  QUEST_RETURN_IF_ERROR(cli::ToInt("--steps", a.get("--steps"), &steps));
  QUEST_RETURN_IF_ERROR(cli::ToDouble("--eta", a.get("--eta", "0"), &eta));
  QUEST_RETURN_IF_ERROR(s.SetTimesteps(steps));
  Tensor x, eps, z;
  QUEST_RETURN_IF_ERROR(ReadNpy(a.get("--x"), &x));
  QUEST_RETURN_IF_ERROR(ReadNpy(a.get("--eps"), &eps));
  const size_t S = s.timesteps().size();
  if (eps.shape.empty() || static_cast<size_t>(eps.shape[0]) != S || eps.data.size() != S * x.data.size()) {
    return InvalidInput("--eps must be (" + std::to_string(S) + ", *x.shape), got " + ShapeString(eps.shape));
  }
  if (eta > 0) {
    QUEST_RETURN_IF_ERROR(ReadNpy(a.get("--z"), &z));
    if (z.data.size() != eps.data.size()) return InvalidInput("--z must have the shape of --eps");
  }
  Tensor trajectory;
  trajectory.shape = eps.shape;
  trajectory.data.reserve(eps.data.size());
  for (size_t i = 0; i < S; ++i) {
    const size_t off = i * x.data.size();
    QUEST_RETURN_IF_ERROR(s.Step(eps.data.data() + off, s.timesteps()[i], x.data.data(), x.data.size(), eta,
                                 eta > 0 ? z.data.data() + off : nullptr, x.data.data()));
    trajectory.data.insert(trajectory.data.end(), x.data.begin(), x.data.end());
  }
  return WriteNpy(a.get("--out"), trajectory);
}

Status CmdGroups(const cli::Args& a) {
  std::vector<int64_t> ts;
  std::vector<double> t;
  if (!a.get("--timesteps").empty()) QUEST_RETURN_IF_ERROR(cli::ToIntList("--timesteps", a.get("--timesteps"), &ts));
  QUEST_RETURN_IF_ERROR(cli::ToDoubleList("--t", a.get("--t"), &t));
  std::string line;
  for (double v : t) line += (line.empty() ? "" : ",") + std::to_string(GroupForTimestep(ts, v));
  std::printf("%s\n", line.c_str());
  return Status::Ok();
}

Status CmdPng(const cli::Args& a) {
  Tensor x;
  QUEST_RETURN_IF_ERROR(ReadNpy(a.get("--in"), &x));
  Image img;
  if (a.flag("--raw")) {  // (H, W, C) values 0..255 written as they are
    if (x.shape.size() != 3) return InvalidInput("--raw needs (H, W, C)");
    img.height = static_cast<int>(x.shape[0]);
    img.width = static_cast<int>(x.shape[1]);
    img.channels = static_cast<int>(x.shape[2]);
    for (float v : x.data) img.pixels.push_back(static_cast<uint8_t>(v));
  } else {
    int64_t nrow = 0;
    QUEST_RETURN_IF_ERROR(cli::ToInt("--nrow", a.get("--nrow", "0"), &nrow));
    QUEST_RETURN_IF_ERROR(MakeGrid(x, static_cast<int>(nrow), 2, &img));
  }
  return WritePng(a.get("--out"), img);
}

Status CmdEngineLoadsOn(const cli::Args& a) {
  if (a.positional.size() != 2) return InvalidInput("engine-loads-on needs BUILT and INSTALLED versions");
  std::printf("%s\n", EngineLoadsOn(a.positional[0], a.positional[1]) ? "true" : "false");
  return Status::Ok();
}

Status CmdSafetensors(const cli::Args& a) {
  if (a.positional.size() != 1) return InvalidInput("safetensors needs one FILE");
  SafetensorsFile f;
  QUEST_RETURN_IF_ERROR(ReadSafetensors(a.positional[0], &f));
  json::Value meta = json::Value::object();
  for (const auto& kv : f.metadata) meta[kv.first] = kv.second;
  std::printf("%s\n", json::Dump(meta).c_str());
  auto it = f.tensors.find(a.get("--tensor"));
  if (it == f.tensors.end()) return InvalidInput("no tensor '" + a.get("--tensor") + "'");
  return WriteNpy(a.get("--out"), it->second);
}

// A deterministic stand-in for a UNet graph, evaluated in float64 per element:
//   noise_pred[b, i] = 0.5 * tanh(sample[b, i]) + 1e-4 * timestep[b] * (graph + 1)
//                      + 0.1 * mean(encoder_hidden_states[b]) + 0.05 * sum(act_scale_ratios)
// where `graph` is the index of the graph file in the manifest's graph list. The test computes the
// same function in numpy.
class FakeBackend : public Backend {
 public:
  FakeBackend(std::vector<std::string> inputs, int graph) : inputs_(std::move(inputs)), graph_(graph) {}
  std::string name() const override { return "fake(graph " + std::to_string(graph_) + ")"; }
  Status Activate() override { return Status::Ok(); }
  void Deactivate() override {}
  std::vector<std::string> InputNames() const override { return inputs_; }
  std::vector<std::string> OutputNames() const override { return {"noise_pred"}; }
  Status Infer(const TensorMap& feeds, TensorMap* outputs) override {
    for (const auto& n : inputs_) {
      if (!feeds.count(n)) return InvalidInput("fake model: input '" + n + "' was not fed");
    }
    if (feeds.size() != inputs_.size()) return InvalidInput("fake model: unexpected extra feed");
    const Tensor& x = feeds.at("sample");
    const Tensor& t = feeds.at("timestep");
    const int64_t b = x.shape[0];
    if (t.shape != std::vector<int64_t>{b}) return InvalidInput("fake model: timestep must be (B,)");
    const size_t per = x.data.size() / b;
    double ratio_sum = 0.0;
    if (feeds.count("act_scale_ratios")) {
      for (float r : feeds.at("act_scale_ratios").data) ratio_sum += r;
    }
    Tensor out(x.shape, std::vector<float>(x.data.size()));
    for (int64_t i = 0; i < b; ++i) {
      double cond_mean = 0.0;
      if (feeds.count("encoder_hidden_states")) {
        const Tensor& e = feeds.at("encoder_hidden_states");
        const size_t pe = e.data.size() / e.shape[0];
        for (size_t k = 0; k < pe; ++k) cond_mean += e.data[i * pe + k];
        cond_mean /= static_cast<double>(pe);
      }
      const double bias = 1e-4 * t.data[i] * (graph_ + 1) + 0.1 * cond_mean + 0.05 * ratio_sum;
      for (size_t k = 0; k < per; ++k) {
        out.data[i * per + k] = static_cast<float>(0.5 * std::tanh(static_cast<double>(x.data[i * per + k])) + bias);
      }
    }
    (*outputs)["noise_pred"] = std::move(out);
    return Status::Ok();
  }

 private:
  std::vector<std::string> inputs_;
  int graph_;
};

Status CmdSampleFake(const cli::Args& a) {
  const std::string bundle = a.get("--bundle");
  Manifest m;
  SamplingMetadata md;
  QUEST_RETURN_IF_ERROR(LoadManifest(bundle, &m));
  QUEST_RETURN_IF_ERROR(ReadSamplingMetadata(m, &md));
  std::vector<std::string> input_names;
  for (const IoSpec& s : md.inputs) input_names.push_back(s.name);
  EngineOptions eo;
  eo.factory = [&](const std::string& graph_file, std::unique_ptr<Backend>* out) {
    int index = -1;
    for (size_t i = 0; i < md.graphs.size(); ++i) {
      if (md.graphs[i].file == graph_file) index = static_cast<int>(i);
    }
    if (index < 0) return InvalidInput("no graph " + graph_file);
    *out = std::make_unique<FakeBackend>(input_names, index);
    return Status::Ok();
  };
  Engine engine(bundle, eo);
  QUEST_RETURN_IF_ERROR(engine.Activate());
  SampleRequest req;
  req.steps = md.sampler.steps;
  req.eta = md.sampler.eta;
  req.guidance_scale = md.sampler.guidance_scale;
  if (a.has("--steps")) QUEST_RETURN_IF_ERROR(cli::ToInt("--steps", a.get("--steps"), &req.steps));
  if (a.has("--eta")) QUEST_RETURN_IF_ERROR(cli::ToDouble("--eta", a.get("--eta"), &req.eta));
  if (a.has("--guidance")) QUEST_RETURN_IF_ERROR(cli::ToDouble("--guidance", a.get("--guidance"), &req.guidance_scale));
  if (a.has("--batch")) QUEST_RETURN_IF_ERROR(cli::ToInt("--batch", a.get("--batch"), &req.max_images_per_call));
  if (a.has("--classes")) QUEST_RETURN_IF_ERROR(cli::ToIntList("--classes", a.get("--classes"), &req.class_rows));
  if (md.conditioning) req.uncond_row = md.conditioning->uncond_index;
  Tensor noise, z;
  QUEST_RETURN_IF_ERROR(ReadNpy(a.get("--noise"), &noise));
  if (req.eta > 0) QUEST_RETURN_IF_ERROR(ReadNpy(a.get("--z"), &z));
  VarianceNoiseFn variance = [&](int64_t step, float* out, size_t n) {
    if ((static_cast<size_t>(step) + 1) * n > z.data.size()) return InvalidInput("--z has too few steps");
    std::copy(z.data.begin() + step * n, z.data.begin() + (step + 1) * n, out);
    return Status::Ok();
  };
  DdimScheduler sched;
  QUEST_RETURN_IF_ERROR(DdimScheduler::Create(md.scheduler, &sched));
  Tensor x0;
  QUEST_RETURN_IF_ERROR(Sample(engine, sched, noise, engine.conditioning(), req, variance, nullptr, &x0));
  std::string groups;
  for (int64_t g : engine.groups_used()) groups += (groups.empty() ? "" : ",") + std::to_string(g);
  std::printf("groups %s\n", groups.c_str());
  return WriteNpy(a.get("--out"), x0);
}

Status CmdOrtRun(const cli::Args& a) {
  BackendOptions bo;
  bo.model_path = a.get("--model");
  std::unique_ptr<Backend> backend;
  QUEST_RETURN_IF_ERROR(CreateBackend("ort", bo, &backend));
  QUEST_RETURN_IF_ERROR(backend->Activate());
  TensorMap feeds;
  std::string spec = a.get("--feeds");
  size_t start = 0;
  while (start < spec.size()) {
    size_t end = spec.find(',', start);
    if (end == std::string::npos) end = spec.size();
    std::string item = spec.substr(start, end - start);
    size_t eq = item.find('=');
    if (eq == std::string::npos) return InvalidInput("--feeds entries are name=file.npy");
    QUEST_RETURN_IF_ERROR(ReadNpy(item.substr(eq + 1), &feeds[item.substr(0, eq)]));
    start = end + 1;
  }
  TensorMap outputs;
  QUEST_RETURN_IF_ERROR(backend->Infer(feeds, &outputs));
  for (const auto& kv : outputs) QUEST_RETURN_IF_ERROR(WriteNpy(JoinPath(a.get("--out-dir"), kv.first + ".npy"), kv.second));
  backend->Deactivate();
  return Status::Ok();
}

}  // namespace
}  // namespace quest

int main(int argc, char** argv) {
  using namespace quest;
  if (argc < 2) {
    std::fprintf(stderr, "usage: quest_selftest COMMAND ... (see the comment at the top of quest_selftest.cpp)\n");
    return 2;
  }
  const std::string cmd = argv[1];
  cli::Args a;
  Status st = cli::ParseArgs(argc, argv, 2,
                             {"--config", "--steps", "--eta", "--x", "--eps", "--z", "--out", "--timesteps", "--t", "--in",
                              "--nrow", "--tensor", "--bundle", "--noise", "--classes", "--guidance", "--batch", "--model",
                              "--feeds", "--out-dir"},
                             {"--raw"}, &a);
  if (st.ok()) {
    if (cmd == "sha256") st = CmdSha256(a);
    else if (cmd == "json") st = CmdJson(a);
    else if (cmd == "timesteps") st = CmdTimesteps(a);
    else if (cmd == "ddim") st = CmdDdim(a);
    else if (cmd == "groups") st = CmdGroups(a);
    else if (cmd == "png") st = CmdPng(a);
    else if (cmd == "safetensors") st = CmdSafetensors(a);
    else if (cmd == "sample-fake") st = CmdSampleFake(a);
    else if (cmd == "ort-run") st = CmdOrtRun(a);
    else if (cmd == "engine-loads-on") st = CmdEngineLoadsOn(a);
    else st = InvalidInput("unknown command '" + cmd + "'");
  }
  if (!st.ok()) {
    std::fprintf(stderr, "quest_selftest %s: error: %s\n", cmd.c_str(), st.message().c_str());
    return st.exit_code();
  }
  return 0;
}
