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

The names and arguments follow the official code of Improved DDPM, which DiT
and MAR carry as their ``diffusion`` package (``q_sample``, ``p_mean_variance``,
``p_sample``, ``ddim_sample``, ``training_losses(model, x_start, t, ...)``,
``space_timesteps``), and so do its numbers: every schedule table is computed
in float64 and cast to the data's dtype only after the lookup, and the
samplers draw their noise in the same order, so the same weights and seeds
give the same samples to float32 rounding. The loops ``p_sample_loop`` and
``ddim_sample_loop`` add a ``seed``.

Models are called as ``model(x_t, t, **model_kwargs)`` and must return eps in
the first C channels of their output (C = ``x_t.shape[1]``). A model that also
predicts its variance (DiT with ``learn_sigma``) returns 2C channels. By default
this file trains and samples with the eps channels only (see ``training_loss``).

Opt-in, ``GaussianDiffusion(betas, learn_sigma=True)`` uses those channels as
Improved DDPM does (Nichol & Dhariwal 2021, https://arxiv.org/abs/2102.09672),
which is how DiT and MAR's diffusion loss (chapter 12) are trained:

* the "learned range" variance (eq. 15): the extra C channels v in [-1, 1]
  interpolate, in the log domain, between the two natural choices b_t and the
  posterior variance b~_t:  log Sigma = (v+1)/2 log b_t + (1 - (v+1)/2) log b~_t;
* the hybrid loss (eq. 16): L_simple + L_vlb, where L_vlb is the variational
  bound term at the sampled t (eqs. 4-5, in bits per dimension): the KL from the
  true posterior q(x_{t-1} | x_t, x_0) to the model's p(x_{t-1} | x_t) for t > 0,
  and the discretised Gaussian decoder NLL -log p(x_0 | x_1) at t = 0. The mean
  is detached in this term, so it trains the variance only;
* DDPM sampling with the model's variance, with MAR's ``temperature`` scaling
  the noise of every step.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from minilib.validation import FINITE, NON_NEGATIVE, UNIT_INTERVAL, check_range


def linear_beta_schedule(num_timesteps: int) -> torch.Tensor:
    """DDPM's schedule: b_t evenly spaced from 1e-4 to 0.02 for T = 1000.

    For other T both ends are scaled by 1000 / T, so that T * mean(b) and hence
    the final abar stay about the same. Returns ``(T,)`` float64.
    """
    scale = 1000 / num_timesteps
    if scale * 0.02 >= 1:
        raise ValueError(f"the linear schedule needs T >= 21 (its last beta is 20 / T), got T = {num_timesteps}")
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64, device="cpu")


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
    s = torch.arange(num_timesteps + 1, dtype=torch.float64, device="cpu") / num_timesteps
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


def space_timesteps(num_timesteps: int, section_counts: int | str | Sequence[int]) -> list[int]:
    """Which of the timesteps ``0 .. T-1`` a respaced process keeps, in increasing order.

    ``section_counts`` takes the forms of DiT's ``timestep_respacing`` (guided-diffusion's
    ``space_timesteps``):

    * ``250`` or ``"250"``: 250 timesteps spread evenly from 0 to T-1, both ends
      included (DiT samples with ``"250"``);
    * ``"ddim50"``: the DDIM paper's fixed stride, 0, s, 2s, ... with the smallest
      integer stride s that gives exactly 50 steps (0, 20, ..., 980 for T = 1000);
    * ``"10,15,20"`` (or a list ``[10, 15, 20]``): T cut into 3 sections of equal
      length (the first ``T % 3`` one step longer), with 10, 15 and 20 steps spread
      evenly over each.

    Within a section of ``size`` timesteps, ``count`` steps sit at
    ``round(k * (size - 1) / (count - 1))``, the position summed up step by step
    as in the official code so that its rounding (Python's ``round``, halves to
    even) gives the same steps. Returns a list of ints.
    """
    if not _is_int(num_timesteps) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            count = _parse_count(spec[len("ddim"):], section_counts)
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == count:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"section_counts {section_counts!r}: no integer stride gives exactly {count} "
                             f"of the {num_timesteps} timesteps")
        counts = [_parse_count(part, section_counts) for part in spec.split(",")]
    elif _is_int(section_counts):
        counts = [section_counts]
    elif isinstance(section_counts, (list, tuple)) and section_counts and all(map(_is_int, section_counts)):
        counts = list(section_counts)
    else:
        raise ValueError(f"section_counts must be a number of steps (250, '250'), 'ddimN' or "
                         f"comma-separated counts ('10,15,20'), got {section_counts!r}")

    kept, start = [], 0
    size_per_section, extra = divmod(num_timesteps, len(counts))
    for i, count in enumerate(counts):
        size = size_per_section + (1 if i < extra else 0)
        if not 0 <= count <= size:
            raise ValueError(f"section_counts {section_counts!r}: cannot take {count} steps from a section "
                             f"of {size} of the {num_timesteps} timesteps")
        stride = (size - 1) / (count - 1) if count > 1 else 1
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    if not kept:
        raise ValueError(f"section_counts {section_counts!r} keeps no timestep at all")
    return kept


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_count(text: str, section_counts) -> int:
    """One step count of a ``section_counts`` string, or a ValueError that quotes the whole string."""
    text = text.strip()
    if not text.isdigit():
        raise ValueError(f"section_counts must be a number of steps ('250'), 'ddimN' or comma-separated "
                         f"counts ('10,15,20'), got {section_counts!r}")
    return int(text)


