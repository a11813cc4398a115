"""The float parts of a text-to-image pipeline folder: tokenizer, CLIP text encoder, VAE (build host only).

A diffusers StableDiffusionPipeline folder (model_index.json, unet/, text_encoder/, tokenizer/, scheduler/, vae/)
has its UNet quantized; the text encoder and the VAE decoder stay float. Here they are found and checked (every
problem a user hits with a real folder is one line with the fix), and the calibration prompts are encoded into the
conditioning table the rest of the chain uses (rows = prompts, then the empty prompt as the unconditional row).

``transformers`` is an optional extra (``pip install quest-export[text]``); it is imported only here and in
quest_export/export/text_parts.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from quest_export.errors import InputError, ModelError

PROMPTS = ("prompts", "default.txt")  # under quest_export/data
TEXT_ENCODERS = ("CLIPTextModel",)
SAFE = ("model.safetensors", "model.fp16.safetensors")
VAE_SAFE = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
PICKLE = ("pytorch_model.bin", "diffusion_pytorch_model.bin", "pytorch_model.fp16.bin",
          "diffusion_pytorch_model.fp16.bin")  # fmt: skip
FIX_BIN = ("convert it once where you trust the file: load it with from_pretrained and save_pretrained(..., "
           "safe_serialization=True)")  # fmt: skip


@dataclass(frozen=True)
class TextParts:
    """The pipeline's text encoder, tokenizer and VAE folders (each checked to exist with safetensors weights)."""

    root: Path
    tokenizer: Path
    text_encoder: Path
    vae: Path


def _weights(folder: Path, names: tuple[str, str], what: str) -> None:
    if any((folder / n).is_file() for n in names):
        return
    pickled = [n for n in PICKLE if (folder / n).is_file()]
    if pickled:
        raise ModelError(f"{folder / pickled[0]} is a pickle checkpoint, which quest-export never loads (it can "
                         f"run code); {FIX_BIN}")  # fmt: skip
    raise ModelError(f"{folder} has no {what} weights ({' or '.join(names)})")


