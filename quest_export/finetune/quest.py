"""QuEST selective finetuning (quest.md 5): Stage B (time-embedding projections) and Stage C
(sensitive layers plus activation scales), supervised by a frozen copy of the float UNet.

    L = w_glob * MSE(eps_q, eps_fp) + w_loc * sum_l MSE(y_l^q, y_l^fp)

Stage B trains every ``time_emb_proj`` (latent weight and bias; one Adam kept for the stage)
and, per group, that layer's input scale row (a fresh Adam per group), visiting groups in
calibration order with samples drawn once per group. Stage C trains the family's sensitive
layers (one Adam for the stage) and the current group's row of every non-temporal activation
quantizer (a fresh Adam per (epoch, group)), on fresh samples every (epoch, group). Samples of
one optimizer step run as one micro-batch. Checkpoints at group (B) and epoch (C) boundaries
make ``resume=True`` end with the same artifact as an uninterrupted run.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quest_export import dist
from quest_export.calib.collect import CalibrationSet
from quest_export.errors import RecipeError, TrainingDivergedError
from quest_export.log import progress
from quest_export.ptq.steps import StepRunner, graphs_usable
from quest_export.quant.model import QuantizedUNet, QuantMode
from quest_export.quant.modules import QuantModule
from quest_export.quant.primitives import SCALE_MIN
from quest_export.quant.quantizer import ActQuantizer
from quest_export.recipe.config import FinetuneConfig

log = logging.getLogger(__name__)

# Default Stage C weights per model family (quest.md 5.3), as globs over module names.
STAGE_C_LAYERS = {
    "class-cond": ("*.ff.net.0.proj", "*.ff.net.2", "*.attn1.to_q", "*.attn2.to_q", "*.attn1.to_k", "*.attn1.to_v"),
    "text": ("*.ff.net.0.proj", "*.ff.net.2"),
    "uncond": ("*attentions.*.to_q", "*attentions.*.to_k", "*attentions.*.to_v"),
}
CKPT_NAME = "finetune_ckpt.pt"
# On a GPU the losses of this many steps are read back (and checked) at once: one host sync per block of steps,
# not one per step. Every group (B) and (epoch, group) (C) ends with a check, before any checkpoint is written.
CHECK_EVERY = 50


def check_interval(device) -> int:
    """Steps per loss read-back: every step on a CPU (a read costs nothing there), CHECK_EVERY elsewhere."""
    return 1 if str(device) == "cpu" else CHECK_EVERY


@dataclass
class FinetuneReport:
    stage_b: dict = field(default_factory=dict)  # group -> [first loss, last loss]
    stage_c: dict = field(default_factory=dict)  # epoch -> mean loss
    trainable_b: list = field(default_factory=list)
    trainable_c: list = field(default_factory=list)
    seconds: float = 0.0
    stage_seconds: dict = field(default_factory=dict)  # B / C -> wall seconds (this process)
    peak_memory_mib: float = 0.0
    loops: dict = field(default_factory=dict)  # graph | eager -> number of step runners that ran that way
    resumed_from: str | None = None


def temporal_layers(qunet: QuantizedUNet) -> dict[str, QuantModule]:
    return {n: m for n, m in qunet.layers().items() if m.spec.role == "temporal"}


def sensitive_layers(qunet: QuantizedUNet, globs: tuple[str, ...]) -> dict[str, QuantModule]:
    layers = qunet.layers()
    out: dict[str, QuantModule] = {}
    for g in globs:
        hit = {n: m for n, m in layers.items() if fnmatch.fnmatchcase(n, g)}
        if not hit:
            raise RecipeError(f"finetune.c_layers glob '{g}' matched no quantized layer; run `quest-export info` "
                              "for the layer names")  # fmt: skip
        out.update(hit)
    return out


def non_temporal_quantizers(qunet: QuantizedUNet) -> dict[str, ActQuantizer]:
    """Every activation quantizer outside the temporal path (time_embedding.* and time_emb_proj inputs)."""
    return {n: q for n, q in qunet.act_quantizers().items()
            if not (n.startswith("time_embedding.") or ".time_emb_proj." in n)}  # fmt: skip


def _params_of(layers: dict[str, QuantModule]) -> list[torch.nn.Parameter]:
    return [p for m in layers.values() for p in (m.weight, m.bias) if p is not None]


def _forward(unet, x, t, cond):
    return unet(x, t, encoder_hidden_states=cond).sample if cond is not None else unet(x, t).sample


class _Outputs:
    """Forward hooks collecting the outputs of named layers (local supervision)."""

    def __init__(self, unet, names) -> None:
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [unet.get_submodule(n).register_forward_hook(self._make(n)) for n in names]

    def _make(self, name):
        def hook(mod, args, output):
            self.out[name] = output

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class QuestFinetuner:
    """Owns the loop; the student is the quantized UNet, the teacher a frozen float copy."""

    def __init__(self, qunet: QuantizedUNet, teacher: torch.nn.Module, calib: CalibrationSet, cfg: FinetuneConfig, *,
                 family: str, device, ckpt_dir: str | Path | None = None, pooled: bool = False,
                 show_progress: bool = True) -> None:  # fmt: skip
        self.q, self.teacher, self.cfg = qunet, teacher.eval().requires_grad_(False), cfg
        self.calib = calib if str(device) == "cpu" else calib.to(device)  # batches gathered on the device
        self.device, self.pooled, self.show = device, pooled, show_progress
        self.ckpt = Path(ckpt_dir) / CKPT_NAME if ckpt_dir else None
        self.G = qunet.ctx.count
        self.temporal = temporal_layers(qunet)
        globs = cfg.c_layers or STAGE_C_LAYERS.get(family, STAGE_C_LAYERS["class-cond"])
        self.sensitive = sensitive_layers(qunet, tuple(globs)) if cfg.stage_c else {}
        self.c_quantizers = non_temporal_quantizers(qunet)
        self.report = FinetuneReport(trainable_b=sorted(self.temporal), trainable_c=sorted(self.sensitive))
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.pos = {"stage": "B", "index": 0}  # next unit of work: B group index, then C epoch index
        self.opt_b: torch.optim.Optimizer | None = None
        self.opt_c: torch.optim.Optimizer | None = None
        self._first_loss: float | None = None
        self._share = 1.0  # this rank's share of the current batch (quest_export.dist)
        self._first_step = True  # the first step of the run checks that every trainable tensor gets a gradient
        self._pending: list[tuple[torch.Tensor, str]] = []  # (loss, where) of steps not yet read back
        self._losses: list[float] = []  # losses read back since the stage loop last took them
        self._last: float | None = None
        self.check_every = check_interval(device)
        self.graphs = graphs_usable(device, cfg.cuda_graphs)
        # capturable Adam on every GPU run, graphs or not: its update arithmetic differs from the default one in the
        # last bits, so this keeps `cuda_graphs` a pure speed switch (same numbers either way)
        self.capturable = str(device).startswith("cuda") and torch.cuda.is_available()

    # -- helpers ---------------------------------------------------------------------------------
    def _batch(self, rows):
        return self.calib.batch(rows, self.device)

    def _rows(self, g: int) -> torch.Tensor:
        return self.calib.group_rows(g, self.G, pooled=self.pooled)

    def _teacher(self, x, t, cond, hooked: list[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The float model's eps and the outputs of the hooked layers (local supervision)."""
        hf = _Outputs(self.teacher, hooked)
        try:
            with torch.no_grad():
                eps = _forward(self.teacher, x, t, cond)
        finally:
            hf.remove()
        return eps, [hf.out[n].detach() for n in hooked]

    def _inputs(self, rows, *, hooked: list[str], w_loc: float, cache: dict | None = None, key=None) -> list:
        """[x, t, cond, eps_fp, *refs] of one step; ``cache`` keeps the teacher's answers for rows that return.

        In a distributed run these are this rank's rows of the batch; ``self._share`` is their share of it.
        """
        rows, self._share = dist.share(rows)
        x, t, cond, eps = self._batch(rows)
        if w_loc <= 0:  # global only: the recorded float eps is the teacher's answer for exactly these inputs
            return [x, t, cond, eps]
        if cache is not None and key in cache:
            eps, refs = cache[key]
        else:
            eps, refs = self._teacher(x, t, cond, hooked)
            if cache is not None:
                cache[key] = (eps, refs)
        return [x, t, cond, eps, *refs]

    def _body(self, opts, scales, *, hooked: list[str], w_glob: float, w_loc: float):
        """One optimisation step on its inputs; returns the (detached) loss. Capturable as a CUDA graph."""

        def body(x, t, cond, eps_fp, *refs) -> torch.Tensor:
            hq = _Outputs(self.q.unet, hooked) if w_loc > 0 else None
            try:
                eps_q = _forward(self.q.unet, x, t, cond)
            finally:
                if hq is not None:
                    hq.remove()
            loss = w_glob * torch.mean((eps_q - eps_fp) ** 2)
            if w_loc > 0:
                loss = loss + w_loc * sum(torch.mean((hq.out[n] - r) ** 2) for n, r in zip(hooked, refs))
            if dist.data_parallel():
                loss = self._share * loss
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            if dist.data_parallel():  # gradients and the loss summed over ranks: the whole batch's step
                params = [p for o in opts for grp in o.param_groups for p in grp["params"]]
                loss = dist.sum_grads_(params, loss, what="finetuning")
            if self._first_step:  # eager: the first step of a run is never captured
                self._assert_grads(opts)
                self._first_step = False
            for o in opts:
                o.step()
            if scales:  # only the rows being trained can have moved (one launch, not one per row)
                with torch.no_grad():
                    torch._foreach_clamp_min_(scales, SCALE_MIN)
            return loss.detach()

        return body

    def _train_step(self, runner: StepRunner, inputs: list, where: str) -> None:
        """Run one step. Its loss is checked when read back (``_flush``): at once on a CPU, in blocks on a GPU."""
        loss = runner(inputs)
        self._pending.append((loss.detach().clone(), where))  # a replayed graph overwrites its own loss tensor
        if len(self._pending) >= self.check_every:
            self._flush()

    def _flush(self) -> list[float]:
        """Read back the pending losses (one sync), stop at the first bad one; returns every loss read so far."""
        if self._pending:
            vals = torch.stack([v.reshape(()) for v, _ in self._pending]).tolist()
            pending, self._pending = self._pending, []
            for v, (_, where) in zip(vals, pending):
                self._losses.append(self._check(v, where))
            self._last = vals[-1]
        return self._losses

    def _take_losses(self) -> list[float]:
        out = self._flush()
        self._losses = []
        return out

    def _last_loss(self) -> str:
        """The newest loss read back, for the progress bar."""
        return "…" if self._last is None else f"{self._last:.4g}"

    def _check(self, v: float, where: str) -> float:
        if self._first_loss is None:
            self._first_loss = v
        if not math.isfinite(v) or v > self.cfg.diverge_factor * max(self._first_loss, 1e-12):
            kept = f"; the last good checkpoint is {self.ckpt}" if self.ckpt and self.ckpt.is_file() else ""
            raise TrainingDivergedError(f"finetuning loss became {v:.4g} at {where} (first loss {self._first_loss:.4g})"
                                        f"{kept}; lower the learning rates (finetune.*_lr_*) and re-run with --resume")  # fmt: skip
        return v

    @staticmethod
    def _assert_grads(opts: list[torch.optim.Optimizer]) -> None:
        """Every parameter in every optimizer gets a non-zero gradient on its first step (quest.md 5.1)."""
        for opt in opts:
            for grp in opt.param_groups:
                for p in grp["params"]:
                    if p.grad is None or not bool(torch.any(p.grad != 0)):
                        raise RuntimeError(f"a trainable tensor of shape {tuple(p.shape)} received no gradient")

    def _set_trainable(self, params) -> None:
        for p in self.q.unet.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)

    # -- checkpoints -------------------------------------------------------------------------------
    def _save(self) -> None:
        if self.ckpt is None or not dist.world().main:  # rank 0 checkpoints for every rank
            return
        state = {"model": self.q.unet.state_dict(), "pos": dict(self.pos), "gen": self.gen.get_state(),
                 "opt_b": self.opt_b.state_dict() if self.opt_b else None,
                 "opt_c": self.opt_c.state_dict() if self.opt_c else None, "first_loss": self._first_loss,
                 "report": self.report.__dict__}  # fmt: skip
        from quest_export_runtime.outputs import atomic_file

        with atomic_file(self.ckpt) as tmp:
            torch.save(state, tmp)

    def _load(self) -> bool:
        if self.ckpt is None or not self.ckpt.is_file():
            return False
        state = torch.load(self.ckpt, map_location=self.device, weights_only=True)
        for name, wq in self.q.weight_quantizers().items():  # trainable layers are unfrozen (w_int empty)
            t = state["model"].get(f"{name}.w_int")
            if t is not None and t.numel() != wq.w_int.numel():
                wq.w_int = torch.zeros_like(t)
        self.q.unet.load_state_dict(state["model"])
        self.pos, self._first_loss = state["pos"], state["first_loss"]
        self.gen.set_state(state["gen"])
        self._pending_opt = (state["opt_b"], state["opt_c"])
        for k, v in state["report"].items():
            setattr(self.report, k, v)
        self.report.resumed_from = str(self.ckpt)
        return True

    # -- stages ------------------------------------------------------------------------------------
    def run(self, *, resume: bool = False) -> FinetuneReport:
        t0 = time.time()
        if self.device != "cpu" and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._pending_opt = (None, None)
        if resume:
            self._load()
        train_layers = {**self.temporal, **self.sensitive}
        for m in train_layers.values():
            m.unfreeze_weights()  # the latent weight trains through floor_ste with frozen AdaRound bits
        with torch.enable_grad(), self.q.mode(QuantMode.FULL):
            self.teacher.to(self.device)
            if self.cfg.stage_b and self.temporal and self.pos["stage"] == "B":
                t1 = time.time()
                self._stage_b()
                self.report.stage_seconds["B"] = round(time.time() - t1, 1)
            if self.pos["stage"] == "B":
                self.pos = {"stage": "C", "index": 0}
                self._save()
            if self.cfg.stage_c and self.pos["stage"] == "C":
                t1 = time.time()
                self._stage_c()
                self.report.stage_seconds["C"] = round(time.time() - t1, 1)
        for m in train_layers.values():
            m.freeze_weights()  # W_int computed once, from the finetuned latent weights
        for p in self.q.unet.parameters():
            p.requires_grad_(False)
        self.report.seconds = round(time.time() - t0, 1) + (self.report.seconds if resume else 0.0)
        self.report.peak_memory_mib = _peak_memory_mib(self.device)
        return self.report

    def _stage_b(self) -> None:
        cfg = self.cfg
        names = sorted(self.temporal)
        w_glob = float(len(names)) if cfg.b_w_glob is None else cfg.b_w_glob
        weights = _params_of(self.temporal)
        self.opt_b = torch.optim.Adam(weights, lr=cfg.b_lr_weight, capturable=self.capturable)
        if self._pending_opt[0] is not None:
            self.opt_b.load_state_dict(self._pending_opt[0])
        steps_per_epoch = -(-cfg.b_samples // cfg.b_batch)
        self._first_step = True
        bar = progress(total=(self.G - self.pos["index"]) * cfg.b_epochs * steps_per_epoch, description="stage B",
                       enabled=self.show)  # fmt: skip
        try:
            for g in range(self.pos["index"], self.G):
                rows = self.calib.draw(self._rows(g), cfg.b_samples, self.gen)  # drawn once per group
                scales = [self.temporal[n].input_quantizer.scales[g] for n in names
                          if self.temporal[n].input_quantizer is not None]  # fmt: skip
                opt_s = torch.optim.Adam(scales, lr=cfg.b_lr_scale, capturable=self.capturable)  # fresh for every group
                self._set_trainable(weights + scales)
                teacher: dict = {}  # the group's samples come back every epoch: the teacher runs once per batch
                with self.q.ctx.select(g):
                    runner = StepRunner(self._body([self.opt_b, opt_s], scales, hooked=names, w_glob=w_glob,
                                                   w_loc=cfg.b_w_loc), graph=self.graphs)  # fmt: skip
                    for epoch in range(cfg.b_epochs):
                        for k in range(0, cfg.b_samples, cfg.b_batch):
                            inputs = self._inputs(rows[k : k + cfg.b_batch], hooked=names, w_loc=cfg.b_w_loc,
                                                  cache=teacher, key=k)  # fmt: skip
                            self._train_step(runner, inputs, f"stage B, group {g}, epoch {epoch}")
                            bar.advance(postfix=f"g{g} loss {self._last_loss()}")
                    self._note_loop(runner)
                    del runner
                losses = self._take_losses()
                self.report.stage_b[g] = [losses[0], sum(losses[-steps_per_epoch:]) / steps_per_epoch]
                self.pos = {"stage": "B", "index": g + 1}
                self._save()
        finally:
            bar.close()

    def _stage_c(self) -> None:
        cfg = self.cfg
        weights = _params_of(self.sensitive)
        hooked = sorted(n for n in self.sensitive if ".ff.net." in n) or sorted(self.sensitive)
        self.opt_c = torch.optim.Adam(weights, lr=cfg.c_lr_weight, capturable=self.capturable) if weights else None
        if self.opt_c is not None and self._pending_opt[1] is not None:
            self.opt_c.load_state_dict(self._pending_opt[1])
        quantizers = list(self.c_quantizers.values())
        steps = -(-cfg.c_samples // cfg.c_batch)
        bar = progress(total=(cfg.c_epochs - self.pos["index"]) * self.G * steps, description="stage C",
                       enabled=self.show)  # fmt: skip
        # one scale optimizer and one step runner per group, kept over the epochs; the optimizer's state is zeroed
        # at every (epoch, group), which is exactly a fresh Adam, so a captured graph stays valid
        per_group: dict[int, tuple] = {}
        self._first_step = True
        try:
            for epoch in range(self.pos["index"], cfg.c_epochs):
                losses = []
                for g in range(self.G):
                    rows = self.calib.draw(self._rows(g), cfg.c_samples, self.gen)  # fresh every (epoch, group)
                    scales = [q.scales[g] for q in quantizers]
                    if g not in per_group:
                        opt_s = torch.optim.Adam(scales, lr=cfg.c_lr_scale, capturable=self.capturable)
                        opts = [o for o in (self.opt_c, opt_s) if o is not None]
                        body = self._body(opts, scales, hooked=hooked, w_glob=cfg.c_w_glob, w_loc=cfg.c_w_loc)
                        per_group[g] = (opt_s, StepRunner(body, graph=self.graphs))
                    opt_s, runner = per_group[g]
                    _reset_adam_(opt_s)  # fresh every (epoch, group)
                    self._set_trainable(weights + scales)
                    with self.q.ctx.select(g):
                        for k in range(0, cfg.c_samples, cfg.c_batch):
                            inputs = self._inputs(rows[k : k + cfg.c_batch], hooked=hooked, w_loc=cfg.c_w_loc)
                            self._train_step(runner, inputs, f"stage C, epoch {epoch}, group {g}")
                            bar.advance(postfix=f"e{epoch} g{g} loss {self._last_loss()}")
                    losses += self._take_losses()  # checked before the group's scale optimizer is reset
                self.report.stage_c[epoch] = sum(losses) / len(losses)
                self.pos = {"stage": "C", "index": epoch + 1}
                self._save()
        finally:
            bar.close()
        for _, runner in per_group.values():
            self._note_loop(runner)

    def _note_loop(self, runner: StepRunner) -> None:
        self.report.loops[runner.mode] = self.report.loops.get(runner.mode, 0) + 1


def _reset_adam_(opt: torch.optim.Optimizer) -> None:
    """Zero an Adam's moments and step count in place: the same as a fresh optimizer, same tensors."""
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                v.zero_()


def _peak_memory_mib(device) -> float:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def finetune_(qunet: QuantizedUNet, teacher: torch.nn.Module, calib: CalibrationSet, cfg: FinetuneConfig, *,
              family: str, device, ckpt_dir: str | Path | None = None, resume: bool = False, pooled: bool = False,
              show_progress: bool = True) -> FinetuneReport:  # fmt: skip
    """Run Stage B and Stage C on ``qunet`` in place. See ``QuestFinetuner``."""
    return QuestFinetuner(qunet, teacher, calib, cfg, family=family, device=device, ckpt_dir=ckpt_dir, pooled=pooled,
                          show_progress=show_progress).run(resume=resume)  # fmt: skip
