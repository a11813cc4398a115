// quest_sample: sample images from a quest-export bundle with the C++ runtime.
//
//   quest_sample BUNDLE_DIR [--n 16] [--seed 0] [--class 3|NAME] [--out grid.png] [--backend ort|trt]
//
// Exit codes: 0 success, 2 an error the user can fix (bad option, manifest mismatch, backend not
// built), 1 an unexpected failure (backend runtime error).
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>

#include "args.h"
#include "quest/backend.h"
#include "quest/build_config.h"
#include "quest/device.h"
#include "quest/engine.h"
#include "quest/png.h"
#include "quest/sampler.h"

namespace {

constexpr uint64_t kVarianceSeedMix = 0x9E3779B97F4A7C15ull;  // separates the eta > 0 noise stream from x_T's

const char* kUsage =
    "usage: quest_sample BUNDLE_DIR [options]\n"
    "  --n N             number of images (default 16)\n"
    "  --seed S          seed of the initial noise (default 0)\n"
    "  --class C         conditioning row index or label name (conditional models; default: cycle\n"
    "                    through every label except the unconditional one)\n"
    "  --out FILE.png    image grid to write (default grid.png)\n"
    "  --backend ort|trt inference backend (default ort)\n"
    "  --engine DIR      trt: engine folder (stage build-trt) built on this device\n"
    "  --steps N         sampling steps (default: the bundle's sampler.steps)\n"
    "  --eta E           DDIM eta (default: the bundle's sampler.eta)\n"
    "  --guidance W      classifier-free guidance scale (default: the bundle's sampler.guidance_scale)\n"
    "  --batch B         images per UNet call (default: all, or what the engine profile allows)\n"
    "  --threads T       ort: intra-op threads (default: ONNX Runtime's choice)\n"
    "  --device D        trt: CUDA device (default 0)\n"
    "  --nrow K          images per grid row (default ceil(sqrt(N)))\n"
    "  --noise FILE.npy  initial noise (N, C, H, W) instead of --seed (reproduces a Python run)\n"
    "  --save-npy FILE   also write the samples (N, C, H, W) in [-1, 1] as .npy\n"
    "  --check           check the folder (schema, paths, every file hash, unlisted engines; an engine folder\n"
    "                    also against this device) and exit\n"
    "  --list-backends   print which backends this build contains and exit\n"
    "  --quiet           no progress output\n";

int Fail(const quest::Status& st) {
  std::fprintf(stderr, "quest_sample: error: %s\n", st.message().c_str());
  return st.exit_code();
}

}  // namespace

