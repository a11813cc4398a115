"""The numpy safetensors reader against files written by the safetensors library."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from quest_export_runtime.errors import ArtifactError
from quest_export_runtime.safetensors_np import load_safetensors

st = pytest.importorskip("safetensors.numpy")


def sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 4, 5)).astype(np.float32),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "f64": rng.standard_normal((2, 2)),
        "i64": rng.integers(-(2**40), 2**40, (4,), dtype=np.int64),
        "i32": rng.integers(-(2**30), 2**30, (2, 3), dtype=np.int32),
        "i8": rng.integers(-128, 128, (9,), dtype=np.int8),
        "u8": rng.integers(0, 256, (3, 3), dtype=np.uint8),
        "bool": rng.integers(0, 2, (5,)).astype(bool),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def test_round_trip_matches_safetensors_library(tmp_path):
    ref = sample_tensors()
    path = tmp_path / "t.safetensors"
    st.save_file(ref, str(path), metadata={"uncond_index": "3", "labels": json.dumps(["a", "b"])})
    tensors, metadata = load_safetensors(path)
    assert metadata == {"uncond_index": "3", "labels": '["a", "b"]'}
    assert sorted(tensors) == sorted(ref)
    for name, arr in ref.items():
        assert tensors[name].dtype == arr.dtype, name
        assert tensors[name].shape == arr.shape, name
        np.testing.assert_array_equal(tensors[name], arr, err_msg=name)
    assert tensors["f32"].flags.writeable
    # and the library reads back what it wrote, so the comparison above is not against itself
    np.testing.assert_array_equal(st.load_file(str(path))["i64"], ref["i64"])


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
        ({"x": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "dtype BF16"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "'x'.*do not fit"),
        ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, "'x'.*do not fit"),
        ({"x": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, "malformed"),
        ({"__metadata__": {"a": 1}}, b"", "__metadata__"),
    ],
)
def test_malformed_files_refused(tmp_path, header, data, match):
    path = tmp_path / "bad.safetensors"
    write_raw(path, header, data)
    with pytest.raises(ArtifactError, match=match):
        load_safetensors(path)


def test_truncated_and_missing_files_refused(tmp_path):
    path = tmp_path / "t.safetensors"
    st.save_file({"x": np.ones((4, 4), np.float32)}, str(path))
    raw = path.read_bytes()
    path.write_bytes(raw[:5])
    with pytest.raises(ArtifactError, match="shorter than the 8-byte"):
        load_safetensors(path)
    path.write_bytes(raw[:20])
    with pytest.raises(ArtifactError, match="header length"):
        load_safetensors(path)
    path.write_bytes(raw[:-4])
    with pytest.raises(ArtifactError, match="'x'"):
        load_safetensors(path)
    with pytest.raises(ArtifactError, match="no such"):
        load_safetensors(tmp_path / "missing.safetensors")
