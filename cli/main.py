"""``quest-export``: parse options, build a Recipe through ``pipeline.resolve_recipe``, call the pipeline.

Errors a user can fix print one line (exit 2; exit 3 for a failed verification); ``--debug``
adds the traceback. Anything else keeps its traceback, because it is a bug. SIGINT and SIGTERM end a command
with one line saying what was kept and how to continue, and exit 130 / 143 (docs/reliability.md).
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
import threading

import click

from quest_export import pipeline

STAGE_DONE = {"calibrate": "calibration set", "quantize": "quantized model", "export": "ONNX export",
              "build": "engine / bundle", "verify": "verification"}  # fmt: skip


def _fail(e: Exception, debug: bool) -> None:
    if debug or not isinstance(e, pipeline.QuestExportError):
        raise e
    click.echo(f"error: {e}", err=True)
    sys.exit(e.exit_code)


def _interrupted(e: KeyboardInterrupt, debug: bool) -> None:
    """SIGINT / SIGTERM: one line (the pipeline's account of what was kept, if it gave one), exit 128 + signal."""
    if debug:
        raise e
    signum = getattr(e, "signum", signal.SIGINT)
    msg = str(e) or (f"interrupted by {signal.Signals(signum).name}; nothing was written (every output is written "
                     "atomically): re-run the same command")  # fmt: skip
    click.echo(f"error: {msg}", err=True)
    sys.exit(128 + signum)


def _raise_interrupted(signum, frame) -> None:
    raise pipeline.Interrupted(signum)


def _handle_signals(ctx: click.Context) -> None:
    """SIGINT and SIGTERM raise ``Interrupted`` (a KeyboardInterrupt) for the command; restored when it ends."""
    if threading.current_thread() is not threading.main_thread():
        return
    old = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    ctx.call_on_close(lambda: [signal.signal(s, h) for s, h in old.items()])


def guarded(fn):
    """Run a command, turning QuestExportError into one line and its exit code, and an interrupt into one line
    and exit 130 (SIGINT) or 143 (SIGTERM)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = click.get_current_context()
        debug = (ctx.obj or {}).get("debug", False)
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as e:
            _interrupted(e, debug)
        except Exception as e:  # noqa: BLE001 - re-raised unless it is a QuestExportError
            _fail(e, debug)

    return wrapper


def recipe_options(fn):
    """--model --cond --prompts --bits --preset --method --target --recipe --set --device --guidance --dump-recipe."""
    opts = [
        click.option("--model", default=None, help="bundled model (fmnist-cond, fmnist-uncond) or a diffusers folder"),
        click.option(
            "--cond", default=None, help="safetensors of encoder_hidden_states rows (any UNet2DConditionModel)"
        ),
        click.option(
            "--prompts",
            default=None,
            metavar="FILE",
            help="text-to-image pipelines: calibration prompts, one per line (default: the packaged list)",
        ),
        click.option("--bits", default=None, help=f"precision preset: {' | '.join(pipeline.BITS_PRESETS)}"),
        click.option("--preset", default=None, help="effort preset: fast (CPU) | gpu | paper (reference)"),
        click.option("--method", default=None, help=" | ".join(pipeline.METHODS)),
        click.option(
            "--target", default=None, help="target profile id (packaged, or in $QUEST_EXPORT_TARGETS) or 'jetson'"
        ),
        click.option("--recipe", "recipe_file", default=None, help="recipe JSON file (see --dump-recipe)"),
        click.option("--set", "sets", multiple=True, help="override a recipe field: --set quant.a_bits=4"),
        click.option("--device", default=None, help="auto | cpu | cuda"),
        click.option(
            "--guidance",
            default=None,
            type=float,
            help="classifier-free guidance scale of calibration, finetuning, verify and sampling "
            "(default: the model's quest_model.json, else 1 = off)",
        ),
        click.option("--dump-recipe", is_flag=True, help="print the resolved recipe as JSON and exit"),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def nproc_option(fn):
    """--nproc N: run the command in N processes through torch.distributed's launcher (like torchrun)."""
    return click.option("--nproc", type=int, default=None, metavar="N",
                        help="processes on this host (torch.distributed: NCCL on GPUs, gloo on CPUs); "
                        "torchrun --nproc-per-node N --no-python quest-export ... does the same")(fn)  # fmt: skip


def _launch(nproc: int | None) -> bool:
    """With --nproc N: run this very command line in N ranks and return True (the caller is done)."""
    if nproc is None:
        return False
    pipeline.launch(nproc, sys.argv[1:])
    return True


def work_option(fn):
    """--work DIR: where calib/cache, runs/ and engines/out go (quest_export.workdir resolves the default)."""
    return click.option("--work", default=None, metavar="DIR",
                        help="folder for calib/cache, runs/ and engines/out (default: $QUEST_EXPORT_WORK, else .)")(fn)  # fmt: skip


def _recipe(opts: dict):
    r = pipeline.resolve_recipe(model=opts.pop("model"), cond=opts.pop("cond"), prompts=opts.pop("prompts"),
                                bits=opts.pop("bits"),
                                preset=opts.pop("preset"), method=opts.pop("method"), target=opts.pop("target"),
                                recipe=opts.pop("recipe_file"), sets=opts.pop("sets"), device=opts.pop("device"),
                                guidance=opts.pop("guidance"))  # fmt: skip
    if opts.pop("dump_recipe"):
        click.echo(r.to_json(indent=2))
        sys.exit(0)
    return r


def _print_stage(res) -> None:
    how = "reused" if res.reused else f"done in {res.seconds:.1f}s"
    click.echo(f"[{res.name}] {STAGE_DONE[res.name]}: {res.path} ({how})", err=True)


def _summary(summary) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="quest-export run")
    for col in ("stage", "artifact", "status", "seconds"):
        t.add_column(col)
    for s in summary.stages:
        status = "reused" if s.reused else "built"
        if s.name == "verify" and s.detail:
            status = "PASSED" if s.detail.get("passed") else "FAILED"
        t.add_row(s.name, str(s.path), status, f"{s.seconds:.1f}")
    Console(stderr=False).print(t)
    if summary.verify:
        click.echo(pipeline.format_verify(summary.verify))
    exp = summary.stage("export")
    if exp and exp.detail.get("precision"):
        click.echo(f"precision: {exp.detail['precision']['mode']} ({exp.detail['precision']['note']})")
    b = summary.stage("build")
    if b and b.detail.get("engine"):
        click.echo(f"TensorRT engine: {b.detail['engine']}")
    sm = summary.recipe.sampler
    off = " (classifier-free guidance off; --guidance sets it)" if sm.guidance_scale == 1.0 else ""
    click.echo(f"sampling: {sm.sampler} {sm.steps} steps, eta {sm.eta}, guidance {sm.guidance_scale}{off}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quiet", is_flag=True, help="no progress bars")
