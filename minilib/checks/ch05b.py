"""The interlude between chapters 5 and 6: the velocity from an eps prediction, DDIM with eta = 1 is DDPM."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .runner import Case, Mistake, Part, _keeps_random_state, _randn, _run

__all__ = ['check_velocity_from_eps', 'check_ddim_eta_step']


@_keeps_random_state
def check_velocity_from_eps(fn: Callable) -> None:
    """Check ``fn(x_t, eps, a, b, da, db)``: the path velocity ``da * x0_hat + db * eps`` from an eps prediction.

    ``x_t = a x0 + b eps`` with a and b floats or tensors broadcastable to ``x_t``; like
    ``minilib.parameterisation.velocity_from_eps``.
    """
    from ..parameterisation import velocity_from_eps

    def forgot_x0(x_t, eps, a, b, da, db):
        return da * x_t + db * eps

    def wrong_x0(x_t, eps, a, b, da, db):
        return da * (x_t - eps) / a + db * eps

    abar = torch.tensor([0.9, 0.5, 0.05]).reshape(3, 1, 1, 1)
    cases = [Case("rectified flow at t = 0.3 (a = 0.7, b = 0.3, da = -1, db = 1): v = eps - x0",
                  (_randn(2, 1, 4, 4, seed=60), _randn(2, 1, 4, 4, seed=61), 0.7, 0.3, -1.0, 1.0)),
             Case("DDPM-like coefficients per sample, a = sqrt(abar), b = sqrt(1 - abar), (3, 1, 1, 1) each",
                  (_randn(3, 2, 3, 3, seed=62), _randn(3, 2, 3, 3, seed=63), abar.sqrt(), (1 - abar).sqrt(),
                   -0.5 / abar.sqrt(), 0.5 / (1 - abar).sqrt())),
             Case("a = 1 (no signal lost) and b = 0.01", (_randn(4, 8, seed=64), _randn(4, 8, seed=65), 1.0, 0.01,
                                                          -1.0, 1.0))]
    hidden = [Case("rectified flow near the data, t = 0.02 (a = 0.98, b = 0.02), x_t (3, 5)",
                   (_randn(3, 5, seed=66), _randn(3, 5, seed=67), 0.98, 0.02, -1.0, 1.0)),
              Case("a cosine-like path a = cos(pi t / 2), b = sin(pi t / 2) at t = 0.5, per-sample tensors",
                   (_randn(2, 1, 3, 3, seed=68), _randn(2, 1, 3, 3, seed=69), torch.full((2, 1, 1, 1), 0.5 ** 0.5),
                    torch.full((2, 1, 1, 1), 0.5 ** 0.5), torch.full((2, 1, 1, 1), -0.5 ** 0.5 * 3.14159265 / 2),
                    torch.full((2, 1, 1, 1), 0.5 ** 0.5 * 3.14159265 / 2)))]
    _run(fn, cases, velocity_from_eps, "minilib.parameterisation.velocity_from_eps", rtol=1e-5, atol=1e-5,
         hidden=hidden,
         mistakes=[Mistake(forgot_x0, "da multiplies the *clean* image x0_hat = (x_t - b eps) / a, not x_t itself."),
                   Mistake(wrong_x0, "x0_hat = (x_t - b * eps) / a: the noise enters x_t scaled by b.")],
         hint="first x0_hat = (x_t - b * eps) / a (Tweedie's formula in eps form), then v = da * x0_hat + db * eps.")


def _posterior_step(x_t, eps, abar_t, abar_prev, eta, z):
    """DDPM's ancestral step, written with the posterior q(x_{t-1} | x_t, x0_hat) (DDPM eqs. 6-7), for eta = 1."""
    beta = 1 - abar_t / abar_prev
    x0_hat = (x_t - (1 - abar_t) ** 0.5 * eps) / abar_t ** 0.5
    mean = (beta * abar_prev ** 0.5 / (1 - abar_t) * x0_hat
            + (1 - abar_prev) * (1 - beta) ** 0.5 / (1 - abar_t) * x_t)
    return mean + (beta * (1 - abar_prev) / (1 - abar_t)) ** 0.5 * z


def _ddim_general_step(x_t, eps, abar_t, abar_prev, eta, z):
    """DDIM eqs. 12 and 16: sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - s^2) eps + s z."""
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
    x0_hat = (x_t - (1 - abar_t) ** 0.5 * eps) / abar_t ** 0.5
    return abar_prev ** 0.5 * x0_hat + max(1 - abar_prev - sigma ** 2, 0.0) ** 0.5 * eps + sigma * z


