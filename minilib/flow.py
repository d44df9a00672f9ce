"""Flow matching and Euler ODE sampling, the way Stable Diffusion 3 does it.

Chapter 6 of the book. Rectified flow joins a clean image ``x0`` and a noise
image ``noise ~ N(0, I)`` by a straight line,

    x_t = (1 - t) x0 + t noise,        t in [0, 1],

so ``t = 0`` is data and ``t = 1`` is pure noise. Along the line the image
moves at the constant velocity ``dx_t/dt = noise - x0``, and a network
``v(x_t, t)`` is trained to predict it (:func:`flow_matching_loss`). The best
it can do is the average velocity through ``x_t``, ``E[noise - x0 | x_t]``:
a velocity *field* whose ODE ``dx/dt = v(x, t)`` carries the noise
distribution at ``t = 1`` onto the data distribution at ``t = 0``.

Sampling integrates that ODE backwards, from ``t = 1`` to ``t = 0``. SD3's
reference code copies the samplers of k-diffusion (Crowson's implementation of
Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models"), which speak of a *denoiser*
``D(x, sigma)`` (the predicted clean image) rather than a velocity. For a flow
the noise level ``sigma`` is simply ``t``, and the two views are related by

    D(x, sigma) = x - sigma v(x, sigma)              (calculate_denoised)
    dx/dsigma   = (x - D(x, sigma)) / sigma = v      (to_d)

so the k-diffusion samplers integrate exactly the flow's ODE. SD3 also
*shifts* the time grid towards high noise (:func:`time_snr_shift`), where the
image's large-scale structure is decided, and samples with classifier-free
guidance (:class:`CFGDenoiser`). The SD3.5 reference code samples SD3 Medium,
SD3.5 Medium and SD3.5 Large with DPM-Solver++(2M) (:func:`sample_dpmpp_2m`),
on the same grid as Euler, and SD3.5 Medium optionally with skip-layer
guidance (:class:`SkipLayerCFGDenoiser`); it uses Euler (:func:`sample_euler`)
for SD3.5 Large Turbo and the ControlNets, and diffusers samples SD3 with Euler.

A seeded SD3 run starts from ``torch.randn(shape)`` drawn on the CPU right
after ``torch.manual_seed(seed)``; ``torch.randn(shape,
generator=torch.Generator().manual_seed(seed))`` draws the same numbers without
touching the global generator. At ``sigma = 1`` that noise is the start ``x``.

Names and formulas follow SD3's reference code (``sd3_impls.py``,
``sd3_infer.py``) and k-diffusion (Crowson, https://github.com/crowsonkb/k-diffusion).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .validation import POSITIVE, POSITIVE_INT, check_arguments

NUM_TIMESTEPS = 1000   # SD3's inference code tabulates sigma(timestep / 1000) at 1000 timesteps
                       # (training draws a continuous t; the table is only the sampler's)


# ---------------------------------------------------------------------------
# Training: interpolation, timestep samplers, the loss
# ---------------------------------------------------------------------------


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The point ``x_t = (1 - t) x0 + t noise`` on the straight line from data to noise.

    Args:
        x0: clean data ``(B, ...)``, e.g. images ``(B, C, H, W)``.
        noise: same shape as ``x0``, usually ``N(0, I)``.
        t: times ``(B,)`` in ``[0, 1]``, one per sample.
    Returns:
        ``x_t``, the shape of ``x0``. SD3 calls this ``noise_scaling(sigma, noise, x0)``.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
    if t.shape != x0.shape[:1]:
        raise ValueError(f"t must have shape (B,) = ({x0.shape[0]},), got {tuple(t.shape)}")
    t = append_dims(t, x0.ndim)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``d x_t / dt = noise - x0``: the velocity along the line, the network's target."""
    return noise - x0


