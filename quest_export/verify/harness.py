"""The verification harness: does the compiled model compute what the fake-quant model computes?

Tiers (deploy.md section 5; thresholds from ``VerifyConfig``):

    H-2 exact        weight-only graph of the whole UNet, and single-layer graphs fed with recorded
                     layer inputs, in ONNX Runtime with optimisations off, against fake-quant:
                     max |err| <= exact_rtol * max(1, std(out))                       (needs torch)
    H-3 statistical  the shipped graph (or engine), one call per recorded real UNet input of every
                     timestep group, against the fake-quant and float references stored at export:
                     cosine >= cosine_min; err(run, float) / err(FQ, float) in [ratio_min, ratio_max];
                     mean|run - FQ| / std <= mean_err_factor * mean|FQ - float| / std
    H-4 end-to-end   the runtime's full sampler against the fake-quant torch sampler from the same
                     noise: PSNR >= psnr_min                                          (needs torch)

When a tier fails, the harness bisects: ONNX Runtime intermediate outputs of every quantized layer
against fake-quant forward hooks on the worst feed, naming the first layer that leaves tolerance.
TensorRT engines are never given extra outputs (that would break their fusions, P-3).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from quest_export_runtime.manifest import write_json_atomic

from quest_export.recipe.config import Recipe, VerifyConfig
from quest_export.verify.metrics import error_stats, psnr

log = logging.getLogger(__name__)
BISECT_REL_L2 = 0.05  # a layer output further than this from fake-quant (relative L2) is "out of tolerance"


@dataclass
class Tier:
    name: str
    passed: bool | None  # None: skipped
    summary: str
    details: dict = field(default_factory=dict)


@dataclass
class VerifyReport:
    artifact: str
    runner: str
    tiers: list[Tier]
    bisect: dict | None = None

    @property
    def passed(self) -> bool:
        return all(t.passed is not False for t in self.tiers)

    def to_dict(self) -> dict:
        return {"artifact": self.artifact, "runner": self.runner, "passed": self.passed,
                "tiers": [asdict(t) for t in self.tiers], "bisect": self.bisect}  # fmt: skip


def _load_reference(root: Path, manifest: dict):
    from quest_export_runtime.verify import load_reference

    return load_reference(root, manifest)


def thresholds(cfg: VerifyConfig) -> dict:
    """The tiers' thresholds as the manifest records them for the device (reference.thresholds)."""
    from quest_export_runtime.verify import THRESHOLD_KEYS

    return {k: getattr(cfg, k) for k in THRESHOLD_KEYS}


def statistical_tier(art, cfg: VerifyConfig, *, backend: str | None = None) -> tuple[Tier, list[np.ndarray], list]:
    """H-3 on the recorded feeds (the device-side code: quest_export_runtime.verify); the tier, outputs, feeds."""
    from quest_export_runtime.verify import statistical

    t, outs, feeds = statistical(art, thresholds(cfg), backend=backend)
    return Tier(t.name, t.passed, t.summary, t.details), outs, feeds


def recorded_e2e_tier(art, cfg: VerifyConfig, *, backend: str | None = None) -> Tier:
    """H-4 against the fake-quant images recorded at export (the device-side code): no torch needed."""
    from quest_export_runtime.verify import end_to_end

    t = end_to_end(art, thresholds(cfg), backend=backend)
    return Tier(t.name, t.passed, t.summary, t.details)


def _torch_reference(quantized: Path, manifest: dict, device: str):
    """The fake-quant model with the export's numerics (merged scales in merged mode)."""
    from quest_export.export.exporter import merge_groups_
    from quest_export.quant.artifact import load_quantized

    art = load_quantized(quantized, device=device)
    if manifest.get("scale_mode") == "merged":
        merge_groups_(art.qunet)
    return art


