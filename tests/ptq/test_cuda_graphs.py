"""CUDA-graph replay of reconstruction and finetuning steps computes what the eager loop computes
(`make test-gpu`; skipped without a GPU). Both paths use capturable Adam on a GPU; measured on an H200
(torch 2.11): identical losses and weights. The tolerances below only allow for GPU kernels that
accumulate with atomics; a graph that replayed stale inputs or missed an update is far outside them.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from quest_export.calib.collect import collect
from quest_export.finetune import finetune_
from quest_export.models.sampling import SamplerSpec
from quest_export.ptq.stage_a import run_stage_a
from quest_export.quant.artifact import load_quantized, save_quantized
from quest_export.recipe.config import FinetuneConfig, PtqConfig, QuantRecipe
from tests.tiny import tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make test-gpu)"),
]

QUANT = QuantRecipe(method="quest", w_bits=4, a_bits=8)
FT = FinetuneConfig(b_epochs=6, b_samples=4, b_batch=2, b_lr_weight=1e-3, b_lr_scale=1e-3, c_epochs=2, c_samples=8,
                    c_batch=4, c_lr_weight=1e-3, c_lr_scale=1e-3)  # fmt: skip


@pytest.fixture(scope="module")
def calib():
    model = tiny_model("cond")
    s = model.info.sampling
    spec = SamplerSpec(sampler=s["sampler"], steps=s["steps"], eta=s["eta"], guidance_scale=s["guidance_scale"])
    return collect(model, spec, trajectories=4, seed=0, show_progress=False)


def _stage_a(calib, graphs: bool):
    ptq = PtqConfig(adaround_iters=60, adaround_batch=8, act_batch=8, cuda_graphs=graphs)
    return run_stage_a(tiny_model("cond"), calib, QUANT, ptq, groups=3, device="cuda", show_progress=False)


def _codes(qunet) -> dict[str, torch.Tensor]:
    return {n: wq.w_int.detach().cpu() for n, wq in qunet.weight_quantizers().items() if wq.w_int.numel()}


def test_adaround_graph_replay_matches_eager(calib):
    torch.manual_seed(0)
    qe, re_ = _stage_a(calib, graphs=False)
    qg, rg = _stage_a(calib, graphs=True)
    assert {r["loop"] for r in re_.adaround.values()} == {"eager"}
    assert {r["loop"] for r in rg.adaround.values()} == {"graph"}, "capture fell back to eager"
    ce, cg = _codes(qe), _codes(qg)
    assert ce.keys() == cg.keys()
    flipped = sum(int((ce[k] != cg[k]).sum()) for k in ce)
    total = sum(v.numel() for v in ce.values())
    assert flipped <= 1e-3 * total, f"{flipped} of {total} integer weights differ between graph and eager"
    for name in re_.adaround:
        a, b = re_.adaround[name]["after"], rg.adaround[name]["after"]
        assert abs(a - b) <= 1e-4 * max(a, b) + 1e-7, (name, a, b)


def test_finetune_graph_replay_matches_eager(calib, tmp_path):
    qunet, _ = _stage_a(calib, graphs=False)
    m = tiny_model("cond")
    path = save_quantized(qunet, tmp_path / "stage_a", recipe_fingerprint="f1" * 32, quant=QUANT, sampler=m.info.sampling,
                          model_ref={"name": m.name, "cond": None, "hash": m.source_hash})  # fmt: skip
    results = {}
    for graphs in (False, True):  # the same Stage A for both rows
        model = tiny_model("cond")
        teacher = copy.deepcopy(model.unet).cuda()
        qunet = load_quantized(path, device="cuda", model=model).qunet
        rep = finetune_(qunet, teacher, calib, replace(FT, cuda_graphs=graphs), family=model.family, device="cuda",
                        show_progress=False)  # fmt: skip
        results[graphs] = (rep, {k: v.detach().cpu() for k, v in qunet.unet.state_dict().items()})
    (re_, se), (rg, sg) = results[False], results[True]
    assert set(re_.loops) == {"eager"} and set(rg.loops) == {"graph"}, (re_.loops, rg.loops)
    for g in re_.stage_b:
        assert re_.stage_b[g] == pytest.approx(rg.stage_b[g], rel=1e-4)
    for e in re_.stage_c:
        assert re_.stage_c[e] == pytest.approx(rg.stage_c[e], rel=1e-4)
    for k in se:
        if se[k].is_floating_point():
            assert torch.allclose(se[k], sg[k], rtol=1e-4, atol=1e-6), k
