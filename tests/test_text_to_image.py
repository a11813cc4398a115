"""Text-to-image pipelines end to end on CPU (issue 15): a tiny random StableDiffusionPipeline folder that the test
writes itself (zoo.random_unet --pipeline: UNet2DConditionModel, CLIPTextModel, a CLIP tokenizer over a small
vocabulary, AutoencoderKL), built into a Jetson bundle, then prompt -> image on the runtime side with torch blocked.

The device side runs in fresh interpreters with ``sys.modules["torch"] = None`` (any ``import torch`` raises)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from quest_export_runtime.manifest import read_manifest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BUILD = ["--method", "ptq", "--bits", "w8a8", "--set", "sampler.steps=10", "--set", "calib.samples_per_group=4",
         "--set", "quant.timestep_groups=2"]  # fmt: skip
SAMPLE = ("import sys; sys.modules['torch'] = None; from quest_export_runtime.sample import main; "
          "r = main(sys.argv[1:]); assert 'torch' not in sys.modules or sys.modules['torch'] is None; sys.exit(r)")  # fmt: skip
VERIFY = "import sys; sys.modules['torch'] = None; from quest_export_runtime.verify import main; sys.exit(main(sys.argv[1:]))"


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "QUEST_EXPORT_NO_PROGRESS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "runtime" / "python"), str(REPO)])}  # fmt: skip
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=env, cwd=cwd)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from quest_export.zoo.random_unet import make_random_unet

    root = tmp_path_factory.mktemp("t2i")
    model = make_random_unet("sd15-small", root / "pipe", pipeline=True, steps=10)
    prompts = root / "prompts.txt"
    prompts.write_text("# calibration prompts\na red bicycle\nthe cat at night\n\nan old lighthouse\n")
    proc = run("-m", "cli.main", "--quiet", "build", "--model", str(model), "--prompts", str(prompts), "--target",
               "jetson", "--work", str(root / "work"), *BUILD)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bundle = next((root / "work" / "engines" / "out").glob("pipe-ptq-w8a8-jetson*"))
    return {"model": model, "prompts": prompts, "bundle": bundle, "root": root}


def test_bundle_carries_the_float_text_parts(built):
    m = read_manifest(built["bundle"])
    t2i = m["text_to_image"]
    for key in ("tokenizer", "text_encoder", "vae_decoder"):
        assert t2i[key] in m["files"], key  # hashed, so a tampered file is refused
        assert (built["bundle"] / t2i[key]).is_file()
    assert t2i["check"]["text_encoder_rel_err"] <= t2i["check"]["tolerance"]
    assert t2i["check"]["vae_decoder_rel_err"] <= t2i["check"]["tolerance"]
    assert m["sampler"]["guidance_scale"] == 7.5 and m["sampler"]["clip_output"] is False
    assert m["conditioning"]["labels"] == ["a red bicycle", "the cat at night", "an old lighthouse", "<unconditional>"]
    assert "quest_export_runtime.sample engine --prompt" in (built["bundle"] / "README.md").read_text()


def test_prompt_to_png_on_the_device_with_torch_blocked_and_same_bytes_from_the_host(built, tmp_path):
    dev = tmp_path / "device.png"
    proc = run("-c", SAMPLE, str(built["bundle"]), "--prompt", "a red bicycle", "--prompt", "a cat", "--out", str(dev))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from PIL import Image

    assert min(Image.open(dev).size) >= 16  # two 16x16 images
    host = tmp_path / "host.png"
    proc = run("-m", "cli.main", "--quiet", "sample", str(built["bundle"]), "--prompt", "a red bicycle",
               "--prompt", "a cat", "--out", str(host))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert host.read_bytes() == dev.read_bytes()  # the host CLI runs the device's code


def test_device_side_verify_passes_with_torch_blocked(built, tmp_path):
    out = tmp_path / "v.json"
    proc = run("-c", VERIFY, str(built["bundle"]), "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads(out.read_text())
    assert rep["passed"] and rep["torch_loaded"] is False
    assert {t["name"] for t in rep["tiers"] if t["passed"]} >= {"H-3 statistical", "H-4 end-to-end"}


def test_runtime_encoder_reproduces_the_calibration_rows(built):
    """The device's tokenizer + ONNX text encoder give the rows torch + transformers gave calibration."""
    from quest_export_runtime.bundle import load_safetensors, open_artifact
    from quest_export_runtime.text import PromptEncoder

    art = open_artifact(built["bundle"])
    enc = PromptEncoder(art.root, art.text_to_image, providers=["CPUExecutionProvider"])
    enc.runner.activate()
    labels = [*art.conditioning.labels[:-1], ""]
    got = enc(labels)  # (R, L, D)
    table = load_safetensors(art.root / "conditioning.safetensors")[0]["encoder_hidden_states"]
    err = float(np.abs(got - table).max() / np.abs(table).max())
    assert err < art.text_to_image["check"]["tolerance"], err
    enc.runner.deactivate()


def test_latents_are_decoded_not_clipped(built):
    from quest_export_runtime.text import TextToImage

    with TextToImage.from_artifact(built["bundle"], providers=["CPUExecutionProvider"]) as t2i:
        lat = t2i.latents(["a red bicycle"], seed=3)
        img = t2i.decoder(lat)
    assert lat.shape == (1, 4, 8, 8) and img.shape == (1, 3, 16, 16)
    assert np.abs(img).max() <= 1.0


