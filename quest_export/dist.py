"""torch.distributed for calibration and block reconstruction / finetuning across processes (issue 19).

A run launched by ``torchrun`` (or ``quest-export ... --nproc N``, which launches the same through
torch.distributed's own launcher) finds RANK / WORLD_SIZE / LOCAL_RANK in its environment, joins one process
group (NCCL on GPUs, gloo on CPUs; a gloo group beside NCCL carries Python objects) and splits the work:

- calibration: rank r samples trajectories r, r + N, ...; rank 0 gathers the rows, puts them in the
  single-process order and writes the artifact;
- Stage A (AdaRound, Q-Diffusion's scale reconstruction), Stage B and Stage C: data parallel. Every rank
  draws the same global batch from the same seeded generator, computes the loss of its share of the rows
  (rows r, r + N, ... of the batch), weighted by its share, and the gradients (with the loss) are summed
  over ranks before the optimizer step: the same update as the one-process step up to the order of the
  floating-point sum. LES (DMQ Stage A0) runs on every rank whole (its timestep weights follow every
  row's loss); activation initialisation and input capture are cheap and run on every rank too.
- only rank 0 writes artifacts and checkpoints (a folder every rank can read: one host, or a shared file
  system); ``--resume`` continues from rank 0's checkpoint on every rank.

With no launcher in the environment nothing here runs: the one-process path is untouched. A peer that dies
makes the next collective fail on the others: they stop with one line (``DistributedError``). CUDA graph
replay of the optimisation steps is off in a distributed run (capturing NCCL collectives is not tested).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from quest_export.errors import QuestExportError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
TIMEOUT_ENV = "QUEST_EXPORT_DIST_TIMEOUT"  # seconds a collective waits for a peer (default 600)


class DistributedError(QuestExportError):
    """A peer process of a distributed run stopped or could not be reached."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    active: bool = False  # a process group is up (also for a launcher run of one process)

    @property
    def main(self) -> bool:
        return self.rank == 0


_WORLD = World()
_OBJ_GROUP = None  # a gloo group for Python objects (NCCL moves only CUDA tensors)


def world() -> World:
    return _WORLD


def launched() -> bool:
    """True when a torch.distributed launcher started this process."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init(device: str) -> World:
    """Join the launcher's process group (once). Returns the world; a no-op without a launcher."""
    global _WORLD, _OBJ_GROUP
    if _WORLD.active or not launched():
        return _WORLD
    import torch
    import torch.distributed as dist

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    cuda = str(device).startswith("cuda")
    if cuda:
        if local >= torch.cuda.device_count():
            raise DistributedError(f"rank {rank}: LOCAL_RANK {local} but this host has {torch.cuda.device_count()} "
                                   "GPUs; launch at most one process per GPU (--nproc-per-node)")  # fmt: skip
        torch.cuda.set_device(local)
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "600")))
    try:
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
        _OBJ_GROUP = dist.new_group(backend="gloo") if cuda else dist.group.WORLD
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"rank {rank}: could not join the process group ({_first_line(e)}); check "
                               "MASTER_ADDR/MASTER_PORT or launch with torchrun / --nproc") from None  # fmt: skip
    _WORLD = World(rank=rank, size=size, local_rank=local, active=True)
    if rank != 0:
        logging.getLogger("quest_export").setLevel(logging.WARNING)  # one rank speaks
    return _WORLD


def finish() -> None:
    """Leave the process group (every rank, after a barrier)."""
    global _WORLD, _OBJ_GROUP
    if not _WORLD.active:
        return
    import torch.distributed as dist

    barrier("the end of the distributed stages")
    dist.destroy_process_group()
    _WORLD, _OBJ_GROUP = World(rank=_WORLD.rank, size=_WORLD.size, local_rank=_WORLD.local_rank), None


def _first_line(e: BaseException) -> str:
    """The gist of a backend error: its first line, without the source location and the boilerplate advice."""
    import re

    s = str(e).strip().splitlines()
    line = re.sub(r"\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", s[0]) if s else type(e).__name__
    return line.split(". This is typically")[0][:160]


