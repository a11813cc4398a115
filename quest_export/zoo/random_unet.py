"""Random-weight diffusers UNets of Stable Diffusion 1.5's shape, for cost and correctness runs at scale.

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


def make_random_unet(preset: str, out: Path, *, seed: int = 0, rows: int = 8, steps: int = 20,
                     guidance_scale: float = 7.5, overrides: dict | None = None) -> Path:  # fmt: skip
    """Write the folder described in the module docstring and return it.

    rows: conditioning rows written (row 0 is the unconditional one); steps / guidance_scale: the sampling
    defaults recorded in quest_model.json (what calibration, finetuning and verify use unless told otherwise).
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
    unet.save_pretrained(str(out / "unet"), safe_serialization=True)
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_SCHEDULER, indent=2) + "\n")
    gen = torch.Generator().manual_seed(seed + 1)
    table = torch.randn(rows, TOKENS, config["cross_attention_dim"], generator=gen)  # (R, 77, D)
    labels = ["<uncond>"] + [f"random prompt {i}" for i in range(1, rows)]
    save_file({"encoder_hidden_states": table.contiguous()}, str(out / "conditioning.safetensors"),
              metadata={"uncond_index": "0", "labels": json.dumps(labels)})  # fmt: skip
    meta = dict(
        name=f"random-{preset}",
        family="text",
        sampling=dict(sampler="ddim", steps=steps, eta=0.0, guidance_scale=guidance_scale),
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
    a = p.parse_args(argv)
    out = make_random_unet(a.preset, a.out, seed=a.seed, rows=a.rows, steps=a.steps, guidance_scale=a.guidance)
    print(json.loads((out / "quest_model.json").read_text())["parameters"], "parameters ->", out)


if __name__ == "__main__":
    main()