int main(int argc, char** argv) {
  using namespace quest;
  cli::Args args;
  Status st = cli::ParseArgs(argc, argv, 1,
                             {"--n", "--seed", "--class", "--out", "--backend", "--engine", "--steps", "--eta", "--guidance",
                              "--batch", "--threads", "--device", "--nrow", "--noise", "--save-npy"},
                             {"--check", "--list-backends", "--quiet", "--help", "-h"}, &args);
  if (!st.ok()) {
    std::fprintf(stderr, "quest_sample: %s\n%s", st.message().c_str(), kUsage);
    return 2;
  }
  if (args.flag("--help")) {
    std::fputs(kUsage, stdout);
    return 0;
  }
  if (args.flag("--list-backends")) {
    std::fputs(DescribeBackends().c_str(), stdout);
    return 0;
  }
  if (args.positional.size() != 1) {
    std::fprintf(stderr, "quest_sample: expected exactly one BUNDLE_DIR\n%s", kUsage);
    return 2;
  }
  const std::string bundle = args.positional[0];
  const bool quiet = args.flag("--quiet");

  if (args.flag("--check")) {  // the shared manifest check (manifest.h, device.h) on any artifact folder
    Manifest m;
    if (!(st = OpenArtifact(bundle, &m)).ok()) return Fail(st);
    if (m.stage == "build-trt") {
      DeviceFacts device;
      int64_t cuda_device = 0;
      if (!(st = cli::ToInt("--device", args.get("--device", "0"), &cuda_device)).ok()) return Fail(st);
      if (!(st = QueryDevice(static_cast<int>(cuda_device), &device)).ok()) return Fail(st);
      if (!(st = CheckEngineDevice(m, device)).ok()) return Fail(st);
      std::printf("%s: OK (stage build-trt, %zu files verified, TensorRT %s, SM %s)\n", bundle.c_str(), m.files.size(),
                  device.trt_version.c_str(), device.compute_capability.c_str());
      return 0;
    }
    if (m.stage != "export" && m.stage != "bundle") {
      std::printf("%s: OK (stage %s, %zu files verified)\n", bundle.c_str(), m.stage.c_str(), m.files.size());
      return 0;
    }
    SamplingMetadata md;
    if (!(st = ReadSamplingMetadata(m, &md)).ok()) return Fail(st);
    std::printf("%s: OK (stage %s, %zu files verified, scale_mode %s, %lld group(s), %s %lld steps, %s)\n", bundle.c_str(),
                m.stage.c_str(), m.files.size(), md.scale_mode.c_str(), static_cast<long long>(md.num_groups()),
                md.sampler.sampler.c_str(), static_cast<long long>(md.sampler.steps),
                md.conditioning ? "conditional" : "unconditional");
    return 0;
  }

  EngineOptions eo;
  eo.backend = args.get("--backend", "ort");
  eo.engine_dir = args.get("--engine");
  if (eo.backend != "ort" && eo.backend != "trt") return Fail(InvalidInput("--backend must be ort or trt, got '" + eo.backend + "'"));
  int64_t n = 16, seed = 0, threads = 0, device = 0, nrow = 0, batch = 0;
  if (!(st = cli::ToInt("--n", args.get("--n", "16"), &n)).ok()) return Fail(st);
  if (!(st = cli::ToInt("--seed", args.get("--seed", "0"), &seed)).ok()) return Fail(st);
  if (!(st = cli::ToInt("--threads", args.get("--threads", "0"), &threads)).ok()) return Fail(st);
  if (!(st = cli::ToInt("--device", args.get("--device", "0"), &device)).ok()) return Fail(st);
  if (!(st = cli::ToInt("--nrow", args.get("--nrow", "0"), &nrow)).ok()) return Fail(st);
  if (!(st = cli::ToInt("--batch", args.get("--batch", "0"), &batch)).ok()) return Fail(st);
  if (n <= 0) return Fail(InvalidInput("--n must be positive"));
  eo.intra_op_threads = static_cast<int>(threads);
  eo.device = static_cast<int>(device);

  // Checks the manifest and every file hash before any model is loaded.
  Engine engine(bundle, eo);
  if (!(st = engine.Activate()).ok()) return Fail(st);
  const SamplingMetadata& md = engine.metadata();

  SampleRequest req;
  req.steps = md.sampler.steps;
  req.eta = md.sampler.eta;
  req.guidance_scale = md.sampler.guidance_scale;
  if (args.has("--steps") && !(st = cli::ToInt("--steps", args.get("--steps"), &req.steps)).ok()) return Fail(st);
  if (args.has("--eta") && !(st = cli::ToDouble("--eta", args.get("--eta"), &req.eta)).ok()) return Fail(st);
  if (args.has("--guidance") && !(st = cli::ToDouble("--guidance", args.get("--guidance"), &req.guidance_scale)).ok()) return Fail(st);

  // initial noise x_T
  const IoSpec* sample_spec = md.input("sample");
  Tensor noise;
  if (args.has("--noise")) {
    if (!(st = ReadNpy(args.get("--noise"), &noise)).ok()) return Fail(st);
    if (noise.shape.size() != 4 || noise.shape[1] != sample_spec->shape[1] || noise.shape[2] != sample_spec->shape[2] ||
        noise.shape[3] != sample_spec->shape[3]) {
      return Fail(InvalidInput("--noise " + args.get("--noise") + " has shape " + ShapeString(noise.shape) + ", expected (N, " +
                               std::to_string(sample_spec->shape[1]) + ", " + std::to_string(sample_spec->shape[2]) + ", " +
                               std::to_string(sample_spec->shape[3]) + ")"));
    }
    if (args.has("--n") && noise.shape[0] != n) return Fail(InvalidInput("--n differs from the number of images in --noise"));
    n = noise.shape[0];
  } else {
    noise = Tensor::Zeros({n, sample_spec->shape[1], sample_spec->shape[2], sample_spec->shape[3]});
    NormalRng rng(static_cast<uint64_t>(seed));
    rng.Fill(noise.data.data(), noise.data.size());
  }

  // conditioning rows
  const Tensor* cond = engine.conditioning();
  if (cond) {
    const ConditioningSpec& cs = *md.conditioning;
    const int64_t rows = cond->shape[0];
    req.uncond_row = cs.uncond_index;
    if (args.has("--class")) {
      const std::string c = args.get("--class");
      int64_t row = -1;
      if (!cli::ToInt("--class", c, &row).ok()) {
        for (size_t i = 0; i < cs.labels.size(); ++i) {
          if (cs.labels[i] == c) row = static_cast<int64_t>(i);
        }
        if (row < 0) return Fail(InvalidInput("--class '" + c + "' is neither a row index nor one of the bundle's labels"));
      }
      if (row < 0 || row >= rows) return Fail(InvalidInput("--class " + c + " is outside [0, " + std::to_string(rows - 1) + "]"));
      req.class_rows.assign(n, row);
    } else {
      for (int64_t i = 0, r = 0; i < n; ++r) {
        if (r % rows == cs.uncond_index && rows > 1) continue;
        req.class_rows.push_back(r % rows);
        ++i;
      }
    }
  } else if (args.has("--class")) {
    return Fail(InvalidInput("this model is unconditional; drop --class"));
  }

  // images per call: --batch, else what the engine profile allows (the UNet sees 2x under guidance)
  const bool guided = cond && req.guidance_scale != 1.0;
  req.max_images_per_call = batch;
  if (batch == 0 && md.max_batch > 0) req.max_images_per_call = guided ? std::max<int64_t>(1, md.max_batch / 2) : md.max_batch;

  NormalRng var_rng(static_cast<uint64_t>(seed) ^ kVarianceSeedMix);
  VarianceNoiseFn variance = [&](int64_t, float* out, size_t count) {
    var_rng.Fill(out, count);
    return Status::Ok();
  };
  const bool tty = isatty(STDERR_FILENO) != 0;
  StepCallback progress = [&](int64_t i, int64_t t) {
    if (quiet || !tty) return;
    std::fprintf(stderr, "\rstep %lld/%lld (t=%lld)   ", static_cast<long long>(i + 1), static_cast<long long>(req.steps),
                 static_cast<long long>(t));
    std::fflush(stderr);
  };

  DdimScheduler sched;
  if (!(st = DdimScheduler::Create(md.scheduler, &sched)).ok()) return Fail(st);
  auto t0 = std::chrono::steady_clock::now();
  Tensor x0;
  if (!(st = Sample(engine, sched, noise, cond, req, variance, progress, &x0)).ok()) return Fail(st);
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!quiet && tty) std::fputc('\n', stderr);

  const std::string out = args.get("--out", "grid.png");
  Image grid;
  if (!(st = MakeGrid(x0, static_cast<int>(nrow), 2, &grid)).ok()) return Fail(st);
  if (!(st = WritePng(out, grid)).ok()) return Fail(st);
  if (args.has("--save-npy") && !(st = WriteNpy(args.get("--save-npy"), x0)).ok()) return Fail(st);
  if (!quiet) {
    std::fprintf(stderr, "wrote %s: %lld images, %lld DDIM steps (eta %g, guidance %g), backend %s, %.2f s\n", out.c_str(),
                 static_cast<long long>(n), static_cast<long long>(req.steps), req.eta, req.guidance_scale, eo.backend.c_str(), secs);
  }
  return 0;
}
