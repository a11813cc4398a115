"""TensorRT engines built on the device through the TensorRT Python API (deploy.md section 6, J-1, J-5).

``engines_from_bundle`` verifies a bundle, checks the device against its ``BuildPlan`` (``check_device``: TensorRT
version, compute capability, L4T release), loads the keyed timing cache (B-10), builds every graph, audits the
engine's layers (H-5) and writes the engine folder atomically with its manifest. ``engine_from_onnx`` does the
same for one ONNX file. ``tensorrt`` is imported at the first build (B-1); where it is missing,
``quest_export_runtime.device.require_tensorrt`` raises ``TensorRTUnavailableError`` (B-2).
Imports: the standard library and ``quest_export_runtime``; numpy and tensorrt lazily.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from quest_export_runtime.audit import audit_layers
from quest_export_runtime.device import (
    JETPACK_L4T,
    L4T_CORE_PACKAGE,
    TEGRA_RELEASE,
    compute_capability,
    jetpack_matches_l4t,
    l4t_release,
    require_tensorrt,
    trt_matches_target,
)
from quest_export_runtime.errors import (
    ArtifactError,
    ExportError,
    ManifestMismatch,
    TargetError,
)
from quest_export_runtime.manifest import (
    atomic_dir,
    read_manifest,
    sha256_file,
    text_files,
    verify_files,
    write_manifest,
)
from quest_export_runtime.plan import BuildPlan, engine_files
from quest_export_runtime.timing_cache import load_timing_cache, save_timing_cache, timing_cache_key, timing_cache_name

log = logging.getLogger(__name__)


# -- the device (J-5) --------------------------------------------------------------------------


def check_device(plan: BuildPlan, *, trt_version: str, compute_capability: str | None, l4t: str | None) -> None:
    """Refuse to build ``plan`` on a device of another target (J-5, B-13).

    Raises:
        ManifestMismatch: TensorRT version, compute capability or L4T release differ from the plan's.
    """
    fix = f"re-create the bundle for this device's target (`quest-export build --target T`; plan target: {plan.target})"
    if not trt_matches_target(trt_version, plan.trt_version):
        raise ManifestMismatch(
            f"this device has TensorRT {trt_version}, the plan needs TensorRT {plan.trt_version}; {fix}"
        )
    if compute_capability is None:
        raise ManifestMismatch(f"no CUDA GPU found (driver API and nvidia-smi); target '{plan.target}' needs compute "
                               f"capability {', '.join(plan.compute_capabilities)}: check the driver")  # fmt: skip
    if compute_capability not in plan.compute_capabilities:
        raise ManifestMismatch(f"this GPU is SM {compute_capability}, target '{plan.target}' is for SM "
                               f"{', '.join(plan.compute_capabilities)}; {fix}")  # fmt: skip
    if plan.jetpack:
        releases = JETPACK_L4T.get(plan.jetpack, ())
        if l4t is None:
            raise ManifestMismatch(f"target '{plan.target}' is a Jetson on JetPack {plan.jetpack}, but this machine "
                                   f"has no L4T release ({TEGRA_RELEASE}, {L4T_CORE_PACKAGE}); {fix}")  # fmt: skip
        if not jetpack_matches_l4t(plan.jetpack, l4t):
            raise ManifestMismatch(f"this Jetson runs L4T {l4t}, target '{plan.target}' needs JetPack {plan.jetpack} "
                                   f"(L4T {' or '.join(releases)}); {fix}")  # fmt: skip
    elif l4t is not None:
        raise ManifestMismatch(f"this is a Jetson (L4T {l4t}) but target '{plan.target}' is a discrete GPU; {fix}")


# -- building with the TensorRT Python API -------------------------------------------------------


def engine_from_onnx(
    onnx_path: str | os.PathLike,
    plan: BuildPlan,
    *,
    out_dir: str | os.PathLike,
    timing_cache: str | os.PathLike | None = None,
    progress: bool = True,
    allow_experimental: bool = False,
) -> Path:
    """Build one ONNX graph into an engine folder (``stage: build-trt``, docs/formats.md).

    Args:
        onnx_path: the exported graph; a manifest.json beside it (export or bundle) gives the recipe
            fingerprint and io copied into the engine manifest.
        plan: from ``plan_build`` (or a bundle's ``build`` key).
        out_dir: engine folder to write atomically (unet.plan, layers.json, manifest.json).
        timing_cache: cache file to load and update; None = the plan's keyed name beside ``out_dir``.
        progress: show TensorRT's build progress on a terminal (TensorRT >= 10).
        allow_experimental: build although the plan uses unverified cells (deploy.md section 11).

    Returns:
        ``out_dir``.

    Raises:
        TensorRTUnavailableError: ``tensorrt`` cannot be imported.
        ManifestMismatch: the device, or the timing cache, belongs to another target.
        TargetError: experimental cells without ``allow_experimental``, or the build itself failed.
        ExportError: the ONNX parser rejected the graph (every parser error is listed).
    """
    onnx_path = Path(onnx_path)
    source = read_manifest(onnx_path.parent) if (onnx_path.parent / "manifest.json").is_file() else None
    return _build_engines([(onnx_path, None)], plan, out_dir=Path(out_dir), source=source, source_dir=onnx_path.parent,
                          timing_cache=timing_cache, progress=progress, allow_experimental=allow_experimental)  # fmt: skip


def engines_from_bundle(
    bundle_dir: str | os.PathLike,
    *,
    out_dir: str | os.PathLike | None = None,
    timing_cache: str | os.PathLike | None = None,
    progress: bool = True,
    allow_experimental: bool = False,
) -> Path:
    """Verify a bundle (every file hash), then build each of its graphs into one engine folder.

    Args:
        bundle_dir: folder written by ``quest_export.deploy.bundle.bundle_from_export``.
        out_dir: engine folder; None = ``bundle_dir/engine``. Other args as ``engine_from_onnx``.

    Returns:
        The engine folder.

    Raises:
        ArtifactError / ManifestMismatch: the bundle is not a bundle, or a file does not match its hash.
        Others as ``engine_from_onnx``.
    """
    bundle = Path(bundle_dir)
    manifest = read_manifest(bundle, stage="bundle")
    verify_files(bundle, manifest)
    plan = BuildPlan.from_dict(manifest["build"])
    jobs = [(bundle / g["file"], g.get("group")) for g in manifest["graphs"]]
    return _build_engines(jobs, plan, out_dir=Path(out_dir) if out_dir else bundle / "engine", source=manifest,
                          source_dir=bundle, timing_cache=timing_cache, progress=progress,
                          allow_experimental=allow_experimental)  # fmt: skip


# What an engine folder takes over from its bundle so that the runtime samples it alone (docs/formats.md).
CARRIED_KEYS = ("sampler", "scheduler_config", "groups", "scale_mode", "scale_ratios", "conditioning", "text_to_image",
                "precision", "sample_shape")  # fmt: skip


def carry_from_source(tmp: Path, source: dict | None, source_dir: Path) -> dict:
    """Copy the bundle's conditioning table and float text-to-image parts into the engine folder being written
    (``tmp``) and return the manifest keys that go with them (CARRIED_KEYS present in the source)."""
    if not source:
        return {}
    files = text_files(source.get("text_to_image"))
    if source.get("conditioning"):
        files.append(source["conditioning"]["file"])
    for rel in files:
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source_dir / rel, dst)
    return {k: source[k] for k in CARRIED_KEYS if source.get(k) is not None}


def _build_engines(jobs, plan: BuildPlan, *, out_dir: Path, source: dict | None, source_dir: Path, timing_cache,
                   progress: bool, allow_experimental: bool) -> Path:  # fmt: skip
    if plan.experimental and not allow_experimental:
        raise TargetError(f"this build uses experimental cells ({', '.join(plan.experimental)}) not yet verified on "
                          f"TensorRT {plan.trt_version} (deploy.md section 11); pass --allow-experimental to build anyway")  # fmt: skip
    trt = require_tensorrt(attempted="building a TensorRT engine")
    cc = compute_capability()
    check_device(plan, trt_version=trt.__version__, compute_capability=cc, l4t=l4t_release())
    key = timing_cache_key(plan, compute_capability=cc)
    cache_path = Path(timing_cache) if timing_cache else out_dir.parent / timing_cache_name(key)
    cache = load_timing_cache(cache_path, key)
    logger = trt.Logger(trt.Logger.WARNING)
    start = time.perf_counter()
    engines, audits, io = [], {}, (source or {}).get("io")
    with atomic_dir(out_dir) as tmp:
        for onnx_path, group in jobs:
            files = engine_files(group)
            log.info(
                "building %s -> %s (TensorRT %s, %s typing)", onnx_path.name, files.engine, trt.__version__, plan.typing
            )
            serialized, info, quantized, cache, net_io = _build_one(trt, logger, onnx_path, plan, cache, progress)
            (tmp / files.engine).write_bytes(serialized)
            (tmp / files.layers).write_text(json.dumps(info, indent=1) + "\n")
            audits[files.engine] = audit_layers(info, quantized).to_dict()
            engines.append({"file": files.engine, "group": group, "onnx": onnx_path.name, "layers": files.layers})
            io = io or net_io
        carried = carry_from_source(tmp, source, source_dir)
        source_manifest = source_dir / "manifest.json"
        write_manifest(
            tmp,
            stage="build-trt",
            recipe_fingerprint=(source or {}).get("recipe_fingerprint"),
            config=plan.to_dict(),
            inputs={source.get("stage", "source"): sha256_file(source_manifest)} if source else {},
            extra={**carried, "target": plan.target, "trt_version": trt.__version__, "compute_capability": cc,
                   "l4t": l4t_release(), "profiles": plan.profiles, "io": io, "engines": engines,
                   "layers": engines[0]["layers"], "audit": audits, "timing_cache": cache_path.name,
                   "build_seconds": round(time.perf_counter() - start, 2), "peak_rss_mib": _peak_rss_mib()},
        )  # fmt: skip
    save_timing_cache(cache_path, key, cache)
    return out_dir


def _build_one(trt, logger, onnx_path: Path, plan: BuildPlan, cache: bytes, progress: bool):
    """(serialized plan, layer info, quantized layer names, updated timing cache, io) for one graph."""
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, plan))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(" ".join(str(parser.get_error(i)).split()) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT {trt.__version__} cannot parse {onnx_path.name} ({parser.num_errors} error(s)): "
                          f"{errors}; check the graph with `quest-export lint` for target '{plan.target}'")  # fmt: skip
    quantized, io = _quantized_layer_names(trt, network), _network_io(trt, network)
    config = builder.create_builder_config()
    if plan.typing == "weak" and plan.version < (11,):
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.INT8)
        if plan.int4:
            config.set_flag(trt.BuilderFlag.INT4)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_mib << 20)
    if plan.builder_opt_level is not None and hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = plan.builder_opt_level
    if plan.max_aux_streams is not None and hasattr(config, "max_aux_streams"):
        config.max_aux_streams = plan.max_aux_streams
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    _add_profile(builder, network, config, plan)
    if not config.set_timing_cache(config.create_timing_cache(cache), False):  # ignore_mismatch=False (B-10)
        raise ManifestMismatch(f"TensorRT refused the timing cache for {plan.target}; delete it and build again")
    monitor = _progress_monitor(trt) if progress and hasattr(trt, "IProgressMonitor") and sys.stderr.isatty() else None
    if monitor is not None:
        config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise TargetError(f"TensorRT {trt.__version__} could not build {onnx_path.name} (see its log above); on a "
                          "Jetson free memory first (J-2): close GPU processes, lower batch_max or the workspace, "
                          "opt level 2, --maxAuxStreams=0")  # fmt: skip
    cache = bytes(config.get_timing_cache().serialize())
    serialized = bytes(serialized)
    del parser, network, config, builder  # J-1: free the network before the engine is deserialized
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(serialized)
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    return serialized, info, quantized, cache, io


def _network_flags(trt, plan: BuildPlan) -> int:
    if plan.version >= (11,):
        return 0  # strongly typed always; EXPLICIT_BATCH is gone and STRONGLY_TYPED deprecated
    if plan.typing == "strong":
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if plan.version < (10,):
        return 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    return 0  # 10.x: explicit batch is the only mode


def _add_profile(builder, network, config, plan: BuildPlan) -> None:
    dynamic = [network.get_input(i) for i in range(network.num_inputs) if -1 in tuple(network.get_input(i).shape)]
    if not dynamic:
        return
    profile = builder.create_optimization_profile()
    for tensor in dynamic:
        shapes = plan.profiles.get(tensor.name)
        if shapes is None:
            raise ArtifactError(f"graph input '{tensor.name}' is dynamic but the build plan has no profile for it; "
                                "re-create the plan from this graph's io")  # fmt: skip
        profile.set_shape(tensor.name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)


def _quantized_layer_names(trt, network) -> list[str]:
    """Conv/Deconv/MatMul layers fed by a DequantizeLinear: the layers H-5 expects on INT8 kernels."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    producer = {layer.get_output(j).name: layer.type for layer in layers for j in range(layer.num_outputs)}
    compute = {trt.LayerType.CONVOLUTION, trt.LayerType.DECONVOLUTION, trt.LayerType.MATRIX_MULTIPLY}
    names = []
    for layer in layers:
        inputs = [layer.get_input(j) for j in range(layer.num_inputs)]
        if layer.type in compute and any(
            t is not None and producer.get(t.name) == trt.LayerType.DEQUANTIZE for t in inputs
        ):
            names.append(layer.name)
    return names


def _network_io(trt, network) -> dict:
    def spec(t) -> dict:
        import numpy as np

        return {
            "name": t.name,
            "dtype": np.dtype(trt.nptype(t.dtype)).name,
            "shape": [d if d >= 0 else "batch" for d in t.shape],
        }

    return {"inputs": [spec(network.get_input(i)) for i in range(network.num_inputs)],
            "outputs": [spec(network.get_output(i)) for i in range(network.num_outputs)]}  # fmt: skip


def _progress_monitor(trt):
    """An IProgressMonitor (TensorRT >= 10) that redraws one line per build phase on stderr."""

    class _Progress(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._steps: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self._steps[phase_name] = num_steps
            sys.stderr.write(f"\n  {phase_name} 0/{num_steps}")

        def step_complete(self, phase_name, step):
            sys.stderr.write(f"\r  {phase_name} {step + 1}/{self._steps.get(phase_name, '?')}")
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            sys.stderr.write(f"\r  {phase_name} done" + " " * 12)
            sys.stderr.flush()

    return _Progress()


def _peak_rss_mib() -> float | None:
    """Peak resident memory of this process (host side; on a Jetson the pool is shared with the GPU, J-1)."""
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(rss / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)
