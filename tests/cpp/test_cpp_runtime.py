"""The C++ runtime (runtime/cpp): builds it with CMake into a temporary folder and checks it against Python.

What is checked:
  1. the core builds with -Wall -Wextra -Werror, and configure says why each missing backend is not built;
  2. the DDIM sampler reproduces diffusers' DDIMScheduler (and quest_export_runtime.schedulers where present)
     on the same x_T, model outputs and variance noise;
  3. the timestep-group rule g(t) = max{g : t_g >= t}, 0 if t > t_0;
  4. the manifest check refuses a tampered, a missing and an escaping file, and an unknown schema, with one line;
  5. sha256 (OpenSSL EVP) against hashlib, JSON (nlohmann/json) against Python's json, the own safetensors reader
     against the safetensors package;
  6. the PNG writer (libpng): the file decodes with zlib/struct to the same pixels, the grid equals images.make_grid;
  7. where the ONNX Runtime backend is built: a tiny ONNX model through the C++ backend vs onnxruntime Python,
     and quest_sample end to end (guidance, scale-input groups) vs the same loop in Python.

The ONNX Runtime backend is built when an ONNX Runtime prefix is found: $ONNXRUNTIME_ROOT, or the prefix
that runtime/cpp/scripts/setup_onnxruntime.sh writes (~/.cache/quest-export/onnxruntime).
"""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from quest_export_runtime.session import ORT_DISABLED_OPTIMIZERS, ORT_SESSION_CONFIG

from tests.cpp.cppbuild import SRC, Build, run  # noqa: F401 - the `build` fixture is in conftest.py

# DDIM agreement with diffusers (which steps in float32): |cpp - ref| <= RTOL * |ref| + ATOL_REL * max|ref|,
# over every step of the trajectory. Measured (x86-64, gcc 12, diffusers 0.42.1): at most 3.5e-7 of max|ref|
# over the DDIM_CASES; the bound is the brief's 1e-5 (about 30x margin).
DDIM_RTOL = 1e-5
DDIM_ATOL_REL = 1e-5
# Against quest_export_runtime.schedulers (same float32 tables, float64 steps): measured bit-identical (0 ulp);
# 1e-7 of max|ref| allows one or two float32 ulps of reordering and still catches float64 tables (~1e-6).
NUMPY_REF_ATOL_REL = 1e-7


# --------------------------------------------------------------------------- 1. build and backend detection


def test_core_builds_and_reports_backends(build):
    for name in ("quest_sample", "quest_selftest"):
        assert build.exe(name).is_file(), f"{name} was not built"
    listing = run(build, "quest_sample", "--list-backends").stdout
    lines = {ln.split(":")[0]: ln for ln in listing.splitlines()}
    assert set(lines) == {"ort", "trt"}, listing
    for kind, log_name in (("ort", "ONNX Runtime backend"), ("trt", "TensorRT backend")):
        assert f"quest: {log_name}:" in build.configure_log
        if "not built" in lines[kind]:  # a backend that is not built says what was looked for and the variable to set
            assert f"quest: {log_name}: OFF" in build.configure_log
            hint = {"ort": ("onnxruntime_cxx_api.h", "ONNXRUNTIME_ROOT"), "trt": ("NvInfer.h", "TENSORRT_ROOT")}[kind]
            for word in hint:
                assert word in lines[kind], lines[kind]
    if build.ort_requested:
        assert "ort: built" in lines["ort"], f"ONNX Runtime prefix given but the backend was not built:\n{listing}"


