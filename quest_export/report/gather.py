"""What a report shows, read from the folders the stages wrote: no torch, nothing re-run.

A quantize run dir holds layer_stats.json itself; an export, ORT build or bundle names its quantize run dir in
its manifest (``source.artifact``), and the report follows that link when the folder is still there.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from quest_export_runtime.manifest import read_manifest

STATS_FILE = "layer_stats.json"  # quest_export.quant.layer_stats.STATS_FILE (that module imports torch)
GRAPH_SUFFIXES = (".onnx",)
ENGINE_SUFFIXES = (".plan", ".engine", ".trt")


@dataclass
class ReportData:
    path: Path
    manifest: dict
    run_dir: Path | None  # the quantize run dir (the folder itself, or the one its manifest names), if present
    run_dir_note: str  # why there is none, when run_dir is None
    stats: dict | None  # layer_stats.json of the run dir
    verify: dict | None  # verify.json of the folder
    files: list[dict] = field(default_factory=list)  # graphs and engines: {name, bytes, kind}
    latency: list[dict] = field(default_factory=list)  # {file, batch, ms, runs, provider} measured here

    @property
    def stage(self) -> str:
        return str(self.manifest.get("stage"))


def _run_dir(path: Path, manifest: dict) -> tuple[Path | None, str]:
    if (path / "quant.json").is_file():
        return path, ""
    src = (manifest.get("source") or {}).get("artifact")
    if not src:
        return None, "the manifest names no quantize run dir"
    if not (Path(src) / "quant.json").is_file():
        return None, f"its quantize run dir {src} is not on this machine"
    return Path(src), ""


def _sizes(path: Path) -> list[dict]:
    out = []
    for p in sorted(path.rglob("*")):
        if p.is_file() and p.suffix in GRAPH_SUFFIXES + ENGINE_SUFFIXES:
            kind = "TensorRT engine" if p.suffix in ENGINE_SUFFIXES else "ONNX graph"
            out.append({"name": p.relative_to(path).as_posix(), "bytes": p.stat().st_size, "kind": kind})
    weights = [p for p in path.glob("*.safetensors") if p.name != "conditioning.safetensors"]
    out += [{"name": p.name, "bytes": p.stat().st_size, "kind": "fake-quant state"} for p in weights]
    return out


def _io_feed(io: dict, batch: int):
    import numpy as np

    rng = np.random.default_rng(0)
    feed = {}
    for t in io.get("inputs", []):
        shape = [batch if not isinstance(d, int) else d for d in t["shape"]]
        if t["name"] == "timestep":
            feed[t["name"]] = np.full(shape, 500, dtype=t["dtype"])
        else:
            feed[t["name"]] = rng.standard_normal(shape).astype(t["dtype"])
    return feed


def measure_latency(path: Path, manifest: dict, *, runs: int = 10, batch: int = 1) -> list[dict]:
    """Median latency of one UNet call of every ONNX graph the folder runs with ONNX Runtime (CPU) here."""
    import importlib.util

    io = manifest.get("io")
    if not io or importlib.util.find_spec("onnxruntime") is None or manifest.get("stage") == "bundle":
        return []  # a bundle's graph is for TensorRT on the device: its latency is measured there (trtexec)
    from quest_export_runtime.session import OnnxRuntimeRunner

    graphs = [g["file"] for g in manifest.get("graphs", [])] or [p.name for p in path.glob("*.onnx")]
    level = (manifest.get("session") or {}).get("graph_optimization_level")
    out = []
    for name in graphs[:1]:  # per-group graphs share one architecture: the first stands for all
        feed = _io_feed(io, batch)
        with OnnxRuntimeRunner(path / name, providers=["CPUExecutionProvider"], graph_optimization_level=level) as r:
            r.infer(feed)  # warm-up
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                r.infer(feed)
                times.append(1000 * (time.perf_counter() - t0))
        out.append({"file": name, "batch": batch, "ms": round(statistics.median(times), 3), "runs": runs,
                    "provider": "ONNX Runtime CPU (default threads)"})  # fmt: skip
    return out


def gather(path: str | Path, *, latency: bool = True) -> ReportData:
    path = Path(path)
    manifest = read_manifest(path)
    run_dir, note = _run_dir(path, manifest)
    stats = None
    if run_dir is not None and (run_dir / STATS_FILE).is_file():
        stats = json.loads((run_dir / STATS_FILE).read_text())
    elif run_dir is not None:
        note = (
            f"{run_dir} has no {STATS_FILE} (quantized before the report recorded it: re-run quantize --force quantize)"
        )
    vpath = path / "verify.json"
    verify = json.loads(vpath.read_text()) if vpath.is_file() else None
    data = ReportData(path=path, manifest=manifest, run_dir=run_dir, run_dir_note=note, stats=stats, verify=verify,
                      files=_sizes(path))  # fmt: skip
    if latency:
        data.latency = measure_latency(path, manifest)
    return data
