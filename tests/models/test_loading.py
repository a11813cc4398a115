"""Model loading (style.md section 2, quest.md 3.1): the bundled models load and sample without the data set;
pipeline and bare UNet folders load; every way a model or --cond file can be wrong is a one-line error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from quest_export.errors import InputError, ModelError
from quest_export.models import BUNDLED, load_model, resolve_model
from quest_export.models.loading import FALLBACK_SAMPLING, FALLBACK_SCHEDULER
from quest_export.models.sampling import SamplerSpec, sample
from quest_export.zoo.architectures import SCHEDULER_CONFIG
from tests.tiny import inputs, tiny_model, write_tiny_model_dir

# Samples of the bundled models after 4 DDIM steps (2 images, seed 0; CPU, 1 thread): the 2-pixel border that pads
# 28x28 Fashion-MNIST to 32x32 is background (measured mean -0.97 for both models), the interior has content
# (measured std 0.76 cond, 0.63 uncond). A random-weight UNet gives a border mean near 0.
BORDER_MEAN_MAX = -0.85
IMAGE_STD_MIN = 0.3


@pytest.fixture
def no_dataset(monkeypatch, tmp_path):
    """Make any use of the Fashion-MNIST files fail loudly."""
    from quest_export.zoo import fmnist

    def refuse(*args, **kwargs):
        raise AssertionError("the Fashion-MNIST data set was read")

    monkeypatch.setenv("FASHION_MNIST_DIR", str(tmp_path / "no-such-dir"))
    monkeypatch.setattr(fmnist, "data_dir", refuse)
    monkeypatch.setattr(fmnist, "load_split", refuse)


@pytest.fixture(scope="module")
def cond_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("models"), "cond")


@pytest.fixture(scope="module")
def uncond_dir(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("models"), "uncond")


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


# -- bundled models ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_model_loads_and_samples(name, no_dataset):
    model = load_model(name)
    assert model.name == name and model.sample_shape == (1, 32, 32)
    assert model.family == ("class-cond" if name == "fmnist-cond" else "uncond")
    assert not model.unet.training and not any(p.requires_grad for p in model.unet.parameters())
    noise = torch.randn(2, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    spec = SamplerSpec(steps=4, guidance_scale=model.info.sampling["guidance_scale"])
    kw = {}
    if model.conditioning is not None:
        c = model.conditioning
        assert c.table.shape == (11, 4, 64) and c.uncond_index == 10 and c.labels[10] == "<unconditional>"
        kw = dict(cond=c.rows(torch.tensor([1, 7])), uncond=c.uncond)  # Trouser, Sneaker
    images = sample(model.unet, model.info.scheduler_config, noise=noise, spec=spec, **kw)
    assert images.shape == (2, 1, 32, 32) and torch.isfinite(images).all()
    assert images.min() >= -1 and images.max() <= 1
    border = torch.cat([images[..., :2, :].flatten(), images[..., -2:, :].flatten(), images[..., :, :2].flatten(),
                        images[..., :, -2:].flatten()])  # fmt: skip
    assert border.mean().item() < BORDER_MEAN_MAX
    assert images.std().item() > IMAGE_STD_MIN
    if model.conditioning is not None:  # the class changes the image (same noise)
        same_noise = sample(
            model.unet, model.info.scheduler_config, noise=noise[:1].repeat(2, 1, 1, 1), spec=spec, **kw
        )
        assert (same_noise[0] - same_noise[1]).abs().mean().item() > 0.1


def test_bundled_metadata_resolves_without_weights():
    info = resolve_model("fmnist-cond")
    assert info.class_name == "UNet2DConditionModel" and info.cond_file.name == "conditioning.safetensors"
    assert info.sampling == {"sampler": "ddim", "steps": 50, "eta": 0.0, "guidance_scale": 2.0, "clip_output": True}
    assert resolve_model("fmnist-uncond").cond_file is None


# -- folders -------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_pipeline_and_bare_unet_folders_load(cond_dir, uncond_dir, tmp_path):
    ref = tiny_model("cond")
    x, t, cond = inputs(ref.unet)
    expected = ref.unet(x, t, encoder_hidden_states=cond).sample
    pipe = load_model(str(cond_dir))
    bare = load_model(str(cond_dir / "unet"), cond=str(cond_dir / "conditioning.safetensors"))
    assert pipe.info.unet_dir == bare.info.unet_dir == cond_dir / "unet"
    for m in (pipe, bare):
        assert torch.equal(m.unet(x, t, encoder_hidden_states=cond).sample, expected)
        assert torch.equal(m.conditioning.table, ref.conditioning.table) and m.conditioning.uncond_index == 4
        assert m.info.scheduler_config == SCHEDULER_CONFIG  # the bare folder finds ../scheduler
    assert pipe.source_hash == bare.source_hash
    assert pipe.info.sampling == ref.info.sampling and bare.info.sampling == FALLBACK_SAMPLING
    u = load_model(str(uncond_dir))
    assert u.conditioning is None and u.family == "uncond"
    x, t, _ = inputs(u.unet)
    assert torch.equal(u.unet(x, t).sample, tiny_model("uncond").unet(x, t).sample)
    # a UNet folder on its own (no scheduler anywhere) falls back to DDIM with linear betas
    alone = tmp_path / "alone"
    shutil.copytree(uncond_dir / "unet", alone)
    info = resolve_model(str(alone))
    assert info.scheduler_config == FALLBACK_SCHEDULER and info.sampling == FALLBACK_SAMPLING
    assert load_model(str(alone)).source_hash == u.source_hash  # same config and weights, same identity


def test_source_hash_follows_config_and_weights(uncond_dir, tmp_path):
    from safetensors.torch import load_file

    copy = tmp_path / "copy"
    shutil.copytree(uncond_dir, copy)
    h0 = load_model(str(copy)).source_hash
    w = copy / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(w))
    tensors["conv_out.bias"] = tensors["conv_out.bias"] + 1e-3
    save_file(tensors, str(w), metadata={"format": "pt"})
    h1 = load_model(str(copy)).source_hash
    cfg = json.loads((copy / "unet" / "config.json").read_text())
    cfg["norm_eps"] = 1e-6
    (copy / "unet" / "config.json").write_text(json.dumps(cfg))
    h2 = load_model(str(copy)).source_hash
    assert len({h0, h1, h2}) == 3


# -- one-line errors -----------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(ModelError) as e:
        load_model(str(tmp_path / "nope"))
    assert f"model '{tmp_path / 'nope'}' not found: give a bundled name (fmnist-cond, fmnist-uncond)" in one_line(e)


def test_file_instead_of_folder(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelError) as e:
        load_model(str(tmp_path / "model.safetensors"))
    assert "is a file; expected a diffusers folder" in one_line(e)


def test_folder_without_config(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelError) as e:
        load_model(str(tmp_path))
    assert "is not a diffusers model: expected config.json (a UNet folder) or unet/config.json" in one_line(e)


def test_unsupported_class(cond_dir, tmp_path):
    u3 = tmp_path / "unet3d"
    shutil.copytree(cond_dir / "unet", u3)
    cfg = json.loads((u3 / "config.json").read_text())
    cfg["_class_name"] = "UNet3DConditionModel"
    (u3 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError) as e:
        load_model(str(u3), cond=str(cond_dir / "conditioning.safetensors"))
    assert "holds a UNet3DConditionModel; quest-export handles UNet2DModel and UNet2DConditionModel" in one_line(e)


def test_unreadable_config(cond_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(cond_dir, bad)
    (bad / "unet" / "config.json").write_text('{"_class_name": ')
    with pytest.raises(ModelError) as e:
        load_model(str(bad))
    assert "config.json is not readable JSON" in one_line(e)


def test_config_without_safetensors_weights(cond_dir, tmp_path):
    nw = tmp_path / "noweights"
    nw.mkdir()
    shutil.copy(cond_dir / "unet" / "config.json", nw / "config.json")
    with pytest.raises(ModelError) as e:
        load_model(str(nw), cond=str(cond_dir / "conditioning.safetensors"))
    assert (
        "has no weights (diffusion_pytorch_model.safetensors or diffusion_pytorch_model.fp16.safetensors)"
        in one_line(e)
    )
    (nw / "diffusion_pytorch_model.bin").write_bytes(b"pickle")  # only safetensors are loaded: the fix is named
    with pytest.raises(ModelError) as e:
        load_model(str(nw), cond=str(cond_dir / "conditioning.safetensors"))
    assert "is a pickle checkpoint" in one_line(e) and "save_pretrained(..., safe_serialization=True)" in one_line(e)


@pytest.mark.parametrize("keep", [0, 100, 0.5], ids=["empty", "header-cut", "half"])
def test_corrupt_weights(cond_dir, tmp_path, keep):
    bad = tmp_path / "bad"
    shutil.copytree(cond_dir, bad)
    w = bad / "unet" / "diffusion_pytorch_model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(ModelError) as e:
        load_model(str(bad))
    assert f"could not load the UNet weights in {bad / 'unet'}" in one_line(e)


# -- conditioning (--cond) -----------------------------------------------------------------------------------------


def test_cond_file_missing(cond_dir, tmp_path):
    with pytest.raises(InputError) as e:
        load_model(str(cond_dir), cond=str(tmp_path / "rows.safetensors"))
    assert "rows.safetensors: file not found; expected a safetensors file with an 'encoder_hidden_states'" in one_line(
        e
    )


def test_cond_file_wrong_width(cond_dir, tmp_path):
    f = tmp_path / "wide.safetensors"
    save_file({"encoder_hidden_states": torch.zeros(3, 4, 8)}, str(f))
    with pytest.raises(InputError) as e:
        load_model(str(cond_dir), cond=str(f))
    assert "rows have width 8, the UNet expects cross_attention_dim 16" in one_line(e)


def test_cond_file_without_the_tensor(cond_dir, tmp_path):
    f = tmp_path / "named.safetensors"
    save_file({"prompt_embeds": torch.zeros(3, 4, 16)}, str(f))
    with pytest.raises(InputError) as e:
        load_model(str(cond_dir), cond=str(f))
    assert "has no 'encoder_hidden_states' tensor; expected shape (R, L, D)" in one_line(e)


def test_cond_file_bad_shape_or_bytes(cond_dir, tmp_path):
    flat = tmp_path / "flat.safetensors"
    save_file({"encoder_hidden_states": torch.zeros(3, 16)}, str(flat))
    with pytest.raises(InputError) as e:
        load_model(str(cond_dir), cond=str(flat))
    assert "encoder_hidden_states must be (R, L, D), got (3, 16)" in one_line(e)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file" * 4)
    with pytest.raises(InputError) as e:
        load_model(str(cond_dir), cond=str(junk))
    assert "is not a readable safetensors file" in one_line(e)


def test_cond_file_is_used(cond_dir, tmp_path):
    f = tmp_path / "rows.safetensors"
    table = torch.randn(3, 4, 16)
    save_file({"encoder_hidden_states": table}, str(f), metadata={"uncond_index": "2", "labels": '["x", "y", "null"]'})
    m = load_model(str(cond_dir), cond=str(f))
    assert torch.equal(m.conditioning.table, table) and m.conditioning.uncond_index == 2
    assert m.conditioning.labels == ["x", "y", "null"] and m.conditioning.cond_rows == [0, 1]


def test_cond_needed_and_refused(cond_dir, uncond_dir):
    with pytest.raises(InputError) as e:
        load_model(str(cond_dir / "unet"))  # a bare conditional UNet: nothing says where conditioning comes from
    assert "is a UNet2DConditionModel without conditioning: pass --cond FILE" in one_line(e)
    with pytest.raises(InputError) as e:
        load_model(str(uncond_dir), cond=str(cond_dir / "conditioning.safetensors"))
    assert "--cond given, but" in one_line(e) and "is an unconditional UNet2DModel" in str(e.value)
