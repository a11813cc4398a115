"""The two quantizers: per-output-channel weights and per-group activation tables.

Every tensor a quantizer owns is a registered parameter or buffer, so ``state_dict()`` is
the whole contract (integer weights, scales, zero points, rounding bits). Flags that only
steer a run (enabled, calib) are plain attributes set through ``QuantizedUNet.mode`` and
``QuantizedUNet.calibrating``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from quest_export.quant.primitives import SCALE_MIN, fake_quant, floor_ste, qrange, round_ste

# AdaRound rectified sigmoid h(alpha) = clamp(sigmoid(alpha) * (zeta - gamma) + gamma, 0, 1)
ADAROUND_ZETA, ADAROUND_GAMMA = 1.1, -0.1


def rectified_sigmoid(alpha: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(alpha) * (ADAROUND_ZETA - ADAROUND_GAMMA) + ADAROUND_GAMMA, 0, 1)


class WeightQuantizer(nn.Module):
    """Per-output-channel (or per-tensor) weight quantizer.

    Three ways to get integer codes, in this order:
      1. ``w_int`` (int8 buffer) is set: the stored integers are used as they are. They are
         computed once when a stage ends (``freeze``) and never re-derived downstream.
      2. ``alpha`` is set (AdaRound reconstruction): W_int = clamp(floor(W/s) + h(alpha) + z).
      3. ``rounding`` bits are set (hardened AdaRound): clamp(floor_ste(W/s) + h + z), so the
         latent weight can train while h stays frozen (quest.md 2.3); else round_ste(W/s).
    """

    def __init__(self, weight_shape: tuple[int, ...], *, bits: int, symmetric: bool, per_channel: bool) -> None:
        super().__init__()
        self.bits, self.symmetric, self.per_channel = bits, symmetric, per_channel
        self.qmin, self.qmax = qrange(bits, signed=symmetric)
        sshape = (weight_shape[0],) + (1,) * (len(weight_shape) - 1) if per_channel else (1,) * len(weight_shape)
        self.register_buffer("scale", torch.ones(sshape))  # Delta_o: (C_out, 1, ...)
        self.register_buffer("zero_point", torch.zeros(sshape))  # integer-valued; 0 when symmetric
        self.register_buffer("rounding", torch.zeros(0, dtype=torch.int8))  # hardened AdaRound bits h
        self.register_buffer("w_int", torch.zeros(0, dtype=torch.int8))  # frozen integer weights
        self.alpha: nn.Parameter | None = None  # AdaRound logits, only during reconstruction
        self.alpha_floor: torch.Tensor | None = None  # floor(W / Delta), fixed while alpha trains
        self.soft_h: torch.Tensor | None = None  # h(alpha) of the last soft forward (the AdaRound regulariser reads it)
        self.enabled = True
        self._dequant: tuple | None = None  # W_hat of a frozen quantizer and what it was computed from

    @property
    def frozen(self) -> bool:
        return self.w_int.numel() > 0

    def integer_codes(self, w: torch.Tensor, *, hard: bool = False) -> torch.Tensor:
        """Integer codes of latent weight w (as floats, with straight-through gradients)."""
        if self.alpha is not None:
            base = self.alpha_floor if self.alpha_floor is not None else torch.floor(w / self.scale)
            if hard:
                h = (self.alpha >= 0).to(base.dtype)
            else:
                h = self.soft_h = rectified_sigmoid(self.alpha)
            return self._clamp(base + h)
        v = w / self.scale
        if self.rounding.numel():
            q = floor_ste(v) + self.rounding.to(v.dtype)
        else:
            q = round_ste(v)
        return self._clamp(q)

    def _clamp(self, q: torch.Tensor) -> torch.Tensor:
        """clamp(q + z) onto the grid; a symmetric grid's z is 0 (two kernels fewer per step)."""
        return torch.clamp(q if self.symmetric else q + self.zero_point, self.qmin, self.qmax)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        if self.frozen:
            return self._frozen_weight(w.dtype)
        q = self.integer_codes(w)
        return (q if self.symmetric else q - self.zero_point) * self.scale

    def _frozen_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """(W_int - z) * Delta, cached until W_int, Delta or z change (in place or replaced)."""
        if torch.is_inference_mode_enabled() or self.w_int.is_inference():
            return (self.w_int.to(dtype) - self.zero_point) * self.scale  # inference tensors have no version counter
        srcs = (self.w_int, self.scale, self.zero_point)
        versions = tuple(t._version for t in srcs)
        c = self._dequant  # (the tensors themselves, not ids; their versions; dtype; W_hat)
        if c is None or c[1:3] != (versions, dtype) or any(a is not b for a, b in zip(c[0], srcs)):
            with torch.no_grad():
                self._dequant = (srcs, versions, dtype, (self.w_int.to(dtype) - self.zero_point) * self.scale)
        return self._dequant[3]

    @torch.no_grad()
    def freeze(self, w: torch.Tensor) -> None:
        """Compute and store W_int from the current latent weight (hardening AdaRound if active)."""
        if self.alpha is not None:
            self.rounding = (self.alpha >= 0).to(torch.int8)
        self.alpha = self.alpha_floor = self.soft_h = self._dequant = None
        dtype = torch.int32 if self.bits > 8 else (torch.int8 if self.symmetric else torch.uint8)
        self.w_int = self.integer_codes(w.detach()).to(dtype)

    def unfreeze(self) -> None:
        """Drop W_int so that the latent weight trains (Stage B/C); ``freeze`` again at the end."""
        self.w_int = torch.zeros(0, dtype=torch.int8, device=self.scale.device)
        self._dequant = None

    def extra_repr(self) -> str:
        grid = "sym" if self.symmetric else "asym"
        return f"bits={self.bits}, {grid}, {'per-channel' if self.per_channel else 'per-tensor'}"


