"""The package works installed, not only from its source tree: build the wheel from the tracked sources, install it
NON-editable into a fresh venv outside the tree, and run `quest-export build --target cpu --preset fast` on a tiny
model there, with the current directory as the work folder (issue 18).

No download: the wheel is built without isolation by this venv's setuptools, and the fresh venv sees this venv's
installed dependencies through a .pth file. A .pth line only appends a folder to sys.path (after the fresh venv's own
site-packages, and without running the .pth files in it, so the editable install's finder stays off), so the
quest_export that imports is the wheel's; the test checks that.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.tiny import write_tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
# The distributions this repository builds: (source folder, its packages); quest-export depends on the runtime's.
DISTS = [(REPO, ("quest_export", "cli")), (REPO / "runtime" / "python", ("quest_export_runtime",))]
NOT_SHIPPED = ("*.md",)  # documentation inside the package folders; nothing reads it
SETS = ("calib.samples_per_group=2", "ptq.adaround_iters=2", "finetune.b_epochs=1", "finetune.c_epochs=1",
        "finetune.b_samples=2", "finetune.c_samples=4", "verify.e2e_samples=2")  # fmt: skip


def tracked(root: Path, *paths: str) -> list[str]:
    """Files git tracks under ``paths`` (what a fresh clone has), relative to ``root``."""
    if shutil.which("git") and (REPO / ".git").exists():
        out = subprocess.run(["git", "ls-files", "-z", "--", *paths], cwd=root, capture_output=True, check=True)
        return [p for p in out.stdout.decode().split("\0") if p and (root / p).is_file()]
    return [p.relative_to(root).as_posix() for d in paths for p in (root / d).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts]  # fmt: skip


def env() -> dict:
    drop = ("PYTHONPATH", "QUEST_EXPORT_WORK", "QUEST_EXPORT_TARGETS", "VIRTUAL_ENV")
    # no OMP_NUM_THREADS=1: with one thread the tiny cond model trains into one whose end-to-end check (H-4) gives
    # 23.8 dB against the 25 dB limit on an AVX2 host (H-2 exact, H-3 worst cosine 0.99991); with the default
    # threads the same build is bit-exact (145 dB). The thresholds per host are issue 14's item 3.
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "QUEST_EXPORT_NO_PROGRESS": "1"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A fresh venv (outside the tree) with this repository's wheels installed, and the files each wheel holds."""
    tmp = tmp_path_factory.mktemp("wheel")
    venv, dist = tmp / "venv", tmp / "dist"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    packages = []
    for i, (root, pkgs) in enumerate(DISTS):
        src = tmp / f"src{i}"  # a copy of the tracked sources, so the build writes nothing into the tree
        for rel in tracked(root, "pyproject.toml", "README.md", *pkgs):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, src / rel)
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", str(dist), str(src)], check=True, capture_output=True, timeout=300)  # fmt: skip
        packages.append((root, pkgs))
    wheels = sorted(dist.glob("*.whl"))
    assert len(wheels) == len(packages), wheels
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index",
                    *map(str, wheels)], check=True, capture_output=True, timeout=300)  # fmt: skip
    (site / "zz-quest-export-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return {"venv": venv, "python": py, "site": site, "packages": packages}


def test_the_wheel_holds_every_tracked_file_of_the_package(installed):
    """A data file left out of package-data (a target profile, a prompt list, a bundled model) fails here."""
    missing = []
    for root, pkgs in installed["packages"]:
        for rel in tracked(root, *pkgs):
            if "__pycache__" in rel or any(fnmatch.fnmatch(Path(rel).name, pat) for pat in NOT_SHIPPED):
                continue
            if not (installed["site"] / rel).is_file():
                missing.append(rel)
    assert not missing, f"not in the wheel (add them to [tool.setuptools.package-data]): {missing}"


def test_installed_cli_builds_a_tiny_model_outside_the_tree(installed, tmp_path):
    model = write_tiny_model_dir(tmp_path / "models", "cond")
    work = tmp_path / "here"
    work.mkdir()
    probe = ("import json, quest_export, quest_export_runtime, cli.main; "
             "from quest_export.recipe.targets import list_targets, targets_dir; "
             "print(json.dumps({'pkg': quest_export.__file__, 'cli': cli.main.__file__, 'targets': list_targets(), "
             "'runtime': quest_export_runtime.__file__, 'dir': str(targets_dir())}))")  # fmt: skip
    where = json.loads(subprocess.run([str(installed["python"]), "-c", probe], cwd=work, env=env(), capture_output=True,
                                      text=True, check=True, timeout=60).stdout)  # fmt: skip
    for key in ("pkg", "cli", "runtime", "dir"):
        assert Path(where[key]).is_relative_to(installed["venv"]), (key, where[key])  # the wheel's, not the tree's
    assert "cpu" in where["targets"] and "jetson-orin-jp61" in where["targets"]

    args = ["--quiet", "build", "--target", "cpu", "--preset", "fast", "--model", str(model)]
    for s in SETS:
        args += ["--set", s]
    proc = subprocess.run([str(installed["venv"] / "bin" / "quest-export"), *args], cwd=work, env=env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "verification PASSED" in proc.stdout
    # the current directory is the work folder: the paths the README shows, under it
    assert len(list((work / "calib" / "cache").glob("tiny-cond-*/manifest.json"))) == 1
    assert len(list((work / "runs" / "quantize").glob("tiny-cond-quest-w8a8-*/manifest.json"))) == 1
    assert len(list((work / "runs" / "export").glob("tiny-cond-quest-w8a8-cpu-*/model.onnx"))) == 1
    out = work / "engines" / "out" / "tiny-cond-quest-w8a8-cpu"
    assert json.loads((out / "verify.json").read_text())["passed"] is True
