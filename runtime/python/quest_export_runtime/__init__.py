"""On-device Python runtime (distribution ``quest-export-runtime``): numpy in, numpy out; onnxruntime or
tensorrt imported lazily. No torch, and nothing of the host package ``quest_export``.

Importing this package is free: every name below loads its module on first use.

    from quest_export_runtime import RuntimePipeline
    with RuntimePipeline.from_artifact("out/bundle") as pipe:
        images = pipe(seed=0)                       # (N, C, H, W) float32 in [-1, 1]
        pipe.save_grid(images, "samples.png")

``quest_export.runtime.torch_unet.EngineUNet`` (a diffusers-compatible UNet stand-in) needs torch and lives in
the host package. The on-device TensorRT builder is ``python -m quest_export_runtime.build_cli BUNDLE``.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"  # always quest-export's version (runtime/python/pyproject.toml)

_LAZY = {
    "open_artifact": "bundle", "Artifact": "bundle", "Conditioning": "bundle", "TimestepGroups": "bundle",
    "GraphFile": "bundle", "check_engine_device": "bundle",
    "RuntimePipeline": "pipeline", "Denoiser": "pipeline",
    "OnnxRuntimeRunner": "session", "TensorRTRunner": "session", "Runner": "session", "TensorSpec": "session",
    "DeviceInfo": "device", "query_device": "device", "require_tensorrt": "device",
    "external_initializers": "session",
    "DDIMScheduler": "schedulers", "DDPMScheduler": "schedulers", "scheduler_from_config": "schedulers",
    "load_safetensors": "bundle", "Manifest": "manifest",
    "save_grid": "images", "write_png": "images",
}  # fmt: skip
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
