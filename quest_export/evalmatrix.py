"""The evaluation matrix: one model, several methods x bit widths, one table.

    result = run_matrix({"model": "fmnist-cond", "preset": "fast"}, bits=["w8a8", "w4a8"],
                        methods=["ptq", "quest"], n=100, seed=0)
    write_tables(result, "matrix.json")   # matrix.json and matrix.csv

Every row samples from the same initial noise (seed), labels and sampler as the float row, so PSNR and SSIM
compare image k of a row with image k of the float model. FD and class agreement exist for Fashion-MNIST-shaped
models only (quest_export.eval.is_fmnist); elsewhere they are None ("n/a"). Each row's quantized artifact comes
from the pipeline (calibrate and quantize, reused when finished), and each finished row is kept under
WORK/runs/eval/ keyed by its recipe fingerprint, n, seed and sampler: a rerun recomputes only what is missing.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from quest_export import __version__
from quest_export.errors import InputError

COLUMNS = ("method", "bits", "fd", "class_agreement", "psnr", "ssim", "seconds", "reused", "fingerprint", "artifact")


def _row_key(*parts) -> str:
    payload = json.dumps([__version__, *parts], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _read_row(path: Path, fingerprint: str) -> dict | None:
    try:
        row = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # missing or unreadable: recomputed (and rewritten atomically)
    return row if row.get("fingerprint") == fingerprint else None


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _check(names: list[str], allowed, what: str) -> None:
    bad = [x for x in names if x not in allowed]
    if bad or not names:
        raise InputError(f"--{what} {','.join(names) or '(empty)'}: unknown {', '.join(bad) or 'none given'}; "
                         f"choose from {', '.join(allowed)}")  # fmt: skip


def run_matrix(base: dict, *, bits: list[str], methods: list[str], n: int, seed: int = 0, work=None,
               steps: int | None = None, batch: int = 250, show_progress: bool = True) -> dict:  # fmt: skip
    """Evaluate the float model and every (method, bits) row; ``base`` = resolve_recipe keyword arguments
    without ``method`` and ``bits``. Returns {"model", "n", "seed", "sampler", "device", "fmnist", "float", "rows"}."""
    from quest_export_runtime.manifest import write_json_atomic
    from quest_export_runtime.outputs import write_bytes_atomic

    from quest_export import pipeline
    from quest_export.eval import generate, is_fmnist, score
    from quest_export.log import progress
    from quest_export.models import load_model
    from quest_export.models.sampling import SamplerSpec
    from quest_export.workdir import WorkDirs

    pipeline.check_counts(n=n, steps=steps)
    _check(methods, pipeline.METHODS, "methods")
    _check(bits, pipeline.BITS_PRESETS, "bits")
    float_recipe = pipeline.resolve_recipe(**base)
    s = float_recipe.sampler
    spec = SamplerSpec.of(s)
    spec = replace(spec, steps=steps) if steps is not None else spec
    device = pipeline.resolve_device(float_recipe)
    cache = WorkDirs.resolve(work).eval
    model = load_model(
        float_recipe.model.name, cond=float_recipe.model.cond, prompts=float_recipe.model.prompts, device=device
    )
    fmnist = is_fmnist(model)
    name = Path(float_recipe.model.name).name
    sampling = {"n": n, "seed": seed, "sampler": asdict(spec)}

    # the float row: its samples are every other row's reference
    fkey = _row_key("float", model.source_hash, sampling)
    fjson, fnpy = cache / f"{name}-float-{fkey}.json", cache / f"{name}-float-{fkey}.npy"
    float_row = _read_row(fjson, fkey) if fnpy.is_file() else None
    ref = None
    if float_row is not None:
        float_row["reused"] = True
    else:
        t0 = time.time()
        ref, labels = generate(model.unet, model, spec, n=n, seed=seed, batch=batch, device=device,
                               show_progress=show_progress)  # fmt: skip
        fd, agree = score(ref, labels, device=device) if fmnist else (None, None)
        float_row = {"method": "float", "bits": "fp32", "fd": _r(fd, 3), "class_agreement": _r(agree, 4),
                     "psnr": None, "ssim": None, "seconds": round(time.time() - t0, 1), "fingerprint": fkey,
                     "artifact": None}  # fmt: skip
        write_bytes_atomic(fnpy, _npy_bytes(ref))
        write_json_atomic(fjson, float_row, allow_nan=False)
        float_row["reused"] = False
    del model

    rows = []
    cells = [(m, b) for m in methods for b in bits]
    bar = progress(total=len(cells), description="eval matrix", enabled=show_progress)
    for method, b in cells:
        recipe = pipeline.resolve_recipe(**base, method=method, bits=b)
        fp = recipe.fingerprint()
        path = cache / f"{name}-{method}-{b}-{_row_key(fp, sampling)}.json"
        row = _read_row(path, fp)
        if row is not None:
            row["reused"] = True
        else:
            if ref is None:
                ref = np.load(fnpy, allow_pickle=False)
            row = _evaluate_row(recipe, method, b, ref, spec=spec, n=n, seed=seed, work=work, batch=batch,
                                device=device, fmnist=fmnist, show_progress=show_progress)  # fmt: skip
            write_json_atomic(path, row, allow_nan=False)
            row["reused"] = False
        rows.append(row)
        bar.advance(1, postfix=f"{method} {b}")
    bar.close()
    return {"model": float_recipe.model.name, "n": n, "seed": seed, "sampler": asdict(spec), "device": device,
            "fmnist": fmnist, "float": float_row, "rows": rows}  # fmt: skip


def _r(v, digits: int):
    return None if v is None else round(float(v), digits)


def _evaluate_row(recipe, method: str, bits: str, ref: np.ndarray, *, spec, n: int, seed: int, work, batch: int,
                  device: str, fmnist: bool, show_progress: bool) -> dict:  # fmt: skip
    """Quantize (or reuse the finished artifact), sample from the float row's noise, score."""
    from quest_export import pipeline
    from quest_export.eval import compare_images, generate, score
    from quest_export.quant.artifact import load_quantized
    from quest_export.quant.model import QuantMode

    t0 = time.time()
    summary = pipeline.run(recipe, stages=("quantize",), work=work, show_progress=show_progress)
    art_path = summary.stage("quantize").path
    art = load_quantized(art_path, device=device)
    with art.qunet.mode(QuantMode.FULL):
        imgs, labels = generate(art.qunet.unet, art.model, spec, n=n, seed=seed, batch=batch, device=device,
                                show_progress=show_progress)  # fmt: skip
    fd, agree = score(imgs, labels, device=device) if fmnist else (None, None)
    cmp = compare_images(imgs, ref)
    return {"method": method, "bits": bits, "fd": _r(fd, 3), "class_agreement": _r(agree, 4),
            "psnr": None if not np.isfinite(cmp["psnr"]) else cmp["psnr"], "ssim": cmp["ssim"],
            "seconds": round(time.time() - t0, 1), "fingerprint": recipe.fingerprint(), "artifact": str(art_path)}  # fmt: skip


