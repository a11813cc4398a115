"""QuEST Stage B / Stage C finetuning on a tiny seeded UNet (quest.md 5.1-5.3), CPU, seconds.

One Stage-A artifact (W4A8, G = 3 timestep groups, a few AdaRound iterations) is built per module;
every test reloads it into a fresh fake-quant model, so tests never share mutable state.
"""

from __future__ import annotations

import copy
import fnmatch
import hashlib
import math
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from quest_export.calib.collect import CalibrationSet, collect
from quest_export.errors import TrainingDivergedError
from quest_export.finetune import finetune_
from quest_export.finetune import quest as quest_mod
from quest_export.finetune.quest import CKPT_NAME, STAGE_C_LAYERS, QuestFinetuner
from quest_export.models.sampling import SamplerSpec
from quest_export.ptq.stage_a import run_stage_a
from quest_export.quant.artifact import load_quantized, save_quantized
from quest_export.recipe.config import FinetuneConfig, PtqConfig, QuantRecipe
from tests.tiny import tiny_model

KIND = "cond"  # class-conditional family: Stage C trains ff.net.*, attn1.to_q/k/v, attn2.to_q
G = 3  # timestep groups
TRAJECTORIES = 4  # calibration trajectories; with CFG each group's first step holds 2 * 4 = 8 rows
POOL = 2 * TRAJECTORIES  # rows that calibrate one group (CFG doubles the trajectories)
QUANT = QuantRecipe(method="quest", w_bits=4, a_bits=8)
PTQ = PtqConfig(adaround_iters=2, act_batch=8)
FINGERPRINT = "f1" * 32

# A small, fast configuration for the structural tests (about 20 optimizer steps in all).
SMALL = FinetuneConfig(b_epochs=3, b_samples=2, b_batch=2, b_lr_weight=1e-3, b_lr_scale=1e-3,
                       c_epochs=2, c_samples=POOL, c_batch=4, c_lr_weight=1e-3, c_lr_scale=1e-3)  # fmt: skip

# Loss-decrease runs. Stage B: one step per epoch (b_samples = b_batch), samples drawn once per group,
# so report.stage_b[g] = [first-epoch loss, last-epoch loss] on the same two samples.
# Measured (torch 2.13 CPU, this seed): last/first = 0.556, 0.933, 0.836 for groups 0, 1, 2; mean 0.775.
B_DECREASE = FinetuneConfig(stage_c=False, b_epochs=20, b_samples=2, b_batch=2, b_lr_weight=1e-3, b_lr_scale=1e-3)
B_MAX_GROUP_RATIO = 0.97  # every group's last-epoch loss below 97 % of its first (worst measured 0.933)
B_MAX_MEAN_RATIO = 0.9  # mean over groups of last/first below 0.9 (measured 0.775)
# Stage C: c_samples = the whole pool of every group and c_batch = c_samples, so the "fresh" draw of each
# (epoch, group) is the same 8 rows; report.stage_c[e] is the epoch mean over the groups.
# Measured: epoch means relative to epoch 0 = 1.0, 0.84, 0.768, 0.696, 0.678, 0.738.
C_DECREASE = FinetuneConfig(stage_b=False, c_epochs=6, c_samples=POOL, c_batch=POOL, c_lr_weight=1e-3,
                            c_lr_scale=1e-3 / 3)  # fmt: skip
C_MAX_RATIO = 0.9  # last-epoch mean below 90 % of the first-epoch mean (measured 0.738)
# diverge_factor for the exploding-loss test: the loss after one Stage-C step at c_lr_scale = 1e6 is 4.05x
# the first loss (measured 0.102 / 0.0252); with SMALL's rates no loss ever exceeds 1.0x it.
EXPLODE_FACTOR = 3.0


@dataclass
class Base:
    stage_a: Path
    calib: CalibrationSet
    family: str


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    root = tmp_path_factory.mktemp("quest")
    model = tiny_model(KIND)
    s = model.info.sampling
    spec = SamplerSpec(sampler=s["sampler"], steps=s["steps"], eta=s["eta"], guidance_scale=s["guidance_scale"])
    calib = collect(model, spec, trajectories=TRAJECTORIES, seed=0, show_progress=False)
    qunet, _ = run_stage_a(model, calib, QUANT, PTQ, groups=G, device="cpu", show_progress=False)
    path = save_quantized(qunet, root / "stage_a", recipe_fingerprint=FINGERPRINT, quant=QUANT, sampler=s,
                          model_ref={"name": model.name, "cond": None, "hash": model.source_hash})  # fmt: skip
    for g in range(G):
        assert calib.group_rows(g, G).numel() == POOL  # Stage C's draw of POOL rows is then the same set
    return Base(stage_a=path, calib=calib, family=model.family)


