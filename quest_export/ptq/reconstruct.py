"""Stage A2: AdaRound / BRECQ block reconstruction, and Q-Diffusion's activation-scale reconstruction.

AdaRound (Nagel et al. 2020) learns, per weight, whether to round down or up:
    W_int = clamp(floor(W / Delta) + h(alpha), q_min, q_max),
    h(alpha) = clamp(sigmoid(alpha) (zeta - gamma) + gamma, 0, 1),  zeta = 1.1, gamma = -0.1
    loss = reconstruction + lambda * sum(1 - |2 h(alpha) - 1|^beta)
with beta annealed 20 -> 2 after a warm-up of 20 % (regulariser off). Delta stays at its
MSE-search value. Block inputs come from the partially quantized model (weights on,
activations off), targets from the float model (quest.md 4.2).
"""

from __future__ import annotations

import logging

import torch

from quest_export import dist
from quest_export.log import progress
from quest_export.ptq.steps import graphs_usable, run_steps
from quest_export.ptq.units import Unit, capture_inputs, channel_sq_error
from quest_export.quant.model import QuantizedUNet, QuantMode
from quest_export.quant.modules import QuantModule
from quest_export.quant.quantizer import (
    ADAROUND_GAMMA,
    ADAROUND_ZETA,
    ActQuantizer,
    WeightQuantizer,
)

log = logging.getLogger(__name__)
WARMUP, BETA_START, BETA_END = 0.2, 20.0, 2.0


def _init_alpha(wq: WeightQuantizer, w: torch.Tensor) -> None:
    """alpha such that h(alpha) equals the fractional part of W / Delta."""
    v = w.detach() / wq.scale
    wq.alpha_floor = torch.floor(v)  # W and Delta stay fixed while alpha trains
    frac = (v - wq.alpha_floor).clamp(0.01, 0.99)
    alpha = -torch.log((ADAROUND_ZETA - ADAROUND_GAMMA) / (frac - ADAROUND_GAMMA) - 1)
    wq.alpha = torch.nn.Parameter(alpha)


def _unit_weights(unit: Unit) -> list[tuple[WeightQuantizer, torch.Tensor]]:
    pairs = []
    for m in unit.module.modules():
        if isinstance(m, QuantModule) and m.weight_quantizer is not None and not m.weight_quantizer.frozen:
            c = m.spec.split_at
            if c is None:
                pairs.append((m.weight_quantizer, m.weight))
            else:
                pairs += [(m.weight_quantizer, m.weight[:, :c]), (m.weight_quantizer_skip, m.weight[:, c:])]
    return pairs


