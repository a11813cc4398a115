"""Numpy DDIM and DDPM schedulers that reproduce diffusers' ``DDIMScheduler`` and ``DDPMScheduler``.

Built from a diffusers scheduler config dict (the ``scheduler_config`` of a manifest), so the device needs
neither torch nor diffusers. ``set_timesteps(N)`` gives exactly diffusers' timesteps; ``step`` reproduces
diffusers' ``step`` to float tolerance. Notation (Ho et al. 2020, "DDPM", arXiv:2006.11239; Song et al.
2021, "DDIM", arXiv:2010.02502; diffusers' names in brackets):

    beta_t        variance of the noise added by training step t                     [betas]
    abar_t        prod_{s <= t} (1 - beta_s), the signal fraction of x_t               [alphas_cumprod]
                  (the DDIM paper writes alpha_t for this product)
    x_t           the sample at timestep t; eps the predicted noise; x0 the predicted clean sample

The tables are the float32 values diffusers builds (betas rounded to float32, alpha = 1 - beta in float32,
cumulative product accumulated in float64 and rounded to float32, like torch's CPU cumprod), because those
are the values the model was trained and calibrated with. The step arithmetic runs in float64 and returns
the dtype of ``sample``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from quest_export_runtime.errors import InputError

logger = logging.getLogger(__name__)

SAMPLERS = ("ddim", "ddpm")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")
COSINE_MAX_BETA = 0.999  # diffusers' cap on squaredcos_cap_v2 betas
DDPM_MIN_VARIANCE = 1e-20  # diffusers clamps the posterior variance from below

# diffusers' constructor defaults (identical for DDIMScheduler and DDPMScheduler where both have the key)
DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "set_alpha_to_one": True,  # DDIM only
    "steps_offset": 0,
    "timestep_spacing": "leading",
    "thresholding": False,
    "rescale_betas_zero_snr": False,
    "variance_type": "fixed_small",  # DDPM only
}
# read by diffusers only when thresholding is on, which is refused
IGNORED_KEYS = ("dynamic_thresholding_ratio", "sample_max_value")


class StepOutput(NamedTuple):
    prev_sample: np.ndarray  # x_{t-1} (or x at the previous timestep of the schedule), dtype of the input sample
    pred_original_sample: np.ndarray  # x0 predicted at this step


def _refuse(key: str, value: Any, allowed: str) -> InputError:
    return InputError(f"scheduler config {key}={value!r} is not supported by the numpy runtime (allowed: {allowed}); "
                      "re-export with a supported scheduler config")  # fmt: skip


def resolve_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Merge a diffusers scheduler config with diffusers' defaults and validate it.

    Args:
        config: a diffusers DDIMScheduler / DDPMScheduler config dict (``_class_name`` and other ``_`` keys ignored).

    Returns:
        The resolved config with every key of ``DEFAULTS``.

    Raises:
        InputError: a value this runtime does not reproduce (e.g. ``thresholding: true``), naming the allowed values.
    """
    cfg = dict(DEFAULTS)
    for key, value in config.items():
        if key.startswith("_") or key in IGNORED_KEYS:
            continue
        if key not in DEFAULTS:
            logger.warning("scheduler config key %r is not used by DDIM/DDPM and is ignored (as diffusers does)", key)
            continue
        cfg[key] = value
    T = cfg["num_train_timesteps"]
    if not isinstance(T, int) or isinstance(T, bool) or T < 2:
        raise _refuse("num_train_timesteps", T, "an integer >= 2")
    if cfg["trained_betas"] is None and cfg["beta_schedule"] not in BETA_SCHEDULES:
        raise _refuse("beta_schedule", cfg["beta_schedule"], " | ".join(BETA_SCHEDULES) + " or trained_betas")
    if cfg["trained_betas"] is not None and len(cfg["trained_betas"]) != T:
        raise _refuse("trained_betas", f"<{len(cfg['trained_betas'])} values>", f"{T} values")
    if cfg["prediction_type"] not in PREDICTION_TYPES:
        raise _refuse("prediction_type", cfg["prediction_type"], " | ".join(PREDICTION_TYPES))
    if cfg["timestep_spacing"] not in TIMESTEP_SPACINGS:
        raise _refuse("timestep_spacing", cfg["timestep_spacing"], " | ".join(TIMESTEP_SPACINGS))
    if cfg["thresholding"]:
        raise _refuse("thresholding", cfg["thresholding"], "false (dynamic thresholding is not implemented)")
    if cfg["rescale_betas_zero_snr"]:
        raise _refuse("rescale_betas_zero_snr", cfg["rescale_betas_zero_snr"], "false")
    if cfg["variance_type"] not in DDPM_VARIANCE_TYPES:
        raise _refuse("variance_type", cfg["variance_type"], " | ".join(DDPM_VARIANCE_TYPES))
    if not cfg["clip_sample_range"] > 0:
        raise _refuse("clip_sample_range", cfg["clip_sample_range"], "a number > 0")
    if not isinstance(cfg["steps_offset"], int) or not 0 <= cfg["steps_offset"] < T:
        raise _refuse("steps_offset", cfg["steps_offset"], f"an integer in [0, {T})")
    return cfg


