"""Frozen, typed, versioned recipe dataclasses.

A ``Recipe`` is one tree of small configs, one per stage. Every knob is a field with a
type, a default and a docstring line; ``None`` means "the default", resolved in exactly
one place (``Recipe.resolved``). Construction validates and has no side effects.
Standard library only: the device runtime reads recipes from bundle manifests.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Any, get_args, get_origin, get_type_hints

from quest_export.errors import RecipeError
from quest_export.recipe.methods import method_names

RECIPE_VERSION = 1

METHODS = method_names()  # the method registry (recipe/methods.py)
GRANULARITIES_W = ("per-channel", "per-tensor")
GRANULARITIES_A = ("per-tensor", "per-channel")
FIRST_LAST_POLICIES = ("a8", "quantized", "fp", "w8a8")
ACT_INITS = ("minmax", "percentile", "mse")
WEIGHT_INITS = ("absmax", "mse")
SCALE_MODES = ("merged", "per-group", "scale-input")
SAMPLERS = ("ddim", "ddpm")
FAMILIES = ("class-cond", "text", "uncond")
TRT_TYPINGS = ("weak", "strong", "none")
RUNTIMES = ("ort", "tensorrt")
DEVICES = ("auto", "cpu", "cuda")
EXTERNAL_DATA = ("auto", "always", "never")  # export.external_data
RECON_STORES = ("device", "cpu")  # ptq.recon_store


class FieldError(RecipeError):
    """A bad value of one field; ``from_dict`` re-labels it with the full recipe path."""

    def __init__(self, obj: Any, name: str, problem: str) -> None:
        self.field, self.value, self.problem = name, getattr(obj, name), problem
        super().__init__(f"{type(obj).__name__}.{name}={self.value!r} {problem}")


def _check_choice(obj: Any, name: str, allowed: tuple) -> None:
    value = getattr(obj, name)
    if value is not None and value not in allowed:
        raise FieldError(obj, name, f"is not allowed; choose one of {', '.join(map(str, allowed))}")


def _check_range(obj: Any, name: str, lo: float, hi: float) -> None:
    value = getattr(obj, name)
    if value is not None and not (lo <= value <= hi):
        raise FieldError(obj, name, f"is out of range; allowed {lo}..{hi}")


@dataclass(frozen=True)
class ModelSpec:
    """Which diffusers UNet to quantize and where its conditioning comes from."""

    name: str = "fmnist-cond"  # bundled name (fmnist-cond, fmnist-uncond) or a local diffusers folder
    cond: str | None = None  # safetensors file of encoder_hidden_states rows (any UNet2DConditionModel)
    prompts: str | None = None  # text pipelines: calibration prompts, one per line (None: quest_export/data/prompts)
    family: str | None = None  # class-cond | text | uncond; None = detected from the model

    def __post_init__(self) -> None:
        _check_choice(self, "family", FAMILIES)


@dataclass(frozen=True)
class SamplerConfig:
    """The sampler used by calibration, finetuning, evaluation and the runtime; None = the model's default."""

    sampler: str | None = None  # ddim | ddpm
    steps: int | None = None  # N sampler steps
    eta: float | None = None  # DDIM eta
    guidance_scale: float | None = None  # classifier-free guidance weight (1 = off)
    clip_output: bool | None = None  # clamp x_0 to [-1, 1]; False for latents (text-to-image pipelines)

    def __post_init__(self) -> None:
        _check_choice(self, "sampler", SAMPLERS)
        _check_range(self, "steps", 1, 1000)
        _check_range(self, "eta", 0.0, 1.0)
        _check_range(self, "guidance_scale", 0.0, 100.0)


@dataclass(frozen=True)
class LayerOverride:
    """Per-layer precision: a glob over fully qualified module names; a glob that matches nothing is an error."""

    pattern: str = "*"
    w_bits: int | None = None  # None = keep the recipe's
    a_bits: int | None = None
    quantize: bool = True  # False keeps the layer in floating point

    def __post_init__(self) -> None:
        _check_range(self, "w_bits", 2, 8)
        _check_range(self, "a_bits", 2, 8)


