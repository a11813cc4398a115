"""ONNX Runtime "engine" for the cpu target (and gpu-ort): an optimised model plus the session options
the runtime must use, with a fusion audit (deploy.md section 4). Never imports torch.

    out/
      model.opt.onnx            the graph optimised at ``level`` (portable up to EXTENDED, O-6); per-group
                                exports keep their graphs and shared weights file instead (O-7)
      session.json              optimization level, disabled optimizers (O-4), MatMulNBits accuracy (O-5), and
                                ``baked`` when model.opt.onnx was optimised with U8U8 (x86 fused INT8 kernels, issue 17)
      conditioning.safetensors, reference/   copied from the export
      manifest.json             stage build-ort: the export's keys + session + fusion audit
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from quest_export_runtime.manifest import BASE_KEYS, atomic_dir, read_manifest, verify_files, write_manifest
from quest_export_runtime.session import ORT_DISABLED_OPTIMIZERS, ORT_SESSION_CONFIG

from quest_export.errors import ArtifactError, TargetError
from quest_export.recipe.config import TargetProfile

log = logging.getLogger(__name__)
LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
          "all": "ORT_ENABLE_ALL"}  # fmt: skip
DISABLED_OPTIMIZERS = list(ORT_DISABLED_OPTIMIZERS)  # O-4: breaks opset-21 Q/DQ graphs at EXTENDED/ALL
SESSION_CONFIG = dict(ORT_SESSION_CONFIG)  # O-5: exact MatMulNBits


# Issue 17: x86 ONNX Runtime fuses Q/DQ into QLinearConv / QGemm only with U8 activations (S8 is allowed on ARM
# only), and its U8S8 kernels saturate without VNNI (O-8), so the S8S8 sessions of O-8 run the in+out Q/DQ form
# as DQ + float kernels: slower than fp32. U8U8 (``session.x64quantprecision=1`` with QDQS8ToU8Transformer on:
# activations and weights shifted by 128, exact integer products on every CPU) forms the fused kernels. The build
# bakes it into model.opt.onnx, whose fused nodes then run the same under the runtimes' S8S8 settings.
U8U8_BAKE = {"disabled_optimizers": ["QDQPropagationTransformer"], "config": {"session.x64quantprecision": "1"}}
FUSED_KERNELS = ("QLinearConv", "QLinearMatMul", "com.microsoft.QGemm", "com.microsoft.QLinearConv")


def _session_options(ort, level: str, optimized_path: Path | None = None, extra_config: dict | None = None):
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    for k, v in {**SESSION_CONFIG, **(extra_config or {})}.items():
        so.add_session_config_entry(k, v)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
        if LEVELS[level] == "ORT_ENABLE_ALL" and not logging.getLogger("quest_export").isEnabledFor(logging.DEBUG):
            # issue 20, 9: saving the ALL-level graph of the fusion audit makes ORT warn that NCHWc layouts are
            # hardware-specific; that graph is only counted, never shipped, so its warning is hidden (--debug shows it)
            so.log_severity_level = 3
    return so


def _counts(path: Path) -> dict[str, int]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    out: dict[str, int] = {}
    for n in m.graph.node:
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def _external_locations(path: Path) -> set[str]:
    """The external-data files a graph refers to (none for a self-contained one)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {e.value for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
            for e in t.external_data if e.key == "location"}  # fmt: skip


def _drop_unreferenced_data(folder: Path, graph_files: list[str], candidates: set[str]) -> None:
    """Delete the data files in ``candidates`` that no remaining graph refers to (the export's model.onnx.data
    once model.opt.onnx carries its own, a replaced trial's)."""
    used = set()
    for g in graph_files:
        used |= _external_locations(folder / g)
    for name in candidates - used:
        (folder / name).unlink(missing_ok=True)


