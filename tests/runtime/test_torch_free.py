"""The runtime imports and samples with torch blocked (deploy.md B-1; style.md section 2)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("onnx")  # only to build the fake export in this (torch-enabled) process
REPO = Path(__file__).resolve().parents[2]


def run_blocked(code: str) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter where `import torch` (and diffusers) raise ImportError."""
    prelude = "import sys; sys.modules['torch'] = None; sys.modules['diffusers'] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)  # fmt: skip


def test_import_is_lazy_and_torch_free():
    proc = run_blocked("""
        import sys, json
        before = set(sys.modules)
        import quest_export_runtime as rt
        lazy = sorted(m for m in set(sys.modules) - before if m.startswith(("numpy", "onnxruntime", "quest_export_runtime.")))
        rt.RuntimePipeline, rt.DDIMScheduler, rt.load_safetensors, rt.TensorRTRunner  # resolve the lazy names
        ours = sorted(m for m in sys.modules if m.startswith("quest_export"))
        print(json.dumps({"lazy": lazy, "ours": ours, "trt": "tensorrt" in sys.modules, "onnx": "onnx" in sys.modules}))
    """)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.splitlines()[-1])
    assert got["lazy"] == [], f"importing quest_export_runtime loaded {got['lazy']}"
    stray = [m for m in got["ours"] if m.split(".")[0] != "quest_export_runtime"]
    assert stray == [], f"the runtime imported the host package: {stray}"
    assert not got["trt"], "tensorrt must be imported only when an engine is loaded"
    assert not got["onnx"], "onnx must not be needed to import the runtime"


def test_pipeline_samples_with_torch_blocked(tmp_path):
    fake = _fake_artifacts()
    root = fake.make_export(tmp_path / "exp", mode="scale-input", guidance_scale=2.0)
    proc = run_blocked(f"""
        import numpy as np
        from quest_export_runtime import RuntimePipeline
        with RuntimePipeline.from_artifact({str(root)!r}) as pipe:
            images = pipe(class_labels=["bag", 0], seed=1)
            path = pipe.save_grid(images, {str(tmp_path / "grid.png")!r})
        assert images.shape == (2, {fake.C}, {fake.H}, {fake.W}) and np.isfinite(images).all()
        np.save({str(tmp_path / "images.npy")!r}, images)
        import sys
        print("torch" in sys.modules and sys.modules["torch"] is not None)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"
    # the same call in this process (torch importable) gives the same images
    import numpy as np
    from quest_export_runtime import RuntimePipeline

    with RuntimePipeline.from_artifact(root) as pipe:
        np.testing.assert_array_equal(pipe(class_labels=["bag", 0], seed=1), np.load(tmp_path / "images.npy"))


def _fake_artifacts():
    import importlib.util

    spec = importlib.util.spec_from_file_location("runtime_fake_artifacts", Path(__file__).with_name("test_bundle.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
