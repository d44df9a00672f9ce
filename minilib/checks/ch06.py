"""Chapter 6, flow matching and Euler sampling: the ODE slope and one Euler step."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .runner import Case, Mistake, _keeps_random_state, _randn, _run

__all__ = ['check_to_d', 'check_euler_step']


@_keeps_random_state
def check_to_d(fn: Callable) -> None:
    """Check ``fn(x, sigma, denoised)``: the ODE slope ``(x - denoised) / sigma``.

    ``sigma`` is a 0-d tensor or one level per sample ``(B,)``; like ``minilib.flow.to_d``.
    """
    from ..flow import to_d

    def flipped(x, sigma, denoised):
        return -to_d(x, sigma, denoised)

    cases = [Case("x (3, 1, 4, 4), sigma = 0.7 (0-d)", (_randn(3, 1, 4, 4, seed=50), torch.tensor(0.7),
                                                          _randn(3, 1, 4, 4, seed=51))),
             Case("one sigma per sample, (3,), x (3, 2, 3, 3)", (_randn(3, 2, 3, 3, seed=52),
                                                                  torch.tensor([1.0, 0.5, 0.1]),
                                                                  _randn(3, 2, 3, 3, seed=53))),
             Case("sigma (4,) with x (4, 4): the last axis has the batch's size too",
                  (_randn(4, 4, seed=54), torch.tensor([0.9, 0.6, 0.3, 0.2]), _randn(4, 4, seed=55)))]
    _run(fn, cases, to_d, "minilib.flow.to_d", rtol=1e-5, atol=1e-5,
         mistakes=[Mistake(flipped, "the slope is (x - denoised) / sigma: x minus the denoised image, so that "
                                    "a step towards sigma = 0 (dt < 0) moves x towards denoised.")],
         error_hint="sigma may be (B,): reshape it to (B, 1, 1, ...) (minilib.flow.append_dims) before dividing.",
         hint="(x - denoised) / sigma, with sigma reshaped to (B, 1, 1, ...) when it has one entry per sample "
              "(a (B,) sigma would otherwise line up with x's last axis).")


def _toy_denoiser(x: torch.Tensor, sigma: torch.Tensor, **kwargs) -> torch.Tensor:
    """A smooth, nonlinear stand-in for a trained denoiser D(x, sigma); sigma is 0-d or (B,)."""
    sigma = sigma.reshape(-1, *[1] * (x.ndim - 1)) if sigma.ndim else sigma
    return torch.tanh(x) * (1 - sigma) + 0.3 * sigma * x.mean(dim=tuple(range(1, x.ndim)), keepdim=True)


@_keeps_random_state
def check_euler_step(fn: Callable) -> None:
    """Check ``fn(denoiser, x, sigma, sigma_next)``: one Euler step of the flow ODE.

    ``d = (x - denoiser(x, sigma)) / sigma`` and ``x + (sigma_next - sigma) * d``,
    where ``sigma`` and ``sigma_next`` are 0-d tensors; it must equal
    ``sample_euler(denoiser, x, torch.stack([sigma, sigma_next]))``.
    """
    from ..flow import sample_euler, sigmas, to_d

    def reference(denoiser, x, sigma, sigma_next):
        return sample_euler(denoiser, x, torch.stack([sigma, sigma_next]))

    def wrong_sign(denoiser, x, sigma, sigma_next):
        return x - (sigma_next - sigma) * to_d(x, sigma, denoiser(x, sigma.expand(len(x))))

    def divides_by_next(denoiser, x, sigma, sigma_next):
        return x + (sigma_next - sigma) * (x - denoiser(x, sigma.expand(len(x)))) / sigma_next

    def no_step(denoiser, x, sigma, sigma_next):
        return denoiser(x, sigma.expand(len(x)))

    levels = sigmas(10)
    cases = [Case("x (3, 1, 4, 4), sigma = sigmas(10)[0] = 1 to sigmas(10)[1]",
                  (_toy_denoiser, _randn(3, 1, 4, 4, seed=60), levels[0], levels[1])),
             Case("a middle step, sigmas(10)[4] to [5]", (_toy_denoiser, _randn(2, 2, 3, 3, seed=61), levels[4], levels[5])),
             Case("the last step, to sigma = 0 (the clean image)",
                  (_toy_denoiser, _randn(2, 1, 4, 4, seed=62), levels[-2], levels[-1]))]
    _run(fn, cases, reference, "sample_euler(denoiser, x, torch.stack([sigma, sigma_next]))", rtol=1e-5, atol=1e-5,
         mistakes=[Mistake(wrong_sign, "x_next = x + (sigma_next - sigma) * d: dt = sigma_next - sigma is "
                                       "negative, so x moves towards the denoised image."),
                   Mistake(divides_by_next, "the slope uses the current level: d = (x - D(x, sigma)) / sigma."),
                   Mistake(no_step, "an Euler step does not jump to the denoised image: it moves x along the "
                                    "slope d by dt = sigma_next - sigma.")],
         error_hint="call the denoiser as denoiser(x, sigma * torch.ones(len(x))), one level per sample, as "
                    "sample_euler does.",
         hint="denoised = denoiser(x, sigma * x.new_ones(len(x))), d = (x - denoised) / sigma, "
              "return x + (sigma_next - sigma) * d.")
