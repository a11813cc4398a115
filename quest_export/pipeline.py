"""The only module that knows the order of the stages and the rule for reusing finished ones.

    calibrate -> quantize (a registered method: recipe/methods.py, quest_export/methods/) -> export -> build -> verify

Each stage takes its inputs and its own sub-config and writes an artifact folder atomically.
A stage is reused when its cache key matches: the key hashes the stage's sub-configs, the keys
of the stages before it and the quest_export version. Stages are imported lazily, so that
``import quest_export.pipeline`` (the CLI) stays cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from quest_export import __version__, dist
from quest_export.errors import ArtifactError, InputError, Interrupted
from quest_export.recipe.config import Recipe, to_jsonable
from quest_export.recipe.methods import get_method, method_names
from quest_export.recipe.presets import BITS, PAPER_B_EPOCHS
from quest_export.recipe.resolve import build_recipe, fill_method_defaults, merge_layers, parse_set

log = logging.getLogger(__name__)
ALL = ("calibrate", "quantize", "export", "build", "verify")
METHODS = method_names()  # the registered methods (recipe/methods.py), for the CLI's help
BITS_PRESETS = tuple(BITS)


def resolve_recipe(*, model: str | None = None, cond: str | None = None, prompts: str | None = None,
                   bits: str | None = None,
                   preset: str | None = None, method: str | None = None, target: str | None = None,
                   recipe: str | None = None, sets: tuple[str, ...] | list[str] = (), device: str | None = None,
                   guidance: float | None = None) -> Recipe:  # fmt: skip
    """Merge defaults, presets, the target profile, a recipe file and overrides; fill model defaults.

    ``None`` means "not given". Model-dependent defaults (sampler, family, timestep groups) are
    read from the model folder's metadata, without loading weights.
    """
    from quest_export.models.loading import resolve_model

    shortcuts: dict = {}
    if prompts is not None:  # absolute: later stages may run from another folder
        prompts = str(Path(prompts).expanduser().resolve())
    if model is not None or cond is not None or prompts is not None:
        shortcuts["model"] = {k: v for k, v in (("name", model), ("cond", cond), ("prompts", prompts)) if v is not None}
    if method is not None:
        shortcuts["quant"] = {"method": method}
    if device is not None:
        shortcuts["device"] = device
    if guidance is not None:  # --guidance: the CFG weight of calibration, finetuning, verify and sampling
        shortcuts["sampler"] = {"guidance_scale": float(guidance)}
    data = merge_layers(bits=bits, effort=preset, target=target, recipe_file=recipe, shortcuts=shortcuts, sets=sets)
    user = {}  # what the user set explicitly (recipe file and --set), to respect it below
    if recipe is not None:
        from quest_export.recipe.resolve import load_recipe_file

        user = load_recipe_file(recipe)
    for s in sets:
        user = _merge(user, parse_set(s))
    info = resolve_model(data["model"]["name"], cond=data["model"].get("cond"), prompts=data["model"].get("prompts"))
    data["model"]["family"] = data["model"].get("family") or info.family
    for k, v in info.sampling.items():
        if data["sampler"].get(k) is None:
            data["sampler"][k] = v
    q, effort = data["quant"], preset or (data["finetune"] or {}).get("preset") or "fast"
    fill_method_defaults(data, effort=effort)  # G, split shortcut, weight init, AdaRound (recipe/methods.py)
    if q["timestep_groups"] is not None and q["timestep_groups"] > data["sampler"]["steps"]:
        from quest_export.errors import RecipeError

        raise RecipeError(f"quant.timestep_groups={q['timestep_groups']} exceeds sampler.steps={data['sampler']['steps']}; "
                          "every group needs at least one sampler step")  # fmt: skip
    if effort == "paper" and "b_epochs" not in user.get("finetune", {}):
        data["finetune"]["b_epochs"] = PAPER_B_EPOCHS.get(data["model"]["family"], 300)
    return build_recipe(data)


def _merge(a: dict, b: dict) -> dict:
    from quest_export.recipe.resolve import deep_merge

    return deep_merge(a, b)


def _key(*parts) -> str:
    payload = json.dumps([__version__, *[to_jsonable(p) for p in parts]], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def stage_keys(recipe: Recipe, model_hash: str) -> dict[str, str]:
    """Cache keys of every stage; device and verify thresholds are not part of them."""
    calib = _key("calibrate", model_hash, recipe.model, recipe.sampler, recipe.calib)
    method = get_method(recipe.quant.method)
    finetune = recipe.finetune if method.finetune else None
    dmq = [recipe.dmq] if method.uses_dmq_config else []  # absent for the other methods: their keys stay as they were
    quant = _key("quantize", calib, recipe.quant, recipe.ptq, finetune, *dmq)
    export = _key("export", quant, recipe.export, recipe.target)
    build = _key("build", export, recipe.target)
    return {"calibrate": calib, "quantize": quant, "export": export, "build": build}


@dataclass
class StageResult:
    name: str
    path: Path | None
    reused: bool
    seconds: float
    detail: dict = field(default_factory=dict)


@dataclass
class RunSummary:
    recipe: Recipe
    stages: list[StageResult] = field(default_factory=list)
    verify: dict | None = None

    def stage(self, name: str) -> StageResult | None:
        return next((s for s in self.stages if s.name == name), None)


def resolve_device(recipe: Recipe) -> str:
    if recipe.device != "auto":
        if recipe.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise InputError("device=cuda was asked for, but torch sees no CUDA GPU; use --device cpu or auto")
        return recipe.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class _Run:
    """State shared by the stages of one run (paths, keys, the float model once loaded)."""

    def __init__(self, recipe: Recipe, *, work: Path | None, outs: dict[str, Path], force: tuple[str, ...],
                 resume: bool, show_progress: bool) -> None:  # fmt: skip
        from quest_export.models.loading import resolve_model, source_hash
        from quest_export.workdir import WorkDirs

        self.recipe, self.force, self.resume, self.show = recipe, set(force), resume, show_progress
        self.dirs = WorkDirs.resolve(work)
        self.outs = outs  # stage -> folder the user chose (--out) instead of the work folder's default
        self.info = resolve_model(recipe.model.name, cond=recipe.model.cond, prompts=recipe.model.prompts)
        self.keys = stage_keys(recipe, source_hash(self.info))
        self.device = resolve_device(recipe)
        q = recipe.quant
        self.tag = f"{Path(recipe.model.name).name}-{q.method}-{q.name}"
        self.out = outs.get("build") or self.dirs.engines / f"{self.tag}-{recipe.target.id}"
        self.backend: str | None = None  # "trt": the engine must be built here
        self.built_now: set[str] = set()  # stages computed (not reused) in this run
        self.locks = contextlib.ExitStack()  # the output locks of the running stage (_claim), released after it
        self.resume_dir: Path | None = None  # a checkpoint folder an interrupted stage kept for --resume
        self._model = None

    def model(self):
        if self._model is None:
            from quest_export.models import load_model

            self._model = load_model(
                self.recipe.model.name,
                cond=self.recipe.model.cond,
                prompts=self.recipe.model.prompts,
                device=self.device,
            )
        return self._model

    def reusable(self, stage: str, path: Path) -> bool:
        if stage in self.force or "all" in self.force or not (path / "manifest.json").is_file():
            return False
        from quest_export_runtime.manifest import read_manifest, verify_files

        try:
            m = read_manifest(path)
            verify_files(path, m)
        except ArtifactError as e:
            log.warning("not reusing %s: %s", path, e)
            return False
        return m.get("stage_key") == self.keys[stage]


def _stamp(path: Path, key: str) -> None:
    """Record the stage key inside an artifact's manifest (after the atomic write)."""
    from quest_export_runtime.manifest import write_json_atomic

    m = json.loads((path / "manifest.json").read_text())
    m["stage_key"] = key
    write_json_atomic(path / "manifest.json", m)


