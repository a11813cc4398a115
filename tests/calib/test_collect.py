"""Calibration capture (quest.md 3): the exact UNet inputs of the float sampler, both CFG halves, the sampler's own
timesteps, random classes, a lossless cache, and the rows each timestep group calibrates on (quest.md 2.5)."""

from __future__ import annotations

import math

import pytest
import torch
from quest_export_runtime.manifest import read_manifest

from quest_export.calib.collect import CalibrationSet, collect
from quest_export.errors import ArtifactError, ManifestMismatch
from quest_export.models.sampling import SamplerSpec, make_scheduler
from tests.tiny import tiny_model

T, N, GUIDANCE = 6, 6, 2.0  # trajectories, DDIM steps


@pytest.fixture(scope="module")
def model():
    return tiny_model("cond")


@pytest.fixture(scope="module")
def calib(model):
    return collect(model, SamplerSpec(steps=N, guidance_scale=GUIDANCE), trajectories=T, seed=0, show_progress=False)


def _calls(cs: CalibrationSet):
    """Row ranges of the recorded UNet calls (one call per step; [uncond half, cond half])."""
    return [torch.arange(k * 2 * T, (k + 1) * 2 * T) for k in range(N)]


def test_rows_are_trajectories_times_steps_times_two_halves(calib, model):
    assert calib.x.shape == (T * N * 2, *model.sample_shape) and calib.eps.shape == calib.x.shape
    for name in ("t", "cond_index", "step", "traj"):
        v = getattr(calib, name)
        assert v.shape == (T * N * 2,) and v.dtype == torch.int64, name
    assert calib.x.dtype == calib.eps.dtype == torch.float32
    uncond = model.conditioning.uncond_index
    assert calib.spec["guided"] and calib.spec["uncond_index"] == uncond == 4
    for step, rows in enumerate(_calls(calib)):
        half_u, half_c = rows[:T], rows[T:]
        assert (calib.step[rows] == step).all()
        assert (calib.cond_index[half_u] == uncond).all()  # the unconditional half
        assert (calib.cond_index[half_c] != uncond).all()
        assert torch.equal(calib.traj[half_u], torch.arange(T)) and torch.equal(calib.traj[half_c], torch.arange(T))
        assert torch.equal(calib.x[half_u], calib.x[half_c])  # both halves see the same x_t
    # every (trajectory, step) has exactly one conditional and one unconditional row
    assert int((calib.cond_index == uncond).sum()) == T * N
    assert torch.equal(calib.cond_table, model.conditioning.table)


