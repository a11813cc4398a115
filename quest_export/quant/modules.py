"""Quantized twins of Conv2d and Linear, found through a registry keyed on module type.

A twin keeps the float module's ``weight`` and ``bias`` Parameters (same objects, same
state_dict names) and adds ``weight_quantizer`` and ``input_quantizer``. A decoder
``conv_shortcut`` that reads a skip concatenation can be split (quest.md 2.8): two input
quantizers (``input_quantizer`` on the deep half, ``input_quantizer_skip`` on the skip half)
and two weight quantizers over W[:, :C_deep] and W[:, C_deep:], which equals two 1x1 convs
summed with the bias added once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quest_export.quant.quantizer import ActQuantizer, WeightQuantizer

_REGISTRY: dict[type, type] = {}


def register_quant_module(float_cls: type) -> Callable[[type], type]:
    """Class decorator: ``@register_quant_module(nn.Conv2d) class QuantConv2d``."""

    def deco(cls: type) -> type:
        _REGISTRY[float_cls] = cls
        return cls

    return deco


def quant_class_for(module: nn.Module) -> type | None:
    return _REGISTRY.get(type(module))


def quantizable_types() -> tuple[type, ...]:
    return tuple(_REGISTRY)


@dataclass(frozen=True)
class LayerSpec:
    """How one Conv2d/Linear is quantized; the plan is a list of these, stored in the artifact."""

    name: str  # fully qualified module name, e.g. down_blocks.1.attentions.0.proj_in
    kind: str  # conv | linear
    shape: tuple[int, ...]  # weight shape
    w_bits: int | None  # None = weight kept in float
    a_bits: int | None  # None = no own input quantizer (float input, or shared with siblings)
    w_symmetric: bool = True
    a_symmetric: bool = True
    a_per_channel: bool = False
    split_at: int | None = None  # C_deep of a split shortcut
    shared_input: str | None = None  # name of the attention-level quantizer that feeds this layer
    role: str = "other"  # temporal | time-embedding | attention | ff | first | last | shortcut | other
    o_bits: int | None = None  # output quantizer (ORT's fused in/out W8A8 form, deploy.md E-22)
    les: bool = False  # DMQ LES: the input is divided by a per-input-channel les_scale (folded into the weight)
    pts: bool = False  # DMQ PTS: per-channel power-of-two factors on the per-tensor input scale(s)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LayerSpec:
        return cls(**{**d, "shape": tuple(d["shape"])})


class QuantModule(nn.Module):
    """Shared parts of the quantized twins."""

    spec: LayerSpec

    def _setup(self, spec: LayerSpec, *, groups: int, ctx, per_channel_weights: bool) -> None:
        self.spec = spec
        w_shape = tuple(self.weight.shape)
        in_axis = 1 if spec.kind == "conv" else -1

        def wq(shape):
            return WeightQuantizer(shape, bits=spec.w_bits, symmetric=spec.w_symmetric, per_channel=per_channel_weights)

        def aq(channels):
            return ActQuantizer(bits=spec.a_bits, groups=groups, symmetric=spec.a_symmetric, ctx=ctx, axis=in_axis,
                                channels=channels if spec.a_per_channel else None,
                                pts_channels=channels if spec.pts else None)  # fmt: skip

        c_in = w_shape[1]
        # LES (quest.md 7.6): x / gamma feeds the input quantizer, the weight holds W * gamma (1 until LES runs)
        if spec.les:
            self.register_buffer("les_scale", torch.ones(c_in))  # gamma: (C_in,)
        else:
            self.les_scale = None
        self.les_gamma = None  # the trainable gamma while Stage A0 runs (ptq/les.py)
        self.output_quantizer = (ActQuantizer(bits=spec.o_bits, groups=groups, symmetric=spec.a_symmetric, ctx=ctx)
                                 if spec.o_bits else None)  # fmt: skip
        if spec.split_at is not None:
            c1, c2 = spec.split_at, c_in - spec.split_at
            self.weight_quantizer = wq((w_shape[0], c1, *w_shape[2:])) if spec.w_bits else None
            self.weight_quantizer_skip = wq((w_shape[0], c2, *w_shape[2:])) if spec.w_bits else None
            self.input_quantizer = aq(c1) if spec.a_bits else None
            self.input_quantizer_skip = aq(c2) if spec.a_bits else None
        else:
            self.weight_quantizer = wq(w_shape) if spec.w_bits else None
            self.input_quantizer = aq(c_in) if spec.a_bits else None

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight W_hat (concatenated halves for a split shortcut)."""
        w = self.weight
        if self.weight_quantizer is None:
            return w
        if self.spec.split_at is None:
            return self.weight_quantizer(w)
        c = self.spec.split_at
        return torch.cat([self.weight_quantizer(w[:, :c]), self.weight_quantizer_skip(w[:, c:])], dim=1)

    def les_input(self, x: torch.Tensor) -> torch.Tensor:
        """x / gamma along the input-channel axis (the LES-scaled input); x where the layer has no LES."""
        if self.les_scale is None:
            return x
        shape = [1] * x.dim()
        shape[1 if self.spec.kind == "conv" else -1] = -1
        return x / self.les_scale.view(shape)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        x = self.les_input(x)
        if self.input_quantizer is None:
            return x
        if self.spec.split_at is None:
            return self.input_quantizer(x)
        c = self.spec.split_at
        return torch.cat([self.input_quantizer(x[:, :c]), self.input_quantizer_skip(x[:, c:])], dim=1)

    def weight_quantizers(self) -> list[WeightQuantizer]:
        return [q for q in (self.weight_quantizer, getattr(self, "weight_quantizer_skip", None)) if q is not None]

    def quantized_output(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.output_quantizer is None else self.output_quantizer(y)

    def input_quantizers(self) -> list[ActQuantizer]:
        return [q for q in (self.input_quantizer, getattr(self, "input_quantizer_skip", None)) if q is not None]

    @torch.no_grad()
    def freeze_weights(self) -> None:
        c = self.spec.split_at
        if self.weight_quantizer is None:
            return
        if c is None:
            self.weight_quantizer.freeze(self.weight)
        else:
            self.weight_quantizer.freeze(self.weight[:, :c])
            self.weight_quantizer_skip.freeze(self.weight[:, c:])

    def unfreeze_weights(self) -> None:
        for q in self.weight_quantizers():
            q.unfreeze()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, w_bits={self.spec.w_bits}, a_bits={self.spec.a_bits}"


@register_quant_module(nn.Conv2d)
class QuantConv2d(QuantModule, nn.Conv2d):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, spec: LayerSpec, *, groups: int, ctx, per_channel_weights: bool = True):
        q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                padding_mode=conv.padding_mode, device="meta")  # fmt: skip
        q.weight, q.bias = conv.weight, conv.bias
        q._setup(spec, groups=groups, ctx=ctx, per_channel_weights=per_channel_weights)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hook = getattr(self, "export_hook", None)
        if hook is not None:
            return hook(self, x)
        if self.les_gamma is not None:  # Stage A0 (ptq/les.py): dynamic quantizers on x / gamma and W * gamma
            from quest_export.ptq.les import les_forward

            return les_forward(self, x, lambda xq, wq: self._conv_forward(xq, wq, self.bias))
        return self.quantized_output(self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias))


@register_quant_module(nn.Linear)
class QuantLinear(QuantModule, nn.Linear):
    @classmethod
    def from_float(cls, lin: nn.Linear, spec: LayerSpec, *, groups: int, ctx, per_channel_weights: bool = True):
        q = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, device="meta")
        q.weight, q.bias = lin.weight, lin.bias
        q._setup(spec, groups=groups, ctx=ctx, per_channel_weights=per_channel_weights)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hook = getattr(self, "export_hook", None)
        if hook is not None:
            return hook(self, x)
        if self.les_gamma is not None:  # Stage A0 (ptq/les.py)
            from quest_export.ptq.les import les_forward

            return les_forward(self, x, lambda xq, wq: F.linear(xq, wq, self.bias))
        return self.quantized_output(F.linear(self.quantized_input(x), self.quantized_weight(), self.bias))
