"""DMQ (quest.md 7.6): LES folding, the timestep weights, the PTS vote, and dmq / dmq+quest end to end on the
tiny UNets."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from quest_export.calib.collect import collect
from quest_export.errors import NotBuiltError
from quest_export.methods import QuantizeJob, load_runner
from quest_export.models.sampling import SamplerSpec
from quest_export.pipeline import resolve_recipe
from quest_export.ptq.les import TimestepWeights, fold_les_, les_layers, les_unit, per_sample_sq_error
from quest_export.ptq.pts import FACTORS, channel_errors, vote
from quest_export.ptq.stage_a import run_unet
from quest_export.ptq.units import Captured, Unit
from quest_export.quant.artifact import load_quantized, save_quantized
from quest_export.quant.model import QuantMode, quantize_
from quest_export.quant.quantizer import ActQuantizer
from tests.tiny import inputs, tiny_model

KINDS = ("cond", "uncond")
# Folding gamma in [1/4, 4] into W and 1/gamma into the input changes only float rounding: measured max
# |FP_folded - float| / max(1, std) = 2e-7 (cond) .. 3e-7 (uncond), CPU float32; a gamma folded into the weight
# alone gives ~1e0.
FOLD_RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / max(1.0, float(b.std()))


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_les_folding_leaves_the_float_output_unchanged(kind):
    ref = tiny_model(kind).unet
    model = tiny_model(kind)
    q = quantize_(model.unet, resolve_recipe(method="dmq", bits="w4a6").quant, group_timesteps=[900, 500, 100])
    layers = les_layers(q.unet)
    assert len(layers) >= 10  # every quantized conv/linear with its own input quantizer
    assert all(m.spec.role not in ("temporal", "time-embedding", "first", "last") for m in layers)  # DMQ's FP set
    g = torch.Generator().manual_seed(3)
    for m in layers:
        fold_les_(m, torch.exp(torch.empty_like(m.les_scale).uniform_(-1.4, 1.4, generator=g)))  # gamma in [1/4, 4]
    batch = inputs(ref, batch=4)
    with q.mode(QuantMode.FP):
        got = run_unet(q.unet, *batch)
    assert _rel(got, run_unet(ref, *batch)) <= FOLD_RTOL
    m = layers[0]
    m.les_scale.fill_(1.0)  # the weight alone scaled: the float function changes (the test can fail)
    with q.mode(QuantMode.FP):
        assert _rel(run_unet(q.unet, *batch), run_unet(ref, *batch)) > 100 * FOLD_RTOL


def test_timestep_weights_follow_the_formula():
    tw = TimestepWeights(20, r=20.0, momentum=0.95)
    tw.update(torch.ones(40), torch.arange(20).repeat(2))  # equal shares: w = (1 - 1/20)^20 = 0.95^20 = 0.358
    assert torch.allclose(tw.weights(), torch.full((20,), 0.95**20))
    table = torch.tensor([4.0] + [1.0] * 16)  # group 0 holds 20 % of the error, the others 5 % each
    tw = TimestepWeights(17, r=20.0)
    tw.update(table, torch.arange(17))
    w = tw.weights()
    assert w[0].item() == pytest.approx(0.8**20) and w[1].item() == pytest.approx(0.95**20)  # 0.0115 and 0.358
    tw.update(torch.tensor([24.0]), torch.tensor([1]))  # EMA, momentum 0.95: 0.95 * 1 + 0.05 * 24 = 2.15
    assert tw.table[1].item() == pytest.approx(2.15)
    share = tw.table / tw.table.sum()
    assert torch.allclose(tw.weights(), (1 - share) ** 20)
    one = TimestepWeights(4)
    one.update(torch.tensor([5.0]), torch.tensor([2]))
    assert torch.equal(one.weights(), torch.ones(4))  # one observed group: its share is 1, so weight 1, not 0


def test_per_sample_loss_sums_channels_and_averages_positions():
    a, b = torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 5)
    a[1, :, 0, 0] = 2.0  # 3 channels x 4 at one of 20 positions
    assert per_sample_sq_error(a, b).tolist() == [0.0, pytest.approx(12 / 20)]


def _planted(n: int, *, agree: float, seed: int = 0) -> torch.Tensor:
    """(N, 3, 64): channel 0 outliers set the range, channel 1 small (factor 1/8 wins), channel 2 mixed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 64, generator=g) * 0.05
    x[:, 0] = torch.randn(n, 64, generator=g) * 0.3
    x[:, 0, 0] = 8.0  # the outlier that sets the per-tensor range
    k = int(round(agree * n))
    x[k:, 2] = torch.randn(n - k, 64, generator=g) * 3.0  # in these samples channel 2 is large: factor 1 wins
    return x


def test_vote_picks_the_planted_factor_and_falls_back_to_one_when_votes_disagree():
    q = ActQuantizer(bits=6, groups=1, symmetric=True, axis=1, pts_channels=3)
    q.set_row(0, torch.tensor([8.0 / 31]))
    x = _planted(40, agree=0.7)  # channel 2: 70 % of the samples vote 1/8 (the mode), 30 % vote 1
    errors = channel_errors(x, q, 0)
    assert errors.shape == (40, 3, len(FACTORS))
    factors, share = vote(errors, agreement=0.85)
    assert factors.tolist() == [1.0, 0.125, 1.0]  # outlier channel 1, small channel 1/8, channel 2 falls back to 1
    assert share[1].item() == 1.0 and share[2].item() == pytest.approx(0.7)  # below 0.85: the mode 1/8 is not taken
    assert (errors[:28, 2].argmin(-1) == FACTORS.index(0.125)).all() and (errors[28:, 2].argmin(-1) == 0).all()
    agreeing, _ = vote(channel_errors(_planted(40, agree=0.9), q, 0), agreement=0.85)
    assert agreeing.tolist() == [1.0, 0.125, 0.125]  # 90 % agree: above the threshold, the mode wins
    # the factors enter the forward pass: a small channel is quantized on the finer grid s / 8
    q.pts_factors.copy_(factors)
    y = q(x.view(40, 3, 8, 8)).view(40, 3, 64)
    assert ((y[:, 1] - x[:, 1]).abs().max() <= (8.0 / 31) / 16 + 1e-7).item()