@dataclass(frozen=True)
class QuantRecipe:
    """Bits, grids and layer policy of the fake-quant model (quest.md sections 2 and 7)."""

    method: str = "quest"  # ptq | qdiffusion | quest | dmq | dmq+quest (recipe/methods.py)
    w_bits: int = 8  # weight bits (2..8; up to 16 for studies, exported only up to 8)
    a_bits: int = 8  # activation bits (2..8, e.g. 6 for DMQ's W4A6; up to 16 for studies, exported only up to 8)
    w_granularity: str = "per-channel"  # per-channel (axis 0) | per-tensor
    a_granularity: str = "per-tensor"  # per-tensor | per-channel (A4 option; ONNX Runtime only)
    w_symmetric: bool = True  # symmetric signed full range, zero point 0 (required by TensorRT)
    a_symmetric: bool = True  # False = unsigned asymmetric with integer zero points (ONNX Runtime only)
    attention_quant: bool = True  # quantize attention Q, K, V and the softmax output
    softmax_bits: int = 8  # bits of the (unsigned, zero-anchored) softmax-output quantizer: 8 or 16
    first_last: str = "a8"  # a8: conv_in/conv_out inputs at 8 bits | quantized | fp | w8a8
    split_shortcut: bool | None = None  # two quantizers on decoder skip-concat shortcuts; None = method default
    share_sibling_inputs: bool = True  # to_q/to_k/to_v reading one tensor share one input quantizer
    output_quant: bool = False  # also quantize Conv/Linear outputs: ORT CPU's fused W8A8 form (QLinearConv, E-22)
    timestep_groups: int | None = None  # G activation-scale rows; None = method default (ptq/qdiffusion 1)
    overrides: tuple[LayerOverride, ...] = ()

    def __post_init__(self) -> None:
        _check_choice(self, "method", METHODS)
        _check_range(self, "w_bits", 2, 16)
        _check_range(self, "a_bits", 2, 16)
        _check_choice(self, "w_granularity", GRANULARITIES_W)
        _check_choice(self, "a_granularity", GRANULARITIES_A)
        _check_choice(self, "first_last", FIRST_LAST_POLICIES)
        _check_choice(self, "softmax_bits", (8, 16))
        _check_range(self, "timestep_groups", 1, 1000)

    @property
    def name(self) -> str:
        return f"w{self.w_bits}a{self.a_bits}"


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data: float-model sampling trajectories recorded at the UNet input (quest.md section 3)."""

    samples_per_group: int = 64  # trajectories recorded (each adds an unconditional copy under guidance)
    seed: int = 0  # seed of noise, classes and every later random draw from the set
    group_pooled: bool = False  # calibrate a group on all its steps instead of its first step


@dataclass(frozen=True)
class PtqConfig:
    """Stage A: weight init, AdaRound/BRECQ reconstruction and activation-scale init."""

    weight_init: str | None = None  # absmax | mse; None = method default (ptq: absmax, others: mse)
    act_init: str = "minmax"  # minmax | percentile | mse
    running_stat: bool = False  # EMA (0.95) over all samples of a group (A8 only)
    act_batch: int = 64  # samples per group for activation init
    adaround: bool | None = None  # None = method default (qdiffusion, quest, dmq: on)
    adaround_iters: int = 200  # iterations per reconstruction unit
    adaround_batch: int = 16
    adaround_lr: float = 1e-3
    adaround_reg: float = 0.01  # lambda of the rounding regulariser
    act_recon_iters: int = 0  # Q-Diffusion activation-scale reconstruction (qdiffusion only)
    act_recon_lr: float = 4e-4
    cuda_graphs: bool = True  # on a GPU, replay each reconstruction step as a CUDA graph (same math, less launching)
    # memory of block reconstruction (issue 15): where one unit's captured inputs and float targets live
    # (device | cpu: host RAM, copied per batch; slower, frees GPU memory), and rows per UNet call while capturing
    recon_store: str = "device"
    forward_chunk: int = 64

    def __post_init__(self) -> None:
        _check_choice(self, "weight_init", WEIGHT_INITS)
        _check_choice(self, "act_init", ACT_INITS)
        _check_choice(self, "recon_store", RECON_STORES)
        _check_range(self, "adaround_iters", 0, 10**6)
        _check_range(self, "forward_chunk", 1, 4096)


@dataclass(frozen=True)
class DmqConfig:
    """DMQ's Stage A0 (learned equivalent scaling) and Stage A4 (power-of-two scaling); quest.md 7.6."""

    les: bool = True  # Stage A0: a learned per-input-channel scale gamma of every quantized layer
    les_iters: int = 200  # Adam steps per block (reference: 6,000)
    les_batch: int = 32  # calibration rows per step (reference: 32; 8 for SD)
    les_lr: float = 1e-3  # cosine-decayed to 0
    les_r: float = 20.0  # exponent r of the timestep weights w_g = (1 - L_g / sum_h L_h)^r (Churches: 25)
    les_momentum: float = 0.95  # EMA momentum of the per-group loss table
    pts: bool = True  # Stage A4: per-channel power-of-two factors on the pts_layers inputs
    pts_layers: tuple[str, ...] = ("*conv_shortcut",)  # globs (reference: the skip-connection convs)
    pts_agreement: float = 0.85  # below this share of samples agreeing with the mode, the factor is 1
    pts_samples: int = 64  # calibration rows that vote, drawn over all groups
    seed: int = 0

    def __post_init__(self) -> None:
        _check_range(self, "les_iters", 0, 10**7)
        _check_range(self, "les_batch", 1, 10**5)
        _check_range(self, "pts_agreement", 0.0, 1.0)
        _check_range(self, "pts_samples", 1, 10**6)


