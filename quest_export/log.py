"""Logging and progress bars. Bars are off when output is not a terminal or with --quiet.

Standard library + rich (imported lazily); the device runtime uses it without torch.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("quest_export")
_QUIET = {"value": False}


def set_quiet(quiet: bool) -> None:
    _QUIET["value"] = quiet


def bars_enabled() -> bool:
    if _QUIET["value"] or os.environ.get("QUEST_EXPORT_NO_PROGRESS"):
        return False
    return sys.stderr.isatty() or bool(os.environ.get("QUEST_EXPORT_PROGRESS"))


class Progress:
    """A progress bar with an optional postfix (loss). Falls back to periodic log lines."""

    def __init__(self, total: int | None, description: str, enabled: bool = True) -> None:
        self.total, self.description, self.n = total, description, 0
        self._bar = None
        self._t0 = self._last = time.time()
        self._postfix = ""
        if enabled and bars_enabled():
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[post]}"),
                                     transient=False)  # fmt: skip
            self._bar.start()
            self._task = self._bar.add_task(description, total=total, post="")

    def advance(self, n: int = 1, *, postfix: str | None = None) -> None:
        self.n += n
        if postfix is not None:
            self._postfix = postfix
        if self._bar is not None:
            self._bar.update(self._task, advance=n, post=self._postfix)
        elif time.time() - self._last > 30:  # a line every 30 s when no bar is shown
            self._last = time.time()
            frac = f"{self.n}/{self.total}" if self.total else str(self.n)
            log.info("%s: %s %s (%.0fs)", self.description, frac, self._postfix, time.time() - self._t0)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def progress(total: int | None, description: str, *, enabled: bool = True) -> Progress:
    return Progress(total, description, enabled)
