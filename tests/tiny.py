"""Tiny seeded UNets of both bundled families (a few channels per block), for CPU tests in seconds."""

from __future__ import annotations

import torch

COND_TOKENS, COND_DIM = 4, 16


def tiny_cond_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=COND_DIM, attention_head_dim=(1, 2),
        norm_num_groups=4,
    ).eval()  # fmt: skip


def tiny_uncond_unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=4,
    ).eval()  # fmt: skip


def inputs(unet, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 8, 8, generator=g)
    t = torch.full((batch,), 500, dtype=torch.long)
    cond = (
        torch.randn(batch, COND_TOKENS, COND_DIM, generator=g) if hasattr(unet.config, "cross_attention_dim") else None
    )
    return x, t, cond


def tiny_model(kind: str = "cond", seed: int = 0):
    """A LoadedModel around a tiny random UNet, with a class table (4 classes + null row) for 'cond'."""
    from pathlib import Path

    from quest_export.models.loading import Conditioning, LoadedModel, ModelInfo
    from quest_export.zoo.architectures import SCHEDULER_CONFIG

    unet = tiny_cond_unet(seed) if kind == "cond" else tiny_uncond_unet(seed)
    unet.requires_grad_(False)
    cond = None
    if kind == "cond":
        g = torch.Generator().manual_seed(seed + 7)
        table = torch.randn(5, COND_TOKENS, COND_DIM, generator=g)
        cond = Conditioning(table=table, uncond_index=4, labels=["a", "b", "c", "d", "<unconditional>"], source="tiny")
    cls = "UNet2DConditionModel" if kind == "cond" else "UNet2DModel"
    info = ModelInfo(name=f"tiny-{kind}", unet_dir=Path("."), class_name=cls, config=dict(unet.config),
                     scheduler_config=dict(SCHEDULER_CONFIG),
                     sampling=dict(sampler="ddim", steps=10, eta=0.0, guidance_scale=2.0 if kind == "cond" else 1.0,
                                   clip_output=True),
                     family="class-cond" if kind == "cond" else "uncond", cond_file=None, root=Path("."))  # fmt: skip
    return LoadedModel(info=info, unet=unet, conditioning=cond, source_hash=f"tiny-{kind}-{seed}")


def write_tiny_model_dir(root, kind: str = "cond", seed: int = 0):
    """Save a tiny UNet as a diffusers pipeline folder (unet/, scheduler/, conditioning) and return its path."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from quest_export.zoo.architectures import SCHEDULER_CONFIG

    root = Path(root) / f"tiny-{kind}"
    m = tiny_model(kind, seed)
    m.unet.save_pretrained(root / "unet", safe_serialization=True)
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG))
    meta = {"family": m.family, "sampling": m.info.sampling}
    if m.conditioning is not None:
        c = m.conditioning
        save_file({"encoder_hidden_states": c.table.contiguous()}, str(root / "conditioning.safetensors"),
                  metadata={"uncond_index": str(c.uncond_index), "labels": json.dumps(c.labels)})  # fmt: skip
        meta["conditioning"] = "conditioning.safetensors"
    (root / "quest_model.json").write_text(json.dumps(meta))
    return root