class GaussianDiffusion:
    """A diffusion process with a given noise schedule, its loss and its samplers.

    Args:
        betas: ``(T,)`` noise schedule, each in (0, 1); see ``beta_schedule``.
        timestep_map: ``(T,)`` the timestep the *model* is told at each step.
            The identity (default) except after ``respace``, where step i of the
            short schedule is timestep ``timestep_map[i]`` of the original one.
        learn_sigma: if True the model returns 2C channels, eps then the
            variance values v of Improved DDPM's "learned range" (eq. 15); the
            loss adds the variational bound term that trains them and DDPM
            sampling uses the model's variance. If False (default) extra
            channels are ignored and the variance is the fixed posterior one.

    Attributes (all ``(T,)`` float64 on the CPU):
        betas, alphas_cumprod (abar_t), alphas_cumprod_prev (abar_{t-1}, with
        abar_{-1} = 1), alphas_cumprod_next (abar_{t+1}, with abar_T = 0); the
        square roots the formulas need, each computed here in float64 and cast to
        the data's dtype only after the lookup: sqrt_alphas_cumprod,
        sqrt_one_minus_alphas_cumprod, sqrt_recip_alphas_cumprod (1 / sqrt(abar_t)),
        sqrt_recipm1_alphas_cumprod (sqrt(1 / abar_t - 1)), ...; the posterior
        variance and mean coefficients, and posterior_log_variance_clipped
        (log b~_t with b~_0 = 0 replaced by b~_1). The names are those of the
        official code (guided-diffusion, DiT, MAR).
    """

    def __init__(self, betas: torch.Tensor, timestep_map: torch.Tensor | None = None, learn_sigma: bool = False):
        betas = torch.as_tensor(betas, dtype=torch.float64, device="cpu")
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not torch.all((betas > 0) & (betas < 1)):  # beta = 1 would make abar_T = 0
            raise ValueError(f"betas must lie in (0, 1), got min {betas.min().item()} max {betas.max().item()}")
        self.num_timesteps = len(betas)
        self.learn_sigma = bool(learn_sigma)
        self.timestep_map = (torch.arange(self.num_timesteps, device="cpu") if timestep_map is None
                             else timestep_map.cpu())
        if self.timestep_map.shape != betas.shape:
            raise ValueError(f"timestep_map must have one entry per beta ({len(betas)}), "
                             f"got shape {tuple(self.timestep_map.shape)}")

        # Every table is computed here in float64 and cast only after the lookup. Near t = 0,
        # abar_t = 0.9999: in float32, 1 - abar_t would keep only 3 significant digits.
        one = torch.ones(1, dtype=torch.float64, device="cpu")  # (also when built under torch.device("meta"))
        zero = torch.zeros(1, dtype=torch.float64, device="cpu")
        abar = torch.cumprod(1 - betas, dim=0)
        self.betas = betas
        self.log_betas = betas.log()
        self.alphas_cumprod = abar
        self.alphas_cumprod_prev = torch.cat([one, abar[:-1]])
        self.alphas_cumprod_next = torch.cat([abar[1:], zero])
        self.sqrt_alphas_cumprod = abar.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - abar).sqrt()
        self.log_one_minus_alphas_cumprod = (1 - abar).log()
        self.sqrt_recip_alphas_cumprod = (1 / abar).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / abar - 1).sqrt()
        # for DDIM: the same for abar_{t-1} and abar_{t+1}
        self.sqrt_alphas_cumprod_prev = self.alphas_cumprod_prev.sqrt()
        self.one_minus_alphas_cumprod_prev = 1 - self.alphas_cumprod_prev
        self.sqrt_alphas_cumprod_next = self.alphas_cumprod_next.sqrt()
        self.sqrt_one_minus_alphas_cumprod_next = (1 - self.alphas_cumprod_next).sqrt()

        # q(x_{t-1} | x_t, x_0) = N(coef_x0 x_0 + coef_xt x_t, posterior_variance)  (DDPM eq. 7)
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / (1 - abar)
        self.sqrt_posterior_variance = self.posterior_variance.sqrt()  # DDIM's sigma_t at eta = 1
        # b~_0 = 0: its log is clipped to log b~_1, as in Improved DDPM's code (the
        # lower end of the learned range at t = 0, where no noise is added anyway).
        self.posterior_log_variance_clipped = torch.cat([self.posterior_variance[1:2],
                                                         self.posterior_variance[1:]]).log()
        self.posterior_mean_coef_x0 = betas * self.alphas_cumprod_prev.sqrt() / (1 - abar)
        self.posterior_mean_coef_xt = (1 - self.alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - abar)
        # The tables above live on the CPU in float64; _on_device keeps a copy per (device, dtype),
        # so that a sampling loop on a GPU reads them there, without a round trip to the host.
        self._tables: dict[tuple, torch.Tensor] = {}

    def __repr__(self) -> str:
        learned = ", learned variance" if self.learn_sigma else ""
        return (f"GaussianDiffusion({self.num_timesteps} steps, "
                f"abar from {self.alphas_cumprod[0]:.4g} to {self.alphas_cumprod[-1]:.3g}{learned})")

    # --- the forward process ---------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, a draw from q(x_t | x_0).

        ``x0: (N, ...)``, ``t: (N,)`` integer steps, ``noise: (N, ...)`` eps (drawn
        with ``torch.randn_like`` if not given); returns ``(N, ...)``.
        """
        if noise is None:
            noise = torch.randn_like(x0)
        if noise.shape != x0.shape:
            raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}, got {tuple(noise.shape)}")
        return (self._coef(self.sqrt_alphas_cumprod, t, x0) * x0
                + self._coef(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor,
                                  t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of q(x_{t-1} | x_t, x_0) (DDPM eqs. 6-7):

            mean = b_t sqrt(abar_{t-1}) / (1 - abar_t) x_0 + (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t) x_t
            var  = b_t (1 - abar_{t-1}) / (1 - abar_t)

        Returns the mean ``(N, ...)`` and the variance, broadcastable ``(N, 1, ...)``.
        """
        mean = (self._coef(self.posterior_mean_coef_x0, t, x_t) * x0
                + self._coef(self.posterior_mean_coef_xt, t, x_t) * x_t)
        return mean, self._coef(self.posterior_variance, t, x_t)

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert the forward process: x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t),
        computed as ``x_t / sqrt(abar_t) - sqrt(1 / abar_t - 1) eps``. All ``(N, ...)``."""
        return (self._coef(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - self._coef(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def predict_eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The noise that leads from x0 to x_t: eps = (x_t / sqrt(abar_t) - x0) / sqrt(1 / abar_t - 1)."""
        return ((self._coef(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0)
                / self._coef(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    # --- the learned variance (Improved DDPM) ----------------------------------

    def learned_range_log_variance(self, var_values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model's log variance from its variance channels (Nichol & Dhariwal 2021, eq. 15):

            log Sigma_t = f log b_t + (1 - f) log b~_t,   f = (v + 1) / 2,

        so v = -1 gives the posterior variance b~_t ("fixed small"), v = +1 gives
        b_t ("fixed large"), and values in between interpolate in the log domain.
        ``var_values: (N, C, ...)``, ``t: (N,)``; returns ``(N, C, ...)``.
        """
        min_log = self._coef(self.posterior_log_variance_clipped, t, var_values)
        max_log = self._coef(self.log_betas, t, var_values)
        frac = (var_values + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def variational_bound_term(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                               eps: torch.Tensor, var_values: torch.Tensor) -> torch.Tensor:
        """The term of the variational bound at step t, in bits per dimension (Improved DDPM eqs. 4-5):

            L_{t-1} = KL( q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t) )   for t > 0,
            L_0     = -log p(x_0 | x_1)                                  for t = 0,

        where p(x_{t-1} | x_t) = N(posterior mean(x0_hat(eps), x_t), Sigma_t) with
        Sigma_t from ``learned_range_log_variance``. L_0 is the discretised
        Gaussian likelihood of 8-bit data in [-1, 1] (``discretized_gaussian_log_likelihood``),
        the code of Improved DDPM that DiT and MAR use unchanged, also for MAR's
        continuous tokens. Returns ``(N,)``: each sample's mean over its elements.
        """
        true_mean, _ = self.q_posterior_mean_variance(x0, x_t, t)
        true_log_variance = self._coef(self.posterior_log_variance_clipped, t, x_t)
        model_mean, _ = self.q_posterior_mean_variance(self.predict_x0_from_eps(x_t, t, eps), x_t, t)
        model_log_variance = self.learned_range_log_variance(var_values, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance)) / math.log(2)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance))
        return torch.where(t == 0, decoder_nll / math.log(2), kl)

    # --- training ---------------------------------------------------------------

    def training_loss(self, model: Callable, x0: torch.Tensor, model_kwargs: dict | None = None,
                      t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """DDPM's simple loss: the mean squared error of the predicted noise.

        Draws t uniformly from ``0 .. T-1`` (first) and eps ~ N(0, I) (second)
        unless they are given, forms x_t with ``q_sample`` and returns
        ``mean((eps - eps_theta(x_t, t))^2)`` over all elements.

        With a learned variance (2C output channels) only the eps channels enter
        the loss, so the variance channels are not trained: the samplers of a
        default process use fixed variances and never read them. (With
        ``learn_sigma=True`` the variational bound term that trains them is
        added: see ``training_losses``.)

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
        eps, var_values = self._model_output(model, x_t, t, model_kwargs)
        loss = (noise - eps).pow(2).mean()
        if self.learn_sigma:
            loss = loss + self.variational_bound_term(x0, x_t, t, eps.detach(), var_values).mean()
        return loss

    def training_losses(self, model: Callable, x_start: torch.Tensor, t: torch.Tensor,
                        model_kwargs: dict | None = None, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The loss of each sample at the given steps, as a dict of ``(N,)`` tensors.

        The arguments and keys of the official ``training_losses`` (Improved DDPM,
        DiT, MAR), whose training scripts draw ``t = torch.randint(0, T, (N,))``
        first; eps ~ N(0, I) is drawn here (``randn_like``) unless ``noise`` is given.

        ``"mse"``: the mean over each sample's elements of (eps - eps_theta)^2;
        with ``learn_sigma``, ``"vb"``: ``variational_bound_term`` at t, with
        eps_theta detached so that it trains only the variance channels;
        ``"loss"``: mse + vb, Improved DDPM's hybrid loss (eq. 16). Its weight
        lambda = 0.001 on L_vlb = sum over the T = 1000 steps is folded in: the
        sum is estimated by T times one uniformly drawn term, and lambda T = 1.

        Args:
            model: ``model(x_t, t, **model_kwargs)``.
            x_start: ``(N, C, ...)`` clean data.
            t: ``(N,)`` integer steps.
            model_kwargs: e.g. ``dict(y=labels)``.
            noise: optional ``(N, C, ...)`` eps.
        """
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"t must be a (N,) tensor of integer steps (training_losses(model, x_start, t, "
                             f"model_kwargs, noise)), got {type(t).__name__}")
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        eps, var_values = self._model_output(model, x_t, t, model_kwargs)
        terms = {"mse": mean_flat((noise - eps) ** 2)}
        if self.learn_sigma:  # learn the variance with the bound, leave the mean to the MSE (Improved DDPM 3.1)
            terms["vb"] = self.variational_bound_term(x_start, x_t, t, eps.detach(), var_values)
        terms["loss"] = terms["mse"] + terms["vb"] if self.learn_sigma else terms["mse"]
        return terms

    # --- one reverse step ---------------------------------------------------------

    def respace(self, section_counts: int | str | Sequence[int]) -> GaussianDiffusion:
        """The same process seen at only some of its timesteps, ``space_timesteps(T, section_counts)``:
        ``respace(50)``, ``respace("250")``, ``respace("ddim50")``, ``respace("10,15,20")``.

        Keeping timesteps t_0 < t_1 < ... and their abar, the short schedule's
        betas are b_i = 1 - abar_{t_i} / abar_{t_{i-1}}, so its marginals
        q(x_i | x_0) are exactly the original ones at t_i, and a model trained on
        the full schedule is still called with t_i.
        """
        kept = torch.tensor(space_timesteps(self.num_timesteps, section_counts), device="cpu")
        if len(kept) < 2:
            raise ValueError(f"section_counts {section_counts!r} keeps {len(kept)} timestep; "
                             f"a respaced process needs at least 2")
        alphas_cumprod = self.alphas_cumprod[kept]
        previous = torch.cat([torch.ones(1, dtype=torch.float64, device="cpu"), alphas_cumprod[:-1]])
        return GaussianDiffusion(1 - alphas_cumprod / previous, timestep_map=self.timestep_map[kept],
                                 learn_sigma=self.learn_sigma)

    def p_mean_variance(self, model: Callable, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                        denoised_fn: Callable | None = None, model_kwargs: dict | None = None) -> dict[str, torch.Tensor]:
        """The model's reverse step p(x_{t-1} | x_t) and its guess of x_0 (the official ``p_mean_variance``).

        Returns a dict of ``(N, C, ...)`` tensors: ``"pred_xstart"`` x0_hat (after
        ``denoised_fn``, then clamped to [-1, 1] if ``clip_denoised``), ``"mean"``
        the posterior mean given x0_hat, ``"variance"`` and ``"log_variance"``:
        the fixed posterior variance b~_t (log clipped at t = 0), or with
        ``learn_sigma`` the model's (``learned_range_log_variance``).
        """
        eps, var_values = self._model_output(model, x, t, model_kwargs)
        pred_xstart = self._denoised(x, t, eps, clip_denoised, denoised_fn)
        mean, variance = self.q_posterior_mean_variance(pred_xstart, x, t)
        log_variance = self._model_log_variance(var_values, t, x)
        variance = log_variance.exp() if var_values is not None else variance
        return {"mean": mean, "variance": variance.expand_as(x), "log_variance": log_variance.expand_as(x),
                "pred_xstart": pred_xstart}

    def p_sample(self, model: Callable, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                 denoised_fn: Callable | None = None, *, model_kwargs: dict | None = None,
                 temperature: float = 1.0, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One DDPM step from x_t to x_{t-1} (the official ``p_sample``, with MAR's ``temperature``).

        Draws z ~ N(0, I) shaped like x at *every* step, also at t = 0 where it is
        multiplied by 0, after the model call: the official order of random draws,
        so that seeded runs give the same numbers. ``generator`` (default: the
        global one, on x's device) is what it is drawn from. Returns
        ``{"sample": x_{t-1}, "pred_xstart": x0_hat}``, both ``(N, C, ...)``.
        """
        eps, var_values = self._model_output(model, x, t, model_kwargs)
        x0 = self._denoised(x, t, eps, clip_denoised, denoised_fn)
        z = _noise_like(x, generator)
        return {"sample": self._ddpm_step(x, t, x0, z, var_values, temperature=temperature), "pred_xstart": x0}

    def ddim_sample(self, model: Callable, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                    denoised_fn: Callable | None = None, *, model_kwargs: dict | None = None,
                    eta: float = 0.0, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One DDIM step from x_t to x_{t-1} (the official ``ddim_sample``); arguments as in ``p_sample``.

        Like the official code it draws z at every step, even for ``eta = 0`` where
        z is multiplied by 0. Returns ``{"sample", "pred_xstart"}``.
        """
        eps, _ = self._model_output(model, x, t, model_kwargs)
        x0 = self._denoised(x, t, eps, clip_denoised, denoised_fn)
        z = _noise_like(x, generator)
        return {"sample": self._ddim_step(x, t, x0, z, eta=eta), "pred_xstart": x0}

    def ddim_reverse_sample(self, model: Callable, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                            denoised_fn: Callable | None = None, *,
                            model_kwargs: dict | None = None) -> dict[str, torch.Tensor]:
        """One step of the deterministic DDIM ODE *forwards*, from x_t to x_{t+1} (image to noise):

            x_{t+1} = sqrt(abar_{t+1}) x0_hat + sqrt(1 - abar_{t+1}) eps,   abar_T = 0.

        Returns ``{"sample": x_{t+1}, "pred_xstart": x0_hat}`` (the official ``ddim_reverse_sample``, eta 0).
        """
        eps, _ = self._model_output(model, x, t, model_kwargs)
        x0 = self._denoised(x, t, eps, clip_denoised, denoised_fn)
        eps = self.predict_eps_from_x0(x, t, x0)
        sample = (x0 * self._coef(self.sqrt_alphas_cumprod_next, t, x)
                  + self._coef(self.sqrt_one_minus_alphas_cumprod_next, t, x) * eps)
        return {"sample": sample, "pred_xstart": x0}

    def _ddpm_step(self, x_t, t, x0, z, var_values=None, temperature=1.0):
        """x_{t-1} = posterior mean(x0_hat, x_t) + [t > 0] sqrt(Sigma_t) z temperature."""
        mean, _ = self.q_posterior_mean_variance(x0, x_t, t)
        log_variance = self._model_log_variance(var_values, t, x_t)  # fixed, or learned (Improved DDPM eq. 15)
        return mean + _nonzero(t, x_t) * torch.exp(0.5 * log_variance) * z * temperature

    def _ddim_step(self, x_t, t, x0, z, var_values=None, *, eta):  # DDIM sets its own variance: var_values unused
        """x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - s_t^2) eps + [t > 0] s_t z."""
        eps = self.predict_eps_from_x0(x_t, t, x0)  # consistent with the (possibly clipped) x0_hat, as in DDIM
        sigma = eta * self._coef(self.sqrt_posterior_variance, t, x_t)  # DDIM eq. 16: eta = 1 is DDPM's b~_t
        # (the clamp: in half precision, at eta = 1, the rounded difference can fall just below 0)
        eps_scale = (self._coef(self.one_minus_alphas_cumprod_prev, t, x_t) - sigma ** 2).clamp(min=0).sqrt()
        mean = x0 * self._coef(self.sqrt_alphas_cumprod_prev, t, x_t) + eps_scale * eps
        return mean + _nonzero(t, x_t) * sigma * z

    def _denoised(self, x_t, t, eps, clip_denoised, denoised_fn):
        """x0_hat from eps, then ``denoised_fn`` and the clamp to [-1, 1] if asked for."""
        x0 = self.predict_x0_from_eps(x_t, t, eps)
        if denoised_fn is not None:
            x0 = denoised_fn(x0)
        return x0.clamp(-1, 1) if clip_denoised else x0

    def _model_log_variance(self, var_values, t, x):
        """log b~_t (fixed small, clipped at t = 0) or, given variance channels, the learned range."""
        if var_values is None:
            return self._coef(self.posterior_log_variance_clipped, t, x)
        return self.learned_range_log_variance(var_values, t)

    # --- sampling loops -----------------------------------------------------------

    @torch.no_grad()
    def p_sample_loop(self, model: Callable, shape: tuple[int, ...], model_kwargs: dict | None = None,
                      noise: torch.Tensor | None = None, seed: int | None = None,
                      clip_denoised: bool = False, device: torch.device | str | None = None,
                      progress: bool = False, temperature: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """DDPM ancestral sampling, from x_{T-1} ~ N(0, I) down to x_0.

        Each step (``p_sample``) draws x_{t-1} ~ N(posterior mean(x0_hat, x_t), variance):
        DDPM's "fixed small" posterior variance, or with ``learn_sigma`` the model's
        own (``learned_range_log_variance``). No noise is added at the last step.

        Args:
            model: ``model(x_t, t, **model_kwargs)`` predicting eps.
            shape: ``(N, C, ...)`` of the samples.
            model_kwargs: a dict, e.g. ``dict(y=labels)``. (The official
                ``p_sample_loop`` takes ``noise`` third; here pass it by name.)
            noise: the starting x_{T-1}; drawn if not given.
            seed: seeds all random draws, so the same seed gives the same
                samples on every device (noise is drawn on the CPU and moved to
                ``device``): the start noise if not given, then one draw per step.
                With the global generator seeded instead (``torch.manual_seed``),
                the draws are the same on the CPU.
            generator: draw from this ``torch.Generator`` instead (not with
                ``seed``), e.g. to continue a stream that drew the start noise.
            clip_denoised: clamp x0_hat to [-1, 1], for data in that range (pixels).
                It also stops an imperfect model's eps error, multiplied by up to
                1 / sqrt(abar_t) in x0_hat at the noisiest steps, from blowing up.
            device: where to sample; default: noise's device, else the model's.
            progress: show a progress bar.
            temperature: multiplies the noise of every step (MAR's ``p_sample``):
                1 is the model's distribution, smaller values sharpen it and 0 gives
                the deterministic chain of posterior means. The start noise is not scaled.
        Returns:
            ``(N, C, ...)`` samples.
        """
        NON_NEGATIVE("p_sample_loop", "temperature", temperature)
        return self._sample_loop(self.p_sample, model, shape, model_kwargs, noise, seed, generator, clip_denoised,
                                 device, progress, temperature=temperature)

    @torch.no_grad()
    def ddim_sample_loop(self, model: Callable, shape: tuple[int, ...], model_kwargs: dict | None = None,
                         noise: torch.Tensor | None = None, seed: int | None = None, eta: float = 0.0,
                         clip_denoised: bool = False, device: torch.device | str | None = None,
                         progress: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """DDIM sampling (Song et al. 2021, eq. 12); ``eta=0`` is deterministic given the start noise.

        ``eta`` scales the noise added per step, s_t = eta sqrt((1 - abar_{t-1}) /
        (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1}); ``eta=1`` has DDPM's
        posterior variance. Other arguments as in ``p_sample_loop``.
        """
        UNIT_INTERVAL("ddim_sample_loop", "eta", eta)
        return self._sample_loop(self.ddim_sample, model, shape, model_kwargs, noise, seed, generator, clip_denoised,
                                 device, progress, eta=eta)

    def _sample_loop(self, sample_step: Callable, model, shape, model_kwargs, noise, seed, generator,
                     clip_denoised, device, progress, **step_options):
        """The loop both samplers share: ``x = sample_step(model, x, t, ...)["sample"]`` for t = T-1 .. 0."""
        if model_kwargs is not None and not isinstance(model_kwargs, dict):
            raise ValueError(f"model_kwargs must be a dict of keyword arguments for the model, got "
                             f"{type(model_kwargs).__name__} (pass the start noise as noise=...)")
        if seed is not None and generator is not None:
            raise ValueError("give seed or generator, not both")
        device = _sampling_device(model, noise, device)
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
        if noise is None:
            noise = _standard_normal(tuple(shape), device, torch.float32, generator)
        elif tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)} but shape {tuple(shape)} was asked for")
        x = noise.to(device)
        steps = reversed(range(self.num_timesteps))
        if progress:
            from tqdm.auto import tqdm
            steps = tqdm(steps, total=self.num_timesteps, desc="sampling", unit="step")
        for i in steps:
            t = torch.full((len(x),), i, device=device, dtype=torch.long)
            x = sample_step(model, x, t, clip_denoised, model_kwargs=model_kwargs, generator=generator,
                            **step_options)["sample"]
        return x

    def _coef(self, values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``values[t]`` shaped ``(N, 1, 1, ...)`` to broadcast against ``x (N, ...)``, in x's dtype and device.

        ``values`` is one of this process's float64 ``(T,)`` tables. Casting the
        table, then looking up, gives the same numbers as looking up, then casting;
        the copy on x's device is made once and kept, so the lookup never waits for the GPU."""
        _check_timesteps(t, x, len(values))
        return self._on_device(values, x.device, x.dtype)[t].view(-1, *([1] * (x.ndim - 1)))

    def _on_device(self, table: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``table`` (one of this process's CPU tensors) on ``device`` in ``dtype``, copied once and kept."""
        key = (id(table), device, dtype)
        if key not in self._tables:
            self._tables[key] = table.to(device=device, dtype=dtype)
        return self._tables[key]

    def _model_output(self, model, x_t, t, model_kwargs):
        """Call the model with the *original* timesteps; return its eps channels and,
        with ``learn_sigma``, its variance channels (else None)."""
        timestep_map = self._on_device(self.timestep_map, t.device, self.timestep_map.dtype)
        out = model(x_t, timestep_map[t], **(model_kwargs or {}))
        channels = x_t.shape[1]
        if out.shape[0] != x_t.shape[0] or out.shape[2:] != x_t.shape[2:] or out.shape[1] < channels:
            raise ValueError(f"the model must return eps with x_t's shape {tuple(x_t.shape)} (plus optional "
                             f"variance channels), got {tuple(out.shape)}")
        if not self.learn_sigma:
            return out[:, :channels], None
        if out.shape[1] != 2 * channels:
            raise ValueError(f"with learn_sigma the model must return 2 x {channels} channels (eps, then the "
                             f"variance values), got {out.shape[1]}")
        return out[:, :channels], out[:, channels:]


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
    FINITE("classifier_free_guidance", "cfg_scale", cfg_scale)

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


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """The mean over all dimensions but the first: ``(N, ...)`` to ``(N,)``."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL( N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)) ) elementwise, in nats:

        0.5 (logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2) - 1).
    """
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) ~ 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), the approximation Improved DDPM uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log p(x) for data quantised to 256 levels in [-1, 1] under N(means, exp(log_scales)^2) (DDPM section 3.3).

    Each value x owns the bin [x - 1/255, x + 1/255]; values beyond +-0.999 own
    everything out to infinity on their side. Elementwise, in nats.
    """
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _check_timesteps(t: torch.Tensor, x: torch.Tensor, num_timesteps: int) -> None:
    """t must be ``(N,)`` integer steps in ``[0, num_timesteps)``, with N = len(x)
    (the range is checked without stalling a GPU: see minilib/validation.py)."""
    if t.ndim != 1 or t.shape[0] != x.shape[0] or t.is_floating_point():
        raise ValueError(f"t must be a (N,) integer tensor with N = {x.shape[0]}, "
                         f"got {t.dtype} {tuple(t.shape)}")
    check_range(t, 0, num_timesteps - 1, "timesteps")


def _nonzero(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """1 where t > 0 and 0 at t = 0, shaped ``(N, 1, ...)`` like x: no noise is added at the last step."""
    return (t != 0).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, in x's dtype, on x's device (see ``_standard_normal``)."""
    return _standard_normal(x.shape, x.device, x.dtype, generator)


def _standard_normal(shape, device: torch.device, dtype: torch.dtype,
                     generator: torch.Generator | None) -> torch.Tensor:
    """N(0, I) noise of ``shape`` on ``device``.

    Without a generator it is drawn on the device from the global generator (as
    ``torch.randn_like`` in the official code). With one (a CPU generator, so
    that a seed gives the same samples on every device), it is drawn on the
    generator's device and, from the CPU, copied from pinned memory without
    blocking, so the loop need not wait for the GPU to finish its queue."""
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    noise = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
    if noise.device.type == "cpu" and device.type == "cuda":
        return noise.pin_memory().to(device, non_blocking=True)
    return noise.to(device)


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