def fresh(base: Base):
    """(quantized handle, frozen float teacher) reloaded from the Stage-A artifact."""
    model = tiny_model(KIND)
    teacher = copy.deepcopy(model.unet)
    art = load_quantized(base.stage_a, model=model)
    return art.qunet, teacher


def run(base: Base, cfg: FinetuneConfig, qunet=None, teacher=None, **kw):
    if qunet is None:
        qunet, teacher = fresh(base)
    rep = finetune_(qunet, teacher, base.calib, cfg, family=base.family, device="cpu", show_progress=False, **kw)
    return qunet, teacher, rep


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed_keys(before: dict, after: dict) -> set[str]:
    assert before.keys() == after.keys()
    return {k for k in before if before[k].shape != after[k].shape or not torch.equal(before[k], after[k])}


def matches(key: str, globs) -> bool:
    return any(fnmatch.fnmatchcase(key, g) for g in globs)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- the loss goes down -------------------------------------------------------------------------------


def test_stage_b_alone_lowers_its_loss(base):
    _, _, rep = run(base, B_DECREASE)
    assert sorted(rep.stage_b) == list(range(G)) and rep.stage_c == {}
    ratios = {g: last / first for g, (first, last) in rep.stage_b.items()}
    for g, r in ratios.items():
        assert r < B_MAX_GROUP_RATIO, f"group {g}: Stage B loss {rep.stage_b[g][0]:.4g} -> {rep.stage_b[g][1]:.4g}"
    assert sum(ratios.values()) / G < B_MAX_MEAN_RATIO, ratios


def test_stage_c_alone_lowers_its_loss(base):
    _, _, rep = run(base, C_DECREASE)
    assert rep.stage_b == {} and sorted(rep.stage_c) == list(range(C_DECREASE.c_epochs))
    first, last = rep.stage_c[0], rep.stage_c[C_DECREASE.c_epochs - 1]
    assert last < C_MAX_RATIO * first, f"Stage C epoch means {rep.stage_c}"


# -- only the declared parameters change -----------------------------------------------------------------

TEMPORAL_PARAMS = ("*.time_emb_proj.weight", "*.time_emb_proj.bias", "*.time_emb_proj.weight_quantizer.w_int")


def temporal_scale_rows(groups) -> tuple[str, ...]:
    return tuple(f"*.time_emb_proj.input_quantizer.scales.{g}" for g in groups)


def test_stage_b_changes_only_time_emb_proj(base):
    qunet, teacher = fresh(base)
    before, teacher_before = snapshot(qunet.unet), snapshot(teacher)
    run(base, replace(SMALL, stage_c=False), qunet, teacher)
    after = snapshot(qunet.unet)
    changed = changed_keys(before, after)
    allowed = TEMPORAL_PARAMS + temporal_scale_rows(range(G))
    assert not {k for k in changed if not matches(k, allowed)}, "Stage B changed undeclared tensors"
    temporal = [n for n, m in qunet.layers().items() if m.spec.role == "temporal"]
    assert len(temporal) == 8  # every ResNet: 1 + 1 encoder, 2 mid, 2 + 2 decoder
    for n in temporal:  # the declared ones did train (the test above is not vacuous)
        assert f"{n}.weight" in changed and f"{n}.bias" in changed, n
        for g in range(G):
            assert f"{n}.input_quantizer.scales.{g}" in changed, (n, g)
    assert not changed_keys(teacher_before, snapshot(teacher)), "the teacher changed"


