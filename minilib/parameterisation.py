"""One noising process, four things to predict, two ways to sample: the bridge from chapter 5 to 6.

DDPM and rectified flow write the noisy sample the same way,

    x_t = a_t x0 + b_t eps,      eps ~ N(0, I),

with ``a = sqrt(abar_t)``, ``b = sqrt(1 - abar_t)`` for DDPM and ``a = 1 - t``,
``b = t`` for rectified flow. Given ``x_t`` and the coefficients, a network that
predicts any one of eps, x0, the score ``grad log p_t(x_t)`` or the velocity
``dx_t/dt`` determines the other three (Tweedie's formula links the score to eps).

In the variables ``y = x / a`` and ``sigma = b / a`` every such process becomes
``y = x0 + sigma eps``, and its probability-flow ODE is ``dy/dsigma = eps_hat``.
One Euler step of that ODE is exactly one DDIM step (eta = 0); one Euler-Maruyama
step of the reverse SDE is, to first order in beta, one DDPM step; a Langevin step
is the stochastic corrector that moves samples towards p_t at a fixed noise level.

All functions broadcast: ``a``, ``b`` may be floats or tensors shaped like ``x``'s batch
dimension followed by ones (``append_dims`` in ``flow.py`` makes them).
"""

from __future__ import annotations

import torch


# --- the coefficients of the two processes -----------------------------------------------


def ddpm_coefficients(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a_t, b_t) = (sqrt(abar_t), sqrt(1 - abar_t))`` at integer steps ``t``, in float64."""
    abar = alphas_cumprod.double()[t]
    return abar.sqrt(), (1 - abar).sqrt()


def flow_coefficients(t: torch.Tensor | float) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """Rectified flow: ``(a_t, b_t) = (1 - t, t)`` for t in [0, 1]."""
    return 1 - t, t


# --- converting one prediction into another ------------------------------------------------


def x0_from_eps(x_t, eps, a, b):
    """Solve ``x_t = a x0 + b eps`` for x0."""
    return (x_t - b * eps) / a


def eps_from_x0(x_t, x0, a, b):
    """Solve ``x_t = a x0 + b eps`` for eps."""
    return (x_t - a * x0) / b


def score_from_eps(eps, b):
    """Tweedie: the best eps predictor is ``-b * grad log p_t``, so the score is ``-eps / b``."""
    return -eps / b


def eps_from_score(score, b):
    return -b * score


def velocity_from_eps(x_t, eps, a, b, da, db):
    """The velocity ``dx_t/dt = a'(t) x0 + b'(t) eps`` along the path, from an eps prediction.

    ``da``, ``db`` are the time derivatives of a and b (rectified flow: -1 and 1, so
    ``v = eps - x0``)."""
    return da * x0_from_eps(x_t, eps, a, b) + db * eps


def eps_from_velocity(x_t, v, a, b, da, db):
    """Invert ``velocity_from_eps``: ``v = da (x_t - b eps) / a + db eps`` is linear in eps."""
    return (v - da * x_t / a) / (db - da * b / a)


# --- samplers as integrators ---------------------------------------------------------------


def euler_step_in_sigma(x_t, eps, a, b, a_next, b_next):
    """One Euler step of the probability-flow ODE ``dy/dsigma = eps`` from level (a, b) to (a_next, b_next).

    With ``y = x / a`` and ``sigma = b / a``: ``y_next = y + (sigma_next - sigma) eps``, and
    ``x_next = a_next y_next``. Algebraically this is DDIM's step with eta = 0:
    ``a_next x0_hat + b_next eps``.
    """
    y, sigma, sigma_next = x_t / a, b / a, b_next / a_next
    return a_next * (y + (sigma_next - sigma) * eps)


def euler_maruyama_reverse_step(x_t, eps, beta, b, z):
    """One step of the reverse VP-SDE ``dx = [-beta/2 x - beta grad log p] dt + sqrt(beta) dW``, backwards by one step.

    With the score ``-eps / b``: ``x + (beta / 2) x - (beta / b) eps + sqrt(beta) z``. DDPM's
    ancestral step ``(x - beta / b eps) / sqrt(1 - beta) + sigma z`` agrees with it up to O(beta^2).
    """
    return x_t + 0.5 * beta * x_t - beta / b * eps + beta ** 0.5 * z


def langevin_step(x, score, step_size, z):
    """Unadjusted Langevin: ``x + step_size * score + sqrt(2 step_size) z``; its stationary law is p."""
    return x + step_size * score + (2 * step_size) ** 0.5 * z
