"""The device module's rules against tests/fixtures/device/rules.json, in Python and in build.sh's bash functions."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from quest_export_runtime import device
from quest_export_runtime.errors import ArtifactError, TensorRTUnavailableError

RULES = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "device" / "rules.json").read_text())


def test_fixture_covers_every_rule():
    assert RULES["schema"] == 1
    for table in ("version_parts", "trt_matches_target", "engine_loads_on", "compute_capability", "tegra_release",
                  "l4t_core_version", "jetpack_matches_l4t", "same_jetpack"):  # fmt: skip
        assert len(RULES[table]) >= 5, table
    for table in ("trt_matches_target", "jetpack_matches_l4t"):
        assert {c["ok"] for c in RULES[table]} == {True, False}, table
    assert {c["loads"] for c in RULES["engine_loads_on"]} == {True, False}


# -- Python ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", RULES["version_parts"], ids=lambda c: repr(c["text"]))
def test_version_tuple(case):
    assert device.version_tuple(case["text"]) == tuple(case["parts"])


@pytest.mark.parametrize("case", RULES["trt_matches_target"], ids=lambda c: f"{c['installed']}~{c['target']}")
def test_trt_matches_target(case):
    assert device.trt_matches_target(case["installed"], case["target"]) is case["ok"]


@pytest.mark.parametrize("case", RULES["engine_loads_on"], ids=lambda c: f"{c['built']}->{c['installed']}")
def test_engine_loads_on(case):
    assert device.engine_loads_on(case["built"], case["installed"]) is case["loads"]


@pytest.mark.parametrize("case", RULES["compute_capability"], ids=lambda c: repr(c["value"]))
def test_normalize_compute_capability(case):
    if case["normalized"] is None:
        with pytest.raises(ArtifactError, match="major.minor"):
            device.normalize_compute_capability(case["value"])
    else:
        assert device.normalize_compute_capability(case["value"]) == case["normalized"]


@pytest.mark.parametrize("case", RULES["tegra_release"], ids=lambda c: c["text"][:12])
def test_parse_tegra_release(case, tmp_path):
    assert device.parse_tegra_release(case["text"]) == case["l4t"]
    f = tmp_path / "nv_tegra_release"
    f.write_text(case["text"])
    if case["l4t"] is not None:
        assert device.l4t_release(f) == case["l4t"]


@pytest.mark.parametrize("case", RULES["l4t_core_version"], ids=lambda c: c["text"][:12])
def test_parse_l4t_core_version(case):
    assert device.parse_l4t_core_version(case["text"]) == case["l4t"]


@pytest.mark.parametrize("case", RULES["jetpack_matches_l4t"], ids=lambda c: f"jp{c['jetpack']}-{c['l4t']}")
def test_jetpack_matches_l4t(case):
    assert device.jetpack_matches_l4t(case["jetpack"], case["l4t"]) is case["ok"]


@pytest.mark.parametrize("case", RULES["same_jetpack"], ids=lambda c: f"{c['built']}~{c['device']}")
def test_same_jetpack(case):
    assert device.same_jetpack(case["built"], case["device"]) is case["same"]


def fake_dpkg(tmp_path: Path, version: str | None) -> str:
    """A PATH whose dpkg-query reports nvidia-l4t-core at ``version`` (None: not installed)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    body = f"printf '%s' {shlex.quote(version)}" if version is not None else "exit 1"
    script = bin_dir / "dpkg-query"
    script.write_text(f'#!/bin/sh\ncase "$*" in *nvidia-l4t-core*) {body} ;; *) exit 1 ;; esac\n')
    script.chmod(0o755)
    return str(bin_dir)


def test_l4t_release_falls_back_to_the_l4t_core_package(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_dpkg(tmp_path, "36.4.3-20250107174145"))
    assert device.l4t_release(tmp_path / "absent") == "36.4.3"
    assert device.l4t_release(tmp_path / "absent", dpkg=False) is None
    release = tmp_path / "nv_tegra_release"
    release.write_text(RULES["tegra_release"][1]["text"])  # the file wins over the package
    assert device.l4t_release(release) == "35.4.1"


def test_l4t_release_is_none_off_a_jetson(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", fake_dpkg(tmp_path, None))
    assert device.l4t_release(tmp_path / "absent") is None


def test_missing_tensorrt_is_one_actionable_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now raises ImportError
    with pytest.raises(TensorRTUnavailableError) as e:
        device.require_tensorrt(attempted="loading the TensorRT engine unet.plan")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("loading the TensorRT engine unet.plan needs TensorRT")
    assert "`import tensorrt` failed" in msg and "Python " in msg and "quest-export build --target T" in msg
    assert "JetPack" in msg or "pypi.nvidia.com" in msg
    with pytest.raises(TensorRTUnavailableError, match="checking a TensorRT engine"):
        device.query_device()


# -- the same rules in bash (build.sh) ------------------------------------------------------------------------------


def bash(script: str) -> list[str]:
    proc = subprocess.run(["bash", "-c", "set -euo pipefail\n" + device.shell_functions() + "\n" + script],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_shell_version_rules_agree_with_the_fixture():
    q = shlex.quote
    lines = [f"version_parts {q(c['text'])}" for c in RULES["version_parts"]]
    lines += [f"trt_matches_target {q(c['installed'])} {q(c['target'])} && echo ok || echo no"
              for c in RULES["trt_matches_target"]]  # fmt: skip
    lines += [f"jetpack_matches_l4t {q(c['jetpack'])} {q(c['l4t'])} && echo ok || echo no"
              for c in RULES["jetpack_matches_l4t"]]  # fmt: skip
    got = bash("\n".join(lines))
    want = [".".join(map(str, c["parts"])) for c in RULES["version_parts"]]
    want += ["ok" if c["ok"] else "no" for c in RULES["trt_matches_target"] + RULES["jetpack_matches_l4t"]]
    assert got == want


def test_shell_l4t_release_agrees_with_the_fixture(tmp_path):
    q = shlex.quote
    lines = ["dpkg-query() { return 1; }"]  # the release file alone
    for i, c in enumerate(RULES["tegra_release"]):
        f = tmp_path / f"release{i}"
        f.write_text(c["text"])
        lines.append(f"l4t_release {q(str(f))}")
    for c in RULES["l4t_core_version"]:  # no release file: the package's version
        lines.append(f"dpkg-query() {{ printf '%s' {q(c['text'])}; }}; l4t_release {q(str(tmp_path / 'absent'))}")
    want = [c["l4t"] or "" for c in RULES["tegra_release"] + RULES["l4t_core_version"]]
    assert bash("\n".join(lines)) == want
