"""quest-export: QuEST low-bit diffusion quantization, QDQ ONNX export and verified engines.

This module holds only the version string and lazy re-exports, so that importing a torch-free
module (``quest_export.recipe``, ``quest_export.deploy``) stays cheap. The device runtime is the separate
package ``quest_export_runtime`` (runtime/python/), whose version equals this one.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "resolve_recipe": "quest_export.pipeline",
    "run": "quest_export.pipeline",
    "Recipe": "quest_export.recipe",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'quest_export' has no attribute {name!r}")
