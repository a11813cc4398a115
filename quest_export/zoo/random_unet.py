"""Random-weight diffusers UNets and text-to-image pipelines of Stable Diffusion 1.5's shape (cost, correctness).

``python -m quest_export.zoo.random_unet --preset sd15 --out DIR`` writes a pipeline-shaped folder:

```
DIR/unet/config.json, DIR/unet/diffusion_pytorch_model.safetensors   (save_pretrained)
DIR/scheduler/scheduler_config.json                                  (SD's scaled_linear schedule)
DIR/quest_model.json                                                 (sampling defaults, provenance)
DIR/conditioning.safetensors                                         (--cond: random encoder_hidden_states rows)
```

The weights are diffusers' own initialisation from ``--seed``; quality is meaningless, cost and the exactness of
the chain are not. ``sd15`` is diffusers' published UNet2DConditionModel config of SD-1.5 (859.5M parameters,
4x64x64 latents, cross_attention_dim 768); ``sd15-small`` has the same block types at a few channels (CPU tests).

``--pipeline`` writes a whole StableDiffusionPipeline folder instead of conditioning.safetensors: model_index.json,
text_encoder/ (a CLIPTextModel: SD-1.5's ViT-L/14 text config for sd15, 2 layers of width 32 for sd15-small),
tokenizer/ (a CLIP BPE tokenizer over a small vocabulary written here: letters, a few merges, CLIP's specials),
vae/ (an AutoencoderKL: SD's config for sd15, two 8/16-channel blocks for sd15-small) and the scheduler. It is
what --model DIR gets from a real pipeline, at random weights (no model hub here).

Random UNets answer with eps far from a trained model's unit scale, and their sampling loop amplifies a
quantization error by about 1.5x per step (measured on sd15-small); ``output_gain`` (default 0.1) scales conv_out
so that a 10-step guided run stays a test of the engine, not of a diverging random map.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_SD15_BLOCKS = dict(
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)

PRESETS: dict[str, dict] = {
    "sd15": dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=[320, 640, 1280, 1280],
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
        **_SD15_BLOCKS,
    ),
    "sd15-small": dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=[32, 64, 64, 64],
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=16,
        **_SD15_BLOCKS,
    ),
}

# Stable Diffusion 1.x's training schedule, sampled with DDIM (SD's own scheduler_config uses PNDM).
SD_SCHEDULER = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                    beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                    set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")  # fmt: skip

TOKENS = 77  # CLIP's sequence length
OUTPUT_GAIN = 0.1  # conv_out scale of random UNets (module docstring)

TEXT_PRESETS: dict[str, dict] = {  # CLIPTextConfig / AutoencoderKL arguments per preset
    "sd15": dict(
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu", projection_dim=768),
        vae=dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
                 norm_num_groups=32, sample_size=512, scaling_factor=0.18215),
    ),
    "sd15-small": dict(
        text=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="quick_gelu", projection_dim=32),
        vae=dict(block_out_channels=[8, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4,
                 sample_size=16, scaling_factor=0.18215),
    ),
}  # fmt: skip


def write_tokenizer(out: Path) -> int:
    """A CLIP BPE tokenizer folder (vocab.json, merges.txt, tokenizer_config.json); returns the vocabulary size."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges = ["a t", "t h", "th e</w>", "i n", "o n</w>", "a n", "e r</w>", "o f</w>", "a t</w>", "in g</w>"]
    tokens = ["!", ",", "."] + list(letters) + [c + "</w>" for c in letters + "!,."]
    tokens += [m.replace(" ", "") for m in merges]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="CLIPTokenizer", model_max_length=TOKENS, bos_token="<|startoftext|>",
        eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<|endoftext|>",
        do_lower_case=True), indent=2))  # fmt: skip
    return len(vocab)


