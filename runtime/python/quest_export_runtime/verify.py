"""Device-side verification: the tiers that need no torch, against references recorded at export (issue 14).

    python -m quest_export_runtime.verify BUNDLE [--json FILE] [--backend auto|ort|trt]
    quest-export verify BUNDLE --device-side [--json FILE]     (the same code, torch blocked in-process)

    H-3 statistical  the engine on the recorded UNet inputs of every timestep group (reference/inputs.json) against
                     the fake-quant and float outputs recorded at export: cosine >= cosine_min,
                     err(run, float) / err(FQ, float) in [ratio_min, ratio_max],
                     mean|run - FQ| / std <= mean_err_factor * mean|FQ - float| / std
    H-4 end-to-end   the runtime's sampler from the recorded initial noise and labels (reference/e2e_latents.npy,
                     manifest reference.e2e) against the fake-quant sampler's final images recorded at export
                     (reference/e2e_images.npy): PSNR >= psnr_min

Thresholds are the recipe's (``VerifyConfig``), recorded in the manifest (``reference.thresholds``), so the device
applies what the build host would. The build host's harness (quest_export/verify/harness.py) calls these same
functions for H-3 and H-4: one comparison path. Reference inputs are Polygraphy JSON (``polygraphy`` is imported
lazily; it is pure Python: ``pip install polygraphy``); the e2e references are plain .npy. Written by hand, with
numpy only, because the device has no torch and no quest_export.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from quest_export_runtime.errors import ArtifactError, QuestExportError
from quest_export_runtime.metrics import error_stats, psnr

THRESHOLD_KEYS = ("cosine_min", "ratio_min", "ratio_max", "mean_err_factor", "psnr_min")


@dataclass
class Tier:
    """One tier's verdict (passed None = skipped, with the reason in summary)."""

    name: str
    passed: bool | None
    summary: str
    details: dict = field(default_factory=dict)


@dataclass
class DeviceReport:
    artifact: str
    runner: str
    tiers: list[Tier]
    torch_loaded: bool = False  # proof for the caller: was torch importable / imported while this ran

    @property
    def passed(self) -> bool:
        return all(t.passed is not False for t in self.tiers)

    def first_failure(self) -> str | None:
        """One line naming the first failing tier and its worst step."""
        for t in self.tiers:
            if t.passed is False:
                return f"{t.name} failed: {t.summary}"
        return None

    def to_dict(self) -> dict:
        return {"artifact": self.artifact, "runner": self.runner, "passed": self.passed, "device_side": True,
                "torch_loaded": self.torch_loaded, "tiers": [asdict(t) for t in self.tiers]}  # fmt: skip


def _polygraphy():
    try:
        from polygraphy.comparator import RunResults
        from polygraphy.json import load_json
        from polygraphy.logger import G_LOGGER
    except ImportError:
        raise ArtifactError("the recorded references are Polygraphy JSON; install it: pip install polygraphy") from None
    G_LOGGER.module_severity = G_LOGGER.ERROR
    return RunResults, load_json


def load_reference(root: Path, manifest: dict):
    """(feeds, fake-quant outputs, float outputs, groups) recorded at export."""
    RunResults, load_json = _polygraphy()
    ref = manifest["reference"]
    feeds = load_json(str(root / ref["inputs"]))
    fq = [o["noise_pred"] for o in RunResults.load(str(root / ref["ref_fq"]))[0][1]]
    fl = [o["noise_pred"] for o in RunResults.load(str(root / ref["ref_float"]))[0][1]]
    return feeds, fq, fl, ref["groups"]


def statistical(art, th: dict, *, backend: str | None = None) -> tuple[Tier, list[np.ndarray], list]:
    """H-3 on the recorded feeds; returns the tier, the run's outputs and the feeds."""
    from quest_export_runtime.pipeline import Denoiser

    feeds, fq, fl, groups = load_reference(art.root, art.manifest)
    rows, outs, ok = [], [], True
    with Denoiser(art, backend=backend) as den:
        for feed, ref_q, ref_f, g in zip(feeds, fq, fl, groups):
            out = den(feed["sample"], feed["timestep"], feed.get("encoder_hidden_states"))
            outs.append(out)
            e_run = error_stats(out, ref_q)
            err_fq_fl = float(np.mean(np.abs(ref_q - ref_f)))
            err_run_fl = float(np.mean(np.abs(out - ref_f)))
            std = float(ref_q.std()) or 1.0
            ratio = err_run_fl / err_fq_fl if err_fq_fl > 0 else 1.0
            row = {"group": g, "t": float(feed["timestep"][0]), **{k: round(v, 6) for k, v in e_run.items()},
                   "ratio": round(ratio, 4), "mean_err_over_std": round(e_run["mean_abs"] / std, 6),
                   "fq_float_over_std": round(err_fq_fl / std, 6)}  # fmt: skip
            row["pass"] = bool(e_run["cosine"] >= th["cosine_min"] and th["ratio_min"] <= ratio <= th["ratio_max"]
                               and e_run["mean_abs"] / std <= th["mean_err_factor"] * err_fq_fl / std + 1e-6)  # fmt: skip
            ok &= row["pass"]
            rows.append(row)
    worst = min(range(len(rows)), key=lambda i: rows[i]["cosine"])
    w = rows[worst]
    summary = (f"{sum(r['pass'] for r in rows)}/{len(rows)} steps pass; worst cosine {w['cosine']:.5f} "
               f"(step {worst}, t={w['t']:g}, group {w['group']}; limit {th['cosine_min']}), ratio range "
               f"{min(r['ratio'] for r in rows):.3f}-{max(r['ratio'] for r in rows):.3f}")  # fmt: skip
    thresholds = {k: th[k] for k in ("cosine_min", "ratio_min", "ratio_max", "mean_err_factor")}
    return Tier("H-3 statistical", ok, summary, {"steps": rows, "thresholds": thresholds}), outs, feeds