def uniform(batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Training times ``t ~ U(0, 1)``, shape ``(batch_size,)``."""
    return torch.rand(batch_size, device=device)


def logit_normal(batch_size: int, device: torch.device | str | None = None,
                 mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Training times ``t = sigmoid(u)``, ``u ~ N(mean, std^2)``: SD3's default sampler.

    With ``mean = 0, std = 1`` the density ``p(t) = N(logit t) / (t (1 - t))``
    peaks at ``t = 1/2`` and vanishes at both ends, so training spends its
    steps on middle noise levels, where the optimal velocity is hardest to
    predict (Esser et al. 2024, section 3.1); near both ends it is close to an
    affine function of ``x_t``. Shifting the samples with :func:`time_snr_shift`
    gives the logit-normal with ``mean + log(shift)``: the shift adds
    ``log(shift)`` to ``logit t``. Shape ``(batch_size,)``, values in ``(0, 1)``.
    """
    if std <= 0:
        raise ValueError(f"std must be positive, got {std}")
    return torch.sigmoid(mean + std * torch.randn(batch_size, device=device))


def flow_matching_loss(model: Callable, x0: torch.Tensor, model_kwargs: dict | None = None,
                       t_sampler: Callable = uniform) -> torch.Tensor:
    """The rectified-flow (conditional flow matching) loss on one batch.

        L = E_{t, noise} || v(x_t, t) - (noise - x0) ||^2,   x_t = (1 - t) x0 + t noise

    averaged over every element of the batch.

    Args:
        model: the velocity network, called as ``model(x_t, t, **model_kwargs)``
            with ``x_t`` shaped like ``x0`` and ``t`` of shape ``(B,)`` in ``[0, 1]``.
        x0: clean data ``(B, ...)``.
        model_kwargs: extra inputs of the model, e.g. ``{"y": labels}``.
        t_sampler: draws the times, ``t_sampler(B, device=...) -> (B,)``:
            :func:`uniform` or :func:`logit_normal`.
    Returns:
        the scalar mean squared error.
    """
    if not isinstance(x0, torch.Tensor) or x0.ndim < 2:
        raise ValueError(f"x0 must be a tensor of shape (B, ...), got {_describe(x0)}")
    model_kwargs = {} if model_kwargs is None else model_kwargs
    t = t_sampler(x0.shape[0], device=x0.device)
    noise = torch.randn_like(x0)
    x_t = interpolate(x0, noise, t)
    prediction = model(x_t, t, **model_kwargs)
    if prediction.shape != x0.shape:
        raise ValueError(f"the model must return a velocity of shape {tuple(x0.shape)}, "
                         f"got {tuple(prediction.shape)}")
    return (prediction - velocity_target(x0, noise)).pow(2).mean()


# ---------------------------------------------------------------------------
# SD3's discrete-flow schedule (ModelSamplingDiscreteFlow)
# ---------------------------------------------------------------------------


def time_snr_shift(shift: float, t):
    """Shift times towards noise: ``sigma = shift t / (1 + (shift - 1) t)``.

    A bigger image has more pixels that all carry the same information, so at a
    given ``t`` it is less destroyed than a small one. Shifting with
    ``shift > 1`` spends more of the sampling grid at high noise to make up for
    it: 0 and 1 stay put, the map is increasing, and ``shift = 1`` is the
    identity. In signal-to-noise terms, the SNR ``((1 - t) / t)^2`` is divided by
    ``shift^2`` (Esser et al. 2024, section 5.3.2); in logit terms,
    ``logit sigma = logit t + log(shift)``. SD3's reference code samples
    SD3.5 with ``shift = 3`` and SD3 medium with ``shift = 1``.

    Args:
        shift: a positive number.
        t: a float or a tensor of times in ``[0, 1]``.
    Returns:
        ``sigma``, the same type and shape as ``t``.
    """
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


@check_arguments(num_steps=POSITIVE_INT, shift=POSITIVE)
def sigmas(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """The noise levels of a sampling run, built as SD3's ``get_sigmas`` does.

    SD3's inference code (``ModelSamplingDiscreteFlow``) tabulates
    ``sigma(timestep) = time_snr_shift(shift, timestep / 1000)`` at the
    timesteps 1..1000 (the model itself is trained on a continuous ``t``), and
    reads ``sigma_max`` (= 1) and
    ``sigma_min`` (= ``sigma(1)``) from that table. It spaces ``num_steps``
    timesteps evenly from ``1000 sigma_max`` down to ``1000 sigma_min``, maps each
    through ``sigma(.)``, and appends a final 0 (the clean image).

    (``sigma_min`` is already shifted and is shifted once more: the last non-zero
    level is ``sigma(1000 sigma(1))``, about 0.009 for ``shift = 3``. We keep
    this quirk of the reference code so that the grids are identical.)

    Returns:
        float32 ``(num_steps + 1,)``, decreasing from 1 to 0.
    """
    table = time_snr_shift(shift, torch.arange(1, NUM_TIMESTEPS + 1) / NUM_TIMESTEPS)
    sigma_min, sigma_max = table[0], table[-1]
    timesteps = torch.linspace(sigma_max * NUM_TIMESTEPS, sigma_min * NUM_TIMESTEPS, num_steps)
    levels = time_snr_shift(shift, timesteps / NUM_TIMESTEPS)
    return torch.cat([levels, levels.new_zeros(1)]).float()


def calculate_denoised(sigma: torch.Tensor, model_output: torch.Tensor,
                       model_input: torch.Tensor) -> torch.Tensor:
    """The clean image a velocity prediction implies: ``D = x - sigma v``.

    From ``x = (1 - sigma) x0 + sigma noise`` and ``v = noise - x0`` follows
    ``x0 = x - sigma v``.

    Args:
        sigma: noise levels ``(B,)``.
        model_output: the velocity ``v``, ``(B, ...)``.
        model_input: the noisy input ``x``, the shape of ``model_output``.
    """
    sigma = sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))
    return model_input - model_output * sigma


