"""DMQ Stage A4: power-of-two scaling (PTS) by majority vote (quest.md 7.6).

For the input quantizers of the ``pts_layers`` (reference: the skip-connection convs), every
calibration sample n votes for each channel c the factor f in {1, 1/2, 1/4, 1/8} whose scale s*f
(s: the quantizer's per-tensor scale of the sample's group, z unchanged) quantizes channel c of
that sample with the lowest squared error. A channel takes the mode of its votes when at least
``agreement`` (0.85) of the samples agree with it, else f = 1. One factor vector per quantizer,
shared by every group (fixed export constants): x_hat_c = Q(x_c; s_g * f_c, z_g).
"""

from __future__ import annotations

import logging

import torch

from quest_export.calib.collect import CalibrationSet
from quest_export.quant.model import QuantizedUNet, QuantMode
from quest_export.quant.primitives import fake_quant
from quest_export.quant.quantizer import ActQuantizer
from quest_export.recipe.config import DmqConfig

log = logging.getLogger(__name__)
FACTORS = (1.0, 0.5, 0.25, 0.125)  # candidate factors; index 0 (f = 1) wins ties


def channel_errors(x: torch.Tensor, q: ActQuantizer, g: int) -> torch.Tensor:
    """Squared error of each (sample, channel) under each factor; (N, C, len(FACTORS))."""
    xf = x.detach().float()
    xs = xf.movedim(q.axis, 1).flatten(2) if xf.dim() > 2 else xf.unsqueeze(-1)  # (N, C, M): M positions
    s = q.scales[g].detach().float().reshape(1, -1, 1)  # per-tensor: (1, 1, 1)
    z = None if q.symmetric or q.zero_anchored else q.zero_points[g].float().reshape(1, -1, 1)
    errs = [(xs - fake_quant(xs, s * f, z, q.qmin, q.qmax)).pow(2).sum(-1) for f in FACTORS]  # each (N, C)
    return torch.stack(errs, dim=-1)


def vote(errors: torch.Tensor, *, agreement: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Majority vote over samples. errors: (N, C, F). Returns (factor per channel (C,), agreement share (C,))."""
    best = errors.argmin(dim=-1)  # (N, C): each sample's choice (ties -> the larger factor, index 0 first)
    counts = torch.stack([(best == k).sum(0) for k in range(errors.shape[-1])], dim=-1)  # (C, F)
    mode = counts.argmax(dim=-1)  # (C,): the first index among equal counts
    share = counts.gather(1, mode[:, None]).squeeze(1).float() / errors.shape[0]  # (C,)
    table = torch.tensor(FACTORS, dtype=torch.float32)
    factors = torch.where(share >= agreement, table[mode], torch.ones_like(share))
    return factors, share


def pts_quantizers(qunet: QuantizedUNet) -> dict[str, ActQuantizer]:
    return {n: q for n, q in qunet.act_quantizers().items() if q.pts_factors is not None}


@torch.no_grad()
def power_of_two_scales_(qunet: QuantizedUNet, calib: CalibrationSet, cfg: DmqConfig, *, device, seed: int,
                         pooled: bool = False) -> dict[str, dict]:  # fmt: skip
    """Vote the PTS factors of every PTS quantizer. Returns name -> {factor: channels} (the report)."""
    qs = pts_quantizers(qunet)
    if not qs:
        log.warning("PTS: no layer matches dmq.pts_layers %s; nothing to scale", list(cfg.pts_layers))
        return {}
    G = qunet.ctx.count
    gen = torch.Generator().manual_seed(seed)
    per_group = -(-cfg.pts_samples // G)
    errs: dict[str, list[torch.Tensor]] = {n: [] for n in qs}
    current = {"g": 0}

    def make(name, q):
        def hook(mod, args):
            errs[name].append(channel_errors(args[0], q, current["g"]).cpu())

        return hook

    hooks = [q.register_forward_pre_hook(make(n, q)) for n, q in qs.items()]
    try:
        with qunet.mode(QuantMode.FULL):
            for g in range(G):
                rows = calib.draw(calib.group_rows(g, G, pooled=pooled), per_group, gen)
                x, t, cond = calib.batch(rows, device)[:3]
                current["g"] = g
                with qunet.ctx.select(g):
                    qunet.unet(x, t, encoder_hidden_states=cond) if cond is not None else qunet.unet(x, t)
    finally:
        for h in hooks:
            h.remove()
    report = {}
    for name, q in qs.items():
        factors, _ = vote(torch.cat(errs[name]), agreement=cfg.pts_agreement)
        q.pts_factors.copy_(factors.to(q.pts_factors.device))
        report[name] = {str(f): int((factors == f).sum()) for f in FACTORS}
    return report
