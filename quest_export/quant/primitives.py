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
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float, qmin: int, qmax: int
) -> torch.Tensor:
    """DequantizeLinear(QuantizeLinear(x)) with straight-through gradients for x and the scale.

    The scale receives the LSQ-style gradient (round(x/s) - x/s inside the range, q_min/q_max
    minus z where clamped) through plain autograd; no gradient-scale factor.
    """
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


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
