"""Gaussian diffusion: the forward process, the eps-prediction loss, DDPM and DDIM sampling.

Chapter 5 of the book (and, in chapter 12, MAR's per-token diffusion head).
Notation of Ho et al. (2020, DDPM, https://arxiv.org/abs/2006.11239), with
timesteps t = 0 .. T-1 as in the code of DDPM, guided-diffusion and DiT:

    betas b_t                 the noise added at step t (a *schedule*)
    alpha_t = 1 - b_t,        abar_t = alpha_0 alpha_1 ... alpha_t  (alphas_cumprod)

Forward process (noising), in closed form for any t (DDPM eq. 4):

    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),
    so x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with eps ~ N(0, I).

A network eps_theta(x_t, t) learns to predict eps (DDPM's "simple" loss, eq. 14):

    L = E_{t, x_0, eps} || eps - eps_theta(x_t, t) ||^2.

Reverse process (sampling): from eps_theta we get a guess of the clean input,
x0_hat = (x_t - sqrt(1 - abar_t) eps_theta) / sqrt(abar_t), and step back with

* DDPM: x_{t-1} ~ q(x_{t-1} | x_t, x_0 = x0_hat), the Gaussian posterior
  (eqs. 6-7), i.e. the "fixed small" variance;
* DDIM (Song et al. 2021, https://arxiv.org/abs/2010.02502, eq. 12):
  x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - s_t^2) eps_theta + s_t z,
  deterministic for eta = 0 (s_t = 0).

Both can run on a *respaced* schedule, a subsequence of the T timesteps
(``GaussianDiffusion.respace``): DiT samples with 250 DDPM steps or 50 DDIM
steps instead of 1000.

Models are called as ``model(x_t, t, **model_kwargs)`` and must return eps in
the first C channels of their output (C = ``x_t.shape[1]``). A model that also
predicts its variance (DiT with ``learn_sigma``) returns 2C channels; this file
trains and samples with the eps channels only (see ``training_loss``).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
from torch import nn


def linear_beta_schedule(num_timesteps: int) -> torch.Tensor:
    """DDPM's schedule: b_t evenly spaced from 1e-4 to 0.02 for T = 1000.

    For other T both ends are scaled by 1000 / T, so that T * mean(b) and hence
    the final abar stay about the same. Returns ``(T,)`` float64.
    """
    scale = 1000 / num_timesteps
    if scale * 0.02 >= 1:
        raise ValueError(f"the linear schedule needs T >= 21 (its last beta is 20 / T), got T = {num_timesteps}")
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def cosine_alpha_bar(s: torch.Tensor, offset: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal's abar(s) = cos^2(pi/2 * (s + offset) / (1 + offset)) for s in [0, 1]
    (unnormalised: divide by abar(0) to start at 1)."""
    return torch.cos((s + offset) / (1 + offset) * math.pi / 2) ** 2