def end_to_end(art, th: dict, *, backend: str | None = None) -> Tier:
    """H-4 against the fake-quant sampler's final images recorded at export (same noise, labels, steps)."""
    from quest_export_runtime.pipeline import RuntimePipeline

    e2e = art.manifest["reference"]["e2e"]
    latents = np.load(art.root / e2e["latents"], allow_pickle=False)
    want = np.load(art.root / e2e["images"], allow_pickle=False).astype(np.float32)
    with RuntimePipeline.from_artifact(art, backend=backend) as pipe:
        got = pipe(class_labels=e2e["labels"], num_images=len(latents), latents=latents, steps=e2e["steps"])
    p = psnr(got, want)
    per_image = [round(psnr(a[None], b[None]), 2) for a, b in zip(got, want)]
    worst = int(np.argmin(per_image))
    ok = bool(p >= th["psnr_min"])
    summary = (f"PSNR {p:.2f} dB over {len(latents)} images, {e2e['steps']} steps (limit {th['psnr_min']} dB); "
               f"worst image {worst}: {per_image[worst]:.2f} dB")  # fmt: skip
    return Tier("H-4 end-to-end", ok, summary, {"psnr": p, "per_image": per_image, "n": len(latents),
                                                "steps": e2e["steps"], "threshold": th["psnr_min"]})  # fmt: skip


def device_verify(path, *, backend: str | None = None) -> DeviceReport:
    """Every tier that runs without torch, on an export, ORT build or bundle folder."""
    from quest_export_runtime.bundle import open_artifact

    art = open_artifact(path)
    ref = art.manifest.get("reference") or {}
    th = ref.get("thresholds")
    runner = "tensorrt" if art.backend == "trt" else "onnxruntime"
    redo = "re-export it with this version (quest-export build) so it records them"
    if th is None or any(k not in th for k in THRESHOLD_KEYS):
        tiers = [Tier("H-3 statistical", None, f"skipped: the manifest records no verify thresholds; {redo}"),
                 Tier("H-4 end-to-end", None, f"skipped: no recorded thresholds; {redo}")]  # fmt: skip
    else:
        tiers = [statistical(art, th, backend=backend)[0]]
        if "e2e" in ref:
            tiers.append(end_to_end(art, th, backend=backend))
        else:
            tiers.append(Tier("H-4 end-to-end", None, f"skipped: no recorded end-to-end references; {redo}"))
    tiers.insert(0, Tier("H-2 layers", None, "not recorded: device-side layer references are not built yet"))
    return DeviceReport(
        artifact=str(path), runner=runner, tiers=tiers, torch_loaded=sys.modules.get("torch") is not None
    )


def format_table(report: dict) -> str:
    lines = [f"verify {report['artifact']} ({report['runner']}, device-side)"]
    for t in report["tiers"]:
        mark = "SKIP" if t["passed"] is None else ("PASS" if t["passed"] else "FAIL")
        lines.append(f"  {mark:4s}  {t['name']:16s}  {t['summary']}")
    lines.append("verification " + ("PASSED" if report["passed"] else "FAILED"))
    return "\n".join(lines)


def write_report(report: dict, path: str | Path) -> None:
    from quest_export_runtime.manifest import write_json_atomic

    write_json_atomic(Path(path), report)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m quest_export_runtime.verify", description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--json", dest="json_path", default=None, help="also write the report here")
    p.add_argument("--backend", default=None, choices=("auto", "ort", "trt"))
    args = p.parse_args(argv)
    try:
        report = device_verify(args.bundle, backend=args.backend).to_dict()
    except QuestExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.json_path:
        write_report(report, args.json_path)
    if not report["passed"]:
        first = next(t for t in report["tiers"] if t["passed"] is False)
        print(f"error: {first['name']} failed: {first['summary']}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
