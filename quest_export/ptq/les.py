"""DMQ Stage A0: learned equivalent scaling (LES) with the timestep-weighted loss (quest.md 7.6).

Every quantized layer with its own input quantizer gets a per-input-channel scale gamma (init 1):

    x' = x / gamma          W' = W diag(gamma)          y = op(Q(x'), Q(W'))    (= op(x, W) in float)

While LES trains, both quantizers are dynamic: per-tensor min/max of x' on the current batch and
per-output-channel min/max of W', round to nearest with straight-through gradients; the scales keep
their gradient, which is what moves gamma (without quantization the product does not depend on it).
Gammas train block by block (the AdaRound units, ptq/units.py) on float inputs against float targets,
Adam with lr cosine-decayed to 0, on the timestep-weighted loss

    L_i = squared error summed over channels, averaged over positions        (sample i, group g(i))
    Lbar_g <- m Lbar_g + (1 - m) mean_{i in g} L_i       (EMA, m = 0.95; set by the first observation)
    w_g = (1 - Lbar_g / sum_h Lbar_h)^r   (detached; r = 20)          L = mean_i w_g(i) L_i

Afterwards gamma is folded into the weight (W <- W diag(gamma)), the weight quantizer is
re-initialised on the folded weight by the caller, and ``les_scale`` keeps gamma on the input side.
"""

from __future__ import annotations

import logging
import math

import torch

from quest_export.log import progress
from quest_export.ptq.units import Unit, capture_inputs
from quest_export.quant.model import QuantizedUNet, QuantMode
from quest_export.quant.modules import QuantModule
from quest_export.quant.primitives import SCALE_MIN, asymmetric_params, fake_quant, qrange
from quest_export.recipe.config import DmqConfig

log = logging.getLogger(__name__)
GAMMA_MIN = 1e-3  # gamma is clamped to at least this after every step (a zero would divide by zero)


def les_layers(module: torch.nn.Module) -> list[QuantModule]:
    return [m for m in module.modules() if isinstance(m, QuantModule) and m.les_scale is not None]


def _dynamic_fake_quant(v: torch.Tensor, bits: int, symmetric: bool, reduce_dims: tuple[int, ...] | None):
    """Min/max fake quant of v on its own range (over ``reduce_dims``, None = the whole tensor)."""
    qmin, qmax = qrange(bits, signed=symmetric)
    kw = {} if reduce_dims is None else {"dim": reduce_dims, "keepdim": True}
    if symmetric:
        s = (v.abs().amax(**kw) / qmax).clamp_min(SCALE_MIN)
        return fake_quant(v, s, None, qmin, qmax)
    lo, hi = v.amin(**kw), v.amax(**kw)
    s, z = asymmetric_params(lo, hi, bits)  # s keeps its gradient (hi - lo), z is rounded (no gradient)
    return fake_quant(v, s.clamp_min(SCALE_MIN), z.detach(), qmin, qmax)


def les_forward(m: QuantModule, x: torch.Tensor, op) -> torch.Tensor:
    """op(Q(x / gamma), Q(W diag(gamma))) with dynamic quantizers (m.les_gamma is the trainable gamma)."""
    spec = m.spec
    shape_x = [1] * x.dim()
    shape_x[1 if spec.kind == "conv" else -1] = -1
    xs = m.les_input(x) / m.les_gamma.view(shape_x)  # (N, C_in, ...) or (..., C_in); les_scale: earlier folds
    shape_w = [1] * m.weight.dim()
    shape_w[1] = -1
    w = m.weight * m.les_gamma.view(shape_w)  # (C_out, C_in, ...): input channels scaled
    xq = _dynamic_fake_quant(xs, spec.a_bits, spec.a_symmetric, None)
    wq = _dynamic_fake_quant(w, spec.w_bits, spec.w_symmetric, tuple(range(1, w.dim())))
    return op(xq, wq)


class TimestepWeights:
    """DMQ's adaptive timestep weights: an EMA table of the loss per group, weights (1 - share)^r.

    Groups not observed yet have no entry; while fewer than two groups are known every weight is 1
    (one group's share is 1, which would weigh it 0).
    """

    def __init__(self, groups: int, *, r: float = 20.0, momentum: float = 0.95) -> None:
        self.r, self.momentum = r, momentum
        self.table = torch.full((groups,), float("nan"))  # Lbar_g, NaN = not observed

    def update(self, losses: torch.Tensor, groups: torch.Tensor) -> None:
        """Fold the mean loss of each group's samples in this batch into the table."""
        losses, groups = losses.detach().float().cpu(), groups.cpu()
        for g in groups.unique().tolist():
            mean = losses[groups == g].mean()
            old = self.table[g]
            self.table[g] = mean if torch.isnan(old) else self.momentum * old + (1 - self.momentum) * mean

    def weights(self) -> torch.Tensor:
        """w_g = (1 - Lbar_g / sum_h Lbar_h)^r over the observed groups; (G,), detached."""
        seen = ~torch.isnan(self.table)
        w = torch.ones_like(self.table)
        if int(seen.sum()) >= 2:
            share = self.table[seen] / self.table[seen].sum().clamp_min(1e-30)
            w[seen] = (1 - share).pow(self.r)
        return w


