"""SIGINT and SIGTERM during a stage (issue 20, docs/reliability.md): exit 130 / 143 and one line saying what was
kept and how to continue, not click's bare ``Aborted!``; nothing partial left but a named resume folder.

The real thing: the CLI in a subprocess on a tiny model, signalled once it is inside the stage under test (a stage
line on stderr, or the checkpoint on disk), then checked for its exit code, its last stderr line and its leftovers.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.tiny import write_tiny_model_dir

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 240  # generous: a loaded 2-core machine
POLL_S = 0.02
PTQ = ["--method", "ptq", "--set", "calib.samples_per_group=2", "--set", "sampler.steps=2",
       "--set", "ptq.adaround_iters=0", "--set", "quant.timestep_groups=1"]  # fmt: skip
# QuEST on the tiny cond UNet (tests/finetune/test_resume_kill.py): Stage A saves its resume point, then Stage B runs
QUEST = ["--method", "quest"] + [a for s in ["calib.samples_per_group=4", "quant.timestep_groups=3",
         "ptq.adaround_iters=2", "ptq.act_batch=8", "finetune.b_epochs=30", "finetune.b_samples=2", "finetune.b_batch=2",
         "finetune.c_epochs=2", "finetune.c_samples=8", "finetune.c_batch=4"] for a in ("--set", s)]  # fmt: skip


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return write_tiny_model_dir(tmp_path_factory.mktemp("signal-models"), "cond")


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", *args]


def env() -> dict:
    return {**os.environ, "QUEST_EXPORT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


class Running:
    """A CLI subprocess whose stderr is collected line by line while it runs."""

    def __init__(self, argv: list[str], cwd: Path) -> None:
        self.proc = subprocess.Popen(argv, cwd=cwd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)  # fmt: skip
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, ready) -> None:
        deadline = time.monotonic() + WAIT_S
        while not ready() and self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(POLL_S)
        assert ready(), f"never ready (exit {self.proc.poll()}): {self.lines[-20:]}"
        assert self.proc.poll() is None, "the command finished before it could be signalled; give it more work"

    def finish(self) -> tuple[int, list[str]]:
        try:
            self.proc.wait(timeout=WAIT_S)
        finally:
            self.proc.kill()
            self.reader.join(timeout=10)
        return self.proc.returncode, self.lines


def leftovers(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if ".tmp" in p.name or p.name.endswith(".lock") or ".old-" in p.name)  # fmt: skip


def one_error_line(lines: list[str]) -> str:
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert not any("Traceback" in ln or ln == "Aborted!" for ln in lines), lines
    return errors[0]


def test_sigint_during_export_keeps_the_finished_stages(model, tmp_path):
    work = tmp_path / "work"
    run = Running(cli("build", "--model", str(model), *PTQ, "--target", "cpu", "--work", str(work)), tmp_path)
    run.wait_for(lambda: any(ln.startswith("[quantize]") for ln in run.lines))  # export is the running stage now
    run.proc.send_signal(signal.SIGINT)
    rc, lines = run.finish()
    assert rc == 130, lines
    line = one_error_line(lines)
    stage = re.match(r"error: interrupted by SIGINT during (\w+); its unfinished output was removed", line)
    assert stage and stage[1] in ("export", "build", "verify"), line  # export, unless this machine outran the poll
    assert "kept the finished stages: calibrate " in line and ", quantize " in line, line
    assert line.endswith("re-run the same command to continue (finished stages are reused)"), line
    assert leftovers(tmp_path) == []
    if stage[1] == "export":
        assert not (work / "runs" / "export").exists() or not any((work / "runs" / "export").iterdir())
        assert not (work / "engines").exists()


def test_sigterm_during_quantize_keeps_the_resume_folder_and_resume_finishes(model, tmp_path):
    work = tmp_path / "work"
    argv = cli("--quiet", "quantize", "--model", str(model), *QUEST, "--work", str(work))
    run = Running(argv, tmp_path)
    runs = work / "runs" / "quantize"
    run.wait_for(lambda: any(runs.glob("*.work/stage_a/manifest.json")))  # Stage A's resume point is on disk
    run.proc.send_signal(signal.SIGTERM)
    rc, lines = run.finish()
    assert rc == 143, lines
    line = one_error_line(lines)
    (kept,) = runs.iterdir()  # the resume folder only, no artifact
    assert kept.name.endswith(".work"), kept
    assert line.startswith("error: interrupted by SIGTERM during quantize; its unfinished output was removed"), line
    assert f"kept the quantize checkpoint {kept}: re-run the same command with --resume to continue" in line, line
    assert leftovers(tmp_path) == []

    resumed = subprocess.run([*argv, "--resume"], cwd=tmp_path, env=env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (art,) = runs.iterdir()  # the artifact; the resume folder is gone
    assert (art / "manifest.json").is_file() and not art.name.endswith(".work")
    assert leftovers(tmp_path) == []
