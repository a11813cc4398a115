"""``quantize_``: turn a diffusers UNet into the fake-quant reference model, in place.

    qunet = quantize_(unet, recipe.quant, group_timesteps=[t_0, ..., t_{G-1}])
    with qunet.mode(QuantMode.FULL):
        eps = unet(x_t, t, encoder_hidden_states=cond).sample   # the group follows t

Every Conv2d and Linear is swapped for its registered quantized twin (same parameters); the
attention quantizers are added to each ``Attention`` module and used by ``QuantAttnProcessor``,
installed with ``Attention.set_processor``. Nothing in diffusers is copied or patched.
"""

from __future__ import annotations

import contextlib
import enum
import fnmatch
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from torch import nn

from quest_export.errors import RecipeError
from quest_export.quant.attention import QuantAttnProcessor
from quest_export.quant.groups import GroupContext
from quest_export.quant.modules import LayerSpec, QuantModule, quant_class_for, quantizable_types
from quest_export.quant.quantizer import ActQuantizer, CalibState, WeightQuantizer
from quest_export.recipe.config import QuantRecipe
from quest_export.recipe.methods import get_method


class QuantMode(enum.Enum):
    FP = "fp"  # every quantizer off: the float model
    WEIGHT_ONLY = "weight-only"  # weights quantized, activations float (AdaRound, LES)
    FULL = "full"  # weights and activations quantized


@dataclass(frozen=True)
class AttnSpec:
    """Quantizers of one Attention module (its Linear layers have their own LayerSpecs)."""

    name: str
    self_attention: bool
    input_bits: int | None  # shared input of to_q (and to_k/to_v in self-attention)
    context_bits: int | None  # shared conditioning input of to_k/to_v (cross-attention)
    qkv_bits: int | None  # Q, K, V operands (None = attention kept in float)
    p_bits: int | None  # softmax output


@dataclass(frozen=True)
class QuantPlan:
    layers: tuple[LayerSpec, ...]
    attention: tuple[AttnSpec, ...]
    groups: int
    a_symmetric: bool
    a_per_channel: bool
    w_per_channel: bool

    def to_dict(self) -> dict:
        return {"layers": [s.to_dict() for s in self.layers], "attention": [asdict(a) for a in self.attention],
                "groups": self.groups, "a_symmetric": self.a_symmetric, "a_per_channel": self.a_per_channel,
                "w_per_channel": self.w_per_channel}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> QuantPlan:
        return cls(layers=tuple(LayerSpec.from_dict(x) for x in d["layers"]),
                   attention=tuple(AttnSpec(**a) for a in d["attention"]), groups=d["groups"],
                   a_symmetric=d["a_symmetric"], a_per_channel=d["a_per_channel"], w_per_channel=d["w_per_channel"])  # fmt: skip


def layer_role(name: str) -> str:
    if name == "conv_in":
        return "first"
    if name == "conv_out":
        return "last"
    if name.startswith(("time_embedding.", "add_embedding.", "class_embedding.")):
        return "time-embedding"
    if name.endswith("time_emb_proj"):
        return "temporal"
    if name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")):
        return "attention"
    if ".ff.net." in name:
        return "ff"
    if name.endswith("conv_shortcut"):
        return "shortcut"
    return "other"


def shortcut_splits(unet: nn.Module) -> dict[str, int]:
    """C_deep of every decoder ResNet whose conv_shortcut reads concat(h_deep, h_skip) (quest.md 2.8).

    In diffusers up blocks, resnet i reads ``prev_output_channel`` (i = 0) or the block's own
    ``out_channels`` (i > 0) from the deep path, concatenated with a skip tensor.
    """
    out: dict[str, int] = {}
    if not hasattr(unet, "up_blocks"):
        return out
    prev = unet.config.block_out_channels[-1]  # the mid block's output
    for j, block in enumerate(unet.up_blocks):
        for i, resnet in enumerate(block.resnets):
            c_deep = prev if i == 0 else resnet.out_channels
            sc = getattr(resnet, "conv_shortcut", None)
            if (
                sc is not None
                and isinstance(sc, nn.Conv2d)
                and 0 < c_deep < sc.in_channels
                and sc.kernel_size == (1, 1)
            ):
                out[f"up_blocks.{j}.resnets.{i}.conv_shortcut"] = c_deep
        prev = block.resnets[-1].out_channels
    return out