@pytest.mark.parametrize("part", ["text/text_encoder.onnx", "text/tokenizer.json", "vae/vae_decoder.onnx"])
def test_tampered_text_part_is_refused(built, tmp_path, part):
    from quest_export_runtime.bundle import open_artifact
    from quest_export_runtime.errors import ManifestMismatch

    copy = shutil.copytree(built["bundle"], tmp_path / "b")
    with open(copy / part, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ManifestMismatch, match="hash|sha256|tampered|changed"):
        open_artifact(copy)


def test_label_on_a_text_bundle_and_prompt_on_a_class_bundle_are_one_line_errors(built, tmp_path):
    proc = run("-c", SAMPLE, str(built["bundle"]), "--label", "x", "--out", str(tmp_path / "x.png"))
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--prompt" in proc.stderr
    assert not (tmp_path / "x.png").exists()


def test_float_pipeline_samples_prompts_on_the_host(built, tmp_path):
    out = tmp_path / "float.png"
    proc = run("-m", "cli.main", "--quiet", "sample", "--model", str(built["model"]), "--prompt", "a red bicycle",
               "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert out.stat().st_size > 0


def test_generate_decodes_latents_for_reports_and_eval(built):
    """eval.generate (report, eval matrix) gives the pipeline's images, not its latents."""
    from quest_export.eval import generate
    from quest_export.models.loading import load_model
    from quest_export.models.sampling import SamplerSpec

    m = load_model(str(built["model"]), prompts=str(built["prompts"]))
    imgs, _ = generate(m.unet, m, SamplerSpec.of({**m.info.sampling, "steps": 2}), n=2, show_progress=False)
    assert imgs.shape == (2, 3, 16, 16) and np.abs(imgs).max() <= 1.0


def test_engine_folder_takes_the_text_parts_from_its_bundle(built, tmp_path):
    """What the on-device TensorRT build carries over (the engine build itself needs TensorRT: structural)."""
    from quest_export_runtime.builder import carry_from_source
    from quest_export_runtime.manifest import text_files

    m = read_manifest(built["bundle"])
    keys = carry_from_source(tmp_path, m, built["bundle"])
    assert {"sampler", "scheduler_config", "conditioning", "text_to_image"} <= set(keys)
    for rel in text_files(m["text_to_image"]) + [m["conditioning"]["file"]]:
        assert (tmp_path / rel).read_bytes() == (built["bundle"] / rel).read_bytes()


# -- a real pipeline folder's errors: one line with the fix ------------------------------------------------------


def _pipe(built, tmp_path) -> Path:
    return Path(shutil.copytree(built["model"], tmp_path / "p"))


def _error(root: Path, **kw) -> str:
    from quest_export.errors import QuestExportError
    from quest_export.models.loading import resolve_model

    with pytest.raises(QuestExportError) as e:
        resolve_model(str(root), **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_tokenizer(built, tmp_path):
    p = _pipe(built, tmp_path)
    shutil.rmtree(p / "tokenizer")
    assert "no tokenizer/" in _error(p)


def test_pickle_checkpoint_refused_with_the_conversion(built, tmp_path):
    p = _pipe(built, tmp_path)
    (p / "text_encoder" / "model.safetensors").rename(p / "text_encoder" / "pytorch_model.bin")
    assert "safe_serialization=True" in _error(p)
    p2 = Path(shutil.copytree(built["model"], tmp_path / "p2"))
    (p2 / "unet" / "diffusion_pytorch_model.safetensors").rename(p2 / "unet" / "diffusion_pytorch_model.bin")
    assert "pickle checkpoint" in _error(p2)


def test_unsupported_unet_and_text_encoder_classes(built, tmp_path):
    p = _pipe(built, tmp_path)
    cfg = json.loads((p / "unet" / "config.json").read_text())
    (p / "unet" / "config.json").write_text(json.dumps({**cfg, "_class_name": "UNet2DConditionModelXL"}))
    assert "UNet2DConditionModel" in _error(p)
    (p / "unet" / "config.json").write_text(json.dumps({**cfg, "addition_embed_type": "text_time"}))
    assert "SDXL-style UNet" in _error(p)
    p2 = Path(shutil.copytree(built["model"], tmp_path / "p2"))
    cfg = json.loads((p2 / "text_encoder" / "config.json").read_text())
    (p2 / "text_encoder" / "config.json").write_text(json.dumps({**cfg, "architectures": ["T5EncoderModel"]}))
    assert "CLIPTextModel" in _error(p2)


def test_prompts_file_empty_or_missing_and_prompts_on_a_class_model(built, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    assert "no prompts" in _error(built["model"], prompts=str(empty))
    assert "not found" in _error(built["model"], prompts=str(tmp_path / "nope.txt"))
    assert "drop --prompts" in _error("fmnist-cond", prompts=str(built["prompts"]))


def test_fp16_only_weights_load_as_float32(built, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from quest_export.models.loading import load_model

    p = _pipe(built, tmp_path)
    for folder, name in (("text_encoder", "model"), ("vae", "diffusion_pytorch_model")):
        src = p / folder / f"{name}.safetensors"
        save_file({k: v.half() for k, v in load_file(str(src)).items()}, str(p / folder / f"{name}.fp16.safetensors"))
        src.unlink()
    m = load_model(str(p), prompts=str(built["prompts"]))
    assert m.conditioning.table.dtype == torch.float32 and m.conditioning.table.shape == (4, 77, 32)
