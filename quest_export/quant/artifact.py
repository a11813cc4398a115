"""The quantized-model artifact: a folder that reloads into a bit-identical fake-quant model.

    quantized.safetensors   the whole state_dict: latent weights, integer weights (w_int, int8),
                            AdaRound bits, weight scales, per-group activation scales / zero points
    layer_stats.json        per-layer, per-group activation histograms and SQNR after Stage A and after
                            finetuning (quest_export.quant.layer_stats), read by the run report
    quant.json              the plan (every layer's bits and grid), group timesteps, the model it
                            came from (name, hash), the sampler and the conditioning source
    manifest.json           recipe fingerprint, hashes, versions (quest_export_runtime.manifest)

Written atomically: an interrupted write never leaves a folder that loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from quest_export_runtime.manifest import atomic_dir, read_manifest, verify_files, write_manifest

from quest_export.errors import ArtifactError
from quest_export.quant.model import QuantizedUNet, QuantPlan, quantize_
from quest_export.recipe.config import QuantRecipe, from_jsonable

STATE_FILE = "quantized.safetensors"
PLAN_FILE = "quant.json"
# report fields particular to one run (wall time, memory, how the loops ran, the checkpoint resumed from): kept in
# the manifest's "run" key, so that a resumed artifact's quant.json equals an uninterrupted run's
RUN_FIELDS = ("seconds", "stage_seconds", "peak_memory_mib", "loops", "resumed_from")


def split_run(report: dict) -> tuple[dict, dict]:
    """(the report without RUN_FIELDS, those fields) for a {section: {field: value}} quantize report."""
    kept, run = {}, {}
    for section, fields in report.items():
        if not isinstance(fields, dict):
            kept[section] = fields
            continue
        kept[section] = {k: v for k, v in fields.items() if k not in RUN_FIELDS}
        if ours := {k: v for k, v in fields.items() if k in RUN_FIELDS}:
            run[section] = ours
    return kept, run


def full_report(path: str | Path) -> dict:
    """An artifact's quantize report with its run fields put back (quant.json's report + the manifest's run)."""
    path = Path(path)
    report = json.loads((path / PLAN_FILE).read_text()).get("report", {})
    run = json.loads((path / "manifest.json").read_text()).get("run", {}).get("report", {})
    return {s: {**v, **run.get(s, {})} if isinstance(v, dict) else v for s, v in report.items()}


@dataclass
class QuantArtifact:
    """A loaded artifact: the quantized UNet handle plus what the folder declares."""

    path: Path
    qunet: QuantizedUNet
    model: object  # quest_export.models.LoadedModel (float model, conditioning)
    meta: dict
    manifest: dict


def save_quantized(qunet: QuantizedUNet, out: str | Path, *, recipe_fingerprint: str, quant: QuantRecipe,
                   model_ref: dict, sampler: dict, stage: str = "quantize", config: dict | None = None,
                   inputs: dict | None = None, extra: dict | None = None, run: dict | None = None,
                   files: dict[str, str] | None = None) -> Path:  # fmt: skip
    """Write the artifact folder ``out`` atomically. ``model_ref`` = {name, cond, hash}; ``run`` goes to the
    manifest's ``run`` key (what is particular to this run, see ``split_run``); ``files`` = {name: text} are
    further files of the artifact (e.g. layer_stats.json), hashed in the manifest like the others."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in qunet.unet.state_dict().items()}
    meta = {
        "plan": qunet.plan.to_dict(),
        "groups": qunet.ctx.to_dict(),
        "quant": _jsonable(quant),
        "model": model_ref,
        "sampler": sampler,
        **(extra or {}),
    }
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / STATE_FILE), metadata={"format": "quest-export fake-quant state"})
        (tmp / PLAN_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        write_manifest(tmp, stage=stage, recipe_fingerprint=recipe_fingerprint, config=config, inputs=inputs, run=run)
    return Path(out)


def _jsonable(obj) -> dict:
    from quest_export.recipe.config import to_jsonable

    return to_jsonable(obj)


def load_quantized(path: str | Path, *, device: str | torch.device = "cpu", model=None) -> QuantArtifact:
    """Reload an artifact into a fake-quant UNet that gives bit-identical outputs.

    Args:
        model: an already loaded float model to quantize (else loaded from the artifact's reference).
    Raises:
        ArtifactError: missing/corrupt files, or a float model whose hash differs from the one quantized.
    """
    from safetensors.torch import load_file

    from quest_export.models import load_model

    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    meta = json.loads((path / PLAN_FILE).read_text())
    ref = meta["model"]
    if model is None:
        model = load_model(ref["name"], cond=ref.get("cond"), prompts=ref.get("prompts"), device=device)
    if model.source_hash != ref["hash"]:
        raise ArtifactError(f"{path} was quantized from a float model with hash {ref['hash'][:12]}, but "
                            f"'{ref['name']}' now has hash {model.source_hash[:12]}; re-run quantize")  # fmt: skip
    plan = QuantPlan.from_dict(meta["plan"])
    quant = from_jsonable(QuantRecipe, meta["quant"], path="quant")
    qunet = quantize_(model.unet, quant, group_timesteps=meta["groups"]["timesteps"], plan=plan)
    state = load_file(str(path / STATE_FILE), device=str(device))
    for name, q in qunet.act_quantizers().items():  # lazily sized per-channel quantizers
        key = f"{name}.scales.0"
        if q.per_channel and key in state:
            q.resize(state[key].numel())
    for name, wq in qunet.weight_quantizers().items():  # optional buffers: size them before loading
        for buf in ("rounding", "w_int"):
            t = state.get(f"{name}.{buf}")
            if t is not None:
                setattr(wq, buf, torch.zeros_like(t))
    missing, unexpected = qunet.unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(f"{path}: state does not fit the plan (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                            "the artifact was written by another quest-export version; re-run quantize")  # fmt: skip
    qunet.unet.to(device)
    return QuantArtifact(path=path, qunet=qunet, model=model, meta=meta, manifest=manifest)
