"""Calibration data: the exact inputs the float UNet receives along its own sampling trajectories.

The float model runs the evaluation sampler (same scheduler, steps, eta, guidance); a forward
pre-hook on the UNet records (x_t, t, conditioning row) of every call at every step, both CFG
halves, and a forward hook records the float eps (the teacher's answer). Classes are drawn
uniformly at random per trajectory (seeded); later draws from the set are seeded random
draws over trajectories, never "the first n" (quest.md 3.1, 3.3).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from quest_export_runtime.manifest import atomic_dir, read_manifest, verify_files, write_manifest

from quest_export.errors import ArtifactError
from quest_export.log import progress
from quest_export.models.sampling import SamplerSpec, make_scheduler, sample

log = logging.getLogger(__name__)
DATA_FILE, SPEC_FILE = "calib.safetensors", "spec.json"


@dataclass
class CalibrationSet:
    """Recorded UNet inputs. Row r: x[r] (C, H, W), t[r], cond_index[r] (-1 = unconditional UNet)."""

    x: torch.Tensor  # (S, C, H, W) float32
    t: torch.Tensor  # (S,) int64
    cond_index: torch.Tensor  # (S,) int64: row of cond_table, or -1
    step: torch.Tensor  # (S,) int64: sampler step i (0 = noisiest)
    traj: torch.Tensor  # (S,) int64: trajectory id
    eps: torch.Tensor  # (S, C, H, W) float32: the float UNet's output on this row
    cond_table: torch.Tensor | None  # (R, L, D)
    spec: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return int(self.spec["sampler"]["steps"])

    @property
    def timesteps(self) -> list[int]:
        """The sampler's timesteps, step 0 first."""
        return [int(v) for v in self.spec["timesteps"]]

    def rows_at_steps(self, steps: list[int]) -> torch.Tensor:
        mask = torch.zeros_like(self.step, dtype=torch.bool)
        for i in steps:
            mask |= self.step == i
        return mask.nonzero().flatten()

    def group_rows(self, g: int, groups: int, *, pooled: bool = False) -> torch.Tensor:
        """Rows that calibrate group g: its first step i_g = ceil(g N / G), or every step of g."""
        n = self.steps
        first = -(-g * n // groups)
        if not pooled:
            return self.rows_at_steps([first])
        return self.rows_at_steps([i for i in range(n) if i * groups // n == g])

    def draw(self, rows: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
        """A seeded random draw of n rows (with replacement only if n exceeds the pool)."""
        if n <= rows.numel():
            return rows[torch.randperm(rows.numel(), generator=generator)[:n]]
        return rows[torch.randint(0, rows.numel(), (n,), generator=generator)]

    def to(self, device: str | torch.device) -> CalibrationSet:
        """A copy whose model inputs and targets live on ``device`` (row bookkeeping stays on the CPU).

        Finetuning on a GPU gathers every batch from it without a blocking host-to-device copy per step.
        """
        move = {k: getattr(self, k).to(device) for k in ("x", "t", "cond_index", "eps")}
        table = None if self.cond_table is None else self.cond_table.to(device)
        return dataclasses.replace(self, **move, cond_table=table)

    def batch(self, idx: torch.Tensor, device: str | torch.device = "cpu"):
        """(x, t, cond or None, eps) for rows idx, on ``device``."""
        if self.x.device.type != "cpu":
            idx = idx.to(self.x.device, non_blocking=True)
        cond = None if self.cond_table is None else self.cond_table[self.cond_index[idx]].to(device)
        return self.x[idx].to(device), self.t[idx].to(device), cond, self.eps[idx].to(device)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, out: str | Path, *, fingerprint: str | None = None) -> Path:
        from safetensors.torch import save_file

        tensors = {"x": self.x, "t": self.t, "cond_index": self.cond_index, "step": self.step, "traj": self.traj,
                   "eps": self.eps}  # fmt: skip
        if self.cond_table is not None:
            tensors["cond_table"] = self.cond_table
        with atomic_dir(out) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp / DATA_FILE))
            (tmp / SPEC_FILE).write_text(json.dumps(self.spec, indent=2, sort_keys=True) + "\n")
            write_manifest(tmp, stage="calibrate", recipe_fingerprint=fingerprint, config=self.spec)
        return Path(out)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationSet:
        """The set of a calibration folder, its tensors memory-mapped (pages read when rows are drawn)."""
        path = Path(path)
        verify_files(path, read_manifest(path, stage="calibrate"))
        d = mmap_safetensors(path / DATA_FILE)
        spec = json.loads((path / SPEC_FILE).read_text())
        return cls(x=d["x"], t=d["t"], cond_index=d["cond_index"], step=d["step"], traj=d["traj"], eps=d["eps"],
                   cond_table=d.get("cond_table"), spec=spec)  # fmt: skip


_NP_DTYPES = {"F32": "float32", "F64": "float64", "F16": "float16", "I64": "int64", "I32": "int32", "I8": "int8",
              "U8": "uint8", "BOOL": "bool"}  # fmt: skip


def mmap_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as copy-on-write memory maps: the calibration set never has to fit in host
    RAM (issue 15); rows are read from disk when a batch gathers them. Other dtypes (bf16) are read normally."""
    import struct

    import numpy as np

    path = Path(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if info["dtype"] not in _NP_DTYPES or end == start:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                out[name] = f.get_tensor(name)
            continue
        arr = np.memmap(path, dtype=_NP_DTYPES[info["dtype"]], mode="c", offset=8 + n + start, shape=shape)
        out[name] = torch.from_numpy(arr)
    return out


def collect(model, spec: SamplerSpec, *, trajectories: int, seed: int = 0, device: str | torch.device = "cpu",
            batch: int | None = None, show_progress: bool = True,
            shard: tuple[int, int] = (0, 1)) -> CalibrationSet:  # fmt: skip
    """Run the float model's sampler and record every UNet input and output.

    Args:
        model: a ``quest_export.models.LoadedModel``.
        spec: the evaluation sampler (type, N, eta, guidance).
        trajectories: number of sampling trajectories (each CFG call adds an unconditional copy).
        batch: trajectories per sampler run (None = all of this shard's at once).
        shard: (rank, ranks): record trajectories rank, rank + ranks, ... only (a distributed run; their noise
            and classes are those of the whole set). ``merge_shards`` puts the shards in the one-process order.
    """
    unet, cond = model.unet, model.conditioning
    gen = torch.Generator().manual_seed(seed)
    c, h, w = model.sample_shape
    noise = torch.randn(trajectories, c, h, w, generator=gen)  # (T, C, H, W)
    labels = None
    if cond is not None:
        choices = torch.tensor(cond.cond_rows)
        labels = choices[torch.randint(0, len(choices), (trajectories,), generator=gen)]  # (T,)
    guided = cond is not None and cond.uncond_index is not None and spec.guidance_scale != 1.0
    rec: dict[str, list[torch.Tensor]] = {k: [] for k in ("x", "t", "cond_index", "step", "traj", "eps")}
    state = {"step": 0, "rows": None, "traj": None}

    def pre_hook(module, args, kwargs):
        x = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        rec["x"].append(x.detach().float().cpu())
        rec["t"].append(torch.as_tensor(t).expand(x.shape[0]).long().cpu())
        rec["cond_index"].append(state["rows"])
        rec["step"].append(torch.full((x.shape[0],), state["step"], dtype=torch.long))
        rec["traj"].append(state["traj"])

    def hook(module, args, kwargs, output):
        rec["eps"].append(output.sample.detach().float().cpu())

    handles = [unet.register_forward_pre_hook(pre_hook, with_kwargs=True),
               unet.register_forward_hook(hook, with_kwargs=True)]  # fmt: skip
    mine = torch.arange(shard[0], trajectories, shard[1])
    bs = batch or max(1, mine.numel())
    bar = progress(total=spec.steps * -(-mine.numel() // bs), description="calibrate", enabled=show_progress)
    try:
        for start in range(0, mine.numel(), bs):
            sl = traj = mine[start : start + bs]
            if cond is None:
                state["rows"] = torch.full((len(traj),), -1, dtype=torch.long)
            elif guided:
                state["rows"] = torch.cat([torch.full((len(traj),), cond.uncond_index), labels[sl]])
            else:
                state["rows"] = labels[sl].clone()
            state["traj"] = traj.repeat(2) if guided else traj

            def on_step(i, t):
                state["step"] = i
                bar.advance()

            sample(unet, model.info.scheduler_config, noise=noise[sl].to(device), spec=spec,
                   cond=None if cond is None else cond.rows(labels[sl]).to(device),
                   uncond=None if cond is None or cond.uncond is None else cond.uncond.to(device),
                   variance_seed=seed + int(traj[0]), on_step=on_step)  # fmt: skip
    finally:
        for hd in handles:
            hd.remove()
        bar.close()
    sched = make_scheduler(model.info.scheduler_config, spec.sampler)
    sched.set_timesteps(spec.steps)
    hist = {}
    if labels is not None:
        for lab in labels.tolist():
            hist[cond.labels[lab]] = hist.get(cond.labels[lab], 0) + 1
    out = CalibrationSet(
        x=_cat(rec["x"], (0, c, h, w)), t=_cat(rec["t"], (0,)), cond_index=_cat(rec["cond_index"], (0,)),
        step=_cat(rec["step"], (0,)), traj=_cat(rec["traj"], (0,)), eps=_cat(rec["eps"], (0, c, h, w)),
        cond_table=None if cond is None else cond.table.clone(),
        spec={"model": model.name, "model_hash": model.source_hash,
              "sampler": {"sampler": spec.sampler, "steps": spec.steps, "eta": spec.eta,
                          "guidance_scale": spec.guidance_scale},
              "timesteps": [int(v) for v in sched.timesteps.tolist()], "trajectories": trajectories, "seed": seed,
              "guided": guided, "uncond_index": None if cond is None else cond.uncond_index,
              "class_histogram": hist, "conditioning": None if cond is None else cond.source},
    )  # fmt: skip
    if out.x.shape[0] != out.eps.shape[0]:
        raise ArtifactError("calibration recorded inputs and outputs of different sizes; a UNet call failed midway")
    return out


def _cat(parts: list[torch.Tensor], empty: tuple[int, ...]) -> torch.Tensor:
    """Concatenate recorded rows; a shard with no trajectory records none."""
    if parts:
        return torch.cat(parts)
    return torch.zeros(empty, dtype=torch.float32 if len(empty) > 1 else torch.long)


def merge_shards(parts: list[CalibrationSet]) -> CalibrationSet:
    """The shards of a distributed calibration (``collect(shard=...)``) as one set in the one-process order.

    The one-process run records, step by step, the unconditional copies of every trajectory, then the
    conditional ones, each in trajectory order; the rows are sorted by that key, so every later seeded draw
    picks the same rows whatever the number of ranks.
    """
    first = parts[0]
    cat = {k: torch.cat([getattr(p, k) for p in parts]) for k in ("x", "t", "cond_index", "step", "traj", "eps")}
    n_traj = int(first.spec["trajectories"])
    uncond = first.spec.get("uncond_index")
    half = torch.ones_like(cat["step"])
    if first.spec.get("guided") and uncond is not None:
        half = (cat["cond_index"] != uncond).long()  # unconditional copies (0) before conditional rows (1)
    key = (cat["step"] * 2 + half) * n_traj + cat["traj"]
    order = torch.argsort(key, stable=True)
    return dataclasses.replace(first, **{k: v[order] for k, v in cat.items()})