def _cell(v) -> str:
    return "n/a" if v is None else str(v)


def write_tables(result: dict, json_path: str | Path) -> tuple[Path, Path]:
    """The result as JSON (``json_path``) and CSV (same name, .csv; "n/a" where a metric does not apply)."""
    from quest_export_runtime.manifest import write_json_atomic
    from quest_export_runtime.outputs import check_output, write_text_atomic

    jpath = check_output(json_path, "file")
    cpath = check_output(jpath.with_suffix(".csv"), "file")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for row in [result["float"], *result["rows"]]:
        w.writerow([_cell(row.get(c)) for c in COLUMNS])
    write_json_atomic(jpath, result, allow_nan=False)
    write_text_atomic(cpath, buf.getvalue())
    return jpath, cpath


def table_rows(result: dict) -> list[list[str]]:
    """Printable rows: method, bits, FD, agreement %, PSNR, SSIM, seconds (reused rows marked)."""
    out = []
    for row in [result["float"], *result["rows"]]:
        agree = "n/a" if row["class_agreement"] is None else f"{100 * row['class_agreement']:.1f}%"
        fd = "n/a" if row["fd"] is None else f"{row['fd']:.2f}"
        psnr = "—" if row["method"] == "float" else ("inf" if row["psnr"] is None else f"{row['psnr']:.2f}")
        ssim = "—" if row["method"] == "float" else f"{row['ssim']:.4f}"
        secs = f"{row['seconds']:.1f}" + (" (reused)" if row.get("reused") else "")
        out.append([row["method"], row["bits"], fd, agree, psnr, ssim, secs])
    return out