def run(recipe: Recipe, *, stages: tuple[str, ...] = ALL, out: str | Path | None = None, work: str | Path | None = None,
        force: tuple[str, ...] = (), resume: bool = False, show_progress: bool = True, backend: str | None = None,
        on_stage=None) -> RunSummary:  # fmt: skip
    """Run ``stages`` in order, reusing finished ones. ``on_stage(result)`` is called after each.

    Args:
        out: folder of the last stage's artifact (for ``verify``, the build folder); earlier stages and the
            default go under the work folder.
        work: where stage artifacts go (quest_export.workdir: default $QUEST_EXPORT_WORK, else the current directory).
        backend: None = the target's runtime (a TensorRT target gets a bundle, plus the engine where TensorRT
            and a matching GPU are here); "trt" insists on the engine and fails where it cannot be built.
    """
    from quest_export_runtime.outputs import check_output

    from quest_export.workdir import resolve_work

    needed = _needed(stages)
    last = "build" if needed[-1] == "verify" else needed[-1]
    outs = {last: check_output(out, "dir")} if out else {}  # absolute: artifacts record each other's paths
    check_output(resolve_work(work), "dir")  # the earlier stages (and the default --out) go there
    r = _Run(recipe, work=Path(work) if work else None, outs=outs, force=force, resume=resume,
             show_progress=show_progress)  # fmt: skip
    r.backend = backend
    world = dist.init(r.device)  # a no-op unless torchrun / --nproc launched this process
    r.show = r.show and world.main
    parallel_last = "quantize" if "quantize" in needed else "calibrate"  # the stages every rank runs
    summary = RunSummary(recipe=recipe)
    method = get_method(recipe.quant.method)
    not_built = method.not_built if "quantize" in needed else None
    if "export" in needed:
        not_built = not_built or method.export_not_built(to_jsonable(recipe.dmq), tensorrt=recipe.target.is_tensorrt,
                                                         w_bits=recipe.quant.w_bits)  # fmt: skip
    if not_built:  # refuse before any work is done
        from quest_export.errors import NotBuiltError

        raise NotBuiltError(not_built)
    paths: dict[str, Path] = {}
    for name in ALL:
        if name not in needed:
            continue
        if not dist.world().main and ALL.index(name) > ALL.index(parallel_last):
            break  # rank 0 alone exports, builds and verifies
        t0 = time.time()
        fn = {"calibrate": _calibrate, "quantize": _quantize, "export": _export, "build": _build, "verify": _verify}[
            name
        ]
        try:
            with r.locks:
                path, reused, detail = fn(r, paths)
        except KeyboardInterrupt as e:
            raise _interrupted(r, name, summary, e) from None
        if not reused:
            r.built_now.add(name)
        paths[name] = path
        res = StageResult(name=name, path=path, reused=reused, seconds=round(time.time() - t0, 1), detail=detail)
        summary.stages.append(res)
        if name == "verify":
            summary.verify = detail
        if on_stage is not None and dist.world().main:
            on_stage(res)
        if name == parallel_last:
            dist.finish()
    return summary