def test_missing_onnxruntime_is_explained(build, tmp_path):
    """Configure with an ONNX Runtime prefix that does not exist: the message names the file, place and variable."""
    bogus = tmp_path / "no-onnxruntime-here"
    proc = subprocess.run(
        ["cmake", "-S", str(SRC), "-B", str(tmp_path / "b"), f"-DONNXRUNTIME_ROOT={bogus}", "-DQUEST_WITH_TRT=OFF"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if "ONNX Runtime backend" in ln)
    if "OFF" not in line:
        pytest.skip(f"ONNX Runtime found in the system paths despite the bogus prefix: {line}")
    for word in ("onnxruntime_cxx_api.h", "libonnxruntime.so", str(bogus), "-DONNXRUNTIME_ROOT"):
        assert word in line, line


@pytest.mark.parametrize(
    "package,words",
    [
        ("nlohmann_json", ("nlohmann/json", "nlohmann-json3-dev")),
        ("OpenSSL", ("libcrypto", "libssl-dev")),
        ("PNG", ("libpng", "libpng-dev")),
    ],
)
def test_missing_core_library_stops_configure_with_the_package(build, tmp_path, package, words):
    """A core library CMake cannot find stops configure with one message naming it and the apt package."""
    proc = subprocess.run(
        ["cmake", "-S", str(SRC), "-B", str(tmp_path / "b"), f"-DCMAKE_DISABLE_FIND_PACKAGE_{package}=ON",
         "-DQUEST_WITH_TRT=OFF", "-DQUEST_WITH_ORT=OFF"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0, "configure succeeded without " + package
    err = " ".join(proc.stderr.split())
    for w in (*words, "make system-deps"):
        assert w in err, err


# --------------------------------------------------------------------------- 2. DDIM vs diffusers


DDIM_CASES = {
    "linear-leading-eps-clip": dict(cfg={"beta_schedule": "linear", "clip_sample": True}, steps=50, eta=0.0),
    "scaled-trailing-noclip": dict(
        cfg={
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "clip_sample": False,
            "timestep_spacing": "trailing",
        },
        steps=20,
        eta=0.0,
    ),
    "linear-linspace-eta": dict(cfg={"timestep_spacing": "linspace", "clip_sample": False}, steps=7, eta=0.5),
    "cosine-offset-noalpha1-eta1": dict(
        cfg={
            "beta_schedule": "squaredcos_cap_v2",
            "steps_offset": 1,
            "set_alpha_to_one": False,
            "clip_sample_range": 2.0,
        },
        steps=25,
        eta=1.0,
    ),
    "vpred-trailing": dict(
        cfg={"prediction_type": "v_prediction", "timestep_spacing": "trailing", "clip_sample": False}, steps=3, eta=0.0
    ),
    "sample-linspace-clip": dict(
        cfg={"prediction_type": "sample", "timestep_spacing": "linspace", "clip_sample_range": 0.5}, steps=10, eta=0.3
    ),
    "trained-betas": dict(
        cfg={"num_train_timesteps": 100, "trained_betas": list(np.linspace(1e-3, 0.05, 100)), "clip_sample": False},
        steps=9,
        eta=0.0,
    ),
}


def _diffusers_ddim(cfg: dict, steps: int, eta: float, x: np.ndarray, eps: np.ndarray, z: np.ndarray | None):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler.from_config(cfg)
    sched.set_timesteps(steps)
    ts = sched.timesteps.numpy().astype(np.int64)
    xt, trajectory = torch.from_numpy(x.copy()), []
    for i, t in enumerate(ts.tolist()):
        noise = torch.from_numpy(z[i]) if eta > 0 else None
        xt = sched.step(torch.from_numpy(eps[i]), t, xt, eta=eta, variance_noise=noise).prev_sample
        trajectory.append(xt.numpy())
    return ts, np.stack(trajectory)  # (S, *x.shape): every step is compared, not only the last


def _numpy_runtime_ddim(cfg: dict, steps: int, eta: float, x: np.ndarray, eps: np.ndarray, z: np.ndarray | None):
    """The Python runtime's own scheduler, if another engineer's module is present (it is written concurrently)."""
    try:
        from quest_export_runtime import schedulers
    except ImportError as e:
        pytest.skip(f"quest_export_runtime.schedulers not importable ({e}); diffusers comparison still runs")
    if not hasattr(schedulers, "DDIMScheduler"):
        pytest.skip("quest_export_runtime.schedulers has no DDIMScheduler")
    sched = schedulers.DDIMScheduler(cfg)
    ts = np.asarray(sched.set_timesteps(steps), dtype=np.int64)
    xt, trajectory = x.copy(), []
    for i, t in enumerate(ts.tolist()):
        out = sched.step(eps[i], t, xt, eta=eta, variance_noise=z[i] if eta > 0 else None)
        xt = np.asarray(out[0], dtype=np.float32)
        trajectory.append(xt)
    return ts, np.stack(trajectory)


def _ddim_inputs(tmp_path: Path, cfg: dict, steps: int, eta: float, n_steps: int):
    rng = np.random.default_rng(zlib.crc32(f"{json.dumps(cfg, sort_keys=True)}|{steps}|{eta}".encode()))
    x = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    eps = (0.8 * rng.standard_normal((n_steps, *x.shape))).astype(np.float32)
    z = rng.standard_normal((n_steps, *x.shape)).astype(np.float32) if eta > 0 else None
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "eps.npy", eps)
    if z is not None:
        np.save(tmp_path / "z.npy", z)
    return x, eps, z


def _cpp_ddim(build, tmp_path, steps, eta, with_z):
    args = [
        "ddim",
        "--config",
        tmp_path / "cfg.json",
        "--steps",
        steps,
        "--eta",
        repr(eta),
        "--x",
        tmp_path / "x.npy",
        "--eps",
        tmp_path / "eps.npy",
        "--out",
        tmp_path / "out.npy",
    ]
    if with_z:
        args += ["--z", tmp_path / "z.npy"]
    run(build, "quest_selftest", *args)
    ts = run(build, "quest_selftest", "timesteps", "--config", tmp_path / "cfg.json", "--steps", steps).stdout
    return np.array([int(v) for v in ts.strip().split(",")], dtype=np.int64), np.load(tmp_path / "out.npy")


def _assert_close(got, ref, rtol, atol_rel, what):
    atol = atol_rel * max(1.0, float(np.abs(ref).max()))
    err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    bad = err > atol + rtol * np.abs(ref)
    assert not bad.any(), f"{what}: {bad.sum()} elements differ; max abs err {err.max():.3e} (atol {atol:.3e})"


def _ddim_case(build, tmp_path, case):
    """The C++ DDIM run of one case: (cfg, steps, eta, x, eps, z, cpp timesteps, cpp outputs)."""
    spec = DDIM_CASES[case]
    cfg, steps, eta = spec["cfg"], spec["steps"], spec["eta"]
    diffusers = pytest.importorskip("diffusers")
    s = diffusers.DDIMScheduler.from_config(cfg)
    s.set_timesteps(steps)
    x, eps, z = _ddim_inputs(tmp_path, cfg, steps, eta, len(s.timesteps))
    return (cfg, steps, eta, x, eps, z, *_cpp_ddim(build, tmp_path, steps, eta, z is not None))


@pytest.mark.parametrize("case", sorted(DDIM_CASES))
def test_ddim_matches_diffusers(build, tmp_path, case):
    cfg, steps, eta, x, eps, z, ts_cpp, out_cpp = _ddim_case(build, tmp_path, case)
    ts_ref, out_ref = _diffusers_ddim(cfg, steps, eta, x, eps, z)
    np.testing.assert_array_equal(ts_cpp, ts_ref, err_msg="timesteps differ from diffusers' set_timesteps")
    _assert_close(out_cpp, out_ref, DDIM_RTOL, DDIM_ATOL_REL, f"DDIM {case} vs diffusers")


@pytest.mark.parametrize("case", sorted(DDIM_CASES))
def test_ddim_matches_python_runtime_scheduler(build, tmp_path, case):
    cfg, steps, eta, x, eps, z, ts_cpp, out_cpp = _ddim_case(build, tmp_path, case)
    ts_ref, out_ref = _numpy_runtime_ddim(cfg, steps, eta, x, eps, z)
    np.testing.assert_array_equal(ts_cpp, ts_ref)
    _assert_close(out_cpp, out_ref, 0.0, NUMPY_REF_ATOL_REL, f"DDIM {case} vs quest_export_runtime.schedulers")


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timesteps_match_diffusers_for_many_step_counts(build, tmp_path, spacing):
    diffusers = pytest.importorskip("diffusers")
    for T, offset in ((1000, 0), (1000, 1), (37, 0)):
        cfg = {"num_train_timesteps": T, "timestep_spacing": spacing, "steps_offset": offset}
        (tmp_path / "cfg.json").write_text(json.dumps(cfg))
        for steps in sorted({1, 2, 3, 6, 7, 9, 10, 25, 33, 50, 99, 100, 333, 999, T} & set(range(1, T + 1))):
            s = diffusers.DDIMScheduler.from_config(cfg)
            s.set_timesteps(steps)
            ref = s.timesteps.numpy().astype(np.int64)
            if ref.max() >= T:  # leading + steps_offset can leave [0, T): the C++ runtime refuses it
                proc = run(
                    build,
                    "quest_selftest",
                    "timesteps",
                    "--config",
                    tmp_path / "cfg.json",
                    "--steps",
                    steps,
                    check=False,
                )
                assert proc.returncode == 2 and "outside" in proc.stderr, proc.stderr
                continue
            got = run(build, "quest_selftest", "timesteps", "--config", tmp_path / "cfg.json", "--steps", steps).stdout
            assert [int(v) for v in got.strip().split(",")] == ref.tolist(), f"T={T} offset={offset} steps={steps}"


def test_scheduler_config_refusals(build, tmp_path):
    for cfg, word in (
        ({"thresholding": True}, "thresholding"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"timestep_spacing": "karras"}, "timestep_spacing"),
        ({"clip_sample": "yes"}, "clip_sample"),
    ):
        (tmp_path / "cfg.json").write_text(json.dumps(cfg))
        proc = run(build, "quest_selftest", "timesteps", "--config", tmp_path / "cfg.json", "--steps", 10, check=False)
        assert proc.returncode == 2 and word in proc.stderr, proc.stderr


# --------------------------------------------------------------------------- 3. timestep groups


def _group_rule(ts: list[int], t: float) -> int:
    return max((g for g, tg in enumerate(ts) if tg >= t), default=0)


@pytest.mark.parametrize("group_ts", [[800, 500, 200], [999, 0], [640], []])
def test_group_selection_follows_the_rule(build, group_ts):
    ts_values = [1000, 999, 801, 800, 799.5, 650, 500, 499, 300, 201, 200, 199, 100, 1, 0, -1]
    got = run(
        build,
        "quest_selftest",
        "groups",
        "--timesteps",
        ",".join(map(str, group_ts)),
        "--t",
        ",".join(map(str, ts_values)),
    ).stdout
    expected = [_group_rule(group_ts, t) for t in ts_values]
    assert [int(v) for v in got.strip().split(",")] == expected
    if group_ts:  # the table covers t > t_0 (group 0) and t < t_{G-1} (last group)
        assert expected[0] == 0 and expected[-1] == len(group_ts) - 1


# --------------------------------------------------------------------------- bundles


def sha256_file(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def write_manifest(root: Path, stage: str, extra: dict) -> dict:
    """docs/formats.md manifest: files = sha256 of every file except manifest.json."""
    files = {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }
    manifest = {
        "schema": 1,
        "stage": stage,
        "recipe_fingerprint": "ab" * 32,
        "config": {},
        "inputs": {},
        "files": files,
        "versions": {},
        "created": "2026-01-01T00:00:00Z",
        **extra,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def write_conditioning(path: Path, rows: np.ndarray, uncond_index: int, labels: list[str]):
    from safetensors.numpy import save_file

    save_file(
        {"encoder_hidden_states": rows.astype(np.float32)},
        str(path),
        metadata={"uncond_index": str(uncond_index), "labels": json.dumps(labels)},
    )


C, H, W = 1, 6, 5  # sample shape per image
L, D = 2, 4  # conditioning shape per row
K = 3  # act_scale_ratios entries


def make_bundle(
    root: Path,
    *,
    scale_mode: str,
    group_ts: list[int],
    conditional: bool,
    graph_bytes: dict[str, bytes | None],
    sampler: dict,
    scheduler_config: dict,
    scale_ratios=None,
    channels: int = C,
) -> Path:
    """A bundle folder; graph_bytes maps graph file -> content (None: the file is already in root)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, data in graph_bytes.items():
        if data is not None:
            (root / name).write_bytes(data)
    inputs = [
        {"name": "sample", "dtype": "float32", "shape": ["batch", channels, H, W]},
        {"name": "timestep", "dtype": "float32", "shape": ["batch"]},
    ]
    conditioning = None
    if conditional:
        rows = np.random.default_rng(7).standard_normal((5, L, D)).astype(np.float32)
        rows[3] = 0.0  # unconditional row
        write_conditioning(root / "conditioning.safetensors", rows, 3, ["a", "b", "c", "null", "e"])
        conditioning = {"file": "conditioning.safetensors", "uncond_index": 3, "labels": ["a", "b", "c", "null", "e"]}
        inputs.append({"name": "encoder_hidden_states", "dtype": "float32", "shape": ["batch", L, D]})
    if scale_mode == "scale-input":
        inputs.append({"name": "act_scale_ratios", "dtype": "float32", "shape": [K]})
    names = sorted(graph_bytes)
    graphs = [{"file": n, "group": (i if scale_mode == "per-group" else None)} for i, n in enumerate(names)]
    extra = {
        "target": {"id": "cpu"},
        "scale_mode": scale_mode,
        "graphs": graphs,
        "weights_file": None,
        "groups": {"count": len(group_ts), "timesteps": group_ts, "rule": "max{g : t_g >= t}, 0 if t > t_0"},
        "sampler": sampler,
        "scheduler_config": scheduler_config,
        "conditioning": conditioning,
        "io": {
            "inputs": inputs,
            "outputs": [{"name": "noise_pred", "dtype": "float32", "shape": ["batch", channels, H, W]}],
        },
    }
    if scale_ratios is not None:
        extra["scale_ratios"] = scale_ratios
    write_manifest(root, "bundle", extra)
    return root


SCHED_CFG = {
    "_class_name": "DDPMScheduler",
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "clip_sample": True,
    "variance_type": "fixed_small",
}


@pytest.fixture
def dummy_bundle(tmp_path) -> Path:
    return make_bundle(
        tmp_path / "bundle",
        scale_mode="merged",
        group_ts=[700, 300],
        conditional=True,
        graph_bytes={"model.onnx": b"not really onnx, only hashed"},
        sampler={"sampler": "ddim", "steps": 4, "eta": 0.0, "guidance_scale": 2.0},
        scheduler_config=SCHED_CFG,
    )


# --------------------------------------------------------------------------- 4. manifest refusals


def _refused(proc, *words):
    assert proc.returncode == 2, f"expected exit 2, got {proc.returncode}\nstdout {proc.stdout}\nstderr {proc.stderr}"
    msg = proc.stderr.strip()
    assert msg.count("\n") == 0, f"refusal is not one line:\n{msg}"
    for w in words:
        assert w in msg, f"'{w}' not in: {msg}"


def test_valid_bundle_passes_check(build, dummy_bundle):
    out = run(build, "quest_sample", dummy_bundle, "--check").stdout
    n_files = len(json.loads((dummy_bundle / "manifest.json").read_text())["files"])
    assert n_files == 2 and "OK" in out and f"{n_files} files verified" in out


def test_tampered_file_is_refused(build, dummy_bundle):
    p = dummy_bundle / "conditioning.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x01
    p.write_bytes(bytes(data))
    _refused(
        run(build, "quest_sample", dummy_bundle, "--check", check=False),
        "conditioning.safetensors",
        "does not match its manifest hash",
    )
    # sampling refuses it too, before any backend is created (whichever backends this build has)
    _refused(
        run(build, "quest_sample", dummy_bundle, "--n", 1, "--out", dummy_bundle / "g.png", check=False),
        "conditioning.safetensors",
        "tampered",
    )
    assert not (dummy_bundle / "g.png").exists()


def test_missing_file_is_refused(build, dummy_bundle):
    (dummy_bundle / "model.onnx").unlink()
    _refused(run(build, "quest_sample", dummy_bundle, "--check", check=False), "model.onnx", "missing")


def test_unknown_schema_and_escaping_path_are_refused(build, dummy_bundle):
    m = json.loads((dummy_bundle / "manifest.json").read_text())
    (dummy_bundle / "manifest.json").write_text(json.dumps({**m, "schema": 2}))
    _refused(run(build, "quest_sample", dummy_bundle, "--check", check=False), "schema 2", "reads schema 1")
    (dummy_bundle / "manifest.json").write_text(json.dumps({**m, "files": {**m["files"], "../outside": "0" * 64}}))
    _refused(run(build, "quest_sample", dummy_bundle, "--check", check=False), "../outside", "inside the folder")
    (dummy_bundle / "manifest.json").write_text("{not json")
    _refused(run(build, "quest_sample", dummy_bundle, "--check", check=False), "corrupt")


def test_manifest_written_by_quest_export_is_read(build, dummy_bundle):
    """The contract runs both ways: a manifest from quest_export_runtime.manifest.write_manifest passes the C++ check."""
    try:
        from quest_export_runtime.manifest import BASE_KEYS as keys
        from quest_export_runtime.manifest import write_manifest as py_write_manifest
    except ImportError as e:
        pytest.skip(f"quest_export_runtime.manifest not importable: {e}")
    m = json.loads((dummy_bundle / "manifest.json").read_text())
    (dummy_bundle / "manifest.json").unlink()
    py_write_manifest(
        dummy_bundle,
        stage="bundle",
        recipe_fingerprint=m["recipe_fingerprint"],
        extra={k: v for k, v in m.items() if k not in keys},
    )
    assert "OK" in run(build, "quest_sample", dummy_bundle, "--check").stdout


def test_trt_backend_not_built_does_not_pretend(build, dummy_bundle, tmp_path):
    listing = run(build, "quest_sample", "--list-backends").stdout
    if "trt: built" in listing:
        pytest.skip("this build has the TensorRT backend")
    engine = tmp_path / "engine"
    engine.mkdir()
    (engine / "unet.plan").write_bytes(b"plan")
    write_manifest(engine, "build-trt", {"trt_version": "10.3.0", "compute_capability": "8.7"})
    for extra in (["--engine", engine], []):  # with or without an engine folder: the missing backend is the error
        proc = run(build, "quest_sample", dummy_bundle, "--backend", "trt", *extra, "--n", 1, check=False)
        _refused(proc, "TensorRT backend is not part of this build", "NvInfer.h", "TENSORRT_ROOT")


# --------------------------------------------------------------------------- 5. sha256, JSON, safetensors


def test_sha256_matches_hashlib(build, tmp_path):
    rng = np.random.default_rng(0)
    blobs = {
        "empty": b"",
        "abc": b"abc",
        "448bit": b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
        "million_a": b"a" * 1_000_000,
        "chunk_plus_3": rng.integers(0, 256, (1 << 20) + 3, dtype=np.uint8).tobytes(),
    }
    for n in (1, 55, 56, 57, 63, 64, 65, 119, 120, 127, 128, 129):  # padding boundaries
        blobs[f"len{n}"] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    paths = []
    for name, data in blobs.items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    out = run(build, "quest_selftest", "sha256", *paths).stdout.splitlines()
    got = {Path(line.split("  ", 1)[1]).name: line.split("  ", 1)[0] for line in out}
    assert got == {name: hashlib.sha256(data).hexdigest() for name, data in blobs.items()}
    assert got["abc"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2 example


JSON_DOCS = [
    {"schema": 1, "files": {"a/b.onnx": "0" * 64}, "list": [1, -2, 3.5, 1e-7, -0.0, 1.5e300, 5e-324, 12345678901234]},
    {"unicode": 'é ✓ \U0001f600 \u0000 \t \n " \\ /', "nested": [[[[{"x": [None, True, False]}]]]], "empty": [{}, []]},
    [0.1, 0.2, 0.30000000000000004, 2.0**53, -(2.0**53), 1 / 3],
    "just a string",
    -17,
]


@pytest.mark.parametrize("i", range(len(JSON_DOCS)))
def test_json_round_trips_against_python(build, tmp_path, i):
    text = json.dumps(JSON_DOCS[i], ensure_ascii=(i % 2 == 0), indent=(2 if i == 1 else None))
    (tmp_path / "doc.json").write_text(text, encoding="utf-8")
    out = run(build, "quest_selftest", "json", tmp_path / "doc.json").stdout
    assert json.loads(out) == json.loads(text)


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_json_refuses_nonfinite_tokens(build, tmp_path, token):
    """nlohmann/json reads strict RFC 8259, so quest_export writes manifests with allow_nan=False (test_manifest.py)."""
    (tmp_path / "doc.json").write_text(json.dumps({"a": [1.0, float(token.replace("Infinity", "inf"))]}))
    assert token in (tmp_path / "doc.json").read_text()
    proc = run(build, "quest_selftest", "json", tmp_path / "doc.json", check=False)
    assert proc.returncode == 2 and "invalid JSON at line 1" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "bad",
    [
        '{"a": 1,}',
        "[1, 2",
        '{"a" 1}',
        '"unterminated',
        "01",
        "[1.]",
        '{"a": tru}',
        '"bad \\x escape"',
        "[1] [2]",
        '"\\ud800"',
        "",
        '{"a":1}}',
    ],
)
def test_json_rejects_invalid_documents(build, tmp_path, bad):
    (tmp_path / "bad.json").write_text(bad)
    proc = run(build, "quest_selftest", "json", tmp_path / "bad.json", check=False)
    assert proc.returncode == 2 and "invalid JSON at line" in proc.stderr, (bad, proc.stderr)


def test_safetensors_reader_matches_the_safetensors_package(build, tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    tensors = {
        "encoder_hidden_states": rng.standard_normal((4, 3, 5)).astype(np.float32),
        "half": rng.standard_normal((7,)).astype(np.float16),
        "double": rng.standard_normal((2, 2)).astype(np.float64),
    }
    tensors["half"][:3] = [65504, 6.1e-5, 6e-8]  # max, smallest normal, a subnormal
    meta = {"uncond_index": "2", "labels": json.dumps(["x", "y", "z", "w"])}
    save_file(tensors, str(tmp_path / "c.safetensors"), metadata=meta)
    for name, arr in tensors.items():
        out = run(
            build,
            "quest_selftest",
            "safetensors",
            tmp_path / "c.safetensors",
            "--tensor",
            name,
            "--out",
            tmp_path / f"{name}.npy",
        ).stdout
        assert json.loads(out) == meta
        got = np.load(tmp_path / f"{name}.npy")
        np.testing.assert_array_equal(got, arr.astype(np.float32), err_msg=name)


# --------------------------------------------------------------------------- 6. PNG


def _unfilter(rows: np.ndarray, bpp: int) -> np.ndarray:
    """Undo the PNG scanline filters (0 None, 1 Sub, 2 Up, 3 Average, 4 Paeth): rows (H, 1 + W*C) -> (H, W*C)."""
    h, n = rows.shape[0], rows.shape[1] - 1
    out = np.zeros((h, n), dtype=np.int64)
    for y in range(h):
        kind, line = rows[y, 0], rows[y, 1:].astype(np.int64)
        up = out[y - 1] if y else np.zeros(n, dtype=np.int64)
        if kind in (0, 2):
            out[y] = (line + (up if kind == 2 else 0)) & 0xFF
            continue
        assert kind in (1, 3, 4), f"unknown PNG filter type {kind}"
        cur = out[y]
        for x in range(n):
            a = cur[x - bpp] if x >= bpp else 0
            b, c = up[x], (up[x - bpp] if x >= bpp else 0)
            if kind == 1:
                pred = a
            elif kind == 3:
                pred = (a + b) // 2
            else:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            cur[x] = (line[x] + pred) & 0xFF
    return out.astype(np.uint8)


def decode_png(path: Path) -> np.ndarray:
    """PNG decoder for 8-bit grey/RGB (what the libpng writer produces); checks every CRC and the zlib stream."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, f"bad CRC in {tag}"
        if tag == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat += body
        pos += 12 + length
        if tag == b"IEND":
            break
    w, h, depth, color, _, _, interlace = ihdr
    assert depth == 8 and color in (0, 2) and interlace == 0
    ch = 1 if color == 0 else 3
    raw = zlib.decompress(idat)  # checks the Adler-32 too
    img = _unfilter(np.frombuffer(raw, dtype=np.uint8).reshape(h, 1 + w * ch), ch).reshape(h, w, ch)
    return img[:, :, 0] if ch == 1 else img


@pytest.mark.parametrize("shape", [(300, 250, 3), (7, 3, 1), (1, 1, 3)])
def test_png_writer_pixels_round_trip(build, tmp_path, shape):
    img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)  # 300x250x3 spans several stored blocks
    np.save(tmp_path / "img.npy", img.astype(np.float32))
    run(build, "quest_selftest", "png", "--in", tmp_path / "img.npy", "--out", tmp_path / "img.png", "--raw")
    got = decode_png(tmp_path / "img.png")
    np.testing.assert_array_equal(got, img[:, :, 0] if shape[2] == 1 else img)
    try:
        from PIL import Image
    except ImportError:
        return
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "img.png")), got)


