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
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from quest_export_runtime.device import (
    JETPACK_L4T,
    DeviceInfo,
    engine_loads_on,
    normalize_compute_capability,
    query_device,
    same_jetpack,
)
from quest_export_runtime.errors import ArtifactError, ManifestMismatch
from quest_export_runtime.outputs import (
    make_parents,
    remove_made,
    temp_sibling,
    write_error,
    write_failure,
    write_text_atomic,
)

MANIFEST_SCHEMA = 1
MANIFEST_NAME = "manifest.json"
# the keys write_manifest writes for every stage (docs/formats.md); a stage adds its own. Everything that differs
# between two runs of the same recipe on the same inputs (the time, a stage's timings) is under "run" only.
BASE_KEYS = ("schema", "stage", "recipe_fingerprint", "config", "inputs", "files", "versions", "run")
VERSIONED_PACKAGES = (
    "quest-export",
    "quest-export-runtime",
    "torch",
    "diffusers",
    "onnx",
    "onnxruntime",
    "tensorrt",
    "numpy",
)


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

    On any exception (an interrupt included) the temporary ``.NAME.tmp-*`` folder is removed; a killed run
    (SIGKILL) leaves at most that hidden folder, which never loads as an artifact because it has no manifest
    under ``out``. A failed write (disk full, read-only, permission: ``outputs.write_failure``) becomes one
    ``OutputError`` naming ``out``.
    """
    out = Path(out)
    made = make_parents(out)
    tmp = temp_sibling(out)
    try:
        tmp.mkdir()
    except OSError as e:
        remove_made(made)
        raise write_error(out, e) from None
    try:
        yield tmp
        if out.exists():
            if not replace:
                raise ArtifactError(f"{out} already exists; remove it or choose another --out")
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_made(made)
        if (failed := write_failure(e, out, tmp)) is not None:
            raise failed from None
        raise


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
    return write_text_atomic(path, text)


def file_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under root (relative POSIX paths), the manifest excluded."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST_NAME:
            out[p.relative_to(root).as_posix()] = sha256_file(p)
    return out


def write_manifest(root: str | os.PathLike, *, stage: str, recipe_fingerprint: str | None, config: Any = None,
                   inputs: dict[str, str] | None = None, extra: dict | None = None, run: dict | None = None) -> dict:  # fmt: skip
    """Write root/manifest.json describing every file already in root.

    ``run``: what is particular to this run (timings, the checkpoint resumed from), kept with the UTC time of
    writing under the one key ``run``, so that two runs of one recipe differ there only.
    """
    root = Path(root)
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "stage": stage,
        "recipe_fingerprint": recipe_fingerprint,
        "config": config,
        "inputs": inputs or {},
        "files": file_hashes(root),
        "versions": package_versions(),
        "run": {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(run or {})},
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
    if isinstance(schema, bool) or schema != MANIFEST_SCHEMA:  # the C++ runtime words this refusal the same
        got = json.dumps(schema) if "schema" in manifest else "missing"
        raise ManifestMismatch(f"{root}: manifest schema {got}; this quest-export reads schema {MANIFEST_SCHEMA}: "
                               "re-create the artifact or use a matching quest-export")  # fmt: skip
    if stage is not None and manifest.get("stage") != stage:
        raise ArtifactError(f"{root} holds a '{manifest.get('stage')}' artifact, not '{stage}'")
    return manifest


def verify_files(root: str | os.PathLike, manifest: dict | None = None) -> None:
    """Raise ManifestMismatch naming the first unsafe path, missing, escaping or tampered file (Manifest.check_files)."""
    Manifest(Path(root), manifest or read_manifest(root)).check_files()


# -- the manifest check shared with the C++ runtime ----------------------------------------------------------------
#
# One check, the same in quest_export_runtime (the Python runtime), `quest-export verify` and runtime/cpp
# (manifest.cpp, device.cpp): the same rules in the same order, refusing with the same one-line reason
# ("ROOT: reason"); tests/fixtures/manifests/cases.json holds the expected lines, tests/cpp/test_manifest_fixtures.py
# runs all three consumers over them.

ENGINE_SUFFIXES = (".plan", ".engine", ".trt")  # TensorRT engine files: none may sit in a folder unlisted
TEST_DEVICE_ENV = "QUEST_EXPORT_TEST_DEVICE"  # TEST ONLY: a simulated device (see simulated_device)
_HEX64 = frozenset("0123456789abcdef")


def unsafe_path_reason(rel: str) -> str | None:
    """Why a manifest ``files`` key is not a plain relative path inside the folder, or None when it is."""
    again = "re-run the stage that wrote it"
    parts = rel.split("/")
    if rel.startswith("/"):
        return f"file entry '{rel}' is an absolute path; manifest paths are relative to the folder: {again}"
    if ".." in parts:
        return f"file entry '{rel}' leaves the folder ('..'); manifest paths must stay inside the folder: {again}"
    if not rel or "\\" in rel or any(p in ("", ".") for p in parts):
        return f"file entry '{rel}' is not a plain relative path (empty or '.' parts, backslashes); {again}"
    return None


def simulated_device():
    """TEST ONLY: the device of $QUEST_EXPORT_TEST_DEVICE, or None when it is unset.

    The variable holds JSON ``{"trt_version": "10.3.0", "compute_capability": "8.7", "jetpack": "6.1"}``
    (``jetpack`` null: not a Jetson). The C++ runtime reads the same variable (runtime/cpp/include/quest/device.h),
    so both runtimes can be checked against tests/fixtures/manifests/ without a GPU. Never set it on a device.
    """
    text = os.environ.get(TEST_DEVICE_ENV)
    if not text:
        return None
    try:
        spec = json.loads(text)
        jetpack = spec.get("jetpack")
        l4t = (JETPACK_L4T.get(str(jetpack)) or ("unknown",))[0] if jetpack else None  # the JetPack's first L4T
        return DeviceInfo(str(spec["trt_version"]), normalize_compute_capability(spec["compute_capability"]), l4t,
                          jetpack=str(jetpack) if jetpack else None)  # fmt: skip
    except (ValueError, KeyError, TypeError, AttributeError, ArtifactError):
        raise ArtifactError(f"${TEST_DEVICE_ENV} (test only) must be a JSON object with trt_version, "
                            "compute_capability and jetpack; unset it on a real device") from None  # fmt: skip


def engine_device_reason(manifest: dict, device: Any, rebuild: str) -> str | None:
    """Why an engine folder's manifest does not fit ``device`` (TensorRT version, GPU, Jetson, JetPack), or None.

    ``device`` is a ``quest_export_runtime.device.DeviceInfo``; the rules are that module's. ``rebuild`` is the
    command to name.
    """
    build = manifest.get("build") or {}
    built_trt = manifest.get("trt_version") or build.get("trt_version")
    built_cc = manifest.get("compute_capability") or build.get("compute_capability")
    if not built_trt or not built_cc:
        return f"engine manifest lacks trt_version or compute_capability; rebuild the engine: {rebuild}"
    again = f"rebuild it on this device: {rebuild}"
    if not engine_loads_on(built_trt, device.trt_version):
        return f"engine built with TensorRT {built_trt}, this device has TensorRT {device.trt_version}; {again}"
    if device.compute_capability is None:
        return f"engine built for SM {built_cc}, but no CUDA GPU was found here (check the driver); {again}"
    built_cc, device_cc = (
        normalize_compute_capability(built_cc),
        normalize_compute_capability(device.compute_capability),
    )
    if built_cc != device_cc:
        return f"engine built for SM {built_cc}, this GPU is SM {device_cc}; {again}"
    target = _target_id(manifest) or ""
    if target.startswith("jetson") and device.l4t is None:
        return f"engine built for {target}, but this machine is not a Jetson (no /etc/nv_tegra_release); {again}"
    built_jp, device_jp = manifest.get("jetpack") or build.get("jetpack"), getattr(device, "jetpack", None)
    if built_jp and device_jp and not same_jetpack(built_jp, device_jp):
        return f"engine built on JetPack {built_jp}, this device runs JetPack {device_jp}; {again}"
    return None


def _target_id(manifest: dict) -> str | None:
    target = manifest.get("target")
    return target.get("id") if isinstance(target, dict) else target


@dataclass(frozen=True)
class Manifest:
    """An artifact folder's manifest.json and the one check every consumer runs before loading anything."""

    root: Path
    data: dict

    @classmethod
    def read(cls, root: str | os.PathLike, *, stage: str | None = None) -> Manifest:
        """Schema (and optionally stage) checked; nothing else in the folder is read."""
        return cls(Path(root), read_manifest(root, stage=stage))

    @property
    def stage(self) -> str | None:
        return self.data.get("stage")

    @property
    def files(self) -> dict[str, str]:
        files = self.data.get("files", {})
        if not isinstance(files, dict):
            raise ManifestMismatch(f"{self.root / MANIFEST_NAME}: 'files' must be an object {{path: sha256}}")
        return files

    def _refuse(self, reason: str) -> ManifestMismatch:
        return ManifestMismatch(f"{self.root}: {reason}")

    def check_files(self) -> None:
        """Every ``files`` key a plain relative path; then, in key order, each file present, inside the folder
        (symlinks resolved) and matching its sha256; then no engine file in the folder left unlisted."""
        files = dict(sorted(self.files.items()))
        for rel, digest in files.items():
            if reason := unsafe_path_reason(rel):
                raise self._refuse(reason)
            if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX64:
                raise self._refuse(
                    f"file entry '{rel}' has no lowercase sha256 hex digest; re-run the stage that wrote it"
                )
        inside = os.path.realpath(self.root) + os.sep
        for rel, digest in files.items():
            p = self.root / rel
            if not p.is_file():
                raise self._refuse(f"file '{rel}' listed in the manifest is missing; re-copy the whole folder")
            if not os.path.realpath(p).startswith(inside):
                raise self._refuse(
                    f"file '{rel}' is a symlink that leaves the folder; copy the file itself into the folder"
                )
            if sha256_file(p) != digest:
                raise self._refuse(f"file '{rel}' does not match its manifest hash (tampered or truncated); "
                                   "re-copy the folder or re-run the stage that wrote it")  # fmt: skip
        for rel in self.engine_files_on_disk():
            if rel not in files:
                raise self._refuse(f"engine file '{rel}' is not listed in the manifest, so nothing vouches for it; "
                                   "delete it or rebuild the engine folder")  # fmt: skip

    def engine_files_on_disk(self) -> list[str]:
        """Engine files under the folder (sorted relative paths); hidden folders and nested artifacts (folders
        with their own manifest, e.g. a bundle's engine/) are skipped, links to folders not followed."""
        out = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [
                d for d in dirnames if not d.startswith(".") and not (Path(dirpath, d) / MANIFEST_NAME).exists()
            ]
            rel_dir = Path(dirpath).relative_to(self.root)
            out += [(rel_dir / f).as_posix() for f in filenames if f.endswith(ENGINE_SUFFIXES)]
        return sorted(out)

    def rebuild_command(self) -> str:
        return f"quest-export build --from <bundle> --target {_target_id(self.data) or '<target-id>'}"

    def check_device(self, device: Any = None, *, rebuild: str | None = None) -> None:
        """An engine folder against ``device`` (None: the simulated test device, else this machine's TensorRT/GPU)."""
        if device is None:
            device = simulated_device()
        if device is None:
            device = query_device()
        if reason := engine_device_reason(self.data, device, rebuild or self.rebuild_command()):
            raise self._refuse(reason)

    def check(self, device: Any = None) -> None:
        """The whole check: files (paths, presence, symlinks, hashes, unlisted engines), then for an engine
        folder (stage build-trt) the TensorRT version, GPU and platform it was built for."""
        self.check_files()
        if self.stage == "build-trt":
            self.check_device(device)


TEXT_FILE_KEYS = ("tokenizer", "text_encoder", "text_encoder_data", "vae_decoder", "vae_decoder_data")


def text_files(entry: dict | None) -> list[str]:
    """The files a manifest's ``text_to_image`` entry names (docs/formats.md): what a bundle or engine folder of a
    text-to-image pipeline must carry, and what the runtime checks are listed (hashed) before it loads them."""
    return [entry[k] for k in TEXT_FILE_KEYS if entry and entry.get(k)]
