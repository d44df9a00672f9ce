"""Chapter 6, flow matching and Euler sampling: the ODE slope, one Euler step, the exact Gaussian field, a schedule."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .runner import Case, Mistake, Part, _describe, _keeps_random_state, _randn, _run

__all__ = ['check_to_d', 'check_euler_step', 'check_gaussian_velocity', 'check_sampling_schedule']


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
    hidden = [Case("sigma (2,) with x (2, 3, 2, 2), one level near 0 (0.001)",
                   (_randn(2, 3, 2, 2, seed=56), torch.tensor([0.001, 0.999]), _randn(2, 3, 2, 2, seed=57))),
              Case("a 0-d sigma = 1 and denoised = 0: the slope is x itself",
                   (_randn(3, 4, seed=58), torch.tensor(1.0), torch.zeros(3, 4)))]
    _run(fn, cases, to_d, "minilib.flow.to_d", rtol=1e-5, atol=1e-5, hidden=hidden,
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
    shifted = sigmas(6, shift=3.0)
    hidden = [Case("sigmas(6, shift=3)[1] to [2], x (4, 2)", (_toy_denoiser, _randn(4, 2, seed=63), shifted[1], shifted[2])),
              Case("a single sample, the last step of sigmas(6, shift=3)",
                   (_toy_denoiser, _randn(1, 3, 2, 2, seed=64), shifted[-2], shifted[-1]))]
    _run(fn, cases, reference, "sample_euler(denoiser, x, torch.stack([sigma, sigma_next]))", rtol=1e-5, atol=1e-5,
         hidden=hidden,
         mistakes=[Mistake(wrong_sign, "x_next = x + (sigma_next - sigma) * d: dt = sigma_next - sigma is "
                                       "negative, so x moves towards the denoised image."),
                   Mistake(divides_by_next, "the slope uses the current level: d = (x - D(x, sigma)) / sigma."),
                   Mistake(no_step, "an Euler step does not jump to the denoised image: it moves x along the "
                                    "slope d by dt = sigma_next - sigma.")],
         error_hint="call the denoiser as denoiser(x, sigma * torch.ones(len(x))), one level per sample, as "
                    "sample_euler does.",
         hint="denoised = denoiser(x, sigma * x.new_ones(len(x))), d = (x - denoised) / sigma, "
              "return x + (sigma_next - sigma) * d.")


def _gaussian_velocity(x: torch.Tensor, t: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """v*(x, t) = E[eps - x0 | x_t = x] for data N(mean, std^2 I) on the path x_t = (1 - t) x0 + t eps.

    x ``(N, D)``, t ``(N,)`` in [0, 1], mean ``(D,)``; with var_t = (1 - t)^2 std^2 + t^2,
    ``v = (t - (1 - t) std^2) / var_t * (x - (1 - t) mean) - mean``.
    """
    t = t.to(x.dtype)[:, None]
    var = (1 - t) ** 2 * std ** 2 + t ** 2
    return (t - (1 - t) * std ** 2) / var * (x - (1 - t) * mean) - mean


@_keeps_random_state
def check_gaussian_velocity(fn: Callable) -> None:
    """Check ``fn(x, t, mean, std)``: the exact flow-matching velocity field of Gaussian data ``N(mean, std^2 I)``.

    x ``(N, D)``, t ``(N,)`` in [0, 1] (both ends included), mean ``(D,)``, std a float; returns
    ``E[eps - x0 | x_t = x]``, ``(N, D)``. Parts: the field at inside times (2 points), the ends
    t = 0 and t = 1 (1 point), special data (1 point).
    """
    def flipped(x, t, mean, std):
        return -_gaussian_velocity(x, t, mean, std)

    def variance_t_not_t2(x, t, mean, std):  # the noise's variance taken as t instead of t^2
        t = t.to(x.dtype)[:, None]
        var = (1 - t) ** 2 * std ** 2 + t
        return (t - (1 - t) * std ** 2) / var * (x - (1 - t) * mean) - mean

    def divides_by_t(x, t, mean, std):  # (x - E[x0 | x]) / t: right inside, NaN at t = 0
        t = t.to(x.dtype)[:, None]
        var = (1 - t) ** 2 * std ** 2 + t ** 2
        x0_mean = mean + (1 - t) * std ** 2 / var * (x - (1 - t) * mean)
        return (x - x0_mean) / t

    def mean_not_shrunk(x, t, mean, std):  # x_t's mean taken as mean instead of (1 - t) mean
        t = t.to(x.dtype)[:, None]
        var = (1 - t) ** 2 * std ** 2 + t ** 2
        return (t - (1 - t) * std ** 2) / var * (x - mean) - mean

    def posterior_mean_only(x, t, mean, std):  # E[x0 | x] instead of the velocity
        t = t.to(x.dtype)[:, None]
        var = (1 - t) ** 2 * std ** 2 + t ** 2
        return mean + (1 - t) * std ** 2 / var * (x - (1 - t) * mean)

    mu2, mu3 = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 0.0, -3.0])
    parts = [Part("inside times", [
                 Case("x (5, 2), t = 0.1, 0.3, 0.5, 0.7, 0.9, mean (2, -1), std 0.5",
                      (_randn(5, 2, seed=70), torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9]), mu2, 0.5)),
                 Case("x (4, 3), t = 0.25 for all, mean (0.5, 0, -3), std 2",
                      (_randn(4, 3, seed=71, scale=3.0), torch.full((4,), 0.25), mu3, 2.0))], points=2),
             Part("the ends t = 0 and t = 1", [
                 Case("t = 1 (pure noise: v = x - mean) and t = 0 (the data: v = -x)",
                      (_randn(4, 2, seed=72), torch.tensor([1.0, 0.0, 1.0, 0.0]), mu2, 0.3))], points=1),
             Part("special data", [
                 Case("std = 1 and mean 0: the data look like the noise", (_randn(3, 2, seed=73),
                                                                         torch.tensor([0.2, 0.5, 0.8]),
                                                                         torch.zeros(2), 1.0)),
                 Case("a narrow Gaussian, std = 0.01, near the data (t = 0.005, 0.02)",
                      (_randn(2, 2, seed=74), torch.tensor([0.005, 0.02]), mu2, 0.01))], points=1),
             Part("hidden inputs", [
                 Case("x (6, 3), t from 0 to 1, std 0.7", (_randn(6, 3, seed=75), torch.linspace(0, 1, 6), mu3, 0.7)),
                 Case("one point, float64, t = 0.999", (_randn(1, 2, seed=76).double(), torch.tensor([0.999]),
                                                        mu2.double(), 0.2))], points=1, hidden=True)]
    _run(fn, parts, _gaussian_velocity, "the exact velocity E[eps - x0 | x_t = x] of Gaussian data", rtol=1e-4,
         atol=1e-5,
         mistakes=[Mistake(flipped, "the velocity of x_t = (1 - t) x0 + t eps is d x_t / dt = eps - x0 (noise minus "
                                    "data), not x0 - eps."),
                   Mistake(divides_by_t, "(x - E[x0 | x]) / t is right for t > 0 but divides by zero at t = 0: use "
                                         "v = E[eps | x] - E[x0 | x], which has no 1 / t."),
                   Mistake(variance_t_not_t2, "the noise enters x_t as t eps, so its variance is t^2: var_t = "
                                              "(1 - t)^2 std^2 + t^2."),
                   Mistake(mean_not_shrunk, "x_t has mean (1 - t) mean, not mean: centre x with x - (1 - t) mean."),
                   Mistake(posterior_mean_only, "that is E[x0 | x_t = x]; the velocity is E[eps | x] - E[x0 | x].")],
         error_hint="t is (N,): give it a column axis, t[:, None], to broadcast against x (N, D).",
         hint="x_t = (1 - t) x0 + t eps is Gaussian with mean (1 - t) mean and variance var_t = (1 - t)^2 std^2 + "
              "t^2; E[x0 | x] = mean + (1 - t) std^2 / var_t (x - (1 - t) mean), E[eps | x] = t / var_t (x - (1 - t) "
              "mean), and v = E[eps | x] - E[x0 | x].")


_SCHEDULE_DATA = dict(mean=torch.tensor([2.0, -1.0], dtype=torch.float64), std=0.05)


def _euler_error(levels: torch.Tensor, num_points: int = 2048) -> float:
    """Mean distance, in units of the data's std, between Euler with the exact Gaussian field and the ODE's end."""
    mean, std = _SCHEDULE_DATA["mean"], _SCHEDULE_DATA["std"]
    z = torch.randn(num_points, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = z.clone()
    levels = levels.double().tolist()
    for sigma, sigma_next in zip(levels[:-1], levels[1:]):
        x = x + (sigma_next - sigma) * _gaussian_velocity(x, torch.full((num_points,), sigma, dtype=torch.float64),
                                                          mean, std)
    return ((x - (mean + std * z)).norm(dim=1).mean() / std).item()


@_keeps_random_state
def check_sampling_schedule(fn: Callable) -> None:
    """Check ``fn(steps)``: a grid of ``steps + 1`` levels from 1 down to 0 whose Euler error meets the targets.

    The grid is used by Euler's method with the exact velocity field of narrow Gaussian data
    (mean (2, -1), std 0.05), from noise to data; the error is the mean distance to the ODE's
    exact endpoint ``mean + std * z``, in units of std. Targets (one point each): 4 steps below
    0.6 and below 0.45 (the uniform grid gives 1.07); hidden: 8 steps below 0.3 (uniform 0.85).
    """
    from ..flow import sigmas, time_snr_shift

    def reference(steps):
        return time_snr_shift(0.1, torch.linspace(1, 0, steps + 1, dtype=torch.float64))

    targets = {}

    def target(steps, below):
        label = f"{steps} Euler steps: error below {below}"
        targets[label] = below
        return Case(label, (steps,))

    def compare(got, expected, case):
        steps = case.args[0]
        if not isinstance(got, torch.Tensor):
            return f"expected a tensor of {steps + 1} levels, got {_describe(got)}"
        got = got.detach().double().cpu()
        if got.shape != (steps + 1,):
            return f"expected {steps + 1} levels (steps + 1) of shape ({steps + 1},), got shape {tuple(got.shape)}"
        if not bool(torch.isfinite(got).all()):
            return "expected finite levels, the grid has NaN or infinite ones"
        if abs(got[0].item() - 1) > 1e-6 or got[-1].item() != 0:
            return f"expected a grid that starts at 1 (pure noise) and ends at 0 (the data), got " \
                   f"{got[0].item():.4g} ... {got[-1].item():.4g}"
        if not bool((got[1:] < got[:-1]).all()):
            return f"expected levels that decrease strictly from 1 to 0, got {[round(v, 4) for v in got.tolist()]}"
        error = _euler_error(got)
        if error < targets[case.label]:
            return None
        uniform = _euler_error(torch.linspace(1, 0, steps + 1))
        return (f"expected an Euler error below {targets[case.label]}; with your grid "
                f"{[round(v, 4) for v in got.tolist()]} it is {error:.3f} (the uniform grid gives {uniform:.3f})")

    parts = [Part("4 steps, error below 0.6", [target(4, 0.6)], points=1),
             Part("4 steps, error below 0.45", [target(4, 0.45)], points=1),
             Part("hidden inputs", [target(8, 0.3)], points=1, hidden=True)]
    _run(fn, parts, reference, "time_snr_shift(0.1, linspace(1, 0, steps + 1))", compare=compare,
         mistakes=[Mistake(lambda steps: torch.linspace(1, 0, steps + 1),
                           "the uniform grid spends as many steps at high noise, where every path is nearly "
                           "straight, as near the data, where these paths bend: put more levels close to 0."),
                   Mistake(lambda steps: sigmas(steps, shift=3.0),
                           "a shift above 1 moves the levels towards noise (SD3's choice for large images); these "
                           "data are narrow and the paths bend close to the data: try a shift below 1."),
                   Mistake(lambda steps: sigmas(steps, shift=1.0),
                           "SD3's sigmas(steps) is a nearly uniform grid: move the levels towards the data.")],
         hint="keep the ends 1 and 0 and move the inner levels towards 0, e.g. time_snr_shift(shift, "
              "torch.linspace(1, 0, steps + 1)) with a shift well below 1, or a geometric sequence.")