def per_sample_sq_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L_i: squared error summed over channels, averaged over positions; (N,)."""
    d = (a - b).float().pow(2)
    if d.dim() == 4:  # (N, C, H, W)
        return d.sum(1).flatten(1).mean(1)
    if d.dim() == 3:  # (N, L, C)
        return d.sum(-1).mean(1)
    return d.flatten(1).sum(1)  # (N, C)


def les_unit(unit: Unit, qunet: QuantizedUNet, inputs, target: torch.Tensor, row_groups: torch.Tensor, *,
             cfg: DmqConfig, groups: int, device, seed: int) -> dict:  # fmt: skip
    """Train the gammas of one unit's layers, then fold them. Returns {'before', 'after', 'layers'}."""
    layers = les_layers(unit.module)
    gen = torch.Generator().manual_seed(seed)
    n = inputs.n
    gammas = []
    for m in layers:
        m.les_gamma = torch.nn.Parameter(torch.ones_like(m.les_scale))
        gammas.append(m.les_gamma)
    weights = TimestepWeights(groups, r=cfg.les_r, momentum=cfg.les_momentum)

    def losses(idx):
        args, kwargs = inputs.select(idx, device)
        out = unit.module(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return per_sample_sq_error(out, target[idx].to(device))

    eval_idx = torch.randperm(n, generator=gen)[: min(n, 4 * cfg.les_batch)]
    try:
        with torch.no_grad(), qunet.mode(QuantMode.FP):
            before = losses(eval_idx).mean().item()  # gamma = 1: plain dynamic min/max quantization
        opt = torch.optim.Adam(gammas, lr=cfg.les_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.les_iters), eta_min=0.0)
        with torch.enable_grad(), qunet.mode(QuantMode.FP):  # the layers quantize themselves (les_forward)
            for _ in range(cfg.les_iters):
                idx = torch.randint(0, n, (min(cfg.les_batch, n),), generator=gen)
                li = losses(idx)  # (B,)
                g = row_groups[idx]
                weights.update(li, g)
                w = weights.weights().to(li.device)[g.to(li.device)]  # (B,), detached
                loss = (w * li).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    for p in gammas:
                        p.clamp_(min=GAMMA_MIN)
        with torch.no_grad(), qunet.mode(QuantMode.FP):
            after = losses(eval_idx).mean().item()
    finally:
        for m in layers:
            gamma = m._parameters.pop("les_gamma")  # registered while it trained; never part of the state
            m.les_gamma = None
            fold_les_(m, gamma.detach())
    return {"before": before, "after": after, "layers": len(layers)}


@torch.no_grad()
def fold_les_(m: QuantModule, gamma: torch.Tensor) -> None:
    """W <- W diag(gamma) and les_scale <- les_scale * gamma: the float layer computes the same function."""
    shape = (1, -1) + (1,) * (m.weight.dim() - 2)
    m.weight.mul_(gamma.view(shape))  # (C_out, C_in, ...)
    m.les_scale.mul_(gamma)


def learn_equivalent_scales_(qunet: QuantizedUNet, units: list[Unit], batches, run_batch, targets: dict,
                             row_groups: torch.Tensor, *, cfg: DmqConfig, groups: int, device, store,
                             show_progress: bool = True) -> dict[str, dict]:  # fmt: skip
    """LES for every unit in execution order (float inputs, float targets). Returns unit -> losses."""
    report: dict[str, dict] = {}
    bar = progress(total=len(units), description="les", enabled=show_progress)
    try:
        for k, unit in enumerate(units):
            if not les_layers(unit.module) or cfg.les_iters <= 0:
                bar.advance()
                continue
            with torch.no_grad(), qunet.mode(QuantMode.FP):
                inputs = capture_inputs(qunet.unet, unit, batches, run_batch, store)
            r = les_unit(unit, qunet, inputs, targets[unit.name], row_groups, cfg=cfg, groups=groups, device=device,
                         seed=cfg.seed + k)  # fmt: skip
            report[unit.name] = r
            bar.advance(postfix=f"{unit.name}: {r['before']:.3g} -> {r['after']:.3g}")
            if not math.isfinite(r["after"]):
                from quest_export.errors import TrainingDivergedError

                raise TrainingDivergedError(f"LES diverged in {unit.name} (loss {r['after']}); lower dmq.les_lr")
    finally:
        bar.close()
    return report