def make_betas(cfg: Mapping[str, Any]) -> np.ndarray:
    """beta_t for t = 0..T-1 as float32, the way diffusers builds them from a resolved config."""
    T = cfg["num_train_timesteps"]
    if cfg["trained_betas"] is not None:
        return np.asarray(cfg["trained_betas"], dtype=np.float32)
    if cfg["beta_schedule"] == "linear":  # DDPM section 4: beta linear from beta_start to beta_end
        return np.linspace(cfg["beta_start"], cfg["beta_end"], T).astype(np.float32)
    if cfg["beta_schedule"] == "scaled_linear":  # latent diffusion: sqrt(beta) linear
        return (np.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, T).astype(np.float32)) ** 2
    # squaredcos_cap_v2 (Nichol & Dhariwal 2021, eq. 17): abar(s) = cos^2((s + 0.008) / 1.008 * pi / 2),
    # beta_t = min(1 - abar((t + 1) / T) / abar(t / T), 0.999)
    abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [min(1 - abar((i + 1) / T) / abar(i / T), COSINE_MAX_BETA) for i in range(T)]
    return np.asarray(betas, dtype=np.float32)


class _Scheduler:
    """Tables and timesteps shared by DDIM and DDPM."""

    def __init__(self, config: Mapping[str, Any]):
        """Build the tables from a diffusers config.

        Args:
            config: a diffusers DDIMScheduler / DDPMScheduler config dict.

        Raises:
            InputError: an unsupported config value (see ``resolve_config``).
        """
        self.config = resolve_config(config)
        self.num_train_timesteps: int = self.config["num_train_timesteps"]
        self.betas = make_betas(self.config)  # (T,) float32
        alphas = (np.float32(1.0) - self.betas).astype(np.float32)  # (T,) 1 - beta_t, rounded like diffusers
        self.alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)  # (T,) abar_t
        self.num_inference_steps: int | None = None
        self.timesteps = np.arange(self.num_train_timesteps - 1, -1, -1, dtype=np.int64)

    def set_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """Choose the N timesteps of the sampling chain, exactly as diffusers' ``set_timesteps(N)``.

        Args:
            num_inference_steps: N, between 1 and num_train_timesteps.

        Returns:
            The timesteps, int64 (N,), decreasing; also stored as ``self.timesteps``.

        Raises:
            InputError: N outside [1, num_train_timesteps].
        """
        T, N = self.num_train_timesteps, num_inference_steps
        if not isinstance(N, (int, np.integer)) or not 1 <= N <= T:
            raise InputError(f"num_inference_steps={N!r} must be an integer in [1, {T}] (num_train_timesteps)")
        N = int(N)
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":  # evenly spread over [0, T - 1], rounded
            ts = np.linspace(0, T - 1, N).round()[::-1].astype(np.int64)
        elif spacing == "leading":  # multiples of T // N from 0, shifted by steps_offset
            ts = (np.arange(N) * (T // N))[::-1].astype(np.int64) + self.config["steps_offset"]
        else:  # trailing: T - 1 downwards in steps of T / N, rounded
            ts = np.round(np.arange(T, 0, -T / N)).astype(np.int64) - 1
        self.num_inference_steps = N
        self.timesteps = np.ascontiguousarray(ts)
        return self.timesteps

    def _check_step(self, timestep: Any, model_output: np.ndarray, sample: np.ndarray) -> int:
        if np.shape(model_output) != np.shape(sample):
            raise InputError(f"model_output shape {np.shape(model_output)} != sample shape {np.shape(sample)}")
        t = int(timestep)
        if t != timestep or not 0 <= t < self.num_train_timesteps:
            raise InputError(f"timestep {timestep!r} is not an integer in [0, {self.num_train_timesteps})")
        return t

    def _x0_eps(self, v: np.ndarray, x: np.ndarray, abar_t: float) -> tuple[np.ndarray, np.ndarray]:
        """Predicted x0 and eps from the model output v at x_t (float64)."""
        a, b = math.sqrt(abar_t), math.sqrt(1.0 - abar_t)  # sqrt(abar_t), sqrt(1 - abar_t)
        kind = self.config["prediction_type"]
        if kind == "epsilon":  # DDPM eq. 15 / DDIM eq. 9: x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)
            x0, eps = (x - b * v) / a, v
        elif kind == "sample":
            x0, eps = v, (x - a * v) / b
        else:  # v-prediction (Salimans & Ho 2022, section 4): v = sqrt(abar) eps - sqrt(1 - abar) x0
            x0, eps = a * x - b * v, a * v + b * x
        if self.config["clip_sample"]:
            r = float(self.config["clip_sample_range"])
            x0 = np.clip(x0, -r, r)
        return x0, eps


def _out_dtype(sample: np.ndarray) -> np.dtype:
    dt = np.asarray(sample).dtype
    return dt if np.issubdtype(dt, np.floating) else np.dtype(np.float32)


class DDIMScheduler(_Scheduler):
    """DDIM (Song et al. 2021) in numpy; reproduces diffusers' ``DDIMScheduler`` for the supported configs."""

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        # abar for the step after the last one: 1 (set_alpha_to_one) or abar_0
        self.final_alpha_cumprod = 1.0 if self.config["set_alpha_to_one"] else float(self.alphas_cumprod[0])

    def step(
        self,
        model_output: np.ndarray,
        timestep: int,
        sample: np.ndarray,
        *,
        eta: float = 0.0,
        variance_noise: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
        use_clipped_model_output: bool = False,
    ) -> StepOutput:
        """One DDIM step x_t -> x_{t - T // N}, as diffusers' ``DDIMScheduler.step``.

        Args:
            model_output: the UNet output at (sample, timestep), same shape as ``sample``.
            timestep: the current timestep t.
            sample: x_t, (B, C, H, W) or any shape.
            eta: 0 = deterministic DDIM, 1 = DDPM-like variance (DDIM eq. 16).
            variance_noise: standard normal z of the shape of ``sample`` (used when eta > 0).
            rng: draws z when eta > 0 and ``variance_noise`` is None.
            use_clipped_model_output: recompute eps from the clipped x0 (diffusers' option of the same name).

        Returns:
            StepOutput(prev_sample, pred_original_sample) in the dtype of ``sample``.

        Raises:
            InputError: called before ``set_timesteps``, bad timestep or shapes, or eta > 0 without noise or rng.
        """
        if self.num_inference_steps is None:
            raise InputError("DDIMScheduler.step() called before set_timesteps(N)")
        t = self._check_step(timestep, model_output, sample)
        prev_t = t - self.num_train_timesteps // self.num_inference_steps  # diffusers' previous timestep
        abar_t = float(self.alphas_cumprod[t])
        abar_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else self.final_alpha_cumprod
        x = np.asarray(sample, dtype=np.float64)
        x0, eps = self._x0_eps(np.asarray(model_output, dtype=np.float64), x, abar_t)
        # DDIM eq. 16: sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)
        variance = (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)
        sigma = eta * math.sqrt(variance)
        if use_clipped_model_output:
            eps = (x - math.sqrt(abar_t) * x0) / math.sqrt(1.0 - abar_t)
        # DDIM eq. 12: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z
        prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(1.0 - abar_prev - sigma**2, 0.0)) * eps
        if eta > 0:
            if variance_noise is not None and rng is not None:
                raise InputError("pass either variance_noise or rng to DDIMScheduler.step, not both")
            if variance_noise is None:
                if rng is None:
                    raise InputError("DDIM with eta > 0 needs variance_noise or rng")
                variance_noise = rng.standard_normal(x.shape)
            prev = prev + sigma * np.asarray(variance_noise, dtype=np.float64)
        dt = _out_dtype(sample)
        return StepOutput(prev.astype(dt), x0.astype(dt))


class DDPMScheduler(_Scheduler):
    """Ancestral DDPM (Ho et al. 2020) in numpy; reproduces diffusers' ``DDPMScheduler`` for the supported configs."""

    def previous_timestep(self, timestep: int) -> int:
        """The timestep after ``timestep`` in the chain (-1 after the last), as diffusers."""
        if self.num_inference_steps is None:
            return timestep - 1
        (idx,) = np.nonzero(self.timesteps == timestep)
        if idx.size == 0:
            raise InputError(f"timestep {timestep} is not one of this DDPM scheduler's {self.num_inference_steps} "
                             "timesteps; step through scheduler.timesteps")  # fmt: skip
        i = int(idx[0])
        return int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1

    def step(
        self,
        model_output: np.ndarray,
        timestep: int,
        sample: np.ndarray,
        *,
        noise: np.ndarray | None = None,
        rng: np.random.Generator | None = None,
    ) -> StepOutput:
        """One ancestral step x_t -> x_{t'} (t' the next timestep of the chain), as diffusers' ``DDPMScheduler.step``.

        Args:
            model_output: the UNet output at (sample, timestep), same shape as ``sample``.
            timestep: the current timestep t, one of ``self.timesteps``.
            sample: x_t.
            noise: standard normal z of the shape of ``sample``; needed when t > 0 (diffusers adds noise iff t > 0).
            rng: draws z when ``noise`` is None and t > 0.

        Returns:
            StepOutput(prev_sample, pred_original_sample) in the dtype of ``sample``.

        Raises:
            InputError: a timestep outside the chain, bad shapes, or t > 0 without noise or rng.
        """
        t = self._check_step(timestep, model_output, sample)
        prev_t = self.previous_timestep(t)
        abar_t = float(self.alphas_cumprod[t])
        abar_prev = float(self.alphas_cumprod[prev_t]) if prev_t >= 0 else 1.0
        alpha_t = abar_t / abar_prev  # the strided step's alpha: abar_t / abar_{t'}
        beta_t = 1.0 - alpha_t
        x = np.asarray(sample, dtype=np.float64)
        x0, _ = self._x0_eps(np.asarray(model_output, dtype=np.float64), x, abar_t)
        # DDPM eq. 7, posterior mean: mu = sqrt(abar_prev) beta_t / (1 - abar_t) x0 + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x_t
        c0 = math.sqrt(abar_prev) * beta_t / (1.0 - abar_t)
        ct = math.sqrt(alpha_t) * (1.0 - abar_prev) / (1.0 - abar_t)
        prev = c0 * x0 + ct * x
        if t > 0:
            if noise is not None and rng is not None:
                raise InputError("pass either noise or rng to DDPMScheduler.step, not both")
            if noise is None:
                if rng is None:
                    raise InputError(f"DDPM step at t={t} needs noise or rng")
                noise = rng.standard_normal(x.shape)
            # DDPM eq. 7, posterior variance beta~_t = (1 - abar_prev) / (1 - abar_t) beta_t  (fixed_small, sigma^2 = beta~);
            # fixed_large uses sigma^2 = beta_t (DDPM section 3.2)
            if self.config["variance_type"] == "fixed_large":
                std = math.sqrt(beta_t)
            else:  # fixed_small and fixed_small_log: exp(0.5 log var) = sqrt(var)
                std = math.sqrt(max((1.0 - abar_prev) / (1.0 - abar_t) * beta_t, DDPM_MIN_VARIANCE))
            prev = prev + std * np.asarray(noise, dtype=np.float64)
        dt = _out_dtype(sample)
        return StepOutput(prev.astype(dt), x0.astype(dt))


def scheduler_from_config(config: Mapping[str, Any], sampler: str) -> DDIMScheduler | DDPMScheduler:
    """A numpy scheduler of kind ``sampler`` built from a diffusers scheduler config.

    Args:
        config: the diffusers scheduler config dict (a manifest's ``scheduler_config``).
        sampler: ``ddim`` or ``ddpm``.

    Returns:
        A fresh DDIMScheduler or DDPMScheduler.

    Raises:
        InputError: an unknown sampler or an unsupported config value.
    """
    if sampler == "ddim":
        return DDIMScheduler(config)
    if sampler == "ddpm":
        return DDPMScheduler(config)
    raise InputError(f"sampler {sampler!r} is not supported by the numpy runtime; use one of {', '.join(SAMPLERS)}")
