"""Recipes, presets, target profiles and the manifest schema. Standard library only."""

from quest_export.recipe.config import (
    RECIPE_VERSION,
    CalibConfig,
    ExportConfig,
    FinetuneConfig,
    LayerOverride,
    ModelSpec,
    PtqConfig,
    QuantRecipe,
    Recipe,
    SamplerConfig,
    TargetProfile,
    VerifyConfig,
)
from quest_export.recipe.presets import W4A4, W4A8, W8A8
from quest_export.recipe.targets import list_targets, load_target

__all__ = [
    "RECIPE_VERSION", "CalibConfig", "ExportConfig", "FinetuneConfig", "LayerOverride", "ModelSpec", "PtqConfig",
    "QuantRecipe", "Recipe", "SamplerConfig", "TargetProfile", "VerifyConfig", "W4A4", "W4A8", "W8A8",
    "list_targets", "load_target",
]  # fmt: skip
