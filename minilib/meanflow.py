"""MeanFlow: one-step generation by learning the average velocity.

Part V of the book (Geng, Deng, Bai, Kolter & He, 2025, "Mean Flows for
One-step Generative Modeling", https://arxiv.org/abs/2505.13447; official JAX
code: Gsunshine/meanflow, ``meanflow.py``).

Flow matching (chapter 6) learns the *instantaneous* velocity ``v(z_t, t)`` of
the flow that carries noise (t = 1) to data (t = 0), and a sampler needs many
small Euler steps because the paths ``z_t`` are curved. MeanFlow learns the
*average* velocity over a whole interval ``[r, t]``,

    u(z_t, r, t) = 1 / (t - r) * integral_r^t v(z_s, s) ds,

so that one step is exact however long it is:

    z_r = z_t - (t - r) u(z_t, r, t)          (one step from t = 1 to r = 0: one network call)

The integral cannot be evaluated during training, but differentiating
``(t - r) u = integral_r^t v`` in t (r fixed) gives the *MeanFlow identity*

    u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),

where ``d/dt`` is the total derivative along the path, ``dz_t/dt = v``:

    d/dt u = v . grad_z u + du/dt  (partial)  =  the Jacobian-vector product of
             u(z, r, t) with the tangent (dz, dr, dt) = (v, 0, 1),

one forward-mode pass (``torch.func.jvp``) that returns ``u`` and ``d/dt u``
together. The training target is the right-hand side with the
network's own ``d/dt u`` and the conditional velocity ``v = noise - x0``,
with a stop-gradient (:func:`meanflow_target`, :func:`meanflow_loss`). With
``r = t`` the target is just ``v``: flow matching is the special case, and the
official code draws ``r = t`` for 75 % of each batch.

What this file holds:

- :func:`sample_two_times`: the (r, t) pairs of the official code;
- :func:`total_derivative`, :func:`meanflow_target`, :func:`meanflow_loss`
  (with the paper's adaptive loss weighting of power p);
- :class:`MeanFlowDenoiser`: a chapter-3/5 adaLN-Zero backbone (``TinyDenoiser``
  or ``DiT``) that reads two times through two timestep embeddings summed;
- :func:`sample_one_step`, :func:`sample_few_steps`;
- :class:`GaussianAverageVelocity`: the exact ``u`` of the flow from N(0, I)
  noise to N(mu, s^2 I) data, which the tests and the chapter check everything against.

Time convention as in :mod:`minilib.flow`: ``z_t = (1 - t) x0 + t noise``, t = 0
data, t = 1 noise, and ``0 <= r <= t <= 1``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from .flow import append_dims, interpolate, logit_normal, velocity_target
from .patch_embed import unpatchify
from .timestep import TimestepEmbedder
from .validation import (NON_NEGATIVE, POSITIVE, POSITIVE_INT, UNIT_INTERVAL, check_arguments, check_float_input,
                         check_range, check_same_batch)

# The official code's defaults (Gsunshine/meanflow, meanflow.py, class MeanFlow, and configs/default.py):
# P_mean, P_std, data_proportion, norm_p, norm_eps.
TIME_MEAN, TIME_STD = -0.4, 1.0     # logit-normal times: sigmoid(N(-0.4, 1))
FRACTION_R_NEQ_T = 0.25             # data_proportion = 0.75 of each batch has r = t
ADAPTIVE_P, ADAPTIVE_EPS = 1.0, 0.01  # norm_p, norm_eps


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


@check_arguments(batch_size=POSITIVE_INT, std=POSITIVE, fraction_r_neq_t=UNIT_INTERVAL)
def sample_two_times(batch_size: int, device: torch.device | str | None = None, mean: float = TIME_MEAN,
                     std: float = TIME_STD, fraction_r_neq_t: float = FRACTION_R_NEQ_T,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Training times ``(r, t)``, each ``(batch_size,)``, with ``0 < r <= t < 1``.

    As the official code's ``sample_tr``: two independent logit-normal times
    ``sigmoid(N(mean, std^2))``, the larger is t and the smaller r; then the
    first ``int(batch_size * (1 - fraction_r_neq_t))`` samples get ``r = t``
    (plain flow matching for them). These are the defaults of the official
    code and the paper's ablated choices (its Table 1).
    """
    t = logit_normal(batch_size, device=device, mean=mean, std=std).to(dtype)
    r = logit_normal(batch_size, device=device, mean=mean, std=std).to(dtype)
    t, r = torch.maximum(t, r), torch.minimum(t, r)
    num_equal = int(batch_size * (1 - fraction_r_neq_t))
    equal = torch.arange(batch_size, device=t.device) < num_equal
    return torch.where(equal, t, r), t


