"""``onnx_from_artifact``: a quantized-model artifact to QDQ ONNX for one target (deploy.md 2-4).

    export/
      model.onnx                      merged or scale-input: one graph
      model_g00.onnx ... + weights.bin  per-group: one graph per group, weights shared by offset
      conditioning.safetensors        conditional models
      reference/                      Polygraphy JSON: inputs, fake-quant and float outputs per group
      manifest.json                   docs/formats.md

The graph is checked against the target's rules (``quest_export.export.lint``) before anything
is written; a model that breaks a hard rule is refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from quest_export_runtime.manifest import atomic_dir, write_manifest
from quest_export_runtime.verify import THRESHOLD_KEYS

from quest_export import __version__
from quest_export.errors import ExportError, TargetError
from quest_export.export import graph as G
from quest_export.export.lint.graph import RATIOS_INPUT, UNET_INPUTS
from quest_export.export.qdq import ExportPlan, QdqEmitter, plan_acts
from quest_export.quant.artifact import load_quantized
from quest_export.quant.model import QuantizedUNet, QuantMode
from quest_export.recipe.config import ExportConfig, TargetProfile, VerifyConfig, to_jsonable

log = logging.getLogger(__name__)
INPUTS = tuple(UNET_INPUTS)  # the interface `quest-export lint` checks (G-2)
OUTPUT = "noise_pred"
RATIOS = RATIOS_INPUT
MAX_BATCH = 1024


@dataclass
class ExportResult:
    path: Path
    manifest: dict


class _Wrapper(torch.nn.Module):
    """The graph's signature: sample, timestep (float), encoder_hidden_states, act_scale_ratios."""

    def __init__(self, unet, emitter: QdqEmitter, conditional: bool) -> None:
        super().__init__()
        self.unet, self.emitter, self.conditional = unet, emitter, conditional

    def forward(self, sample, timestep, encoder_hidden_states=None, act_scale_ratios=None):
        self.emitter.ratios = act_scale_ratios
        if self.conditional:
            return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample
        return self.unet(sample, timestep).sample


def merge_groups_(qunet: QuantizedUNet) -> None:
    """Give every group the same row: the union of the groups' ranges (quest.md 9.2, ``merged``)."""
    from quest_export.quant.observers import _params

    for q in qunet.act_quantizers().values():
        if q.groups == 1:
            continue
        s = torch.stack([p.detach() for p in q.scales])  # (G, C)
        z = q.zero_points  # (G, C)
        lo, hi = ((q.qmin - z) * s).amin(0), ((q.qmax - z) * s).amax(0)
        ms, mz = _params(lo, hi, q.bits, q.symmetric, q.zero_anchored)
        for g in range(q.groups):
            q.set_row(g, ms, mz)


def export_opset(target: TargetProfile, *, needs_int4: bool) -> tuple[int, int]:
    """(opset, IR version) of the graph for this target (deploy.md 2.3)."""
    if needs_int4:
        if not target.int4_opset:
            raise TargetError(f"target '{target.id}' (TensorRT {target.trt_version}) has no INT4; W4 weights go in an "
                              "INT8 container there, so this is a bug if you did not ask for INT4")  # fmt: skip
        return target.int4_opset, max(target.ir_version, 10)
    return target.max_opset, target.ir_version


# What produces a LES layer's input (quest.md 7.6), by diffusers name: where 1/gamma could fold upstream exactly in
# float arithmetic (a norm's affine, the rows of a linear producer) and where a nonlinearity, a residual stream or
# a concatenation comes first. The export keeps Div(x, gamma) for every LES layer (bit-exact with the fake-quant
# model); this label says where a fold would remove it.
LES_PRODUCERS = (
    ((".conv1", ".conv2", ".time_emb_proj", "time_embedding.linear_2", "conv_out"), "silu"),
    ((".conv_shortcut",), "residual-or-concat"),
    ((".conv",), "residual"),  # downsamplers.*.conv / upsamplers.*.conv read the block output (upsampled)
    ((".proj_out",), "residual"),
    ((".proj_in", ".ff.net.0.proj", ".attn1.to_q", ".attn1.to_k", ".attn1.to_v", ".attn2.to_q"), "norm-affine"),
    ((".ff.net.2", ".to_out.0"), "linear-producer"),  # the GEGLU hidden half / the rows of to_v (P V is linear in V)
    ((".attn2.to_k", ".attn2.to_v"), "conditioning"),  # scaled once per call or folded into the class table
)


