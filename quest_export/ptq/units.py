"""Reconstruction units (quest.md 4.2) and capturing their inputs and float outputs.

Units: every ResnetBlock2D and BasicTransformerBlock as one block; every legacy UNet2DModel
``Attention`` as one block (recorded in the artifact); every other quantized layer alone
(time embedding, conv_in/out, proj_in/out, resamplers). Units are ordered by first execution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quest_export.quant.modules import QuantModule


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass once the unit's input is recorded."""


@dataclass
class Unit:
    name: str
    module: nn.Module
    kind: str  # resnet | transformer | attention | layer


def _unit_kind(m: nn.Module) -> str | None:
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    if isinstance(m, ResnetBlock2D):
        return "resnet"
    if isinstance(m, BasicTransformerBlock):
        return "transformer"
    if isinstance(m, Attention):
        return "attention"
    if isinstance(m, QuantModule):
        return "layer"
    return None


def find_units(unet: nn.Module, run_forward) -> list[Unit]:
    """All units, outermost first, in the order they first execute in ``run_forward()``."""
    units: list[Unit] = []
    taken: list[str] = []
    for name, m in unet.named_modules():
        kind = _unit_kind(m)
        if kind is None or any(name.startswith(p + ".") for p in taken):
            continue
        if not any(isinstance(x, QuantModule) for x in m.modules()):
            continue
        units.append(Unit(name, m, kind))
        taken.append(name)
    order: dict[str, int] = {}

    def make(name):
        def hook(mod, args):  # returns None: the inputs pass unchanged
            order.setdefault(name, len(order))

        return hook

    hooks = [u.module.register_forward_pre_hook(make(u.name)) for u in units]
    try:
        run_forward()
    finally:
        for h in hooks:
            h.remove()
    return sorted([u for u in units if u.name in order], key=lambda u: order[u.name])


@dataclass
class Captured:
    """A unit's positional/keyword inputs with batched tensors concatenated over calibration rows."""

    args: list
    kwargs: dict
    n: int

    def select(self, idx: torch.Tensor, device) -> tuple[list, dict]:
        def pick(v):
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == self.n:
                return v[idx.to(v.device)].to(device)  # rows held in host RAM (ptq.recon_store=cpu) too
            return v

        return [pick(a) for a in self.args], {k: pick(v) for k, v in self.kwargs.items()}


def _merge(chunks: list, n_rows: list[int]):
    first = chunks[0]
    if isinstance(first, torch.Tensor) and first.dim() > 0 and all(c.shape[0] == r for c, r in zip(chunks, n_rows)):
        return torch.cat(chunks)
    return first


def capture_inputs(unet: nn.Module, unit: Unit, batches, run_batch, store) -> Captured:
    """Run the model on each batch until ``unit`` is reached; keep its inputs (then stop the pass)."""
    arg_chunks: list[list] = []
    kw_chunks: list[dict] = []
    rows: list[int] = []

    def hook(mod, args, kwargs):
        arg_chunks.append([a.detach().to(store) if isinstance(a, torch.Tensor) else a for a in args])
        kw_chunks.append({k: v.detach().to(store) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        raise _Stop

    h = unit.module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            try:
                run_batch(b)
            except _Stop:
                pass
            rows.append(b[0].shape[0])
    finally:
        h.remove()
    args = [_merge([c[i] for c in arg_chunks], rows) for i in range(len(arg_chunks[0]))]
    kwargs = {k: _merge([c[k] for c in kw_chunks], rows) for k in kw_chunks[0]}
    return Captured(args=args, kwargs=kwargs, n=sum(rows))


def capture_outputs(unet: nn.Module, units: list[Unit], batches, run_batch, store) -> dict[str, torch.Tensor]:
    """One pass: the output of every unit on every batch (float model)."""
    outs: dict[str, list[torch.Tensor]] = {u.name: [] for u in units}

    def make(name):
        def hook(mod, args, output):
            y = output[0] if isinstance(output, tuple) else output
            outs[name].append(y.detach().to(store))

        return hook

    hs = [u.module.register_forward_hook(make(u.name)) for u in units]
    try:
        for b in batches:
            run_batch(b)
    finally:
        for h in hs:
            h.remove()
    return {k: torch.cat(v) for k, v in outs.items() if v}


def capture_output(unet: nn.Module, unit: Unit, batches, run_batch, store) -> torch.Tensor:
    """The output of ``unit`` on every batch; each pass stops once the unit has run."""
    outs: list[torch.Tensor] = []

    def hook(mod, args, output):
        y = output[0] if isinstance(output, tuple) else output
        outs.append(y.detach().to(store))
        raise _Stop

    h = unit.module.register_forward_hook(hook)
    try:
        for b in batches:
            try:
                run_batch(b)
            except _Stop:
                pass
    finally:
        h.remove()
    return torch.cat(outs)


class UnitTargets:
    """Float targets of block reconstruction, one unit at a time: recomputed when a unit asks for them (one partial
    float forward over the reconstruction rows) and dropped when the next unit does.

    Holding every unit's output at once (``capture_outputs``) costs rows x the sum of all unit outputs, about
    400 MB a row for SD-1.5 at 64x64 (100 GB for the 256 reconstruction rows); this holds one unit's (issue 15).
    ``float_context()`` returns the context in which the model computes its float outputs.
    """

    def __init__(self, unet: nn.Module, units: list[Unit], batches, run_batch, store, float_context) -> None:
        self._unet, self._units = unet, {u.name: u for u in units}
        self._batches, self._run, self._store, self._ctx = batches, run_batch, store, float_context
        self._name: str | None = None
        self._value: torch.Tensor | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if name != self._name:
            self._name, self._value = None, None  # free the previous unit's targets first
            with self._ctx():
                self._value = capture_output(self._unet, self._units[name], self._batches, self._run, self._store)
            self._name = name
        return self._value

    def __contains__(self, name: str) -> bool:
        return name in self._units


def channel_sq_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared error summed over channels, averaged over batch and positions (quest.md 4.2)."""
    d = (a - b).float().pow(2)
    return d.sum(dim=1).mean() if d.dim() == 4 else d.sum(dim=-1).mean()
