"""Load a diffusers UNet: a bundled name, a UNet folder, or a pipeline folder (unet/, scheduler/).

Every way this can fail for a user is a one-line ``ModelError`` saying what was expected.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quest_export.errors import InputError, ModelError
from quest_export.models.text import PICKLE, TextParts, find_parts, read_prompts

log = logging.getLogger(__name__)

BUNDLED = ("fmnist-cond", "fmnist-uncond")
DEFAULT_MODEL = "fmnist-cond"
SUPPORTED = ("UNet2DModel", "UNet2DConditionModel")
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")

# Scheduler used when a bare UNet folder carries none (DDPM's linear betas, 1000 steps).
FALLBACK_SCHEDULER = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                          beta_schedule="linear", prediction_type="epsilon", clip_sample=False,
                          set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")  # fmt: skip
FALLBACK_SAMPLING = dict(sampler="ddim", steps=50, eta=0.0, guidance_scale=1.0, clip_output=True)
# Text-to-image pipelines: SD's own guidance; x_0 is a latent for the VAE, so it is not clamped to [-1, 1].
TEXT_SAMPLING = dict(guidance_scale=7.5, clip_output=False)


@dataclass
class Conditioning:
    """Rows of encoder_hidden_states: table (R, L, D); ``uncond_index`` is the guidance row."""

    table: torch.Tensor
    uncond_index: int | None = None
    labels: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def cond_rows(self) -> list[int]:
        return [i for i in range(self.table.shape[0]) if i != self.uncond_index]

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx]  # (B, L, D)

    @property
    def uncond(self) -> torch.Tensor | None:
        return None if self.uncond_index is None else self.table[self.uncond_index][None]  # (1, L, D)


@dataclass
class ModelInfo:
    """What a model folder declares, read without torch (for recipe resolution)."""

    name: str
    unet_dir: Path
    class_name: str
    config: dict
    scheduler_config: dict
    sampling: dict
    family: str
    cond_file: Path | None
    root: Path
    text: TextParts | None = None  # text-to-image pipeline: tokenizer, text encoder, VAE (models/text.py)
    prompts: str | None = None  # calibration prompts file of a text pipeline (None: the packaged list)


@dataclass
class LoadedModel:
    info: ModelInfo
    unet: torch.nn.Module
    conditioning: Conditioning | None
    source_hash: str

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def family(self) -> str:
        return self.info.family

    @property
    def conditional(self) -> bool:
        return self.info.class_name == "UNet2DConditionModel"

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.info.config
        s = c.get("sample_size", 32)
        s = s if isinstance(s, int) else s[0]
        return (c.get("in_channels", 4), s, s)


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"{p} is not readable JSON ({e}); the model folder is corrupt") from None


def resolve_model(name: str, *, cond: str | None = None, prompts: str | None = None) -> ModelInfo:
    """Find a model by bundled name or path and read its metadata (no weights, no torch)."""
    if name in BUNDLED:
        from quest_export.data import package_dir

        root = package_dir("quest_export.zoo", "models", name)
    else:
        root = Path(name).expanduser()
    if not root.exists():
        raise ModelError(f"model '{name}' not found: give a bundled name ({', '.join(BUNDLED)}) or a diffusers "
                         "folder (a UNet folder with config.json, or a pipeline folder with unet/ and scheduler/)")  # fmt: skip
    if not root.is_dir():
        raise ModelError(
            f"{root} is a file; expected a diffusers folder (config.json + weights, or unet/ + scheduler/)"
        )
    if (root / "unet" / "config.json").is_file():
        unet_dir, sched_file = root / "unet", root / "scheduler" / "scheduler_config.json"
    elif (root / "config.json").is_file():
        unet_dir, sched_file = root, root / "scheduler_config.json"
        if not sched_file.is_file():
            sched_file = root.parent / "scheduler" / "scheduler_config.json"
    else:
        raise ModelError(f"{root} is not a diffusers model: expected config.json (a UNet folder) or "
                         "unet/config.json (a pipeline folder)")  # fmt: skip
    config = _read_json(unet_dir / "config.json")
    cls = config.get("_class_name")
    if cls not in SUPPORTED:
        raise ModelError(f"{unet_dir} holds a {cls or 'model without _class_name'}; quest-export handles "
                         f"{' and '.join(SUPPORTED)} (SD 1.x / 2.x); point --model at such a UNet or pipeline "
                         "folder")  # fmt: skip
    if config.get("addition_embed_type"):  # SDXL: added_cond_kwargs (text_embeds, time_ids) on every call
        raise ModelError(f"{unet_dir} is an SDXL-style UNet (addition_embed_type={config['addition_embed_type']!r}: "
                         "text_embeds / time_ids inputs), which quest-export does not quantize yet; SD 1.x / 2.x "
                         "UNets are supported")  # fmt: skip
    if not any((unet_dir / w).is_file() for w in WEIGHT_FILES):
        pickled = [n for n in PICKLE if (unet_dir / n).is_file()]
        if pickled:
            from quest_export.models.text import FIX_BIN

            raise ModelError(f"{unet_dir / pickled[0]} is a pickle checkpoint, which quest-export never loads (it "
                             f"can run code); {FIX_BIN}")  # fmt: skip
        raise ModelError(f"{unet_dir} has no weights ({' or '.join(WEIGHT_FILES)}); only safetensors are loaded")
    if sched_file.is_file():
        sched = _read_json(sched_file)
    else:
        log.warning("%s has no scheduler config; using DDIM with linear betas (1000 steps)", root)
        sched = dict(FALLBACK_SCHEDULER)
    meta = _read_json(root / "quest_model.json") if (root / "quest_model.json").is_file() else {}
    text = None
    if cls == "UNet2DConditionModel" and cond is None and (root / "text_encoder").is_dir():
        text = find_parts(root)  # a text-to-image pipeline: prompts encoded by its own text encoder
        read_prompts(prompts)  # an unreadable or empty prompts file fails here, before any stage runs
    elif prompts is not None:
        raise InputError(f"--prompts given, but {root} is not a text-to-image pipeline folder (no text_encoder/, or "
                         "--cond given); drop --prompts")  # fmt: skip
    sampling = {**FALLBACK_SAMPLING, **(TEXT_SAMPLING if text else {}), **meta.get("sampling", {})}
    cond_file = None
    if cls == "UNet2DConditionModel":
        if cond is not None:
            cond_file = Path(cond).expanduser()
            if not cond_file.is_file():
                raise InputError(f"--cond {cond}: file not found; expected a safetensors file with an "
                                 "'encoder_hidden_states' tensor (R, L, D)")  # fmt: skip
        elif meta.get("conditioning"):
            cond_file = root / meta["conditioning"]
        elif text is not None:
            cond_file = None  # prompts encoded by the pipeline's text encoder (models/text.py)
        else:
            raise InputError(f"{root} is a UNet2DConditionModel without conditioning: pass --cond FILE "
                             "(safetensors with 'encoder_hidden_states' rows, one unconditional)")  # fmt: skip
    elif cond is not None:
        raise InputError(f"--cond given, but {root} is an unconditional UNet2DModel")
    family = meta.get("family") or ("uncond" if cls == "UNet2DModel" else "text" if text else "class-cond")
    return ModelInfo(name=name, unet_dir=unet_dir, class_name=cls, config=config, scheduler_config=sched,
                     sampling=sampling, family=family, cond_file=cond_file, root=root, text=text,
                     prompts=prompts)  # fmt: skip


def load_conditioning(path: Path, *, expected_dim: int | None = None) -> Conditioning:
    """Read and check a conditioning file (``--cond`` or a model's own): the one place its contents are validated.

    Refused with one line: no ``encoder_hidden_states`` tensor, a non-float dtype, a shape other than (R, L, D) or a
    width other than the UNet's ``cross_attention_dim``, NaN or Inf values, ``labels`` metadata that is not a JSON
    list of R names, and an ``uncond_index`` that is not a row.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if "encoder_hidden_states" not in f.keys():
                raise InputError(f"{path} has no 'encoder_hidden_states' tensor; expected shape (R, L, D)")
            table = f.get_tensor("encoder_hidden_states")
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path} is not a readable safetensors file ({e})") from None
    if not table.is_floating_point():
        raise InputError(f"{path}: encoder_hidden_states is {str(table.dtype).removeprefix('torch.')}; conditioning "
                         "rows are text-encoder states, save them as float32 (or float16/bfloat16)")  # fmt: skip
    table = table.float()
    if table.dim() != 3:
        raise InputError(f"{path}: encoder_hidden_states must be (R, L, D), got {tuple(table.shape)}")
    if expected_dim is not None and table.shape[-1] != expected_dim:
        raise InputError(
            f"{path}: rows have width {table.shape[-1]}, the UNet expects cross_attention_dim {expected_dim}"
        )
    bad = (~torch.isfinite(table)).flatten(1).any(1).nonzero().flatten().tolist()
    if bad:
        raise InputError(f"{path}: encoder_hidden_states row(s) {', '.join(map(str, bad[:5]))}"
                         f"{' ...' if len(bad) > 5 else ''} hold NaN or Inf; re-encode them")  # fmt: skip
    rows = table.shape[0]
    try:
        uncond = int(meta["uncond_index"]) if "uncond_index" in meta else None
        labels = json.loads(meta["labels"]) if "labels" in meta else [str(i) for i in range(rows)]
    except ValueError:
        raise InputError(f"{path}: metadata 'uncond_index' must be an integer and 'labels' a JSON list of names "
                         f"(one per row)") from None  # fmt: skip
    if not isinstance(labels, list) or len(labels) != rows:
        n = len(labels) if isinstance(labels, list) else "not a list of"
        raise InputError(f"{path}: metadata 'labels' has {n} names for {rows} encoder_hidden_states rows; "
                         "give one label per row (the unconditional one included)")  # fmt: skip
    if uncond is not None and not 0 <= uncond < rows:
        raise InputError(f"{path}: metadata uncond_index={uncond} is not a row (0..{rows - 1})")
    return Conditioning(table=table, uncond_index=uncond, labels=labels, source=str(path))


