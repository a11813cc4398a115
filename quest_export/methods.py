"""Stage runners of the registered methods (declarations: quest_export/recipe/methods.py).

    runner = load_runner(get_method(recipe.quant.method))
    qunet, report = runner.quantize(job)

``StagedRunner`` runs the stages a declaration switches on, in quest.md 1.3's order:
A0 LES (``les``), A1 build, A2 weights (``adaround``), A3 activations (``accumulate_act``,
``act_recon``), A4 PTS (``pts``), then Stages B and C (``finetune``). A method whose stages do
not fit this order names its own runner class in its declaration.
"""

from __future__ import annotations

import copy
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path

from quest_export import dist
from quest_export.recipe.config import Recipe, to_jsonable
from quest_export.recipe.methods import Method

log = logging.getLogger(__name__)


@dataclass
class QuantizeJob:
    """What a runner needs: the float model, the calibration set, the recipe and where to checkpoint."""

    model: object  # quest_export.models.LoadedModel; its UNet is quantized in place
    calib: object  # quest_export.calib.collect.CalibrationSet
    recipe: Recipe
    device: str
    work: Path  # scratch folder of this run (Stage A artifact, finetune checkpoints); removed on success
    resume: bool = False
    show_progress: bool = True
    # filled by the runner: the layer_stats.json document (quest_export.quant.layer_stats) the artifact keeps
    layer_stats: dict | None = None

    @property
    def model_ref(self) -> dict:
        m = self.recipe.model
        return {"name": m.name, "cond": m.cond, "prompts": m.prompts, "hash": self.model.source_hash}


class StagedRunner:
    """Runs the stages that ``method`` declares (see the module docstring)."""

    def __init__(self, method: Method) -> None:
        self.method = method

    def quantize(self, job: QuantizeJob):
        """Quantize ``job.model.unet`` in place. Returns (QuantizedUNet, report dict)."""
        from quest_export.quant.artifact import load_quantized, save_quantized

        rec, m = job.recipe, self.method
        stage_a_dir = job.work / "stage_a"
        teacher = copy.deepcopy(job.model.unet) if m.finetune else None  # frozen float teacher, before any change
        report: dict = {}
        if job.resume and (stage_a_dir / "manifest.json").is_file():
            log.info("resuming: stage A from %s", stage_a_dir)
            art = load_quantized(stage_a_dir, device=job.device, model=job.model)
            qunet = art.qunet
            report["stage_a"] = art.meta.get("report", {}).get("stage_a", {})
        else:
            from quest_export.ptq.stage_a import run_stage_a

            qunet, rep = run_stage_a(job.model, job.calib, rec.quant, rec.ptq, groups=rec.quant.timestep_groups,
                                     device=job.device, seed=rec.calib.seed, pooled=rec.calib.group_pooled,
                                     show_progress=job.show_progress, dmq=rec.dmq)  # fmt: skip
            report["stage_a"] = {"eps_mse": rep.eps_mse, "adaround": rep.adaround, "units": rep.units,
                                 "seconds": rep.seconds, **({"les": rep.les} if rep.les else {}),
                                 **({"pts": rep.pts} if rep.pts else {})}  # fmt: skip
            dist.broadcast_module_(qunet.unet, "the end of stage A")  # every rank trains from rank 0's model
            if m.finetune and dist.world().main:  # the resume point of a finetuning method
                save_quantized(qunet, stage_a_dir, recipe_fingerprint=rec.fingerprint(), quant=rec.quant,
                               model_ref=job.model_ref, sampler=to_jsonable(rec.sampler), stage="stage-a",
                               extra={"report": report})  # fmt: skip
        from quest_export.quant.layer_stats import ROWS_PER_GROUP, layer_snapshot, stats_document

        rows = min(ROWS_PER_GROUP, rec.ptq.forward_chunk)  # one UNet call per group: bounded like every other call
        snapshots = {
            "stage_a": layer_snapshot(qunet, job.calib, device=job.device, rows_per_group=rows)
        }  # before finetuning
        if m.finetune and rec.finetune is not None:
            from quest_export.finetune import finetune_
            from quest_export.ptq.stage_a import eps_mse_per_group

            fr = finetune_(qunet, teacher, job.calib, rec.finetune, family=rec.model.family, device=job.device,
                           ckpt_dir=job.work, resume=job.resume, pooled=rec.calib.group_pooled,
                           show_progress=job.show_progress)  # fmt: skip
            dist.broadcast_module_(qunet.unet, "the end of finetuning")
            report["finetune"] = to_jsonable(fr.__dict__)
            report["finetune"]["eps_mse"] = eps_mse_per_group(qunet, job.calib, device=job.device,
                                                              chunk=rec.ptq.forward_chunk)  # fmt: skip
            snapshots["finetuned"] = layer_snapshot(qunet, job.calib, device=job.device, rows_per_group=rows)
        job.layer_stats = stats_document(snapshots, qunet, rows_per_group=rows)
        return qunet, report

    def config(self, recipe: Recipe) -> dict:
        """The sub-configs this method read (stored in the artifact's manifest)."""
        out = {"quant": to_jsonable(recipe.quant), "ptq": to_jsonable(recipe.ptq),
               "finetune": to_jsonable(recipe.finetune) if self.method.finetune else None}  # fmt: skip
        if self.method.uses_dmq_config:
            out["dmq"] = to_jsonable(recipe.dmq)
        return out


def load_runner(method: Method) -> StagedRunner:
    """Import the runner class a declaration names ("module:Class") and bind it to the declaration."""
    module, _, cls = method.runner.partition(":")
    return getattr(importlib.import_module(module), cls)(method)
