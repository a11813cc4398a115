"""End to end on the bundled fmnist-cond model (style.md section 5, integration tier): `build --target cpu` and
`build --target jetson` through pipeline.run, stage reuse on a second run, and one-line CLI errors for bad input.

The fast preset with small overrides keeps each build under ~2.5 minutes on 2 CPU cores (measured 124 s for cpu:
calibrate 5 s, quantize 101 s, export 7 s, build 2 s, verify 8 s; second run 7 s, all of it verify).
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from polygraphy.comparator import RunResults
from polygraphy.json import load_json
from quest_export_runtime.manifest import read_manifest, sha256_file

import quest_export
import quest_export.log as qe_log
import quest_export.pipeline as pipeline
from cli.main import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MODEL = "fmnist-cond"
SETS = ("calib.samples_per_group=8", "ptq.adaround_iters=20", "finetune.b_epochs=2", "finetune.c_epochs=1",
        "finetune.b_samples=4", "finetune.c_samples=8", "sampler.steps=10", "verify.e2e_samples=2")  # fmt: skip
# cpu runs the default W8A8; jetson runs W4A8 (INT8 container, Clip-free A8), so the two builds also differ in bits
RECIPES = {"cpu": {"target": "cpu"}, "jetson": {"target": "jetson", "bits": "w4a8"}}
TIERS = ["H-2 exact", "H-3 statistical", "H-4 end-to-end"]
REUSE_MAX_FRACTION = 0.05  # reused stages take < 5 % of their first run (measured ~0.01 s vs ~115 s)
REPO_OUTPUTS = ("runs", "calib/cache", "engines/out")


def cli_args(name: str) -> list[str]:
    r = RECIPES[name]
    args = ["--model", MODEL, "--preset", "fast", "--target", r["target"]]
    args += ["--bits", r["bits"]] if "bits" in r else []
    for s in SETS:
        args += ["--set", s]
    return args


def tree(path: Path) -> dict[str, str]:
    return {p.relative_to(path).as_posix(): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


def repo_outputs() -> dict[str, list[str]]:
    return {d: sorted(os.listdir(REPO / d)) if (REPO / d).is_dir() else [] for d in REPO_OUTPUTS}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e-work")


@pytest.fixture(scope="module")
def repo_before() -> dict:
    return repo_outputs()


@pytest.fixture(scope="module")
def runs(work, repo_before) -> dict:
    """Both builds, once per module: name -> (summary, wall seconds)."""
    out = {}
    for name, r in RECIPES.items():
        recipe = pipeline.resolve_recipe(model=MODEL, preset="fast", sets=SETS, **r)
        t0 = time.monotonic()
        summary = pipeline.run(recipe, work=work, show_progress=False)
        out[name] = (summary, time.monotonic() - t0)
    return out


@pytest.fixture
def cli(work, monkeypatch):
    """CliRunner with stage outputs under the module's work folder ($QUEST_EXPORT_WORK, the default of --work)."""
    monkeypatch.setenv("QUEST_EXPORT_WORK", str(work))
    monkeypatch.setenv("QUEST_EXPORT_NO_PROGRESS", "1")
    monkeypatch.setitem(qe_log._QUIET, "value", False)  # `--quiet` sets a process-wide flag; restore it after
    return lambda *args: CliRunner().invoke(main, ["--quiet", *args])


