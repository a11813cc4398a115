"""The run report (issue 17 item 1): the quantize stage records layer_stats.json; `quest-export report` writes a
self-contained report.html, report.md and the figure PNGs for a run dir, an export and an ORT build; headless
chromium renders the page with its figures.

One tiny QuEST W4A8 build (2 sampler steps = 2 timestep groups) serves the module (~15 s on a 2-core machine).
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import quest_export.log as qe_log
import quest_export.pipeline as pipeline
from cli.main import main
from tests.tiny import write_tiny_model_dir

QUICK = ("calib.samples_per_group=2", "sampler.steps=2", "ptq.adaround_iters=2", "finetune.b_epochs=1",
         "finetune.c_epochs=1", "finetune.b_samples=2", "finetune.c_samples=2", "verify.e2e_samples=1")  # fmt: skip
FIGURES = ("grid", "histograms", "sqnr")
DATA_PNG = re.compile(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'")


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """{"run": quantize run dir, "export": export dir, "build": ORT build dir} of one tiny QuEST W4A8 build."""
    root = tmp_path_factory.mktemp("report")
    model = write_tiny_model_dir(root, "cond")
    recipe = pipeline.resolve_recipe(model=str(model), method="quest", bits="w4a8", preset="fast", target="cpu",
                                     sets=QUICK)  # fmt: skip
    summary = pipeline.run(recipe, work=root / "work", show_progress=False)
    return {"run": summary.stage("quantize").path, "export": summary.stage("export").path,
            "build": summary.stage("build").path}  # fmt: skip


@pytest.fixture(scope="module")
def report(build):
    """The report of the ORT build folder (4 sample images): {html, md, pngs}."""
    html = pipeline.write_report(build["build"], images=4)
    return {"html": html, "md": html.with_suffix(".md"),
            "pngs": {k: html.with_name(f"report-{k}.png") for k in FIGURES}}  # fmt: skip


# -- what the quantize stage records ---------------------------------------------------------------------------


def test_quantize_records_layer_stats_in_the_manifest(build):
    run = build["run"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert "layer_stats.json" in manifest["files"]  # hashed like every file of the artifact
    doc = json.loads((run / "layer_stats.json").read_text())
    plan = json.loads((run / "quant.json").read_text())["plan"]
    assert doc["groups"] == 2 and set(doc["snapshots"]) == {"stage_a", "finetuned"}
    assert set(doc["layers"]) == {s["name"] for s in plan["layers"]}
    for snap in doc["snapshots"].values():
        assert set(snap) == set(doc["layers"])  # every quantized layer ran, in every group
        for name, recs in snap.items():
            assert len(recs) == 2 and all(len(r["counts"]) == doc["bins"] for r in recs)
            own_input = any(s["name"] == name and s["a_bits"] for s in plan["layers"])
            assert all((r["clip"] is not None) == own_input for r in recs), name
    conv_in = doc["snapshots"]["finetuned"]["conv_in"]
    # every input value is counted: rows_per_group rows of (1, 8, 8)
    assert all(sum(r["counts"]) == doc["rows_per_group"] * 64 for r in conv_in)
    # recorded in FULL mode: the quantized layers are not exact (an FP-mode pass would give no noise)
    sq = [r["sqnr_out"] for recs in doc["snapshots"]["finetuned"].values() for r in recs]
    assert all(v is not None and 5 < v < 80 for v in sq), sorted(v for v in sq if v is not None)[:3]


def test_layer_snapshot_only_reads(build):
    from quest_export.calib.collect import CalibrationSet
    from quest_export.quant.artifact import load_quantized
    from quest_export.quant.layer_stats import layer_snapshot

    art = load_quantized(build["run"])
    calib = CalibrationSet.load(art.meta["calibration"])
    before = {k: v.clone() for k, v in art.qunet.unet.state_dict().items()}
    snap = layer_snapshot(art.qunet, calib, device="cpu")
    after = art.qunet.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    recorded = json.loads((build["run"] / "layer_stats.json").read_text())["snapshots"]["finetuned"]
    assert snap == recorded  # the reloaded artifact gives the statistics the run recorded
    q = art.qunet.layers()["conv_in"].input_quantizer  # plant: a 4x wider grid loses input precision
    for p in q.scales:
        p.data.mul_(4)
    planted = layer_snapshot(art.qunet, calib, device="cpu")["conv_in"]
    assert all(p["sqnr_in"] < r["sqnr_in"] - 6 for p, r in zip(planted, recorded["conv_in"]))


# -- the report --------------------------------------------------------------------------------------------------


def test_html_is_self_contained_and_embeds_every_figure(report):
    text = report["html"].read_text()
    embedded = [base64.b64decode(b) for b in DATA_PNG.findall(text)]
    assert len(embedded) == len(FIGURES)
    for png, (key, path) in zip(embedded, report["pngs"].items()):
        assert png == path.read_bytes(), key  # the page embeds the PNG written beside it
        assert png[:8] == b"\x89PNG\r\n\x1a\n", key
        img = _decode(png)
        assert img.shape[1] > 200 and img.shape[0] > 150, (key, img.shape)
    assert not re.search(r"(src|href)=['\"](?!data:)", text)  # nothing is loaded from elsewhere
    for needle in ("H-2 exact", "H-3 statistical", "H-4 end-to-end", "model.opt.onnx", "ms (batch 1",
                   "Layer output SQNR per timestep group", "after finetuning: mean"):  # fmt: skip
        assert needle in text, needle


def test_markdown_links_the_figures_and_keeps_the_summary(report):
    md = report["md"].read_text()
    for path in report["pngs"].values():
        assert f"]({path.name})" in md
    assert "## Verification" in md and "| H-4 end-to-end | pass |" in md
    assert re.search(r"PSNR \d+\.\d\d dB, SSIM [01]\.\d{4} of the quantized samples", md)
    assert "## Size and latency" in md and "## ONNX Runtime fusion audit" in md


@pytest.mark.parametrize("which", ["run"])
def test_report_of_a_run_dir_and_an_export(build, which, tmp_path):
    out = tmp_path / "r.md"
    html = pipeline.write_report(build[which], out=out, images=2)
    assert html == tmp_path / "r.html" and out.is_file()
    assert len(DATA_PNG.findall(html.read_text())) == 3
    assert sorted(p.name for p in tmp_path.glob("r-*.png")) == ["r-grid.png", "r-histograms.png", "r-sqnr.png"]


def test_a_folder_whose_run_dir_is_gone_says_so(build, tmp_path):
    exp = tmp_path / "export-copy"
    shutil.copytree(build["export"], exp)
    m = json.loads((exp / "manifest.json").read_text())
    m["source"]["artifact"] = str(tmp_path / "gone")
    (exp / "manifest.json").write_text(json.dumps(m))
    html = pipeline.write_report(exp, images=2).read_text()
    assert not DATA_PNG.findall(html) and "is not on this machine" in html


def test_cli_report(build, tmp_path, monkeypatch):
    monkeypatch.setenv("QUEST_EXPORT_NO_PROGRESS", "1")
    monkeypatch.setitem(qe_log._QUIET, "value", False)
    out = tmp_path / "cli.md"
    res = CliRunner().invoke(main, ["report", str(build["run"]), "--out", str(out), "--images", "0"])
    assert res.exit_code == 0, res.output
    assert f"wrote {out} and {tmp_path / 'cli.html'}" in res.stdout
    assert not (tmp_path / "cli-grid.png").exists() and (tmp_path / "cli-sqnr.png").is_file()  # --images 0: no grid
    bad = CliRunner().invoke(main, ["report", str(build["run"]), "--images", "-1"])
    assert bad.exit_code == 2 and bad.stderr.strip() == "error: --images -1: must be 0 (no sample grid) or more"


# -- in a real browser --------------------------------------------------------------------------------------------


def _decode(png: bytes) -> np.ndarray:
    """PNG bytes -> RGB levels 0..255 (H, W, 3); raises on a file that does not decode."""
    import matplotlib.image

    return np.rint(255 * matplotlib.image.imread(io.BytesIO(png), format="png")[..., :3]).astype(np.int64)


def _screenshot(html, png, chromium):
    proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--screenshot={png}", "--window-size=1200,2400", html.as_uri()],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert png.is_file(), proc.stderr[-2000:]
    return _decode(png.read_bytes())


def _black(img: np.ndarray) -> int:
    """Near-black pixels: the sample grids' background (text is thin and anti-aliased, far fewer)."""
    return int((img.mean(axis=2) < 30).sum())


