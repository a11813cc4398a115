"""Q/DQ emission while tracing: the fake-quant modules' forward, re-expressed as ONNX Q/DQ.

The exporter installs ``export_hook``s on every ``ActQuantizer`` and quantized layer; they call
autograd Functions whose ``forward`` is the exact torch arithmetic and whose ``symbolic`` emits
QuantizeLinear / DequantizeLinear (deploy.md section 3, route R3, TorchScript exporter: about a
second per graph, dynamic batch, parameter names kept). Constants are registered as named
buffers first, so they become named initializers:

    <quantizer>.export_scale / .export_zp        activation Q/DQ scale and zero point
    <layer>.weight_quantizer.export_w            integer weights, in the layout the op reads
    <layer>.weight_quantizer.export_scale / _zp  per-output-channel weight scale and zero point

DMQ (quest.md 7.6, 9.3b): a layer's LES scale stays as ``Div(x, <layer>.export_les_scale)`` in front of its
input Q (the division the fake-quant model computes; gamma itself is folded into W_int), and a
quantizer with PTS factors f_c exports as a per-channel Q/DQ with scale s * f_c (exact: f_c is a
power of two), which ONNX Runtime runs. TensorRT quantizes activations per tensor, so there (``pts_fold``) the
factors leave the quantizer: ``Mul(x, 1/f_c)`` per channel before a per-tensor Q/DQ with scale s (bit-exact:
(x * 2^k) / s rounds like x / (s * 2^-k)), and f_c goes into the consuming layer's integer weights,
W'_int[:, c] = W_int[:, c] * f_c * K with scale s_w / K, K = 1 / min f (an integer power of two), which stays in
the INT8 container for weights of up to 5 bits; wider weights are refused with that reason.

Placement mirrors the fake-quant points (quest.md 9.8): activation Q/DQ on the inputs of
quantized Conv/Linear (and attention operands where quantized), weight DQ per output
channel, no output Q/DQ. Modes (quest.md 9.2): ``merged`` / ``per-group`` use constant scales;
``scale-input`` feeds r_g = s_g / s_ref through the graph input ``act_scale_ratios`` as
x * (1 / r) -> Q(s_ref) -> DQ(s_ref), the trailing * r moved past the linear op before the bias.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from quest_export.quant.model import QuantizedUNet
from quest_export.quant.modules import QuantModule
from quest_export.quant.quantizer import ActQuantizer, WeightQuantizer


@dataclass
class ActExport:
    """How one activation quantizer is exported."""

    name: str
    index: int  # position in act_scale_ratios (scale-input mode)
    bits: int
    signed: bool
    clip: bool  # 4/6-bit values carried in INT8: Clip to [q_min s, q_max s] before the INT8 Q (E-9b)
    fold: bool  # scale-input: the * r moves past the consuming linear op(s)
    storage: str  # int8 | uint8 | int16 | uint16 | int4 | uint4 | int8-clip | uint8-clip


@dataclass
class ExportPlan:
    opset: int
    scale_mode: str
    group: int | None  # constant scales of this group (per-group); None = the model's single row
    acts: dict[str, ActExport] = field(default_factory=dict)
    native_a4: bool = False
    weight_only: bool = False  # activation quantizers pass their input through (exactness checks, H-2)
    # PTS on a per-tensor target (TensorRT): x * (1/f_c) -> Q/DQ(s) per tensor, f_c folded into the next weights
    pts_fold: bool = False

    @property
    def scale_input(self) -> bool:
        return self.scale_mode == "scale-input"


def _channel_shape(q: ActQuantizer) -> list[int]:
    return [-1] if q.axis == -1 else [-1, 1, 1]  # linear (..., C) or conv (N, C, H, W)


def _fold_pts(name: str, w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, f: torch.Tensor):
    """W'_int = W_int * f_c * K along the input channels, scale / K: the PTS factors of the layer's input, moved into
    its integer weights for a per-tensor activation Q (``pts_fold``). Exact; refused where W' leaves INT8."""
    from quest_export.errors import TargetError

    k = float(1.0 / f.min())
    mult = (f.double() * k).reshape([1, -1] + [1] * (w.dim() - 2))
    if bool((zp != 0).any()):
        raise TargetError(f"{name}: PTS on a TensorRT target needs zero-point-free weights")
    wide = w.double() * mult
    if not bool((wide == wide.round()).all()) or wide.min() < -128 or wide.max() > 127:
        raise TargetError(f"{name}: its PTS factors (down to 1/{k:g}) folded into its weights leave INT8; TensorRT "
                          "targets take PTS with weights of up to 5 bits: quantize with --set dmq.pts=false "
                          "or use --target cpu")  # fmt: skip
    return wide.to(torch.int8), scale / k