@dataclass(frozen=True)
class FinetuneConfig:
    """QuEST Stage B (time-embedding projections) and Stage C (sensitive layers + activation scales)."""

    preset: str = "fast"  # name of the preset these values came from (fast | gpu | paper | custom)
    stage_b: bool = True
    stage_c: bool = True
    b_epochs: int = 10  # epochs per group
    b_samples: int = 8  # samples per group, drawn once and reused every epoch
    b_batch: int = 2  # samples per optimizer step
    b_lr_weight: float = 1e-5
    b_lr_scale: float = 1e-5
    b_w_glob: float | None = None  # None = number of hooked layers (reference-equivalent)
    b_w_loc: float = 1.0
    c_epochs: int = 2  # each epoch visits every group
    c_samples: int = 16  # fresh samples per (epoch, group)
    c_batch: int = 4
    c_lr_weight: float = 1e-5
    c_lr_scale: float = 1e-4
    c_w_glob: float = 1.0
    c_w_loc: float = 0.0  # local loss on the hooked sensitive layers (0 = global only, the reference)
    c_layers: tuple[str, ...] | None = None  # globs of the Stage C weights; None = family default
    diverge_factor: float = 1e3  # loss above this multiple of the first loss counts as exploding
    cuda_graphs: bool = True  # on a GPU, replay each finetuning step as a CUDA graph (same math, less launching)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("b_epochs", "b_samples", "b_batch", "c_epochs", "c_samples", "c_batch"):
            _check_range(self, name, 0, 10**7)


@dataclass(frozen=True)
class ExportConfig:
    """QDQ ONNX export (deploy.md section 2)."""

    scale_mode: str = "merged"  # merged | per-group | scale-input
    opset: int | None = None  # None = the target's cap (21 where INT4 is needed)
    int4_gemm: bool = False  # TensorRT >= 10: block-quantized INT4 MatMul/Gemm weights (opt-in)
    int4_block: int = 128  # 64 or 128
    batch: int = 1  # images per call the reference inputs use (CFG doubles the UNet batch)
    external_data: str = "auto"  # auto | always | never: initializers in model.onnx.data (auto: past 256 MiB)

    def __post_init__(self) -> None:
        _check_choice(self, "scale_mode", SCALE_MODES)
        _check_choice(self, "int4_block", (64, 128))
        _check_choice(self, "external_data", EXTERNAL_DATA)


@dataclass(frozen=True)
class TargetProfile:
    """One deployment target, loaded from quest_export/data/targets/<id>.toml (deploy.md section 1)."""

    id: str = "cpu"
    runtime: str = "ort"  # ort | tensorrt
    description: str = ""
    devices: str = ""
    compute_capability: tuple[str, ...] = ()  # e.g. ("8.7",); empty for CPU
    software: str = ""
    trt_version: str | None = None  # e.g. "10.3"; None for ONNX Runtime targets
    jetpack: str | None = None
    cuda: str | None = None
    quantized_types: tuple[str, ...] = ("int8",)  # int8, int4-weight, int4-gemm, fp8, nvfp4
    max_opset: int = 21
    int4_opset: int = 21  # opset needed for INT4 initializers
    ir_version: int = 10
    typing: str = "none"  # weak | strong | none (TensorRT typing mode)
    precision_flags: tuple[str, ...] = ()
    workspace_mib: int = 4096
    builder_opt_level: int = 3
    max_aux_streams: int | None = None
    max_batch: int = 8  # images per call (the UNet batch is twice this under guidance)
    symmetric_only: bool = False
    native_a4: bool = False  # true 4-bit activation Q/DQ (ONNX Runtime); else the INT8 container
    attention_quant: bool = True  # TensorRT keeps attention in FP16 (no INT8 MHA)
    on_device_build: bool = False  # engines must be built on the device (Jetson): export a bundle
    experimental: tuple[str, ...] = ()  # planner cells not yet proven on hardware (deploy.md section 11)

    def __post_init__(self) -> None:
        _check_choice(self, "runtime", RUNTIMES)
        _check_choice(self, "typing", TRT_TYPINGS)

    @property
    def is_tensorrt(self) -> bool:
        return self.runtime == "tensorrt"


