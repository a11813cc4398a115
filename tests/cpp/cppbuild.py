"""Builds the C++ runtime (runtime/cpp) for the tests under tests/cpp/ (the session fixture `build` in conftest.py).

The ONNX Runtime backend is built when an ONNX Runtime prefix is found: $ONNXRUNTIME_ROOT, or the prefix
that runtime/cpp/scripts/setup_onnxruntime.sh writes (~/.cache/quest-export/onnxruntime).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "runtime" / "cpp"
BUILD_TIMEOUT_S = 900


def _ort_root() -> Path | None:
    candidates = []
    if os.environ.get("ONNXRUNTIME_ROOT"):
        candidates.append(Path(os.environ["ONNXRUNTIME_ROOT"]))
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    candidates.append(cache / "quest-export" / "onnxruntime")
    for c in candidates:
        headers = (c / "include" / "onnxruntime" / "onnxruntime_cxx_api.h").is_file() or (
            c / "include" / "onnxruntime_cxx_api.h"
        ).is_file()
        if headers and (c / "lib" / "libonnxruntime.so").exists():
            return c
    return None


@dataclass
class Build:
    dir: Path
    configure_log: str
    ort_requested: bool

    def exe(self, name: str) -> Path:
        return self.dir / name

    def ort_built(self) -> bool:
        out = subprocess.run([str(self.exe("quest_sample")), "--list-backends"], capture_output=True, text=True)
        return "ort: built" in out.stdout


def make_build(tmp_path_factory) -> Build:
    """Configure and build runtime/cpp once per session (-DQUEST_WERROR=ON), with ONNX Runtime where a prefix exists."""
    # `make test` installs cmake, g++ and the core libraries first (`make system-deps`), so these fail, not skip
    if shutil.which("cmake") is None:
        pytest.fail("cmake not found; run `make system-deps` (apt-get install cmake) to build runtime/cpp")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.fail("no C++ compiler found (c++, g++, clang++ or $CXX); run `make system-deps` (apt-get install g++)")
    bdir = tmp_path_factory.mktemp("cpp-build")
    cmd = ["cmake", "-S", str(SRC), "-B", str(bdir), "-DCMAKE_BUILD_TYPE=Release", "-DQUEST_WERROR=ON"]
    ort = _ort_root()
    if ort is not None:
        cmd.append(f"-DONNXRUNTIME_ROOT={ort}")
    conf = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert conf.returncode == 0, f"cmake configure failed:\n{conf.stdout}\n{conf.stderr}"
    jobs = str(max(1, min(os.cpu_count() or 1, 4)))
    made = subprocess.run(
        ["cmake", "--build", str(bdir), "-j", jobs], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
    )
    assert made.returncode == 0, f"build failed (warnings are errors):\n{made.stdout[-6000:]}\n{made.stderr[-6000:]}"
    return Build(bdir, conf.stdout + conf.stderr, ort is not None)


def run(build: Build, exe: str, *args, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(build.exe(exe)), *map(str, args)], capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"{exe} {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}"
    return proc
