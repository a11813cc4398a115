"""Target profiles: engines/targets/<id>.toml loaded into ``TargetProfile``.

``tomllib`` is imported inside the loader (host side only); the device reads the resolved
profile that travels as JSON inside a bundle's manifest.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

from quest_export.errors import RecipeError, TargetError
from quest_export.recipe.config import TargetProfile, coerce, from_jsonable

ALIASES = {"jetson": "jetson-orin-jp61"}


def targets_dir() -> Path:
    """Folder of the profiles: $QUEST_EXPORT_TARGETS, else engines/targets in the source tree."""
    env = os.environ.get("QUEST_EXPORT_TARGETS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "engines" / "targets"


def list_targets() -> list[str]:
    return sorted(p.stem for p in targets_dir().glob("*.toml"))


def load_target(name: str) -> TargetProfile:
    """Load a profile by id or alias (``jetson`` = jetson-orin-jp61)."""
    import tomllib

    tid = ALIASES.get(name, name)
    path = targets_dir() / f"{tid}.toml"
    if not path.is_file():
        known = list_targets()
        close = difflib.get_close_matches(tid, known + list(ALIASES), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise TargetError(f"unknown target '{name}'; {hint}known targets: {', '.join(known + list(ALIASES))}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise TargetError(f"target profile {path} is not valid TOML ({e}); fix or restore the file") from None
    if data.get("id") != tid:
        raise TargetError(f"target profile {path} declares id={data.get('id')!r}; it must equal its file name '{tid}'")
    try:
        return from_jsonable(TargetProfile, data, path="target")
    except RecipeError as e:
        raise TargetError(f"{path}: {e}") from None


def trt_version_tuple(profile: TargetProfile) -> tuple[int, ...]:
    if not profile.trt_version:
        return ()
    return tuple(int(p) for p in profile.trt_version.split("."))


__all__ = ["ALIASES", "coerce", "list_targets", "load_target", "targets_dir", "trt_version_tuple"]