def test_stage_c_changes_only_sensitive_layers_and_nontemporal_scales(base):
    qunet, teacher = fresh(base)
    before = snapshot(qunet.unet)
    run(base, replace(SMALL, stage_b=False), qunet, teacher)
    changed = changed_keys(before, snapshot(qunet.unet))
    sensitive = [n for n in qunet.layers() if matches(n, STAGE_C_LAYERS["class-cond"])]
    assert len(sensitive) == 24  # 6 layers in each of the 4 transformer blocks
    scales = [n for n in qunet.act_quantizers() if not (n.startswith("time_embedding.") or ".time_emb_proj." in n)]
    allowed = {f"{n}.{leaf}" for n in sensitive for leaf in ("weight", "bias", "weight_quantizer.w_int")}
    allowed |= {f"{n}.scales.{g}" for n in scales for g in range(G)}
    assert not changed - allowed, f"Stage C changed undeclared tensors: {sorted(changed - allowed)[:5]}"
    # time_embedding.* and time_emb_proj scales are temporal: frozen in Stage C
    assert not {k for k in changed if k.startswith("time_embedding.") or ".time_emb_proj." in k}
    for n in sensitive:
        assert f"{n}.weight" in changed, n
    for n in scales:
        for g in range(G):
            assert f"{n}.scales.{g}" in changed, (n, g)