def adaround_unit(unit: Unit, qunet: QuantizedUNet, inputs, target: torch.Tensor, *, iters: int, batch: int,
                  lr: float, reg: float, device, seed: int, cuda_graphs: bool = True) -> dict:  # fmt: skip
    """Reconstruct one unit and harden its rounding. Returns {'before': err, 'after': err, 'loop': graph|eager}."""
    pairs = _unit_weights(unit)
    gen = torch.Generator().manual_seed(seed)
    n = inputs.n
    if iters <= 0:
        raise ValueError("adaround_unit needs iters >= 1")  # internal: callers skip AdaRound at 0 iterations

    def recon(idx, hard=False):
        args, kwargs = inputs.select(idx, device)
        if hard:
            for wq, w in pairs:
                wq.freeze(w)
        out = unit.module(*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        return channel_sq_error(out, target[idx.to(target.device)].to(device))

    eval_idx = torch.randperm(n, generator=gen)[: min(n, 4 * batch)]
    with torch.no_grad(), qunet.mode(QuantMode.WEIGHT_ONLY):
        before = recon(eval_idx).item()  # round to nearest, on the rows used for "after"
    for wq, w in pairs:
        _init_alpha(wq, w)
    alphas = [wq.alpha for wq, _ in pairs]
    graph = graphs_usable(device, cuda_graphs)
    opt = torch.optim.Adam(alphas, lr=lr, capturable=alphas[0].is_cuda)  # on a GPU always: same numbers, graph or not
    # the whole schedule up front, on the device: batch rows, beta and the regulariser switch per iteration
    dev = alphas[0].device
    idx_all = torch.randint(0, n, (iters, min(batch, n)), generator=gen).to(dev)
    start = WARMUP * iters
    frac = ((torch.arange(iters, dtype=torch.float32) - start) / max(1.0, (1 - WARMUP) * iters)).clamp(0, 1)
    beta_all = (BETA_END + (BETA_START - BETA_END) * (1 - frac)).to(dev)
    on_all = (torch.arange(iters) >= start).float().to(dev)
    idx, beta, on = idx_all[0].clone(), beta_all[0].clone(), on_all[0].clone()

    def prepare(it: int) -> None:
        idx.copy_(idx_all[it])
        beta.copy_(beta_all[it])
        on.copy_(on_all[it])

    def step() -> None:
        if dist.data_parallel():  # this rank's rows, weighted by their share; the regulariser split evenly
            local, share = dist.share(idx)
            loss = share * recon(local)
            rounding = sum((1 - (2 * wq.soft_h - 1).abs().pow(beta)).sum() for wq, _ in pairs)
            loss = loss + (reg * on / dist.world().size) * rounding
            opt.zero_grad(set_to_none=True)
            loss.backward()
            dist.sum_grads_(alphas, what="AdaRound")
            opt.step()
            return
        loss = recon(idx)  # sets each quantizer's soft_h = h(alpha), which the regulariser reuses
        rounding = sum((1 - (2 * wq.soft_h - 1).abs().pow(beta)).sum() for wq, _ in pairs)
        loss = loss + (reg * on) * rounding  # zero during the warm-up
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with torch.enable_grad(), qunet.mode(QuantMode.WEIGHT_ONLY):
        loop = run_steps(step, prepare, iters, graph=graph)
    with torch.no_grad(), qunet.mode(QuantMode.WEIGHT_ONLY):
        after = recon(eval_idx, hard=True).item()  # hardens: rounding bits + w_int
    return {"before": before, "after": after, "loop": loop}


def reconstruct_weights_(qunet: QuantizedUNet, units: list[Unit], batches, run_batch, targets: dict, *, iters: int,
                         batch: int, lr: float, reg: float, device, store, seed: int = 0, cuda_graphs: bool = True,
                         show_progress: bool = True) -> dict[str, dict]:  # fmt: skip
    """AdaRound every unit in execution order; units already frozen are skipped."""
    report: dict[str, dict] = {}
    bar = progress(total=len(units), description="adaround", enabled=show_progress)
    try:
        for k, unit in enumerate(units):
            if not _unit_weights(unit):
                bar.advance()
                continue
            with torch.no_grad(), qunet.mode(QuantMode.WEIGHT_ONLY):
                inputs = capture_inputs(qunet.unet, unit, batches, run_batch, store)
            report[unit.name] = adaround_unit(unit, qunet, inputs, targets[unit.name], iters=iters, batch=batch, lr=lr,
                                              reg=reg, device=device, seed=seed + k, cuda_graphs=cuda_graphs)  # fmt: skip
            r = report[unit.name]
            bar.advance(postfix=f"{unit.name}: {r['before']:.3g} -> {r['after']:.3g}")
    finally:
        bar.close()
    return report


def reconstruct_act_scales_(qunet: QuantizedUNet, units: list[Unit], batches, run_batch, targets: dict, *,
                            iters: int, batch: int, lr: float, device, store, seed: int = 0, cuda_graphs: bool = True,
                            show_progress: bool = True) -> None:  # fmt: skip
    """Q-Diffusion's LSQ-style activation-scale reconstruction (shared scales, G = 1), unit by unit."""
    bar = progress(total=len(units), description="act-recon", enabled=show_progress)
    p = 2.4
    graph = graphs_usable(device, cuda_graphs)
    try:
        for k, unit in enumerate(units):
            qs = [q for q in unit.module.modules() if isinstance(q, ActQuantizer)]
            if not qs or iters <= 0:
                bar.advance()
                continue
            with torch.no_grad(), qunet.mode(QuantMode.FULL):
                inputs = capture_inputs(qunet.unet, unit, batches, run_batch, store)
            params = [q.scales[0] for q in qs]
            opt = torch.optim.Adam(params, lr=lr, capturable=params[0].is_cuda)
            gen = torch.Generator().manual_seed(seed + k)
            target = targets[unit.name]
            idx_all = torch.randint(0, inputs.n, (iters, min(batch, inputs.n)), generator=gen).to(params[0].device)
            idx = idx_all[0].clone()

            def prepare(it: int, idx=idx, idx_all=idx_all) -> None:
                idx.copy_(idx_all[it])

            def step(idx=idx, qs=qs, opt=opt, target=target, inputs=inputs, unit=unit, params=params) -> None:
                rows, share = dist.share(idx)  # (idx, 1.0) in a one-process run
                args, kwargs = inputs.select(rows, device)
                out = unit.module(*args, **kwargs)
                out = out[0] if isinstance(out, tuple) else out
                loss = (out - target[rows.to(target.device)].to(device)).abs().pow(p).mean()
                if dist.data_parallel():
                    loss = share * loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                dist.sum_grads_(params, what="activation-scale reconstruction")
                opt.step()
                for q in qs:
                    q.clamp_scales_()

            with torch.enable_grad(), qunet.mode(QuantMode.FULL):
                run_steps(step, prepare, iters, graph=graph)
            bar.advance()
    finally:
        bar.close()