def total_derivative(model: Callable, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
                     **model_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``u(z, r, t)`` and its total derivative ``d/dt u`` along ``dz/dt = v``, in one pass.

    ``torch.func.jvp`` pushes the tangent ``(v, 0, 1)`` of the inputs ``(z, r, t)``
    through the network (forward-mode differentiation): the result is
    ``grad_z u . v + 0 * du/dr + 1 * du/dt``. The first output is the ordinary
    ``u``, differentiable with respect to the network's parameters as usual.

    PyTorch's fused attention kernels have no forward-mode derivative, so the
    pass runs with the plain ("math") attention kernel.

    Args:
        model: ``model(z, r, t, **model_kwargs) -> u``, shaped like ``z``.
        z: ``(B, ...)`` points on the paths; r, t: ``(B,)``; v: the velocity, shaped like z.
    Returns:
        ``(u, du_dt)``, both shaped like ``z``.
    """
    if v.shape != z.shape:
        raise ValueError(f"the tangent v must have the shape of z {tuple(z.shape)}, got {tuple(v.shape)}")
    with sdpa_kernel(SDPBackend.MATH):
        return jvp(lambda z_, r_, t_: model(z_, r_, t_, **model_kwargs), (z, r, t),
                   (v, torch.zeros_like(r), torch.ones_like(t)))


def meanflow_target(model: Callable, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, v: torch.Tensor,
                    **model_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The prediction ``u(z, r, t)`` and its regression target ``sg(v - (t - r) d/dt u)``.

    The target is detached (stop-gradient): the network is pulled towards it,
    never the other way round. ``t - r`` is clipped to [0, 1] as in the
    official code; at ``r = t`` the target is exactly ``v``.

    Returns ``(u, target)``, both shaped like ``z``; only ``u`` carries gradients.
    """
    u, du_dt = total_derivative(model, z, r, t, v, **model_kwargs)
    gap = append_dims((t - r).clamp(0, 1), z.ndim)
    return u, (v - gap * du_dt).detach()


@check_arguments(std=POSITIVE, fraction_r_neq_t=UNIT_INTERVAL, p=NON_NEGATIVE, eps=POSITIVE)
def meanflow_loss(model: Callable, x0: torch.Tensor, model_kwargs: dict | None = None, mean: float = TIME_MEAN,
                  std: float = TIME_STD, fraction_r_neq_t: float = FRACTION_R_NEQ_T, p: float = ADAPTIVE_P,
                  eps: float = ADAPTIVE_EPS, velocity: Callable | None = None) -> torch.Tensor:
    """The MeanFlow loss on one batch of data ``x0 (B, ...)``.

    1. times ``(r, t)`` from :func:`sample_two_times`, noise ``e ~ N(0, I)``,
       ``z_t = (1 - t) x0 + t e`` and ``v = e - x0`` (as in :func:`minilib.flow.flow_matching_loss`);
    2. ``u`` and the target ``sg(v - (t - r) d/dt u)`` (:func:`meanflow_target`);
    3. per sample, the squared error summed over all its elements,
       ``d = ||u - target||^2``, and the paper's adaptive loss weight
       ``w = sg(1 / (d + eps)^p)``. Since ``w`` is a constant for the gradient,
       ``w d`` has the gradient of ``d`` for ``p = 0`` (the plain squared error),
       of ``2 sqrt(d + eps)`` for ``p = 1/2`` (the Pseudo-Huber loss) and of
       ``log(d + eps)`` for ``p = 1`` (the default, the official ``norm_p``):
       the larger p, the less a few large errors dominate;
    4. the mean of ``w d`` over the batch.

    Args:
        model: ``model(z, r, t, **model_kwargs) -> u`` (e.g. :class:`MeanFlowDenoiser`).
        x0: clean data ``(B, ...)``.
        model_kwargs: extra inputs of the model, e.g. ``{"y": labels}``.
        mean, std, fraction_r_neq_t: the time sampler (:func:`sample_two_times`).
        p, eps: the adaptive weighting (official ``norm_p`` and ``norm_eps``).
        velocity: optional ``velocity(z_t, t) -> v`` used instead of the conditional
            ``e - x0``, in the target and as the jvp tangent (the official code does
            this with a classifier-free-guided velocity; the tests, with an exact field).
    Returns:
        the scalar loss.
    """
    if not isinstance(x0, torch.Tensor) or x0.ndim < 2 or not x0.is_floating_point():
        raise ValueError(f"x0 must be a floating-point tensor of shape (B, ...), got {_describe(x0)}")
    model_kwargs = {} if model_kwargs is None else model_kwargs
    r, t = sample_two_times(x0.shape[0], device=x0.device, mean=mean, std=std,
                            fraction_r_neq_t=fraction_r_neq_t, dtype=x0.dtype)
    noise = torch.randn_like(x0)
    z = interpolate(x0, noise, t)
    v = velocity_target(x0, noise) if velocity is None else velocity(z, t)
    u, target = meanflow_target(model, z, r, t, v, **model_kwargs)
    error = (u - target).pow(2).flatten(1).sum(1)  # (B,)
    weight = 1.0 / (error.detach() + eps).pow(p)
    return (weight * error).mean()


# ---------------------------------------------------------------------------
# A network of two times
# ---------------------------------------------------------------------------


SECOND_TIMES = ("t-r", "r")


class MeanFlowDenoiser(nn.Module):
    """An adaLN-Zero transformer (``TinyDenoiser`` or ``DiT``) that reads two times.

    The backbone's conditioning vector becomes

        c = t_embedder(s t) + h_embedder(s h) + y_embedder(y),     h = t - r (or r)

    with ``h_embedder`` a second :class:`~minilib.timestep.TimestepEmbedder`
    (chapter 2) of its own, and ``s = time_scale``. Everything else is the
    backbone's, unchanged. The official model embeds ``(t, t - r)`` this way
    (``models_dit.py``: ``t_embedder``, ``h_embedder``, ``c = t + h + y``, with
    times fed unscaled); the paper also compares other pairs, such as ``(t, r)``,
    in its ablations (Table 1). With ``h = t - r`` the network sees ``h = 0`` exactly when
    it is asked for the instantaneous velocity.

    ``forward(z, r, t, y)``: ``z (B, C, H, W)``, ``r, t (B,)`` with
    ``0 <= r <= t <= 1``, labels ``y (B,)`` -> ``u (B, C, H, W)``.

    Args:
        backbone: a model with ``x_embedder``, ``pos_embed``, ``t_embedder``,
            ``y_embedder``, ``blocks`` (adaLN-Zero, called as ``block(tokens, c)``),
            ``final_layer`` and ``patch_size``, predicting as many channels as it reads.
        time_scale: times in [0, 1] are multiplied by this before the embedding.
            The default 1 feeds them unscaled, as the official model does. The
            MeanFlow target differentiates the network in t, and the timestep
            features' highest frequency is 1, so a scale of 1000 (the book's
            ``TinyDenoiser``, DiT's timesteps) makes that derivative up to 1000
            times larger: in chapter 14's digit run it ruined training.
        second_time: ``"t-r"`` (official) or ``"r"``.
    """

    @check_arguments(time_scale=POSITIVE)
    def __init__(self, backbone: nn.Module, time_scale: float = 1.0, second_time: str = "t-r"):
        super().__init__()
        needed = ("x_embedder", "pos_embed", "t_embedder", "y_embedder", "blocks", "final_layer", "patch_size")
        missing = [name for name in needed if not hasattr(backbone, name)]
        if missing:
            raise ValueError(f"MeanFlowDenoiser needs an adaLN-Zero backbone (TinyDenoiser with "
                             f"conditioning='adaln_zero', or DiT); this one has no {missing}")
        self.out_channels = getattr(backbone, "out_channels", backbone.in_channels)
        if self.out_channels != backbone.in_channels:
            raise ValueError(f"the backbone predicts {self.out_channels} channels for {backbone.in_channels} "
                             f"input channels; build it to predict one velocity (e.g. DiT(learn_sigma=False))")
        if second_time not in SECOND_TIMES:
            raise ValueError(f"second_time must be one of {SECOND_TIMES}, got {second_time!r}")
        self.backbone = backbone
        self.time_scale = time_scale
        self.second_time = second_time
        self.h_embedder = TimestepEmbedder(backbone.t_embedder.mlp[2].out_features,
                                           backbone.t_embedder.frequency_embedding_size)

    def conditioning(self, r: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``c = t_emb + h_emb + y_emb``, ``(B, D)``."""
        h = t - r if self.second_time == "t-r" else r
        net = self.backbone
        return net.t_embedder(t * self.time_scale) + self.h_embedder(h * self.time_scale) + net.y_embedder(y)

    def forward(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_float_input("MeanFlowDenoiser", "z", z, ndim=4, layout="(B, C, H, W)")
        for name, time in (("r", r), ("t", t)):
            check_float_input("MeanFlowDenoiser", name, time, ndim=1, layout="(B,)")
            check_range(time, 0.0, 1.0, f"MeanFlowDenoiser: {name}")
        check_range(t - r, 0.0, 1.0, "MeanFlowDenoiser: t - r (the interval must run from r up to t)")
        check_same_batch("MeanFlowDenoiser", z=z, r=r, t=t, y=y)
        net = self.backbone
        tokens = net.x_embedder(z) + net.pos_embed  # (B, L, D)
        c = self.conditioning(r, t, y)
        for block in net.blocks:
            tokens = block(tokens, c)
        return unpatchify(net.final_layer(tokens, c), net.patch_size, self.out_channels)

    def velocity(self, z: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The instantaneous velocity ``v(z, t) = u(z, t, t)``, ``(B, C, H, W)``."""
        return self(z, t, t, y)


# ---------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------


@torch.no_grad()
def sample_one_step(model: Callable, noise: torch.Tensor, model_kwargs: dict | None = None) -> torch.Tensor:
    """One network call from noise to data: ``z_0 = z_1 - u(z_1, 0, 1)``.

    ``noise (B, ...)`` is ``z_1``; ``model(z, r, t, **model_kwargs)``. Returns ``z_0``, shaped like ``noise``.
    """
    return sample_few_steps(model, noise, steps=1, model_kwargs=model_kwargs)


@torch.no_grad()
def sample_few_steps(model: Callable, noise: torch.Tensor, steps: int = 2, model_kwargs: dict | None = None,
                     times: torch.Tensor | None = None) -> torch.Tensor:
    """``steps`` jumps ``z_r = z_t - (t - r) u(z_t, r, t)`` from t = 1 down to 0.

    The times are ``linspace(1, 0, steps + 1)`` unless ``times`` (decreasing,
    ``(N + 1,)``) is given. With the exact average velocity every step lands
    exactly on the path, so 1, 2 or 10 steps give the same sample; a learned
    ``u`` trades calls for accuracy.

    Returns ``z`` at the last time, shaped like ``noise``.
    """
    if not isinstance(noise, torch.Tensor) or noise.ndim < 1 or not noise.is_floating_point():
        raise ValueError(f"noise must be a floating-point tensor of shape (B, ...), got {_describe(noise)}")
    if times is None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        times = torch.linspace(1.0, 0.0, steps + 1)
    levels = times.tolist() if isinstance(times, torch.Tensor) else list(times)
    if len(levels) < 2 or any(b >= a for a, b in zip(levels, levels[1:])) or levels[0] > 1 or levels[-1] < 0:
        raise ValueError(f"times must decrease strictly within [0, 1], got {levels}")
    model_kwargs = {} if model_kwargs is None else model_kwargs
    z = noise
    ones = noise.new_ones(noise.shape[0])
    for t, r in zip(levels[:-1], levels[1:]):
        u = model(z, r * ones, t * ones, **model_kwargs)
        z = z - (t - r) * u
    return z


# ---------------------------------------------------------------------------
# An exact average velocity: Gaussian noise to Gaussian data
# ---------------------------------------------------------------------------


class GaussianAverageVelocity(nn.Module):
    """The exact ``u(z, r, t)`` of the flow from noise N(0, I) to data N(mu, s^2 I).

    With independent ``x0 ~ N(mu, s^2 I)`` and noise, ``z_t`` is Gaussian with
    mean ``m_t = (1 - t) mu`` and standard deviation ``sigma_t = sqrt((1 - t)^2 s^2 + t^2)``.
    The flow's paths are ``z_tau = m_tau + (sigma_tau / sigma_t)(z_t - m_t)``:
    curved (``sigma`` is not linear in t), unlike the straight lines of a single
    data point. Hence

        v(z, t)    = -mu + (sigma_t' / sigma_t)(z - m_t)                 (flow matching's target field)
        u(z, r, t) = (z_t - z_r) / (t - r) = -mu + (sigma_t - sigma_r) / (sigma_t (t - r)) (z - m_t)

    and at ``r = t`` the limit ``u = v``. One step from ``t = 1`` gives
    ``z_0 = mu + s z_1``: noise lands exactly on N(mu, s^2 I).

    ``forward(z, r, t)``: ``z (B, ...)``, ``r, t (B,)`` -> ``u`` shaped like ``z``.
    ``mu`` is a float or a tensor broadcastable to one sample.
    """

    def __init__(self, mu: float | torch.Tensor = 0.0, s: float = 1.0):
        super().__init__()
        if not s > 0:
            raise ValueError(f"the data standard deviation s must be positive, got {s!r}")
        self.register_buffer("mu", torch.as_tensor(mu, dtype=torch.get_default_dtype()), persistent=False)
        self.s = float(s)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return ((1 - t) ** 2 * self.s ** 2 + t ** 2).sqrt()

    def velocity(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``v(z, t)``, shaped like ``z``."""
        t_ = append_dims(t, z.ndim)
        mu = self.mu.to(z.dtype)
        d_sigma = (t_ - (1 - t_) * self.s ** 2) / self.sigma(t_)
        return -mu + d_sigma / self.sigma(t_) * (z - (1 - t_) * mu)

    def forward(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        r_, t_ = append_dims(r, z.ndim), append_dims(t, z.ndim)
        mu = self.mu.to(z.dtype)
        gap = t_ - r_
        at_t = gap == 0
        safe_gap = torch.where(at_t, torch.ones_like(gap), gap)  # no 0/0, even in the unused branch
        slope = (self.sigma(t_) - self.sigma(r_)) / (self.sigma(t_) * safe_gap)
        limit = (t_ - (1 - t_) * self.s ** 2) / self.sigma(t_) ** 2  # sigma_t' / sigma_t
        return -mu + torch.where(at_t, limit, slope) * (z - (1 - t_) * mu)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"