@click.option("--debug", is_flag=True, help="show tracebacks of user errors")
@click.version_option(package_name="quest-export")
@click.pass_context
def main(ctx, quiet: bool, debug: bool) -> None:
    """QuEST quantization of diffusers UNets, QDQ ONNX export, TensorRT / ONNX Runtime engines, verification."""
    ctx.obj = {"quiet": quiet, "debug": debug}
    _handle_signals(ctx)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO, format="%(message)s"
    )
    if not debug:  # --debug shows every library's messages (and ONNX Runtime's audit-session warnings, deploy/ort.py)
        for noisy in ("diffusers", "torch", "polygraphy", "onnxscript", "httpx", "urllib3", "wheel"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    pipeline.set_quiet(quiet)


def _run(stage: str, opts: dict, **kw):
    ctx = click.get_current_context()
    recipe = _recipe(opts)
    summary = pipeline.run(recipe, stages=(stage,), show_progress=not ctx.obj["quiet"], on_stage=_print_stage, **kw)
    return summary


@main.command()
@click.argument("model_arg", required=False, metavar="[MODEL]")
@recipe_options
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@guarded
def info(model_arg, as_json, **opts):
    """The quantizable layers of MODEL (default: the bundled default model) and the recipe's bits for each."""
    if model_arg:
        opts["model"] = model_arg
    data = pipeline.info(_recipe(opts))
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    plan = data["plan"]
    t = Table(title=f"{data['model']}: {data['class']} ({data['family']}), {data['parameters'] / 1e6:.2f}M parameters")
    for col in ("layer", "kind", "weight shape", "w bits", "a bits", "notes"):
        t.add_column(col)
    for s in plan["layers"]:
        notes = []
        if s["split_at"]:
            notes.append(f"split shortcut at {s['split_at']}")
        if s["shared_input"]:
            notes.append(f"input: {s['shared_input'].rsplit('.', 1)[-1]} (shared)")
        if s["role"] not in ("other",):
            notes.append(s["role"])
        t.add_row(s["name"], s["kind"], "x".join(map(str, s["shape"])), str(s["w_bits"] or "fp"),
                  str(s["a_bits"] or "-"), ", ".join(notes))  # fmt: skip
    Console().print(t)
    att = plan["attention"]
    q = sum(1 for a in att if a["qkv_bits"])
    click.echo(f"{len(plan['layers'])} quantized layers; {len(att)} attention modules ({q} with quantized Q/K/V/P); "
               f"{plan['groups']} timestep group(s)")  # fmt: skip


@main.command()
@recipe_options
@work_option
@click.option("--out", default=None, help="calibration set folder (default WORK/calib/cache/<model>-<key>)")
@nproc_option
@guarded
def calibrate(work, out, nproc, **opts):
    """Record the float model's UNet inputs along its own sampling trajectories (WORK/calib/cache/)."""
    if _launch(nproc):
        return
    _run("calibrate", opts, work=work, out=out)


@main.command()
@recipe_options
@click.option("--resume", is_flag=True, help="continue an interrupted run from its last checkpoint")
@click.option("--force", multiple=True, help="redo a stage even if a finished one matches (calibrate, quantize)")
@work_option
@click.option("--out", default=None, help="quantized artifact folder (default WORK/runs/quantize/<tag>-<key>)")
@nproc_option
@guarded
def quantize(resume, force, work, out, nproc, **opts):
    """Quantize with --method (a registered method: ptq, quest, ...; see --help), calibrating first if needed."""
    if _launch(nproc):
        return
    _run("quantize", opts, resume=resume, force=tuple(force), work=work, out=out)


@main.command()
@click.argument("run_dir", required=False, metavar="[RUN_DIR]")
@recipe_options
@work_option
@click.option("--out", default=None, help="export folder (with RUN_DIR: required; else default WORK/runs/export/...)")
@guarded
def export(run_dir, work, out, **opts):
    """Export a quantized artifact (RUN_DIR) or the recipe's run to QDQ ONNX for --target, checked by lint."""
    recipe = _recipe(opts)
    if run_dir:
        if not out:
            raise click.UsageError("export RUN_DIR needs --out DIR")
        m = pipeline.export_artifact(run_dir, recipe, out=out)
        click.echo(f"wrote {out}: {m['precision']['mode']} for {m['target']['id']} ({m['precision']['note']}); "
                   f"opset {m['onnx']['opset']}, {m['scale_mode']}")  # fmt: skip
        return
    ctx = click.get_current_context()
    pipeline.run(recipe, stages=("export",), out=out, work=work, show_progress=not ctx.obj["quiet"],
                 on_stage=_print_stage)  # fmt: skip


@main.command()
@recipe_options
@click.option("--backend", type=click.Choice(["ort", "trt"]), default=None, help="default: the target's runtime")
@work_option
@click.option(
    "--out", default=None, help="engine / bundle folder (default WORK/engines/out/<model>-<method>-<bits>-<target>)"
)
@click.option("--from", "from_bundle", default=None, help="on the device: build the engine of this bundle")
@click.option("--resume", is_flag=True, help="continue an interrupted quantization")
@click.option("--force", multiple=True, help="redo these stages (calibrate, quantize, export, build, verify, all)")
@click.option("--allow-experimental", is_flag=True, help="build cells not yet verified on hardware (with --from)")
@nproc_option
@guarded
def build(backend, work, out, from_bundle, resume, force, allow_experimental, nproc, **opts):
    """The main job: calibrate -> quantize -> export -> build -> verify, reusing finished stages.

    With no --model, the bundled default model; `quest-export build --target jetson` ends with a bundle
    that builds its TensorRT engine on the Jetson.
    """
    if from_bundle:
        sys.exit(pipeline.build_from_bundle(from_bundle, out=out, allow_experimental=allow_experimental))
    if _launch(nproc):
        return
    recipe = _recipe(opts)
    if backend == "trt" and not recipe.target.is_tensorrt:
        raise click.UsageError(f"--backend trt needs a TensorRT target; '{recipe.target.id}' runs ONNX Runtime")
    if backend == "ort" and recipe.target.is_tensorrt:
        click.echo(f"note: --backend ort checks the '{recipe.target.id}' graph with ONNX Runtime (the numerical "
                   "stand-in); the TensorRT engine is still built on the device from the bundle", err=True)  # fmt: skip
    ctx = click.get_current_context()
    summary = pipeline.run(recipe, out=out, work=work, resume=resume, force=tuple(force),
                           show_progress=not ctx.obj["quiet"], backend=backend, on_stage=_print_stage)  # fmt: skip
    if not pipeline.is_main_process():
        return  # rank 0 reports for a distributed run
    _summary(summary)
    if summary.verify and not summary.verify.get("passed"):
        sys.exit(3)


@main.command()
@click.argument("path", metavar="DIR")
@click.option("--quantized", default=None, help="fake-quant artifact (default: the one recorded in the manifest)")
@click.option("--backend", type=click.Choice(["ort", "trt", "auto"]), default=None)
@click.option("--device", default="cpu")
@click.option("--manifest-only", is_flag=True,
              help="only the manifest check (paths, hashes, unlisted engines, an engine folder vs this device)")  # fmt: skip
@click.option(
    "--device-side",
    is_flag=True,
    help="run the bundle's own device-side verify (what the device runs) with torch blocked",
)
@click.option("--json", "json_path", default=None, metavar="FILE", help="with --device-side: write the report here")
@guarded
def verify(path, quantized, backend, device, manifest_only, device_side, json_path):
    """Check an export, ORT build, bundle or engine folder against its fake-quant references (exit 3 on failure)."""
    if manifest_only:
        click.echo(pipeline.check_manifest(path))
        return
    if json_path and not device_side:
        raise click.UsageError("--json goes with --device-side (the host verify writes DIR/verify.json)")
    if device_side:
        rep = pipeline.verify_device_side(path, backend=backend, json_path=json_path)
        click.echo(pipeline.format_device_verify(rep))
        if not rep["passed"]:
            first = next(t for t in rep["tiers"] if t["passed"] is False)
            click.echo(f"error: {first['name']} failed: {first['summary']}", err=True)
            sys.exit(3)
        return
    rep = pipeline.verify(path, quantized=quantized, backend=backend, device=device)
    click.echo(pipeline.format_verify(rep))
    if not rep["passed"]:
        sys.exit(3)


@main.command()
@click.argument("path", required=False, metavar="[DIR]")
@recipe_options
@click.option("--n", "n", default=16, show_default=True, help="number of images")
@click.option("--out", default="grid.png", show_default=True, help="PNG grid")
@click.option("--seed", default=0, show_default=True)
@click.option("--steps", default=None, type=int, help="sampler steps (default: the model's)")
@click.option("--backend", type=click.Choice(["ort", "trt", "auto"]), default=None)
@click.option(
    "--prompt",
    "prompt_texts",
    multiple=True,
    metavar="TEXT",
    help="text-to-image: a prompt (repeatable, one image each)",
)
@guarded
def sample(path, n, out, seed, steps, backend, prompt_texts, **opts):
    """Sample the float model (--model) with torch, or an export/bundle/engine DIR with the torch-free runtime.

    A text-to-image pipeline or bundle turns each --prompt into an image (text encoder, UNet loop, VAE decoder).
    """
    if path and opts.get("guidance") is not None:
        raise click.UsageError(
            "--guidance applies to --model sampling; an artifact samples with the guidance it "
            "was built with (rebuild it with build --guidance)"
        )
    if path:
        p = pipeline.sample_artifact(path, n=n, out=out, seed=seed, backend=backend, steps=steps,
                                     prompts=list(prompt_texts) or None)  # fmt: skip
    else:
        p = pipeline.sample_float(
            _recipe(opts), n=n, out=out, seed=seed, steps=steps, prompts=list(prompt_texts) or None
        )
    click.echo(f"wrote {p}")


@main.command(name="eval")
@recipe_options
@click.option("--n", "n", default=1000, show_default=True, help="number of samples")
@click.option("--seed", default=0, show_default=True)
@click.option("--quantized", default=None, help="evaluate a quantized artifact instead of the float model")
@click.option("--steps", default=None, type=int, help="sampler steps (default: the model's)")
@click.option("--grid", default=None, help="also write the first 100 samples as a PNG grid")
@click.option("--methods", default=None, help="comma list: evaluate a matrix of these methods x --bits (a comma list)")
@click.option("--json", "as_json", is_flag=False, flag_value="-", default=None, metavar="[FILE]",
              help="print JSON; with FILE write it there (a matrix also writes FILE's .csv)")  # fmt: skip
@work_option
@guarded
def eval_(n, seed, quantized, steps, grid, methods, as_json, work, **opts):
    """FD (classifier features vs the Fashion-MNIST test set) and class agreement of n samples.

    With --methods (or a comma list in --bits): one table of the float model and every method x bits row, all from
    the same initial noise: FD and class agreement (Fashion-MNIST-shaped models; n/a elsewhere), PSNR and SSIM
    against the float model's samples, wall time per row. Finished rows are reused by a rerun.
    """
    bits = opts.get("bits") or ""
    if methods is not None or "," in bits:
        if quantized or grid:
            raise click.UsageError("--quantized and --grid evaluate one model; a matrix (--methods) takes neither")
        if opts.pop("dump_recipe"):
            opts["dump_recipe"] = True
            _recipe({**opts, "bits": bits.split(",")[0] or None, "method": (methods or "").split(",")[0] or None})
        base = {k: opts.pop(v) for k, v in (("model", "model"), ("cond", "cond"), ("prompts", "prompts"), ("preset", "preset"),
                ("target", "target"), ("recipe", "recipe_file"), ("sets", "sets"), ("device", "device"),
                ("guidance", "guidance"))}  # fmt: skip
        method_list = [m for m in (methods or opts.get("method") or "").split(",") if m]
        res = pipeline.evaluate_matrix(base, bits=[b for b in bits.split(",") if b], methods=method_list, n=n,
                                       seed=seed, steps=steps, work=work,
                                       json_path=None if as_json in (None, "-") else as_json,
                                       show_progress=not click.get_current_context().obj["quiet"])  # fmt: skip
        if as_json == "-":
            click.echo(json.dumps({k: v for k, v in res.items() if k != "table"}, indent=2))
            return
        _matrix_table(res)
        return
    if work:
        raise click.UsageError("--work applies to a matrix (--methods), whose rows quantize")
    rep = pipeline.evaluate(_recipe(opts), n=n, seed=seed, quantized=quantized, steps=steps, grid=grid,
                            json_path=None if as_json in (None, "-") else as_json)  # fmt: skip
    if as_json == "-":
        click.echo(json.dumps(rep, indent=2))
        return
    agree = "n/a (unconditional)" if rep["class_agreement"] is None else f"{100 * rep['class_agreement']:.1f}%"
    s = rep["sampler"]
    click.echo(f"{rep['model']}{' (quantized: ' + rep['quantized'] + ')' if rep['quantized'] else ''}: "
               f"FD {rep['fd']:.2f}, class agreement {agree}  [{rep['n']} samples, seed {rep['seed']}, "
               f"{s['sampler']} {s['steps']} steps, eta {s['eta']}, guidance {s['guidance_scale']}, {rep['device']}, "
               f"{rep['seconds']:.0f}s]")  # fmt: skip


def _matrix_table(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = res["sampler"]
    t = Table(title=f"{res['model']}: {res['n']} samples, seed {res['seed']}, {s['sampler']} {s['steps']} steps, "
                    f"guidance {s['guidance_scale']}, {res['device']}")  # fmt: skip
    for col in ("method", "bits", "FD", "class agreement", "PSNR (dB)", "SSIM", "seconds"):
        t.add_column(col)
    for row in res["table"]:
        t.add_row(*row)
    Console(stderr=False).print(t)
    for p in res.get("files", []):
        click.echo(f"wrote {p}")


@main.command()
@click.argument("model_path", metavar="MODEL.onnx")
@click.option("--target", required=True, help="target profile id or 'jetson'")
@click.option("--layers", default=None, help="manifest.json (or JSON list) with the quantized layers")
@click.option("--json", "as_json", is_flag=True)
@guarded
def lint(model_path, target, layers, as_json):
    """Check an ONNX graph against a target's rules; exit 2 on any error.

    A graph the rules are not about is a warning, not an OK: G-1 no quantized op at all (a float graph), G-2 inputs
    that are not the UNet interface the target's runtime feeds (sample, timestep, encoder_hidden_states, at most
    2 x the target's max_batch rows when the batch is fixed). The last line then reads "NOT CHECKED: ..."; exit 0,
    because such a graph may still run (docs/reliability.md).
    """
    rep = pipeline.lint(model_path, target, layers=layers)
    click.echo(json.dumps(rep["json"], indent=2) if as_json else rep["text"])
    if not rep["ok"]:
        sys.exit(2)


@main.command()
@click.argument("path", metavar="DIR")
@click.option("--out", default=None, help="Markdown file (default DIR/report.md); the HTML page and PNGs go beside it")
@click.option("--images", default=16, show_default=True, help="float vs quantized samples in the grid (0: no grid)")
@click.option("--seed", default=0, show_default=True, help="noise seed of the sample grid")
@click.option("--device", default="cpu", show_default=True)
@guarded
def report(path, out, images, seed, device):
    """Report a quantize run dir, export, ORT build or bundle: report.md, a self-contained report.html and the
    figures as PNG (sample grid, activation histograms per timestep group, per-layer SQNR, verify tiers, size and
    latency)."""
    p = pipeline.write_report(path, out=out, images=images, seed=seed, device=device)
    click.echo(f"wrote {p.with_suffix('.md')} and {p}")


if __name__ == "__main__":
    main()
