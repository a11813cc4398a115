"""TensorRT engines on the device: the build plan a bundle carries, the Python build path and the layer audit.

A ``BuildPlan`` (made off the device by ``quest_export.build.trt.plan_build``) holds every decision of deploy.md
section 6; a bundle's manifest carries it as its ``build`` key. ``engines_from_bundle`` runs it through the
TensorRT Python API after checking the device (J-5) and the timing cache (B-10); ``audit_layers`` reads the
layer information of the built engine (H-5).

Everything except the two builders runs without TensorRT. ``tensorrt`` is imported lazily, at first
use (B-1); where it is missing, ``require_tensorrt`` raises ``TensorRTUnavailableError`` (B-2).
Imports: the standard library and ``quest_export_runtime``; numpy and tensorrt lazily.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

from quest_export_runtime.errors import (
    ArtifactError,
    ExportError,
    ManifestMismatch,
    QuestExportError,
    TargetError,
    TensorRTUnavailableError,
)
from quest_export_runtime.manifest import atomic_dir, read_manifest, sha256_file, verify_files, write_manifest

log = logging.getLogger(__name__)

# L4T releases of each JetPack a profile names (J-5); a bundle refuses any other release.
JETPACK_L4T = {"5.1": ("35.2", "35.3", "35.4", "35.5", "35.6"), "6.0": ("36.3",), "6.1": ("36.4",),
               "6.2": ("36.4",), "7.0": ("38.2",)}  # fmt: skip
NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")
TEGRA_RELEASE = Path("/etc/nv_tegra_release")


# -- versions ----------------------------------------------------------------------------------


def version_tuple(text: str) -> tuple[int, ...]:
    """Leading numeric parts of a version string: '10.3.0.30-1+cuda12.5' -> (10, 3, 0, 30)."""
    parts = []
    for p in re.split(r"[.]", re.split(r"[^0-9.]", text, maxsplit=1)[0]):
        if not p.isdigit():
            break
        parts.append(int(p))
    return tuple(parts)


def version_matches(found: str, expected: str) -> bool:
    """True when ``found`` is ``expected`` or a patch of it: '10.3.0.30' matches '10.3', not '10.13'."""
    f, e = version_tuple(found), version_tuple(expected)
    return bool(e) and f[: len(e)] == e


# -- the plan a bundle carries ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildPlan:
    """Every decision of one TensorRT build; its JSON form is a bundle manifest's ``build`` key."""

    target: str  # target profile id
    trt_version: str  # TensorRT version of the target (the builder must match it)
    typing: str  # weak (--fp16 --int8, BuilderFlags) | strong (STRONGLY_TYPED; always on 11.x)
    flags: tuple[str, ...]  # trtexec precision/typing flags for this version
    profiles: dict[str, dict[str, list[int]]]  # {input: {"min", "opt", "max"}} for every dynamic input
    workspace_mib: int
    builder_opt_level: int | None  # None on TensorRT 8.5, which has no optimization level
    max_aux_streams: int | None  # None = TensorRT's default (and on 8.5, which has none)
    timing_cache: str  # file name; encodes the key (TRT version, compute capability, JetPack or CUDA)
    compute_capability: str  # the device the timing-cache name is keyed on (the profile's first)
    compute_capabilities: tuple[str, ...]  # every device the target accepts
    jetpack: str | None
    cuda: str | None
    int4: bool = False  # INT4 weight-only GEMM (--int4 in weak mode)
    experimental: tuple[str, ...] = ()  # cells of deploy.md section 11 this build uses

    @property
    def version(self) -> tuple[int, ...]:
        return version_tuple(self.trt_version)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> BuildPlan:
        """Rebuild a plan from a manifest's ``build`` key; raise ArtifactError naming a bad key."""
        names = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - names)
        if unknown:
            raise ArtifactError(f"build plan has unknown keys {unknown}; the bundle was written by a newer "
                                "quest-export: re-create it with this version")  # fmt: skip
        try:
            tuples = {k: tuple(v) for k, v in data.items() if k in ("flags", "compute_capabilities", "experimental")}
            return cls(**{**data, **tuples})
        except TypeError as e:
            raise ArtifactError(f"build plan is incomplete ({e}); re-create the bundle") from None


# -- trtexec -----------------------------------------------------------------------------------


class EngineFiles(NamedTuple):
    engine: str  # unet.plan | unet_gNN.plan
    layers: str  # layers.json | layers_gNN.json  (--exportLayerInfo)
    profile: str  # profile.json | profile_gNN.json  (--exportProfile)


def engine_files(group: int | None) -> EngineFiles:
    """File names of one engine in an engine folder (docs/formats.md); group None = merged graph."""
    sfx = "" if group is None else f"_g{int(group):02d}"
    return EngineFiles(f"unet{sfx}.plan", f"layers{sfx}.json", f"profile{sfx}.json")


