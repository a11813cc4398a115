"""Architectures of the bundled models and of the metric classifier.

The two diffusion models are plain diffusers classes; only their configs live here.
``attention_head_dim`` of ``UNet2DConditionModel`` is diffusers' legacy name for the
*number of heads* per block, hence (1, 2, 4) for a head width of 32.
"""

from __future__ import annotations

import torch
from torch import nn

COND_TOKENS = 4  # length L of the learned class-embedding sequence fed as encoder_hidden_states
COND_DIM = 64  # width D of each token (cross_attention_dim)
NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # row of the conditioning table used for classifier-free guidance

UNET_CONFIGS: dict[str, dict] = {
    "fmnist-cond": dict(
        _class_name="UNet2DConditionModel",
        sample_size=32,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=COND_DIM,
        attention_head_dim=(1, 2, 4),
        norm_num_groups=16,
    ),
    "fmnist-uncond": dict(
        _class_name="UNet2DModel",
        sample_size=32,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=32,
        norm_num_groups=16,
    ),
}

# Noise schedule the models are trained with (epsilon prediction, linear betas, 1000 steps)
# and the DDIM sampler they are evaluated with.
SCHEDULER_CONFIG = dict(
    _class_name="DDIMScheduler",
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    prediction_type="epsilon",
    clip_sample=False,  # DDIM clips x0 without recomputing eps; under guidance that inconsistency shows as artifacts
    set_alpha_to_one=True,
    steps_offset=0,
    timestep_spacing="leading",
)

SAMPLING_DEFAULTS: dict[str, dict] = {
    "fmnist-cond": dict(sampler="ddim", steps=50, eta=0.0, guidance_scale=2.0),
    "fmnist-uncond": dict(sampler="ddim", steps=50, eta=0.0, guidance_scale=1.0),
}


def build_unet(name: str):
    """Randomly initialised diffusers UNet with the bundled model's architecture."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    cfg = dict(UNET_CONFIGS[name])
    cls = {"UNet2DConditionModel": UNet2DConditionModel, "UNet2DModel": UNet2DModel}[cfg.pop("_class_name")]
    return cls(**cfg)


class FashionClassifier(nn.Module):
    """Small CNN for 32x32 Fashion-MNIST in [-1, 1]; its penultimate layer feeds the FD metric."""

    feature_dim = 128

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.MaxPool2d(2),
            )  # fmt: skip

        self.body = nn.Sequential(block(1, 32), block(32, 64), block(64, 128))  # (B, 128, 4, 4)
        self.features = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(128 * 16, self.feature_dim), nn.ReLU())
        self.head = nn.Linear(self.feature_dim, NUM_CLASSES)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, 128) of images x (B, 1, 32, 32)."""
        return self.features(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))
