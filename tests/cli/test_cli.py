"""The CLI (style.md rules 7-8, section 7): `info` prints the plan, --dump-recipe reproduces a run through --recipe,
user errors are one line with exit code 2 and no traceback, and a verb that is not built says so."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import quest_export.log as qe_log
import quest_export.pipeline as pipeline
from cli.main import main
from quest_export.errors import RecipeError
from quest_export.recipe.config import Recipe
from tests.tiny import tiny_cond_unet, tiny_uncond_unet, write_tiny_model_dir


@pytest.fixture(autouse=True)
def sandbox(tmp_path, monkeypatch):
    """Stage outputs go under tmp_path, not the repository; no progress bars; a wide table."""
    monkeypatch.setenv("QUEST_EXPORT_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("QUEST_EXPORT_NO_PROGRESS", "1")
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setitem(qe_log._QUIET, "value", False)  # `--quiet` sets a process-wide flag; restore it after


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {kind: write_tiny_model_dir(root, kind) for kind in ("cond", "uncond")}


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def table_rows(text: str) -> dict[str, list[str]]:
    """Layer name -> [kind, weight shape, w bits, a bits, notes] from the rich table."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("│"):
            cells = [c.strip() for c in line.strip("│").split("│")]
            rows[cells[0]] = cells[1:]
    return rows


