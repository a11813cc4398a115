"""The method registry: what each quantization method is, as data (quest.md 1.3, 7).

A method is one ``Method`` declaration here (standard library only, so that ``import
quest_export.recipe`` stays torch-free); the runner class named by ``runner`` executes the
stages it switches on and is imported only when the method runs (``quest_export.methods``). Recipe
resolution is the only place that reads the defaults below; stages ask the declaration for
flags (``les``, ``finetune``, ...), never for a method's name.

    method       stages (quest.md 1.3)           activation scales   finetune
    ptq          A1, min/max over all rows        shared (G = 1)      -
    qdiffusion   A1-A3 + scale reconstruction     shared (G = 1)      -
    quest        A1-A3, B, C                      per group           B, C
    dmq          A0 (LES), A1-A3, A4 (PTS)        per group           -
    dmq+quest    A0, A1-A4, B, C                  per group           B, C
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

# Timestep groups G of the time-aware methods per effort preset (quest.md 5.4).
GROUPS = {"fast": 10, "gpu": 10, "paper": 20}
PAPER_GROUPS_50_STEPS = 25  # quest.md 3.2: 25 groups for a 50-step sampler

# DMQ's high-precision set (quest.md 2.7): conv_in/conv_out in float, the time embedding and every
# time_emb_proj not quantized, attention matmul operands not quantized.
DMQ_FLOAT_LAYERS = (
    {"pattern": "time_embedding.*", "quantize": False},
    {"pattern": "*time_emb_proj", "quantize": False},
)

# DMQ stage lengths per effort preset (quest.md 7.6: LES 6,000 iterations, batch 32, lr 1e-3; the `fast`
# and `gpu` values are this project's starting points on the bundled models).
DMQ_EFFORT = {
    "fast": {"dmq": {"les_iters": 200, "les_batch": 32, "pts_samples": 64}},
    "gpu": {"dmq": {"les_iters": 1000, "les_batch": 32, "pts_samples": 128}},
    "paper": {"dmq": {"les_iters": 6000, "les_batch": 32, "pts_samples": 256}},
}


@dataclass(frozen=True)
class Method:
    """One quantization method: its defaults and the stages it runs.

    ``layer`` is a partial recipe merged right after the dataclass defaults (before the precision
    and effort presets, the target, the recipe file and ``--set``, which all win over it), and
    ``effort[preset]`` on top of it. The remaining fields fill recipe fields left at None.
    """

    name: str
    summary: str
    runner: str = "quest_export.methods:StagedRunner"  # "module:Class" of the stage runner, imported lazily
    shared_scales: bool = False  # one activation scale set for every timestep (G = 1)
    split_shortcut: bool = True  # quest.md 2.8 default
    weight_init: str = "mse"  # quest.md 4.1 (ptq: absmax)
    adaround: bool = True  # quest.md 4.2
    accumulate_act: bool = False  # activation range = true min/max over every calibration row (plain PTQ)
    act_recon: bool = False  # Q-Diffusion's activation-scale reconstruction (ptq.act_recon_iters)
    les: bool = False  # Stage A0: learned equivalent scaling (DMQ)
    pts: bool = False  # Stage A4: power-of-two scaling by voting (DMQ)
    finetune: bool = False  # QuEST Stages B and C (the recipe's finetune config is used)
    not_built: str | None = None  # set while a stage of the method is missing: the one line a run refuses with
    layer: dict = field(default_factory=dict)
    effort: dict = field(default_factory=dict)

    def timestep_groups(self, effort: str, steps: int) -> int:
        """G when the recipe leaves it unset."""
        if self.shared_scales:
            return 1
        g = GROUPS.get(effort, GROUPS["fast"])
        if effort == "paper" and steps == 50:
            g = PAPER_GROUPS_50_STEPS
        return min(g, steps)

    def defaults_layer(self, effort: str | None) -> dict:
        """The method's partial recipe for ``effort`` (None = fast)."""
        from quest_export.recipe.resolve import deep_merge

        return deep_merge(self.layer, self.effort.get(effort or "fast", {}))

    def fill_defaults(self, data: dict, *, effort: str) -> None:
        """Fill the fields of a merged recipe dict that are still None (the user's values stay)."""
        q, ptq = data["quant"], data["ptq"]
        if q.get("timestep_groups") is None:
            q["timestep_groups"] = self.timestep_groups(effort, data["sampler"]["steps"])
        if q.get("split_shortcut") is None:
            q["split_shortcut"] = self.split_shortcut
        if ptq.get("weight_init") is None:
            ptq["weight_init"] = self.weight_init
        if ptq.get("adaround") is None:
            ptq["adaround"] = self.adaround

    @property
    def uses_dmq_config(self) -> bool:
        return self.les or self.pts

    def export_not_built(self, dmq: dict, *, tensorrt: bool, w_bits: int = 8) -> str | None:
        """The one line an export refuses with where it cannot be exact; None = exportable.

        LES exports everywhere (gamma folded into W_int, a Div by gamma before the input Q). PTS exports as
        per-channel activation scales on ONNX Runtime, and on TensorRT (per-tensor activations) as x * (1/f)
        before the Q with f folded into the next layer's integer weights, which fits INT8 for weights of up to
        5 bits (f down to 1/8 multiplies W_int by up to 8: export/qdq.py).
        """
        if not (tensorrt and self.pts and dmq.get("pts")) or w_bits <= PTS_FOLD_MAX_W_BITS:
            return None
        return (f"PTS on TensorRT targets (method '{self.name}') folds its power-of-two factors into the next "
                f"layer's weights, which stay in INT8 for weights of up to {PTS_FOLD_MAX_W_BITS} bits, not "
                f"{w_bits}; quantize with --set dmq.pts=false or use --target cpu")  # fmt: skip


PTS_FOLD_MAX_W_BITS = 5  # 2^(b-1) * 8 <= 128: the INT8 container of a TensorRT weight
_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    _REGISTRY[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    """The declaration of method ``name``; RecipeError naming the known methods otherwise."""
    if name not in _REGISTRY:
        from quest_export.errors import RecipeError

        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise RecipeError(f"quant.method={name!r} is not a method; {hint}choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


register_method(Method(name="ptq", summary="min/max PTQ baseline (quest.md 7.1)", shared_scales=True,
                       split_shortcut=False, weight_init="absmax", adaround=False, accumulate_act=True))  # fmt: skip
register_method(Method(name="qdiffusion", summary="Q-Diffusion-style PTQ (quest.md 7.2)", shared_scales=True,
                       act_recon=True))  # fmt: skip
register_method(Method(name="quest", summary="QuEST: PTQ + selective finetuning (quest.md 4, 5)", finetune=True))
register_method(Method(
    name="dmq", summary="DMQ: LES + AdaRound + per-group activations + PTS (quest.md 7.6)", les=True, pts=True,
    layer={"quant": {"first_last": "fp", "attention_quant": False, "overrides": [dict(o) for o in DMQ_FLOAT_LAYERS]}},
    effort=DMQ_EFFORT))  # fmt: skip
register_method(Method(  # QuEST's precision policy (the time embedding is quantized, so Stage B has work)
    name="dmq+quest", summary="DMQ's LES/PTS, then QuEST's Stages B and C (quest.md 7.6)", les=True, pts=True,
    finetune=True, effort=DMQ_EFFORT))  # fmt: skip

__all__ = ["GROUPS", "Method", "get_method", "method_names", "register_method"]
