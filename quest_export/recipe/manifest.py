"""Artifact directories: atomic writes and the manifest every artifact carries.

A manifest records the schema version, the stage, the recipe fingerprint, the stage's
sub-config, the SHA-256 of every input artifact and of every file written, and the
versions of the software that wrote it. Standard library only (read on the device).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from quest_export.errors import ArtifactError, ManifestMismatch

MANIFEST_SCHEMA = 1
MANIFEST_NAME = "manifest.json"
VERSIONED_PACKAGES = ("quest-export", "torch", "diffusers", "onnx", "onnxruntime", "tensorrt", "numpy")


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    """Installed versions, read from package metadata (nothing is imported)."""
    out = {}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes ``out`` only if the block succeeds.

    An interrupted run leaves at most a hidden ``.NAME.tmp-*`` folder, which never loads as
    an artifact because it has no manifest under ``out``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ArtifactError(f"{out} already exists; remove it or choose another --out")
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _plain(o: Any) -> Any:
    """JSON fallback for numpy scalars and arrays (duck-typed: this module imports no numpy)."""
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def write_json_atomic(path: str | os.PathLike, data: Any, *, allow_nan: bool = True) -> Path:
    """Write JSON through a temporary file; allow_nan=False refuses NaN/Infinity (strict RFC 8259)."""
    path = Path(path)
    try:
        text = json.dumps(data, indent=2, sort_keys=True, default=_plain, allow_nan=allow_nan) + "\n"
    except ValueError as e:  # a non-finite float where strict JSON is required
        raise ArtifactError(f"{path.name}: {e}; manifests are strict JSON (the C++ runtime reads them with "
                            "nlohmann/json): record non-finite values as null or a string") from None  # fmt: skip
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def file_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under root (relative POSIX paths), the manifest excluded."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME:
            out[p.relative_to(root).as_posix()] = sha256_file(p)
    return out


def write_manifest(root: str | os.PathLike, *, stage: str, recipe_fingerprint: str | None, config: Any = None,
                   inputs: dict[str, str] | None = None, extra: dict | None = None) -> dict:  # fmt: skip
    """Write root/manifest.json describing every file already in root."""
    root = Path(root)
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "stage": stage,
        "recipe_fingerprint": recipe_fingerprint,
        "config": config,
        "inputs": inputs or {},
        "files": file_hashes(root),
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if extra:
        manifest.update(extra)
    write_json_atomic(root / MANIFEST_NAME, manifest, allow_nan=False)  # strict JSON: the C++ runtime reads it
    return manifest


def read_manifest(root: str | os.PathLike, *, stage: str | None = None) -> dict:
    root = Path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{root} is not a quest-export artifact (no {MANIFEST_NAME}); "
                            "point at a folder written by quest-export, or re-run the stage")  # fmt: skip
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is corrupt ({e.msg}); re-run the stage that wrote it") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is not a manifest (a JSON {type(manifest).__name__}, not an object); "
                            "re-run the stage that wrote it")  # fmt: skip
    schema = manifest.get("schema")
    if schema != MANIFEST_SCHEMA:
        raise ManifestMismatch(f"{path} has manifest schema {schema!r}; this quest-export reads schema "
                               f"{MANIFEST_SCHEMA}: re-create the artifact or use a matching quest-export")  # fmt: skip
    if stage is not None and manifest.get("stage") != stage:
        raise ArtifactError(f"{root} holds a '{manifest.get('stage')}' artifact, not '{stage}'")
    return manifest


def verify_files(root: str | os.PathLike, manifest: dict | None = None) -> None:
    """Raise ManifestMismatch naming the first missing or tampered file."""
    root = Path(root)
    manifest = manifest or read_manifest(root)
    for rel, digest in manifest.get("files", {}).items():
        p = root / rel
        if not p.is_file():
            raise ManifestMismatch(f"{root}: file '{rel}' listed in the manifest is missing; re-copy the whole folder")
        if sha256_file(p) != digest:
            raise ManifestMismatch(f"{root}: file '{rel}' does not match its manifest hash (tampered or truncated); "
                                   "re-copy the folder or re-run the stage that wrote it")  # fmt: skip