def test_first_input_is_the_seeded_noise(calib, model):
    noise = torch.randn(T, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    rows = _calls(calib)[0]
    assert torch.equal(calib.x[rows[:T]], noise) and torch.equal(calib.x[rows[T:]], noise)


@torch.no_grad()
def test_replaying_a_recorded_call_reproduces_its_eps(calib, model):
    for rows in _calls(calib):
        x, t, cond, eps = calib.batch(rows)
        assert torch.equal(model.unet(x, t, encoder_hidden_states=cond).sample, eps)


@torch.no_grad()
def test_recorded_inputs_are_the_unet_inputs_not_the_step_outputs(calib, model):
    """quest.md 3.3: x_t at step i+1 is the DDIM step from step i's guided eps (no off-by-one pairing)."""
    sched = make_scheduler(model.info.scheduler_config, "ddim")
    sched.set_timesteps(N)
    calls = _calls(calib)
    for i in range(N - 1):
        rows = calls[i]
        eps_u, eps_c = calib.eps[rows[:T]], calib.eps[rows[T:]]
        eps = eps_u + GUIDANCE * (eps_c - eps_u)
        t = int(sched.timesteps[i])
        assert (calib.t[rows] == t).all()
        nxt = sched.step(eps, t, calib.x[rows[:T]], eta=0.0).prev_sample
        assert torch.equal(calib.x[calls[i + 1][:T]], nxt), f"step {i}"


def test_timesteps_are_the_schedulers(calib, model):
    sched = make_scheduler(model.info.scheduler_config, "ddim")
    sched.set_timesteps(N)
    ts = [int(v) for v in sched.timesteps.tolist()]
    assert calib.spec["timesteps"] == calib.timesteps == ts and calib.steps == N
    assert torch.equal(calib.t, torch.tensor(ts)[calib.step])
    assert calib.spec["sampler"] == {"sampler": "ddim", "steps": N, "eta": 0.0, "guidance_scale": GUIDANCE}
    assert calib.spec["model_hash"] == model.source_hash and calib.spec["seed"] == 0 and calib.spec["trajectories"] == T


def test_classes_are_drawn_at_random(calib, model):
    labels = calib.cond_index[_calls(calib)[0][T:]].tolist()  # the class of each trajectory
    cond = model.conditioning
    assert set(labels) <= set(cond.cond_rows)  # never the unconditional row
    hist = calib.spec["class_histogram"]
    assert sum(hist.values()) == T and len(hist) > 1
    assert hist == {cond.labels[c]: labels.count(c) for c in set(labels)}
    assert labels != sorted(labels)  # not class-ordered
    assert labels != [cond.cond_rows[i % len(cond.cond_rows)] for i in range(T)]  # not "the first n"
    # seeded: the same seed draws the same classes, another seed others
    again = collect(model, SamplerSpec(steps=2, guidance_scale=GUIDANCE), trajectories=T, seed=0, show_progress=False)
    other = collect(model, SamplerSpec(steps=2, guidance_scale=GUIDANCE), trajectories=T, seed=1, show_progress=False)
    assert again.cond_index[T : 2 * T].tolist() == labels
    assert other.cond_index[T : 2 * T].tolist() != labels


def test_unconditional_model_records_one_row_per_call():
    m = tiny_model("uncond")
    cs = collect(m, SamplerSpec(steps=3), trajectories=2, seed=0, show_progress=False)
    assert cs.x.shape[0] == 2 * 3 and cs.cond_table is None and (cs.cond_index == -1).all()
    assert not cs.spec["guided"] and cs.spec["class_histogram"] == {}
    x, t, cond, eps = cs.batch(torch.arange(2))
    assert cond is None
    with torch.no_grad():
        assert torch.equal(m.unet(x, t).sample, eps)


def test_batched_collection_records_the_same_rows(calib, model):
    chunked = collect(model, SamplerSpec(steps=N, guidance_scale=GUIDANCE), trajectories=T, seed=0, batch=4,
                      show_progress=False)  # fmt: skip
    assert chunked.x.shape == calib.x.shape

    def table(cs):
        return {(int(tr), int(st), int(c)): i for i, (tr, st, c) in enumerate(zip(cs.traj, cs.step, cs.cond_index))}

    a, b = table(calib), table(chunked)
    assert a.keys() == b.keys() and len(a) == T * N * 2
    ia, ib = torch.tensor(list(a.values())), torch.tensor([b[k] for k in a])
    assert torch.allclose(calib.x[ia], chunked.x[ib], rtol=0, atol=1e-5)  # batch size only changes float rounding


def test_save_load_round_trip(calib, tmp_path):
    path = calib.save(tmp_path / "calib", fingerprint="c" * 64)
    m = read_manifest(path, stage="calibrate")
    assert m["recipe_fingerprint"] == "c" * 64 and m["config"] == calib.spec
    back = CalibrationSet.load(path)
    for name in ("x", "t", "cond_index", "step", "traj", "eps", "cond_table"):
        a, b = getattr(calib, name), getattr(back, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert back.spec == calib.spec
    data = path / "calib.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(ManifestMismatch, match="'calib.safetensors' does not match"):
        CalibrationSet.load(path)


def test_load_refuses_another_stage(tmp_path):
    from quest_export_runtime.manifest import atomic_dir, write_manifest

    with atomic_dir(tmp_path / "x") as tmp:
        write_manifest(tmp, stage="export", recipe_fingerprint=None)
    with pytest.raises(ArtifactError, match="holds a 'export' artifact, not 'calibrate'"):
        CalibrationSet.load(tmp_path / "x")


@pytest.mark.parametrize("groups", [1, 2, 3, 4, 6])
def test_group_rows(calib, groups):
    seen = []
    for g in range(groups):
        first = math.ceil(g * N / groups)
        rows = calib.group_rows(g, groups)
        assert set(calib.step[rows].tolist()) == {first}, f"group {g} calibrates on step {first}"
        assert rows.numel() == 2 * T  # every trajectory, both halves
        pooled = calib.group_rows(g, groups, pooled=True)
        steps = {i for i in range(N) if i * groups // N == g}
        assert set(calib.step[pooled].tolist()) == steps and pooled.numel() == 2 * T * len(steps)
        assert first == min(steps)
        seen += pooled.tolist()
    assert sorted(seen) == list(range(calib.x.shape[0]))  # the pooled groups partition the set


def test_group_rows_table():
    """N = 6, G = 4: first steps ceil(g N / G) = 0, 2, 3, 5; pooled steps {0, 1}, {2}, {3, 4}, {5}."""
    cs = CalibrationSet(x=torch.zeros(6, 1, 1, 1), t=torch.zeros(6, dtype=torch.long), cond_index=torch.full((6,), -1),
                        step=torch.arange(6), traj=torch.zeros(6, dtype=torch.long), eps=torch.zeros(6, 1, 1, 1),
                        cond_table=None, spec={"sampler": {"steps": 6}})  # fmt: skip
    assert [cs.group_rows(g, 4).tolist() for g in range(4)] == [[0], [2], [3], [5]]
    assert [cs.group_rows(g, 4, pooled=True).tolist() for g in range(4)] == [[0, 1], [2], [3, 4], [5]]


def test_load_memory_maps_the_set(calib, tmp_path):
    """Issue 15: the loaded set is backed by the file (copy-on-write maps), so it never has to fit in host RAM;
    a write to a row stays in this process."""
    import numpy as np

    from quest_export.calib.collect import mmap_safetensors

    path = calib.save(tmp_path / "calib", fingerprint="d" * 64)
    mapped = []
    real = np.memmap

    def spy(*args, **kwargs):
        mapped.append(kwargs.get("mode"))
        return real(*args, **kwargs)

    np.memmap = spy
    try:
        back = CalibrationSet.load(path)
        maps = mmap_safetensors(path / "calib.safetensors")
    finally:
        np.memmap = real
    assert set(maps) >= {"x", "eps", "t"} and len(mapped) >= 2 * 6 and set(mapped) == {"c"}
    back.x[0] += 1.0
    assert torch.equal(CalibrationSet.load(path).x, calib.x)  # the file is unchanged