# -- timing cache (B-10) -----------------------------------------------------------------------


def timing_cache_key(plan: BuildPlan, *, compute_capability: str | None = None) -> dict:
    """Key of a timing cache: TensorRT version, compute capability, JetPack (or CUDA where none)."""
    cc = plan.compute_capability if compute_capability is None else compute_capability
    return {"trt_version": plan.trt_version, "compute_capability": cc, "jetpack": plan.jetpack, "cuda": plan.cuda}


def timing_cache_name(key: dict) -> str:
    """'timing_trt10.3_sm87_jp6.1.cache': the key, readable in the file name."""
    where = f"jp{key['jetpack']}" if key.get("jetpack") else f"cuda{key.get('cuda') or 'unknown'}"
    return f"timing_trt{key['trt_version']}_sm{str(key['compute_capability']).replace('.', '')}_{where}.cache"


def timing_cache_sidecar(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def load_timing_cache(path: str | os.PathLike, key: dict) -> bytes:
    """Bytes of the cache at ``path`` (b"" where none exists yet), refusing one made under another key.

    Raises:
        ManifestMismatch: the file name or its ``.json`` sidecar names another key, or an existing cache
            has no sidecar.
    """
    path = Path(path)
    expected = timing_cache_name(key)
    if path.name.startswith("timing_trt") and path.name != expected:
        raise ManifestMismatch(f"timing cache {path.name} was made for another TensorRT/GPU/JetPack (this build "
                               f"needs {expected}); pass that file or let the build start a new cache")  # fmt: skip
    if not path.exists():
        return b""
    sidecar = timing_cache_sidecar(path)
    try:
        stored = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        raise ManifestMismatch(f"timing cache {path} has no readable key file {sidecar.name}; delete the cache "
                               "to rebuild it (an unknown cache is never loaded, B-10)") from None  # fmt: skip
    if stored != key:
        raise ManifestMismatch(f"timing cache {path} was made for {stored}, this build is {key}; delete it or "
                               "pass the cache of this device class")  # fmt: skip
    return path.read_bytes()


def save_timing_cache(path: str | os.PathLike, key: dict, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    timing_cache_sidecar(path).write_text(json.dumps(key, sort_keys=True) + "\n")


# -- the device (J-5) --------------------------------------------------------------------------


def l4t_release(path: str | os.PathLike = TEGRA_RELEASE) -> str | None:
    """'36.4.0' from /etc/nv_tegra_release ('# R36 (release), REVISION: 4.0, ...'); None off a Jetson."""
    try:
        first = Path(path).read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    m = re.match(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", first)
    return f"{m.group(1)}.{m.group(2)}" if m else None


def query_compute_capability(device: int = 0) -> str | None:
    """Compute capability of CUDA device ``device`` ('8.7'), through the driver API or nvidia-smi; no torch."""
    try:
        cuda = ctypes.WinDLL("nvcuda.dll") if os.name == "nt" else ctypes.CDLL("libcuda.so.1")
        dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        if cuda.cuInit(0) == 0 and cuda.cuDeviceGet(ctypes.byref(dev), device) == 0:
            # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
            if cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev) == 0:
                if cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev) == 0:
                    return f"{major.value}.{minor.value}"
    except (OSError, AttributeError):
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader", f"--id={device}"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout.strip()  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
        return out if re.fullmatch(r"\d+\.\d+", out) else None
    return None


def check_device(plan: BuildPlan, *, trt_version: str, compute_capability: str | None, l4t: str | None) -> None:
    """Refuse to build ``plan`` on a device of another target (J-5, B-13).

    Raises:
        ManifestMismatch: TensorRT version, compute capability or L4T release differ from the plan's.
    """
    fix = f"re-create the bundle for this device's target (`quest-export build --target T`; plan target: {plan.target})"
    if not version_matches(trt_version, plan.trt_version):
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
                                   f"has no {TEGRA_RELEASE}; {fix}")  # fmt: skip
        if releases and not any(version_matches(l4t, r) for r in releases):
            raise ManifestMismatch(f"this Jetson runs L4T {l4t}, target '{plan.target}' needs JetPack {plan.jetpack} "
                                   f"(L4T {' or '.join(releases)}); {fix}")  # fmt: skip
    elif l4t is not None:
        raise ManifestMismatch(f"this is a Jetson (L4T {l4t}) but target '{plan.target}' is a discrete GPU; {fix}")


# -- layer audit (H-5) -------------------------------------------------------------------------

_COMPUTE = re.compile(r"conv|gemm|matrixmultiply|matmul|fullyconnected|myelin", re.I)
_QUANT_TYPE = re.compile(r"(?<![a-z0-9])(int8|fp8|float8)(?![0-9])", re.I)
_QUANT_TACTIC = re.compile(r"i8i8|imma|int8|fp8|e4m3", re.I)
_UNFUSED_QDQ = re.compile(r"^(scale|quantize|dequantize)$", re.I)