def _write_text_parts(preset: str, out: Path, *, seed: int, cross_dim: int) -> None:
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = write_tokenizer(out / "tokenizer")
    tcfg, vcfg = TEXT_PRESETS[preset]["text"], dict(TEXT_PRESETS[preset]["vae"])
    if tcfg["hidden_size"] != cross_dim:
        raise ValueError(f"text hidden_size {tcfg['hidden_size']} != the UNet's cross_attention_dim {cross_dim}")
    torch.manual_seed(seed + 2)
    enc = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, max_position_embeddings=TOKENS, bos_token_id=vocab - 2,
                                       eos_token_id=vocab - 1, pad_token_id=vocab - 1, **tcfg))  # fmt: skip
    enc.save_pretrained(str(out / "text_encoder"), safe_serialization=True)
    n = len(vcfg["block_out_channels"])
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                        up_block_types=["UpDecoderBlock2D"] * n, **vcfg)  # fmt: skip
    vae.save_pretrained(str(out / "vae"), safe_serialization=True)
    (out / "model_index.json").write_text(json.dumps(dict(
        _class_name="StableDiffusionPipeline", _diffusers_version="0.42.1", unet=["diffusers", "UNet2DConditionModel"],
        text_encoder=["transformers", "CLIPTextModel"], tokenizer=["transformers", "CLIPTokenizer"],
        vae=["diffusers", "AutoencoderKL"], scheduler=["diffusers", SD_SCHEDULER["_class_name"]],
        safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False), indent=2))  # fmt: skip


def make_random_unet(preset: str, out: Path, *, seed: int = 0, rows: int = 8, steps: int = 20,
                     guidance_scale: float = 7.5, overrides: dict | None = None, pipeline: bool = False,
                     output_gain: float = OUTPUT_GAIN) -> Path:  # fmt: skip
    """Write the folder described in the module docstring and return it.

    rows: conditioning rows written (row 0 is the unconditional one; not with ``pipeline``, whose prompts are
    encoded by its text encoder); steps / guidance_scale: the sampling defaults recorded in quest_model.json
    (what calibration, finetuning and verify use unless told otherwise); pipeline: write text_encoder/,
    tokenizer/, vae/ and model_index.json (a StableDiffusionPipeline folder); output_gain: conv_out's scale.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if rows < 2:
        raise ValueError("rows must be at least 2 (one unconditional row and one prompt)")
    config = {**PRESETS[preset], **(overrides or {})}
    out = Path(out)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config)
    with torch.no_grad():
        unet.conv_out.weight.mul_(output_gain)
        unet.conv_out.bias.mul_(output_gain)
    unet.save_pretrained(str(out / "unet"), safe_serialization=True)
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_SCHEDULER, indent=2) + "\n")
    if pipeline:
        _write_text_parts(preset, out, seed=seed, cross_dim=config["cross_attention_dim"])
    else:
        gen = torch.Generator().manual_seed(seed + 1)
        table = torch.randn(rows, TOKENS, config["cross_attention_dim"], generator=gen)  # (R, 77, D)
        labels = ["<uncond>"] + [f"random prompt {i}" for i in range(1, rows)]
        save_file({"encoder_hidden_states": table.contiguous()}, str(out / "conditioning.safetensors"),
                  metadata={"uncond_index": "0", "labels": json.dumps(labels)})  # fmt: skip
    meta = dict(
        name=f"random-{preset}",
        family="text",
        sampling=dict(sampler="ddim", steps=steps, eta=0.0, guidance_scale=guidance_scale, clip_output=False),
        output_gain=output_gain,
        image_size=config["sample_size"],
        data="none: random weights (diffusers' initialisation)",
        training=dict(
            command=f"python -m quest_export.zoo.random_unet --preset {preset} --seed {seed}", seed=seed
        ),  # fmt: skip
        parameters=sum(p.numel() for p in unet.parameters()),
    )
    (out / "quest_model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m quest_export.zoo.random_unet", description=__doc__.split("\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="sd15")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=8, help="conditioning rows (row 0 unconditional)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps recorded in quest_model.json")
    p.add_argument("--guidance", type=float, default=7.5, help="CFG scale recorded in quest_model.json")
    p.add_argument("--pipeline", action="store_true", help="a whole text-to-image pipeline (text encoder, VAE)")
    p.add_argument("--output-gain", type=float, default=OUTPUT_GAIN, help="conv_out scale (module docstring)")
    a = p.parse_args(argv)
    out = make_random_unet(a.preset, a.out, seed=a.seed, rows=a.rows, steps=a.steps, guidance_scale=a.guidance,
                           pipeline=a.pipeline, output_gain=a.output_gain)  # fmt: skip
    print(json.loads((out / "quest_model.json").read_text())["parameters"], "parameters ->", out)


if __name__ == "__main__":
    main()