def find_parts(root: Path) -> TextParts:
    """Check a pipeline folder's tokenizer/, text_encoder/ and vae/ and return them; one-line ModelError if not."""
    import json

    root = Path(root)
    tok, enc, vae = root / "tokenizer", root / "text_encoder", root / "vae"
    if not tok.is_dir() or not any((tok / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        raise ModelError(f"{root} has a text encoder but no tokenizer/ folder (vocab.json + merges.txt or "
                         "tokenizer.json); copy the pipeline's tokenizer/ next to text_encoder/")  # fmt: skip
    for folder, what in ((enc, "text_encoder"), (vae, "vae")):
        if not (folder / "config.json").is_file():
            raise ModelError(f"{root} has no {what}/config.json; a text-to-image pipeline folder needs unet/, "
                             f"text_encoder/, tokenizer/, scheduler/ and vae/ (save the whole pipeline with "
                             f"save_pretrained)")  # fmt: skip
    cfg = json.loads((enc / "config.json").read_text())
    archs = cfg.get("architectures") or [cfg.get("_class_name")]
    if not any(a in TEXT_ENCODERS for a in archs):
        raise ModelError(f"{enc} holds {archs[0] or 'an unnamed model'}; quest-export exports "
                         f"{', '.join(TEXT_ENCODERS)} text encoders (SD 1.x / 2.x); SDXL's two encoders are not "
                         "supported yet")  # fmt: skip
    _weights(enc, SAFE, "text encoder")
    _weights(vae, VAE_SAFE, "VAE")
    return TextParts(root=root, tokenizer=tok, text_encoder=enc, vae=vae)


def read_prompts(path: str | Path | None) -> tuple[list[str], str]:
    """Prompts, one per line (blank lines and '#' comments skipped); None: the packaged list. Returns (prompts, source)."""
    if path is None:
        from quest_export.data import data

        p = Path(data(*PROMPTS))
    else:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InputError(f"--prompts {path}: file not found; give a text file with one prompt per line")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--prompts {p}: not readable as UTF-8 text ({type(e).__name__}); save it as UTF-8") from None
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise InputError(f"--prompts {p}: no prompts in it (blank lines and # comments are skipped); "
                         "write one prompt per line")  # fmt: skip
    return prompts, str(p)


def load_tokenizer(parts: TextParts):
    """The pipeline's tokenizer as transformers' fast tokenizer (its tokenizer.json is what the device reads)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise InputError(f"{parts.root} is a text-to-image pipeline; its text encoder needs transformers on the build "
                         "host: pip install 'quest-export[text]'") from None  # fmt: skip
    try:
        return AutoTokenizer.from_pretrained(str(parts.tokenizer), use_fast=True)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"could not read the tokenizer in {parts.tokenizer}: {str(e).splitlines()[0]}") from None


def _float_module(cls, folder: Path, names: tuple[str, str], what: str):
    """``cls.from_pretrained(folder)`` in float32, eval mode, frozen (an fp16-only checkpoint is upcast)."""
    variant = None if (folder / names[0]).is_file() else "fp16"
    try:
        m = cls.from_pretrained(str(folder), torch_dtype=torch.float32, use_safetensors=True, variant=variant)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"could not load the {what} in {folder}: {str(e).splitlines()[0]}") from None
    return m.float().eval().requires_grad_(False)


def load_text_encoder(parts: TextParts):
    """The CLIP text encoder in float32, eval mode."""
    from transformers import CLIPTextModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor bar for a load that takes a second; our stages show progress
    return _float_module(CLIPTextModel, parts.text_encoder, SAFE, "text encoder")


def load_vae(parts: TextParts):
    """The AutoencoderKL in float32, eval mode."""
    from diffusers import AutoencoderKL

    return _float_module(AutoencoderKL, parts.vae, VAE_SAFE, "VAE")


def token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    """(R, L) int64 ids, padded and truncated to the tokenizer's model_max_length (what the pipeline feeds)."""
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids  # fmt: skip


@torch.no_grad()
def encode_prompts(parts: TextParts, prompts_file: str | Path | None = None):
    """The conditioning table: one encoder_hidden_states row per prompt, then the empty prompt (unconditional)."""
    from quest_export.models.loading import Conditioning

    prompts, source = read_prompts(prompts_file)
    tok = load_tokenizer(parts)
    enc = load_text_encoder(parts)
    table = enc(token_ids(tok, prompts + [""]))[0]  # (R, L, D) last hidden state
    return Conditioning(table=table.float(), uncond_index=len(prompts), labels=prompts + ["<unconditional>"],
                        source=source)  # fmt: skip


@torch.no_grad()
def decode_latents(model, latents: torch.Tensor, *, batch: int = 4) -> torch.Tensor:
    """Latents (N, C, h, w) of a text pipeline's UNet loop -> images (N, 3, H, W) in [-1, 1] with its float VAE
    (loaded once per model, on the latents' device)."""
    vae = model.__dict__.get("_vae")
    if vae is None:
        vae = model.__dict__["_vae"] = load_vae(model.info.text)
    vae = vae.to(latents.device)
    sf = float(vae.config.scaling_factor)
    out = [vae.decode(latents[i : i + batch] / sf).sample for i in range(0, len(latents), batch)]
    return torch.cat(out).clamp(-1, 1)


@torch.no_grad()
def text_to_image(model, prompts: list[str], spec, *, seed: int = 0, device="cpu") -> torch.Tensor:
    """The float pipeline in torch: prompts -> text encoder -> guided UNet loop (``spec``) -> VAE -> images (N, 3,
    H, W) in [-1, 1]. ``model`` is a LoadedModel of a text pipeline (``quest-export sample --model DIR``)."""
    from quest_export.models.sampling import sample

    parts = model.info.text
    states = load_text_encoder(parts)(token_ids(load_tokenizer(parts), list(prompts) + [""]))[0]  # (N + 1, L, D)
    c, h, w = model.sample_shape
    noise = torch.randn(len(prompts), c, h, w, generator=torch.Generator().manual_seed(seed))  # (N, C, h, w)
    latents = sample(model.unet, model.info.scheduler_config, noise=noise.to(device), spec=spec,
                     cond=states[:-1].to(device), uncond=states[-1:].to(device), variance_seed=seed)  # fmt: skip
    return decode_latents(model, latents).cpu()
