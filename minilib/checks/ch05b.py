"""The interlude between chapters 5 and 6: the velocity from an eps prediction."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .runner import Case, Mistake, _keeps_random_state, _randn, _run

__all__ = ['check_velocity_from_eps']


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
    _run(fn, cases, velocity_from_eps, "minilib.parameterisation.velocity_from_eps", rtol=1e-5, atol=1e-5,
         mistakes=[Mistake(forgot_x0, "da multiplies the *clean* image x0_hat = (x_t - b eps) / a, not x_t itself."),
                   Mistake(wrong_x0, "x0_hat = (x_t - b * eps) / a: the noise enters x_t scaled by b.")],
         hint="first x0_hat = (x_t - b * eps) / a (Tweedie's formula in eps form), then v = da * x0_hat + db * eps.")
