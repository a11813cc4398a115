"""Scale initialisation: weights by MSE grid search, activations by min/max, percentile or MSE.

All searches score candidates with the same ``fake_quant`` the model uses (round half to even),
so the chosen scale is the one that is exported.
"""

from __future__ import annotations

import torch

from quest_export.quant.primitives import asymmetric_params, fake_quant, symmetric_scale

WEIGHT_SHRINK_STEPS = 80  # c_i = 1 - 0.01 i, i = 0..79 (quest.md 4.1)
WEIGHT_MSE_P = 2.4
PERCENTILES = (0.999, 0.9999, 0.99999)
ACT_MSE_STEPS = 40  # clipping ratios 1, 0.98, ..., 0.22
ACT_MSE_P = 2.0


def _params(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, zero_anchored: bool = False):
    """Scale and zero point of the grid covering [lo, hi]."""
    if zero_anchored:  # unsigned, z = 0 (softmax probabilities)
        s = hi.clamp_min(0) / (2**bits - 1)
        return torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s)
    if symmetric:
        return symmetric_scale(torch.maximum(lo.abs(), hi.abs()), bits), torch.zeros_like(lo)
    return asymmetric_params(lo, hi, bits)


@torch.no_grad()
def weight_scale_search(w: torch.Tensor, bits: int, *, symmetric: bool, per_channel: bool, mse: bool,
                        qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-output-channel scale (and zero point) of weight w (C_out, ...).

    absmax (mse=False) or the shrink factor c minimising sum |W - W_hat|^2.4 per channel.
    Returns tensors shaped (C_out, 1, ...) (or all-ones dims for per-tensor).
    """
    dims = tuple(range(1, w.dim())) if per_channel else tuple(range(w.dim()))
    lo, hi = w.amin(dim=dims, keepdim=True), w.amax(dim=dims, keepdim=True)
    best_s, best_z = _params(lo, hi, bits, symmetric)
    if not mse:
        return best_s, best_z
    best_err = torch.full_like(best_s, float("inf"))
    for i in range(WEIGHT_SHRINK_STEPS):
        c = 1.0 - 0.01 * i
        s, z = _params(lo * c, hi * c, bits, symmetric)
        err = (w - fake_quant(w, s, z, qmin, qmax)).abs().pow(WEIGHT_MSE_P).sum(dim=dims, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


@torch.no_grad()
def activation_params(x: torch.Tensor, *, bits: int, symmetric: bool, zero_anchored: bool, qmin: int, qmax: int,
                      method: str, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None):  # fmt: skip
    """Scale / zero point of an activation from samples x ((M,) per-tensor or (M, C) per-channel).

    minmax: the observed range (lo/hi if given, else of x); percentile: the best of clipping at
    the 0.999 / 0.9999 / 0.99999 quantiles (two-sided, or of |x| when symmetric) by L2 error;
    mse: the best of 40 clipping ratios of the range by L2 error.
    """
    per_channel = x.dim() == 2
    red = 0 if per_channel else None
    if lo is None:
        lo = x.amin(dim=0) if per_channel else x.min().reshape(1)
        hi = x.amax(dim=0) if per_channel else x.max().reshape(1)
    s0, z0 = _params(lo, hi, bits, symmetric, zero_anchored)
    if method == "minmax":
        return s0, z0
    cands: list[tuple[torch.Tensor, torch.Tensor]] = [(s0, z0)]
    if method == "percentile":
        xs = x.float()
        for p in PERCENTILES:
            if symmetric or zero_anchored:
                m = torch.quantile(xs.abs(), p, dim=red) if per_channel else torch.quantile(xs.abs(), p).reshape(1)
                cands.append(_params(-m, m, bits, symmetric, zero_anchored))
            else:
                ql = torch.quantile(xs, 1 - p, dim=red) if per_channel else torch.quantile(xs, 1 - p).reshape(1)
                qh = torch.quantile(xs, p, dim=red) if per_channel else torch.quantile(xs, p).reshape(1)
                cands.append(_params(ql, qh, bits, symmetric, zero_anchored))
    elif method == "mse":
        for i in range(1, ACT_MSE_STEPS):
            c = 1.0 - 0.02 * i
            cands.append(_params(lo * c, hi * c, bits, symmetric, zero_anchored))
    else:
        raise ValueError(method)  # internal: recipe validation allows only the three names
    best_s, best_z, best_err = s0, z0, None
    for s, z in cands:
        err = (x - fake_quant(x, s, z, qmin, qmax)).abs().pow(ACT_MSE_P)
        err = err.sum(dim=0) if per_channel else err.sum().reshape(1)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z
