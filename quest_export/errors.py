"""Exception hierarchy: everything a user can trigger is a ``QuestExportError``.

One hierarchy for the host and the device: the base classes and the errors the runtime raises are
defined in ``quest_export_runtime.errors`` (the torch-free distribution the device installs) and
re-exported here; this module adds the errors only the host raises. The CLI prints ``str(err)`` on one
line (no traceback unless ``--debug``) and exits with ``err.exit_code``: 2 for an error the user can fix,
3 for a failed verification. Standard library only.
"""

from __future__ import annotations

from quest_export_runtime.errors import (
    ArtifactError,
    ExportError,
    InputError,
    Interrupted,
    ManifestMismatch,
    OutputError,
    QuestExportError,
    TargetError,
    TensorRTUnavailableError,
)

__all__ = ["ArtifactError", "ExportError", "InputError", "Interrupted", "ManifestMismatch", "ModelError",
           "NotBuiltError", "OutputError", "QuestExportError", "RecipeError", "TargetError", "TensorRTUnavailableError",
           "TrainingDivergedError", "VerificationFailed"]  # fmt: skip


class RecipeError(QuestExportError):
    """A recipe field, override or preset is unknown or has a bad value."""


class ModelError(InputError):
    """A model path is missing, is not a diffusers model, or has an unsupported type."""


class TrainingDivergedError(QuestExportError):
    """A finetuning loss became NaN or exploded; the last good checkpoint is kept."""


class NotBuiltError(QuestExportError):
    """A verb or backend that this version of quest-export does not provide yet."""


class VerificationFailed(QuestExportError):
    """A verification tier failed its thresholds."""

    exit_code = 3
