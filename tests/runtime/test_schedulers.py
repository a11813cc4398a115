"""The numpy DDIM / DDPM schedulers against diffusers' DDIMScheduler / DDPMScheduler."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from quest_export_runtime import schedulers as nps  # noqa: E402
from quest_export_runtime.errors import InputError  # noqa: E402

# Errors are max |ours - diffusers| / max |diffusers| per step, on diffusers' own trajectory (CPU, x86-64).
# float64 inputs, diffusers given our tables: pure step arithmetic, measured 3.6e-16.
STEP_RTOL = 1e-12
# float32 inputs, stock diffusers (float32 tables and coefficients): measured 3.4e-6, from float32 rounding of
# sqrt(abar) amplified by 1 / sqrt(abar_t) near t = T. Margin 3x.
STEP_RTOL_F32 = 1e-5
# alphas_cumprod: diffusers' torch.linspace differs from ours by <= 1 float32 ulp per beta; measured <= 2e-7.
TABLE_RTOL = 1e-6

CONFIGS = {
    "ddpm-cifar": dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                       clip_sample=True, prediction_type="epsilon", variance_type="fixed_small"),
    "sd-like": dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon"),
    "cosine-v": dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                     clip_sample=True, clip_sample_range=1.5, timestep_spacing="trailing"),
    "sample-linspace": dict(num_train_timesteps=500, beta_schedule="linear", prediction_type="sample",
                            timestep_spacing="linspace", clip_sample=False, variance_type="fixed_large"),
    "trained-betas": dict(num_train_timesteps=200, trained_betas=np.linspace(1e-4, 0.05, 200).tolist(),
                          clip_sample=False, variance_type="fixed_small_log", timestep_spacing="leading"),
}  # fmt: skip
SPACINGS = ("leading", "trailing", "linspace")
STEPS = (1, 7, 10, 50, 333, 1000)


def diffusers_scheduler(kind: str, cfg: dict):
    cls = {"ddim": diffusers.DDIMScheduler, "ddpm": diffusers.DDPMScheduler}[kind]
    params = inspect.signature(cls.__init__).parameters
    return cls.from_config({k: v for k, v in cfg.items() if k in params})


def assert_close(ours: np.ndarray, ref: torch.Tensor, rtol: float, what: str) -> None:
    ref = ref.numpy()
    err = np.abs(ours.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-12)
    assert err <= rtol, f"{what}: max error {err:.2e} relative to max|ref| (allowed {rtol:.0e})"


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tables_match_diffusers(kind, name):
    ours, ref = nps.scheduler_from_config(CONFIGS[name], kind), diffusers_scheduler(kind, CONFIGS[name])
    assert ours.alphas_cumprod.dtype == np.float32
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=TABLE_RTOL, atol=0)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_equal_diffusers(kind, spacing, offset):
    cfg = dict(CONFIGS["ddpm-cifar"], timestep_spacing=spacing, steps_offset=offset)
    ours, ref = nps.scheduler_from_config(cfg, kind), diffusers_scheduler(kind, cfg)
    for n in STEPS:
        ts = ours.set_timesteps(n)
        ref.set_timesteps(n)
        assert ts.dtype == np.int64
        np.testing.assert_array_equal(ts, ref.timesteps.numpy(), err_msg=f"{kind} {spacing} N={n}")


def share_tables(ours, ref) -> None:
    """Give diffusers our tables in float64: both sides then differ only in the step arithmetic."""
    ref.alphas_cumprod = torch.from_numpy(ours.alphas_cumprod.astype(np.float64))
    ref.final_alpha_cumprod = torch.as_tensor(getattr(ours, "final_alpha_cumprod", 1.0), dtype=torch.float64)
    ref.one = torch.tensor(1.0, dtype=torch.float64)


def run_chain(kind: str, cfg: dict, steps: int, *, eta: float = 0.0, dtype=torch.float64, seed: int = 0):
    """Run ours and diffusers side by side with the same model outputs and noise; compare every step."""
    ours, ref = nps.scheduler_from_config(cfg, kind), diffusers_scheduler(kind, cfg)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    if dtype == torch.float64:
        share_tables(ours, ref)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=dtype)
    x_np = x.numpy().copy()
    for t in ref.timesteps.tolist():
        # a fake model output that depends on x, so errors would propagate like in a real chain
        r = torch.randn(x.shape, generator=g, dtype=dtype)
        out, out_np = 0.7 * x + 0.3 * r, (0.7 * x_np + 0.3 * r.numpy()).astype(x_np.dtype)
        noise_seed = int(torch.randint(0, 2**31, (1,), generator=g))
        if kind == "ddim":
            z = torch.randn(x.shape, generator=torch.Generator().manual_seed(noise_seed), dtype=dtype)
            r = ref.step(out, t, x, eta=eta, variance_noise=z if eta > 0 else None)
            o = ours.step(out_np, t, x_np, eta=eta, variance_noise=z.numpy() if eta > 0 else None)
        else:  # diffusers draws its noise with torch.randn(generator); we hand ours the same draw
            z = torch.randn(x.shape, generator=torch.Generator().manual_seed(noise_seed), dtype=dtype)
            r = ref.step(out, t, x, generator=torch.Generator().manual_seed(noise_seed))
            o = ours.step(out_np, t, x_np, noise=z.numpy())
        assert o.prev_sample.dtype == x_np.dtype
        tol = STEP_RTOL if dtype == torch.float64 else STEP_RTOL_F32
        assert_close(o.pred_original_sample, r.pred_original_sample, tol, f"{kind} x0 at t={t}")
        assert_close(o.prev_sample, r.prev_sample, tol, f"{kind} prev_sample at t={t}")
        x, x_np = r.prev_sample, r.prev_sample.numpy().copy()  # both continue on diffusers' trajectory
    return x_np


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("steps,eta", [(10, 0.0), (25, 0.5), (50, 1.0)])
def test_ddim_step_matches_diffusers(name, steps, eta):
    run_chain("ddim", CONFIGS[name], steps, eta=eta)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("steps", [10, 50])
def test_ddpm_step_matches_diffusers(name, steps):
    run_chain("ddpm", CONFIGS[name], steps)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_float32_chain_matches_stock_diffusers(kind, name):
    out = run_chain(kind, CONFIGS[name], 20, eta=0.3, dtype=torch.float32)
    assert out.dtype == np.float32


def test_ddim_use_clipped_model_output_matches_diffusers():
    ours, ref = nps.DDIMScheduler(CONFIGS["ddpm-cifar"]), diffusers_scheduler("ddim", CONFIGS["ddpm-cifar"])
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    share_tables(ours, ref)
    g = torch.Generator().manual_seed(3)
    x, eps = (
        torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64),
        3 * torch.randn(1, 2, 4, 4, generator=g, dtype=torch.float64),
    )
    r = ref.step(eps, 950, x, use_clipped_model_output=True)
    o = ours.step(eps.numpy(), 950, x.numpy(), use_clipped_model_output=True)
    assert_close(o.prev_sample, r.prev_sample, STEP_RTOL, "clipped eps")


def test_rng_draws_noise_when_none_given():
    s = nps.DDPMScheduler(CONFIGS["ddpm-cifar"])
    s.set_timesteps(10)
    x = np.zeros((1, 1, 2, 2), np.float32)
    a = s.step(x, 900, x, rng=np.random.default_rng(0)).prev_sample
    b = s.step(x, 900, x, noise=np.random.default_rng(0).standard_normal(x.shape)).prev_sample
    np.testing.assert_array_equal(a, b)
    assert np.abs(a).max() > 0


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(thresholding=True), "thresholding"),
        (dict(beta_schedule="sigmoid"), "beta_schedule"),
        (dict(prediction_type="flow"), "prediction_type"),
        (dict(timestep_spacing="karras"), "timestep_spacing"),
        (dict(variance_type="learned_range"), "variance_type"),
        (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
        (dict(num_train_timesteps=1), "num_train_timesteps"),
    ],
)
def test_unsupported_config_refused(bad, match):
    with pytest.raises(InputError, match=match):
        nps.DDIMScheduler(dict(CONFIGS["ddpm-cifar"], **bad))


def test_misuse_refused():
    s = nps.DDIMScheduler({})
    x = np.zeros((1, 1, 2, 2), np.float32)
    with pytest.raises(InputError, match="set_timesteps"):
        s.step(x, 10, x)
    with pytest.raises(InputError, match="num_inference_steps"):
        s.set_timesteps(1001)
    s.set_timesteps(10)
    with pytest.raises(InputError, match="eta > 0"):
        s.step(x, 900, x, eta=0.5)
    with pytest.raises(InputError, match="sampler"):
        nps.scheduler_from_config({}, "euler")
    d = nps.DDPMScheduler({})
    d.set_timesteps(10)
    with pytest.raises(InputError, match="not one of"):
        d.step(x, 901, x, noise=x)
    with pytest.raises(InputError, match="needs noise"):
        d.step(x, 900, x)


def test_unknown_keys_ignored_with_warning(caplog):
    s = nps.DDIMScheduler({"_class_name": "PNDMScheduler", "skip_prk_steps": True})
    assert "skip_prk_steps" in caplog.text
    assert s.config["beta_schedule"] == "linear"
