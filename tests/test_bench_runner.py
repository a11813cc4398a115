"""`make bench` (bench/run_all.py) knows every bench script: a new one that is not wired in is an error, not skipped."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _list(folder: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(folder / "run_all.py"), "--list", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_run_all_lists_every_bench_script(tmp_path):
    proc = _list(BENCH, tmp_path)
    assert proc.returncode == 0, proc.stderr
    named = {line.split(":", 1)[0] for line in proc.stdout.splitlines()}
    assert named == {p.stem for p in BENCH.glob("*.py")} - {"run_all"}


def test_an_unwired_bench_script_is_refused(tmp_path):
    copy = tmp_path / "bench"
    shutil.copytree(BENCH, copy, ignore=shutil.ignore_patterns("results", "__pycache__"))
    (copy / "new_sweep.py").write_text("print('hi')\n")
    proc = _list(copy, tmp_path)
    assert proc.returncode == 2 and "new_sweep" in proc.stderr and "Traceback" not in proc.stderr