@pytest.mark.parametrize("n,c,nrow", [(16, 1, 0), (5, 3, 0), (3, 3, 2)])
def test_png_grid_equals_python_make_grid(build, tmp_path, n, c, nrow):
    from quest_export_runtime.images import make_grid

    x = np.random.default_rng(n).uniform(-1.2, 1.2, (n, c, 9, 7)).astype(np.float32)
    x[0, 0, 0, :4] = [-1.0, 1.0, -1.5, 0.0]  # saturation, and 127.5 (a tie at an odd level)
    # float32 values whose (x + 1) * 127.5 is exactly k + 0.5 with k even: half-to-even rounds down (np.rint)
    x[0, 0, 1, :3] = np.array([-0.4941176474094391, -0.47843137383461, -0.4627451002597809], np.float32)
    assert ((x[0, 0, 1, :3] + np.float32(1.0)) * np.float32(127.5)).tolist() == [64.5, 66.5, 68.5]
    np.save(tmp_path / "x.npy", x)
    args = ["png", "--in", tmp_path / "x.npy", "--out", tmp_path / "g.png"] + (["--nrow", nrow] if nrow else [])
    run(build, "quest_selftest", *args)
    ref = make_grid(x, nrow=nrow or None)
    np.testing.assert_array_equal(decode_png(tmp_path / "g.png"), ref[:, :, 0] if c == 1 else ref)


