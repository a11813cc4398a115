"""Timestep groups: which row of every activation-scale table is active (quest.md 2.5, 6).

The quantized model owns one ``GroupContext``. A forward pre-hook on the UNet reads the
timestep it is called with and selects the group by the canonical, total rule

    g(t) = max{ g : t_g >= t },   g = 0 when t > t_0

where t_0 > t_1 > ... > t_{G-1} are the timesteps of each group's first sampler step. No
sampler is edited and no lookup can fail: every timestep maps to a group.
"""

from __future__ import annotations

import bisect
import contextlib
from collections.abc import Iterator, Sequence

import torch

from quest_export.errors import QuestExportError


def group_timesteps(timesteps: Sequence[int], groups: int) -> list[int]:
    """t_g = timesteps[ceil(g * N / G)]: the timestep of each group's first step (quest.md 2.5)."""
    n = len(timesteps)
    if not 1 <= groups <= n:
        raise QuestExportError(f"{groups} timestep groups do not fit a {n}-step sampler; use 1..{n} groups")
    return [int(timesteps[-(-g * n // groups)]) for g in range(groups)]


def step_group(i: int, steps: int, groups: int) -> int:
    """g(i) = floor(i * G / N) for sampler step i of N."""
    return i * groups // steps


class GroupContext:
    """Selects the active timestep group; owned by the quantized model, never module-global."""

    def __init__(self, timesteps: Sequence[int]) -> None:
        ts = [int(t) for t in timesteps]
        if not ts or any(a <= b for a, b in zip(ts, ts[1:])):
            raise QuestExportError(f"group timesteps must be strictly decreasing, got {ts}")
        self.timesteps = ts  # t_0 > t_1 > ... > t_{G-1}
        self._ascending = ts[::-1]
        self.group = 0
        self._forced: int | None = None

    @property
    def count(self) -> int:
        return len(self.timesteps)

    def group_of(self, t: float) -> int:
        """g(t) = max{g : t_g >= t}; 0 when t > t_0. Total over all numbers."""
        # number of t_g >= t, minus one, clipped at 0
        n_ge = len(self._ascending) - bisect.bisect_left(self._ascending, t)
        return max(n_ge - 1, 0)

    @contextlib.contextmanager
    def select(self, g: int) -> Iterator[None]:
        """Force group g inside the block (calibration and finetuning loops)."""
        if not 0 <= g < self.count:
            raise QuestExportError(f"group {g} does not exist; this model has {self.count} groups")
        prev_forced, prev = self._forced, self.group
        self._forced, self.group = g, g
        try:
            yield
        finally:
            self._forced, self.group = prev_forced, prev

    def on_timestep(self, t: torch.Tensor | float | int) -> None:
        """Set the group from a UNet call's timestep argument (scalar or (B,) tensor)."""
        if self._forced is not None or self.count == 1:
            return
        values = t.detach().flatten().tolist() if isinstance(t, torch.Tensor) else [t]
        groups = {self.group_of(v) for v in values}
        if len(groups) > 1:
            raise QuestExportError(
                f"one UNet call mixes timesteps of groups {sorted(groups)}; static per-group scales need one "
                "group per call: split the batch by timestep group"
            )
        self.group = groups.pop()

    def to_dict(self) -> dict:
        return {"count": self.count, "timesteps": self.timesteps, "rule": "max{g : t_g >= t}, 0 if t > t_0"}