class _QDQ(torch.autograd.Function):
    """x -> [Clip(lo, hi)] -> QuantizeLinear(s, z) -> DequantizeLinear(s, z); forward = the same math in torch."""

    @staticmethod
    def forward(ctx, x, s, zp, lo, hi, qmin: int, qmax: int, axis: int | None):
        if lo is not None:
            x = torch.minimum(torch.maximum(x, lo), hi)
        z = zp.to(x.dtype)
        if axis is not None:
            shape = [1] * x.dim()
            shape[axis] = -1
            s, z = s.view(shape), z.view(shape)
        return (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s

    @staticmethod
    def symbolic(g, x, s, zp, lo, hi, qmin, qmax, axis):
        if not _is_none(lo) and axis is not None:  # per-channel bounds (PTS): Clip takes scalars only
            x = g.op("Max", g.op("Min", x, hi), lo)
        elif not _is_none(lo):
            x = g.op("Clip", x, lo, hi)
        kw = {} if axis is None else {"axis_i": axis}
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, zp, **kw), s, zp, **kw)


class _DQ(torch.autograd.Function):
    """Integer weight -> DequantizeLinear(s, z, axis) -> float weight."""

    @staticmethod
    def forward(ctx, w, s, zp, axis: int | None):
        if axis is None:
            return (w.float() - zp.float()) * s
        shape = [1] * w.dim()
        shape[axis] = -1
        return (w.float() - zp.float().view(shape)) * s.view(shape)

    @staticmethod
    def symbolic(g, w, s, zp, axis):
        return g.op("DequantizeLinear", w, s, zp, **({} if axis is None else {"axis_i": axis}))


def _is_none(v) -> bool:
    return v is None or (hasattr(v, "node") and v.node().mustBeNone())


def _container(bits: int, signed: bool) -> tuple[torch.dtype, str]:
    """The Q/DQ integer type carrying a b-bit grid (4-bit grids are retyped to INT4 after export)."""
    if bits > 8:
        return (torch.int16, "int16") if signed else (torch.uint16, "uint16")
    return (torch.int8, "int8") if signed else (torch.uint8, "uint8")


def plan_acts(qunet: QuantizedUNet, *, native_a4: bool) -> dict[str, ActExport]:
    """Export settings of every activation quantizer, in a stable order (the ratio index)."""
    layers = qunet.layers()
    shared_consumers: dict[str, list[str]] = {}
    for n, m in layers.items():
        if m.spec.shared_input:
            shared_consumers.setdefault(m.spec.shared_input, []).append(n)
    out: dict[str, ActExport] = {}
    for k, (name, q) in enumerate(qunet.act_quantizers().items()):
        parent, _, leaf = name.rpartition(".")
        own_input = parent in layers and leaf != "output_quantizer"  # a Conv/Linear input: the * r folds past it
        fold = own_input or name in shared_consumers
        low = q.bits < 8
        if low and native_a4 and q.bits == 4:
            storage = "int4" if q.signed else "uint4"
            clip = False
        else:
            storage = _container(q.bits, q.signed)[1] + ("-clip" if low else "")
            clip = low
        out[name] = ActExport(name=name, index=k, bits=q.bits, signed=q.signed, clip=clip, fold=fold, storage=storage)
    return out