# ---------------------------------------------------------------------------
# Samplers (k-diffusion, as SD3 uses them)
# ---------------------------------------------------------------------------


def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """Append size-1 dimensions to ``x`` until it has ``target_dims``, for broadcasting.

    ``(B,)`` becomes ``(B, 1, 1, 1)`` for ``target_dims = 4``; a 0-d tensor becomes ``(1, 1, 1, 1)``.
    """
    dims_to_append = target_dims - x.ndim
    if dims_to_append < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * dims_to_append]


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The ODE's slope ``dx/dsigma = (x - D(x, sigma)) / sigma`` from a denoiser output.

    For a flow denoiser ``D = x - sigma v`` this is exactly the velocity ``v``.
    ``sigma`` is a 0-d tensor or ``(B,)``; ``x`` and ``denoised`` are ``(B, ...)``.
    """
    return (x - denoised) / append_dims(sigma, x.ndim)


@torch.no_grad()
def sample_euler(model: Callable, x: torch.Tensor, sigmas: torch.Tensor,
                 extra_args: dict | None = None) -> torch.Tensor:
    """Euler's method from ``sigmas[0]`` to ``sigmas[-1]``.

    Karras et al. (2022), Algorithm 2 with Euler steps and no added noise:

        x <- x + (sigma_{i+1} - sigma_i) * (x - D(x, sigma_i)) / sigma_i

    Args:
        model: a denoiser, ``model(x, sigma, **extra_args) -> D`` with ``sigma`` of
            shape ``(B,)``, e.g. a :class:`VelocityDenoiser` or a :class:`CFGDenoiser`.
        x: the start ``(B, ...)``: for a flow from ``sigma = 1``, pure noise ``N(0, I)``.
        sigmas: decreasing noise levels ``(N + 1,)``, e.g. :func:`sigmas`; N model calls.
        extra_args: keyword arguments passed to every model call.
    Returns:
        the sample at ``sigmas[-1]`` (the clean image when it is 0), shaped like ``x``.

    The arithmetic is that of SD3's ``sample_euler`` (k-diffusion's), operation for
    operation, so with the same denoiser a seeded run gives the same float32
    numbers (SD3 also autocasts to float16 on CUDA). ``sigmas`` on the CPU are checked to decrease
    strictly to a level >= 0 (ValueError otherwise); on an accelerator they are
    not read.
    """
    _check_sampler_inputs(x, sigmas)
    extra_args = {} if extra_args is None else extra_args
    ones = x.new_ones(x.shape[0])  # sigma * ones: the level once per sample, (B,)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = model(x, sigma * ones, **extra_args)
        slope = to_d(x, sigma, denoised)  # dx/dsigma, the velocity
        x = x + slope * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_heun(model: Callable, x: torch.Tensor, sigmas: torch.Tensor,
                extra_args: dict | None = None) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 1, deterministic).

    Each step takes a trial Euler step to ``sigma_{i+1}``, evaluates the slope
    there too, and redoes the step with the average of the two slopes:

        x'    = x + (sigma_{i+1} - sigma_i) d_i
        x    <- x + (sigma_{i+1} - sigma_i) (d_i + d'(x', sigma_{i+1})) / 2

    Its error at the end falls like ``step^2`` instead of Euler's ``step``, at
    two model calls per step. The last step, to ``sigma = 0``, is a plain Euler
    step, because the slope ``(x - D) / sigma`` cannot be evaluated at 0. So
    ``N`` steps that end at 0 cost ``2N - 1`` model calls.

    Arguments and result as in :func:`sample_euler`.
    """
    _check_sampler_inputs(x, sigmas)
    extra_args = {} if extra_args is None else extra_args
    ones = x.new_ones(x.shape[0])
    ends_at_zero = bool(sigmas[-1] == 0)  # read once: inside the loop it would wait for the GPU at every step
    last = len(sigmas) - 2
    for i, (sigma, sigma_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        step = sigma_next - sigma
        slope = to_d(x, sigma, model(x, sigma * ones, **extra_args))
        trial = x + slope * step  # Euler's step
        if i == last and ends_at_zero:
            x = trial
        else:  # correct it with the slope at the trial point
            slope_next = to_d(trial, sigma_next, model(trial, sigma_next * ones, **extra_args))
            x = x + (slope + slope_next) / 2 * step
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Callable, x: torch.Tensor, sigmas: torch.Tensor,
                    extra_args: dict | None = None) -> torch.Tensor:
    """DPM-Solver++(2M): a second-order multistep solver, one model call per step.

    Lu et al. (2022), "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", Algorithm 2, in k-diffusion's form, which the SD3.5
    reference code uses for SD3 and SD3.5 (Medium, Large).

    It works with the *data prediction* ``D`` and the log inverse noise level
    ``lambda = -log sigma``. The ODE ``dx/dsigma = (x - D) / sigma`` has the exact
    solution

        x_next = (sigma_next / sigma) x + sigma_next * integral of e^lambda D dlambda

    (from lambda to lambda_next), and if ``D`` were constant over the step, with
    ``h = lambda_next - lambda``,

        x_next = (sigma_next / sigma) x - expm1(-h) D          (first order, = DDIM)

    The "2M" variant keeps the previous step's ``D`` and extrapolates ``D``
    linearly in lambda to the middle of the step:

        D' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},     r = h_{i-1} / h_i

    and uses ``D'`` in place of ``D``. The first step (no previous ``D``) is first
    order, and so is a last step onto ``sigma = 0``, where ``h`` is infinite and
    the step lands exactly on ``D``. Error ``O(h^2)`` at the cost of Euler.

    Arguments and result as in :func:`sample_euler`; ``sigmas`` must be positive
    except for a last 0.
    """
    _check_sampler_inputs(x, sigmas)
    extra_args = {} if extra_args is None else extra_args
    ones = x.new_ones(x.shape[0])
    old_denoised, h_last = None, None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = model(x, sigma * ones, **extra_args)
        h = sigma.log() - sigma_next.log()  # lambda_next - lambda; infinite when sigma_next = 0
        if old_denoised is None:
            estimate = denoised
        else:
            r = h_last / h
            estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            # Onto sigma = 0 the step is first order (the formula above would be inf - inf).
            # torch.where decides on the device, without reading sigma_next back.
            estimate = torch.where(sigma_next > 0, estimate, denoised)
        x = (sigma_next / sigma) * x - torch.expm1(-h) * estimate
        old_denoised, h_last = denoised, h
    return x