@pytest.mark.parametrize("stage", ["B", "C"])
def test_a_step_moves_only_the_current_groups_scale_rows(base, monkeypatch, stage):
    """Fresh scale optimizers per group (B) or per (epoch, group) (C): rows of other groups never move."""
    steps: list[int] = []
    orig = QuestFinetuner._train_step

    def spy(self, runner, inputs, where):
        g = self.q.ctx.group
        rows = {n: [p.detach().clone() for p in q.scales] for n, q in self.q.act_quantizers().items()}
        v = orig(self, runner, inputs, where)
        for n, q in self.q.act_quantizers().items():
            for h, p in enumerate(q.scales):
                if h != g:
                    assert torch.equal(p.detach(), rows[n][h]), f"step in group {g} moved {n}.scales.{h}"
        steps.append(g)
        return v

    monkeypatch.setattr(QuestFinetuner, "_train_step", spy)
    run(base, replace(SMALL, stage_c=stage == "C", stage_b=stage == "B"))
    if stage == "B":  # groups in calibration order, b_epochs steps each
        assert steps == [g for g in range(G) for _ in range(SMALL.b_epochs)]
    else:  # every epoch visits every group, c_samples / c_batch steps each
        assert steps == [g for g in range(G) for _ in range(SMALL.c_samples // SMALL.c_batch)] * SMALL.c_epochs


def test_unvisited_groups_keep_their_rows(base, monkeypatch):
    """Interrupted after group 0 of Stage B: rows 1..G-1 of the time_emb_proj scales are untouched."""
    qunet, teacher = fresh(base)
    before = snapshot(qunet.unet)
    _interrupt_after_saves(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run(base, SMALL, qunet, teacher, ckpt_dir=Path(base.stage_a).parent / "unvisited")
    changed = changed_keys(before, snapshot(qunet.unet))
    temporal = [n for n, m in qunet.layers().items() if m.spec.role == "temporal"]
    for n in temporal:
        assert f"{n}.input_quantizer.scales.0" in changed
        for g in range(1, G):
            assert f"{n}.input_quantizer.scales.{g}" not in changed, (n, g)
    assert not {k for k in changed if ".scales." in k and ".time_emb_proj." not in k}


# -- gradient presence and gradient context (quest.md 5.1) ----------------------------------------------


@pytest.mark.parametrize("stage", ["B", "C"])
def test_first_step_checks_every_optimizer_parameter(base, monkeypatch, stage):
    seen: list[set[int]] = []
    orig = QuestFinetuner._assert_grads

    def spy(opts):
        params = [p for o in opts for grp in o.param_groups for p in grp["params"]]
        assert all(p.grad is not None and bool(torch.any(p.grad != 0)) for p in params)
        seen.append({id(p) for p in params})
        orig(opts)

    monkeypatch.setattr(QuestFinetuner, "_assert_grads", staticmethod(spy))
    qunet, teacher = fresh(base)
    run(base, replace(SMALL, stage_b=stage == "B", stage_c=stage == "C"), qunet, teacher)
    assert len(seen) == 1, "the gradient check runs on the first step of the stage only"
    layers = qunet.layers()
    if stage == "B":
        mods = [m for m in layers.values() if m.spec.role == "temporal"]
        want = [p for m in mods for p in (m.weight, m.bias)] + [m.input_quantizer.scales[0] for m in mods]
    else:
        mods = [m for n, m in layers.items() if matches(n, STAGE_C_LAYERS["class-cond"])]
        qs = quest_mod.non_temporal_quantizers(qunet).values()
        want = [p for m in mods for p in (m.weight, m.bias) if p is not None] + [q.scales[0] for q in qs]
    assert seen[0] == {id(p) for p in want}


@pytest.mark.parametrize("stage", ["B", "C"])
def test_unused_trainable_tensor_is_caught(base, monkeypatch, stage):
    orig = quest_mod._params_of
    unused = torch.nn.Parameter(torch.ones(3, 5))  # in the optimizer, but not in the graph
    monkeypatch.setattr(quest_mod, "_params_of", lambda layers: orig(layers) + [unused])
    with pytest.raises(RuntimeError, match=r"shape \(3, 5\) received no gradient"):
        run(base, replace(SMALL, stage_b=stage == "B", stage_c=stage == "C"))


def test_frozen_trainable_tensor_is_caught(base, monkeypatch):
    orig = QuestFinetuner._set_trainable
    frozen_shape = []

    def set_trainable(self, params):
        orig(self, params)
        params[0].requires_grad_(False)  # a declared tensor silently left frozen: it gets no gradient
        frozen_shape.append(tuple(params[0].shape))

    monkeypatch.setattr(QuestFinetuner, "_set_trainable", set_trainable)
    with pytest.raises(RuntimeError, match="received no gradient") as e:
        run(base, SMALL)
    assert str(frozen_shape[0]) in str(e.value)


def test_trains_under_caller_no_grad(base):
    qunet, teacher = fresh(base)
    before = snapshot(qunet.unet)
    with torch.no_grad():
        _, _, rep = run(base, replace(SMALL, c_epochs=1), qunet, teacher)
        assert not torch.is_grad_enabled()  # the caller's context is restored
    assert len(rep.stage_b) == G and len(rep.stage_c) == 1
    changed = changed_keys(before, snapshot(qunet.unet))
    assert any(k.endswith("time_emb_proj.weight") for k in changed)
    assert any(k.endswith("ff.net.2.weight") for k in changed)


# -- checkpoints: resume equals uninterrupted, divergence keeps the last good checkpoint --------------


def _interrupt_after_saves(monkeypatch, n: int, *, after_save=None):
    """Make QuestFinetuner._save raise KeyboardInterrupt once its n-th call has written the checkpoint."""
    orig = QuestFinetuner._save
    calls = {"n": 0}

    def save(self):
        orig(self)
        calls["n"] += 1
        if after_save is not None:
            after_save(self, calls["n"])
        if calls["n"] == n:
            raise KeyboardInterrupt(f"simulated kill after checkpoint {n}")

    monkeypatch.setattr(QuestFinetuner, "_save", save)
    return calls


def _count_steps(monkeypatch):
    orig = QuestFinetuner._train_step
    count = {"n": 0}

    def step(self, runner, inputs, where):
        count["n"] += 1
        return orig(self, runner, inputs, where)

    monkeypatch.setattr(QuestFinetuner, "_train_step", step)
    return count


# saves: one per Stage-B group (1..G), one at the B -> C switch (G + 1), one per Stage-C epoch (G + 2, ...)
@pytest.mark.parametrize("interrupt_after", [1, G + 2], ids=["mid-stage-B", "after-first-C-epoch"])
def test_resume_equals_uninterrupted(base, tmp_path, monkeypatch, interrupt_after):
    steps_a = _count_steps(monkeypatch)
    qa, ta, rep_a = run(base, SMALL, ckpt_dir=tmp_path / "a")
    total_steps = steps_a["n"]
    monkeypatch.undo()

    qb, tb = fresh(base)
    steps_b = _count_steps(monkeypatch)
    _interrupt_after_saves(monkeypatch, interrupt_after)
    with pytest.raises(KeyboardInterrupt):
        run(base, SMALL, qb, tb, ckpt_dir=tmp_path / "b")
    done_before_kill = steps_b["n"]
    monkeypatch.undo()
    assert 0 < done_before_kill < total_steps

    steps_c = _count_steps(monkeypatch)
    qc, tc, rep_c = run(base, SMALL, ckpt_dir=tmp_path / "b", resume=True)
    assert rep_c.resumed_from == str(tmp_path / "b" / CKPT_NAME)
    assert steps_c["n"] == total_steps - done_before_kill, "the resumed run redid finished work"
    sa, sc = qa.unet.state_dict(), qc.unet.state_dict()
    assert sa.keys() == sc.keys()
    diff = [k for k in sa if sa[k].dtype != sc[k].dtype or not torch.equal(sa[k], sc[k])]
    assert not diff, f"resumed run differs from the uninterrupted one in {diff[:5]}"
    assert rep_c.stage_b == rep_a.stage_b and rep_c.stage_c == rep_a.stage_c


def test_nan_loss_raises_and_keeps_the_last_good_checkpoint(base, tmp_path, monkeypatch):
    hashes = {}

    def poison(self, n):
        hashes[n] = sha256(self.ckpt)
        if n == 1:  # after group 0's checkpoint: group 1's row of one time_emb_proj scale becomes NaN
            layer = next(m for m in self.q.layers().values() if m.spec.role == "temporal")
            layer.input_quantizer.scales[1].data.fill_(math.nan)

    _interrupt_after_saves(monkeypatch, 0, after_save=poison)  # n = 0: never interrupts
    ckpt = tmp_path / CKPT_NAME
    with pytest.raises(TrainingDivergedError) as e:
        run(base, SMALL, ckpt_dir=tmp_path)
    assert "nan" in str(e.value).lower() and "group 1" in str(e.value)
    assert f"the last good checkpoint is {ckpt}" in str(e.value)
    assert list(hashes) == [1] and sha256(ckpt) == hashes[1], "the last good checkpoint was overwritten"
    state = torch.load(ckpt, weights_only=True)
    assert state["pos"] == {"stage": "B", "index": 1}
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_losses_read_back_in_blocks_change_nothing(base, tmp_path, monkeypatch):
    """On a GPU losses are read back every CHECK_EVERY steps: same weights and report; a NaN is still caught at
    its own step, before the group's checkpoint is written."""
    qa, _, rep_a = run(base, SMALL)
    monkeypatch.setattr(quest_mod, "check_interval", lambda device: 4)  # > the steps of a Stage-B group
    qb, _, rep_b = run(base, SMALL)
    sa, sb = qa.unet.state_dict(), qb.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert rep_b.stage_b == rep_a.stage_b and rep_b.stage_c == rep_a.stage_c
    hashes = {}

    def poison(self, n):
        assert self.check_every == 4
        hashes[n] = sha256(self.ckpt)
        if n == 1:
            layer = next(m for m in self.q.layers().values() if m.spec.role == "temporal")
            layer.input_quantizer.scales[1].data.fill_(math.nan)

    _interrupt_after_saves(monkeypatch, 0, after_save=poison)
    with pytest.raises(TrainingDivergedError, match="at stage B, group 1, epoch 0 "):
        run(base, SMALL, ckpt_dir=tmp_path)
    assert list(hashes) == [1] and sha256(tmp_path / CKPT_NAME) == hashes[1]


def test_exploding_loss_raises_and_names_the_checkpoint(base, tmp_path, monkeypatch):
    """A scale learning rate of 1e6 in Stage C drives the loss past diverge_factor * the first loss.

    Quantized nets are bounded (every activation is clamped), so an exploding scale lifts the loss by a
    bounded factor: measured first loss 0.0252 (Stage B, group 0), first Stage-C loss after one step 0.102.
    """
    hashes = {}
    _interrupt_after_saves(monkeypatch, 0, after_save=lambda self, n: hashes.__setitem__(n, sha256(self.ckpt)))
    cfg = replace(SMALL, c_lr_scale=1e6, diverge_factor=EXPLODE_FACTOR)
    with pytest.raises(TrainingDivergedError, match="stage C, epoch 0, group 0") as e:
        run(base, cfg, ckpt_dir=tmp_path)
    ckpt = tmp_path / CKPT_NAME
    assert f"the last good checkpoint is {ckpt}" in str(e.value)
    last = max(hashes)
    assert last == G + 1 and sha256(ckpt) == hashes[last]  # the B -> C checkpoint, untouched
    assert torch.load(ckpt, weights_only=True)["pos"] == {"stage": "C", "index": 0}