@pytest.fixture(scope="module")
def calib_cond():
    return collect(tiny_model("cond"), SamplerSpec(steps=6, guidance_scale=2.0), trajectories=3, seed=0,
                   show_progress=False)  # fmt: skip


def test_les_lowers_the_quantization_error_of_a_layer_with_an_outlier_channel():
    unet = tiny_model("uncond").unet
    q = quantize_(unet, resolve_recipe(method="dmq", bits="w4a6", target="jetson").quant, group_timesteps=[500])
    layer = q.unet.get_submodule("up_blocks.1.resnets.0.conv1")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, layer.in_channels, 8, 8, generator=g)
    x[:, 3] *= 30.0  # one outlier channel sets the activation range
    with torch.no_grad():
        target = torch.nn.functional.conv2d(x, layer.weight, layer.bias, padding=1)
    unit = Unit("up_blocks.1.resnets.0.conv1", layer, "layer")
    cfg = resolve_recipe(method="dmq", sets=["dmq.les_iters=150", "dmq.les_lr=0.01"]).dmq
    r = les_unit(unit, q, Captured(args=[x], kwargs={}, n=64), target, torch.zeros(64, dtype=torch.long), cfg=cfg,
                 groups=1, device="cpu", seed=0)  # fmt: skip
    assert r["after"] < 0.6 * r["before"], r  # W4A6: measured 0.34 of the error before (CPU, 150 steps)
    assert layer.les_gamma is None and layer.les_scale[3] > 2 * layer.les_scale.median()  # folded; the outlier shrank


@pytest.mark.parametrize("method", ["dmq", "dmq+quest"])
def test_method_runs_end_to_end_on_the_tiny_unet(method, calib_cond, tmp_path):
    sets = ["dmq.les_iters=4", "dmq.les_batch=8", "dmq.pts_samples=12", "ptq.adaround_iters=3", "ptq.act_batch=8",
            "quant.timestep_groups=3", "finetune.b_epochs=1", "finetune.b_samples=2", "finetune.c_epochs=1",
            "finetune.c_samples=4"]  # fmt: skip
    recipe = resolve_recipe(method=method, bits="w4a6", sets=sets, model="fmnist-cond")
    model = tiny_model("cond")
    float_unet = copy.deepcopy(model.unet)
    runner = load_runner_for(recipe)
    job = QuantizeJob(model=model, calib=calib_cond, recipe=recipe, device="cpu", work=tmp_path / "work",
                      show_progress=False)  # fmt: skip
    job.work.mkdir()
    qunet, report = runner.quantize(job)
    a = report["stage_a"]
    assert a["les"] and a["pts"] and sorted(a["eps_mse"]) == [0, 1, 2]
    assert ("finetune" in report) == (method == "dmq+quest")
    layers = qunet.layers()
    assert any(m.les_scale is not None and not torch.equal(m.les_scale, torch.ones_like(m.les_scale))
               for m in layers.values())  # fmt: skip
    temporal = [m for n, m in layers.items() if n.endswith("time_emb_proj")]
    assert bool(temporal) == (method == "dmq+quest")  # DMQ leaves time_emb_proj in float; dmq+quest quantizes it
    batch = inputs(float_unet, batch=2)
    with torch.no_grad(), qunet.mode(QuantMode.FULL):
        y = run_unet(qunet.unet, *batch)
    assert torch.isfinite(y).all()
    # the artifact stores gamma and the PTS factors: a reload computes the same outputs bit for bit
    out = save_quantized(qunet, tmp_path / "art", recipe_fingerprint=recipe.fingerprint(), quant=recipe.quant,
                         model_ref={"name": "tiny", "cond": None, "hash": model.source_hash},
                         sampler=model.info.sampling)  # fmt: skip
    art = load_quantized(out, model=tiny_model("cond"))
    with torch.no_grad(), art.qunet.mode(QuantMode.FULL):
        assert torch.equal(run_unet(art.qunet.unet, *batch), y)
    # PTS on TensorRT folds f into the next weights (tests/export/test_dmq_export.py); with weights wider than 5 bits
    # the folded integers leave INT8, so such an artifact's TensorRT export refuses before any work, naming the fix
    from quest_export.export.exporter import onnx_from_artifact
    from quest_export.quant.artifact import PLAN_FILE
    from quest_export.recipe.config import ExportConfig
    from quest_export.recipe.targets import load_target

    meta = json.loads((out / PLAN_FILE).read_text())
    meta["quant"]["w_bits"] = 8
    (out / PLAN_FILE).write_text(json.dumps(meta))
    with pytest.raises(
        NotBuiltError, match=r"PTS on TensorRT targets .* up to 5 bits, not 8; quantize with --set dmq.pts=false"
    ):
        onnx_from_artifact(out, target=load_target("jetson"), cfg=ExportConfig(), out=tmp_path / "exp",
                           calib=calib_cond, recipe_fingerprint="0" * 64, scheduler_config={})  # fmt: skip
    assert not (tmp_path / "exp").exists()


def load_runner_for(recipe):
    from quest_export.recipe.methods import get_method

    return load_runner(get_method(recipe.quant.method))
