"""``quantize_`` on both tiny UNet families (quest.md 2.1, 2.6-2.8): module swap, parameters kept, FP mode equals
float, 16-bit fake quant close to float, split shortcut, sibling sharing, attention switch, first/last policy and
override globs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quest_export.errors import RecipeError
from quest_export.ptq.stage_a import init_weights_
from quest_export.quant.attention import QuantAttnProcessor
from quest_export.quant.model import QuantMode, plan_quantization, quantize_, shortcut_splits
from quest_export.quant.modules import QuantConv2d, QuantLinear
from quest_export.quant.primitives import fake_quant, symmetric_scale
from quest_export.quant.quantizer import ActQuantizer
from quest_export.recipe.config import LayerOverride, QuantRecipe
from tests.tiny import inputs, tiny_cond_unet, tiny_uncond_unet

KINDS = ["cond", "uncond"]
FP_ATOL = 1e-5  # explicit attention (QuantAttnProcessor) vs diffusers' SDPA; measured max 4.8e-7 (CPU)
# SQNR (dB) of the full fake-quant model against float, calibrated (min/max) on the evaluated batch.
# Measured on CPU (1 thread), torch 2.13: 16 bits 77.2 (cond) / 75.9 (uncond); 8 bits 30.1 / 29.5; 4 bits 5.5 / 5.0.
SQNR_16BIT_MIN = 65.0  # about 11 dB below the measured 16-bit value
SQNR_8BIT_MIN = 20.0  # 8 bits must still be a working model...
SQNR_16_OVER_8_MIN = 20.0  # ...clearly worse than 16 bits (measured gap 46-47 dB)
SQNR_SPLIT_LAYER_MIN = 80.0  # one split conv_shortcut at 16 bits against its float conv; measured 88.8 / 88.9 dB


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: extra OpenMP threads only add contention (a tiny forward: 9 ms on 1 thread, 350 ms on 2 busy cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_unet(kind: str):
    return tiny_cond_unet() if kind == "cond" else tiny_uncond_unet()


def run(unet, x, t, cond):
    return unet(x, t, encoder_hidden_states=cond).sample if cond is not None else unet(x, t).sample


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())).item()


def attention_modules(unet) -> dict:
    from diffusers.models.attention_processor import Attention

    return {n: m for n, m in unet.named_modules() if isinstance(m, Attention)}


@torch.no_grad()
def calibrated(kind: str, bits: int, batch, **recipe):
    """A tiny UNet quantized at `bits` (ptq grids), absmax weights, min/max activations on `batch`."""
    unet = make_unet(kind)
    q = quantize_(unet, QuantRecipe(method="ptq", w_bits=bits, a_bits=bits, **recipe), group_timesteps=[500])
    init_weights_(q, method="absmax")
    with q.calibrating(method="minmax"):
        run(unet, *batch)
    return unet, q


# -- the swap -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_swaps_every_conv_and_linear_keeping_parameters(kind):
    unet = make_unet(kind)
    n_conv = sum(type(m) is nn.Conv2d for m in unet.modules())
    n_lin = sum(type(m) is nn.Linear for m in unet.modules())
    assert n_conv > 10 and n_lin > 3
    params = dict(unet.named_parameters())
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    q = quantize_(unet, QuantRecipe(), group_timesteps=[800, 400])
    assert sum(type(m) is QuantConv2d for m in unet.modules()) == n_conv
    assert sum(type(m) is QuantLinear for m in unet.modules()) == n_lin
    assert not [n for n, m in unet.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    assert len(q.layers()) == len(q.plan.layers) == n_conv + n_lin
    for name, p in params.items():  # the same Parameter objects, under the same names
        assert unet.get_parameter(name) is p, name
    new_state = unet.state_dict()
    for k, v in state.items():
        assert torch.equal(new_state[k], v), k
    extra = set(new_state) - set(state)
    assert extra and all("quantizer" in k for k in extra), sorted(k for k in extra if "quantizer" not in k)
    # every activation quantizer has one scale row per group
    assert all(aq.groups == 2 for aq in q.act_quantizers().values())


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_fp_mode_equals_float_model(kind):
    unet = make_unet(kind)
    batch = inputs(unet, batch=3, seed=4)
    ref = run(unet, *batch)  # diffusers' own processors (SDPA)
    q = quantize_(unet, QuantRecipe(w_bits=4, a_bits=4), group_timesteps=[500])
    attn = attention_modules(unet)
    assert attn and all(isinstance(a.processor, QuantAttnProcessor) for a in attn.values())
    with q.mode(QuantMode.FP):
        out = run(unet, *batch)
    assert (out - ref).abs().max().item() <= FP_ATOL
    assert not torch.equal(run(unet, *batch), ref)  # FULL mode (the default) does quantize


def test_mode_restores_previous_state():
    unet = make_unet("cond")
    q = quantize_(unet, QuantRecipe(), group_timesteps=[500])
    wqs, aqs = list(q.weight_quantizers().values()), list(q.act_quantizers().values())
    with q.mode(QuantMode.WEIGHT_ONLY):
        assert all(w.enabled for w in wqs) and not any(a.enabled for a in aqs)
        with q.mode(QuantMode.FP):
            assert not any(w.enabled for w in wqs) and not any(a.enabled for a in aqs)
        assert all(w.enabled for w in wqs) and not any(a.enabled for a in aqs)
    assert all(w.enabled for w in wqs) and all(a.enabled for a in aqs)
    with pytest.raises(ZeroDivisionError), q.mode(QuantMode.FP):
        raise ZeroDivisionError
    assert all(w.enabled for w in wqs) and all(a.enabled for a in aqs)


# -- accuracy against float -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_sixteen_bit_full_mode_matches_float(kind):
    batch = inputs(make_unet(kind), batch=4, seed=1)
    ref = run(make_unet(kind), *batch)
    unet16, q16 = calibrated(kind, 16, batch, softmax_bits=16)
    assert all(int(a.initialized.all()) for a in q16.act_quantizers().values())
    s16 = sqnr(ref, run(unet16, *batch))
    unet8, _ = calibrated(kind, 8, batch)
    s8 = sqnr(ref, run(unet8, *batch))
    assert s16 > SQNR_16BIT_MIN, f"16-bit SQNR {s16:.1f} dB"
    assert s8 > SQNR_8BIT_MIN, f"8-bit SQNR {s8:.1f} dB"
    assert s16 - s8 > SQNR_16_OVER_8_MIN, f"16-bit {s16:.1f} dB vs 8-bit {s8:.1f} dB"


# -- split shortcut (quest.md 2.8) ------------------------------------------------------------------------------------


def _deep_channels_from_dataflow(unet, batch) -> dict[str, int]:
    """C_deep of every decoder ResNet, read from the tensors: its input starts with the previous deep output."""
    events: list = []
    hooks = []

    def out_of(o):
        if hasattr(o, "sample"):
            return o.sample
        return o[0] if isinstance(o, tuple) else o

    for j, block in enumerate(unet.up_blocks):
        hooks.append(
            block.register_forward_pre_hook(
                lambda m, a, kw, j=j: events.append(("in", j, None, a[0] if a else kw["hidden_states"])),
                with_kwargs=True,
            )
        )
        for i, r in enumerate(block.resnets):
            hooks.append(
                r.register_forward_pre_hook(
                    lambda m, a, kw, j=j, i=i: events.append(("resnet", j, i, a[0] if a else kw["input_tensor"])),
                    with_kwargs=True,
                )
            )
            hooks.append(r.register_forward_hook(lambda m, a, o, j=j: events.append(("out", j, None, out_of(o)))))
        for att in getattr(block, "attentions", None) or []:
            hooks.append(att.register_forward_hook(lambda m, a, o, j=j: events.append(("out", j, None, out_of(o)))))
    try:
        with torch.no_grad():
            run(unet, *batch)
    finally:
        for h in hooks:
            h.remove()
    found, deep = {}, None
    for kind, j, i, t in events:
        if kind in ("in", "out"):
            deep = t
            continue
        c = deep.shape[1]
        assert c < t.shape[1] and torch.equal(t[:, :c], deep), (
            f"up_blocks.{j}.resnets.{i} does not read concat(deep, skip)"
        )
        sc = unet.up_blocks[j].resnets[i].conv_shortcut
        if sc is not None:
            assert sc.in_channels == t.shape[1]
            found[f"up_blocks.{j}.resnets.{i}.conv_shortcut"] = c
    return found


@pytest.mark.parametrize("kind", KINDS)
def test_shortcut_splits_finds_exactly_the_decoder_concat_shortcuts(kind):
    unet = make_unet(kind)
    expected = _deep_channels_from_dataflow(unet, inputs(unet))
    assert len(expected) == 4
    assert shortcut_splits(unet) == expected
    all_shortcuts = [n for n, m in unet.named_modules() if n.endswith("conv_shortcut") and m is not None]
    assert "down_blocks.1.resnets.0.conv_shortcut" in all_shortcuts  # an encoder shortcut exists and is not split
    assert set(shortcut_splits(unet)) < set(all_shortcuts)
    plan = plan_quantization(unet, QuantRecipe(split_shortcut=True), groups=1)
    assert {s.name: s.split_at for s in plan.layers if s.split_at is not None} == expected
    assert not [s for s in plan_quantization(unet, QuantRecipe(split_shortcut=False), groups=1).layers if s.split_at]
    # the method default: on for qdiffusion / quest / dmq, off for ptq (quest.md 2.8)
    assert not [s for s in plan_quantization(unet, QuantRecipe(method="ptq"), groups=1).layers if s.split_at]
    assert len([s for s in plan_quantization(unet, QuantRecipe(method="quest"), groups=1).layers if s.split_at]) == 4


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_split_shortcut_at_sixteen_bits(kind):
    batch = inputs(make_unet(kind), batch=4, seed=1)
    name = "up_blocks.1.resnets.0.conv_shortcut"
    seen = {}
    probe = make_unet(kind)
    q = quantize_(probe, QuantRecipe(method="ptq", w_bits=16, a_bits=16, softmax_bits=16, split_shortcut=True),
                  group_timesteps=[500])  # fmt: skip
    layer = probe.get_submodule(name)
    c = layer.spec.split_at
    assert c == 16 and layer.weight_quantizer_skip is not None and layer.input_quantizer_skip is not None
    init_weights_(q, method="absmax")
    h = layer.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].clone()))
    with q.calibrating(method="minmax"):
        run(probe, *batch)
    h.remove()
    x, w = seen["x"], layer.weight
    # each half has its own weight scales (per output channel) and its own activation scale
    assert torch.equal(
        layer.weight_quantizer.scale, symmetric_scale(w[:, :c].abs().amax(dim=(1, 2, 3), keepdim=True), 16)
    )
    assert torch.equal(
        layer.weight_quantizer_skip.scale, symmetric_scale(w[:, c:].abs().amax(dim=(1, 2, 3), keepdim=True), 16)
    )
    assert torch.equal(layer.input_quantizer.scales[0].detach(), symmetric_scale(x[:, :c].abs().max().reshape(1), 16))
    assert torch.equal(
        layer.input_quantizer_skip.scales[0].detach(), symmetric_scale(x[:, c:].abs().max().reshape(1), 16)
    )
    assert layer.input_quantizer.scales[0].item() != layer.input_quantizer_skip.scales[0].item()
    # the split layer is the sum of two 1x1 convs with the bias added once (the export form)...
    y = layer(x)
    wq1, wq2 = layer.weight_quantizer(w[:, :c]), layer.weight_quantizer_skip(w[:, c:])
    xq1, xq2 = layer.input_quantizer(x[:, :c]), layer.input_quantizer_skip(x[:, c:])
    two = F.conv2d(xq1, wq1) + F.conv2d(xq2, wq2) + layer.bias.view(1, -1, 1, 1)
    assert torch.allclose(y, two, rtol=0, atol=1e-6)
    # ...and at 16 bits equals the float (unsplit) conv to tight tolerance
    assert sqnr(F.conv2d(x, w, layer.bias), y) > SQNR_SPLIT_LAYER_MIN
    # the whole split model equals the unsplit one at 16 bits as closely as either equals float
    ref = run(make_unet(kind), *batch)
    unsplit, _ = calibrated(kind, 16, batch, softmax_bits=16, split_shortcut=False)
    out_unsplit, out_split = run(unsplit, *batch), run(probe, *batch)
    assert sqnr(out_unsplit, out_split) > SQNR_16BIT_MIN
    assert sqnr(ref, out_split) > SQNR_16BIT_MIN


# -- attention quantizers (quest.md 2.1, 2.6) ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_sibling_projections_share_one_input_quantizer(kind):
    batch = inputs(make_unet(kind), batch=2, seed=3)
    unet, q = calibrated(kind, 8, batch)
    attn = attention_modules(unet)
    kinds = {a.is_cross_attention for a in attn.values()}
    assert kinds == ({False, True} if kind == "cond" else {False})
    seen: dict = {}
    hooks = [unet.get_submodule(f"{n}.{leaf}").register_forward_pre_hook(
        lambda m, a, key=f"{n}.{leaf}": seen.setdefault(key, a[0].clone()))
        for n in attn for leaf in ("to_q", "to_k", "to_v")]  # fmt: skip
    run(unet, *batch)
    for h in hooks:
        h.remove()
    for n, a in attn.items():
        assert isinstance(a.input_quantizer, ActQuantizer)
        shared_kv = "context_quantizer" if a.is_cross_attention else "input_quantizer"
        assert hasattr(a, "context_quantizer") == a.is_cross_attention
        for leaf, owner in (("to_q", "input_quantizer"), ("to_k", shared_kv), ("to_v", shared_kv)):
            lin = unet.get_submodule(f"{n}.{leaf}")
            assert lin.input_quantizer is None and lin.spec.a_bits is None, f"{n}.{leaf} has its own input quantizer"
            assert lin.spec.shared_input == f"{n}.{owner}"
            # what the projection reads lies on the shared quantizer's grid
            aq = getattr(a, owner)
            x = seen[f"{n}.{leaf}"]
            assert x.abs().max() > 0 and torch.equal(x, fake_quant(x, aq.scales[0], 0.0, aq.qmin, aq.qmax)), (
                f"{n}.{leaf}"
            )
        assert unet.get_submodule(f"{n}.to_out.0").input_quantizer is not None  # not a sibling


@pytest.mark.parametrize("kind", KINDS)
def test_unshared_siblings_get_their_own_quantizers(kind):
    unet = make_unet(kind)
    quantize_(unet, QuantRecipe(share_sibling_inputs=False), group_timesteps=[500])
    for n, a in attention_modules(unet).items():
        assert not hasattr(a, "input_quantizer") and not hasattr(a, "context_quantizer")
        for leaf in ("to_q", "to_k", "to_v"):
            lin = unet.get_submodule(f"{n}.{leaf}")
            assert isinstance(lin.input_quantizer, ActQuantizer) and lin.spec.shared_input is None


def test_shared_siblings_with_different_bits_are_refused():
    unet = make_unet("uncond")
    ov = LayerOverride(pattern="*attentions.0.to_q", a_bits=8)
    with pytest.raises(RecipeError, match=r"share one input quantizer but have activation bits \[4, 8\]"):
        plan_quantization(unet, QuantRecipe(w_bits=4, a_bits=4, overrides=(ov,)), groups=1)
    plan_quantization(unet, QuantRecipe(w_bits=4, a_bits=4, overrides=(ov,), share_sibling_inputs=False), groups=1)


@pytest.mark.parametrize("kind", KINDS)
def test_attention_quant_switch(kind):
    off = make_unet(kind)
    quantize_(off, QuantRecipe(attention_quant=False), group_timesteps=[500])
    for n, a in attention_modules(off).items():
        present = [qn for qn in ("q_quantizer", "k_quantizer", "v_quantizer", "p_quantizer") if hasattr(a, qn)]
        assert present == [], f"{n}: {present}"
        assert isinstance(a.input_quantizer, ActQuantizer)  # the projections' input is still quantized
    on = make_unet(kind)
    quantize_(on, QuantRecipe(a_bits=6, softmax_bits=16), group_timesteps=[500])
    for a in attention_modules(on).values():
        assert a.q_quantizer.bits == a.k_quantizer.bits == a.v_quantizer.bits == 6
        p = a.p_quantizer
        assert (p.bits, p.zero_anchored, p.qmin, p.qmax) == (16, True, 0, 2**16 - 1)  # unsigned, anchored at 0


# -- first/last layers and overrides ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy,expected", [
    ("a8", (4, 8)),  # the QuEST reference: inputs at 8 bits, weights at b_w
    ("quantized", (4, 4)),
    ("w8a8", (8, 8)),
    ("fp", None),  # kept in float: not swapped at all
])  # fmt: skip
def test_first_last_policies(kind, policy, expected):
    unet = make_unet(kind)
    q = quantize_(unet, QuantRecipe(w_bits=4, a_bits=4, first_last=policy), group_timesteps=[500])
    specs = {s.name: s for s in q.plan.layers}
    for name, role in (("conv_in", "first"), ("conv_out", "last")):
        if expected is None:
            assert name not in specs and type(unet.get_submodule(name)) is nn.Conv2d
        else:
            s = specs[name]
            assert (s.w_bits, s.a_bits, s.role) == (*expected, role)
            m = unet.get_submodule(name)
            assert (m.weight_quantizer.bits, m.input_quantizer.bits) == expected
    assert specs["down_blocks.0.resnets.0.conv1"].w_bits == 4 and specs["down_blocks.0.resnets.0.conv1"].a_bits == 4
    assert specs["time_embedding.linear_1"].a_bits == 4  # the time embedding is not part of the policy


@pytest.mark.parametrize("kind", KINDS)
def test_overrides_by_glob(kind):
    unet = make_unet(kind)
    names = [n for n, m in unet.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    temb = [n for n in names if n.endswith("time_emb_proj")]
    up1 = [n for n in names if n.startswith("up_blocks.1.")]
    assert len(temb) >= 5 and len(up1) >= 5
    recipe = QuantRecipe(
        w_bits=4,
        a_bits=4,
        first_last="quantized",
        split_shortcut=False,
        overrides=(
            LayerOverride(pattern="*time_emb_proj", w_bits=8, a_bits=6),
            LayerOverride(pattern="up_blocks.1.*", quantize=False),
        ),
    )
    q = quantize_(unet, recipe, group_timesteps=[500])
    specs = {s.name: s for s in q.plan.layers}
    for n in names:
        m = unet.get_submodule(n)
        if n in up1:
            assert n not in specs and type(m) in (nn.Conv2d, nn.Linear), n  # quantize=False keeps it float
        elif n in temb:
            assert (specs[n].w_bits, specs[n].a_bits) == (8, 6) and m.weight_quantizer.bits == 8, n
        elif specs[n].shared_input is None:
            assert (specs[n].w_bits, specs[n].a_bits) == (4, 4), n
    # a later override wins over an earlier one on the same layer
    later = plan_quantization(make_unet(kind), QuantRecipe(w_bits=4, a_bits=4, overrides=(
        LayerOverride(pattern="conv_in", w_bits=8), LayerOverride(pattern="conv_*", w_bits=6))), groups=1)  # fmt: skip
    assert {s.name: s.w_bits for s in later.layers}["conv_in"] == 6


@pytest.mark.parametrize("kind", KINDS)
def test_override_matching_nothing_names_closest_layers(kind):
    unet = make_unet(kind)
    names = {n for n, m in unet.named_modules() if type(m) in (nn.Conv2d, nn.Linear)}
    with pytest.raises(RecipeError) as e:
        quantize_(unet, QuantRecipe(overrides=(LayerOverride(pattern="down_blocks.*.conv9", w_bits=8),)),
                  group_timesteps=[500])  # fmt: skip
    msg = str(e.value)
    assert "override 'down_blocks.*.conv9' matched no quantizable layer; closest names: " in msg
    close = msg.split("closest names: ")[1].split(". Fix")[0].split(", ")
    assert close and set(close) <= names and all(c.startswith("down_blocks.") for c in close)
    assert "quest-export info" in msg
    assert not any(isinstance(m, (QuantConv2d, QuantLinear)) for m in unet.modules())  # refused before any swap


def test_frozen_weight_cache_follows_every_change():
    """A frozen weight quantizer dequantizes once; in-place loads, refreezing and unfreezing all invalidate that."""
    from quest_export.quant.quantizer import WeightQuantizer

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, generator=g)
    wq = WeightQuantizer((4, 3), bits=4, symmetric=True, per_channel=True)
    wq.scale.copy_(w.abs().amax(1, keepdim=True) / 7)
    wq.freeze(w)
    first = wq(w)
    assert wq(w) is first  # cached
    assert torch.equal(first, fake_quant(w, wq.scale, 0.0, -8, 7))
    state = {k: v.clone() for k, v in wq.state_dict().items()}
    state["w_int"] = -state["w_int"]
    wq.load_state_dict(state)  # copies into the same tensors in place
    assert torch.equal(wq(w), -first)
    wq.scale.mul_(2)  # an in-place scale change
    assert torch.equal(wq(w), -2 * first)
    wq.unfreeze()
    assert torch.equal(wq(w), fake_quant(w, wq.scale, 0.0, -8, 7))  # latent path
    wq.freeze(w * 0.5)
    assert torch.equal(wq(w), fake_quant(w * 0.5, wq.scale, 0.0, -8, 7))


@torch.no_grad()
def test_override_switches_quantizers_per_group_and_layer():
    """``QuantizedUNet.override``: the rule sees the call's timestep group and each quantizer's name and kind; all
    on is FULL, all off is FP, a group-only rule quantizes that group's calls alone; flags come back afterwards."""
    unet = make_unet("uncond")
    x, _, _ = inputs(unet, batch=2, seed=5)
    t_early, t_late = torch.full((2,), 900), torch.full((2,), 300)  # groups 0 and 1 of [800, 400]
    q = quantize_(unet, QuantRecipe(method="ptq", w_bits=4, a_bits=4), group_timesteps=[800, 400])
    init_weights_(q, method="absmax")
    for g, t in ((0, t_early), (1, t_late)):
        with q.ctx.select(g), q.calibrating(method="minmax"):
            unet(x, t)
    full = {g: unet(x, t).sample for g, t in ((0, t_early), (1, t_late))}
    with q.mode(QuantMode.FP):
        fp = {g: unet(x, t).sample for g, t in ((0, t_early), (1, t_late))}
    with q.mode(QuantMode.WEIGHT_ONLY):
        w_only = unet(x, t_late).sample
    assert not torch.equal(full[0], fp[0]) and not torch.equal(full[1], fp[1])
    with q.override(lambda g, name, kind: True):
        assert torch.equal(unet(x, t_early).sample, full[0])
    with q.override(lambda g, name, kind: False):
        assert torch.equal(unet(x, t_late).sample, fp[1])
    with q.override(lambda g, name, kind: g == 1):  # quantized in group 1 only
        assert torch.equal(unet(x, t_early).sample, fp[0])
        assert torch.equal(unet(x, t_late).sample, full[1])
    with q.override(lambda g, name, kind: kind == "weight"):
        assert torch.equal(unet(x, t_late).sample, w_only)
    # one layer set kept float: the same as switching its quantizers off by hand
    up = [m for n, m in list(q.weight_quantizers().items()) + list(q.act_quantizers().items())
          if n.startswith("up_blocks.")]  # fmt: skip
    assert up
    with q.override(lambda g, name, kind: not name.startswith("up_blocks.")):
        part = unet(x, t_late).sample
        assert not any(m.enabled for m in up)
    assert all(m.enabled for m in up)  # restored
    for m in up:
        m.enabled = False
    try:
        assert torch.equal(unet(x, t_late).sample, part)
    finally:
        for m in up:
            m.enabled = True
    assert not torch.equal(part, full[1]) and not torch.equal(part, fp[1])