def cosine_beta_schedule(num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """The cosine schedule (Nichol & Dhariwal 2021, https://arxiv.org/abs/2102.09672, eq. 17).

    abar decreases like ``cosine_alpha_bar(t / T)``: slowly near both ends, so
    fewer steps are wasted on almost-clean or almost-pure-noise inputs than with
    the linear schedule. b_t = 1 - abar((t+1)/T) / abar(t/T), clipped at
    ``max_beta`` because b -> 1 at the very end. Returns ``(T,)`` float64.
    """
    s = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = cosine_alpha_bar(s)
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


BETA_SCHEDULES = {"linear": linear_beta_schedule, "cosine": cosine_beta_schedule}


def beta_schedule(name: str, num_timesteps: int = 1000) -> torch.Tensor:
    """``beta_schedule("linear" | "cosine", T)``: the ``(T,)`` float64 betas."""
    if name not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; expected one of {sorted(BETA_SCHEDULES)}")
    if not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    return BETA_SCHEDULES[name](num_timesteps)


def space_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """``num_steps`` timesteps out of ``0 .. T-1``, evenly spaced, both ends included.

    This is guided-diffusion's ``space_timesteps(T, [num_steps])``, which DiT uses
    (``timestep_respacing="250"``): rounded multiples of (T-1)/(num_steps-1).
    """
    if not 2 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be between 2 and the {num_timesteps} timesteps, got {num_steps}")
    stride = (num_timesteps - 1) / (num_steps - 1)
    return [round(i * stride) for i in range(num_steps)]


class GaussianDiffusion:
    """A diffusion process with a given noise schedule, its loss and its samplers.

    Args:
        betas: ``(T,)`` noise schedule, each in (0, 1); see ``beta_schedule``.
        timestep_map: ``(T,)`` the timestep the *model* is told at each step.
            The identity (default) except after ``respace``, where step i of the
            short schedule is timestep ``timestep_map[i]`` of the original one.

    Attributes (all ``(T,)`` float64 on the CPU):
        betas, alphas_cumprod (abar_t), alphas_cumprod_prev (abar_{t-1}, with
        abar_{-1} = 1), posterior_variance and the two posterior-mean coefficients.
    """

    def __init__(self, betas: torch.Tensor, timestep_map: torch.Tensor | None = None):
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not torch.all((betas > 0) & (betas < 1)):  # beta = 1 would make abar_T = 0
            raise ValueError(f"betas must lie in (0, 1), got min {betas.min().item()} max {betas.max().item()}")
        self.num_timesteps = len(betas)
        self.timestep_map = torch.arange(self.num_timesteps) if timestep_map is None else timestep_map.cpu()
        if self.timestep_map.shape != betas.shape:
            raise ValueError(f"timestep_map must have one entry per beta ({len(betas)}), "
                             f"got shape {tuple(self.timestep_map.shape)}")

        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # q(x_{t-1} | x_t, x_0) = N(coef_x0 x_0 + coef_xt x_t, posterior_variance)  (DDPM eq. 7)
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        self.posterior_mean_coef_x0 = betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef_xt = (1 - self.alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - self.alphas_cumprod)

    def __repr__(self) -> str:
        return (f"GaussianDiffusion({self.num_timesteps} steps, "
                f"abar from {self.alphas_cumprod[0]:.4g} to {self.alphas_cumprod[-1]:.3g})")

    # --- the forward process ---------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, a draw from q(x_t | x_0).

        ``x0, noise: (N, ...)``, ``t: (N,)`` integer steps; returns ``(N, ...)``.
        """
        if noise.shape != x0.shape:
            raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
        abar = _per_sample(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor,
                                  t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7):

            mean = b_t sqrt(abar_{t-1}) / (1 - abar_t) x_0 + (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t) x_t
            var  = b_t (1 - abar_{t-1}) / (1 - abar_t)

        Returns the mean ``(N, ...)`` and the variance, broadcastable ``(N, 1, ...)``.
        """
        mean = (_per_sample(self.posterior_mean_coef_x0, t, x_t) * x0
                + _per_sample(self.posterior_mean_coef_xt, t, x_t) * x_t)
        return mean, _per_sample(self.posterior_variance, t, x_t)

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert the forward process: x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        abar = _per_sample(self.alphas_cumprod, t, x_t)
        return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()

    # --- training ---------------------------------------------------------------

    def training_loss(self, model: Callable, x0: torch.Tensor, model_kwargs: dict | None = None,
                      t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """DDPM's simple loss: the mean squared error of the predicted noise.

        Draws t uniformly from ``0 .. T-1`` (first) and eps ~ N(0, I) (second)
        unless they are given, forms x_t with ``q_sample`` and returns
        ``mean((eps - eps_theta(x_t, t))^2)`` over all elements.

        With a learned variance (2C output channels) only the eps channels enter
        the loss, so the variance channels are not trained: the samplers here use
        fixed variances and never read them. (Improved DDPM and DiT add a
        variational bound term to train them; this book does not need it.)

        Args:
            model: ``model(x_t, t, **model_kwargs)``, e.g. a ``DiT`` with ``y=labels``.
            x0: ``(N, C, ...)`` clean data.
            t: optional ``(N,)`` integer steps; noise: optional ``(N, C, ...)``.
        Returns:
            a scalar tensor.
        """
        if t is None:
            t = torch.randint(0, self.num_timesteps, (len(x0),), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        eps = self._predict_eps(model, x_t, t, model_kwargs)
        return (noise - eps).pow(2).mean()

    # --- sampling ---------------------------------------------------------------

    def respace(self, num_steps: int) -> GaussianDiffusion:
        """The same process seen at only ``num_steps`` of its timesteps.

        Keeping timesteps t_0 < t_1 < ... (``space_timesteps``) and their abar,
        the short schedule's betas are b_i = 1 - abar_{t_i} / abar_{t_{i-1}}, so
        its marginals q(x_i | x_0) are exactly the original ones at t_i, and a
        model trained on the full schedule is still called with t_i.
        """
        kept = torch.tensor(space_timesteps(self.num_timesteps, num_steps))
        alphas_cumprod = self.alphas_cumprod[kept]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        return GaussianDiffusion(1 - alphas_cumprod / previous, timestep_map=self.timestep_map[kept])

    @torch.no_grad()
    def p_sample_loop(self, model: Callable, shape: tuple[int, ...], model_kwargs: dict | None = None,
                      noise: torch.Tensor | None = None, seed: int | None = None,
                      clip_denoised: bool = False, device: torch.device | str | None = None,
                      progress: bool = False) -> torch.Tensor:
        """DDPM ancestral sampling, from x_{T-1} ~ N(0, I) down to x_0.

        Each step draws x_{t-1} ~ N(posterior mean(x0_hat, x_t), posterior
        variance): DDPM's "fixed small" variance. No noise is added at the last step.

        Args:
            model: ``model(x_t, t, **model_kwargs)`` predicting eps.
            shape: ``(N, C, ...)`` of the samples.
            noise: the starting x_{T-1}; drawn from ``seed`` if not given.
            seed: seeds all random draws, so the same seed gives the same
                samples (noise is drawn on the CPU and moved to ``device``).
            clip_denoised: clamp x0_hat to [-1, 1], for data in that range (pixels).
                It also stops an imperfect model's eps error, multiplied by up to
                1 / sqrt(abar_t) in x0_hat at the noisiest steps, from blowing up.
            device: where to sample; default: noise's device, else the model's.
            progress: show a progress bar.
        Returns:
            ``(N, C, ...)`` samples.
        """
        return self._sample_loop(self._ddpm_step, model, shape, model_kwargs, noise, seed,
                                 clip_denoised, device, progress)

    @torch.no_grad()
    def ddim_sample_loop(self, model: Callable, shape: tuple[int, ...], model_kwargs: dict | None = None,
                         noise: torch.Tensor | None = None, seed: int | None = None, eta: float = 0.0,
                         clip_denoised: bool = False, device: torch.device | str | None = None,
                         progress: bool = False) -> torch.Tensor:
        """DDIM sampling (Song et al. 2021, eq. 12); ``eta=0`` is deterministic given the start noise.

        ``eta`` scales the noise added per step, s_t = eta sqrt((1 - abar_{t-1}) /
        (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1}); ``eta=1`` has DDPM's
        posterior variance. Other arguments as in ``p_sample_loop``.
        """
        if not 0 <= eta <= 1:
            raise ValueError(f"eta must lie in [0, 1], got {eta}")
        return self._sample_loop(partial(self._ddim_step, eta=eta), model, shape, model_kwargs, noise, seed,
                                 clip_denoised, device, progress)

    def _sample_loop(self, step: Callable, model, shape, model_kwargs, noise, seed, clip_denoised,
                     device, progress):
        """The loop both samplers share; ``step(x_t, t, x0_hat, z)`` returns x_{t-1}."""
        device = _sampling_device(model, noise, device)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        if noise is None:
            noise = torch.randn(shape, generator=generator).to(device)
        elif tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)} but shape {tuple(shape)} was asked for")
        x = noise.to(device)
        steps = reversed(range(self.num_timesteps))
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, total=self.num_timesteps, desc="sampling", unit="step")
        for i in steps:
            t = torch.full((len(x),), i, device=device, dtype=torch.long)
            eps = self._predict_eps(model, x, t, model_kwargs)
            x0 = self.predict_x0_from_eps(x, t, eps)
            if clip_denoised:
                x0 = x0.clamp(-1, 1)
            z = torch.randn(x.shape, generator=generator).to(device) if i > 0 else torch.zeros_like(x)
            x = step(x, t, x0, z)
        return x

    def _ddpm_step(self, x_t, t, x0, z):
        mean, variance = self.q_posterior_mean_variance(x0, x_t, t)
        return mean + variance.sqrt() * z

    def _ddim_step(self, x_t, t, x0, z, eta):
        abar = _per_sample(self.alphas_cumprod, t, x_t)
        abar_prev = _per_sample(self.alphas_cumprod_prev, t, x_t)
        # eps consistent with the (possibly clipped) x0_hat, as in the DDIM code
        eps = (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()
        sigma = eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
        return abar_prev.sqrt() * x0 + (1 - abar_prev - sigma ** 2).sqrt() * eps + sigma * z

    def _predict_eps(self, model, x_t, t, model_kwargs):
        """Call the model with the *original* timesteps and keep its eps channels."""
        out = model(x_t, self.timestep_map.to(t.device)[t], **(model_kwargs or {}))
        if out.shape[0] != x_t.shape[0] or out.shape[2:] != x_t.shape[2:] or out.shape[1] < x_t.shape[1]:
            raise ValueError(f"the model must return eps with x_t's shape {tuple(x_t.shape)} (plus optional "
                             f"variance channels), got {tuple(out.shape)}")
        return out[:, :x_t.shape[1]]


def classifier_free_guidance(model: Callable, cfg_scale: float) -> Callable:
    """Wrap any eps-model for classifier-free guidance (Ho & Salimans 2022), DiT-style.

    The batch holds a conditional half and an unconditional half with the same
    x_t (``x = cat([x_c, x_c])``, conditions ``cat([y, null])``, for any
    keyword conditions: labels, MAR's token vectors, ...). The wrapped model runs
    once on that batch and returns, in both halves,

        eps = eps_u + cfg_scale * (eps_c - eps_u),

    with any variance channels passed through. Use it with either sampler and
    keep the first half of the samples::

        guided = classifier_free_guidance(dit, 4.0)
        z = torch.randn(8, 4, 32, 32)
        samples = diffusion.ddim_sample_loop(guided, (16, 4, 32, 32), dict(y=torch.cat([y, null])),
                                             noise=torch.cat([z, z]))[:8]
    """

    def guided(x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        if len(x) % 2:
            raise ValueError(f"classifier-free guidance expects a batch of conditional then "
                             f"unconditional halves, got an odd batch size {len(x)}")
        half = x[: len(x) // 2]
        out = model(torch.cat([half, half]), t, **model_kwargs)
        channels = x.shape[1]
        cond_eps, uncond_eps = out[:, :channels].chunk(2)
        eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([eps, eps]), out[:, channels:]], dim=1)

    return guided


def _per_sample(values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``values[t]`` shaped ``(N, 1, 1, ...)`` to broadcast against ``x (N, ...)``, in x's dtype and device."""
    if t.ndim != 1 or t.shape[0] != x.shape[0] or t.is_floating_point():
        raise ValueError(f"t must be a (N,) integer tensor with N = {x.shape[0]}, "
                         f"got {t.dtype} {tuple(t.shape)}")
    if t.numel() and (t.min() < 0 or t.max() >= len(values)):
        raise ValueError(f"timesteps must lie in [0, {len(values) - 1}], "
                         f"got min {t.min().item()} max {t.max().item()}")
    picked = values[t.cpu()].to(device=x.device, dtype=x.dtype)
    return picked.view(-1, *([1] * (x.ndim - 1)))


def _sampling_device(model, noise, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    if noise is not None:
        return noise.device
    if isinstance(model, nn.Module):
        parameter = next(model.parameters(), None)
        if parameter is not None:
            return parameter.device
    return torch.device("cpu")
