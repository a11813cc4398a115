"""TensorRT timing caches keyed by TensorRT version, compute capability and JetPack or CUDA (deploy.md B-10).

A cache is loaded only with a ``.json`` sidecar naming its key; a cache of another key is refused, never loaded.
Standard library only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from quest_export_runtime.errors import ManifestMismatch
from quest_export_runtime.plan import BuildPlan


def timing_cache_key(plan: BuildPlan, *, compute_capability: str | None = None) -> dict:
    """Key of a timing cache: TensorRT version, compute capability, JetPack (or CUDA where none)."""
    cc = plan.compute_capability if compute_capability is None else compute_capability
    return {"trt_version": plan.trt_version, "compute_capability": cc, "jetpack": plan.jetpack, "cuda": plan.cuda}


def timing_cache_name(key: dict) -> str:
    """'timing_trt10.3_sm87_jp6.1.cache': the key, readable in the file name."""
    where = f"jp{key['jetpack']}" if key.get("jetpack") else f"cuda{key.get('cuda') or 'unknown'}"
    return f"timing_trt{key['trt_version']}_sm{str(key['compute_capability']).replace('.', '')}_{where}.cache"


def timing_cache_sidecar(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


def load_timing_cache(path: str | os.PathLike, key: dict) -> bytes:
    """Bytes of the cache at ``path`` (b"" where none exists yet), refusing one made under another key.

    Raises:
        ManifestMismatch: the file name or its ``.json`` sidecar names another key, or an existing cache
            has no sidecar.
    """
    path = Path(path)
    expected = timing_cache_name(key)
    if path.name.startswith("timing_trt") and path.name != expected:
        raise ManifestMismatch(f"timing cache {path.name} was made for another TensorRT/GPU/JetPack (this build "
                               f"needs {expected}); pass that file or let the build start a new cache")  # fmt: skip
    if not path.exists():
        return b""
    sidecar = timing_cache_sidecar(path)
    try:
        stored = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError):
        raise ManifestMismatch(f"timing cache {path} has no readable key file {sidecar.name}; delete the cache "
                               "to rebuild it (an unknown cache is never loaded, B-10)") from None  # fmt: skip
    if stored != key:
        raise ManifestMismatch(f"timing cache {path} was made for {stored}, this build is {key}; delete it or "
                               "pass the cache of this device class")  # fmt: skip
    return path.read_bytes()


def save_timing_cache(path: str | os.PathLike, key: dict, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    timing_cache_sidecar(path).write_text(json.dumps(key, sort_keys=True) + "\n")
