"""Per-layer, per-timestep-group activation statistics of a quantized UNet, for the run report.

    snap = layer_snapshot(qunet, calib, device="cpu")   # {layer: [per-group record, ...]}

One forward per timestep group over a few calibration rows (FULL mode, the group forced), with a forward hook
on every quantized layer. A group's record holds the histogram of the layer's input as its input quantizer
sees it (after LES), that quantizer's clipping range, and two signal-to-quantization-noise ratios:

    sqnr_in  = 10 log10(|x|^2 / |x - Q(x)|^2)                   the input quantizer's error
    sqnr_out = 10 log10(|y_f|^2 / |y_q - y_f|^2)                the layer's error: y_q is the quantized layer's
                                                                output, y_f the same layer in float (latent
                                                                weight, unquantized input) on the same input

The quantize stage records a snapshot after Stage A and another after finetuning (quest_export.methods), so that
the report can show how finetuning reshaped each layer's activation distribution without re-running anything.
Reads only: no quantizer state changes.
"""

from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F

from quest_export.quant.model import QuantizedUNet, QuantMode

STATS_FILE = "layer_stats.json"
SCHEMA = 1
BINS = 48
ROWS_PER_GROUP = 8
SEED = 4321


def _num(v: float) -> float | None:
    """A float for JSON: 6 significant digits; None for a non-finite value (strict JSON)."""
    v = float(v)
    return float(f"{v:.6g}") if math.isfinite(v) else None


def _sqnr(signal: torch.Tensor, noise: torch.Tensor) -> float | None:
    p_s, p_n = float(signal.double().pow(2).sum()), float(noise.double().pow(2).sum())
    if p_n == 0.0:
        return None  # exact (no quantization noise): infinite SQNR
    return _num(10 * math.log10(max(p_s, 1e-30) / p_n))


def _clip_range(q, g: int) -> tuple[float, float]:
    """[lo, hi] an activation quantizer represents in group g (over its channels)."""
    s = q.scales[g].detach().float()
    if q.pts_factors is not None:
        s = s * q.pts_factors.float()
    z = 0.0 if (q.symmetric or q.zero_anchored) else q.zero_points[g].float()
    return float(((q.qmin - z) * s).min()), float(((q.qmax - z) * s).max())


def _float_output(m, x: torch.Tensor) -> torch.Tensor:
    if m.spec.kind == "conv":
        return m._conv_forward(x, m.weight, m.bias)
    return F.linear(x, m.weight, m.bias)


@torch.no_grad()
def layer_snapshot(qunet: QuantizedUNet, calib, *, device, rows_per_group: int = ROWS_PER_GROUP,
                   bins: int = BINS, seed: int = SEED) -> dict[str, list[dict]]:  # fmt: skip
    """{layer name: [record of group 0, ..., group G-1]} (see the module docstring)."""
    from quest_export.ptq.stage_a import run_unet

    G = qunet.ctx.count
    out: dict[str, list[dict]] = {name: [] for name in qunet.layers()}
    state = {"g": 0}

    def hook(name):
        def fn(m, args, y):
            x = args[0].detach()
            xin = m.les_input(x).float()
            lo, hi = float(xin.min()), float(xin.max())
            counts = torch.histc(xin, bins=bins, min=lo, max=hi if hi > lo else lo + 1.0)
            qs = m.input_quantizers()
            clip = None
            if qs:
                ranges = [_clip_range(q, state["g"]) for q in qs]
                clip = [_num(min(r[0] for r in ranges)), _num(max(r[1] for r in ranges))]
            y_f = _float_output(m, x)
            rec = {"min": _num(lo), "max": _num(hi), "counts": [int(c) for c in counts.tolist()], "clip": clip,
                   "sqnr_out": _sqnr(y_f, y.detach() - y_f),
                   "sqnr_in": _sqnr(xin, m.quantized_input(x).float() - xin) if qs else None}  # fmt: skip
            out[name].append(rec)

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in qunet.layers().items()]
    gen = torch.Generator().manual_seed(seed)
    try:
        with qunet.mode(QuantMode.FULL):
            for g in range(G):
                rows = calib.draw(calib.group_rows(g, G, pooled=True), rows_per_group, gen)
                x, t, cond, _ = calib.batch(rows, device)
                state["g"] = g
                with qunet.ctx.select(g):
                    run_unet(qunet.unet, x, t, cond)
    finally:
        for h in handles:
            h.remove()
    return {name: recs for name, recs in out.items() if len(recs) == G}  # a layer the forward never ran is left out


def stats_document(snapshots: dict[str, dict], qunet: QuantizedUNet, *, rows_per_group: int = ROWS_PER_GROUP,
                   bins: int = BINS) -> dict:  # fmt: skip
    """The layer_stats.json document: the snapshots (e.g. "stage_a", "finetuned") and how they were taken."""
    return {"schema": SCHEMA, "bins": bins, "rows_per_group": rows_per_group, "groups": qunet.ctx.count,
            "group_timesteps": list(qunet.ctx.timesteps), "snapshots": snapshots,
            "layers": {s.name: {"w_bits": s.w_bits, "a_bits": s.a_bits, "role": s.role} for s in qunet.plan.layers}}  # fmt: skip


def dumps(doc: dict) -> str:
    return json.dumps(doc, sort_keys=True, allow_nan=False) + "\n"