# --------------------------------------------------------------------------- sampling loop with a fake model


def fake_model(x, t, ehs, ratios, graph):
    """The FakeBackend of quest_selftest.cpp in numpy (float64, rounded to float32)."""
    b = x.shape[0]
    bias = np.full(b, 1e-4 * float(t) * (graph + 1))
    if ehs is not None:
        bias = bias + 0.1 * ehs.reshape(b, -1).astype(np.float64).mean(axis=1)
    if ratios is not None:
        bias = bias + 0.05 * float(np.sum(np.asarray(ratios, dtype=np.float32).astype(np.float64)))
    return (0.5 * np.tanh(x.astype(np.float64)) + bias[:, None, None, None]).astype(np.float32)


def python_sample(model, cfg, noise, steps, eta, guidance, rows, uncond, cond_table, group_ts, z):
    """quest_export.models.sampling's loop (guidance as [uncond, cond] halves) with diffusers' DDIMScheduler."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler.from_config({k: v for k, v in cfg.items() if not k.startswith("_")})
    sched.set_timesteps(steps)
    x = torch.from_numpy(noise.copy())
    groups = []
    for i, t in enumerate(sched.timesteps.tolist()):
        g = _group_rule(group_ts, t)
        groups.append(g)
        xn = x.numpy()
        if cond_table is None:
            eps = model(xn, t, None, g)
        elif guidance == 1.0:
            eps = model(xn, t, cond_table[rows], g)
        else:
            both = model(
                np.concatenate([xn, xn]), t, np.concatenate([cond_table[[uncond] * len(rows)], cond_table[rows]]), g
            )
            eu, ec = torch.from_numpy(both).chunk(2)
            eps = (eu + guidance * (ec - eu)).numpy()
        noise_i = torch.from_numpy(z[i]) if eta > 0 else None
        x = sched.step(torch.from_numpy(eps), t, x, eta=eta, variance_noise=noise_i).prev_sample
    return x.clamp(-1, 1).numpy(), groups


@pytest.mark.parametrize("mode", ["scale-input", "per-group", "merged-uncond"])
def test_sampling_loop_with_fake_model_matches_python(build, tmp_path, mode):
    group_ts = [747, 415, 83]  # three of the 12 leading timesteps (83 * k): t == t_g must pick g
    conditional = mode != "merged-uncond"
    ratios = [[1.0, 0.5, 2.0], [0.9, 1.1, 1.0], [0.25, 0.5, 0.75]] if mode == "scale-input" else None
    graphs = {f"model_g{g:02d}.onnx": bytes([g]) for g in range(3)} if mode == "per-group" else {"model.onnx": b"m"}
    steps, eta, guidance = 12, (0.4 if mode == "per-group" else 0.0), (2.5 if conditional else 1.0)
    scale_mode = {"scale-input": "scale-input", "per-group": "per-group", "merged-uncond": "merged"}[mode]
    bundle = make_bundle(
        tmp_path / "b",
        scale_mode=scale_mode,
        group_ts=group_ts,
        conditional=conditional,
        graph_bytes=graphs,
        sampler={"sampler": "ddim", "steps": steps, "eta": eta, "guidance_scale": guidance},
        scheduler_config=SCHED_CFG,
        scale_ratios=ratios,
    )
    rng = np.random.default_rng(11)
    n = 5
    noise = rng.standard_normal((n, C, H, W)).astype(np.float32)
    z = rng.standard_normal((steps, n, C, H, W)).astype(np.float32)
    rows = [0, 1, 2, 4, 1]
    np.save(tmp_path / "noise.npy", noise)
    np.save(tmp_path / "z.npy", z)
    args = [
        "sample-fake",
        "--bundle",
        bundle,
        "--noise",
        tmp_path / "noise.npy",
        "--z",
        tmp_path / "z.npy",
        "--out",
        tmp_path / "x.npy",
        "--batch",
        2,
    ]
    if conditional:
        args += ["--classes", ",".join(map(str, rows))]
    out = run(build, "quest_selftest", *args).stdout
    got = np.load(tmp_path / "x.npy")

    cond_table = None
    if conditional:
        from safetensors.numpy import load_file

        cond_table = load_file(str(bundle / "conditioning.safetensors"))["encoder_hidden_states"]

    def model(x, t, ehs, g):
        graph = g if mode == "per-group" else 0
        return fake_model(x, t, ehs, ratios[g] if ratios else None, graph)

    ref, groups = python_sample(model, SCHED_CFG, noise, steps, eta, guidance, rows, 3, cond_table, group_ts, z)
    _assert_close(got, ref, DDIM_RTOL, DDIM_ATOL_REL, f"sampling loop ({mode})")
    # one model call per chunk of 2 images (3 chunks) and step, each in the group of its timestep
    used = [int(v) for v in out.split("groups ", 1)[1].split()[0].split(",")]
    assert used == [g for g in groups for _ in range(3)]
    assert set(groups) == {0, 1, 2}, "the schedule should visit every group"


# --------------------------------------------------------------------------- 7. ONNX Runtime backend


def tiny_unet_onnx(path: Path, *, conditional: bool, scale_input: bool, channels: int = C):
    """A small graph with the UNet interface of docs/formats.md: Conv + Tanh on sample, plus terms in t, ehs, r."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    w = (0.2 * rng.standard_normal((channels, channels, 3, 3))).astype(np.float32)
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "shape4"),
        numpy_helper.from_array(np.array(1e-3, np.float32), "kt"),
        numpy_helper.from_array(np.array(0.3, np.float32), "kc"),
        numpy_helper.from_array(np.array(0.05, np.float32), "kr"),
        numpy_helper.from_array(np.array(0.5, np.float32), "kh"),
    ]
    nodes = [
        helper.make_node("Conv", ["sample", "w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Tanh", ["sample"], ["th"]),
        helper.make_node("Mul", ["th", "kh"], ["th2"]),
        helper.make_node("Add", ["conv", "th2"], ["a0"]),
        helper.make_node("Reshape", ["timestep", "shape4"], ["t4"]),
        helper.make_node("Mul", ["t4", "kt"], ["tt"]),
        helper.make_node("Add", ["a0", "tt"], ["a1"]),
    ]
    inputs = [
        helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", channels, H, W]),
        helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["batch"]),
    ]
    last = "a1"
    if conditional:
        inputs.append(helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, ["batch", L, D]))
        nodes += [
            helper.make_node("ReduceMean", ["encoder_hidden_states"], ["em"], axes=[1, 2], keepdims=0),
            helper.make_node("Reshape", ["em", "shape4"], ["em4"]),
            helper.make_node("Mul", ["em4", "kc"], ["ec"]),
            helper.make_node("Add", [last, "ec"], ["a2"]),
        ]
        last = "a2"
    if scale_input:
        inputs.append(helper.make_tensor_value_info("act_scale_ratios", TensorProto.FLOAT, [K]))
        nodes += [
            helper.make_node("ReduceSum", ["act_scale_ratios"], ["rs"], keepdims=0),
            helper.make_node("Mul", ["rs", "kr"], ["rr"]),
            helper.make_node("Add", [last, "rr"], ["a3"]),
        ]
        last = "a3"
    nodes.append(helper.make_node("Identity", [last], ["noise_pred"]))
    graph = helper.make_graph(
        nodes,
        "tiny_unet",
        inputs,
        [helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, ["batch", channels, H, W])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def ort_session(path: Path):
    ort = pytest.importorskip("onnxruntime")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    for key, value in ORT_SESSION_CONFIG.items():
        so.add_session_config_entry(key, value)
    return ort.InferenceSession(
        str(path), so, providers=["CPUExecutionProvider"], disabled_optimizers=list(ORT_DISABLED_OPTIMIZERS)
    )


@pytest.fixture
def ort_build(build):
    if not build.ort_built():
        pytest.skip(
            "ONNX Runtime backend not built: run runtime/cpp/scripts/setup_onnxruntime.sh (headers from Debian "
            "trixie libonnxruntime-dev, library from the onnxruntime wheel) or set ONNXRUNTIME_ROOT"
        )
    return build


def test_ort_backend_matches_onnxruntime_python(ort_build, tmp_path):
    pytest.importorskip("onnx")
    tiny_unet_onnx(tmp_path / "m.onnx", conditional=True, scale_input=True)
    rng = np.random.default_rng(2)
    feeds = {
        "sample": rng.standard_normal((3, C, H, W)).astype(np.float32),
        "timestep": np.array([999, 500, 3], np.float32),
        "encoder_hidden_states": rng.standard_normal((3, L, D)).astype(np.float32),
        "act_scale_ratios": np.array([0.5, 1.0, 2.0], np.float32),
    }
    for k, v in feeds.items():
        np.save(tmp_path / f"{k}.npy", v)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    run(
        ort_build,
        "quest_selftest",
        "ort-run",
        "--model",
        tmp_path / "m.onnx",
        "--feeds",
        ",".join(f"{k}={tmp_path / (k + '.npy')}" for k in feeds),
        "--out-dir",
        out_dir,
    )
    got = np.load(out_dir / "noise_pred.npy")
    (ref,) = ort_session(tmp_path / "m.onnx").run(["noise_pred"], feeds)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    assert np.abs(ref).max() > 0.1  # not a trivially zero output

    # a feed the graph lacks is refused
    np.save(tmp_path / "bogus.npy", feeds["timestep"])
    proc = run(
        ort_build,
        "quest_selftest",
        "ort-run",
        "--model",
        tmp_path / "m.onnx",
        "--feeds",
        f"sample={tmp_path / 'sample.npy'}",
        "--out-dir",
        out_dir,
        check=False,
    )
    assert proc.returncode == 2 and "'timestep' was not fed" in proc.stderr


def test_quest_sample_end_to_end_with_ort(ort_build, tmp_path):
    """quest_sample on a scale-input, conditional bundle with guidance vs the same loop run with onnxruntime Python."""
    pytest.importorskip("onnx")
    group_ts = [800, 450, 120]
    ratios = [[1.0, 0.5, 2.0], [0.9, 1.1, 1.0], [0.25, 0.5, 0.75]]
    root = tmp_path / "bundle"
    root.mkdir()
    tiny_unet_onnx(root / "model.onnx", conditional=True, scale_input=True, channels=3)
    steps, guidance = 10, 2.0
    bundle = make_bundle(
        root,
        scale_mode="scale-input",
        group_ts=group_ts,
        conditional=True,
        graph_bytes={"model.onnx": None},
        sampler={"sampler": "ddim", "steps": steps, "eta": 0.0, "guidance_scale": guidance},
        scheduler_config=SCHED_CFG,
        scale_ratios=ratios,
        channels=3,
    )
    n = 4
    noise = np.random.default_rng(4).standard_normal((n, 3, H, W)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    proc = run(
        ort_build,
        "quest_sample",
        bundle,
        "--noise",
        tmp_path / "noise.npy",
        "--class",
        "c",
        "--backend",
        "ort",
        "--out",
        tmp_path / "grid.png",
        "--save-npy",
        tmp_path / "x.npy",
        "--batch",
        3,
    )
    assert "wrote" in proc.stderr
    got = np.load(tmp_path / "x.npy")

    from safetensors.numpy import load_file

    table = load_file(str(bundle / "conditioning.safetensors"))["encoder_hidden_states"]
    sess = ort_session(bundle / "model.onnx")

    def model(x, t, ehs, g):
        feeds = {
            "sample": x,
            "timestep": np.full(x.shape[0], t, np.float32),
            "encoder_hidden_states": ehs,
            "act_scale_ratios": np.asarray(ratios[g], np.float32),
        }
        return sess.run(["noise_pred"], feeds)[0]

    ref, groups = python_sample(model, SCHED_CFG, noise, steps, 0.0, guidance, [2] * n, 3, table, group_ts, None)
    assert set(groups) == {0, 1, 2}
    _assert_close(got, ref, DDIM_RTOL, DDIM_ATOL_REL, "quest_sample (ort) vs Python loop")
    assert np.abs(got).max() > 0.05  # the images are not blank

    from quest_export_runtime.images import make_grid

    np.testing.assert_array_equal(decode_png(tmp_path / "grid.png"), make_grid(got))
    # the PNG of the reference samples differs at most by one level where a value sits on a rounding edge
    assert np.abs(decode_png(tmp_path / "grid.png").astype(int) - make_grid(ref).astype(int)).max() <= 1

    # the seeded path runs too, and is deterministic
    run(ort_build, "quest_sample", bundle, "--n", 2, "--seed", 7, "--out", tmp_path / "s1.png", "--quiet")
    run(ort_build, "quest_sample", bundle, "--n", 2, "--seed", 7, "--out", tmp_path / "s2.png", "--quiet")
    assert (tmp_path / "s1.png").read_bytes() == (tmp_path / "s2.png").read_bytes()