@dataclass
class CalibState:
    """Set on an ActQuantizer while it initialises itself on the data it sees (quest.md 4.3)."""

    method: str = "minmax"  # minmax | percentile | mse
    running_stat: bool = False  # after the first batch, EMA (momentum 0.95) of the range
    accumulate: bool = False  # after the first batch, the running min/max over all batches (plain PTQ)
    lo: dict = field(default_factory=dict)  # group -> running min (per channel or (1,))
    hi: dict = field(default_factory=dict)


class ActQuantizer(nn.Module):
    """Activation quantizer with one row of parameters per timestep group.

    ``scales`` is a ParameterList (one Parameter per group) so that an optimizer can be given
    exactly one group's row; ``zero_points`` is an integer-valued buffer (G, C) never trained.
    ``channels`` = None means per-tensor; otherwise one scale per channel along ``axis``.
    ``unsigned`` grids start at 0 (asymmetric, or the zero-anchored softmax quantizer).
    """

    SAMPLE_CAP = 1 << 18  # samples (elements or rows) used for percentile / MSE initialisation

    def __init__(self, *, bits: int, groups: int, symmetric: bool = True, channels: int | None = None,
                 axis: int = -1, zero_anchored: bool = False, ctx=None, pts_channels: int | None = None) -> None:  # fmt: skip
        super().__init__()
        self.bits, self.symmetric, self.zero_anchored = bits, symmetric, zero_anchored
        self.axis = axis
        signed = symmetric and not zero_anchored
        self.qmin, self.qmax = qrange(bits, signed=signed)
        width = channels or 1
        self.scales = nn.ParameterList([nn.Parameter(torch.ones(width)) for _ in range(groups)])
        self.register_buffer("zero_points", torch.zeros(groups, width))
        self.register_buffer("initialized", torch.zeros(groups, dtype=torch.bool))
        self.per_channel = channels is not None
        # DMQ PTS (quest.md 7.6): per-channel power-of-two factors f_c on the per-tensor scale, s_c = s * f_c,
        # the same factors in every group (fixed export constants); 1 until Stage A4 votes
        if pts_channels is not None and not self.per_channel:
            self.register_buffer("pts_factors", torch.ones(pts_channels))  # f: (C,)
        else:
            self.pts_factors = None
        self.ctx = ctx  # GroupContext of the owning model (plain attribute, not state)
        self.enabled = True
        self.calib: CalibState | None = None  # set while calibrating
        self.export_hook = None  # set by the ONNX exporter while tracing

    @property
    def groups(self) -> int:
        return len(self.scales)

    @property
    def signed(self) -> bool:
        return self.symmetric and not self.zero_anchored

    def _group(self) -> int:
        return 0 if self.ctx is None else self.ctx.group

    def _shape(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Broadcast a (C,) or (1,) row against x along ``axis``."""
        if not self.per_channel:
            return t
        shape = [1] * x.dim()
        shape[self.axis] = t.numel()
        return t.view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calib is not None:
            self._calibrate(x)
        if self.export_hook is not None:
            return self.export_hook(self, x)
        if not self.enabled:
            return x
        g = self._group()
        s = self._shape(self.scales[g], x)
        if self.pts_factors is not None:
            s = s * self.pts_view(x)
        z = None if self.symmetric or self.zero_anchored else self._shape(self.zero_points[g], x)  # else z = 0
        return fake_quant(x, s, z, self.qmin, self.qmax)

    def pts_view(self, x: torch.Tensor) -> torch.Tensor:
        """The PTS factors broadcast against x along ``axis``."""
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return self.pts_factors.view(shape)

    # -- calibration ------------------------------------------------------------------------
    def resize(self, channels: int) -> None:
        """Give a lazily sized per-channel quantizer its channel count (first observation or load)."""
        if self.scales[0].numel() == channels:
            return
        dev = self.zero_points.device
        for g in range(self.groups):
            self.scales[g] = nn.Parameter(torch.ones(channels, device=dev))
        self.zero_points = torch.zeros(self.groups, channels, device=dev)

    @torch.no_grad()
    def _calibrate(self, x: torch.Tensor) -> None:
        """Initialise the active group's row from x, before x is quantized with it.

        Run with activation quantization on, every quantizer sees the distribution its quantized
        upstream produces. Later batches of the same group update the range by EMA when
        ``running_stat`` is on, and are otherwise ignored.
        """
        from quest_export.quant.observers import _params, activation_params

        x = x.detach().float()
        if self.per_channel:
            c = x.shape[self.axis]
            self.resize(c)
            flat = x.movedim(self.axis, -1).reshape(-1, c)  # (M, C)
            lo, hi = flat.amin(0), flat.amax(0)
        else:
            flat = x.reshape(-1)  # (M,)
            lo, hi = flat.min().reshape(1), flat.max().reshape(1)
        g, st = self._group(), self.calib
        if not bool(self.initialized[g]):
            if st.method != "minmax" and flat.shape[0] > self.SAMPLE_CAP:  # min/max needs no samples
                gen = torch.Generator().manual_seed(flat.shape[0])
                flat = flat[torch.randperm(flat.shape[0], generator=gen)[: self.SAMPLE_CAP].to(flat.device)]
            s, z = activation_params(flat, bits=self.bits, symmetric=self.symmetric, zero_anchored=self.zero_anchored,
                                     qmin=self.qmin, qmax=self.qmax, method=st.method, lo=lo, hi=hi)  # fmt: skip
            st.lo[g], st.hi[g] = lo, hi
            self.set_row(g, s, z)
        elif st.running_stat or st.accumulate:
            if st.running_stat:  # EMA, momentum 0.95 (quest.md 4.3 step 4)
                st.lo[g] = 0.95 * st.lo[g] + 0.05 * lo
                st.hi[g] = 0.95 * st.hi[g] + 0.05 * hi
            else:
                st.lo[g], st.hi[g] = torch.minimum(st.lo[g], lo), torch.maximum(st.hi[g], hi)
            s, z = _params(st.lo[g], st.hi[g], self.bits, self.symmetric, self.zero_anchored)
            self.set_row(g, s, z)

    @torch.no_grad()
    def set_row(self, g: int, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        s = scale.reshape(-1).to(self.scales[g].device, torch.float32).clamp_min(SCALE_MIN)
        self.scales[g].data.copy_(s.expand_as(self.scales[g]))
        zp = torch.zeros_like(s) if zero_point is None else zero_point.reshape(-1).to(s.device, torch.float32)
        self.zero_points[g].copy_(zp.expand_as(self.zero_points[g]))
        self.initialized[g] = True

    @torch.no_grad()
    def clamp_scales_(self) -> None:
        for p in self.scales:
            p.data.clamp_(min=SCALE_MIN)

    def reference_scale(self) -> torch.Tensor:
        """s_ref: the geometric mean of the group scales (scale-input export, quest.md 9.2)."""
        stacked = torch.stack([p.detach() for p in self.scales])  # (G, C)
        return torch.exp(torch.log(stacked).mean(0))

    def extra_repr(self) -> str:
        grid = "zero-anchored" if self.zero_anchored else ("sym" if self.symmetric else "asym")
        gran = f"per-channel(axis={self.axis})" if self.per_channel else "per-tensor"
        return f"bits={self.bits}, {grid}, {gran}, groups={self.groups}"