def _check_sampler_inputs(x, sigmas) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim < 1:
        raise ValueError(f"x must be a tensor of shape (B, ...), got {_describe(x)}")
    if not isinstance(sigmas, torch.Tensor) or sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of at least 2 noise levels (start and end), "
                         f"got {_describe(sigmas)}")
    # The levels are checked where reading them is free, on the CPU; reading a GPU
    # tensor would make the host wait for the device before every sampling run.
    if sigmas.device.type == "cpu":
        levels = sigmas.tolist()
        if (not all(math.isfinite(level) for level in levels)  # NaN would pass the comparisons below
                or any(later >= earlier for earlier, later in zip(levels, levels[1:])) or levels[-1] < 0):
            raise ValueError(f"sigmas must decrease strictly, be finite and end at a level >= 0, got {levels}")


# ---------------------------------------------------------------------------
# Denoiser wrappers
# ---------------------------------------------------------------------------


class VelocityDenoiser(nn.Module):
    """Turn a velocity network ``v(x_t, t, ...)`` into a denoiser ``D(x, sigma, ...)``.

    ``D(x, sigma) = x - sigma v(x, timestep_scale * sigma)``: SD3's
    ``BaseModel.apply_model``. Our small models take ``t`` in ``[0, 1]``
    (``timestep_scale = 1``); SD3's MM-DiT takes ``timestep = 1000 sigma``
    (``timestep_scale = 1000``).

    ``forward(x, sigma, **kwargs)``: ``x`` ``(B, ...)``, ``sigma`` ``(B,)``, keyword
    inputs passed on to the network; returns ``D``, shaped like ``x``.
    """

    def __init__(self, model: nn.Module, timestep_scale: float = 1.0):
        super().__init__()
        self.model = model
        self.timestep_scale = timestep_scale

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
        if sigma.shape != x.shape[:1]:
            raise ValueError(f"sigma must have shape (B,) = ({x.shape[0]},), got {tuple(sigma.shape)}")
        velocity = self.model(x, sigma * self.timestep_scale, **kwargs)
        return calculate_denoised(sigma, velocity, x)