def launch(nproc: int, argv: list[str]) -> None:
    """Run the command line ``argv`` (without its --nproc) in ``nproc`` ranks on this host (quest_export.dist)."""
    dist.launch(nproc, dist.strip_nproc(argv))


def is_main_process() -> bool:
    """False on the ranks other than 0 of a distributed run (they neither write nor report)."""
    return dist.world().main


def _interrupted(r: _Run, stage: str, summary: RunSummary, e: KeyboardInterrupt) -> Interrupted:
    """What the user is told when SIGINT/SIGTERM stops a run: what was kept, and how to continue."""
    signum = getattr(e, "signum", signal.SIGINT)
    parts = [f"interrupted by {signal.Signals(signum).name} during {stage}; its unfinished output was removed"]
    kept = [f"{s.name} {s.path}" for s in summary.stages if s.path is not None]
    if kept:
        parts.append(f"kept the finished stages: {', '.join(kept)}")
    if r.resume_dir is not None:
        parts.append(f"kept the {stage} checkpoint {r.resume_dir}: re-run the same command with --resume to continue")
    else:
        parts.append("re-run the same command to continue" + (" (finished stages are reused)" if kept else ""))
    return Interrupted(signum, "; ".join(parts))


def _needed(stages) -> list[str]:
    last = max(ALL.index(s) for s in stages)
    return list(ALL[: last + 1])


# -- stages ------------------------------------------------------------------------------------------


