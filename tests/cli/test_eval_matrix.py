"""The eval matrix (issue 17 item 2): float + method x bits rows from the same noise, PSNR/SSIM against the float
samples, n/a FD for a model that is not Fashion-MNIST-shaped, JSON and CSV, finished rows reused by a rerun."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner

import quest_export.log as qe_log
import quest_export.pipeline as pipeline
from cli.main import main
from quest_export.verify.metrics import psnr
from tests.tiny import write_tiny_model_dir

SETS = ("calib.samples_per_group=2", "sampler.steps=2", "ptq.adaround_iters=0")


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("QUEST_EXPORT_NO_PROGRESS", "1")
    monkeypatch.setitem(qe_log._QUIET, "value", False)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(write_tiny_model_dir(tmp_path_factory.mktemp("models"), "uncond"))


@pytest.fixture(scope="module")
def matrix(model, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    res = pipeline.evaluate_matrix({"model": model, "sets": SETS}, bits=["w8a8", "w4a4"], methods=["ptq"], n=3,
                                   seed=5, work=work, json_path=work / "m.json", show_progress=False)  # fmt: skip
    return res, work


def test_rows_and_metrics(matrix):
    res, _ = matrix
    assert [(r["method"], r["bits"]) for r in [res["float"], *res["rows"]]] == [
        ("float", "fp32"), ("ptq", "w8a8"), ("ptq", "w4a4")]  # fmt: skip
    assert res["fmnist"] is False and all(r["fd"] is None and r["class_agreement"] is None for r in res["rows"])
    w8, w4 = res["rows"]
    assert w8["psnr"] > w4["psnr"] and w8["ssim"] > w4["ssim"]  # fewer bits, further from the float samples
    assert all(not r["reused"] for r in [res["float"], *res["rows"]])
    assert res["float"]["seconds"] >= 0 and all(r["seconds"] > 0 for r in res["rows"])  # rows include quantize


def test_every_row_starts_from_the_float_rows_noise(matrix, model):
    """Image k of a row is close to float image k (W8A8 PSNR well above that of float samples from other noise)."""
    res, work = matrix
    ref = np.load(next((work / "runs" / "eval").glob("*-float-*.npy")))
    assert ref.shape == (3, 1, 8, 8)
    from quest_export.eval import generate
    from quest_export.models import load_model
    from quest_export.models.sampling import SamplerSpec

    m = load_model(model)
    other, _ = generate(m.unet, m, SamplerSpec(**res["sampler"]), n=3, seed=6, show_progress=False)
    assert res["rows"][0]["psnr"] > psnr(other, ref) + 10, (res["rows"][0]["psnr"], psnr(other, ref))


def test_json_and_csv(matrix):
    res, work = matrix
    assert res["files"] == [str(work / "m.json"), str(work / "m.csv")]
    data = json.loads((work / "m.json").read_text())
    assert data["rows"] == [{k: v for k, v in r.items()} for r in res["rows"]]
    rows = list(csv.DictReader((work / "m.csv").open()))
    assert [r["bits"] for r in rows] == ["fp32", "w8a8", "w4a4"]
    assert all(r["fd"] == "n/a" for r in rows) and float(rows[1]["psnr"]) == res["rows"][0]["psnr"]


def test_a_rerun_reuses_finished_rows(matrix, model, monkeypatch):
    res, work = matrix

    def no_quantize(*a, **k):
        raise AssertionError("a finished row was recomputed")

    monkeypatch.setattr(pipeline, "run", no_quantize)
    again = pipeline.evaluate_matrix({"model": model, "sets": SETS}, bits=["w8a8", "w4a4"], methods=["ptq"], n=3,
                                     seed=5, work=work, show_progress=False)  # fmt: skip
    assert all(r["reused"] for r in [again["float"], *again["rows"]])
    assert [r["psnr"] for r in again["rows"]] == [r["psnr"] for r in res["rows"]]
    with pytest.raises(AssertionError, match="recomputed"):  # another n is another row
        pipeline.evaluate_matrix({"model": model, "sets": SETS}, bits=["w8a8"], methods=["ptq"], n=2, seed=5,
                                 work=work, show_progress=False)  # fmt: skip


def test_cli_matrix_table_and_bad_names(matrix, model, tmp_path):
    _, work = matrix
    out = tmp_path / "t.json"
    args = ["eval", "--model", model, "--methods", "ptq", "--bits", "w8a8,w4a4", "--n", "3", "--seed", "5",
            "--work", str(work), "--json", str(out)]  # fmt: skip
    for s in SETS:
        args += ["--set", s]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "(reused)" in res.stdout and "n/a" in res.stdout and f"wrote {tmp_path / 't.csv'}" in res.stdout
    assert json.loads(out.read_text())["rows"][1]["bits"] == "w4a4"
    bad = CliRunner().invoke(main, ["eval", "--model", model, "--methods", "ptq,bogus", "--bits", "w8a8", "--n", "2"])
    assert bad.exit_code == 2 and bad.stderr.strip().startswith("error: --methods ptq,bogus: unknown bogus; choose")
    both = CliRunner().invoke(main, ["eval", "--model", model, "--methods", "ptq", "--grid", "g.png"])
    assert both.exit_code == 2 and "a matrix (--methods) takes neither" in both.output


def test_single_model_json_flag_still_prints(tmp_path):
    """The one-model form keeps `--json` (print JSON); `--json FILE` writes the same JSON there."""
    args = ["eval", "--model", "fmnist-cond", "--n", "2", "--steps", "2"]
    res = CliRunner().invoke(main, [*args, "--json"])
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    assert printed["n"] == 2 and printed["fd"] > 0 and 0 <= printed["class_agreement"] <= 1
    res = CliRunner().invoke(main, [*args, "--json", str(tmp_path / "e.json")])
    assert res.exit_code == 0 and "FD " in res.stdout
    written = json.loads((tmp_path / "e.json").read_text())
    assert {k: v for k, v in written.items() if k != "seconds"} == {k: v for k, v in printed.items() if k != "seconds"}