def exact_tier(art, quantized: Path, cfg: VerifyConfig, *, device: str, max_layers: int = 24) -> Tier:
    """H-2: weight-only full graph and single-layer graphs in ORT (optimisations off) vs fake-quant."""
    import torch

    from quest_export.export.exact import layer_graph_checks, weight_only_check

    ref = _torch_reference(quantized, art.manifest, device)
    feeds, _, _, groups = _load_reference(art.root, art.manifest)
    wo = weight_only_check(ref, art.manifest, feeds[0], groups[0], tol=cfg.exact_rtol)
    layers = layer_graph_checks(ref, art.manifest, feeds[0], groups[0], tol=cfg.exact_rtol, max_layers=max_layers)
    bad = [r for r in layers if not r["pass"]]
    ok = wo["pass"] and not bad
    summary = (f"weight-only graph max err {wo['max_abs']:.2e} (limit {wo['limit']:.2e}); "
               f"{len(layers) - len(bad)}/{len(layers)} single-layer graphs within limit")  # fmt: skip
    if bad:
        summary += f"; first failing layer {bad[0]['layer']}"
    del torch
    return Tier("H-2 exact", ok, summary, {"weight_only": wo, "layers": layers})


def e2e_tier(art, quantized: Path, cfg: VerifyConfig, *, device: str, backend: str | None = None) -> Tier:
    """H-4: the runtime's sampler vs the fake-quant torch sampler, same initial noise and labels."""
    import torch
    from quest_export_runtime.pipeline import RuntimePipeline

    from quest_export.models.sampling import SamplerSpec, sample
    from quest_export.quant.model import QuantMode

    ref = _torch_reference(quantized, art.manifest, device)
    spec = art.manifest["sampler"]
    steps = cfg.e2e_steps or spec["steps"]
    if art.manifest.get("scale_mode") in ("per-group", "scale-input"):
        steps = spec["steps"]  # these graphs serve only the calibrated step count
    n = cfg.e2e_samples
    c, h, w = art.sample_shape
    latents = np.random.default_rng(12345).standard_normal((n, c, h, w)).astype(np.float32)
    labels = None
    cond = ref.model.conditioning
    if cond is not None:
        labels = [cond.cond_rows[k % len(cond.cond_rows)] for k in range(n)]
    pipe = RuntimePipeline.from_artifact(art, backend=backend)
    with pipe:
        run_imgs = pipe(class_labels=labels, num_images=n, latents=latents, steps=steps)
    sspec = SamplerSpec.of({**spec, "steps": steps})
    with ref.qunet.mode(QuantMode.FULL), torch.no_grad():
        fq_imgs = sample(ref.qunet.unet, art.manifest["scheduler_config"], noise=torch.from_numpy(latents).to(device),
                         spec=sspec, cond=None if cond is None else cond.rows(torch.tensor(labels)).to(device),
                         uncond=None if cond is None or cond.uncond is None else cond.uncond.to(device)).cpu().numpy()  # fmt: skip
    p = psnr(run_imgs, fq_imgs)
    ok = p >= cfg.psnr_min
    return Tier("H-4 end-to-end", ok, f"PSNR {p:.2f} dB over {n} images, {steps} steps (limit {cfg.psnr_min} dB)",
                {"psnr": p, "n": n, "steps": steps})  # fmt: skip


def bisect(art, quantized: Path, feed: dict, group: int, *, device: str) -> dict:
    """Name the first quantized layer whose ORT output leaves tolerance against fake-quant on ``feed``."""
    from quest_export.export.exact import layer_outputs_ort, layer_outputs_torch

    ref = _torch_reference(quantized, art.manifest, device)
    graph = art.graph_for(group if art.scale_mode == "per-group" else None)
    extra = art.extra_inputs(group) if art.scale_mode == "scale-input" else {}
    ort_out, order = layer_outputs_ort(graph, {**feed, **extra})
    torch_out = layer_outputs_torch(ref, feed, group)
    for name in order:
        if name not in torch_out or name not in ort_out:
            continue
        st = error_stats(ort_out[name], torch_out[name])
        if st["rel_l2"] > BISECT_REL_L2:
            return {"first_bad_layer": name, "rel_l2": st["rel_l2"], "cosine": st["cosine"], "group": group,
                    "checked_layers": len(order)}  # fmt: skip
    return {"first_bad_layer": None, "checked_layers": len(order), "group": group}