def assert_user_error(result, fragment: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()  # stage lines may come first ("[calibrate] ... done")
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines  # the message is one line, and the last one
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.output
    return errors[0]


# -- info ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cond", "uncond"])
def test_info_prints_the_layer_table(kind, model_dirs):
    result = invoke("info", str(model_dirs[kind]))
    assert result.exit_code == 0, result.output
    rows = table_rows(result.stdout)
    unet = tiny_cond_unet() if kind == "cond" else tiny_uncond_unet()
    layers = [n for n, m in unet.named_modules() if type(m) in (torch.nn.Conv2d, torch.nn.Linear)]
    assert sorted(rows) == sorted(layers)  # every Conv2d/Linear, by its full name
    assert rows["conv_in"][:4] == ["conv", "8x1x3x3", "8", "8"] and "first" in rows["conv_in"][4]
    temb = [n for n in rows if n.endswith("time_emb_proj")]
    assert len(temb) >= 5 and all(rows[n][2:4] == ["8", "8"] and "temporal" in rows[n][4] for n in temb)
    attn = "UNet2DConditionModel" if kind == "cond" else "UNet2DModel"
    assert f"{model_dirs[kind]}: {attn}" in result.stdout
    # 10-step sampler from the folder's quest_model.json -> G = min(10, steps) for quest/fast
    assert f"{len(layers)} quantized layers;" in result.stdout and "10 timestep group(s)" in result.stdout


def test_info_w4a4_keeps_first_and_last_inputs_at_8_bits(model_dirs):
    result = invoke("info", str(model_dirs["cond"]), "--bits", "w4a4")
    assert result.exit_code == 0, result.output
    rows = table_rows(result.stdout)
    assert rows["conv_in"][2:4] == ["4", "8"] and rows["conv_out"][2:4] == ["4", "8"]  # first_last a8
    assert rows["down_blocks.0.resnets.0.conv1"][2:4] == ["4", "4"]
    assert rows["time_embedding.linear_1"][2:4] == ["4", "4"]
    to_k = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    assert rows[to_k][2:4] == ["4", "-"] and "context_quantizer (shared)" in rows[to_k][4]
    as_json = invoke("info", str(model_dirs["cond"]), "--bits", "w4a4", "--json")
    layers = {s["name"]: s for s in json.loads(as_json.stdout)["plan"]["layers"]}
    assert (layers["conv_in"]["w_bits"], layers["conv_in"]["a_bits"]) == (4, 8)
    assert {s["w_bits"] for s in layers.values()} == {4}


def test_dump_recipe_round_trips_through_recipe(model_dirs, tmp_path):
    args = ["--model", str(model_dirs["uncond"]), "--bits", "w4a8", "--method", "qdiffusion", "--set", "calib.seed=3"]
    first = invoke("info", *args, "--dump-recipe")
    assert first.exit_code == 0, first.output
    recipe = Recipe.from_dict(json.loads(first.stdout))
    assert recipe.quant.method == "qdiffusion" and recipe.calib.seed == 3 and recipe.quant.timestep_groups == 1
    assert recipe.model.name == str(model_dirs["uncond"]) and recipe.sampler.steps == 10
    assert recipe.fingerprint() == pipeline.resolve_recipe(model=str(model_dirs["uncond"]), bits="w4a8",
                                                           method="qdiffusion", sets=["calib.seed=3"]).fingerprint()  # fmt: skip
    f = tmp_path / "resolved.json"
    f.write_text(first.stdout)
    second = invoke("info", "--recipe", str(f), "--dump-recipe")
    assert second.exit_code == 0, second.output
    assert Recipe.from_dict(json.loads(second.stdout)).fingerprint() == recipe.fingerprint()
    assert second.stdout == first.stdout


# -- user errors ---------------------------------------------------------------------------------------------------


def test_unknown_set_key_is_one_line_exit_2(model_dirs):
    result = invoke("info", str(model_dirs["cond"]), "--set", "quant.w_bit=4")
    assert_user_error(result, "unknown recipe key 'quant.w_bit'; did you mean 'quant.w_bits'?")


def test_bad_value_is_one_line_exit_2(model_dirs):
    result = invoke("info", str(model_dirs["cond"]), "--set", "quant.softmax_bits=4")
    assert_user_error(result, "quant.softmax_bits=4 is not allowed; choose one of 8, 16")


def test_unknown_target_exit_2(model_dirs):
    result = invoke("info", str(model_dirs["cond"]), "--target", "jetsn")
    assert_user_error(result, "unknown target 'jetsn'; did you mean 'jetson'?")


def test_missing_model_exit_2(tmp_path):
    result = invoke("info", str(tmp_path / "no-such-model"))
    assert_user_error(result, f"model '{tmp_path / 'no-such-model'}' not found")


def test_debug_shows_the_traceback(model_dirs):
    result = invoke("--debug", "info", str(model_dirs["cond"]), "--set", "quant.w_bit=4")
    assert isinstance(result.exception, RecipeError) and result.exit_code == 1


QUICK = ["--set", "calib.samples_per_group=2", "--set", "sampler.steps=2"]


def test_dmq_quantize_and_export(model_dirs, tmp_path):
    dmq = ["--set", "dmq.les_iters=2", "--set", "dmq.pts_samples=4", "--set", "ptq.adaround_iters=1",
           "--set", "ptq.act_batch=4"]  # fmt: skip
    result = invoke("--quiet", "quantize", "--model", str(model_dirs["cond"]), "--method", "dmq", *QUICK, *dmq)
    assert result.exit_code == 0, result.output
    runs = list((tmp_path / "work" / "runs" / "quantize").glob("*-dmq-w8a8-*"))
    assert len(runs) == 1 and (runs[0] / "manifest.json").is_file()
    result = invoke("--quiet", "export", str(runs[0]), "--out", str(tmp_path / "exp"), "--target", "cpu")
    assert result.exit_code == 0, result.output  # ONNX Runtime: LES as a Div, PTS as per-channel Q/DQ scales
    result = invoke("--quiet", "export", str(runs[0]), "--out", str(tmp_path / "trt"), "--target", "jetson")
    # W8 weights: PTS's factors folded into them would leave INT8 (TensorRT's activations are per tensor)
    assert_user_error(result, "PTS on TensorRT targets (method 'dmq') folds its power-of-two factors")
    assert not (tmp_path / "trt").exists()


def test_dmq_build_for_jetson_verifies(model_dirs, tmp_path):
    """Issue 16: `build --method dmq --target jetson` (LES and PTS on, W4A8) gives a bundle that verifies: PTS as
    x * (1/f) before per-tensor Q/DQ with f folded into the next INT8 weights, exact (H-2)."""
    dmq = ["--set", "dmq.les_iters=2", "--set", "dmq.pts_samples=4", "--set", "ptq.adaround_iters=1",
           "--set", "ptq.act_batch=4"]  # fmt: skip
    result = invoke("--quiet", "build", "--model", str(model_dirs["cond"]), "--method", "dmq", "--bits", "w4a8",
                    "--target", "jetson", "--out", str(tmp_path / "bundle"), *QUICK, *dmq)  # fmt: skip
    assert result.exit_code == 0, result.output
    man = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert any(r["pts"] and r["pts_fold"] for r in man["layers"]), [r for r in man["layers"] if r["pts"]]
    report = json.loads((tmp_path / "bundle" / "verify.json").read_text())
    assert report["passed"] and {t["name"] for t in report["tiers"] if t["passed"]} >= {"H-2 exact"}, report


def test_dmq_build_for_tensorrt_is_refused_before_any_work(model_dirs, tmp_path, monkeypatch):
    import quest_export.ptq.stage_a as stage_a

    def no_stage_a(*args, **kwargs):
        raise AssertionError("Stage A ran for a build whose export is not built")

    monkeypatch.setattr(stage_a, "run_stage_a", no_stage_a)
    for method in ("dmq", "dmq+quest"):
        result = invoke("--quiet", "build", "--model", str(model_dirs["cond"]), "--method", method, "--target",
                        "jetson", *QUICK)  # fmt: skip
        assert_user_error(result, f"PTS on TensorRT targets (method '{method}') folds its power-of-two factors")
    assert not (tmp_path / "work" / "runs").exists()


# -- where stages write: --work, $QUEST_EXPORT_WORK, the current directory, --out ------------------------------------

PTQ = ["--method", "ptq", *QUICK, "--set", "ptq.adaround_iters=0", "--set", "quant.timestep_groups=1"]


def manifests(root) -> list[str]:
    return sorted(p.parent.relative_to(root).as_posix() for p in root.rglob("manifest.json"))


def test_work_option_env_and_cwd_decide_where_stages_write(model_dirs, tmp_path, monkeypatch):
    model = str(model_dirs["uncond"])
    flag = tmp_path / "flag"
    result = invoke("--quiet", "calibrate", "--model", model, *QUICK, "--work", str(flag))
    assert result.exit_code == 0, result.output
    (calib,) = manifests(flag)
    assert calib.startswith("calib/cache/") and not (tmp_path / "work").exists()  # --work wins over the env var

    result = invoke("--quiet", "calibrate", "--model", model, *QUICK)  # the sandbox's $QUEST_EXPORT_WORK
    assert result.exit_code == 0, result.output
    assert manifests(tmp_path / "work") == [calib]

    monkeypatch.delenv("QUEST_EXPORT_WORK")
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    result = invoke("--quiet", "calibrate", "--model", model, *QUICK)
    assert result.exit_code == 0, result.output
    assert manifests(here) == [calib]


def test_quantize_out_says_where_the_artifact_goes(model_dirs, tmp_path):
    model = str(model_dirs["uncond"])
    art = tmp_path / "my-artifact"
    result = invoke("--quiet", "quantize", "--model", model, *PTQ, "--out", str(art))
    assert result.exit_code == 0, result.output
    assert (art / "manifest.json").is_file() and (art / "quant.json").is_file()
    work = tmp_path / "work"
    assert manifests(work) and all(m.startswith("calib/cache/") for m in manifests(work))  # only calibration there
    assert f"[quantize] quantized model: {art} (" in result.stderr

    again = invoke("--quiet", "quantize", "--model", model, *PTQ, "--out", str(art))
    assert again.exit_code == 0 and f"{art} (reused)" in again.stderr
    other = invoke("--quiet", "quantize", "--model", model, *PTQ, "--bits", "w4a8", "--out", str(art))
    assert_user_error(other, "holds a quantize artifact of another recipe")

    exp = tmp_path / "my-export"
    result = invoke("--quiet", "export", "--model", model, *PTQ, "--target", "cpu", "--out", str(exp))
    assert result.exit_code == 0, result.output
    assert (exp / "model.onnx").is_file() and not (work / "runs" / "export").exists()


@pytest.mark.parametrize("verb", ["build", "calibrate", "quantize", "export", "eval", "sample", "info"])
def test_guidance_is_a_recipe_option_of_every_verb_that_samples(model_dirs, verb):
    """--guidance (issue 20, 8b) sets sampler.guidance_scale, so it reaches calibration, finetuning and verify."""
    base = invoke(verb, "--model", str(model_dirs["cond"]), "--dump-recipe")
    res = invoke(verb, "--model", str(model_dirs["cond"]), "--guidance", "2.5", "--dump-recipe")
    assert base.exit_code == 0 and res.exit_code == 0, res.output
    assert Recipe.from_dict(json.loads(res.stdout)).sampler.guidance_scale == 2.5
    assert Recipe.from_dict(json.loads(base.stdout)).sampler.guidance_scale != 2.5  # the model's default otherwise
    assert (
        Recipe.from_dict(json.loads(res.stdout)).fingerprint()
        != Recipe.from_dict(json.loads(base.stdout)).fingerprint()
    )


def test_guidance_on_an_artifact_sample_is_refused(tmp_path):
    res = invoke("sample", str(tmp_path), "--guidance", "2.0", "--out", str(tmp_path / "x.png"))
    assert res.exit_code == 2 and "--guidance applies to --model sampling" in res.output


@pytest.mark.parametrize("mode,warned", [("merged", True), ("per-group", False)])
def test_merged_a4_scales_say_what_they_cost(model_dirs, tmp_path, caplog, mode, warned):
    """Issue 20, 8a: a 4-bit-activation export with merged scales says so in one line; per-group does not."""
    recipe = pipeline.resolve_recipe(model=str(model_dirs["uncond"]), bits="w4a4", method="ptq",
                                     sets=["quant.timestep_groups=2", "ptq.adaround=false",
                                           "calib.samples_per_group=4", f"export.scale_mode={mode}"])  # fmt: skip
    with caplog.at_level("WARNING", logger="quest_export.pipeline"):
        pipeline.run(recipe, stages=("export",), work=tmp_path, show_progress=False)
    lines = [r.getMessage() for r in caplog.records if "merged activation scales" in r.getMessage()]
    assert len(lines) == (1 if warned else 0), lines
    if warned:
        assert "export.scale_mode=per-group" in lines[0] and "\n" not in lines[0]
