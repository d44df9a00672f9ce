"""Chapter 14, few-step generation with flow maps: the MeanFlow target with a Jacobian-vector product, and the
few-step sampler ``z_r = z_t - (t - r) u(z_t, r, t)``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .runner import Case, Mistake, _keeps_random_state, _randn, _run

__all__ = ['check_meanflow_target', 'check_few_step_sampler']


def _toy_average_velocity(z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A smooth stand-in for a network u(z, r, t) that depends on all three inputs nonlinearly; r, t (B,)."""
    shape = (-1,) + (1,) * (z.ndim - 1)
    r, t = r.reshape(shape), t.reshape(shape)
    return torch.tanh(z) * (1 + t) + 0.5 * z * r ** 2 - torch.sin(3 * t) * z ** 2 + (t - r) * z.mean(
        dim=tuple(range(1, z.ndim)), keepdim=True)


@_keeps_random_state
def check_meanflow_target(fn: Callable) -> None:
    """Check ``fn(model, z, r, t, v)``: MeanFlow's prediction and regression target.

    ``u, du_dt = torch.func.jvp(model, (z, r, t), (v, 0, 1))`` and
    ``target = v - (t - r) du_dt`` (detached); returns ``(u, target)``, like
    ``minilib.meanflow.meanflow_target``. ``r`` and ``t`` have one time per sample, ``(B,)``.
    """
    from torch.func import jvp

    from ..flow import append_dims
    from ..meanflow import GaussianAverageVelocity, meanflow_target

    def reference(model, z, r, t, v):
        return meanflow_target(model, z, r, t, v)

    def with_tangent(dz, dr, dt, sign=-1.0, gap=True):
        def wrong(model, z, r, t, v):
            tangents = (v if dz else torch.zeros_like(z), torch.full_like(r, float(dr)), torch.full_like(t, float(dt)))
            u, du_dt = jvp(model, (z, r, t), tangents)
            factor = append_dims(t - r, z.ndim) if gap else 1.0
            return u, v + sign * factor * du_dt
        return wrong

    exact = GaussianAverageVelocity(mu=torch.tensor([1.5, -0.5]), s=0.4)
    B = 3
    cases = [Case("the toy network, z (3, 2), r < t", (_toy_average_velocity, _randn(3, 2, seed=140),
                                                       torch.tensor([0.1, 0.3, 0.0]), torch.tensor([0.6, 0.9, 1.0]),
                                                       _randn(3, 2, seed=141))),
             Case("the toy network on images, z (2, 1, 4, 4)",
                  (_toy_average_velocity, _randn(2, 1, 4, 4, seed=142), torch.tensor([0.2, 0.5]),
                   torch.tensor([0.7, 0.55]), _randn(2, 1, 4, 4, seed=143))),
             Case("r = t: the target is v itself (flow matching)",
                  (_toy_average_velocity, _randn(B, 2, seed=144), torch.tensor([0.3, 0.6, 0.9]),
                   torch.tensor([0.3, 0.6, 0.9]), _randn(B, 2, seed=145))),
             Case("the exact average velocity of a Gaussian flow, v its own velocity: target = u",
                  (exact, _randn(4, 2, seed=146), torch.tensor([0.0, 0.2, 0.4, 0.1]),
                   torch.tensor([1.0, 0.8, 0.5, 0.3]),
                   exact.velocity(_randn(4, 2, seed=146), torch.tensor([1.0, 0.8, 0.5, 0.3]))))]
    hidden = [Case("the toy network, z (5, 3), a full interval r = 0, t = 1 for every sample",
                   (_toy_average_velocity, _randn(5, 3, seed=147), torch.zeros(5), torch.ones(5),
                    _randn(5, 3, seed=148))),
              Case("the toy network, z (1, 2, 3, 3), a tiny interval",
                   (_toy_average_velocity, _randn(1, 2, 3, 3, seed=149), torch.tensor([0.499]), torch.tensor([0.5]),
                    _randn(1, 2, 3, 3, seed=150)))]
    _run(fn, cases, reference, "minilib.meanflow.meanflow_target", rtol=1e-4, atol=1e-5, hidden=hidden,
         mistakes=[Mistake(with_tangent(True, 1, 1), "r stays fixed while we move along the path: its tangent is 0, "
                                                     "not 1 (the tangent is (v, 0, 1) for the inputs (z, r, t))."),
                   Mistake(with_tangent(True, 0, 0), "t moves along the path with speed 1: its tangent is 1 "
                                                     "(the tangent is (v, 0, 1) for the inputs (z, r, t))."),
                   Mistake(with_tangent(False, 0, 1), "z moves along the path too, with velocity v: the tangent of z "
                                                      "is v, which gives the v . grad_z u part of the total "
                                                      "derivative."),
                   Mistake(with_tangent(True, 0, 1, sign=1.0), "the MeanFlow identity is u = v - (t - r) du/dt: "
                                                               "subtract the derivative term."),
                   Mistake(with_tangent(True, 0, 1, gap=False), "the derivative term is multiplied by the interval "
                                                                "length t - r (reshaped to (B, 1, ...)).")],
         error_hint="call torch.func.jvp(model, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t))); it returns "
                    "(u, du_dt). Reshape t - r to (B, 1, ...) before multiplying.",
         hint="u, du_dt = torch.func.jvp(model, (z, r, t), (v, zeros_like(r), ones_like(t))); target = v - (t - r) "
              "reshaped to (B, 1, ...) * du_dt, detached; return (u, target.detach()).")