@_keeps_random_state
def check_ddim_eta_step(fn: Callable) -> None:
    """Check ``fn(x_t, eps, abar_t, abar_prev, eta, z)``: DDIM's step with noise, from DDIM's own formulas.

    ``sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)`` (DDIM eq. 16) and
    ``sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + sigma z`` (eq. 12); ``abar_t``,
    ``abar_prev`` and ``eta`` are floats, the tensors ``(N, ...)`` float64. Parts: at ``eta = 1`` the
    answer must be DDPM's ancestral step through the posterior (2 points), at ``eta = 0`` the
    deterministic DDIM step (1 point), and in between (1 point).
    """
    def ddpm_everywhere(x_t, eps, abar_t, abar_prev, eta, z):
        return _posterior_step(x_t, eps, abar_t, abar_prev, 1.0, z)

    def variance_for_std(x_t, eps, abar_t, abar_prev, eta, z):  # sigma = eta * b~ (a variance), not its root
        sigma = eta * (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)
        x0_hat = (x_t - (1 - abar_t) ** 0.5 * eps) / abar_t ** 0.5
        return abar_prev ** 0.5 * x0_hat + (1 - abar_prev - sigma ** 2) ** 0.5 * eps + sigma * z

    def inverted_ratio(x_t, eps, abar_t, abar_prev, eta, z):  # 1 - abar_prev / abar_t is negative: NaN
        sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_prev / abar_t)) ** 0.5 if eta else 0.0
        x0_hat = (x_t - (1 - abar_t) ** 0.5 * eps) / abar_t ** 0.5
        return abar_prev ** 0.5 * x0_hat + (1 - abar_prev - sigma ** 2) ** 0.5 * eps + sigma * z

    def no_fresh_noise(x_t, eps, abar_t, abar_prev, eta, z):
        return _ddim_general_step(x_t, eps, abar_t, abar_prev, eta, torch.zeros_like(z))

    def inputs(seed, shape, abar_t, abar_prev, eta):
        return (_randn(*shape, seed=seed).double(), _randn(*shape, seed=seed + 1).double(), abar_t, abar_prev, eta,
                _randn(*shape, seed=seed + 2).double())

    parts = [Part("eta = 1 is DDPM's posterior step", [
                 Case("abar_t = 0.5, abar_prev = 0.6, eta = 1, x_t (3, 1, 4, 4)", inputs(80, (3, 1, 4, 4), 0.5, 0.6, 1.0)),
                 Case("nearly pure noise: abar_t = 0.001, abar_prev = 0.003, eta = 1", inputs(83, (2, 8), 0.001, 0.003, 1.0)),
                 Case("nearly clean: abar_t = 0.995, abar_prev = 0.999, eta = 1", inputs(86, (2, 2, 3, 3), 0.995, 0.999, 1.0)),
                 Case("a big jump (respaced): abar_t = 0.2, abar_prev = 0.7, eta = 1", inputs(89, (4, 5), 0.2, 0.7, 1.0))],
                  points=2),
             Part("eta = 0 is the deterministic DDIM step", [
                 Case("abar_t = 0.5, abar_prev = 0.6, eta = 0", inputs(92, (3, 1, 4, 4), 0.5, 0.6, 0.0)),
                 Case("the last step, abar_prev = 1: the answer is x0_hat", inputs(95, (2, 6), 0.9, 1.0, 0.0))], points=1),
             Part("eta between 0 and 1", [
                 Case("abar_t = 0.3, abar_prev = 0.45, eta = 0.5", inputs(98, (2, 3, 2, 2), 0.3, 0.45, 0.5))], points=1),
             Part("hidden inputs", [
                 Case("the last step with eta = 1: abar_prev = 1 gives sigma = 0", inputs(101, (3, 4), 0.98, 1.0, 1.0)),
                 Case("abar_t = 0.05, abar_prev = 0.08, eta = 0.2", inputs(104, (1, 2, 3, 3), 0.05, 0.08, 0.2))],
                  points=1, hidden=True)]

    def reference(x_t, eps, abar_t, abar_prev, eta, z):
        if eta == 1.0:  # the claim to verify: DDIM at eta = 1 is DDPM's step
            return _posterior_step(x_t, eps, abar_t, abar_prev, eta, z)
        return _ddim_general_step(x_t, eps, abar_t, abar_prev, eta, z)

    _run(fn, parts, reference, "DDPM's posterior step at eta = 1 and DDIM's deterministic step at eta = 0",
         rtol=1e-7, atol=1e-9,
         mistakes=[Mistake(ddpm_everywhere, "sigma scales with eta: sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t))"
                                            " * sqrt(1 - abar_t / abar_prev), so eta = 0 has no fresh noise."),
                   Mistake(variance_for_std, "sigma is a standard deviation: take the square root of "
                                             "(1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)."),
                   Mistake(_ddim_with_full_eps, "the predicted noise gets the rest of the variance: sqrt(1 - abar_prev "
                                                "- sigma^2) eps, so that the total noise variance stays 1 - abar_prev."),
                   Mistake(inverted_ratio, "the factor is 1 - abar_t / abar_prev (= beta_t, between 0 and 1); "
                                           "1 - abar_prev / abar_t is negative and its root is NaN."),
                   Mistake(no_fresh_noise, "add the fresh noise sigma * z: DDIM with eta > 0 is stochastic.")],
         hint="x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t); sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)"
              " * (1 - abar_t / abar_prev)); return sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps + "
              "sigma z.")


def _ddim_with_full_eps(x_t, eps, abar_t, abar_prev, eta, z):
    sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
    x0_hat = (x_t - (1 - abar_t) ** 0.5 * eps) / abar_t ** 0.5
    return abar_prev ** 0.5 * x0_hat + (1 - abar_prev) ** 0.5 * eps + sigma * z