@dataclass(frozen=True)
class VerifyConfig:
    """Thresholds of the verification tiers (deploy.md section 5)."""

    exact_rtol: float = 1e-5  # H-2: max abs error <= exact_rtol * max(1, std(out))
    cosine_min: float = 0.99  # H-3: per-step cosine similarity of engine and fake-quant outputs
    ratio_min: float = 0.9  # H-3: err(engine, float) / err(fake-quant, float) within [ratio_min, ratio_max]
    ratio_max: float = 1.1
    mean_err_factor: float = 1.5  # H-3: mean|engine - FQ| / std <= factor * mean|FQ - float| / std
    psnr_min: float = 25.0  # H-4: PSNR (dB) of engine samples against fake-quant samples, same noise
    e2e_samples: int = 8  # images sampled end to end by the engine and the fake-quant model
    e2e_steps: int | None = None  # sampler steps for the end-to-end tier; None = the recipe's


@dataclass(frozen=True)
class Recipe:
    """The whole run: what to quantize, how, for which target, and how to check it."""

    version: int = RECIPE_VERSION
    model: ModelSpec = field(default_factory=ModelSpec)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    quant: QuantRecipe = field(default_factory=QuantRecipe)
    calib: CalibConfig = field(default_factory=CalibConfig)
    ptq: PtqConfig = field(default_factory=PtqConfig)
    finetune: FinetuneConfig | None = field(default_factory=FinetuneConfig)
    dmq: DmqConfig = field(default_factory=DmqConfig)  # used by the methods with LES/PTS (dmq, dmq+quest)
    export: ExportConfig = field(default_factory=ExportConfig)
    target: TargetProfile = field(default_factory=TargetProfile)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        if self.version != RECIPE_VERSION:
            raise RecipeError(
                f"recipe version {self.version} is not readable by this quest-export (reads {RECIPE_VERSION}); "
                + (
                    "upgrade quest-export to read this recipe"
                    if self.version > RECIPE_VERSION
                    else "re-create the recipe"
                )
            )
        _check_choice(self, "device", DEVICES)

    # -- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return to_jsonable(self)

    def to_json(self, *, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=indent, separators=None if indent else (",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        return from_jsonable(cls, data, path="")

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON (sorted keys, no whitespace)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    def stage_key(self, *parts: str) -> str:
        """Short stable hash of the named sub-configs (cache key of a stage)."""
        payload = {p: to_jsonable(getattr(self, p)) for p in parts}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# -- generic JSON round trip of the dataclass tree -------------------------------------------

_CLASSES = {c.__name__: c for c in (ModelSpec, SamplerConfig, LayerOverride, QuantRecipe, CalibConfig, PtqConfig,
                                    DmqConfig, FinetuneConfig, ExportConfig, TargetProfile, VerifyConfig, Recipe)}  # fmt: skip


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_jsonable(v) for v in obj]
    return obj


def _field_types(cls) -> dict[str, Any]:
    return get_type_hints(cls)


def coerce(tp: Any, value: Any, path: str) -> Any:
    """Convert a JSON value (or an override string) to the annotated type; raise RecipeError naming ``path``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is not None and type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(inner[0], value, path)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{path}: expected a list, got {value!r}")
        return tuple(coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected an object, got {value!r}")
        return from_jsonable(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "on", "yes", "1", "false", "off", "no", "0"):
            return value.lower() in ("true", "on", "yes", "1")
        raise RecipeError(f"{path}={value!r} is not a boolean; use true or false")
    if tp is int:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, str))
            or (isinstance(value, str) and not _is_int(value))
        ):
            raise RecipeError(f"{path}={value!r} is not an integer")
        return int(value)
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise RecipeError(f"{path}={value!r} is not a number") from None
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # --set target.trt_version=10.3 parses as a JSON number
        if not isinstance(value, str):
            raise RecipeError(f"{path}={value!r} is not a string")
        return value
    raise RecipeError(f"{path}: unsupported type {tp!r}")  # internal: a new field type


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def from_jsonable(cls, data: dict, path: str):
    """Build dataclass ``cls`` from a dict; ``path`` is its dotted place in the recipe ("" at the top)."""
    import difflib

    hints = _field_types(cls)
    names = [f.name for f in fields(cls)]
    dot = f"{path}." if path else ""
    for k in data:
        if k not in names:
            close = difflib.get_close_matches(k, names, n=1)
            hint = f"did you mean '{dot}{close[0]}'?" if close else f"known keys: {', '.join(names)}"
            raise RecipeError(f"unknown recipe key '{dot}{k}'; {hint}")
    kwargs = {k: coerce(hints[k], v, f"{dot}{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except FieldError as e:
        raise RecipeError(f"{dot}{e.field}={e.value!r} {e.problem}") from None
