"""Artifact folders (style.md section 3): atomic_dir renames a finished folder into place and leaves nothing
behind on failure; manifests record every file's hash and refuse tampered, missing, corrupt or foreign folders."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from quest_export_runtime.manifest import (
    MANIFEST_NAME,
    MANIFEST_SCHEMA,
    atomic_dir,
    file_hashes,
    read_manifest,
    verify_files,
    write_manifest,
)

from quest_export.errors import ArtifactError, ManifestMismatch


def _entries(folder):
    return sorted(p.name for p in folder.iterdir())


# -- atomic_dir ----------------------------------------------------------------------------------------------------


def test_atomic_dir_success_renames_into_place(tmp_path):
    out = tmp_path / "art"
    with atomic_dir(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".art.tmp-") and tmp.is_dir()
        assert not out.exists()  # nothing under the final name until the block succeeds
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"\x00\x01")
    assert (out / "a.txt").read_text() == "a" and (out / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    assert _entries(tmp_path) == ["art"]  # the temporary folder was renamed, not copied


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_dir_exception_leaves_nothing(tmp_path, exc):
    out = tmp_path / "nested" / "art"
    with pytest.raises(type(exc)):
        with atomic_dir(out) as tmp:
            (tmp / "half.txt").write_text("half written")
            raise exc
    assert not out.exists()
    assert _entries(tmp_path) == []  # no output folder, no temporary folder, not even the parent it created


def test_atomic_dir_replace_false_refuses_existing_folder(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ArtifactError, match=r"art already exists; remove it or choose another --out"):
        with atomic_dir(out, replace=False) as tmp:
            (tmp / "new.txt").write_text("new")
    assert _entries(out) == ["old.txt"]  # untouched
    assert _entries(tmp_path) == ["art"]  # and the temporary folder is gone


def test_atomic_dir_replace_swaps_whole_folder(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _entries(out) == ["new.txt"]  # replaced, not merged
    assert _entries(tmp_path) == ["art"]  # no .old-* or .tmp-* left
    # a failed replacement keeps the previous artifact intact
    with pytest.raises(ValueError):
        with atomic_dir(out) as tmp:
            (tmp / "newer.txt").write_text("x")
            raise ValueError
    assert _entries(out) == ["new.txt"] and _entries(tmp_path) == ["art"]


# -- manifests -----------------------------------------------------------------------------------------------------


@pytest.fixture
def artifact(tmp_path):
    root = tmp_path / "art"
    with atomic_dir(root) as tmp:
        (tmp / "weights.bin").write_bytes(bytes(range(256)) * 4)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "spec.json").write_text('{"a": 1}')
        write_manifest(tmp, stage="calibrate", recipe_fingerprint="f" * 64, config={"steps": 4},
                       inputs={"model": "abc"}, extra={"np_scalar": np.float32(1.5), "np_array": np.arange(3)})  # fmt: skip
    return root


def test_manifest_round_trip(artifact):
    m = read_manifest(artifact)
    assert m["schema"] == MANIFEST_SCHEMA and m["stage"] == "calibrate"
    assert m["recipe_fingerprint"] == "f" * 64 and m["config"] == {"steps": 4} and m["inputs"] == {"model": "abc"}
    assert m["files"] == {
        "sub/spec.json": hashlib.sha256(b'{"a": 1}').hexdigest(),  # POSIX paths relative to the folder
        "weights.bin": hashlib.sha256(bytes(range(256)) * 4).hexdigest(),
    }
    assert MANIFEST_NAME not in m["files"]
    assert m["np_scalar"] == 1.5 and m["np_array"] == [0, 1, 2]  # numpy values are written as plain JSON
    assert m["versions"]["quest-export"] and m["versions"]["quest-export-runtime"] == m["versions"]["quest-export"]
    assert read_manifest(artifact, stage="calibrate") == m
    verify_files(artifact)  # passes on an untouched folder
    verify_files(artifact, m)
    assert file_hashes(artifact) == m["files"]


def test_wrong_stage_is_refused(artifact):
    with pytest.raises(ArtifactError, match=r"holds a 'calibrate' artifact, not 'export'"):
        read_manifest(artifact, stage="export")


def test_tampered_file_is_refused_by_name(artifact):
    p = artifact / "sub" / "spec.json"
    p.write_text('{"a": 2}')  # same size, different bytes
    with pytest.raises(ManifestMismatch) as e:
        verify_files(artifact)
    assert "'sub/spec.json' does not match its manifest hash" in str(e.value)
    assert str(artifact) in str(e.value)


def test_truncated_file_is_refused(artifact):
    p = artifact / "weights.bin"
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(
        ManifestMismatch, match=r"'weights.bin' does not match its manifest hash \(tampered or truncated\)"
    ):
        verify_files(artifact)


def test_missing_file_is_refused_by_name(artifact):
    (artifact / "weights.bin").unlink()
    with pytest.raises(ManifestMismatch, match=r"file 'weights.bin' listed in the manifest is missing"):
        verify_files(artifact)


def test_corrupt_manifest_json(artifact):
    (artifact / MANIFEST_NAME).write_text('{"schema": 1, "files": ')
    with pytest.raises(ArtifactError) as e:
        read_manifest(artifact)
    assert type(e.value) is ArtifactError  # corrupt, not a mismatch
    assert f"{artifact / MANIFEST_NAME} is corrupt" in str(e.value)
    with pytest.raises(ArtifactError, match="is corrupt"):
        verify_files(artifact)


def test_unknown_schema(artifact):
    m = json.loads((artifact / MANIFEST_NAME).read_text())
    m["schema"] = MANIFEST_SCHEMA + 1
    (artifact / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ManifestMismatch) as e:
        read_manifest(artifact)
    assert str(e.value).startswith(f"{artifact}: manifest schema {MANIFEST_SCHEMA + 1}; this quest-export reads")
    del m["schema"]
    (artifact / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ManifestMismatch, match="manifest schema missing"):
        read_manifest(artifact)
    m["schema"] = True  # a bool is not the integer 1 (the C++ runtime refuses it too)
    (artifact / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(ManifestMismatch, match="manifest schema true"):
        read_manifest(artifact)


def test_folder_without_manifest(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError) as e:
        read_manifest(tmp_path)
    assert type(e.value) is ArtifactError
    assert f"{tmp_path} is not a quest-export artifact (no {MANIFEST_NAME})" in str(e.value)


def test_messages_are_one_line(artifact):
    (artifact / "weights.bin").unlink()
    for call in (lambda: verify_files(artifact), lambda: read_manifest(artifact, stage="export")):
        with pytest.raises(ArtifactError) as e:
            call()
        assert "\n" not in str(e.value)


def test_manifest_that_is_not_an_object(artifact):
    (artifact / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(ArtifactError, match="manifest"):
        read_manifest(artifact)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_manifest_is_strict_json(tmp_path, value):
    """NaN/Infinity are not JSON: the C++ runtime (nlohmann/json) could not read such a manifest, so none is written."""
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ArtifactError, match="strict JSON"):
        write_manifest(tmp_path, stage="export", recipe_fingerprint=None, extra={"x": [1.0, value]})
    assert not (tmp_path / "manifest.json").exists()
