"""The torch sampling loop shared by sample, eval, calibration and finetuning.

The loop is ours (diffusers' philosophy: the user owns the loop); the step arithmetic is
the diffusers scheduler's. Quantization never edits this loop: timestep groups are chosen
by the quantized model from the timestep it receives (``quest_export.quant.groups``), and
calibration records UNet inputs through a forward pre-hook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

SAMPLERS = ("ddim", "ddpm")


@dataclass(frozen=True)
class SamplerSpec:
    """sampler: ddim | ddpm; steps: N; eta: DDIM eta; guidance_scale: CFG weight (1 = off); clip_output: clamp x_0
    to [-1, 1] (images; False for latents that a VAE decodes)."""

    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 1.0
    clip_output: bool = True

    @classmethod
    def of(cls, s) -> SamplerSpec:
        """From a resolved SamplerConfig or a manifest's ``sampler`` dict (absent keys keep their defaults)."""
        d = s if isinstance(s, dict) else {k: getattr(s, k) for k in cls.__dataclass_fields__}
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if d.get(k) is not None})


def make_scheduler(config: dict, sampler: str):
    """A fresh diffusers scheduler of kind ``sampler`` built from a scheduler config dict."""
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[sampler]
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    return cls.from_config(cfg)


def call_unet(unet, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    """One UNet call. x: (B, C, H, W); t: (B,) int64; cond: (B, L, D) or None. Returns eps (B, C, H, W)."""
    if cond is None:
        return unet(x, t).sample
    return unet(x, t, encoder_hidden_states=cond).sample


def guided_eps(unet, x: torch.Tensor, t: int, cond: torch.Tensor | None, uncond: torch.Tensor | None,
               guidance_scale: float) -> torch.Tensor:  # fmt: skip
    """Classifier-free guided eps. The UNet sees [uncond half, cond half] in one batch."""
    b = x.shape[0]
    if cond is None or uncond is None or guidance_scale == 1.0:
        return call_unet(unet, x, torch.full((b,), t, dtype=torch.long, device=x.device), cond)
    x2 = torch.cat([x, x])  # (2B, C, H, W)
    c2 = torch.cat([uncond.expand(b, *uncond.shape[-2:]), cond])  # (2B, L, D)
    eps_u, eps_c = call_unet(unet, x2, torch.full((2 * b,), t, dtype=torch.long, device=x.device), c2).chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


@torch.no_grad()
def sample(
    unet,
    scheduler_config: dict,
    *,
    noise: torch.Tensor,
    spec: SamplerSpec,
    cond: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    variance_seed: int = 0,
    on_step: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Run the sampler from ``noise`` (B, C, H, W) and return x_0 (in [-1, 1] unless ``spec.clip_output`` is False).

    Args:
        cond: (B, L, D) encoder hidden states, or None for an unconditional UNet.
        uncond: (L, D) or (1, L, D) unconditional row for guidance.
        variance_seed: seed of the noise that DDPM / DDIM with eta > 0 inject (drawn on the CPU).
        on_step: called as on_step(i, t) before the UNet call of step i.
    """
    sched = make_scheduler(scheduler_config, spec.sampler)
    sched.set_timesteps(spec.steps)
    gen = torch.Generator().manual_seed(variance_seed)  # CPU generator: same noise on every device
    x = noise
    for i, t in enumerate(sched.timesteps.tolist()):
        if on_step is not None:
            on_step(i, t)
        eps = guided_eps(unet, x, t, cond, uncond, spec.guidance_scale)
        if spec.sampler == "ddim":
            var_noise = torch.randn(x.shape, generator=gen).to(x.device) if spec.eta > 0 else None
            x = sched.step(eps, t, x, eta=spec.eta, variance_noise=var_noise).prev_sample
        else:
            x = sched.step(eps, t, x, generator=gen).prev_sample
    return x.clamp(-1, 1) if spec.clip_output else x