def _attention_modules(unet: nn.Module) -> dict[str, nn.Module]:
    from diffusers.models.attention_processor import Attention

    return {n: m for n, m in unet.named_modules() if isinstance(m, Attention)}


def plan_quantization(unet: nn.Module, recipe: QuantRecipe, *, groups: int,
                      pts_layers: tuple[str, ...] = ()) -> QuantPlan:  # fmt: skip
    """Decide bits, grids, splits and sharing for every Conv2d/Linear and attention module.

    Args:
        pts_layers: globs of the layers whose inputs get PTS factors (methods that declare ``pts``).
    """
    types = quantizable_types()
    names = [n for n, m in unet.named_modules() if type(m) in types]
    for ov in recipe.overrides:
        if not any(fnmatch.fnmatchcase(n, ov.pattern) for n in names):
            import difflib

            close = difflib.get_close_matches(ov.pattern, names, n=3)
            raise RecipeError(f"override '{ov.pattern}' matched no quantizable layer; closest names: "
                              f"{', '.join(close) or 'none'}. Fix quant.overrides or run `quest-export info`")  # fmt: skip
    method = get_method(recipe.method)
    split = method.split_shortcut if recipe.split_shortcut is None else recipe.split_shortcut
    splits = shortcut_splits(unet) if split else {}
    attns = _attention_modules(unet)
    per_channel_a = recipe.a_granularity == "per-channel"
    layers: list[LayerSpec] = []
    bits_of: dict[str, tuple[int | None, int | None]] = {}
    for name in names:
        module = unet.get_submodule(name)
        role = layer_role(name)
        w_bits: int | None = recipe.w_bits
        a_bits: int | None = recipe.a_bits
        if role in ("first", "last"):
            if recipe.first_last == "fp":
                w_bits = a_bits = None
            elif recipe.first_last == "a8":
                a_bits = max(a_bits, 8)
            elif recipe.first_last == "w8a8":
                w_bits, a_bits = max(w_bits, 8), max(a_bits, 8)
        for ov in recipe.overrides:
            if fnmatch.fnmatchcase(name, ov.pattern):
                if not ov.quantize:
                    w_bits = a_bits = None
                else:
                    w_bits = ov.w_bits or w_bits
                    a_bits = ov.a_bits or a_bits
        bits_of[name] = (w_bits, a_bits)
        if w_bits is None and a_bits is None:
            continue
        shared = None
        parent, _, leaf = name.rpartition(".")
        if recipe.share_sibling_inputs and parent in attns and leaf in ("to_q", "to_k", "to_v"):
            self_attn = not attns[parent].is_cross_attention
            shared = f"{parent}.input_quantizer" if (leaf == "to_q" or self_attn) else f"{parent}.context_quantizer"
        layers.append(LayerSpec(
            name=name, kind="conv" if isinstance(module, nn.Conv2d) else "linear", shape=tuple(module.weight.shape),
            w_bits=w_bits, a_bits=None if shared else a_bits, w_symmetric=recipe.w_symmetric,
            a_symmetric=recipe.a_symmetric, a_per_channel=per_channel_a, split_at=splits.get(name),
            shared_input=shared, role=role, o_bits=a_bits if (recipe.output_quant and w_bits) else None,
            # LES needs the layer's own input quantizer and a quantized weight to fold gamma into (quest.md 7.6)
            les=bool(method.les and w_bits and a_bits and not shared),
            pts=bool(method.pts and a_bits and not shared and not per_channel_a
                     and any(fnmatch.fnmatchcase(name, p) for p in pts_layers))))  # fmt: skip
    attention = []
    for name, attn in attns.items():
        self_attn = not attn.is_cross_attention
        in_bits = ctx_bits = None
        if recipe.share_sibling_inputs:
            readers = ["to_q", "to_k", "to_v"] if self_attn else ["to_q"]
            in_bits = _shared_bits(name, readers, bits_of)
            ctx_bits = None if self_attn else _shared_bits(name, ["to_k", "to_v"], bits_of)
        qkv = recipe.a_bits if recipe.attention_quant else None
        p = recipe.softmax_bits if recipe.attention_quant else None
        attention.append(AttnSpec(name=name, self_attention=self_attn, input_bits=in_bits, context_bits=ctx_bits,
                                  qkv_bits=qkv, p_bits=p))  # fmt: skip
    return QuantPlan(layers=tuple(layers), attention=tuple(attention), groups=groups, a_symmetric=recipe.a_symmetric,
                     a_per_channel=per_channel_a, w_per_channel=recipe.w_granularity == "per-channel")  # fmt: skip