def source_hash(info: ModelInfo) -> str:
    """SHA-256 over the UNet config and weights (the identity of the float model); for a text pipeline also the
    prompts, the tokenizer, the text encoder and the VAE (they decide the conditioning rows and the bundle)."""
    h = hashlib.sha256((info.unet_dir / "config.json").read_bytes())
    files = [info.unet_dir / w for w in WEIGHT_FILES]
    if info.text is not None:
        h.update("\n".join(read_prompts(info.prompts)[0]).encode())
        for folder in (info.text.tokenizer, info.text.text_encoder, info.text.vae):
            files += sorted(p for p in folder.iterdir() if p.is_file())
    for p in files:
        if p.is_file():
            with open(p, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
    return h.hexdigest()


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    cond: str | None = None,
    prompts: str | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load the float UNet (float32, eval mode) and its conditioning (a text pipeline encodes ``prompts``)."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    info = resolve_model(name, cond=cond, prompts=prompts)
    cls = {"UNet2DModel": UNet2DModel, "UNet2DConditionModel": UNet2DConditionModel}[info.class_name]
    variant = None if (info.unet_dir / WEIGHT_FILES[0]).is_file() else "fp16"
    try:
        unet = cls.from_pretrained(
            str(info.unet_dir),
            torch_dtype=torch.float32,
            variant=variant,
            use_safetensors=True,
            low_cpu_mem_usage=False,
        )  # small models; also silences the hint to install accelerate
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"could not load the UNet weights in {info.unet_dir}: {first}") from None
    unet = unet.to(device).eval().requires_grad_(False)
    cond_obj = None
    if info.cond_file is not None:
        cond_obj = load_conditioning(info.cond_file, expected_dim=info.config.get("cross_attention_dim"))
    elif info.text is not None:
        from quest_export.models.text import encode_prompts

        cond_obj = encode_prompts(info.text, info.prompts)
    return LoadedModel(info=info, unet=unet, conditioning=cond_obj, source_hash=source_hash(info))
