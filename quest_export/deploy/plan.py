"""TensorRT build plans (the host side of a TensorRT build, deploy.md section 6).

``plan_build`` holds every decision of section 6 for one (target, exported graph): typing and precision flags
per TensorRT version (B-7), optimization profiles over the batch (B-9), timing-cache key (B-10), workspace,
optimization level and aux streams (B-11), and the experimental cells of section 11. ``trtexec`` renders a
plan as a command line; the builder, the timing cache, the device checks and the layer audit run on the
device (``quest_export_runtime``: ``builder``, ``timing_cache``, ``audit``).
Imports: the standard library, ``quest_export.recipe`` and ``quest_export_runtime``; never tensorrt.
"""

from __future__ import annotations

from quest_export_runtime.errors import ArtifactError, InputError, TargetError
from quest_export_runtime.plan import BuildPlan
from quest_export_runtime.timing_cache import timing_cache_name

from quest_export.recipe.config import TargetProfile
from quest_export.recipe.targets import trt_version_tuple

BATCH_OPT = 2  # classifier-free guidance doubles one image into a UNet batch of 2 (B-9)
OPT_LEVELS = range(0, 6)  # --builderOptimizationLevel 0..5 (B-11)


def plan_build(
    profile: TargetProfile,
    onnx_io: dict,
    *,
    batch_max: int | None = None,
    opt_level: int | None = None,
    workspace_mib: int | None = None,
    int4: bool = False,
    strongly_typed: bool | None = None,
    precision: dict | None = None,
    compute_capability: str | None = None,
) -> BuildPlan:
    """Decide how TensorRT builds an exported UNet for a target (deploy.md section 6).

    Args:
        profile: a TensorRT target profile (``quest_export/data/targets/<id>.toml``).
        onnx_io: the export manifest's ``io`` ({"inputs": [{"name", "dtype", "shape"}], "outputs": [...]}):
            a string first dim is the dynamic batch; every other dim must be a number.
        batch_max: images per call; the UNet batch goes up to twice this (guidance). None = profile.max_batch.
        opt_level: builder optimization level 0-5; None = the profile's (TensorRT 8.5 has none).
        workspace_mib: workspace memory pool in MiB; None = the profile's.
        int4: INT4 weight-only GEMM weights are in the graph (TensorRT >= 10).
        strongly_typed: None = the version's default (weak up to 10.11 unless the profile says strong,
            strong from 10.12); True asks for strong typing (10.x only), False for weak (up to 10.x).
        precision: the export manifest's ``precision`` ({"w_bits", "a_bits", "mode"}), for the
            experimental cells (A4 container, FP8, NVFP4); None = W8A8.
        compute_capability: device the timing-cache name is keyed on; None = the profile's first.

    Returns:
        A frozen ``BuildPlan``.

    Raises:
        TargetError: the target is not TensorRT, or cannot do what is asked (typing, INT4, FP8, level).
        ArtifactError: ``onnx_io`` has no usable ``sample`` input or a symbolic non-batch dim.
        InputError: a numeric option is out of range.
    """
    if not profile.is_tensorrt:
        raise TargetError(f"target '{profile.id}' runs {profile.runtime}, not TensorRT; build it with "
                          "quest_export.deploy.ort or choose a TensorRT target")  # fmt: skip
    v = trt_version_tuple(profile)
    if v < (8, 5) or v[0] == 9 or v[0] > 11:
        raise TargetError(f"target '{profile.id}' names TensorRT {profile.trt_version}; quest-export builds with "
                          "TensorRT 8.5, 8.6, 10.x or 11.x: fix trt_version in the profile")  # fmt: skip
    typing, strong_opt_in = _choose_typing(profile, v, strongly_typed)
    if int4 and (v < (10,) or "int4-gemm" not in profile.quantized_types):
        raise TargetError(f"target '{profile.id}' (TensorRT {profile.trt_version}) has no INT4 weights; "
                          "export with export.int4_gemm=false (W4 stays exact in an INT8 container)")  # fmt: skip
    batch_max = profile.max_batch if batch_max is None else batch_max
    if batch_max < 1:
        raise InputError(f"batch_max={batch_max} must be >= 1 (images per call)")
    workspace_mib = profile.workspace_mib if workspace_mib is None else workspace_mib
    if workspace_mib < 1:
        raise InputError(f"workspace_mib={workspace_mib} must be >= 1")
    if v < (8, 6):
        if opt_level is not None:
            raise TargetError(f"TensorRT {profile.trt_version} has no builder optimization level "
                              "(added in 8.6); leave opt_level unset for this target")  # fmt: skip
        level, aux = None, None
    else:
        level = profile.builder_opt_level if opt_level is None else opt_level
        aux = profile.max_aux_streams
        if level not in OPT_LEVELS:
            raise InputError(f"opt_level={level} is out of range; TensorRT accepts 0..5 (3 is its default)")
    if not profile.compute_capability:
        raise TargetError(f"target profile '{profile.id}' lists no compute_capability; add the devices' SM versions")
    cc = profile.compute_capability[0] if compute_capability is None else compute_capability
    if cc not in profile.compute_capability:
        raise TargetError(f"compute capability {cc} is not a device of target '{profile.id}' "
                          f"({', '.join(profile.compute_capability)})")  # fmt: skip
    cells = _cells(profile, v, onnx_io, int4=int4, strong_opt_in=strong_opt_in, precision=precision or {})
    key = {"trt_version": profile.trt_version, "compute_capability": cc, "jetpack": profile.jetpack,
           "cuda": profile.cuda}  # fmt: skip
    return BuildPlan(
        target=profile.id,
        trt_version=profile.trt_version,
        typing=typing,
        flags=_precision_flags(v, typing, int4),
        profiles=_profiles(onnx_io, unet_batch_max=2 * batch_max),
        workspace_mib=workspace_mib,
        builder_opt_level=level,
        max_aux_streams=aux,
        timing_cache=timing_cache_name(key),
        compute_capability=cc,
        compute_capabilities=tuple(profile.compute_capability),
        jetpack=profile.jetpack,
        cuda=profile.cuda,
        int4=int4,
        experimental=cells,
    )