def _shared_bits(parent: str, readers: list[str], bits_of: dict) -> int | None:
    vals = {bits_of.get(f"{parent}.{r}", (None, None))[1] for r in readers if f"{parent}.{r}" in bits_of}
    if len(vals) > 1:
        raise RecipeError(f"{parent}: {', '.join(readers)} share one input quantizer but have activation bits "
                          f"{sorted(v for v in vals if v)}; give them equal bits or set quant.share_sibling_inputs=false")  # fmt: skip
    return vals.pop() if vals else None


class QuantizedUNet:
    """Handle on a UNet quantized in place: its plan, group context and quantizers."""

    def __init__(self, unet: nn.Module, plan: QuantPlan, ctx: GroupContext) -> None:
        self.unet, self.plan, self.ctx = unet, plan, ctx
        self._hook = unet.register_forward_pre_hook(self._select_group, with_kwargs=True)

    def _select_group(self, module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        if t is not None:
            self.ctx.on_timestep(t)

    # -- access ------------------------------------------------------------------------------
    def layers(self) -> dict[str, QuantModule]:
        return {n: m for n, m in self.unet.named_modules() if isinstance(m, QuantModule)}

    def act_quantizers(self) -> dict[str, ActQuantizer]:
        return {n: m for n, m in self.unet.named_modules() if isinstance(m, ActQuantizer)}

    def weight_quantizers(self) -> dict[str, WeightQuantizer]:
        return {n: m for n, m in self.unet.named_modules() if isinstance(m, WeightQuantizer)}

    # -- modes -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def mode(self, mode: QuantMode) -> Iterator[None]:
        """Switch quantizers on/off inside the block and restore the previous state after it."""
        wqs, aqs = list(self.weight_quantizers().values()), list(self.act_quantizers().values())
        prev = [q.enabled for q in wqs], [q.enabled for q in aqs]
        for q in wqs:
            q.enabled = mode is not QuantMode.FP
        for q in aqs:
            q.enabled = mode is QuantMode.FULL
        try:
            yield
        finally:
            for q, e in zip(wqs, prev[0]):
                q.enabled = e
            for q, e in zip(aqs, prev[1]):
                q.enabled = e

    @contextlib.contextmanager
    def override(self, enabled: Callable[[int, str, str], bool], *,
                 reference: nn.Module | None = None) -> Iterator[None]:  # fmt: skip
        """Per-call, per-quantizer switch (ablations): inside the block, before every UNet call, the quantizer
        named ``name`` (its module path, e.g. ``up_blocks.0.resnets.0.conv1.input_quantizer``) of ``kind``
        "weight" or "act" is on iff ``enabled(g, name, kind)``, g being the call's timestep group. Restores the
        previous flags (and parameters) after the block.

        A switched-off weight quantizer passes the layer's latent weight through, which QuEST's finetuning has
        moved away from the float weight (it is tuned to be quantized). With ``reference`` (the float UNet this
        one was quantized from: same module names, unmodified weights), a layer whose weight quantizers are all
        off in a call computes with the reference's weight (times its LES gamma, so that its ``x / gamma`` input
        stays exact) and bias instead: that layer is then the float layer."""
        wqs, aqs = self.weight_quantizers(), self.act_quantizers()
        qs = [(q, n, "weight") for n, q in wqs.items()] + [(q, n, "act") for n, q in aqs.items()]
        prev = [q.enabled for q, _, _ in qs]
        table: dict[int, list[bool]] = {}  # group -> flags, in the order of qs
        swaps = []  # (layer, its weight quantizers, latent (weight, bias), float (weight, bias))
        if reference is not None:
            for name, layer in self.layers().items():
                own = layer.weight_quantizers()
                if not own:
                    continue
                ref = reference.get_submodule(name)
                w = ref.weight.detach().to(layer.weight.device, layer.weight.dtype)
                if layer.les_scale is not None:
                    w = w * layer.les_scale.view((1, -1) + (1,) * (w.dim() - 2))
                b = None if ref.bias is None else nn.Parameter(ref.bias.detach().to(w.device), requires_grad=False)
                latent = (layer._parameters["weight"], layer._parameters.get("bias"))
                swaps.append((layer, own, latent, (nn.Parameter(w, requires_grad=False), b)))

        def apply(module, args):  # registered after _select_group, so ctx.group is the call's group
            g = self.ctx.group
            if g not in table:
                table[g] = [bool(enabled(g, n, k)) for _, n, k in qs]
            for (q, _, _), e in zip(qs, table[g]):
                q.enabled = e
            for layer, own, latent, flt in swaps:
                w, b = flt if not any(q.enabled for q in own) else latent
                layer._parameters["weight"] = w
                if latent[1] is not None:
                    layer._parameters["bias"] = b

        handle = self.unet.register_forward_pre_hook(apply)
        try:
            yield
        finally:
            handle.remove()
            for (q, _, _), e in zip(qs, prev):
                q.enabled = e
            for layer, _, latent, _ in swaps:
                layer._parameters["weight"] = latent[0]
                if latent[1] is not None:
                    layer._parameters["bias"] = latent[1]

    @contextlib.contextmanager
    def calibrating(self, *, method: str = "minmax", running_stat: bool = False, accumulate: bool = False,
                    only: list[ActQuantizer] | None = None) -> Iterator[None]:  # fmt: skip
        """Activation quantizers initialise their active group's row from the data they see."""
        qs = only if only is not None else list(self.act_quantizers().values())
        for q in qs:
            q.calib = CalibState(method=method, running_stat=running_stat, accumulate=accumulate)
        try:
            yield
        finally:
            for q in qs:
                q.calib = None

    def freeze_weights(self) -> None:
        for m in self.layers().values():
            m.freeze_weights()

    def remove(self) -> None:
        self._hook.remove()


def quantize_(
    unet: nn.Module,
    recipe: QuantRecipe,
    *,
    group_timesteps: list[int],
    plan: QuantPlan | None = None,
    pts_layers: tuple[str, ...] = (),
) -> QuantizedUNet:
    """Quantize ``unet`` in place per ``recipe`` (or a stored ``plan``) and return its handle.

    Args:
        group_timesteps: t_0 > ... > t_{G-1}, the first timestep of every group.
        plan: a plan read from an artifact; None plans from the recipe.
    Returns:
        QuantizedUNet with every quantizer at scale 1 (calibration sets them) in FULL mode.
    """
    groups = len(group_timesteps)
    plan = plan or plan_quantization(unet, recipe, groups=groups, pts_layers=pts_layers)
    if plan.groups != groups:
        raise RecipeError(f"the plan has {plan.groups} timestep groups but {groups} group timesteps were given")
    ctx = GroupContext(group_timesteps)
    for spec in plan.layers:
        float_mod = unet.get_submodule(spec.name)
        cls = quant_class_for(float_mod)
        q = cls.from_float(float_mod, spec, groups=groups, ctx=ctx, per_channel_weights=plan.w_per_channel)
        parent, _, leaf = spec.name.rpartition(".")
        setattr(unet.get_submodule(parent) if parent else unet, leaf, q)
    signed = plan.a_symmetric
    for a in plan.attention:
        attn = unet.get_submodule(a.name)

        def aq(bits, *, zero_anchored=False, symmetric=signed):
            return ActQuantizer(bits=bits, groups=groups, symmetric=symmetric, zero_anchored=zero_anchored, ctx=ctx,
                                axis=-1, channels=0 if plan.a_per_channel else None)  # 0: sized when first observed  # fmt: skip

        for qname, bits, kw in (("input_quantizer", a.input_bits, {}), ("context_quantizer", a.context_bits, {}),
                                ("q_quantizer", a.qkv_bits, {}), ("k_quantizer", a.qkv_bits, {}),
                                ("v_quantizer", a.qkv_bits, {}), ("p_quantizer", a.p_bits, {"zero_anchored": True})):  # fmt: skip
            if bits is not None:
                attn.add_module(qname, aq(bits, **kw))
    processor = QuantAttnProcessor()
    for a in plan.attention:  # Attention.set_processor: the official hook (UNet2DModel has no set_attn_processor)
        unet.get_submodule(a.name).set_processor(processor)
    return QuantizedUNet(unet, plan, ctx)
