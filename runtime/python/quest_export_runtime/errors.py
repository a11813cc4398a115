"""Exception hierarchy, device part: everything a user can trigger is a ``QuestExportError``.

The CLI prints ``str(err)`` on one line (no traceback unless ``--debug``) and exits with
``err.exit_code``: 2 for an error the user can fix, 3 for a failed verification. The base classes and
the errors the runtime raises live here; ``quest_export.errors`` re-exports them and adds the host's
(recipe, model, training, verification). Standard library only.
"""

from __future__ import annotations


class QuestExportError(Exception):
    """Base class. The message says what happened and what to do next."""

    exit_code = 2


class InputError(QuestExportError):
    """A model, file, folder or option given by the user cannot be used."""


class ArtifactError(QuestExportError):
    """An artifact directory is incomplete, corrupt or was made by another recipe."""


class ManifestMismatch(ArtifactError):
    """A bundle or engine does not match this device, this runtime or its own hashes."""


class TargetError(QuestExportError):
    """The recipe asks for something the target profile cannot run."""


class ExportError(QuestExportError):
    """The exported graph breaks a hard rule of the target (see ``quest-export lint``)."""


class TensorRTUnavailableError(QuestExportError):
    """TensorRT (builder and ONNX parser) cannot be imported on this machine."""


class OutputError(InputError):
    """An output path (``--out``, ``--grid``...) cannot be written: its message names the path and what to do.

    Raised before any work by ``quest_export_runtime.outputs.check_output``, and by the atomic writers when a write
    fails (disk full, permission); the temporary file or folder is removed first.
    """


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a command: exit code 128 + the signal number (130, 143).

    A ``KeyboardInterrupt``, so every ``except Exception`` lets it through and every atomic writer removes its
    temporary output on the way out. The message says what was kept and how to continue.
    """

    def __init__(self, signum: int = 2, message: str = "") -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