@torch.no_grad()
def test_override_with_reference_computes_float_layers_with_the_float_weights():
    """Finetuning moves latent weights (quest.md 5): with ``reference`` a layer whose weight quantizers are off runs
    the float weight and bias (times its LES gamma), so all-off is the float model even after folds and drift;
    without it, all-off is FP mode on the moved weights. Parameters come back after the block."""
    from quest_export.pipeline import resolve_recipe
    from quest_export.ptq.les import fold_les_, les_layers

    ref = tiny_uncond_unet()
    unet = tiny_uncond_unet()
    q = quantize_(unet, resolve_recipe(method="dmq", bits="w4a6").quant, group_timesteps=[800, 400])
    g = torch.Generator().manual_seed(3)
    for m in les_layers(unet):
        fold_les_(m, torch.exp(torch.empty_like(m.les_scale).uniform_(-1.4, 1.4, generator=g)))
    moved = list(q.layers().values())[:6]
    for m in moved:  # what Stages B/C do to the latent weights and biases of the layers they train
        m.weight.add_(0.05 * torch.randn(m.weight.shape, generator=g))
        if m.bias is not None:
            m.bias.add_(0.05 * torch.randn(m.bias.shape, generator=g))
    latent = {n: (m.weight, m.bias) for n, m in q.layers().items()}
    x, t, _ = inputs(unet, batch=2, seed=6)
    want = ref(x, t).sample
    with q.mode(QuantMode.FP):
        fp = unet(x, t).sample
    assert (fp - want).abs().max().item() > 100 * FP_ATOL  # the moved weights change the float function
    with q.override(lambda g, n, k: False, reference=ref):
        got = unet(x, t).sample
    assert (got - want).abs().max().item() <= 10 * FP_ATOL
    with q.override(lambda g, n, k: False):
        assert torch.equal(unet(x, t).sample, fp)
    assert all(m.weight is latent[n][0] and m.bias is latent[n][1] for n, m in q.layers().items())
    with q.override(lambda g, n, k: k == "act", reference=ref):  # weights float, activations quantized
        a_only = unet(x, t).sample
    assert not torch.equal(a_only, got)