def assert_one_line_error(result, fragment: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()  # stage lines ("[calibrate] ... (reused)") may come first
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.output
    return errors[0]


# -- the two builds ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(RECIPES))
def test_build_verifies(runs, name):
    summary, _ = runs[name]
    assert [s.name for s in summary.stages] == list(pipeline.ALL)
    assert not any(s.reused for s in summary.stages if s.name in ("quantize", "export", "build", "verify"))
    report = summary.verify
    assert report["passed"] is True, pipeline.format_verify(report)
    assert [t["name"] for t in report["tiers"]] == TIERS and all(t["passed"] is True for t in report["tiers"])
    out = summary.stage("build").path
    assert json.loads((out / "verify.json").read_text())["passed"] is True
    man = read_manifest(out)
    assert man["stage"] == ("build-ort" if name == "cpu" else "bundle")
    assert man["recipe_fingerprint"] == summary.recipe.fingerprint()
    assert man["precision"]["mode"] == ("W8A8" if name == "cpu" else "W4A8")


def test_jetson_bundle_contents(runs):
    summary, _ = runs["jetson"]
    bundle = summary.stage("build").path
    man = read_manifest(bundle, stage="bundle")
    assert man["target"]["id"] == "jetson-orin-jp61"
    build_sh = bundle / "build.sh"
    assert build_sh.is_file() and os.access(build_sh, os.X_OK) and "trtexec" in build_sh.read_text()
    assert (bundle / "build_engine.py").is_file() and (bundle / "README.md").is_file()
    wheel = bundle / "wheels" / f"quest_export_runtime-{quest_export.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:  # the runtime travels as a wheel, the torch-free part only
        names = z.namelist()
    assert "quest_export_runtime/bundle.py" in names and "quest_export_runtime/manifest.py" in names
    assert not [n for n in names if n.endswith(".pt") or n.split("/")[0] == "quest_export"]
    assert not (bundle / "quest_export_runtime").exists()
    # sha256 of every file (verify.json is written beside, after the manifest)
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()}
    files = on_disk - {"manifest.json", "verify.json"}
    assert set(man["files"]) == files
    assert all(sha256_file(bundle / f) == h for f, h in man["files"].items())
    # reference data in Polygraphy's JSON formats (polygraphy run --load-inputs / --load-outputs)
    ref = man["reference"]
    feeds = load_json(str(bundle / ref["inputs"]))
    assert len(feeds) == summary.recipe.quant.timestep_groups  # one recorded real input per group
    assert {"sample", "timestep", "encoder_hidden_states"} <= set(feeds[0])
    for key, runner in (("ref_fq", "torch_fq"), ("ref_float", "torch_float")):
        rr = RunResults.load(str(bundle / ref[key]))
        assert [n for n, _ in rr] == [runner] and len(rr[0][1]) == len(feeds)
        assert rr[0][1][0]["noise_pred"].shape == feeds[0]["sample"].shape
    assert set(man["build"]) >= {"trt_version", "typing", "flags", "profiles", "workspace_mib", "builder_opt_level",
                                 "max_aux_streams", "timing_cache", "compute_capability", "jetpack"}  # fmt: skip
    assert man["build"]["trt_version"] == "10.3" and man["build"]["jetpack"] == "6.1"


@pytest.mark.parametrize("name", list(RECIPES))
def test_second_run_reuses_every_stage(runs, work, name):
    first, first_seconds = runs[name]
    t0 = time.monotonic()
    again = pipeline.run(first.recipe, work=work, show_progress=False)
    seconds = time.monotonic() - t0
    assert {s.name: s.reused for s in again.stages} == {n: True for n in pipeline.ALL}
    assert [s.path for s in again.stages] == [s.path for s in first.stages]
    assert again.verify["passed"] is True and again.verify == first.verify
    reused = sum(s.seconds for s in again.stages)
    built = sum(s.seconds for s in first.stages)
    assert reused < REUSE_MAX_FRACTION * built, (reused, built)
    assert seconds < first_seconds / 3, (seconds, first_seconds)
    forced = pipeline.run(first.recipe, work=work, show_progress=False, force=("verify",))
    assert {s.name: s.reused for s in forced.stages} == {n: n != "verify" for n in pipeline.ALL}
    assert forced.verify["passed"] is True


def test_nothing_lands_in_the_repository(runs, repo_before):
    assert repo_outputs() == repo_before


# -- bad input: one line, non-zero exit ----------------------------------------------------------------------------


def test_cli_unknown_target(cli):
    args = cli_args("cpu")
    args[args.index("--target") + 1] = "jetson-nano"
    assert_one_line_error(cli("build", *args), "unknown target 'jetson-nano'")


def test_cli_recipe_the_target_cannot_run(cli):
    err = assert_one_line_error(cli("build", *cli_args("jetson"), "--set", "quant.a_symmetric=false"), "symmetric")
    assert "jetson-orin-jp61" in err
    args = cli_args("cpu")
    args[args.index("--target") + 1] = "jetson-orin-jp51"
    err = assert_one_line_error(cli("build", *args, "--set", "export.int4_gemm=true"), "int4_gemm")
    assert "jetson-orin-jp51" in err and "8.5.2" in err


def test_cli_missing_model(cli, tmp_path):
    args = cli_args("cpu")
    args[args.index("--model") + 1] = str(tmp_path / "no-such-model")
    assert_one_line_error(cli("build", *args), "not found")


def test_cli_refuses_an_out_folder_of_another_recipe(runs, cli, tmp_path):
    out = tmp_path / "x"
    first = cli("build", *cli_args("jetson"), "--out", str(out))  # every stage reused; bundle + verify into x
    assert first.exit_code == 0, first.output
    before = tree(out)
    assert "manifest.json" in before and "verify.json" in before
    err = assert_one_line_error(
        cli("build", *cli_args("cpu"), "--out", str(out)), "holds a build artifact of another recipe"
    )
    assert str(out) in err
    assert tree(out) == before, "the refused build changed the folder"