class CFGDenoiser(nn.Module):
    """Classifier-free guidance around a denoiser, as SD3 runs it.

    The conditional and unconditional inputs go through the model as one
    batch of ``2B``; the two halves are then mixed as

        D = D_uncond + cond_scale (D_cond - D_uncond).

    ``cond_scale = 1`` is the plain conditional model, 0 the unconditional one,
    and larger values push samples further towards the condition. Since
    ``D = x - sigma v`` is affine in ``v``, guiding the denoiser is the same
    as guiding the velocity.

    ``forward(x, sigma, cond, uncond, cond_scale)``: ``x`` ``(B, ...)``, ``sigma``
    ``(B,)``, ``cond`` and ``uncond`` dicts with the same keys of the model's
    keyword inputs, each ``(B, ...)`` (e.g. ``{"y": labels}`` and
    ``{"y": null_labels}``). With :func:`sample_euler`, pass them as
    ``extra_args=dict(cond=..., uncond=..., cond_scale=...)``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict, uncond: dict,
                cond_scale: float) -> torch.Tensor:
        pos_out, neg_out = self.cond_and_uncond(x, sigma, cond, uncond)
        return neg_out + (pos_out - neg_out) * cond_scale

    def cond_and_uncond(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict,
                        uncond: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``(D_cond, D_uncond)``, each shaped like ``x``, from one model call on a
        batch of ``2B``: first the conditional half, then the unconditional one."""
        if not isinstance(cond, dict) or not isinstance(uncond, dict) or cond.keys() != uncond.keys():
            raise ValueError(f"cond and uncond must be dicts with the same keys, got "
                             f"{_keys(cond)} and {_keys(uncond)}")
        batch = x.shape[0]
        for name, value in [*cond.items(), *uncond.items()]:
            if value.shape[:1] != (batch,):
                raise ValueError(f"condition {name!r} must have batch size {batch}, "
                                 f"got shape {tuple(value.shape)}")
        # Run cond and uncond in one batch, then split.
        batched = self.model(torch.cat([x, x]), torch.cat([sigma, sigma]),
                             **{name: torch.cat([cond[name], uncond[name]]) for name in cond})
        pos_out, neg_out = batched.chunk(2)
        return pos_out, neg_out


