"""Export of DMQ artifacts (quest.md 7.6, 9.3b): LES folded into W_int with a Div by gamma before the input Q on
every target; PTS as per-channel Q/DQ scales s * f on ONNX Runtime, refused on TensorRT. ONNX Runtime reproduces
the fake-quant model (H-2 exact single-layer and weight-only graphs), and the lint of the target passes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from quest_export.export.exact import layer_graph_checks, weight_only_check
from quest_export.export.exporter import merge_groups_, onnx_from_artifact
from quest_export.export.lint import lint_model
from quest_export.models import load_model
from quest_export.pipeline import resolve_recipe
from quest_export.ptq.stage_a import run_stage_a
from quest_export.quant.artifact import load_quantized, save_quantized
from quest_export.recipe.config import ExportConfig, PtqConfig
from quest_export.recipe.targets import load_target
from quest_export.zoo.architectures import SCHEDULER_CONFIG
from tests.export.test_export import (
    EXACT_RTOL,
    FINGERPRINT,
    H2_RTOL,
    G,
    cosine,
    manifest_of,
    reference,
    rel_max_abs,
    run_ort,
    workshop_for,
)

DMQ_SETS = ["dmq.les_iters=6", "dmq.les_batch=8", "dmq.pts_samples=12", "dmq.les_lr=0.02"]


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    return workshop_for(tmp_path_factory)


_ARTS: dict = {}


def dmq_artifact(shop, kind: str, bits: str, target_id: str, sets=()) -> tuple:
    key = (kind, bits, target_id, tuple(sets))
    if key not in _ARTS:
        recipe = resolve_recipe(method="dmq", bits=bits, target=target_id, sets=[*DMQ_SETS, *sets],
                                model=str(shop.model_dir(kind)))  # fmt: skip
        model = load_model(str(shop.model_dir(kind)))
        qunet, rep = run_stage_a(model, shop.calib(kind), recipe.quant, PtqConfig(adaround_iters=2, act_batch=8),
                                 groups=G, device="cpu", show_progress=False, dmq=recipe.dmq)  # fmt: skip
        out = shop.root / "dmq-artifacts" / "-".join([kind, bits, target_id, *sets])
        save_quantized(qunet, out, recipe_fingerprint=FINGERPRINT, quant=recipe.quant, sampler=model.info.sampling,
                       model_ref={"name": str(shop.model_dir(kind)), "cond": None, "hash": model.source_hash})  # fmt: skip
        _ARTS[key] = (out, rep)
    return _ARTS[key]


def export(shop, art, target_id: str, name: str):
    out = shop.root / "dmq-exports" / name
    onnx_from_artifact(art, target=load_target(target_id), cfg=ExportConfig(scale_mode="merged"), out=out,
                       calib=shop.calib(name.split("-")[0]), recipe_fingerprint=FINGERPRINT,
                       scheduler_config=SCHEDULER_CONFIG)  # fmt: skip
    return out


DMQ_FLIP_COSINE_MIN = 0.995  # measured worst 0.99818 (see below); COSINE_MIN elsewhere


@pytest.mark.parametrize("kind,bits", [("cond", "w4a6"), ("uncond", "w4a8")])
def test_dmq_exports_exactly_for_onnx_runtime(shop, kind, bits):
    art, _ = dmq_artifact(shop, kind, bits, "cpu")
    exp = export(shop, art, "cpu", f"{kind}-{bits}-cpu")
    man = manifest_of(exp)
    les = [r["name"] for r in man["layers"] if r["les"]]
    pts = [r["name"] for r in man["layers"] if r["pts"]]
    assert les and pts, man["layers"][:2]
    kinds = {r["les_producer"] for r in man["layers"] if r["les"]}
    assert {"silu", "residual-or-concat", "linear-producer"} <= kinds and None not in kinds, kinds
    model = onnx.load(str(exp / man["graphs"][0]["file"]))
    inits = {i.name for i in model.graph.initializer}
    divs = [n for n in model.graph.node if n.op_type == "Div" and any(x.endswith(".export_les_scale") for x in n.input)]
    assert len(divs) == len(les)  # one Div by gamma per LES layer, fed by the layer's stored gamma
    assert all(any(x in inits for x in d.input) for d in divs)
    # ONNX Runtime reproduces the fake-quant references
    feeds, fq, _, groups = reference(exp, man)
    rows = [(cosine(run_ort(exp, man, f, g), w), rel_max_abs(run_ort(exp, man, f, g), w))
            for f, w, g in zip(feeds, fq, groups)]  # fmt: skip
    # every feed exact or one rounding flip away: the Div by gamma before each Q adds a rounding that the float
    # kernels' ulp differences can tip; measured worst flipped feed cosine 0.99818 (uncond W4A8, feed 0, AVX2 AMD
    # EPYC; 2 of 3 feeds exact there), none on the first x86-64 host
    assert all(c >= DMQ_FLIP_COSINE_MIN for c, _ in rows) and sum(e <= EXACT_RTOL for _, e in rows) >= 2, rows
    # H-2: the weight-only graph and every single-layer graph are exact
    ref = load_quantized(art)
    merge_groups_(ref.qunet)
    wo = weight_only_check(ref, man, feeds[0], groups[0], tol=H2_RTOL)
    assert wo["pass"], wo
    n = len(ref.qunet.layers())
    bad = [r for r in layer_graph_checks(ref, man, feeds[1], groups[1], tol=H2_RTOL, max_layers=n) if not r["pass"]]
    assert not bad, bad[:3]
    report = lint_model(exp / man["graphs"][0]["file"], load_target("cpu"), quantized_layers=man["layers"])
    assert not report.errors, report.format_text()


@pytest.mark.parametrize("pts", [True, False], ids=["les+pts", "les"])
def test_dmq_exports_exactly_for_tensorrt(shop, pts):
    """TensorRT quantizes activations per tensor: PTS exports as x * (1/f) before a per-tensor Q, with f folded into
    the consuming layer's INT8 weights (export/qdq.py); H-2 proves every single-layer graph exact, lint is clean."""
    sets = () if pts else ("dmq.pts=false",)
    art, rep = dmq_artifact(shop, "uncond", "w4a8", "jetson", sets=sets)
    assert rep.les and bool(rep.pts) == pts
    exp = export(shop, art, "jetson", "uncond-w4a8-jetson-" + ("les-pts" if pts else "les"))
    man = manifest_of(exp)
    feeds, fq, _, groups = reference(exp, man)
    got = [run_ort(exp, man, f, g) for f, g in zip(feeds, groups)]
    assert sum(rel_max_abs(a, w) <= EXACT_RTOL for a, w in zip(got, fq)) >= 2
    ref = load_quantized(art)
    merge_groups_(ref.qunet)
    n = len(ref.qunet.layers())
    bad = [r for r in layer_graph_checks(ref, man, feeds[1], groups[1], tol=H2_RTOL, max_layers=n) if not r["pass"]]
    assert not bad, bad[:3]
    report = lint_model(exp / man["graphs"][0]["file"], load_target("jetson"), quantized_layers=man["layers"])
    assert not report.errors, report.format_text()
    assert np.isfinite(got[0]).all()
    model = onnx.load(str(exp / man["graphs"][0]["file"]))
    inits = {i.name: i for i in model.graph.initializer}
    act_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and "weight_quantizer" not in n.name]
    assert all(len(inits[n.input[1]].dims) == 0 for n in act_q if n.input[1] in inits)  # per-tensor activations
    muls = [n for n in model.graph.node if n.op_type == "Mul" and any(x.endswith(".export_pts_inv") for x in n.input)]
    n_pts = sum(r["pts"] for r in man["layers"])  # one Mul per PTS quantizer (split shortcuts have two), into a Q
    assert (len(muls) >= n_pts > 0) if pts else not muls, (len(muls), n_pts)
    consumers = {x: n.op_type for n in model.graph.node for x in n.input}
    assert all(consumers.get(m.output[0]) in ("QuantizeLinear", "Clip") for m in muls)
