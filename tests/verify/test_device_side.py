"""Device-side verify (issue 14): H-3 and H-4 run with torch blocked, against references recorded at export, through
the runtime's own entry point (python -m quest_export_runtime.verify) and `quest-export verify DIR --device-side`.

Each check runs in a fresh interpreter: the test process has torch loaded, the device has none. Blocking is
``sys.modules["torch"] = None`` (every ``import torch`` raises), and the report says whether torch was loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from quest_export_runtime.manifest import read_manifest

from quest_export.deploy.bundle import bundle_from_export
from quest_export.recipe.targets import load_target
from tests.verify.test_verify import CORRUPTED_LAYER, private_copy, scale_layer_input, shop  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
BLOCKED = "import sys; sys.modules['torch'] = None; from quest_export_runtime.verify import main; sys.exit(main(sys.argv[1:]))"


def run_device(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "QUEST_EXPORT_NO_PROGRESS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "runtime" / "python"), str(REPO)])}  # fmt: skip
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


def tier(report: dict, name: str) -> dict:
    return next(t for t in report["tiers"] if t["name"] == name)


@pytest.mark.parametrize("kind", ["cond", "uncond"])
def test_device_side_verify_of_jetson_and_cpu_folders_with_torch_blocked(shop, tmp_path, kind):  # noqa: F811
    jetson = bundle_from_export(shop.export(kind, (8, 8), "jetson", "merged"), out=tmp_path / "jetson",
                                target=load_target("jetson"))  # fmt: skip
    cpu = private_copy(shop.export(kind, (8, 8), "cpu", "merged"), tmp_path / "cpu")
    for folder in (jetson, cpu):
        e2e = read_manifest(folder)["reference"]["e2e"]
        assert np.load(folder / e2e["latents"]).shape[0] == e2e["n"] == np.load(folder / e2e["images"]).shape[0]
        out = tmp_path / f"{folder.name}.json"
        proc = run_device("-c", BLOCKED, str(folder), "--json", str(out))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        report = json.loads(out.read_text())
        assert report["device_side"] and report["torch_loaded"] is False and report["passed"]
        for name in ("H-3 statistical", "H-4 end-to-end"):
            t = tier(report, name)
            assert t["passed"] is True, t["summary"]
        assert tier(report, "H-3 statistical")["details"]["thresholds"]["cosine_min"] == 0.99
        assert (
            tier(report, "H-4 end-to-end")["details"]["psnr"] >= tier(report, "H-4 end-to-end")["details"]["threshold"]
        )
    # the same code from the build host's CLI, which blocks torch itself
    proc = run_device(
        "-m", "cli.main", "--quiet", "verify", str(jetson), "--device-side", "--json", str(tmp_path / "c.json")
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["torch_blocked"] is True and report["torch_loaded"] is False and report["passed"]
    assert "PASS  H-4 end-to-end" in proc.stdout


def test_device_side_verify_catches_a_corrupted_scale(shop, tmp_path):  # noqa: F811
    """Planted fault: one conv's input scale x 8 in the shipped graph, manifest re-hashed. Without torch the device
    still fails it, with one line naming the tier and its worst step (exit 3)."""
    folder = private_copy(shop.export("cond", (8, 8), "cpu", "merged"), tmp_path / "bad")
    scale_layer_input(folder, CORRUPTED_LAYER, rewrite_manifest=True)
    proc = run_device(
        "-m", "cli.main", "--quiet", "verify", str(folder), "--device-side", "--json", str(tmp_path / "r.json")
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: H-3 statistical failed:") and "step" in lines[0], lines
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is False and tier(report, "H-4 end-to-end")["passed"] is False