def les_producer(name: str) -> str:
    """The kind of operation that feeds layer ``name`` (see LES_PRODUCERS); 'model-input' or 'other' else."""
    for suffixes, kind in LES_PRODUCERS:
        if name.endswith(suffixes):
            return kind
    return "model-input" if name in ("conv_in", "time_embedding.linear_1") else "other"


def layer_records(qunet: QuantizedUNet, target: TargetProfile, acts) -> list[dict]:
    """Per-layer storage choices for the manifest and the lint (deploy.md E-8, E-10)."""
    recs = []
    for name, m in qunet.layers().items():
        s = m.spec
        if s.w_bits is None:
            storage = "float"
        elif s.w_bits < 8 and not target.is_tensorrt:
            storage = "int4" if (s.w_bits == 4 and s.w_symmetric) else ("uint4" if s.w_bits == 4 else "int8-container")
        elif s.w_bits < 8:
            storage = "int8-container"
        else:
            storage = "int8" if s.w_symmetric else "uint8"
        iq = m.input_quantizer
        a_name = f"{name}.input_quantizer" if iq is not None else s.shared_input
        a_bits = iq.bits if iq is not None else (acts[s.shared_input].bits if s.shared_input in acts else None)
        recs.append({"name": name, "kind": s.kind, "w_bits": s.w_bits, "a_bits": a_bits, "storage": storage,
                     "a_storage": acts[a_name].storage if a_name in acts else "float", "split_at": s.split_at,
                     "role": s.role, "les": s.les, "pts": s.pts,
                     "les_producer": les_producer(name) if s.les else None,
                     "pts_fold": _pts_fold(m) if (s.pts and target.is_tensorrt) else None})  # fmt: skip
    return recs


def _pts_fold(m) -> int | None:
    """K = 1 / min f over the PTS factors of the layer's inputs: its W_int is multiplied by up to K on a TensorRT
    target (export/qdq.py), so the INT8 container holds values up to K times the declared bit range."""
    qs = [m.input_quantizer, getattr(m, "input_quantizer_skip", None)]
    ks = [round(float(1.0 / q.pts_factors.min())) for q in qs if q is not None and q.pts_factors is not None]
    return max(ks) if ks else None


def precision_note(w_bits: int, a_bits: int, target: TargetProfile, *, int4_block: int = 0, block: int = 128,
                   fused: bool = False) -> str:  # fmt: skip
    if not target.is_tensorrt and fused:
        widened = "; INT4 weights widened to INT8 by ONNX Runtime at load" if w_bits == 4 else ""
        return f"W{w_bits}A{a_bits}: in+out Q/DQ, fused INT8 kernels in ONNX Runtime (E-22){widened}"
    if not target.is_tensorrt:
        return f"W{w_bits}A{a_bits}: true {'INT4 ' if min(w_bits, a_bits) == 4 else ''}Q/DQ in ONNX Runtime (reference speed)"
    notes = []
    if w_bits < 8 and int4_block:
        notes.append(f"W{w_bits} convolutions stored as INT8 (speed = W8A8); {int4_block} linear layers as INT4 "
                     f"block-{block} weights (experimental on TensorRT, deploy.md Q2)")  # fmt: skip
    elif w_bits < 8:
        notes.append(f"W{w_bits} stored as INT8; speed = W8A8")
    if a_bits < 8:
        notes.append(
            f"W{w_bits}A{a_bits} numerics at W8A8 speed ({a_bits}-bit activations carried in INT8 behind a Clip)"
        )
    return "; ".join(notes) or "INT8 kernels"


