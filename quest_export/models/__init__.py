"""Loading diffusers UNets (bundled or local), their conditioning, and the torch sampling loop."""

from quest_export.models.loading import (
    BUNDLED,
    DEFAULT_MODEL,
    Conditioning,
    LoadedModel,
    ModelInfo,
    load_conditioning,
    load_model,
    resolve_model,
)

__all__ = ["BUNDLED", "DEFAULT_MODEL", "Conditioning", "LoadedModel", "ModelInfo", "load_conditioning", "load_model",
           "resolve_model"]  # fmt: skip
