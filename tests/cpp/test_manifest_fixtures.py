"""Manifest safety (issue 14.5): three consumers, one check, the same one-line reasons.

Every case of tests/fixtures/manifests/cases.json is checked by
  1. the Python runtime:   quest_export_runtime.bundle.open_artifact(DIR)
  2. the CLI:              quest-export verify DIR (exit 2 on a refusal; --manifest-only for the good case)
  3. the C++ runtime:      quest_sample DIR --check
on the case's simulated device (TEST ONLY: $QUEST_EXPORT_TEST_DEVICE, read by both runtimes). A bad case must be
refused by all three with exactly "DIR: <reason of cases.json>"; the good case must be accepted by all three.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from quest_export_runtime.bundle import open_artifact
from quest_export_runtime.device import engine_loads_on
from quest_export_runtime.errors import ArtifactError, ManifestMismatch
from quest_export_runtime.manifest import TEST_DEVICE_ENV

from cli.main import main as cli_main
from tests.cpp.cppbuild import REPO, run

FIXTURES = REPO / "tests" / "fixtures" / "manifests"
CASES = json.loads((FIXTURES / "cases.json").read_text())["cases"]


def stage_case(tmp_path: Path, name: str) -> Path:
    """Copy a case folder to tmp_path/<name>, write its 'outside' files next to it and create its symlinks."""
    spec = CASES[name]
    root = tmp_path / name
    shutil.copytree(FIXTURES / name, root)
    for rel, text in spec.get("outside", {}).items():
        (tmp_path / rel).write_text(text)
    for link, target in spec.get("symlinks", {}).items():
        (root / link).symlink_to(target)
    return root


def _one_line(text: str, prefix: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{text}"
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix) :]


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_consumer_gives_the_same_verdict(build, tmp_path, monkeypatch, name):
    spec = CASES[name]
    root = stage_case(tmp_path, name)
    device = json.dumps(spec["device"])
    expected = None if spec["reason"] is None else f"{root}: {spec['reason']}"
    monkeypatch.setenv(TEST_DEVICE_ENV, device)

    # 1. the Python runtime
    if expected is None:
        assert open_artifact(root).backend == "trt"
    else:
        with pytest.raises(ManifestMismatch) as e:
            open_artifact(root)
        assert str(e.value) == expected

    # 2. quest-export verify: the full command refuses (exit 2); the good case passes the manifest-only check
    args = ["verify", str(root)] + (["--manifest-only"] if expected is None else [])
    res = CliRunner().invoke(cli_main, args, env={TEST_DEVICE_ENV: device})
    if expected is None:
        assert res.exit_code == 0, res.output
        assert "manifest OK" in res.stdout
    else:
        assert res.exit_code == 2, res.output
        assert _one_line(res.stderr, "error: ") == expected

    # 3. the C++ runtime
    monkeypatch.setenv(TEST_DEVICE_ENV, device)  # inherited by the subprocess
    proc = run(build, "quest_sample", root, "--check", check=False)
    if expected is None:
        assert proc.returncode == 0, proc.stderr
        assert "OK (stage build-trt" in proc.stdout
    else:
        assert proc.returncode == 2, proc.stderr
        assert _one_line(proc.stderr, "quest_sample: error: ") == expected


def test_cases_cover_the_refusals_of_the_issue():
    wanted = {"good", "tampered-hash", "escaping-path", "absolute-path", "symlink-out", "wrong-tensorrt", "wrong-gpu",
              "missing-file", "extra-unlisted-engine"}  # fmt: skip
    assert wanted <= set(CASES)
    assert [n for n, c in CASES.items() if c["reason"] is None] == ["good"]
    assert len({c["reason"] for c in CASES.values()}) == len(CASES), "two cases share a reason"
    size = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    assert size < 16 * 1024, f"fixtures are {size} bytes; keep them tiny"


def test_simulated_device_is_refused_when_malformed(build, tmp_path, monkeypatch):
    root = stage_case(tmp_path, "good")
    monkeypatch.setenv(TEST_DEVICE_ENV, "{not json")
    proc = run(build, "quest_sample", root, "--check", check=False)
    assert proc.returncode == 2 and TEST_DEVICE_ENV in proc.stderr
    with pytest.raises(ArtifactError, match=TEST_DEVICE_ENV):
        open_artifact(root)


def test_symlink_inside_the_folder_is_accepted(build, tmp_path, monkeypatch):
    """A link that resolves inside the folder is fine; only links that leave it are refused."""
    root = stage_case(tmp_path, "good")
    (root / "real").mkdir()
    (root / "unet.layers.json").rename(root / "real" / "layers.json")
    (root / "unet.layers.json").symlink_to("real/layers.json")
    m = json.loads((root / "manifest.json").read_text())
    m["files"]["real/layers.json"] = m["files"]["unet.layers.json"]
    (root / "manifest.json").write_text(json.dumps(m))
    monkeypatch.setenv(TEST_DEVICE_ENV, json.dumps(CASES["good"]["device"]))
    open_artifact(root)
    assert run(build, "quest_sample", root, "--check").returncode == 0


def test_engine_folder_nested_in_a_bundle_is_not_unlisted(build, tmp_path, monkeypatch):
    """bundle/engine/ has its own manifest (quest-export build --from BUNDLE writes it): not an unlisted engine."""
    outer = stage_case(tmp_path, "good")
    shutil.copytree(FIXTURES / "good", outer / "engine")
    monkeypatch.setenv(TEST_DEVICE_ENV, json.dumps(CASES["good"]["device"]))
    open_artifact(outer)
    assert run(build, "quest_sample", outer, "--check").returncode == 0
    (outer / "engine" / "manifest.json").unlink()  # without it, engine/unet.plan is an unlisted engine file
    proc = run(build, "quest_sample", outer, "--check", check=False)
    assert proc.returncode == 2 and "engine file 'engine/unet.plan' is not listed" in proc.stderr


def test_the_cli_entry_point_exits_2(tmp_path):
    """The installed console script, not only click's runner: one line on stderr, exit 2."""
    exe = Path(sys.executable).with_name("quest-export")
    if not exe.exists():
        pytest.skip(f"no quest-export console script beside {sys.executable}")
    root = stage_case(tmp_path, "wrong-gpu")
    env = {**os.environ, TEST_DEVICE_ENV: json.dumps(CASES["wrong-gpu"]["device"])}
    proc = subprocess.run([str(exe), "verify", str(root)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert _one_line(proc.stderr, "error: ") == f"{root}: {CASES['wrong-gpu']['reason']}"


# The TensorRT rule of both runtimes' device check, from the fixture tests/runtime/test_device.py also reads.
RULES = json.loads((REPO / "tests" / "fixtures" / "device" / "rules.json").read_text())
ENGINE_LOADS_ON = [(c["built"], c["installed"], c["loads"]) for c in RULES["engine_loads_on"]]


@pytest.mark.parametrize("built,installed,loads", ENGINE_LOADS_ON)
def test_trt_version_rule_is_the_same_in_both_runtimes(build, built, installed, loads):
    assert engine_loads_on(built, installed) is loads
    assert run(build, "quest_selftest", "engine-loads-on", built, installed).stdout.strip() == str(loads).lower()
