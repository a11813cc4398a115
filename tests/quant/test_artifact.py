"""The quantized-model artifact (style.md section 3): save -> load gives bit-identical outputs in every timestep
group; integer weights are stored as int8 codes in range; tampering, another float model and interrupted saves
are refused or leave nothing loadable."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from quest_export.calib.collect import collect
from quest_export.errors import ArtifactError, ManifestMismatch
from quest_export.models import load_model
from quest_export.models.sampling import SamplerSpec
from quest_export.ptq.stage_a import run_stage_a
from quest_export.quant import artifact as artifact_mod
from quest_export.quant.artifact import PLAN_FILE, STATE_FILE, load_quantized, save_quantized
from quest_export.quant.model import QuantMode
from quest_export.quant.primitives import qrange
from quest_export.recipe.config import PtqConfig, QuantRecipe
from tests.tiny import write_tiny_model_dir

GROUPS = 3
STEPS = 6
FINGERPRINT = "ab" * 32


def _save(qunet, out, *, model_dir, model_hash, quant):
    return save_quantized(qunet, out, recipe_fingerprint=FINGERPRINT, quant=quant,
                          model_ref={"name": str(model_dir), "cond": None, "hash": model_hash},
                          sampler={"sampler": "ddim", "steps": STEPS, "eta": 0.0, "guidance_scale": 2.0})  # fmt: skip


@pytest.fixture(scope="module")
def stage_a(tmp_path_factory):
    """Stage A of method quest (W4A8, AdaRound for a few iterations, G = 3) on the tiny cond model, saved."""
    model_dir = write_tiny_model_dir(tmp_path_factory.mktemp("model"), "cond")
    model = load_model(str(model_dir))
    calib = collect(model, SamplerSpec(steps=STEPS, guidance_scale=2.0), trajectories=3, seed=0, show_progress=False)
    quant = QuantRecipe(method="quest", w_bits=4, a_bits=8)
    cfg = PtqConfig(adaround_iters=4, adaround_batch=4, act_batch=8)
    qunet, report = run_stage_a(model, calib, quant, cfg, groups=GROUPS, device="cpu", show_progress=False)
    path = _save(qunet, tmp_path_factory.mktemp("art") / "quantized", model_dir=model_dir, model_hash=model.source_hash,
                 quant=quant)  # fmt: skip
    return SimpleNamespace(model_dir=model_dir, model=model, calib=calib, quant=quant, qunet=qunet, report=report,
                           path=path)  # fmt: skip


def _outputs(qunet, calib, group: int) -> torch.Tensor:
    rows = calib.draw(calib.group_rows(group, GROUPS, pooled=True), 4, torch.Generator().manual_seed(group))
    x, t, cond, _ = calib.batch(rows)
    with torch.no_grad(), qunet.ctx.select(group), qunet.mode(QuantMode.FULL):
        return qunet.unet(x, t, encoder_hidden_states=cond).sample


def test_reload_is_bit_identical_in_every_group(stage_a):
    art = load_quantized(stage_a.path)  # the float model reloads from the folder recorded in the artifact
    assert art.model.info.root == stage_a.model_dir and art.qunet.ctx.timesteps == stage_a.qunet.ctx.timesteps
    assert art.qunet.plan == stage_a.qunet.plan
    assert art.manifest["recipe_fingerprint"] == FINGERPRINT and art.meta["model"]["hash"] == stage_a.model.source_hash
    before, after = stage_a.qunet.unet.state_dict(), art.qunet.unet.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]), k
    outs = []
    for g in range(GROUPS):
        ref, got = _outputs(stage_a.qunet, stage_a.calib, g), _outputs(art.qunet, stage_a.calib, g)
        assert torch.equal(ref, got), f"group {g}"
        outs.append(ref)
    # the rows really differ between groups (otherwise a group mix-up could not show)
    aq = art.qunet.unet.conv_in.input_quantizer
    assert len({aq.scales[g].item() for g in range(GROUPS)}) == GROUPS
    # and the group selected from the timestep (no forcing) reproduces the same outputs
    calib = stage_a.calib
    for i, t in enumerate(calib.timesteps):
        rows = calib.rows_at_steps([i])[:4]
        x, tt, cond, _ = calib.batch(rows)
        with torch.no_grad(), stage_a.qunet.mode(QuantMode.FULL), art.qunet.mode(QuantMode.FULL):
            a = stage_a.qunet.unet(x, tt, encoder_hidden_states=cond).sample
            b = art.qunet.unet(x, tt, encoder_hidden_states=cond).sample
        assert torch.equal(a, b), f"step {i} (t={t})"


def test_integer_weights_are_stored_as_int8_in_range(stage_a):
    state = load_file(str(stage_a.path / STATE_FILE))
    layers = {s.name: s for s in stage_a.qunet.plan.layers}
    w_ints = {k: v for k, v in state.items() if k.endswith(".w_int")}
    assert len(w_ints) == len(stage_a.qunet.weight_quantizers())  # every weight quantizer is frozen
    for key, w_int in w_ints.items():
        layer = key.split(".weight_quantizer")[0]
        qmin, qmax = qrange(layers[layer].w_bits, signed=True)
        assert w_int.dtype == torch.int8 and w_int.numel() > 0, key
        assert int(w_int.min()) >= qmin and int(w_int.max()) <= qmax, key
    assert {s.w_bits for s in layers.values()} == {4}  # W4 everywhere, conv_in/conv_out included (first_last a8)
    assert min(int(v.min()) for v in w_ints.values()) == -8 and max(int(v.max()) for v in w_ints.values()) == 7
    # AdaRound's hardened bits are stored for the layers it reconstructed
    rounded = [k for k, v in state.items() if k.endswith(".rounding") and v.numel() > 0]
    assert rounded and stage_a.report.adaround
    meta = json.loads((stage_a.path / PLAN_FILE).read_text())
    assert meta["groups"]["timesteps"] == stage_a.qunet.ctx.timesteps and meta["quant"] == asdict(stage_a.quant) | {
        "overrides": []}  # fmt: skip


def test_tampered_state_is_refused(stage_a, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(stage_a.path, copy)
    load_quantized(copy)  # a faithful copy loads
    p = copy / STATE_FILE
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the tensor data
    p.write_bytes(bytes(data))
    with pytest.raises(ManifestMismatch, match=rf"'{STATE_FILE}' does not match its manifest hash"):
        load_quantized(copy)
    shutil.copy(stage_a.path / STATE_FILE, p)
    meta = json.loads((copy / PLAN_FILE).read_text())
    meta["groups"]["timesteps"][0] += 1
    (copy / PLAN_FILE).write_text(json.dumps(meta))
    with pytest.raises(ManifestMismatch, match=rf"'{PLAN_FILE}' does not match"):
        load_quantized(copy)


def test_another_float_model_is_refused_naming_the_hash(stage_a, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(stage_a.model_dir, model_dir)
    art = _save(stage_a.qunet, tmp_path / "art", model_dir=model_dir, model_hash=stage_a.model.source_hash,
                quant=stage_a.quant)  # fmt: skip
    load_quantized(art)  # control: the copy is the same float model
    w = model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(str(w), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(w))
    tensors["conv_in.weight"] = tensors["conv_in.weight"].clone()
    tensors["conv_in.weight"][0, 0, 0, 0] += 0.01
    save_file(tensors, str(w), metadata=meta)
    with pytest.raises(ArtifactError) as e:
        load_quantized(art)
    assert type(e.value) is ArtifactError
    msg = str(e.value)
    new_hash = load_model(str(model_dir)).source_hash
    assert f"hash {stage_a.model.source_hash[:12]}" in msg and f"now has hash {new_hash[:12]}" in msg
    assert "re-run quantize" in msg


class DiskFull(OSError):
    pass


def test_interrupted_save_leaves_nothing_loadable(stage_a, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise DiskFull("no space left on device")

    monkeypatch.setattr(artifact_mod, "write_manifest", fail)
    out = tmp_path / "runs" / "quantized"
    with pytest.raises(DiskFull):
        _save(
            stage_a.qunet, out, model_dir=stage_a.model_dir, model_hash=stage_a.model.source_hash, quant=stage_a.quant
        )
    assert not out.exists() and not out.parent.exists()  # no half-written or temporary folder, nor the parent it made
    with pytest.raises(ArtifactError, match="is not a quest-export artifact"):
        load_quantized(out)
    # an interrupted overwrite keeps the previous artifact whole
    shutil.copytree(stage_a.path, out)
    with pytest.raises(DiskFull):
        _save(
            stage_a.qunet, out, model_dir=stage_a.model_dir, model_hash=stage_a.model.source_hash, quant=stage_a.quant
        )
    assert sorted(p.name for p in out.parent.iterdir()) == ["quantized"]
    monkeypatch.undo()
    art = load_quantized(out)
    assert torch.equal(_outputs(art.qunet, stage_a.calib, 1), _outputs(stage_a.qunet, stage_a.calib, 1))
