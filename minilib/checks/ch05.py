"""Chapter 5, diffusion with a transformer: q_sample and the DDIM step."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .runner import Case, Mistake, _keeps_random_state, _randn, _run

__all__ = ['check_q_sample', 'check_ddim_step']


def _processes():
    from ..diffusion import GaussianDiffusion, beta_schedule
    cosine = GaussianDiffusion(beta_schedule("cosine", 1000))
    return cosine, GaussianDiffusion(beta_schedule("linear", 1000)).respace(50)


@_keeps_random_state
def check_q_sample(fn: Callable) -> None:
    """Check ``fn(process, x0, t, noise)``: ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``.

    ``abar = process.alphas_cumprod`` (float64, ``(T,)``), ``t`` is ``(N,)``
    integer steps, one per sample; like ``process.q_sample(x0, t, noise)``.
    """
    cosine, respaced = _processes()

    def reference(process, x0, t, noise):
        return process.q_sample(x0, t, noise)

    def no_square_roots(process, x0, t, noise):
        abar = process.alphas_cumprod[t].float().view(-1, *[1] * (x0.ndim - 1))
        return abar * x0 + (1 - abar) * noise

    def first_t_for_all(process, x0, t, noise):
        abar = process.alphas_cumprod[t[0]].float()
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    cases = [Case("cosine schedule, x0 (4, 1, 8, 8), t = 0, 10, 500, 999",
                  (cosine, _randn(4, 1, 8, 8, seed=30), torch.tensor([0, 10, 500, 999]), _randn(4, 1, 8, 8, seed=31))),
             Case("cosine schedule, x0 (3, 2, 4, 4), all t = 250",
                  (cosine, _randn(3, 2, 4, 4, seed=32), torch.full((3,), 250), _randn(3, 2, 4, 4, seed=33))),
             Case("a linear schedule respaced to 50 steps, x0 (2, 3), t = 0 and 49",
                  (respaced, _randn(2, 3, seed=34), torch.tensor([0, 49]), _randn(2, 3, seed=35)))]
    _run(fn, cases, reference, "GaussianDiffusion.q_sample", rtol=1e-4, atol=1e-5,
         mistakes=[Mistake(no_square_roots, "x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise: take the square "
                                            "roots (abar is the variance that is kept, not the scale)."),
                   Mistake(first_t_for_all, "every sample has its own t: index alphas_cumprod with the whole "
                                            "t and reshape to (N, 1, 1, ...) to broadcast.")],
         error_hint="abar = process.alphas_cumprod[t] has shape (N,): reshape it to (N, 1, 1, ...) with "
                    ".view(-1, *[1] * (x0.ndim - 1)) so it broadcasts against x0 (N, ...).",
         hint="abar = process.alphas_cumprod[t] reshaped to (N, 1, ...), then sqrt(abar) * x0 + sqrt(1 - abar) * "
              "noise (the square roots in float64, cast to x0's dtype).")


@_keeps_random_state
def check_ddim_step(fn: Callable) -> None:
    """Check ``fn(process, x_t, t, x0_hat)``: one deterministic DDIM step (eta = 0) from t to t - 1.

    With ``abar = process.alphas_cumprod`` and ``abar_{-1} = 1``:
    ``eps = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t)``,
    ``x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1}) eps``, as
    ``process._ddim_step(x_t, t, x0_hat, 0, eta=0.0)``.
    """
    cosine, respaced = _processes()

    def reference(process, x_t, t, x0_hat):
        return process._ddim_step(x_t, t, x0_hat, torch.zeros_like(x_t), eta=0.0)

    def ddim_step(x_t, x0_hat, abar, abar_prev):  # (N,) float64 abar_t and abar_{t-1}: the arithmetic in float64
        view = (-1,) + (1,) * (x_t.ndim - 1)
        def per_sample(values):
            return values.to(x_t.dtype).view(view)
        eps = (x_t - per_sample(abar.sqrt()) * x0_hat) / per_sample((1 - abar).sqrt())
        return per_sample(abar_prev.sqrt()) * x0_hat + per_sample((1 - abar_prev).sqrt()) * eps

    def wraps_at_zero(process, x_t, t, x0_hat):  # abar[t - 1] reads abar[-1] at t = 0
        return ddim_step(x_t, x0_hat, process.alphas_cumprod[t], process.alphas_cumprod[t - 1])

    def float32_first(process, x_t, t, x0_hat):  # right formula, but 1 - abar_t computed in float32
        view = (-1,) + (1,) * (x_t.ndim - 1)
        abar = process.alphas_cumprod[t].float().view(view)
        abar_prev = process.alphas_cumprod_prev[t].float().view(view)
        eps = (x_t - abar.sqrt() * x0_hat) / (1 - abar).sqrt()
        return abar_prev.sqrt() * x0_hat + (1 - abar_prev).sqrt() * eps

    def same_t(process, x_t, t, x0_hat):  # x_t returned unchanged from the x0_hat formula: abar_prev = abar
        return x_t

    cases = [Case("cosine schedule, x_t (4, 1, 4, 4), t = 1, 10, 500, 999",
                  (cosine, _randn(4, 1, 4, 4, seed=40), torch.tensor([1, 10, 500, 999]), _randn(4, 1, 4, 4, seed=41))),
             Case("t = 0, the last step: abar_{-1} = 1, so the step returns x0_hat",
                  (cosine, _randn(2, 3, seed=42), torch.tensor([0, 0]), _randn(2, 3, seed=43))),
             Case("a linear schedule respaced to 50 steps, t = 0, 1, 25, 49",
                  (respaced, _randn(4, 2, 2, 2, seed=44), torch.tensor([0, 1, 25, 49]), _randn(4, 2, 2, 2, seed=45)))]
    _run(fn, cases, reference, "GaussianDiffusion._ddim_step(..., eta=0.0)", rtol=1e-4, atol=1e-4,
         mistakes=[Mistake(float32_first, "compute 1 - abar_t and the square roots in float64, on "
                                          "process.alphas_cumprod, and cast only the results to x_t's dtype: near "
                                          "t = 0 abar_t is 0.9999..., and in float32 1 - abar_t keeps only a few "
                                          "digits, which the step then divides by."),
                   Mistake(wraps_at_zero, "abar_{t-1} at t = 0 is 1 (use process.alphas_cumprod_prev, or treat "
                                          "t = 0 apart): alphas_cumprod[t - 1] reads the last entry there."),
                   Mistake(same_t, "the step must move to t - 1: use abar_{t-1} (process.alphas_cumprod_prev[t]) "
                                   "for the new point.")],
         error_hint="index the schedules with t (N,) and reshape to (N, 1, ...) to broadcast against x_t.",
         hint="eps = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t), then x_{t-1} = sqrt(abar_{t-1}) x0_hat + "
              "sqrt(1 - abar_{t-1}) eps with abar_{t-1} = process.alphas_cumprod_prev[t] (the square roots "
              "computed in float64, then cast to x_t's dtype).")
