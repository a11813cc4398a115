"""Where a run writes its stage artifacts (the one place that decides it).

    WORK/calib/cache/<model>-<key>/              calibration sets
    WORK/runs/quantize/<tag>-<key>/              quantized (fake-quant) artifacts
    WORK/runs/export/<tag>-<target>-<key>/       QDQ ONNX exports
    WORK/engines/out/<tag>-<target>/             engines and bundles

WORK is ``--work DIR`` (``pipeline.run(work=...)``), else ``$QUEST_EXPORT_WORK``, else the current
directory. It is made absolute once, because artifacts record each other's paths (a quantized model
names its calibration set) and must stay valid when read from another directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV = "QUEST_EXPORT_WORK"


def resolve_work(work: str | os.PathLike | None = None) -> Path:
    """The work folder: ``work`` if given, else $QUEST_EXPORT_WORK, else the current directory (absolute)."""
    chosen = work if work not in (None, "") else os.environ.get(ENV) or os.getcwd()
    return Path(chosen).expanduser().absolute()


@dataclass(frozen=True)
class WorkDirs:
    root: Path

    @classmethod
    def resolve(cls, work: str | os.PathLike | None = None) -> WorkDirs:
        return cls(resolve_work(work))

    @property
    def calib_cache(self) -> Path:
        return self.root / "calib" / "cache"

    @property
    def quantize(self) -> Path:
        return self.root / "runs" / "quantize"

    @property
    def export(self) -> Path:
        return self.root / "runs" / "export"

    @property
    def eval(self) -> Path:
        """Finished rows of `quest-export eval` matrices (quest_export.evalmatrix), reused by a rerun."""
        return self.root / "runs" / "eval"

    @property
    def engines(self) -> Path:
        return self.root / "engines" / "out"


__all__ = ["ENV", "WorkDirs", "resolve_work"]