def external_data(model: onnx.ModelProto, cfg: ExportConfig) -> bool:
    """Whether the single graph keeps its initializers in model.onnx.data (export.external_data: auto | always |
    never; auto: past G.EXTERNAL_DATA_AUTO bytes, so that no tool has to serialize a proto near protobuf's 2 GB)."""
    if cfg.external_data == "always":
        return True
    if cfg.external_data == "never":
        if G.initializer_bytes(model) > (2 << 30) - (64 << 20):
            raise ExportError("export.external_data=never, but the graph's initializers are past protobuf's 2 GB "
                              "limit; use auto or always")  # fmt: skip
        return False
    return G.initializer_bytes(model) > G.EXTERNAL_DATA_AUTO


LEGACY_MAX_OPSET = 20  # the TorchScript exporter's newest opset; 21 is reached by onnx's version converter


def _trace(qunet: QuantizedUNet, plan: ExportPlan, example: dict, *, conditional: bool) -> onnx.ModelProto:
    """Trace the quantized UNet with the TorchScript exporter (route R3) into an ONNX model in memory."""
    import tempfile
    import warnings

    emitter = QdqEmitter(qunet, plan)
    wrapper = _Wrapper(qunet.unet, emitter, conditional)
    names = ["sample", "timestep"] + (["encoder_hidden_states"] if conditional else [])
    args = [example["sample"], example["timestep"]] + ([example["encoder_hidden_states"]] if conditional else [])
    dyn = {n: {0: "batch"} for n in names}
    dyn[OUTPUT] = {0: "batch"}
    if plan.scale_input:
        if not conditional:
            args.append(None)
        args.append(torch.ones(len(plan.acts)))
        names.append(RATIOS)
    trace_opset = min(plan.opset, LEGACY_MAX_OPSET)
    # traced into a file: past 2 GB the exporter writes external data beside it, which a BytesIO cannot take
    with tempfile.TemporaryDirectory(prefix="quest-trace-") as td:
        path = Path(td) / "traced.onnx"
        with emitter.installed(), torch.no_grad(), qunet.ctx.select(plan.group or 0), qunet.mode(QuantMode.FULL):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # TracerWarnings about Python-side shape math in diffusers
                    torch.onnx.export(wrapper, tuple(args), str(path), dynamo=False, opset_version=trace_opset,
                                      input_names=names, output_names=[OUTPUT], dynamic_axes=dyn,
                                      do_constant_folding=True)  # fmt: skip
            except (RuntimeError, TypeError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise ExportError(f"torch.onnx.export failed: {type(e).__name__}: {first}") from e
        model = onnx.load(str(path), load_external_data=True)
    G.inline_identity_initializers(model)
    if plan.opset > trace_opset:
        model = G.convert_version_large(model, plan.opset)
    return model


def _feeds(calib, qunet: QuantizedUNet, *, per_group: int = 2, seed: int = 0) -> tuple[list[dict], list[int]]:
    """Recorded real UNet inputs: for every group, ``per_group`` trajectories at its first step, with their
    unconditional copies (one CFG call each)."""
    gen = torch.Generator().manual_seed(seed)
    feeds, groups = [], []
    G_ = qunet.ctx.count
    for g in range(G_):
        rows = calib.group_rows(g, G_)
        trajs = calib.traj[rows].unique()
        pick = trajs[torch.randperm(trajs.numel(), generator=gen)[:per_group]]
        sel = rows[torch.isin(calib.traj[rows], pick)]
        x, t, cond, _ = calib.batch(sel)
        feed = {"sample": x.numpy().astype(np.float32), "timestep": t.float().numpy()}
        if cond is not None:
            feed["encoder_hidden_states"] = cond.numpy().astype(np.float32)
        feeds.append(feed)
        groups.append(g)
    return feeds, groups


@torch.no_grad()
def _run_reference(unet, feed: dict, qunet: QuantizedUNet | None, group: int) -> np.ndarray:
    x = torch.from_numpy(feed["sample"])
    t = torch.from_numpy(feed["timestep"]).long()
    cond = torch.from_numpy(feed["encoder_hidden_states"]) if "encoder_hidden_states" in feed else None
    if qunet is None:
        out = unet(x, t, encoder_hidden_states=cond).sample if cond is not None else unet(x, t).sample
        return out.numpy()
    with qunet.ctx.select(group), qunet.mode(QuantMode.FULL):
        out = unet(x, t, encoder_hidden_states=cond).sample if cond is not None else unet(x, t).sample
    return out.numpy()


def _write_reference(tmp: Path, feeds, groups, fq_outs, float_outs) -> dict:
    from polygraphy.comparator import RunResults
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR
    ref = tmp / "reference"
    ref.mkdir()
    save_json(feeds, str(ref / "inputs.json"))
    for name, outs in (("ref_fq", fq_outs), ("ref_float", float_outs)):
        rr = RunResults()
        rr.add([{OUTPUT: o} for o in outs], runner_name=f"torch_{name[4:]}")
        rr.save(str(ref / f"{name}.json"))
    (ref / "feeds.json").write_text(
        json.dumps({"groups": groups, "timesteps": [float(f["timestep"][0]) for f in feeds]})
    )
    return {"inputs": "reference/inputs.json", "ref_fq": "reference/ref_fq.json", "ref_float": "reference/ref_float.json",
            "feeds": "reference/feeds.json", "groups": groups}  # fmt: skip


E2E_SEED = 12345  # the initial noise of the recorded end-to-end images (and of the host's torch H-4)


def _record_e2e(qunet, art, scheduler_config: dict, verify: VerifyConfig, mode: str, shape) -> tuple:
    """The fake-quant sampler's final images from fixed noise and labels, with the export's numerics, for the
    device-side H-4 (no torch on the device). Returns (manifest entry, latents, images)."""
    from quest_export.models.sampling import SamplerSpec, sample

    spec = art.meta["sampler"]
    steps = verify.e2e_steps or spec["steps"]
    if mode in ("per-group", "scale-input"):
        steps = spec["steps"]  # these graphs serve only the calibrated step count
    n = verify.e2e_samples
    latents = np.random.default_rng(E2E_SEED).standard_normal((n, *shape)).astype(np.float32)
    cond = art.model.conditioning
    labels = None if cond is None else [cond.cond_rows[k % len(cond.cond_rows)] for k in range(n)]
    sspec = SamplerSpec.of({**spec, "steps": steps})
    dev = next(qunet.unet.parameters()).device
    with qunet.mode(QuantMode.FULL), torch.no_grad():
        images = sample(qunet.unet, scheduler_config, noise=torch.from_numpy(latents).to(dev), spec=sspec,
                        cond=None if cond is None else cond.rows(torch.tensor(labels)).to(dev),
                        uncond=None if cond is None or cond.uncond is None else cond.uncond.to(dev))  # fmt: skip
    entry = {"latents": "reference/e2e_latents.npy", "images": "reference/e2e_images.npy", "labels": labels,
             "steps": steps, "n": n, "seed": E2E_SEED}  # fmt: skip
    return entry, latents, images.float().cpu().numpy()


def refuse_pts_on_tensorrt(artifact: str | Path, target: TargetProfile) -> None:
    """NotBuiltError for PTS factors on a TensorRT target where they cannot be folded into the next layer's
    weights (weights wider than 5 bits); a graph without them would compute something else."""
    from quest_export.quant.artifact import PLAN_FILE

    plan_file = Path(artifact) / PLAN_FILE
    if not target.is_tensorrt or not plan_file.is_file():
        return  # load_quantized names a missing file
    meta = json.loads(plan_file.read_text())
    layers = meta.get("plan", {}).get("layers", [])
    if any(x.get("pts") for x in layers):
        from quest_export.errors import NotBuiltError
        from quest_export.recipe.methods import get_method

        msg = get_method(meta["quant"]["method"]).export_not_built({"pts": True}, tensorrt=True,
                                                                   w_bits=int(meta["quant"]["w_bits"]))  # fmt: skip
        if msg:
            raise NotBuiltError(msg)


def onnx_from_artifact(artifact: str | Path, *, target: TargetProfile, cfg: ExportConfig, out: str | Path, calib,
                       recipe_fingerprint: str, scheduler_config: dict, device: str = "cpu",
                       verify: VerifyConfig | None = None) -> ExportResult:  # fmt: skip
    """Export a quantized artifact for ``target`` into ``out`` (written atomically).

    Raises:
        ExportError: the traced graph breaks a hard rule of the target (lint errors listed).
        TargetError / NotBuiltError: the recipe asks for a form this target or version cannot give.
    """
    from quest_export.export.lint import lint_model
    from quest_export.models import load_model

    refuse_pts_on_tensorrt(artifact, target)
    art = load_quantized(artifact, device="cpu")
    qunet = art.qunet
    quant = art.meta["quant"]
    w_bits, a_bits = quant["w_bits"], quant["a_bits"]
    if max(w_bits, a_bits) > 8:
        raise TargetError(f"W{w_bits}A{a_bits} is a simulation setting; export supports up to 8 bits")
    if quant.get("output_quant") and target.is_tensorrt:
        raise TargetError(f"target '{target.id}': output quantizers are an ONNX Runtime CPU form; re-quantize "
                          "with quant.output_quant=false")  # fmt: skip
    int4_gemm = cfg.int4_gemm and target.is_tensorrt
    if int4_gemm and "int4-gemm" not in target.quantized_types:
        raise TargetError(f"target '{target.id}' (TensorRT {target.trt_version}) has no INT4 weights; set "
                          "export.int4_gemm=false (W4 stays exact in an INT8 container)")  # fmt: skip
    if int4_gemm and w_bits != 4:
        raise TargetError(f"export.int4_gemm stores 4-bit weights; this artifact has {w_bits}-bit weights")
    if target.is_tensorrt and not (quant["w_symmetric"] and quant["a_symmetric"]):
        raise TargetError(f"target '{target.id}' needs symmetric grids; this artifact is asymmetric: re-quantize "
                          "with quant.w_symmetric=true quant.a_symmetric=true")  # fmt: skip
    if target.is_tensorrt and any(a.qkv_bits for a in qunet.plan.attention):
        raise TargetError(f"target '{target.id}' has no INT8 attention; re-quantize with quant.attention_quant=false")
    conditional = art.model.conditional
    native_a4 = target.native_a4 and a_bits == 4
    mode = cfg.scale_mode if qunet.ctx.count > 1 else "merged"
    acts = plan_acts(qunet, native_a4=native_a4)
    needs_int4 = ((not target.is_tensorrt) and (w_bits == 4 or native_a4)) or int4_gemm
    opset, ir = export_opset(target, needs_int4=needs_int4)
    if mode == "merged":
        merge_groups_(qunet)
    if mode == "scale-input" and any(q.per_channel for q in qunet.act_quantizers().values()):
        raise TargetError("scale-input mode needs per-tensor activation scales; use merged or per-group")
    records = layer_records(qunet, target, acts)
    linear_w4 = [r["name"] for r in records if r["kind"] == "linear" and r["w_bits"] == 4 and not r["split_at"]]
    retype = {}
    if needs_int4:
        for r in records:
            if r["storage"] in ("int4", "uint4"):
                for suffix in ("weight_quantizer", "weight_quantizer_skip"):
                    for leaf in ("export_w", "export_zp"):
                        retype[f"unet.{r['name']}.{suffix}.{leaf}"] = r["storage"]
        for a in acts.values():
            if a.storage in ("int4", "uint4"):
                retype[f"unet.{a.name}.export_zp"] = a.storage
    # W4A8 fused ONNX Runtime form (quant.output_quant): INT4 in the file, widened to INT8 by ORT at load (issue 17)
    widen = {k for k, v in retype.items() if quant.get("output_quant") and k.endswith("export_w")}
    feeds, feed_groups = _feeds(calib, qunet)
    example = {k: torch.from_numpy(v) for k, v in feeds[0].items()}
    graph_groups = list(range(qunet.ctx.count)) if mode == "per-group" else [None]
    models = []
    for g in graph_groups:
        plan = ExportPlan(opset=opset, scale_mode=mode, group=g, acts=acts, native_a4=native_a4,
                          pts_fold=target.is_tensorrt)  # fmt: skip
        m = _trace(qunet, plan, example, conditional=conditional)
        if retype:
            G.retype_int4(m, retype)
        if widen:
            G.widen_int4_weights(m, widen)
        if int4_gemm:
            blocked = set(G.blockify_int4_weights(m, linear_w4, cfg.int4_block))
            for r in records:
                if r["name"] in blocked:
                    r["storage"] = "int4-block"
        G.set_versions(m, opset=opset, ir_version=ir)
        G.name_qdq_nodes(m)
        G.set_metadata(m, {"quest_export.version": __version__, "quest_export.recipe_fingerprint": recipe_fingerprint,
                           "quest_export.target": target.id, "quest_export.scale_mode": mode,
                           "quest_export.group": "all" if g is None else str(g)})  # fmt: skip
        try:
            G.check_model_large(m)
        except onnx.checker.ValidationError as e:
            raise ExportError(f"the exported graph fails onnx.checker: {str(e).splitlines()[0]}") from None
        report = lint_model(m, target, quantized_layers=records)
        if report.errors:
            lines = "; ".join(f"{v.rule_id} {v.node}: {v.message}" for v in report.errors[:5])
            raise ExportError(f"refusing to write a graph that breaks {len(report.errors)} rule(s) of target "
                              f"'{target.id}': {lines} (run `quest-export lint` on it for the full report)")  # fmt: skip
        by_rule: dict[str, list] = {}
        for w in report.warnings:  # one line per rule; `quest-export lint` prints every node
            by_rule.setdefault(w.rule_id, []).append(w)
        for rule, ws in by_rule.items():
            more = f" (and {len(ws) - 1} more node(s); `quest-export lint` lists them)" if len(ws) > 1 else ""
            log.info("lint warning %s %s: %s%s", rule, ws[0].node, ws[0].message, more)
        models.append(m)
    # references: fake-quant with the exported numerics, and the original float model
    float_model = load_model(
        art.meta["model"]["name"], cond=art.meta["model"].get("cond"), prompts=art.meta["model"].get("prompts")
    )
    fq = [_run_reference(qunet.unet, f, qunet, g if mode != "merged" else 0) for f, g in zip(feeds, feed_groups)]
    verify = verify or VerifyConfig()
    e2e, latents, images = _record_e2e(qunet, art, scheduler_config, verify, mode, feeds[0]["sample"].shape[1:])
    fl = [_run_reference(float_model.unet, f, None, g) for f, g in zip(feeds, feed_groups)]
    ratios = None
    if mode == "scale-input":
        qs = list(qunet.act_quantizers().values())
        ratios = [[float(q.scales[g].detach().reshape(-1)[0] / q.reference_scale().reshape(-1)[0]) for q in qs]
                  for g in range(qunet.ctx.count)]  # fmt: skip
    with atomic_dir(out) as tmp:
        files = ["model.onnx"] if len(models) == 1 else [f"model_g{g:02d}.onnx" for g in graph_groups]
        data_file = None
        if len(models) == 1:
            data_file = G.save_graph(models[0], tmp / files[0], external=external_data(models[0], cfg))
        else:
            G.write_shared_weights(models, tmp, files, "weights.bin")
        cond_meta = None
        if art.model.conditioning is not None:
            from safetensors.torch import save_file

            c = art.model.conditioning
            save_file({"encoder_hidden_states": c.table.contiguous()}, str(tmp / "conditioning.safetensors"),
                      metadata={"uncond_index": str(c.uncond_index), "labels": json.dumps(c.labels)})  # fmt: skip
            cond_meta = {"file": "conditioning.safetensors", "uncond_index": c.uncond_index, "labels": c.labels}
        text_to_image = None
        if float_model.info.text is not None:  # the float text encoder and VAE decoder go along (text_parts.py)
            from quest_export.export.text_parts import write_text_parts

            text_to_image = write_text_parts(float_model, tmp, opset=min(opset, LEGACY_MAX_OPSET),
                                             external=lambda m: external_data(m, cfg))  # fmt: skip
        reference = _write_reference(tmp, feeds, feed_groups, fq, fl)
        np.save(tmp / e2e["latents"], latents, allow_pickle=False)
        np.save(tmp / e2e["images"], images, allow_pickle=False)
        reference["e2e"] = e2e  # device-side H-4 (quest_export_runtime/verify.py)
        reference["thresholds"] = {k: getattr(verify, k) for k in THRESHOLD_KEYS}
        io_in = [{"name": "sample", "dtype": "float32", "shape": ["batch", *feeds[0]["sample"].shape[1:]]},
                 {"name": "timestep", "dtype": "float32", "shape": ["batch"]}]  # fmt: skip
        if conditional:
            io_in.append({"name": "encoder_hidden_states", "dtype": "float32",
                          "shape": ["batch", *feeds[0]["encoder_hidden_states"].shape[1:]]})  # fmt: skip
        if mode == "scale-input":
            io_in.append({"name": RATIOS, "dtype": "float32", "shape": [len(acts)]})
        extra = {
            "target": to_jsonable(target),
            "precision": {"w_bits": w_bits, "a_bits": a_bits, "mode": f"W{w_bits}A{a_bits}",
                          "note": precision_note(w_bits, a_bits, target, int4_block=sum(
                              r["storage"] == "int4-block" for r in records), block=cfg.int4_block,
                              fused=bool(quant.get("output_quant")))},
            "scale_mode": mode,
            "graphs": [{"file": f, "group": g} for f, g in zip(files, graph_groups)],
            "weights_file": "weights.bin" if len(models) > 1 else None,
            "external_data": data_file,  # model.onnx.data: the single graph's initializers (export.external_data)
            "groups": {**qunet.ctx.to_dict(), "steps": art.meta["sampler"]["steps"]},
            "scale_ratios": ratios,
            "sampler": art.meta["sampler"],
            "scheduler_config": scheduler_config,
            "conditioning": cond_meta,
            "text_to_image": text_to_image,
            "io": {"inputs": io_in, "outputs": [{"name": OUTPUT, "dtype": "float32", "shape": io_in[0]["shape"]}]},
            "layers": records,
            "onnx": {"opset": opset, "ir_version": ir, "pts_fold": target.is_tensorrt, "qdq_nodes": {k: v for k, v in G.op_counts(models[0]).items()
                                                                     if k.endswith("Linear")}},
            "reference": reference,
            "source": {"artifact": str(artifact), "model": art.meta["model"]},
        }  # fmt: skip
        manifest = write_manifest(tmp, stage="export", recipe_fingerprint=recipe_fingerprint, config=to_jsonable(cfg),
                                  inputs={"quantize": art.manifest.get("recipe_fingerprint") or ""}, extra=extra)  # fmt: skip
    return ExportResult(path=Path(out), manifest=manifest)