class QdqEmitter:
    """Installs the export hooks and the named constant buffers; removes both afterwards."""

    def __init__(self, qunet: QuantizedUNet, plan: ExportPlan) -> None:
        self.q, self.plan = qunet, plan
        self.ratios: torch.Tensor | None = None  # the act_scale_ratios graph input while tracing
        self._added: list[tuple[torch.nn.Module, str]] = []
        self._act_by_module = {id(mod): plan.acts[n] for n, mod in qunet.act_quantizers().items()}
        self._shared = {n: m for n, m in qunet.act_quantizers().items()}

    # -- constants -------------------------------------------------------------------------------
    def _buffer(self, module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
        module.register_buffer(name, value.detach().clone().contiguous())  # persistent: exported as a named initializer
        self._added.append((module, name))

    def _act_scale(self, q: ActQuantizer) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) of the Q/DQ: group row, or s_ref in scale-input mode."""
        if self.plan.scale_input:
            s, z = q.reference_scale(), q.zero_points[0]
        else:
            g = 0 if self.plan.group is None else self.plan.group
            s, z = q.scales[g].detach(), q.zero_points[g]
        if q.pts_factors is not None and self.plan.pts_fold:  # per tensor; 1/f_c multiplies x before the Q
            s, z = s.reshape(()), z.reshape(())
        elif q.pts_factors is not None:  # s_c = s * f_c (the fake-quant model's product, exact for powers of two)
            s, z = (s.reshape(1) * q.pts_factors).float(), z.reshape(1).expand_as(q.pts_factors)
        elif not q.per_channel:
            s, z = s.reshape(()), z.reshape(())
        return s.float(), z

    def _install_constants(self) -> None:
        for name, q in self.q.act_quantizers().items():
            s, z = self._act_scale(q)
            dtype, _ = _container(q.bits, q.signed)
            self._buffer(q, "export_scale", s)
            self._buffer(q, "export_zp", z.round().to(dtype))
            if self.plan.acts[name].clip:
                zf = z.round().float()
                lo, hi = (q.qmin - zf) * s, (q.qmax - zf) * s
                if q.pts_factors is not None and not self.plan.pts_fold:  # per-channel bounds along the channel axis
                    lo, hi = lo.reshape(_channel_shape(q)), hi.reshape(_channel_shape(q))
                self._buffer(q, "export_clip_lo", lo)
                self._buffer(q, "export_clip_hi", hi)
            if q.pts_factors is not None and self.plan.pts_fold:
                self._buffer(q, "export_pts_inv", (1.0 / q.pts_factors.float()).reshape(_channel_shape(q)))
        for m in self.q.layers().values():
            for wq in m.weight_quantizers():
                self._install_weight(m, wq)
            if m.les_scale is not None:  # gamma, shaped to broadcast along the input channels: a named initializer
                self._buffer(
                    m, "export_les_scale", m.les_scale.view(-1, 1, 1) if m.spec.kind == "conv" else m.les_scale
                )

    def _input_quantizer_of(self, m: QuantModule, wq: WeightQuantizer) -> ActQuantizer | None:
        iq = m.input_quantizer if wq is m.weight_quantizer else getattr(m, "input_quantizer_skip", None)
        if iq is None and m.spec.shared_input:
            iq = self._shared.get(m.spec.shared_input)
        return iq

    def _install_weight(self, m: QuantModule, wq: WeightQuantizer) -> None:
        if not wq.frozen:
            raise RuntimeError(f"{m.spec.name}: weights are not frozen; export needs the stored W_int")
        w = wq.w_int
        scale, zp = wq.scale.detach().reshape(-1).float(), wq.zero_point.reshape(-1)
        # weight-only graphs (H-2) keep activations float, so the factors stay out of their weights too
        iq = self._input_quantizer_of(m, wq) if (self.plan.pts_fold and not self.plan.weight_only) else None
        if iq is not None and iq.pts_factors is not None:
            w, scale = _fold_pts(m.spec.name, w, scale, zp, iq.pts_factors)
        if m.spec.kind == "linear":
            w = w.t()  # MatMul reads B = W^T: (K, N), per-channel axis 1 (deploy.md E-3)
        self._buffer(wq, "export_w", w)
        self._buffer(wq, "export_scale", scale if wq.per_channel else scale.reshape(()))
        self._buffer(wq, "export_zp", (zp if wq.per_channel else zp.reshape(())).round().to(w.dtype))

    # -- hooks ---------------------------------------------------------------------------------------
    def _ratio(self, info: ActExport) -> torch.Tensor:
        return self.ratios[info.index]

    def act(self, q: ActQuantizer, x: torch.Tensor) -> torch.Tensor:
        if self.plan.weight_only:
            return x
        info = self._act_by_module[id(q)]
        axis = q.axis % x.dim() if (q.per_channel or q.pts_factors is not None) else None
        if self.plan.scale_input:
            x = x * (1.0 / self._ratio(info))
        # the Clip keeps every integer on the b-bit grid inside the INT8 container (exact, E-9b)
        lo, hi = (q.export_clip_lo, q.export_clip_hi) if info.clip else (None, None)
        if q.pts_factors is not None and self.plan.pts_fold:  # x / f_c (exact), per-tensor Q; f_c is in the weights
            x, axis = x * q.export_pts_inv, None
        y = _QDQ.apply(x, q.export_scale, q.export_zp, lo, hi, q.qmin, q.qmax, axis)
        if self.plan.scale_input and not info.fold:
            y = y * self._ratio(info)
        return y

    def _weight(self, m: QuantModule, wq: WeightQuantizer | None, part: slice) -> torch.Tensor:
        if wq is None:
            w = m.weight[:, part]
            return w.t() if m.spec.kind == "linear" else w
        axis = (1 if m.spec.kind == "linear" else 0) if wq.per_channel else None
        return _DQ.apply(wq.export_w, wq.export_scale, wq.export_zp, axis)

    def layer(self, m: QuantModule, x: torch.Tensor) -> torch.Tensor:
        spec = m.spec
        if m.les_scale is not None:  # LES: Div(x, gamma) before the input Q, the division the fake-quant model does
            x = x / m.export_les_scale
        c = spec.split_at
        parts = [(slice(None), m.input_quantizer, m.weight_quantizer)] if c is None else [
            (slice(0, c), m.input_quantizer, m.weight_quantizer),
            (slice(c, None), m.input_quantizer_skip, m.weight_quantizer_skip)]  # fmt: skip
        fold_q = self._shared.get(spec.shared_input) if spec.shared_input else None
        oq = m.output_quantizer
        if c is None and not self.plan.scale_input and spec.kind == "conv":  # plain Conv with its bias
            iq = m.input_quantizer
            y = m._conv_forward(
                iq(x) if iq is not None else x, self._weight(m, m.weight_quantizer, slice(None)), m.bias
            )
            return y if oq is None else oq(y)
        y = None
        for part, iq, wq in parts:
            xp = x if c is None else x[:, part]
            xp = iq(xp) if iq is not None else xp
            w = self._weight(m, wq, part)
            if spec.kind == "conv":
                yp = m._conv_forward(xp, w, None)
            else:
                yp = torch.matmul(xp, w)  # (..., K) @ (K, N)
            ratio_q = iq if iq is not None else fold_q
            if self.plan.scale_input and ratio_q is not None:
                yp = yp * self._ratio(self._act_by_module[id(ratio_q)])
            y = yp if y is None else y + yp
        if m.bias is not None:
            y = y + (m.bias.view(1, -1, 1, 1) if spec.kind == "conv" else m.bias)
        return y if oq is None else oq(y)  # output Q/DQ: ORT's fused in/out form (E-22)

    # -- lifetime -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def installed(self) -> Iterator[QdqEmitter]:
        self._install_constants()
        acts, layers = self.q.act_quantizers().values(), self.q.layers().values()
        for q in acts:
            q.export_hook = self.act
        for m in layers:
            m.export_hook = self.layer
        try:
            yield self
        finally:
            for q in acts:
                q.export_hook = None
            for m in layers:
                m.export_hook = None
            for mod, name in self._added:
                delattr(mod, name)
            self._added.clear()