def verify_build(path: str | Path, *, recipe: Recipe | None = None, cfg: VerifyConfig | None = None,
                 quantized: str | Path | None = None, calib: str | Path | None = None, device: str = "cpu",
                 backend: str | None = None, show_progress: bool = True, write: bool = True) -> dict:  # fmt: skip
    """Run every tier that can run here on an export, ORT build or bundle folder; write verify.json beside it.

    Args:
        quantized: the fake-quant artifact the graph came from (None: from the manifest's ``source``), needed by
            H-2, H-4 and bisection; without torch those tiers are skipped with the reason.
    """
    from quest_export_runtime.bundle import open_artifact
    from quest_export_runtime.outputs import check_output

    path = Path(path)
    if write and path.is_dir():  # refused before the tiers run, not after
        check_output(path / "verify.json", "file")
    cfg = cfg or (recipe.verify if recipe else VerifyConfig())
    art = open_artifact(path)
    runner = "tensorrt" if art.backend == "trt" else "onnxruntime (CPU)"
    tiers: list[Tier] = []
    h3, outs, feeds = statistical_tier(art, cfg, backend=backend)
    tiers.append(h3)
    src = quantized or art.manifest.get("source", {}).get("artifact")
    have_torch = importlib.util.find_spec("torch") is not None
    recorded = "e2e" in (art.manifest.get("reference") or {})
    if recorded:  # the fake-quant sampler's images were recorded at export: the device-side comparison
        tiers.append(recorded_e2e_tier(art, cfg, backend=backend))
    if src and have_torch and Path(src).is_dir() and art.backend == "ort":
        tiers.insert(0, exact_tier(art, Path(src), cfg, device=device))
        if not recorded:
            tiers.append(e2e_tier(art, Path(src), cfg, device=device, backend=backend))
    else:
        why = "torch is not installed" if not have_torch else "the fake-quant artifact is not available here"
        if art.backend == "trt":
            why = "TensorRT engines are compared on recorded references only"
        tiers.insert(0, Tier("H-2 exact", None, f"skipped: {why}"))
        if not recorded:
            tiers.append(Tier("H-4 end-to-end", None, f"skipped: {why}"))
    report = VerifyReport(artifact=str(path), runner=runner, tiers=tiers)
    if not report.passed and src and have_torch and Path(src).is_dir() and art.backend == "ort":
        rows = h3.details["steps"]
        worst = min(range(len(rows)), key=lambda i: rows[i]["cosine"])
        report.bisect = bisect(art, Path(src), feeds[worst], rows[worst]["group"], device=device)
    out = report.to_dict()
    if write:
        write_json_atomic(path / "verify.json", out)
    return out


def format_table(report: dict) -> str:
    lines = [f"verify {report['artifact']} ({report['runner']})"]
    for t in report["tiers"]:
        mark = "SKIP" if t["passed"] is None else ("PASS" if t["passed"] else "FAIL")
        lines.append(f"  {mark:4s}  {t['name']:16s}  {t['summary']}")
    if report.get("bisect") and report["bisect"].get("first_bad_layer"):
        b = report["bisect"]
        lines.append(
            f"  first layer out of tolerance: {b['first_bad_layer']} (rel L2 {b['rel_l2']:.3g}, group {b['group']})"
        )
    lines.append("verification " + ("PASSED" if report["passed"] else "FAILED"))
    return "\n".join(lines)


def load_report(path: str | Path) -> dict:
    return json.loads((Path(path) / "verify.json").read_text())
