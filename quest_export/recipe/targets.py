"""Target profiles: quest_export/data/targets/<id>.toml (package data) loaded into ``TargetProfile``.

``$QUEST_EXPORT_TARGETS`` names a folder of user profiles that replaces the packaged ones. The TOML
reader is imported inside the loader (host side only); the device reads the resolved profile that
travels as JSON inside a bundle's manifest.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from quest_export.errors import RecipeError, TargetError
from quest_export.recipe.config import TargetProfile, coerce, from_jsonable

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

ALIASES = {"jetson": "jetson-orin-jp61"}


def targets_dir() -> Path | Traversable:
    """Folder of the profiles: $QUEST_EXPORT_TARGETS (user profiles), else the package's data/targets."""
    env = os.environ.get("QUEST_EXPORT_TARGETS")
    if env:
        return Path(env)
    from quest_export.data import data

    return data("targets")


def list_targets() -> list[str]:
    folder = targets_dir()
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml") and p.is_file())


def _toml():
    """The TOML reader: the standard library's tomllib (3.11+), else tomli (a dependency on 3.10)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib


def load_target(name: str) -> TargetProfile:
    """Load a profile by id or alias (``jetson`` = jetson-orin-jp61)."""
    tomllib = _toml()
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
