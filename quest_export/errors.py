"""Exception hierarchy: everything a user can trigger is a ``QuestExportError``.

The CLI prints ``str(err)`` on one line (no traceback unless ``--debug``) and exits with
``err.exit_code``: 2 for an error the user can fix, 3 for a failed verification.
Standard library only: the device runtime imports this module.
"""

from __future__ import annotations


class QuestExportError(Exception):
    """Base class. The message says what happened and what to do next."""

    exit_code = 2


class RecipeError(QuestExportError):
    """A recipe field, override or preset is unknown or has a bad value."""


class InputError(QuestExportError):
    """A model, file, folder or option given by the user cannot be used."""


class ModelError(InputError):
    """A model path is missing, is not a diffusers model, or has an unsupported type."""


class ArtifactError(QuestExportError):
    """An artifact directory is incomplete, corrupt or was made by another recipe."""


class ManifestMismatch(ArtifactError):
    """A bundle or engine does not match this device, this runtime or its own hashes."""


class TargetError(QuestExportError):
    """The recipe asks for something the target profile cannot run."""


class ExportError(QuestExportError):
    """The exported graph breaks a hard rule of the target (see ``quest-export lint``)."""


class TrainingDivergedError(QuestExportError):
    """A finetuning loss became NaN or exploded; the last good checkpoint is kept."""


class NotBuiltError(QuestExportError):
    """A verb or backend that this version of quest-export does not provide yet."""


class TensorRTUnavailableError(QuestExportError):
    """TensorRT (builder and ONNX parser) cannot be imported on this machine."""


class VerificationFailed(QuestExportError):
    """A verification tier failed its thresholds."""

    exit_code = 3