def _claim(r: _Run, stage: str, path: Path) -> None:
    """Lock ``path`` for this stage (another run writing it is refused), then refuse to overwrite a folder that
    holds this stage's artifact of another recipe (a --out chosen twice)."""
    from quest_export_runtime.outputs import output_lock

    if dist.world().main:  # rank 0 writes for every rank
        r.locks.enter_context(output_lock(path))
    if not (path / "manifest.json").is_file() or stage in r.force or "all" in r.force:
        return
    try:
        m = json.loads((path / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return  # unreadable: not reusable, rewritten atomically
    if m.get("stage_key") not in (None, r.keys[stage]):
        raise ArtifactError(f"{path} holds a {stage} artifact of another recipe "
                            f"({str(m.get('recipe_fingerprint', '?'))[:12]}); choose another --out, remove the folder, "
                            f"or pass --force {stage}")  # fmt: skip


def _calibrate(r: _Run, paths):
    from quest_export.calib.collect import collect
    from quest_export.models.sampling import SamplerSpec

    path = r.outs.get("calibrate") or r.dirs.calib_cache / f"{Path(r.recipe.model.name).name}-{r.keys['calibrate']}"
    _claim(r, "calibrate", path)
    if dist.broadcast_object(r.reusable("calibrate", path), "calibration"):  # rank 0 decides for every rank
        return path, True, {}
    s = r.recipe.sampler
    spec = SamplerSpec.of(s)
    world = dist.world()
    cs = collect(r.model(), spec, trajectories=r.recipe.calib.samples_per_group, seed=r.recipe.calib.seed,
                 device=r.device, show_progress=r.show, shard=(world.rank, world.size))  # fmt: skip
    if world.active:  # each rank recorded its trajectories; rank 0 writes them in the one-process order
        from quest_export.calib.collect import merge_shards

        parts = dist.gather_object(cs, "calibration")
        if world.main:
            cs = merge_shards(parts)
    if world.main:
        cs.save(path, fingerprint=r.recipe.fingerprint())
        _stamp(path, r.keys["calibrate"])
    dist.barrier("calibration")
    return path, False, {"rows": int(cs.x.shape[0])}


def _quantize(r: _Run, paths):
    from quest_export.calib.collect import CalibrationSet
    from quest_export.methods import QuantizeJob, load_runner
    from quest_export.quant.artifact import save_quantized, split_run

    rec = r.recipe
    path = r.outs.get("quantize") or r.dirs.quantize / f"{r.tag}-{r.keys['quantize']}"
    _claim(r, "quantize", path)
    if dist.broadcast_object(r.reusable("quantize", path), "quantize"):
        return path, True, {}
    calib = CalibrationSet.load(paths["calibrate"])
    work = path.with_name(path.name + ".work")
    main = dist.world().main
    if main and work.exists() and not r.resume:
        shutil.rmtree(work)
    if main:
        work.mkdir(parents=True, exist_ok=True)
    dist.barrier("quantize")
    try:
        model = r.model()
        runner = load_runner(get_method(rec.quant.method))
        job = QuantizeJob(model=model, calib=calib, recipe=rec, device=r.device, work=work, resume=r.resume,
                          show_progress=r.show)  # fmt: skip
        qunet, report = runner.quantize(job)
        r._model = None  # its UNet is quantized now
        qunet.unet.to("cpu")
        kept, run = split_run(report)  # the run fields go to the manifest's "run": a resumed run's quant.json is equal
        if dist.world().size > 1:
            run["world_size"] = dist.world().size
        dist.barrier("quantize")
        if not main:
            return path, False, report
        save_quantized(qunet, path, recipe_fingerprint=rec.fingerprint(), quant=rec.quant, model_ref=job.model_ref,
                       sampler=to_jsonable(rec.sampler), config=runner.config(rec),
                       extra={"report": kept, "calibration": str(paths["calibrate"])}, run={"report": run},
                       files=_stats_files(job.layer_stats))  # fmt: skip
        _stamp(path, r.keys["quantize"])
    except KeyboardInterrupt:
        if any(p.is_file() for p in work.rglob("*")):
            r.resume_dir = work  # a checkpoint --resume continues from
        else:
            shutil.rmtree(work, ignore_errors=True)  # nothing to resume from: leave nothing behind
        raise
    shutil.rmtree(work, ignore_errors=True)
    return path, False, report


def _stats_files(doc: dict | None) -> dict[str, str]:
    from quest_export.quant.layer_stats import STATS_FILE, dumps

    return {STATS_FILE: dumps(doc)} if doc else {}


def _export(r: _Run, paths):
    from quest_export.calib.collect import CalibrationSet
    from quest_export.export.exporter import onnx_from_artifact

    path = r.outs.get("export") or r.dirs.export / f"{r.tag}-{r.recipe.target.id}-{r.keys['export']}"
    _claim(r, "export", path)
    q = r.recipe.quant
    if r.recipe.export.scale_mode == "merged" and q.timestep_groups > 1 and q.a_bits <= 4:  # issue 20, 8a
        log.warning("A%d with merged activation scales: one scale set for all %d timestep groups costs quality "
                    "(docs/BENCHMARKS.md 2.6); --set export.scale_mode=per-group (or scale-input) keeps them exact",
                    q.a_bits, q.timestep_groups)  # fmt: skip
    if r.reusable("export", path):
        m = json.loads((path / "manifest.json").read_text())
        return path, True, {"precision": m["precision"], "onnx": m["onnx"]}
    calib = CalibrationSet.load(paths["calibrate"])
    res = onnx_from_artifact(paths["quantize"], target=r.recipe.target, cfg=r.recipe.export, out=path, calib=calib,
                             recipe_fingerprint=r.recipe.fingerprint(), scheduler_config=r.info.scheduler_config,
                             verify=r.recipe.verify)  # fmt: skip
    _stamp(path, r.keys["export"])
    return path, False, {"precision": res.manifest["precision"], "onnx": res.manifest["onnx"]}


def _build(r: _Run, paths):
    out = r.out
    _claim(r, "build", out)
    if r.reusable("build", out):
        return out, True, {"kind": json.loads((out / "manifest.json").read_text()).get("stage")}
    target = r.recipe.target
    if target.is_tensorrt:
        from quest_export.deploy.bundle import bundle_from_export
        from quest_export.deploy.plan import plan_build

        exp = json.loads((paths["export"] / "manifest.json").read_text())
        int4 = any(layer["storage"] == "int4-block" for layer in exp.get("layers", []))
        plan = plan_build(target, exp["io"], precision=exp.get("precision"), int4=int4)
        bundle_from_export(paths["export"], out=out, target=target, plan=plan)
        detail = {"kind": "bundle", "engine": _maybe_build_engine(r, out)}
    else:
        from quest_export.deploy.ort import ort_engine_from_export

        rep = ort_engine_from_export(paths["export"], out=out, target=target)
        detail = {"kind": "ort", "fusion": rep}
    _stamp(out, r.keys["build"])
    return out, False, detail


def _maybe_build_engine(r: _Run, bundle: Path) -> str:
    """Build the TensorRT engine in place when TensorRT is here and this GPU matches the profile."""
    import importlib.util

    target = r.recipe.target
    insist = r.backend == "trt"
    if importlib.util.find_spec("tensorrt") is None:
        if insist:
            from quest_export_runtime.device import require_tensorrt

            # raises TensorRTUnavailableError with what to do; the bundle is already written
            require_tensorrt(attempted="building the TensorRT engine")
        return "not built: TensorRT is not installed here; run build.sh (or build_engine.py) on the device"
    from quest_export_runtime.builder import engines_from_bundle
    from quest_export_runtime.device import compute_capability

    cc = compute_capability()
    if cc not in target.compute_capability:
        if insist:
            from quest_export.errors import TargetError

            raise TargetError(f"--backend trt: this GPU is SM {cc} but target '{target.id}' needs "
                              f"{', '.join(target.compute_capability)}; copy {bundle} to the device and run build.sh")  # fmt: skip
        return f"not built: this GPU is SM {cc}, the target needs {', '.join(target.compute_capability)}"
    engines_from_bundle(bundle, out_dir=bundle / "engine")
    return "built in place"


def _verify(r: _Run, paths):
    """Verify the built folder; a passed verify.json of the same build and thresholds is reused."""
    from quest_export_runtime.manifest import write_json_atomic
    from quest_export_runtime.outputs import output_lock

    from quest_export.verify.harness import verify_build

    r.locks.enter_context(output_lock(paths["build"]))
    key = _key("verify", r.keys["build"], r.recipe.verify, r.backend)
    vpath = paths["build"] / "verify.json"
    if not ({"verify", "all"} & r.force) and "build" not in r.built_now and vpath.is_file():
        try:
            old = json.loads(vpath.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("stage_key") == key and old.get("passed") is True:
            return paths["build"], True, old
    report = verify_build(paths["build"], recipe=r.recipe, quantized=paths["quantize"], calib=paths["calibrate"],
                          device=r.device, show_progress=r.show, write=False)  # fmt: skip
    report["stage_key"] = key
    write_json_atomic(vpath, report)
    return paths["build"], False, report


from quest_export.errors import QuestExportError  # noqa: E402  (re-exported for the CLI)
from quest_export.log import set_quiet  # noqa: E402

__all__ = [
    "ALL",
    "BITS_PRESETS",
    "METHODS",
    "Interrupted",
    "QuestExportError",
    "RunSummary",
    "StageResult",
    "resolve_recipe",
    "run",
    "set_quiet",
    "stage_keys",
]


# -- single verbs the CLI calls (each imports its stage lazily) ------------------------------------------


def info(recipe: Recipe) -> dict:
    """The quantizable layers of the recipe's model and the bits the recipe gives each (no weights changed)."""
    from quest_export.models import load_model
    from quest_export.quant.model import plan_quantization

    model = load_model(recipe.model.name, cond=recipe.model.cond, prompts=recipe.model.prompts)
    pts = recipe.dmq.pts_layers if recipe.dmq.pts else ()  # used only by methods that declare PTS
    plan = plan_quantization(model.unet, recipe.quant, groups=recipe.quant.timestep_groups, pts_layers=pts)
    params = sum(p.numel() for p in model.unet.parameters())
    return {"model": model.name, "class": model.info.class_name, "family": model.family, "parameters": params,
            "sample_shape": model.sample_shape, "sampler": model.info.sampling, "plan": plan.to_dict(),
            "conditioning": None if model.conditioning is None else
            {"rows": int(model.conditioning.table.shape[0]), "uncond_index": model.conditioning.uncond_index,
             "source": model.conditioning.source}}  # fmt: skip


def export_artifact(artifact: str | Path, recipe: Recipe, *, out: str | Path) -> dict:
    """Export an existing quantized artifact for ``recipe.target`` (its calibration set gives the references)."""
    from quest_export_runtime.outputs import check_output, output_lock

    from quest_export.calib.collect import CalibrationSet
    from quest_export.export.exporter import onnx_from_artifact
    from quest_export.models.loading import resolve_model

    out = check_output(out, "dir")
    meta = (
        json.loads((Path(artifact) / "quant.json").read_text()) if (Path(artifact) / "quant.json").is_file() else None
    )
    if meta is None:
        raise ArtifactError(
            f"{artifact} is not a quantized-model artifact (no quant.json); run `quest-export quantize`"
        )
    calib_dir = meta.get("calibration")
    if not calib_dir or not Path(calib_dir).is_dir():
        raise ArtifactError(f"{artifact}: its calibration set ({calib_dir}) is gone; re-run `quest-export calibrate` "
                            "with the same recipe")  # fmt: skip
    info_ = resolve_model(meta["model"]["name"], cond=meta["model"].get("cond"), prompts=meta["model"].get("prompts"))
    with output_lock(out):
        res = onnx_from_artifact(artifact, target=recipe.target, cfg=recipe.export, out=out,
                                 calib=CalibrationSet.load(calib_dir), recipe_fingerprint=recipe.fingerprint(),
                                 scheduler_config=info_.scheduler_config, verify=recipe.verify)  # fmt: skip
    return res.manifest


def verify(path: str | Path, recipe: Recipe | None = None, *, quantized: str | None = None, backend: str | None = None,
           device: str = "cpu") -> dict:  # fmt: skip
    from quest_export.verify.harness import verify_build

    return verify_build(path, recipe=recipe, quantized=quantized, backend=backend, device=device)


def verify_device_side(path: str | Path, *, backend: str | None = None, json_path: str | None = None) -> dict:
    """The bundle's own device-side verify (quest_export_runtime.verify) on this host, with torch blocked in this
    process (``import torch`` raises), so it proves the device needs no torch. Returns the report dict."""
    import sys

    from quest_export_runtime.verify import device_verify, write_report

    if sys.modules.get("torch") is not None:
        raise InputError("torch is already imported in this process, so it cannot be blocked; run the device's "
                         f"entry point instead: python -m quest_export_runtime.verify {path}")  # fmt: skip
    sys.modules["torch"] = None  # type: ignore[assignment]  # every `import torch` now raises ImportError
    try:
        report = device_verify(path, backend=backend).to_dict()
    finally:
        del sys.modules["torch"]
    report["torch_blocked"] = True
    if json_path:
        write_report(report, json_path)
    return report


def format_device_verify(report: dict) -> str:
    from quest_export_runtime.verify import format_table

    return format_table(report)


def check_manifest(path: str | Path) -> str:
    """Only the shared manifest check of an artifact folder (``quest-export verify DIR --manifest-only``)."""
    from quest_export_runtime.manifest import Manifest

    m = Manifest.read(path)
    m.check()
    return f"{m.root}: manifest OK (stage {m.stage}, {len(m.files)} files verified)"


def format_verify(report: dict) -> str:
    from quest_export.verify.harness import format_table

    return format_table(report)


def lint(path: str | Path, target: str, *, layers: str | None = None) -> dict:
    from quest_export.export.lint import lint_model
    from quest_export.recipe.targets import load_target

    recs = None
    if layers:
        data = json.loads(Path(layers).read_text())
        recs = data.get("layers") if isinstance(data, dict) else data
    rep = lint_model(path, load_target(target), quantized_layers=recs)
    return {"ok": rep.ok, "text": rep.format_text(), "json": rep.to_dict()}


def check_counts(**counts: int | None) -> None:
    """Refuse a sample count or step count below 1 (None: the default) with one line naming the option."""
    for name, value in counts.items():
        if value is not None and value < 1:
            raise InputError(f"--{name} {value}: must be at least 1")


def sample_float(recipe: Recipe, *, n: int, out: str | Path, seed: int = 0, steps: int | None = None,
                 prompts: list[str] | None = None) -> Path:  # fmt: skip
    """Sample the float model (torch) into a PNG grid; a text pipeline samples ``prompts`` (default: the first n
    calibration prompts) through its text encoder and VAE."""
    from quest_export_runtime.images import save_grid
    from quest_export_runtime.outputs import check_output

    from quest_export.eval import generate
    from quest_export.models import load_model
    from quest_export.models.sampling import SamplerSpec

    check_counts(n=n, steps=steps)
    out = check_output(out, "file")
    spec = SamplerSpec.of(recipe.sampler)
    if steps is not None:
        spec = replace(spec, steps=steps)
    device = resolve_device(recipe)
    model = load_model(recipe.model.name, cond=recipe.model.cond, prompts=recipe.model.prompts, device=device)
    if model.info.text is not None:
        from quest_export.models.text import text_to_image

        labels = model.conditioning.labels[: model.conditioning.uncond_index]
        prompts = prompts or [labels[k % len(labels)] for k in range(n)]
        return save_grid(text_to_image(model, prompts, spec, seed=seed, device=device).numpy(), out)
    if prompts:
        raise InputError(f"--prompt needs a text-to-image pipeline; '{recipe.model.name}' has no text encoder")
    imgs, _ = generate(model.unet, model, spec, n=n, seed=seed, device=device)
    return save_grid(imgs, out, nrow=10 if model.conditioning is not None else None)


def sample_artifact(path: str | Path, *, n: int, out: str | Path, seed: int = 0, backend: str | None = None,
                    steps: int | None = None, labels: list[str] | None = None,
                    prompts: list[str] | None = None) -> Path:  # fmt: skip
    """Sample an export, ORT build, bundle or engine folder with the torch-free runtime into a PNG grid (the code
    the device runs: quest_export_runtime/sample.py); a text-to-image bundle samples ``prompts``."""
    from quest_export_runtime.sample import sample_to_png

    check_counts(n=n, steps=steps)
    return Path(sample_to_png(str(path), str(out), prompts=prompts, labels=labels, n=None if prompts else n,
                              seed=seed, steps=steps, backend=backend))  # fmt: skip


def evaluate(recipe: Recipe, *, n: int, seed: int = 0, quantized: str | None = None, grid: str | None = None,
             guidance: float | None = None, steps: int | None = None, batch: int = 250,
             merge_groups: bool = False, json_path: str | Path | None = None) -> dict:  # fmt: skip
    """FD and class agreement of the float model (or of a quantized artifact) on n samples.

    ``merge_groups`` evaluates the quantized model with one merged scale set (the export's ``merged`` mode).
    """
    from quest_export.eval import evaluate as _evaluate
    from quest_export.eval import is_fmnist
    from quest_export.models import load_model
    from quest_export.models.sampling import SamplerSpec

    check_counts(n=n, steps=steps)
    from quest_export_runtime.outputs import check_output

    if grid:
        grid = check_output(grid, "file")
    if json_path:
        json_path = check_output(json_path, "file")
    device = resolve_device(recipe)
    s = recipe.sampler
    spec = SamplerSpec.of(s)
    spec = replace(spec, **{k: v for k, v in (("guidance_scale", guidance), ("steps", steps)) if v is not None})
    if quantized:
        from quest_export.quant.artifact import load_quantized
        from quest_export.quant.model import QuantMode

        art = load_quantized(quantized, device=device)
        if merge_groups:
            from quest_export.export.exporter import merge_groups_

            merge_groups_(art.qunet)
        model, unet = art.model, art.qunet.unet
        ctx = art.qunet.mode(QuantMode.FULL)
    else:
        import contextlib

        model = load_model(recipe.model.name, cond=recipe.model.cond, prompts=recipe.model.prompts, device=device)
        unet, ctx = model.unet, contextlib.nullcontext()
    if not is_fmnist(model):
        raise InputError(f"eval scores Fashion-MNIST-shaped models (FD and class agreement use the bundled classifier); "
                         f"'{model.name}' is not one")  # fmt: skip
    with ctx:
        rep, imgs = _evaluate(unet, model, spec, n=n, seed=seed, batch=batch, device=device)
    if grid:
        from quest_export_runtime.images import save_grid

        save_grid(imgs[:100], grid, nrow=10)
    out = {**rep.to_dict(), "model": model.name, "quantized": quantized, "device": device, "merged": merge_groups}
    if json_path:
        from quest_export_runtime.manifest import write_json_atomic

        write_json_atomic(json_path, out, allow_nan=False)
    return out


def evaluate_matrix(base: dict, *, bits: list[str], methods: list[str], n: int, seed: int = 0,
                    json_path: str | Path | None = None, work: str | Path | None = None, steps: int | None = None,
                    show_progress: bool = True) -> dict:  # fmt: skip
    """The eval matrix (quest_export.evalmatrix): float + every method x bits row from the same noise; with
    ``json_path`` also written as JSON and CSV (result["files"])."""
    from quest_export.evalmatrix import run_matrix, table_rows, write_tables

    if json_path is not None:  # refuse a bad output before any work
        from quest_export_runtime.outputs import check_output

        check_output(json_path, "file")
    res = run_matrix(base, bits=bits, methods=methods, n=n, seed=seed, work=work, steps=steps,
                     show_progress=show_progress)  # fmt: skip
    if json_path is not None:
        res["files"] = [str(p) for p in write_tables(res, json_path)]
    res["table"] = table_rows(res)
    return res


def build_from_bundle(bundle: str | Path, *, out: str | Path | None = None, allow_experimental: bool = False) -> int:
    """On the device: build the TensorRT engine(s) of a bundle (``quest-export build --from BUNDLE``)."""
    from quest_export_runtime.build_cli import main as trt_main

    argv = (
        [str(bundle)] + (["--out", str(out)] if out else []) + (["--allow-experimental"] if allow_experimental else [])
    )
    return trt_main(argv)


def write_report(path: str | Path, *, out: str | Path | None = None, images: int = 16, seed: int = 0,
                 device: str = "cpu") -> Path:  # fmt: skip
    """report.md, report.html and the figure PNGs of a run dir, export, build or bundle; returns the HTML path."""
    from quest_export.report import write_report as _write

    return _write(path, out=out, images=images, seed=seed, device=device)