@dataclass(frozen=True)
class LayerFinding:
    """One engine layer the audit flags."""

    name: str
    layer_type: str
    input_types: tuple[str, ...]
    tactic: str
    reason: str


@dataclass(frozen=True)
class AuditReport:
    """H-5: did every quantized Conv/Gemm/MatMul get an INT8 (or FP8) kernel, and is nothing left over?"""

    checked: tuple[str, ...]  # quantized layers expected in the engine
    quantized: tuple[str, ...]  # those that run an INT8/FP8 kernel
    not_int8: tuple[LayerFinding, ...] = ()  # quantized layers on a float kernel
    missing: tuple[str, ...] = ()  # expected layers no engine layer names
    stray: tuple[LayerFinding, ...] = ()  # unfused Q/DQ (Scale) layers and inner reformat layers

    @property
    def ok(self) -> bool:
        return not (self.not_int8 or self.missing or self.stray)

    def summary(self) -> str:
        """One line: '12/12 quantized layers run INT8/FP8 kernels; 1 stray Scale/reformat layers'."""
        parts = [f"{len(self.quantized)}/{len(self.checked)} quantized layers run INT8/FP8 kernels"]
        if self.not_int8:
            parts.append(f"{len(self.not_int8)} on float kernels ({', '.join(f.name for f in self.not_int8[:3])})")
        if self.missing:
            parts.append(f"{len(self.missing)} not found in the engine ({', '.join(self.missing[:3])})")
        if self.stray:
            parts.append(f"{len(self.stray)} stray Scale/reformat layers")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    @classmethod
    def from_dict(cls, d: dict) -> AuditReport:
        def findings(key: str) -> tuple[LayerFinding, ...]:
            return tuple(LayerFinding(**{**f, "input_types": tuple(f["input_types"])}) for f in d.get(key, []))

        return cls(tuple(d["checked"]), tuple(d["quantized"]), findings("not_int8"), tuple(d.get("missing", [])),
                   findings("stray"))  # fmt: skip


def _tokens(text: str) -> list[str]:
    return [t for t in re.split(r"[^A-Za-z0-9_]+", text) if t]


def _names(layer: dict, expected: str) -> bool:
    """Whether the layer's Name or ONNX metadata mentions ``expected`` as a whole run of name tokens."""
    want = _tokens(expected)
    have = _tokens(f"{layer.get('Name', '')} {layer.get('Metadata', '')}")
    return bool(want) and any(have[i : i + len(want)] == want for i in range(len(have) - len(want) + 1))


def _types(layer: dict) -> tuple[str, ...]:
    return tuple(str(t.get("Format/Datatype", "")) for t in layer.get("Inputs", []) if isinstance(t, dict))


def _finding(layer: dict, reason: str) -> LayerFinding:
    return LayerFinding(str(layer.get("Name", "")), str(layer.get("LayerType", "")), _types(layer),
                        str(layer.get("TacticName", "")), reason)  # fmt: skip


def _runs_quantized(layer: dict) -> bool:
    return any(_QUANT_TYPE.search(t) for t in _types(layer)) or bool(
        _QUANT_TACTIC.search(str(layer.get("TacticName", "")))
    )


def audit_layers(layer_info: dict, expected_quantized: list[str]) -> AuditReport:
    """Check an engine's layer information against the layers that should run quantized (H-5).

    Args:
        layer_info: TensorRT's layer-information JSON at DETAILED verbosity (``trtexec --exportLayerInfo``
            or ``IEngineInspector``): {"Layers": [{"Name", "LayerType", "Inputs": [{"Format/Datatype"}],
            "Outputs", "TacticName", "Metadata", ...}], "Bindings": [...]}.
        expected_quantized: ONNX node names (or module names) of the quantized Conv/Gemm/MatMul layers;
            a name matches an engine layer whose name or ONNX metadata contains it as whole tokens.

    Returns:
        An ``AuditReport``: layers on float kernels, layers not found, and stray Scale layers (unfused
        Q/DQ) or reformat layers that do not touch an engine input or output.

    Raises:
        ArtifactError: the layer information was exported without ``--profilingVerbosity=detailed``.
    """
    layers = layer_info.get("Layers", []) if isinstance(layer_info, dict) else layer_info
    if any(not isinstance(layer, dict) for layer in layers):
        raise ArtifactError("layer information holds only names; rebuild with --profilingVerbosity=detailed (B-12)")
    bindings = set(layer_info.get("Bindings", [])) if isinstance(layer_info, dict) else set()
    quantized, not_int8, missing = [], [], []
    for name in expected_quantized:
        hits = [layer for layer in layers if _names(layer, name)]
        compute = [layer for layer in hits if _COMPUTE.search(str(layer.get("LayerType", "")))] or hits
        if not hits:
            missing.append(name)
        elif any(_runs_quantized(layer) for layer in compute):
            quantized.append(name)
        else:
            not_int8.append(_finding(compute[0], f"'{name}' is quantized in the graph but runs a float kernel"))
    stray = []
    for layer in layers:
        kind = str(layer.get("LayerType", ""))
        if _UNFUSED_QDQ.match(kind):
            stray.append(_finding(layer, "unfused Q/DQ runs as its own layer"))
        elif kind.lower() == "reformat":
            io = {t.get("Name") for t in layer.get("Inputs", []) + layer.get("Outputs", []) if isinstance(t, dict)}
            if not io & bindings:
                stray.append(_finding(layer, "reformat copy inside the network"))
    return AuditReport(tuple(expected_quantized), tuple(quantized), tuple(not_int8), tuple(missing), tuple(stray))