def _collective(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:  # DistBackendError and gloo's connection errors are RuntimeErrors
        raise DistributedError(f"rank {_WORLD.rank}: a peer process stopped during {what} ({_first_line(e)}); "
                               "nothing was written by this run's unfinished stage; re-run the same command with "
                               "--resume to continue from the last checkpoint") from None  # fmt: skip


def barrier(what: str) -> None:
    if _WORLD.active:
        import torch.distributed as dist

        _collective(what, dist.barrier, group=_OBJ_GROUP)


def broadcast_object(obj, what: str):
    """Rank 0's ``obj`` on every rank."""
    if not _WORLD.active:
        return obj
    import torch.distributed as dist

    box = [obj]
    _collective(what, dist.broadcast_object_list, box, src=0, group=_OBJ_GROUP)
    return box[0]


def gather_object(obj, what: str) -> list | None:
    """Every rank's ``obj`` on rank 0 (in rank order); None elsewhere."""
    if not _WORLD.active:
        return [obj]
    import torch.distributed as dist

    out = [None] * _WORLD.size if _WORLD.main else None
    _collective(what, dist.gather_object, obj, out, dst=0, group=_OBJ_GROUP)
    return out


def data_parallel() -> bool:
    """True when training steps split their batches over more than one rank."""
    return _WORLD.active and _WORLD.size > 1


def share(idx: torch.Tensor) -> tuple[torch.Tensor, float]:
    """This rank's rows of a global batch and their share of it (rows r, r + N, ...)."""
    if not data_parallel():
        return idx, 1.0
    if idx.numel() < _WORLD.size:
        raise DistributedError(f"a batch of {idx.numel()} rows cannot be split over {_WORLD.size} processes; use "
                               "fewer processes or a larger batch (ptq.adaround_batch, finetune.b_batch, c_batch)")  # fmt: skip
    local = idx[_WORLD.rank :: _WORLD.size]
    return local, local.numel() / idx.numel()


def sum_grads_(params: list[torch.Tensor], loss: torch.Tensor | None = None, *, what: str) -> torch.Tensor | None:
    """Sum the gradients of ``params`` (and ``loss``) over ranks in one collective; returns the summed loss."""
    if not data_parallel():
        return loss
    import torch
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads] + ([loss.detach().reshape(1)] if loss is not None else []))
    _collective(what, dist.all_reduce, flat)
    k = 0
    for p, g in zip(params, grads):
        n = g.numel()
        if p.grad is None:
            p.grad = flat[k : k + n].view_as(p).clone()
        else:
            p.grad.copy_(flat[k : k + n].view_as(p))
        k += n
    return flat[k].reshape(()) if loss is not None else None


def broadcast_module_(module: torch.nn.Module, what: str) -> None:
    """Rank 0's parameters and buffers on every rank (stage boundaries: ranks cannot drift apart)."""
    if not data_parallel():
        return
    import torch
    import torch.distributed as dist

    for t in list(module.state_dict().values()):
        if torch.is_tensor(t) and t.numel():
            group = _OBJ_GROUP if t.device.type == "cpu" else None  # CPU buffers of a GPU run go through gloo
            _collective(what, dist.broadcast, t, src=0, group=group)


def launch(nproc: int, argv: list[str], *, device: str = "cpu") -> None:
    """Run ``quest-export argv`` in ``nproc`` processes on this host through torch.distributed's launcher
    (what ``torchrun --standalone --nproc-per-node nproc`` does). Raises DistributedError if a rank fails."""
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise DistributedError(f"--nproc {nproc}: give at least 1 process")
    if launched():
        raise DistributedError("--nproc inside a torchrun launch: use one of the two, not both")
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                       rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2)  # fmt: skip
    for name in list(logging.root.manager.loggerDict):  # the ranks and the line below say what went wrong
        if name.startswith("torch.distributed.elastic") and not logging.getLogger("quest_export").isEnabledFor(
            logging.DEBUG
        ):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        elastic_launch(cfg, entrypoint=sys.executable)("-m", "cli.main", *argv)
    except ChildFailedError as e:
        rank, fail = e.get_first_failure()
        code = fail.exitcode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        raise DistributedError(f"rank {rank} of {nproc} {how}; every rank was stopped and no unfinished artifact "
                               "was kept: re-run the same command with --resume to continue from the last "
                               "checkpoint") from None  # fmt: skip


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without its ``--nproc N`` / ``--nproc=N`` (what each launched rank runs)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out
