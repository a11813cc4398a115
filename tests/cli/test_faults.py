"""Bad input never gets a traceback or leaves a partial file (issue 20, docs/reliability.md).

Every case runs one CLI command on a tiny model and expects: its exit code, exactly one ``error: ...`` line on stderr
(the last line) holding the expected fragment, no traceback, and nothing left behind that was not there before (no
``*.tmp*`` file or folder, no lock, no half-written output). Output paths are refused before any work starts;
a full disk or a refused write in the middle of a write is planted in-process.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from quest_export_runtime.outputs import lock_path, output_lock
from safetensors.torch import save_file

import quest_export.log as qe_log
from cli.main import main
from tests.tiny import COND_DIM, COND_TOKENS, write_tiny_model_dir

ROOT = os.geteuid() == 0  # root ignores permission bits: the chmod cases cannot fail for it
QUICK = ["--set", "calib.samples_per_group=2", "--set", "sampler.steps=2"]


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-models")
    return {kind: write_tiny_model_dir(root, kind) for kind in ("cond", "uncond")}


@pytest.fixture(scope="session")
def cond_files(tmp_path_factory):
    """Conditioning files that must be refused, each with one fault (the tiny cond UNet's width and 5 rows)."""
    root = tmp_path_factory.mktemp("fault-cond")
    good = torch.randn(5, COND_TOKENS, COND_DIM)
    labels = json.dumps(["a", "b", "c", "d", "<unconditional>"])
    nan, inf = good.clone(), good.clone()
    nan[2, 0, 0] = float("nan")
    inf[3, 1, 1] = float("inf")
    files = {
        "int32": ((good * 10).to(torch.int32), {"uncond_index": "4", "labels": labels}),
        "nan": (nan, {"uncond_index": "4", "labels": labels}),
        "inf": (inf, {"uncond_index": "4", "labels": labels}),
        "rows": (good, {"uncond_index": "4", "labels": json.dumps(["a", "b", "<unconditional>"])}),
        "uncond": (good, {"uncond_index": "7", "labels": labels}),
        "good": (good, {"uncond_index": "4", "labels": labels}),
    }
    out = {}
    for name, (table, meta) in files.items():
        out[name] = root / f"{name}.safetensors"
        save_file({"encoder_hidden_states": table.contiguous()}, str(out[name]), metadata=meta)
    return out


@pytest.fixture(scope="session")
def bad_models(tmp_path_factory, models):
    """Model folders and artifacts with one fault each: the cases that passed before issue 20, kept as regressions.
    The pickle payload would create PWNED next to it if it were ever unpickled."""
    import pickle
    import shutil

    root = tmp_path_factory.mktemp("fault-bad")
    out = {}
    for name in ("config", "trunc", "pickle"):
        out[name] = root / name
        shutil.copytree(models["uncond"], out[name])
    (out["config"] / "unet" / "config.json").write_text("{not json")
    w = out["trunc"] / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    (out["pickle"] / "unet" / "diffusion_pytorch_model.safetensors").unlink()

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {root / 'PWNED'}",))

    (out["pickle"] / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    out["manifest"] = root / "bad-manifest"
    out["manifest"].mkdir()
    (out["manifest"] / "manifest.json").write_text("{bad")
    out["tampered"] = root / "tampered"
    out["tampered"].mkdir()
    (out["tampered"] / "model.onnx").write_bytes(b"changed after the build")
    (out["tampered"] / "manifest.json").write_text(json.dumps({"schema": 1, "stage": "export",
                                                               "files": {"model.onnx": "0" * 64}}))  # fmt: skip
    out["pwned"] = root / "PWNED"
    return out


@pytest.fixture
def place(tmp_path, monkeypatch, models, cond_files, bad_models):
    """The places a case names: {file} a plain file, {dir} a folder, {ro} a folder this user cannot write (0o500),
    {ok} a fresh path, {art} a folder with a manifest, {model}/{uncond} the tiny models, {cond_NAME} a
    conditioning file."""
    monkeypatch.setenv("QUEST_EXPORT_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("QUEST_EXPORT_NO_PROGRESS", "1")
    monkeypatch.setitem(qe_log._QUIET, "value", False)
    (tmp_path / "file").write_text("not a folder\n")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "keep.txt").write_text("mine\n")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    (tmp_path / "art").mkdir()  # the least `report` renders: a manifest with a stage
    (tmp_path / "vdir" / "verify.json").mkdir(parents=True)  # `verify` writes DIR/verify.json
    (tmp_path / "art" / "manifest.json").write_text(json.dumps({"schema": 1, "stage": "export"}))
    (tmp_path / "art" / "engine").write_text("not a folder\n")  # `build --from ART` writes ART/engine/
    yield {"file": tmp_path / "file", "dir": tmp_path / "dir", "ro": tmp_path / "ro", "ok": tmp_path / "new",
           "art": tmp_path / "art", "vdir": tmp_path / "vdir",
           "model": models["cond"], "uncond": models["uncond"], "tmp": tmp_path,
           **{f"cond:{k}": v for k, v in cond_files.items()}, **{f"bad:{k}": v for k, v in bad_models.items()}}  # fmt: skip
    (tmp_path / "ro").chmod(0o700)


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its content (None for folders)."""
    return {p.relative_to(root).as_posix(): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def leftovers(root: Path) -> list[str]:
    """Temporary files and folders, locks: what an interrupted or refused write must never leave."""
    return [p for p in tree(root) if ".tmp" in p or p.endswith(".lock") or ".old-" in p]


def run_cli(argv: list[str], place: dict) -> tuple[int, list[str], object]:
    args = [a.format(**{k.replace(":", "_"): v for k, v in place.items()}) for a in argv]
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.stderr.strip().splitlines(), result


def assert_one_line(rc: int, lines: list[str], result, want_rc: int, fragment: str) -> str:
    assert rc == want_rc, (rc, lines, result.exception)
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines  # one line, the last one
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.exception
    return errors[0]


# (case, argv, rc, stderr fragment); {x} are the places of the `place` fixture, nothing may be left behind
CASES = [
    # -- output paths: a file as the parent, a folder where a file goes (and the reverse), an unwritable folder
    ("sample-out-parent-is-file", ["sample", "--model", "{model}", "--out", "{file}/grid.png"], 2, "{file} is a file, not a folder"),
    ("sample-out-is-dir", ["sample", "--model", "{model}", "--out", "{dir}"], 2, "{dir}: is a folder, the output here is a file"),
    ("sample-out-unwritable", ["sample", "--model", "{model}", "--out", "{ro}/grid.png"], 2, "cannot write in {ro} (permission denied)"),
    ("sample-dir-out-is-dir", ["sample", "{dir}", "--out", "{dir}"], 2, "{dir}: is a folder, the output here is a file"),
    ("sample-dir-out-parent-is-file", ["sample", "{dir}", "--out", "{file}/a/b.png"], 2, "{file} is a file, not a folder"),
    ("eval-grid-is-dir", ["eval", "--model", "{model}", "--n", "2", "--grid", "{dir}"], 2, "{dir}: is a folder"),
    ("eval-grid-parent-is-file", ["eval", "--model", "{model}", "--n", "2", "--grid", "{file}/g.png"], 2, "{file} is a file, not a folder"),
    ("report-out-is-dir", ["report", "{dir}", "--out", "{dir}"], 2, "{dir}: is a folder, the output here is a file"),
    ("report-out-parent-is-file", ["report", "{dir}", "--out", "{file}/report.md"], 2, "{file} is a file, not a folder"),
    ("report-out-unwritable", ["report", "{dir}", "--out", "{ro}/report.md"], 2, "cannot write in {ro}"),
    ("export-out-is-file", ["export", "{dir}", "--target", "cpu", "--out", "{file}"], 2, "{file}: is a file, the output here is a folder"),
    ("export-out-parent-is-file", ["export", "{dir}", "--target", "cpu", "--out", "{file}/exp"], 2, "{file} is a file, not a folder"),
    ("calibrate-out-is-file", ["calibrate", "--model", "{model}", *QUICK, "--out", "{file}"], 2, "{file}: is a file, the output here is a folder"),
    ("calibrate-out-unwritable", ["calibrate", "--model", "{model}", *QUICK, "--out", "{ro}/cal"], 2, "cannot write in {ro}"),
    ("quantize-out-parent-is-file", ["quantize", "--model", "{model}", *QUICK, "--out", "{file}/q"], 2, "{file} is a file, not a folder"),
    ("quantize-out-is-file", ["quantize", "--model", "{model}", *QUICK, "--out", "{file}"], 2, "{file}: is a file, the output here is a folder"),
    ("quantize-work-is-file", ["quantize", "--model", "{model}", *QUICK, "--work", "{file}"], 2, "{file}: is a file, the output here is a folder"),
    ("build-out-is-file", ["build", "--model", "{model}", *QUICK, "--out", "{file}"], 2, "{file}: is a file, the output here is a folder"),
    ("build-out-parent-is-file", ["build", "--model", "{model}", *QUICK, "--out", "{file}/b"], 2, "{file} is a file, not a folder"),
    ("build-out-unwritable", ["build", "--model", "{model}", *QUICK, "--out", "{ro}/b"], 2, "cannot write in {ro}"),
    ("build-work-unwritable", ["build", "--model", "{model}", *QUICK, "--work", "{ro}/w"], 2, "cannot write in {ro}"),
    ("verify-json-is-dir", ["verify", "{vdir}"], 2, "{vdir}/verify.json: is a folder, the output here is a file"),
    ("build-from-engine-is-file", ["build", "--from", "{art}"], 2, "{art}/engine: is a file, the output here is a folder"),
    ("build-from-out-is-file", ["build", "--from", "{dir}", "--out", "{file}"], 2, "{file}: is a file, the output here is a folder"),
    # -- counts and steps
    ("sample-n-0", ["sample", "--model", "{model}", "--n", "0", "--out", "{ok}.png"], 2, "--n 0: must be at least 1"),
    ("sample-n-negative", ["sample", "--model", "{model}", "--n", "-3", "--out", "{ok}.png"], 2, "--n -3: must be at least 1"),
    ("sample-steps-0", ["sample", "--model", "{model}", "--steps", "0", "--out", "{ok}.png"], 2, "--steps 0: must be at least 1"),
    ("sample-dir-n-0", ["sample", "{dir}", "--n", "0", "--out", "{ok}.png"], 2, "--n 0: must be at least 1"),
    ("eval-n-0", ["eval", "--model", "{model}", "--n", "0"], 2, "--n 0: must be at least 1"),
    ("eval-n-negative", ["eval", "--model", "{model}", "--n", "-1"], 2, "--n -1: must be at least 1"),
    ("eval-steps-0", ["eval", "--model", "{model}", "--n", "2", "--steps", "0"], 2, "--steps 0: must be at least 1"),
    # -- conditioning files
    ("cond-int32", ["sample", "--model", "{model}", "--cond", "{cond_int32}", "--out", "{ok}.png"], 2, "encoder_hidden_states is int32"),
    ("cond-nan", ["sample", "--model", "{model}", "--cond", "{cond_nan}", "--out", "{ok}.png"], 2, "row(s) 2 hold NaN or Inf"),
    ("cond-inf", ["info", "{model}", "--cond", "{cond_inf}"], 2, "row(s) 3 hold NaN or Inf"),
    ("cond-label-rows", ["info", "{model}", "--cond", "{cond_rows}"], 2, "'labels' has 3 names for 5 encoder_hidden_states rows"),
    ("cond-uncond-index", ["info", "{model}", "--cond", "{cond_uncond}"], 2, "uncond_index=7 is not a row (0..4)"),
    ("cond-unconditional-model", ["info", "{uncond}", "--cond", "{cond_good}"], 2, "is an unconditional UNet2DModel"),
    # -- cases that already passed before issue 20, kept as regressions: bad models, bad recipes, bad artifacts
    ("model-missing", ["info", "{ok}"], 2, "model '{ok}' not found"),
    ("model-config-corrupt", ["info", "{bad_config}"], 2, "{bad_config}/unet/config.json is not readable JSON"),
    ("model-weights-truncated", ["sample", "--model", "{bad_trunc}", "--out", "{ok}.png"], 2, "could not load the UNet weights in {bad_trunc}/unet"),
    ("model-weights-pickle", ["sample", "--model", "{bad_pickle}", "--out", "{ok}.png"], 2, "is a pickle checkpoint, which quest-export never loads"),
    ("set-unknown-key", ["info", "{uncond}", "--set", "quant.a_bitz=4"], 2, "did you mean 'quant.a_bits'"),
    ("set-bad-value", ["info", "{uncond}", "--set", "quant.a_bits=99"], 2, "quant.a_bits=99 is out of range"),
    ("bits-unknown", ["info", "{uncond}", "--bits", "w3a3"], 2, "w3a3"),
    ("method-unknown", ["info", "{uncond}", "--method", "gptq"], 2, "gptq"),
    ("target-unknown", ["info", "{uncond}", "--target", "tpu"], 2, "unknown target 'tpu'"),
    ("artifact-manifest-corrupt", ["sample", "{bad_manifest}", "--out", "{ok}.png"], 2, "{bad_manifest}/manifest.json is corrupt"),
    ("artifact-tampered", ["sample", "{bad_tampered}", "--out", "{ok}.png"], 2, "does not match its manifest hash"),
    ("verify-tampered", ["verify", "{bad_tampered}", "--manifest-only"], 2, "does not match its manifest hash"),
    ("cond-missing-file", ["info", "{model}", "--cond", "{ok}.safetensors"], 2, "--cond {ok}.safetensors: file not found"),
    ("device-unknown", ["info", "{uncond}", "--device", "tpu"], 2, "device='tpu' is not allowed"),
    ("lint-missing-model", ["lint", "{ok}.onnx", "--target", "cpu"], 2, "ONNX model {ok}.onnx does not exist"),
    ("lint-not-onnx", ["lint", "{file}", "--target", "cpu"], 2, "{file} is not a readable ONNX model"),
    ("report-not-an-artifact", ["report", "{dir}"], 2, "{dir} is not a quest-export artifact (no manifest.json)"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "argv", "rc", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_fault(case, argv, rc, fragment, place):
    if "{ro}" in " ".join(argv) and ROOT:
        pytest.skip("running as root, which ignores permission bits (the in-process EACCES case covers the write)")
    before = tree(place["tmp"])
    code, lines, result = run_cli(argv, place)
    names = {k.replace(":", "_"): v for k, v in place.items()}
    assert_one_line(code, lines, result, rc, fragment.format(**names))
    after = tree(place["tmp"])
    assert not leftovers(place["tmp"]), leftovers(place["tmp"])
    assert after == before, sorted(set(after) ^ set(before))  # refused before any work: nothing written or changed
    assert not place["bad:pwned"].exists(), "a pickle payload was executed"


def test_the_good_conditioning_file_is_accepted(place):
    """The control of the cond cases: the same table without the fault loads."""
    code, lines, result = run_cli(["info", "{model}", "--cond", "{cond_good}"], place)
    assert code == 0, (lines, result.output)


# -- a write that fails half-way: disk full, refused ---------------------------------------------------------------


def plant_write_failure(monkeypatch, method: str, err: int):
    """Path.<method> writes half its data, then fails with ``err`` (a full disk, a refused write); method
    "save_file": safetensors' writer, which raises its own SafetensorError with the OS message in it."""
    calls = []
    if method == "save_file":
        import safetensors.torch
        from safetensors import SafetensorError

        def full(tensors, filename, *args, **kwargs):
            calls.append(filename)
            Path(filename).write_bytes(b"\0" * 100)
            raise SafetensorError(f'Error while serializing: IoError(Os {{ code: {err}, kind: StorageFull, '
                                  f'message: "{os.strerror(err)}" }})')  # fmt: skip

        monkeypatch.setattr(safetensors.torch, "save_file", full)
        return calls
    real = getattr(pathlib.Path, method)

    def failing(self, data, *args, **kwargs):
        calls.append(self)
        real(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(err, os.strerror(err), str(self))

    monkeypatch.setattr(pathlib.Path, method, failing)
    return calls


WRITE_FAULTS = [
    ("sample-disk-full", ["sample", "--model", "{model}", "--n", "2", "--steps", "2", "--out", "{ok}/grid.png"],
     "write_bytes", errno.ENOSPC, "{ok}/grid.png: could not be written (No space left on device)"),
    ("sample-write-refused", ["sample", "--model", "{model}", "--n", "2", "--steps", "2", "--out", "{ok}.png"],
     "write_bytes", errno.EACCES, "{ok}.png: could not be written (Permission denied)"),
    ("calibrate-disk-full", ["calibrate", "--model", "{model}", *QUICK, "--out", "{ok}"],
     "write_text", errno.ENOSPC, "{ok}: could not be written (No space left on device)"),
    ("calibrate-disk-full-safetensors", ["calibrate", "--model", "{model}", *QUICK, "--out", "{ok}"],
     "save_file", errno.ENOSPC, "{ok}: could not be written (No space left on device)"),
    ("report-disk-full", ["report", "{art}", "--out", "{ok}.md"],
     "write_bytes", errno.ENOSPC, "{ok}.md: could not be written (No space left on device)"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "argv", "method", "err", "fragment"), WRITE_FAULTS, ids=[c[0] for c in WRITE_FAULTS])
def test_failed_write_leaves_nothing(case, argv, method, err, fragment, place, monkeypatch):
    calls = plant_write_failure(monkeypatch, method, err)
    code, lines, result = run_cli(argv, place)
    names = {k.replace(":", "_"): v for k, v in place.items()}
    assert calls, "the planted write was never reached"
    assert_one_line(code, lines, result, 2, fragment.format(**names))
    assert not leftovers(place["tmp"]), leftovers(place["tmp"])
    assert not list(place["tmp"].glob("new*")), "a half-written output was left"


# -- two runs writing the same artifact ----------------------------------------------------------------------------


PTQ = ["--method", "ptq", "--set", "ptq.adaround_iters=0", "--set", "quant.timestep_groups=1"]


@pytest.mark.parametrize("verb", ["calibrate", "quantize", "build", "export RUN_DIR"])
def test_a_held_output_lock_refuses_a_second_writer(verb, place):
    """Another run writing the same artifact (its lock held): refused with one line naming its pid, before any
    byte of the artifact is written; once released, the same command runs (calibrate: to the end)."""
    out = place["ok"]
    argv = [verb, "--model", "{model}", *QUICK, *PTQ, *(["--target", "cpu"] if verb == "build" else []),
            "--out", str(out)]  # fmt: skip
    if verb == "export RUN_DIR":
        run_dir = place["tmp"] / "q"
        code, lines, result = run_cli(["quantize", "--model", "{model}", *QUICK, *PTQ, "--out", str(run_dir)], place)
        assert code == 0, (lines, result.exception)
        argv = ["export", str(run_dir), "--target", "cpu", "--out", str(out)]
    with output_lock(out) as held:  # as another run would: its own open file, so the CLI's flock conflicts
        assert held == lock_path(out) and held.read_text().strip() == str(os.getpid())
        code, lines, result = run_cli(argv, place)
        assert_one_line(code, lines, result, 2, f"{out}: another quest-export run (pid {os.getpid()}) is writing it")
        assert not out.exists()
    assert not lock_path(out).exists()  # released: the lock file goes with it
    if verb != "calibrate":
        return
    code, lines, result = run_cli(argv, place)
    assert code == 0, (lines, result.exception)
    assert (out / "manifest.json").is_file() and not leftovers(place["tmp"]), leftovers(place["tmp"])


def test_a_lock_held_by_another_process_names_it(place):
    """Two processes: a second `quest-export calibrate` while a first one holds the artifact's lock."""
    import subprocess
    import sys

    out = place["ok"]
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "from quest_export_runtime.outputs import output_lock\n"
                               "with output_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n",
                               str(out)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        code, lines, result = run_cli(["calibrate", "--model", "{model}", *QUICK, "--out", str(out)], place)
        assert_one_line(code, lines, result, 2, f"{out}: another quest-export run (pid {holder.pid}) is writing it")
    finally:
        holder.terminate()
        holder.wait()
        holder.stdout.close()
    assert not out.exists()


# -- lint on a graph its target's rules are not about --------------------------------------------------------------


def _graph(path: Path, inputs: list, *, quantized: bool) -> Path:
    """A one-Conv graph: float, or with a weight DequantizeLinear (a quantized op)."""
    w = numpy_helper.from_array(np.ones((1, 1, 1, 1), np.int8 if quantized else np.float32), "w")
    inits, nodes = [w], []
    if quantized:
        inits += [numpy_helper.from_array(np.array([0.1], np.float32), "w_scale"),
                  numpy_helper.from_array(np.array([0], np.int8), "w_zp")]  # fmt: skip
        nodes.append(helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["w_dq"], name="w_dq", axis=0))
    nodes.append(helper.make_node("Conv", [inputs[0].name, "w_dq" if quantized else "w"], ["out"], name="conv"))
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, [out], inits),
                              opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_lint_does_not_call_a_float_or_foreign_graph_ok(tmp_path):
    sample = helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", 1, 8, 8])
    timestep = helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["batch"])
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [64, 1, 8, 8])
    big = helper.make_tensor_value_info("sample", TensorProto.FLOAT, [64, 1, 8, 8])
    cases = {
        "float": (_graph(tmp_path / "float.onnx", [sample, timestep], quantized=False), ["G-1"]),
        "foreign": (_graph(tmp_path / "foreign.onnx", [image], quantized=True), ["G-2"]),
        "big-batch": (_graph(tmp_path / "big.onnx", [big, timestep], quantized=True), ["G-2"]),
        "good": (_graph(tmp_path / "good.onnx", [sample, timestep], quantized=True), []),
    }
    for name, (path, rules) in cases.items():
        result = CliRunner().invoke(main, ["lint", str(path), "--target", "cpu", "--json"])
        assert result.exit_code == 0, (name, result.output)  # warnings: the graph may still run
        found = sorted({w["rule"] for w in json.loads(result.stdout)["warnings"] if w["rule"].startswith("G-")})
        assert found == rules, (name, result.stdout)
        text = CliRunner().invoke(main, ["lint", str(path), "--target", "cpu"]).stdout.strip().splitlines()
        if rules:
            assert text[-1].startswith("NOT CHECKED: no hard rule is broken, but this is not a graph"), text
            assert not any(ln.startswith("OK") for ln in text), text
        else:
            assert text[-1] == "OK: no hard rule of the target is broken", text
    foreign = CliRunner().invoke(main, ["lint", str(cases["foreign"][0]), "--target", "cpu"]).stdout
    assert "['image'], not the target's UNet interface: ['sample', 'timestep'] missing" in foreign
    assert "fixed batch of 64" not in foreign  # 'image' is not an interface input: named, not batch-checked
    big = CliRunner().invoke(main, ["lint", str(cases["big-batch"][0]), "--target", "cpu"]).stdout
    assert "fixed batch of 64; target 'cpu' runs at most 8 images per call (16 UNet rows under guidance)" in big
