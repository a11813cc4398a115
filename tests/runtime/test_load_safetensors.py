"""The runtime reads safetensors through the safetensors library: every tensor and the metadata, and one
ArtifactError naming the file (and the tensor) for anything the library or numpy refuses."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy as st
from quest_export_runtime.bundle import load_safetensors
from quest_export_runtime.errors import ArtifactError


def sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 4, 5)).astype(np.float32),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "i64": rng.integers(-(2**40), 2**40, (4,), dtype=np.int64),
        "bool": rng.integers(0, 2, (5,)).astype(bool),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def test_every_tensor_and_the_metadata(tmp_path):
    ref = sample_tensors()
    path = tmp_path / "t.safetensors"
    st.save_file(ref, str(path), metadata={"uncond_index": "3", "labels": json.dumps(["a", "b"])})
    tensors, metadata = load_safetensors(path)
    assert metadata == {"uncond_index": "3", "labels": '["a", "b"]'}
    assert sorted(tensors) == sorted(ref)
    for name, arr in ref.items():
        assert tensors[name].dtype == arr.dtype and tensors[name].shape == arr.shape, name
        np.testing.assert_array_equal(tensors[name], arr, err_msg=name)
    assert tensors["f32"].flags.writeable


def test_no_metadata_gives_empty_dict(tmp_path):
    path = tmp_path / "t.safetensors"
    st.save_file({"x": np.ones(2, np.float32)}, str(path))
    assert load_safetensors(path)[1] == {}


def write_raw(path, header: dict, data: bytes) -> None:
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


@pytest.mark.parametrize(
    "header,data,match",
    [
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "invalid shape"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "not fully covered"),
        ({"x": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "data_offsets"),
        ({"__metadata__": {"a": 1}}, b"", "expected a string"),
    ],
)
def test_malformed_files_refused(tmp_path, header, data, match):
    path = tmp_path / "bad.safetensors"
    write_raw(path, header, data)
    with pytest.raises(ArtifactError, match=rf"bad.safetensors is not a valid safetensors file.*{match}.*re-copy"):
        load_safetensors(path)


def test_truncated_and_missing_files_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    st.save_file({"x": np.ones((4, 4), np.float32)}, str(path))
    raw = path.read_bytes()
    for cut in (raw[:5], raw[:20], raw[:-4]):
        path.write_bytes(cut)
        with pytest.raises(ArtifactError, match="t.safetensors is not a valid safetensors file"):
            load_safetensors(path)
    with pytest.raises(ArtifactError, match="no such safetensors file"):
        load_safetensors(tmp_path / "missing.safetensors")


def test_a_dtype_numpy_cannot_hold_names_the_tensor(tmp_path):
    """BF16 on a device without ml_dtypes (which registers a numpy bfloat16 when something imports it)."""
    path = tmp_path / "bf16.safetensors"
    write_raw(path, {"x": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4)
    code = ("import sys; sys.modules['ml_dtypes'] = None; from quest_export_runtime.bundle import load_safetensors; "
            f"load_safetensors({str(path)!r})")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "ArtifactError" in proc.stderr and "at tensor 'x'" in proc.stderr and "bfloat16" in proc.stderr