@_keeps_random_state
def check_few_step_sampler(fn: Callable) -> None:
    """Check ``fn(model, noise, steps)``: MeanFlow's sampler, ``steps`` jumps from t = 1 down to 0.

    The times are ``linspace(1, 0, steps + 1)``; each jump from ``t`` to the next
    time ``r`` is ``z <- z - (t - r) model(z, r, t)`` with ``r`` and ``t`` given as
    ``(B,)`` tensors. Returns the last ``z``, like ``minilib.meanflow.sample_few_steps``.
    """
    from ..meanflow import GaussianAverageVelocity, sample_few_steps

    def reference(model, noise, steps):
        return sample_few_steps(model, noise, steps=steps)

    def jumps(order="rt", sign=-1.0, gap=True, grid="down"):
        def wrong(model, noise, steps):
            levels = torch.linspace(1.0, 0.0, steps + 1) if grid == "down" else torch.linspace(0.0, 1.0, steps + 1)
            z, ones = noise, noise.new_ones(noise.shape[0])
            for t, r in zip(levels[:-1].tolist(), levels[1:].tolist()):
                first, second = {"rt": (r, t), "tr": (t, r), "tt": (t, t)}[order]
                u = model(z, first * ones, second * ones)
                z = z + sign * ((t - r) if gap else 1.0) * u
            return z
        return wrong

    exact = GaussianAverageVelocity(mu=torch.tensor([1.5, -0.5]), s=0.4)
    cases = [Case("the toy network u(z, r, t), noise (3, 2), steps = 1", (_toy_average_velocity, _randn(3, 2, seed=170), 1)),
             Case("the toy network, noise (3, 2), steps = 2", (_toy_average_velocity, _randn(3, 2, seed=171), 2)),
             Case("the toy network on images, noise (2, 1, 4, 4), steps = 4",
                  (_toy_average_velocity, _randn(2, 1, 4, 4, seed=172), 4)),
             Case("the exact average velocity of a Gaussian flow, noise (4, 2), steps = 1: lands on mu + s noise",
                  (exact, _randn(4, 2, seed=173), 1))]
    hidden = [Case("the toy network, noise (5, 3), steps = 3", (_toy_average_velocity, _randn(5, 3, seed=174), 3)),
              Case("the exact average velocity, noise (6, 2), steps = 5", (exact, _randn(6, 2, seed=175), 5))]
    _run(fn, cases, reference, "minilib.meanflow.sample_few_steps", rtol=1e-4, atol=1e-5, hidden=hidden,
         mistakes=[Mistake(jumps(sign=1.0), "the jump goes BACK in time, from t to r < t: z_r = z_t - (t - r) u, "
                                            "a minus sign."),
                   Mistake(jumps(order="tr"), "the model reads (z, r, t): the END of the jump r first, then its "
                                              "start t."),
                   Mistake(jumps(order="tt"), "model(z, t, t) is the INSTANTANEOUS velocity (an Euler step); ask "
                                              "for the average velocity over the jump, model(z, r, t)."),
                   Mistake(jumps(gap=False), "multiply u by the length of the jump, t - r: u is a velocity, "
                                             "the displacement is (t - r) u."),
                   Mistake(jumps(grid="up"), "sample from noise (t = 1) to data (t = 0): the times are "
                                             "torch.linspace(1, 0, steps + 1), decreasing.")],
         error_hint="call model(z, r * ones, t * ones) with r and t as (B,) tensors (ones = noise.new_ones(B)).",
         hint="times = torch.linspace(1, 0, steps + 1); for t, r in zip(times[:-1], times[1:]): "
              "u = model(z, r * ones, t * ones); z = z - (t - r) * u; return z.")
