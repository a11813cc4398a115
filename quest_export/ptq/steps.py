"""Loops of many small identical optimisation steps, replayed as one CUDA graph on a GPU.

Block reconstruction runs thousands of tiny steps per unit (quest.md 4.2: 20,000 AdaRound
iterations per unit in the `paper` preset). On a GPU one step of a small block is a few hundred
kernels of a few microseconds each, so eager PyTorch spends its time launching them. Capturing
one step (forward, backward, optimizer update) as a CUDA graph and replaying it removes that
overhead without changing the arithmetic: the step reads its batch from static device buffers
that ``prepare(it)`` fills before every replay, and the optimizer must be created with
``capturable=True``.

A step that cannot be captured (an op that synchronises with the host, say) falls back to the
eager loop with a warning. The callers use capturable Adam on every GPU run, graphs or not, so
both loops compute the same numbers (tests/ptq/test_cuda_graphs.py, `make test-gpu`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)
WARMUP = 3  # eager steps on a side stream before capture (lazy optimizer state, cuDNN autotuning)


def graphs_usable(device, enabled: bool) -> bool:
    """True when steps on ``device`` may be replayed as CUDA graphs (not in a distributed run: quest_export.dist)."""
    from quest_export import dist

    return bool(enabled) and str(device).startswith("cuda") and torch.cuda.is_available() and not dist.data_parallel()


def run_steps(step: Callable[[], None], prepare: Callable[[int], None], iters: int, *, graph: bool) -> str:
    """Run ``prepare(it); step()`` for it in range(iters). Returns 'graph' or 'eager' (what ran the bulk).

    ``step`` reads static buffers that ``prepare`` fills, so it takes no inputs of its own.
    """
    runner = StepRunner(step, graph=graph)
    for it in range(iters):
        prepare(it)
        runner([])
    return runner.mode


def _same_shapes(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        (x is None and y is None) or (x is not None and y is not None and x.shape == y.shape and x.dtype == y.dtype)
        for x, y in zip(a, b)
    )


class StepRunner:
    """One optimisation step ``body(*inputs) -> loss`` replayed as a CUDA graph after a few eager calls.

    For loops whose inputs change every step (finetuning on calibration batches): each call copies
    its inputs into static buffers, and once ``WARMUP`` eager calls have run on a side stream the
    body is captured; later calls of the same shapes replay it. Inputs of another shape (a short
    last batch) run eagerly. ``mode`` is 'graph' once a capture succeeded, else 'eager'.
    """

    def __init__(self, body: Callable[..., torch.Tensor | None], *, graph: bool) -> None:
        self.body, self.graph = body, graph
        self.static: list | None = None
        self.loss: torch.Tensor | None = None
        self._g: torch.cuda.CUDAGraph | None = None
        self._eager = 0
        self.mode = "eager"  # 'graph' once a capture succeeded

    def __call__(self, inputs: list) -> torch.Tensor | None:
        if not self.graph:
            return self.body(*inputs)
        if self.static is None:
            self.static = [None if x is None else x.detach().clone() for x in inputs]
        if not _same_shapes(inputs, self.static):
            return self.body(*inputs)
        for dst, src in zip(self.static, inputs):
            if dst is not None:
                dst.copy_(src)
        if self._g is not None:
            self._g.replay()
            return self.loss
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss = self.body(*self.static)
        torch.cuda.current_stream().wait_stream(side)
        self._eager += 1
        if self._eager >= WARMUP:
            g = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(g):
                    self.loss = self.body(*self.static)  # recorded, not executed
                self._g, self.mode = g, "graph"
            except Exception as e:  # noqa: BLE001 - any capture refusal means: run eagerly
                log.warning("CUDA graph capture failed (%s); running these steps eagerly",
                            str(e).splitlines()[0][:200])  # fmt: skip
                torch.cuda.synchronize()
                self.graph = False
        return loss
