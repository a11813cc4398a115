"""The real interruption: `quest-export quantize --method quest` killed with SIGKILL once its finetune checkpoint
exists, then re-run with --resume, ends with the same quantized artifact as an uninterrupted run (quest.md 5): the
same tensors, the same quant.json and the same manifest but for its ``run`` key (timings, the checkpoint resumed
from, the time written)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quest_export.finetune.quest import CKPT_NAME
from quest_export.quant.artifact import PLAN_FILE, STATE_FILE, full_report
from tests.tiny import write_tiny_model_dir

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# Small QuEST run on the tiny cond UNet (10-step sampler, 3 groups). Stage B: 3 groups x 30 steps, so after the
# first checkpoint (end of group 0) about 60 optimizer steps (~2 s) remain when the kill lands.
SETS = ["calib.samples_per_group=4", "quant.timestep_groups=3", "ptq.adaround_iters=2", "ptq.act_batch=8",
        "finetune.b_epochs=30", "finetune.b_samples=2", "finetune.b_batch=2", "finetune.c_epochs=2",
        "finetune.c_samples=8", "finetune.c_batch=4"]  # fmt: skip
CKPT_WAIT_S = 300  # generous: the checkpoint appears ~10 s after start on an idle 2-core machine
POLL_S = 0.02


def quantize_cmd(work: Path, model: Path, *extra: str) -> list[str]:
    args = ["--quiet", "quantize", "--model", str(model), "--method", "quest"]
    for s in SETS:
        args += ["--set", s]
    return [sys.executable, "-m", "cli.main", *args, "--work", str(work), *extra]


def env() -> dict:
    # one torch thread: a tiny UNet gains nothing from two, and two contending threads are far slower
    return {**os.environ, "QUEST_EXPORT_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def artifact(work: Path) -> Path:
    (path,) = [p for p in (work / "runs" / "quantize").iterdir() if not p.name.endswith(".work")]
    return path


def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    model = write_tiny_model_dir(tmp_path / "models", "cond")

    # 1. start, and SIGKILL as soon as the first finetune checkpoint is on disk
    killed = tmp_path / "killed"
    proc = subprocess.Popen(quantize_cmd(killed, model), cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + CKPT_WAIT_S
    ckpt = None
    try:
        while ckpt is None and proc.poll() is None and time.monotonic() < deadline:
            found = list((killed / "runs" / "quantize").glob(f"*.work/{CKPT_NAME}"))
            ckpt = found[0] if found else None
            if ckpt is None:
                time.sleep(POLL_S)
        assert ckpt is not None, f"no checkpoint appeared (exit {proc.poll()}): {proc.stdout.read().decode()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; give it more steps"
    assert ckpt.is_file()
    # no artifact yet; SIGKILL leaves the hidden lock file (the kernel dropped the lock; the next run takes it over)
    left = sorted(p.name for p in (killed / "runs" / "quantize").iterdir())
    assert left == sorted([ckpt.parent.name, f".{ckpt.parent.name.removesuffix('.work')}.lock"]), left
    state = torch.load(ckpt, weights_only=True)
    assert state["pos"]["stage"] == "B" and state["pos"]["index"] < 3, state["pos"]  # killed inside Stage B

    # 2. resume to the end
    resumed = subprocess.run(quantize_cmd(killed, model, "--resume"), cwd=tmp_path, env=env(), capture_output=True,
                             text=True)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not list((killed / "runs" / "quantize").glob(".*")), "the resumed run left its lock or a temporary"

    # 3. the same recipe, never interrupted, to its own --out (the same work folder: the same calibration set)
    b = tmp_path / "clean"
    straight = subprocess.run(quantize_cmd(killed, model, "--out", str(b)), cwd=tmp_path, env=env(),
                              capture_output=True, text=True)  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-3000:]

    a = artifact(killed)
    report_a, report_b = full_report(a)["finetune"], full_report(b)["finetune"]
    assert report_a["resumed_from"] and report_a["resumed_from"].endswith(CKPT_NAME)  # it did resume
    assert report_b["resumed_from"] is None
    assert (a / PLAN_FILE).read_bytes() == (b / PLAN_FILE).read_bytes()  # run fields are in the manifest's "run"
    man_a, man_b = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert man_a.pop("run") != man_b.pop("run")  # the one key that tells them apart
    assert man_a == man_b
    ta, tb = load_file(str(a / STATE_FILE)), load_file(str(b / STATE_FILE))
    assert ta.keys() == tb.keys()
    diff = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    assert not diff, f"{len(diff)} tensors differ after resume, e.g. {diff[:5]}"
    assert report_a["stage_b"] == report_b["stage_b"] and report_a["stage_c"] == report_b["stage_c"]