def _choose_typing(profile: TargetProfile, v: tuple[int, ...], strongly_typed: bool | None) -> tuple[str, bool]:
    """(typing, whether strong typing was asked for against the profile's weak default)."""
    where = f"target '{profile.id}' (TensorRT {profile.trt_version})"
    if v < (10,):
        if strongly_typed:
            raise TargetError(f"{where} has no strongly typed networks (TensorRT >= 10); build weak-typed "
                              "(--fp16 --int8) or choose a TensorRT 10 target")  # fmt: skip
        return "weak", False
    if v >= (10, 12):
        if strongly_typed is False:
            why = "removed weak typing" if v >= (11,) else "deprecated weak typing (10.12)"
            raise TargetError(f"{where} {why}; build strongly typed (the ONNX graph carries its FP16 types, E-6)")
        return "strong", False
    if strongly_typed is None:
        return ("strong" if profile.typing == "strong" else "weak"), False
    return ("strong" if strongly_typed else "weak"), bool(strongly_typed) and profile.typing != "strong"


def _precision_flags(v: tuple[int, ...], typing: str, int4: bool) -> tuple[str, ...]:
    """trtexec flags of the section 6 table: they permit precisions, the Q/DQ graph quantizes (B-7)."""
    if v >= (11,):
        return ()  # always strongly typed; --stronglyTyped is a no-op and precision flags are gone
    if typing == "strong":
        return ("--stronglyTyped",)
    return ("--fp16", "--int8", "--int4") if int4 else ("--fp16", "--int8")


def _cells(profile, v, onnx_io, *, int4: bool, strong_opt_in: bool, precision: dict) -> tuple[str, ...]:
    """The experimental cells (deploy.md section 11) this build touches, as the profile lists them."""
    mode = str(precision.get("mode") or "").upper()
    used = []
    if int4:
        used.append("int4-gemm")
    if strong_opt_in:
        used.append("strong-typing")
    if any(i.get("name") == "act_scale_ratios" for i in onnx_io.get("inputs", [])):
        used.append("scale-input")
    if int(precision.get("a_bits") or 8) < 8 and not profile.native_a4:
        used.append("a4-container")
    for fmt, cell in (("NVFP4", "nvfp4"), ("FP8", "fp8")):
        if fmt in mode:
            if cell not in profile.quantized_types:
                raise TargetError(f"target '{profile.id}' (TensorRT {profile.trt_version}) has no {fmt}; "
                                  "export INT8 for it or choose a target that lists it")  # fmt: skip
            used.append(cell)
            break
    return tuple(c for c in used if c in profile.experimental)


def _profiles(onnx_io: dict, *, unet_batch_max: int) -> dict[str, dict[str, list[int]]]:
    """min 1 / opt 2 / max 2*batch over the dynamic batch dim; every other dim fixed by the export."""
    inputs = onnx_io.get("inputs") or []
    sample = next((i for i in inputs if i.get("name") == "sample"), None)
    if sample is None or len(sample.get("shape", [])) != 4:
        raise ArtifactError("export io has no 4-D 'sample' input (docs/formats.md); re-export the UNet")
    out = {}
    for inp in inputs:
        name, shape = inp["name"], list(inp["shape"])
        for i, d in enumerate(shape[1:], start=1):
            if not isinstance(d, int):
                raise ArtifactError(f"input '{name}' has symbolic dim {d!r} at axis {i}; TensorRT profiles here "
                                    "span only the batch: re-export with a fixed resolution")  # fmt: skip
        if not shape or isinstance(shape[0], int):
            continue  # static input (e.g. act_scale_ratios [K]): no profile needed
        rest = shape[1:]
        out[name] = {"min": [1, *rest], "opt": [min(BATCH_OPT, unet_batch_max), *rest], "max": [unet_batch_max, *rest]}
    return out
