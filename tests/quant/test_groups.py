"""Timestep groups (quest.md 2.5, 6): the total rule g(t) = max{g : t_g >= t}, group timesteps
t_g = timesteps[ceil(g N / G)], forced selection, and the UNet pre-hook that picks each quantizer's row."""

from __future__ import annotations

import math

import pytest
import torch

from quest_export.errors import QuestExportError
from quest_export.models.sampling import make_scheduler
from quest_export.quant.groups import GroupContext, group_timesteps, step_group
from quest_export.quant.model import QuantMode, quantize_
from quest_export.quant.primitives import fake_quant
from quest_export.recipe.config import QuantRecipe
from quest_export.zoo.architectures import SCHEDULER_CONFIG
from tests.tiny import inputs, tiny_cond_unet, tiny_uncond_unet

TS = [900, 600, 300]  # t_0 > t_1 > t_2


def sampler_timesteps(n: int) -> list[int]:
    sched = make_scheduler(SCHEDULER_CONFIG, "ddim")
    sched.set_timesteps(n)
    return [int(t) for t in sched.timesteps.tolist()]


@pytest.mark.parametrize("t,g", [
    (1000, 0), (901, 0),  # t > t_0
    (900, 0), (600, 1), (300, 2),  # t == t_g
    (899, 0), (601, 0), (750, 0), (599, 1), (450, 1), (301, 1),  # between: the group whose t_g is just above
    (299, 2), (1, 2), (0, 2),  # below t_{G-1}
    (-1, 2), (-500, 2),  # negative
    (600.5, 0), (599.5, 1),  # non-integer timesteps (samplers with fractional t)
])  # fmt: skip
def test_group_of_rule_table(t, g):
    assert GroupContext(TS).group_of(t) == g


def test_group_of_is_total_and_matches_definition():
    ctx = GroupContext(TS)
    for t in range(-20, 1100):
        expected = max([g for g, tg in enumerate(TS) if tg >= t], default=0)
        assert ctx.group_of(t) == expected, t


@pytest.mark.parametrize("n", [1, 4, 7, 10, 20, 50])
def test_group_timesteps_formula(n):
    ts = sampler_timesteps(n)
    assert len(ts) == n
    for groups in range(1, n + 1):
        tg = group_timesteps(ts, groups)
        assert tg == [ts[math.ceil(g * n / groups)] for g in range(groups)]
        assert all(a > b for a, b in zip(tg, tg[1:]))
        ctx = GroupContext(tg)
        # the timestep rule reproduces the step rule g(i) = floor(i G / N) when the sampler matches calibration
        assert [ctx.group_of(t) for t in ts] == [step_group(i, n, groups) for i in range(n)] == [
            i * groups // n for i in range(n)]  # fmt: skip


def test_group_timesteps_refuses_impossible_counts():
    ts = sampler_timesteps(5)
    for groups in (0, 6):
        with pytest.raises(QuestExportError, match=rf"{groups} timestep groups do not fit a 5-step sampler; use 1..5"):
            group_timesteps(ts, groups)


def test_group_context_needs_decreasing_timesteps():
    for bad in ([], [300, 600], [600, 600]):
        with pytest.raises(QuestExportError, match="strictly decreasing"):
            GroupContext(bad)


def test_select_forces_and_restores():
    ctx = GroupContext(TS)
    ctx.on_timestep(450)
    assert ctx.group == 1
    with ctx.select(2):
        assert ctx.group == 2
        ctx.on_timestep(950)  # forced: the timestep is ignored
        assert ctx.group == 2
        with ctx.select(0):
            assert ctx.group == 0
        assert ctx.group == 2
    assert ctx.group == 1  # the previous group, not 0
    ctx.on_timestep(950)
    assert ctx.group == 0  # no longer forced
    with pytest.raises(KeyError), ctx.select(2):
        raise KeyError
    assert ctx.group == 0 and ctx._forced is None
    with pytest.raises(QuestExportError, match="group 3 does not exist; this model has 3 groups"):
        with ctx.select(3):
            pass


def test_mixed_batch_is_rejected():
    ctx = GroupContext(TS)
    ctx.on_timestep(torch.tensor([950, 920, 901]))  # one group: fine
    assert ctx.group == 0
    with pytest.raises(
        QuestExportError, match=r"mixes timesteps of groups \[0, 2\].*split the batch by timestep group"
    ):
        ctx.on_timestep(torch.tensor([950, 100]))
    single = GroupContext([500])  # G = 1 accepts anything
    single.on_timestep(torch.tensor([999, 0, -3, 500]))
    assert single.group == 0 and single.group_of(10**6) == 0 and single.group_of(-(10**6)) == 0


ROW_SCALES = [0.5, 0.25, 0.125]  # a different scale in every group's row of conv_in's input quantizer


@pytest.mark.parametrize("kind", ["cond", "uncond"])
@torch.no_grad()
def test_unet_pre_hook_selects_the_row_from_the_timestep(kind):
    unet = tiny_cond_unet() if kind == "cond" else tiny_uncond_unet()
    q = quantize_(unet, QuantRecipe(), group_timesteps=TS)
    aq = unet.conv_in.input_quantizer
    for g, s in enumerate(ROW_SCALES):
        aq.set_row(g, torch.tensor([s]))
    seen = []
    aq.register_forward_hook(lambda m, a, out: seen.append((a[0].clone(), out.clone())))
    x, _, cond = inputs(unet, batch=2, seed=5)
    x = x * 3  # some values beyond every row's range, so the rows give different outputs
    extra = {"encoder_hidden_states": cond} if cond is not None else {}
    for t, g in ((950, 0), (700, 0), (600, 1), (450, 1), (300, 2), (10, 2)):
        seen.clear()
        with q.mode(QuantMode.FULL):
            unet(x, torch.full((2,), t), **extra)
        assert q.ctx.group == g
        inp, out = seen[0]
        rows = [torch.equal(out, fake_quant(inp, torch.tensor(s), 0.0, aq.qmin, aq.qmax)) for s in ROW_SCALES]
        assert rows == [i == g for i in range(3)], f"t={t}: used rows {rows}"
    # a scalar timestep and the keyword form go through the same hook
    seen.clear()
    unet(x, 10, **extra)
    assert q.ctx.group == 2
    seen.clear()
    unet(sample=x, timestep=torch.tensor(950), **extra)
    assert q.ctx.group == 0
    # forcing a group overrides the timestep
    with q.ctx.select(1):
        seen.clear()
        unet(x, torch.full((2,), 10), **extra)
        assert torch.equal(seen[0][1], fake_quant(seen[0][0], torch.tensor(ROW_SCALES[1]), 0.0, aq.qmin, aq.qmax))
    with pytest.raises(QuestExportError, match="mixes timesteps"):
        unet(x, torch.tensor([950, 10]), **extra)
