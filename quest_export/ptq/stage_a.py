"""Stage A (quest.md 4): weight init, optional AdaRound, per-group activation init, and the
PTQ baselines built from them (quest.md 7.1, 7.2). What runs is read from the method's
declaration (recipe/methods.py), never from its name:

    accumulate_act  activations: min/max over the whole calibration set (plain PTQ)
    act_recon       Q-Diffusion's LSQ-style activation-scale reconstruction after the init
    adaround        AdaRound/BRECQ block reconstruction of the weights (MSE-initialised)
    les / pts       DMQ's Stage A0 before the weights and Stage A4 after the activations
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch

from quest_export.calib.collect import CalibrationSet
from quest_export.log import progress
from quest_export.ptq.reconstruct import reconstruct_act_scales_, reconstruct_weights_
from quest_export.ptq.units import UnitTargets, capture_outputs, find_units
from quest_export.quant.groups import group_timesteps, step_group
from quest_export.quant.model import QuantizedUNet, QuantMode, quantize_
from quest_export.quant.observers import weight_scale_search
from quest_export.recipe.config import DmqConfig, PtqConfig, QuantRecipe
from quest_export.recipe.methods import get_method

log = logging.getLogger(__name__)
RECON_POOL = 256  # calibration rows (over all steps) used for block reconstruction
FORWARD_CHUNK = 64  # rows per UNet call while capturing


@dataclass
class StageAReport:
    adaround: dict = field(default_factory=dict)  # unit -> {before, after} reconstruction error
    eps_mse: dict = field(default_factory=dict)  # group -> MSE(eps_q, eps_fp) on held rows
    units: list = field(default_factory=list)
    les: dict = field(default_factory=dict)  # unit -> {before, after} LES loss (DMQ Stage A0)
    pts: dict = field(default_factory=dict)  # layer -> {factor: channels} of the voted PTS factors (Stage A4)
    seconds: dict = field(default_factory=dict)  # sub-stage -> wall seconds


def _elapsed(t0: float, device) -> float:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return round(time.time() - t0, 1)


def run_unet(unet, x, t, cond):
    return unet(x, t, encoder_hidden_states=cond).sample if cond is not None else unet(x, t).sample


@torch.no_grad()
def init_weights_(qunet: QuantizedUNet, *, method: str) -> None:
    """Per-output-channel weight scales by absmax or the MSE shrink search (quest.md 4.1)."""
    for m in qunet.layers().values():
        c = m.spec.split_at
        halves = [m.weight] if c is None else [m.weight[:, :c], m.weight[:, c:]]
        for wq, w in zip(m.weight_quantizers(), halves):
            s, z = weight_scale_search(w.detach(), wq.bits, symmetric=wq.symmetric, per_channel=wq.per_channel,
                                       mse=method == "mse", qmin=wq.qmin, qmax=wq.qmax)  # fmt: skip
            wq.scale.copy_(s)
            wq.zero_point.copy_(z)
            wq.unfreeze()
            wq.rounding = torch.zeros(0, dtype=torch.int8, device=wq.scale.device)


def _batches(calib: CalibrationSet, rows: torch.Tensor, device, chunk: int = FORWARD_CHUNK):
    return [calib.batch(rows[i : i + chunk], device)[:3] for i in range(0, rows.numel(), chunk)]


@torch.no_grad()
def init_activations_(qunet: QuantizedUNet, calib: CalibrationSet, cfg: PtqConfig, *, device, seed: int,
                      accumulate: bool = False, pooled: bool = False, show_progress: bool = True) -> None:  # fmt: skip
    """Initialise every activation quantizer's row for each group g, in calibration order (quest.md 4.3).

    A random batch of ``act_batch`` rows of group g (both CFG halves) runs through the model with
    weights and activations quantized, each quantizer initialising itself before quantizing, so it
    sees what its quantized upstream produces. ``running_stat`` then passes every row of the group
    (EMA, A8 only); ``accumulate`` (plain PTQ) takes the true min/max over every row.
    """
    G = qunet.ctx.count
    gen = torch.Generator().manual_seed(seed)
    unet = qunet.unet
    running = cfg.running_stat and min(q.bits for q in qunet.act_quantizers().values()) >= 8
    for q in qunet.act_quantizers().values():
        q.initialized.zero_()
    bar = progress(total=G, description="act-init", enabled=show_progress)
    for g in range(G):
        pool = calib.group_rows(g, G, pooled=pooled or G == 1)
        first = calib.draw(pool, cfg.act_batch, gen)
        rest = pool if (running or accumulate) else pool[:0]
        with (
            qunet.ctx.select(g),
            qunet.mode(QuantMode.FULL),
            qunet.calibrating(method=cfg.act_init, running_stat=running, accumulate=accumulate),
        ):
            x, t, cond = calib.batch(first, device)[:3]
            run_unet(unet, x, t, cond)
            for b in _batches(calib, rest[torch.randperm(rest.numel(), generator=gen)], device, cfg.act_batch):
                run_unet(unet, *b)
        bar.advance()
    bar.close()
    missing = [n for n, q in qunet.act_quantizers().items() if not bool(q.initialized.all())]
    if missing:
        raise RuntimeError(f"activation quantizers never saw data: {missing[:5]}")  # internal invariant


@torch.no_grad()
def eps_mse_per_group(qunet: QuantizedUNet, calib: CalibrationSet, *, device, rows_per_group: int = 16,
                      seed: int = 1234, chunk: int = 64) -> dict[int, float]:  # fmt: skip
    """MSE between the quantized and the recorded float eps, per group (held-out-style diagnostic); at most
    ``chunk`` rows per UNet call (ptq.forward_chunk: at SD size a call's attention maps grow with its rows)."""
    G = qunet.ctx.count
    gen = torch.Generator().manual_seed(seed)
    out = {}
    with qunet.mode(QuantMode.FULL):
        for g in range(G):
            rows = calib.draw(calib.group_rows(g, G, pooled=True), rows_per_group, gen)
            sq, n = 0.0, 0
            for i in range(0, len(rows), chunk):
                x, t, cond, eps = calib.batch(rows[i : i + chunk], device)
                with qunet.ctx.select(g):
                    sq += torch.sum((run_unet(qunet.unet, x, t, cond) - eps) ** 2).item()
                n += eps.numel()
            out[g] = sq / n
    return out


def run_stage_a(model, calib: CalibrationSet, quant: QuantRecipe, cfg: PtqConfig, *, groups: int, device,
                seed: int = 0, pooled: bool = False, show_progress: bool = True,
                dmq: DmqConfig | None = None) -> tuple[QuantizedUNet, StageAReport]:  # fmt: skip
    """Quantize ``model.unet`` in place and calibrate it per ``quant.method``'s declaration.

    Args:
        dmq: LES / PTS settings of the methods that declare them (None = the defaults).

    Returns:
        the quantized handle (weights frozen, every activation row initialised) and a report.
    """
    report = StageAReport()
    method = get_method(quant.method)
    dmq = dmq or DmqConfig()
    les, pts = method.les and dmq.les, method.pts and dmq.pts
    ts = group_timesteps(calib.timesteps, groups)
    qunet = quantize_(model.unet, quant, group_timesteps=ts, pts_layers=dmq.pts_layers if pts else ())
    qunet.unet.to(device)
    init_weights_(qunet, method=cfg.weight_init or method.weight_init)
    adaround = method.adaround if cfg.adaround is None else cfg.adaround
    gen = torch.Generator().manual_seed(seed)
    all_rows = torch.arange(calib.x.shape[0])
    recon_rows = calib.draw(all_rows, min(RECON_POOL, all_rows.numel()), gen)
    batches = _batches(calib, recon_rows, device, cfg.forward_chunk)
    store = "cpu" if cfg.recon_store == "cpu" else device

    def run_batch(b):
        run_unet(qunet.unet, *b)

    units = []
    act_recon = method.act_recon and cfg.act_recon_iters > 0
    les = les and dmq.les_iters > 0
    if (adaround and cfg.adaround_iters > 0) or act_recon or les:
        with torch.no_grad(), qunet.ctx.select(0), qunet.mode(QuantMode.FP):
            units = find_units(qunet.unet, lambda: run_batch(batches[0]))
            if les:  # LES folds its scales into the weights: its float targets are taken before any fold
                targets = capture_outputs(qunet.unet, units, batches, run_batch, store)

        def float_context():
            stack = contextlib.ExitStack()
            for c in (torch.no_grad(), qunet.ctx.select(0), qunet.mode(QuantMode.FP)):
                stack.enter_context(c)
            return stack

        if not les:  # one unit's targets at a time, recomputed (issue 15)
            targets = UnitTargets(qunet.unet, units, batches, run_batch, store, float_context)
        report.units = [u.name for u in units]
    if les:  # Stage A0 (DMQ): gamma learned on float inputs and targets, folded, weights re-initialised
        from quest_export.ptq.les import learn_equivalent_scales_

        t0 = time.time()
        row_groups = torch.tensor([step_group(int(i), calib.steps, groups) for i in calib.step[recon_rows]])
        with qunet.ctx.select(0):
            report.les = learn_equivalent_scales_(qunet, units, batches, run_batch, targets, row_groups, cfg=dmq,
                                                  groups=groups, device=device, store=store,
                                                  show_progress=show_progress)  # fmt: skip
        init_weights_(qunet, method=cfg.weight_init or method.weight_init)  # quest.md 4.1 on the folded weights
        report.seconds["les"] = _elapsed(t0, device)
    if adaround and cfg.adaround_iters > 0:
        t0 = time.time()
        with qunet.ctx.select(0):
            report.adaround = reconstruct_weights_(qunet, units, batches, run_batch, targets, iters=cfg.adaround_iters,
                                                   batch=cfg.adaround_batch, lr=cfg.adaround_lr, reg=cfg.adaround_reg,
                                                   device=device, store=store, seed=seed,
                                                   cuda_graphs=cfg.cuda_graphs and cfg.recon_store != "cpu", show_progress=show_progress)  # fmt: skip
        report.seconds["adaround"] = _elapsed(t0, device)
    qunet.freeze_weights()  # round to nearest where AdaRound did not run; w_int stored for all
    t0 = time.time()
    init_activations_(qunet, calib, cfg, device=device, seed=seed, accumulate=method.accumulate_act, pooled=pooled,
                      show_progress=show_progress)  # fmt: skip
    report.seconds["act_init"] = _elapsed(t0, device)
    if act_recon:
        t0 = time.time()
        with qunet.ctx.select(0):
            reconstruct_act_scales_(qunet, units, batches, run_batch, targets, iters=cfg.act_recon_iters,
                                    batch=cfg.adaround_batch, lr=cfg.act_recon_lr, device=device, store=store,
                                    seed=seed, cuda_graphs=cfg.cuda_graphs and cfg.recon_store != "cpu", show_progress=show_progress)  # fmt: skip
        report.seconds["act_recon"] = _elapsed(t0, device)
    if pts:  # Stage A4 (DMQ): per-channel power-of-two factors voted over samples of every group
        from quest_export.ptq.pts import power_of_two_scales_

        t0 = time.time()
        report.pts = power_of_two_scales_(qunet, calib, dmq, device=device, seed=dmq.seed, pooled=pooled)
        report.seconds["pts"] = _elapsed(t0, device)
    report.eps_mse = eps_mse_per_group(qunet, calib, device=device, chunk=cfg.forward_chunk)
    return qunet, report