def optimize_graph(src: Path, dst: Path | None, *, level: str, providers: list[str], bake: dict | None = None
                   ) -> dict[str, int]:  # fmt: skip
    """Let ONNX Runtime optimise ``src`` at ``level``; write the result to ``dst`` (or a temp file) and count ops.
    ``bake``: {"disabled_optimizers", "config"} to optimise with instead of the runtimes' own settings."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as td:
        path = dst or Path(td) / "opt.onnx"
        extra = dict((bake or {}).get("config") or {})
        if _external_locations(src):  # a graph with external data is saved with its own beside it (issue 15)
            extra.update({"session.optimized_model_external_initializers_file_name": path.name + ".data",
                          "session.optimized_model_external_initializers_min_size_in_bytes": "1024"})  # fmt: skip
        so = _session_options(ort, level, path, extra)
        disabled = (bake or {}).get("disabled_optimizers", DISABLED_OPTIMIZERS)
        try:
            ort.InferenceSession(str(src), so, providers=providers, disabled_optimizers=disabled)
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise ArtifactError(
                f"ONNX Runtime cannot load {src.name} at level {level}: {str(e).splitlines()[0]}"
            ) from e
        return _counts(path)


def _fused(counts: dict[str, int]) -> dict[str, int]:
    keys = ("QLinearConv", "QLinearMatMul", "com.microsoft.QGemm", "com.microsoft.MatMulIntegerToFloat",
            "com.microsoft.MatMulNBits", "com.microsoft.QLinearConv", "DequantizeLinear", "QuantizeLinear")  # fmt: skip
    return {k: counts[k] for k in keys if k in counts}


def _bake_u8u8(src: Path, dst: Path, shipped: dict[str, int], *, level: str, providers: list[str]) -> dict | None:
    """Re-optimise ``src`` into ``dst`` with U8U8 when that forms more fused INT8 kernels than the S8S8 graph
    already in ``dst`` (the in+out Q/DQ form on x86); returns its op counts, or None when the S8S8 graph stays
    (input-only Q/DQ graphs; a graph ORT cannot load with U8U8, e.g. per-axis DQ with zero points)."""
    if "x86" not in _machine():
        return None  # ARM fuses S8 activations itself; U8U8 is the x86 fix
    fused = lambda counts: sum(counts.get(k, 0) for k in FUSED_KERNELS)
    trial = dst.with_name(dst.name + ".u8u8")
    try:
        counts = optimize_graph(src, trial, level=level, providers=providers, bake=U8U8_BAKE)
    except ArtifactError as e:
        log.info("U8U8 graph not used: %s", e)
        trial.unlink(missing_ok=True)
        return None
    if fused(counts) <= fused(shipped):
        trial.unlink()
        return None
    trial.replace(dst)
    log.info("baked U8U8 fused kernels into %s: %d fused (S8S8: %d)", dst.name, fused(counts), fused(shipped))
    return counts


def _machine() -> str:
    import platform

    m = platform.machine().lower()
    return "x86" if m in ("x86_64", "amd64", "i686", "x86") else m


def ort_engine_from_export(export_dir: str | Path, *, out: str | Path, target: TargetProfile, level: str = "extended",
                           providers: list[str] | None = None) -> dict:  # fmt: skip
    """Build the ONNX Runtime artifact from an export folder. Returns the fusion audit.

    Raises:
        TargetError: the export was made for another target or a TensorRT target.
        ArtifactError: the export folder fails its manifest check or ORT cannot load a graph.
    """
    export_dir, out = Path(export_dir), Path(out)
    if level not in LEVELS or level == "all":
        raise TargetError(f"ORT level {level!r} cannot be shipped; use disable, basic or extended ('all' writes "
                          "CPU-specific NCHWc kernels and is used for the audit only, deploy.md O-6)")  # fmt: skip
    manifest = read_manifest(export_dir, stage="export")
    verify_files(export_dir, manifest)
    if manifest["target"]["id"] != target.id or target.is_tensorrt:
        raise TargetError(f"{export_dir} was exported for '{manifest['target']['id']}'; the ONNX Runtime builder "
                          f"takes exports for ONNX Runtime targets (got target '{target.id}')")  # fmt: skip
    providers = providers or ["CPUExecutionProvider"]
    graphs = manifest["graphs"]
    per_group = len(graphs) > 1
    audit: dict = {"level": level, "graphs": {}}
    with atomic_dir(out) as tmp:
        for rel in manifest["files"]:
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(export_dir / rel, dst)
        new_graphs = []
        for g in graphs:
            src = tmp / g["file"]
            before = _counts(src)
            if per_group:  # keep the shared weights file: optimised copies would each embed the weights (O-7)
                shipped = optimize_graph(src, None, level=level, providers=providers)
                new_graphs.append(g)
            else:
                dst = tmp / "model.opt.onnx"
                data = _external_locations(src)
                shipped = optimize_graph(src, dst, level=level, providers=providers)
                baked = _bake_u8u8(src, dst, shipped, level=level, providers=providers)
                if baked is not None:
                    shipped, audit["baked"] = baked, U8U8_BAKE
                (tmp / g["file"]).unlink()
                new_graphs.append({**g, "file": dst.name})
                if data:  # the export's data file goes once model.opt.onnx refers to its own
                    data |= {dst.name + ".data", dst.name + ".u8u8.data"}
                    _drop_unreferenced_data(tmp, [dst.name], data)
            full = optimize_graph(tmp / new_graphs[-1]["file"] if not per_group else src, None, level="all",
                                  providers=providers)  # fmt: skip
            audit["graphs"][g["file"]] = {
                "before": _fused(before),
                level: _fused(shipped),
                "all (audit only)": _fused(full),
            }
        session = {"graph_optimization_level": LEVELS[level], "disabled_optimizers": DISABLED_OPTIMIZERS,
                   "config": SESSION_CONFIG, "providers": providers,
                   "optimized": not per_group}  # fmt: skip
        if "baked" in audit:  # how model.opt.onnx was optimised; the runtimes keep the settings above
            session["baked"] = audit["baked"]
        (tmp / "session.json").write_text(json.dumps(session, indent=2) + "\n")
        keep = {k: v for k, v in manifest.items() if k not in BASE_KEYS}
        keep["graphs"] = new_graphs
        if not per_group:
            locs = sorted(_external_locations(tmp / new_graphs[0]["file"]))
            keep["external_data"] = locs[0] if locs else None
        write_manifest(tmp, stage="build-ort", recipe_fingerprint=manifest.get("recipe_fingerprint"),
                       config={"level": level, "providers": providers},
                       inputs={"export": manifest.get("stage_key") or manifest.get("recipe_fingerprint") or ""},
                       extra={**keep, "session": session, "fusion": audit})  # fmt: skip
    return audit