# -- building with the TensorRT Python API -------------------------------------------------------


def require_tensorrt():
    """Import ``tensorrt`` (builder + ONNX parser), or raise TensorRTUnavailableError saying how to get it."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:
        raise TensorRTUnavailableError(_unavailable_message(e)) from None
    return trt


def _unavailable_message(err: BaseException) -> str:
    l4t = l4t_release()
    if l4t:
        where = f"Jetson (L4T {l4t})"
        how = "install TensorRT with JetPack (`sudo apt install nvidia-jetpack`, Python bindings `python3-libnvinfer`)"
    else:
        where = "NVIDIA driver found" if NVIDIA_DRIVER.exists() else "no NVIDIA driver found"
        how = "install the `tensorrt` wheel from NVIDIA's package index (TensorRT install guide) or use an NGC TensorRT container"
    found = " ".join(f"{type(err).__name__}: {err}".split())
    return (f"cannot build a TensorRT engine: `import tensorrt` failed ({found}) on Python {platform.python_version()}, "
            f"{platform.system()} {platform.machine()}, {where}; {how}, or run `quest-export build --target T` "
            "off the device to write a bundle whose build.sh needs only trtexec")  # fmt: skip


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
        bundle_dir: folder written by ``quest_export.build.bundle.bundle_from_export``.
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


def _build_engines(jobs, plan: BuildPlan, *, out_dir: Path, source: dict | None, source_dir: Path, timing_cache,
                   progress: bool, allow_experimental: bool) -> Path:  # fmt: skip
    if plan.experimental and not allow_experimental:
        raise TargetError(f"this build uses experimental cells ({', '.join(plan.experimental)}) not yet verified on "
                          f"TensorRT {plan.trt_version} (deploy.md section 11); pass --allow-experimental to build anyway")  # fmt: skip
    trt = require_tensorrt()
    cc = query_compute_capability()
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
        source_manifest = source_dir / "manifest.json"
        write_manifest(
            tmp,
            stage="build-trt",
            recipe_fingerprint=(source or {}).get("recipe_fingerprint"),
            config=plan.to_dict(),
            inputs={source.get("stage", "source"): sha256_file(source_manifest)} if source else {},
            extra={"target": plan.target, "trt_version": trt.__version__, "compute_capability": cc,
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


# -- command line --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """``python -m quest_export_runtime.engine_build BUNDLE_DIR [--out DIR] [--allow-experimental]``: build on the device.

    Returns:
        0 on success; the error's exit code (2: fixable by the user) after printing its one-line message.
    """
    p = argparse.ArgumentParser(prog="python -m quest_export_runtime.engine_build",
                                description="Build the TensorRT engine(s) of a quest-export bundle on this device.")  # fmt: skip
    p.add_argument("bundle", help="bundle folder (manifest.json with stage 'bundle')")
    p.add_argument("--out", default=None, help="engine folder (default: BUNDLE/engine)")
    p.add_argument("--allow-experimental", action="store_true", help="build cells not yet verified on hardware")
    p.add_argument("--timing-cache", default=None, help="timing cache file (default: keyed name beside the engines)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        out = engines_from_bundle(args.bundle, out_dir=args.out, timing_cache=args.timing_cache,
                                  progress=not args.quiet, allow_experimental=args.allow_experimental)  # fmt: skip
        manifest = read_manifest(out, stage="build-trt")
    except QuestExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    for engine in manifest["engines"]:
        report = AuditReport.from_dict(manifest["audit"][engine["file"]])
        print(f"{out / engine['file']}: audit {'ok' if report.ok else 'FAILED'}: {report.summary()}")
    print(f"engine folder: {out} (TensorRT {manifest['trt_version']}, SM {manifest['compute_capability']}, "
          f"{manifest['build_seconds']} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
