"""Quantizer math, in one place, bit-identical to ONNX QuantizeLinear / DequantizeLinear.

    q = clamp(round_half_to_even(x / s) + z, q_min, q_max)        x_hat = (q - z) * s

s: scale, z: zero point (an integer stored as float), b: bits. Symmetric grids are signed
full range [-2^(b-1), 2^(b-1) - 1] with z = 0; asymmetric grids are unsigned [0, 2^b - 1].
We divide by s (never multiply by a reciprocal) so that ties land where QuantizeLinear puts
them; ``torch.round`` rounds half to even. Gradients are straight-through (quest.md 2.2-2.4).
"""

from __future__ import annotations

import torch

SCALE_MIN = 1e-8  # scales are clamped to at least this after every optimizer step


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of a b-bit grid: signed full range or unsigned."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity gradient."""
    return x + (torch.round(x) - x).detach()


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """Floor in the forward pass, identity gradient (latent weights under frozen AdaRound bits)."""
    return x + (torch.floor(x) - x).detach()


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float, qmin: int, qmax: int
) -> torch.Tensor:
    """Integer codes (as a float tensor) exactly like ONNX QuantizeLinear."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float) -> torch.Tensor:
    """ONNX DequantizeLinear: (q - z) * s."""
    return (q - zero_point) * scale


def fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float | None, qmin: int, qmax: int
) -> torch.Tensor:
    """DequantizeLinear(QuantizeLinear(x)) with straight-through gradients for x and the scale.

    The scale receives the LSQ-style gradient (round(x/s) - x/s inside the range, q_min/q_max
    minus z where clamped); no gradient-scale factor. ``zero_point`` None (or 0.0) is a
    symmetric grid. Both paths compute the same forward values, equal to ONNX Q/DQ element for
    element (a symmetric code 0 may come back as -0.0 where DequantizeLinear gives +0.0; they
    compare equal and every downstream sum is the same).
    """
    z = None if zero_point is None or (isinstance(zero_point, (int, float)) and zero_point == 0) else zero_point
    if torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad):
        return _FakeQuantSTE.apply(x, scale, z, qmin, qmax)
    with torch.no_grad():
        q = torch.round(x / scale)
        if z is not None:
            q = q.add_(z)
        q = q.clamp_(qmin, qmax)
        return (q.sub_(z) if z is not None else q).mul_(scale)


class _FakeQuantSTE(torch.autograd.Function):
    """``fake_quant`` for training, its gradients written out (about half the kernels of plain autograd).

    With v = x / s, r = round(v) + z, q = clamp(r, q_min, q_max), inside = (q == r):
        d out / d x = inside                    (straight through, 0 where clamped)
        d out / d s = (q - z) - inside * v      (LSQ, summed over the broadcast dimensions of s)
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax):
        v = x / scale
        r = torch.round(v)
        if zero_point is not None:
            r = r.add_(zero_point)
        q = torch.clamp(r, qmin, qmax)
        inside = q == r
        qz = q.sub_(zero_point) if zero_point is not None else q
        out = qz * scale
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(inside, torch.where(inside, qz - v, qz))
            ctx.scale_shape = scale.shape
        else:
            ctx.save_for_backward(inside)
        return out

    @staticmethod
    def backward(ctx, grad):
        inside = ctx.saved_tensors[0]
        gx = torch.where(inside, grad, 0.0) if ctx.needs_input_grad[0] else None
        gs = (grad * ctx.saved_tensors[1]).sum_to_size(ctx.scale_shape) if ctx.needs_input_grad[1] else None
        return gx, gs, None, None, None


def symmetric_scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    """s = m / (2^(b-1) - 1); a zero range (dead channel) gets scale 1 (deploy.md E-6)."""
    s = amax / (2 ** (bits - 1) - 1)
    return torch.where(s > 0, s, torch.ones_like(s))


def asymmetric_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """s = (max - min) / (2^b - 1), z = clamp(round(-min / s), 0, 2^b - 1); the range always holds 0."""
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    s = (hi - lo) / (2**bits - 1)
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = torch.clamp(torch.round(-lo / s), 0, 2**bits - 1)
    return s, z