class SkipLayerCFGDenoiser(CFGDenoiser):
    """Classifier-free guidance plus skip-layer guidance (SLG), as SD3.5 Medium's
    reference code samples it (``--skip_layer_cfg True``).

    A third prediction, the conditional one of the *same* network with some of its
    blocks left out, serves as a deliberately worse model; the sample is pushed
    away from it:

        D = D_uncond + cond_scale (D_cond - D_uncond) + scale (D_cond - D_skip)

    ``D_skip`` comes from a separate model call on the ``B`` conditional inputs
    with ``skip_layers=skip_layers`` passed on to the network
    (:meth:`minilib.mmdit.MMDiT.forward`). SD3.5 Medium uses blocks ``[7, 8, 9]``,
    ``scale = 2.5`` and guides only early, between 1 % and 20 % of the steps.

    When: the denoiser counts its calls, ``step = 0, 1, ...``, and adds the skip
    term only while ``start * steps < step < end * steps`` (both strict). With
    :func:`sample_euler` and :func:`sample_dpmpp_2m` (one call per step) ``step``
    is the step index; ``steps`` is the number of steps of the run. A new run
    needs a new denoiser or :meth:`reset`.

    Args:
        model: a denoiser whose network takes ``skip_layers``, e.g.
            ``VelocityDenoiser(mmdit, timestep_scale=1000)``.
        steps: the number of sampling steps.
        skip_layers: the block indices to leave out.
        scale: the SLG scale; 0 turns it off (no extra model call).
        start, end: the guided fraction of the steps, ``0 <= start <= end <= 1``.

    ``forward(x, sigma, cond, uncond, cond_scale)`` as :class:`CFGDenoiser`.
    """

    def __init__(self, model: nn.Module, steps: int, skip_layers: tuple[int, ...] | list[int] = (7, 8, 9),
                 scale: float = 2.5, start: float = 0.01, end: float = 0.2):
        super().__init__(model)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if len(skip_layers) == 0:
            raise ValueError("skip_layers must name at least one block")
        if scale < 0:
            raise ValueError(f"scale must be >= 0, got {scale}")
        if not 0 <= start <= end <= 1:
            raise ValueError(f"need 0 <= start <= end <= 1, got start={start}, end={end}")
        self.steps, self.skip_layers = steps, list(skip_layers)
        self.scale, self.start, self.end = scale, start, end
        self.step = 0

    def reset(self) -> None:
        """Start counting steps from 0 again, for a new sampling run."""
        self.step = 0

    def guides(self, step: int) -> bool:
        """Whether the call number ``step`` adds the skip-layer term."""
        return self.scale > 0 and self.start * self.steps < step < self.end * self.steps

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict, uncond: dict,
                cond_scale: float) -> torch.Tensor:
        pos_out, neg_out = self.cond_and_uncond(x, sigma, cond, uncond)
        guided = neg_out + (pos_out - neg_out) * cond_scale
        if self.guides(self.step):
            skip_out = self.model(x, sigma, **cond, skip_layers=self.skip_layers)
            guided = guided + (pos_out - skip_out) * self.scale
        self.step += 1
        return guided


def _keys(value) -> str:
    return sorted(value) if isinstance(value, dict) else f"a {type(value).__name__}"


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"