def _coloured(img: np.ndarray) -> int:
    """Saturated pixels: the plots (histogram lines, SQNR heatmap); the page's text and tables are grey."""
    return int((img.max(axis=2) - img.min(axis=2) > 60).sum())


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium installed (Debian: apt-get install chromium)")
def test_headless_chromium_renders_the_figures(report, tmp_path):
    """The page in chromium shows its figures: a copy whose embedded PNGs are broken (the browser's broken-image
    placeholder) shows a small fraction of the figure pixels, so a page that did not render them fails."""
    shot = _screenshot(report["html"], tmp_path / "shot.png", CHROMIUM)
    assert shot.shape == (2400, 1200, 3)
    broken = tmp_path / "broken.html"
    broken.write_text(DATA_PNG.sub("src='data:image/png;base64,AAAA'", report["html"].read_text()))
    control = _screenshot(broken, tmp_path / "broken.png", CHROMIUM)
    area = shot.shape[0] * shot.shape[1]
    assert _black(shot) > 0.01 * area, _black(shot)  # the sample grids
    assert _coloured(shot) > 0.03 * area, _coloured(shot)  # the plots
    assert _black(shot[:1200]) > 0.01 * area  # the grid sits near the top, below the summary
    assert _coloured(control) * 20 < _coloured(shot) and _black(control) * 20 < _black(shot), (
        _coloured(control), _black(control))  # fmt: skip
