"""Chapter 5, diffusion with a transformer: q_sample, the DDIM step and classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .runner import Case, Mistake, Part, _keeps_random_state, _randn, _run

__all__ = ['check_q_sample', 'check_ddim_step', 'check_guided_eps']


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
    hidden = [Case("cosine schedule, x0 (5, 3), t = 1, 2, 998, 999, 3",
                   (cosine, _randn(5, 3, seed=36), torch.tensor([1, 2, 998, 999, 3]), _randn(5, 3, seed=37))),
              Case("respaced linear schedule, one sample (1, 1, 2, 2) at t = 25",
                   (respaced, _randn(1, 1, 2, 2, seed=38), torch.tensor([25]), _randn(1, 1, 2, 2, seed=39)))]
    _run(fn, cases, reference, "GaussianDiffusion.q_sample", rtol=1e-4, atol=1e-5, hidden=hidden,
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
    hidden = [Case("cosine schedule, t = 2, 1, 0 (the last three steps), x_t (3, 5)",
                   (cosine, _randn(3, 5, seed=46), torch.tensor([2, 1, 0]), _randn(3, 5, seed=47))),
              Case("a respaced linear schedule, one sample at t = 49 (pure noise)",
                   (respaced, _randn(1, 3, 2, 2, seed=48), torch.tensor([49]), _randn(1, 3, 2, 2, seed=49)))]
    _run(fn, cases, reference, "GaussianDiffusion._ddim_step(..., eta=0.0)", rtol=1e-4, atol=1e-4, hidden=hidden,
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


class _ToyEpsModel(torch.nn.Module):
    """A stand-in eps-model ``(x (2N, C, H, W), t (2N,), y=(2N,)) -> (2N, C or 2C, H, W)`` that depends on all three.

    ``learn_sigma`` appends C variance channels, as DiT's ``learn_sigma`` does.
    """

    def __init__(self, num_classes: int, channels: int, learn_sigma: bool = False, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(num_classes + 1, channels, generator=generator)
        self.bias = torch.randn(num_classes + 1, channels, generator=generator)
        self.learn_sigma = learn_sigma

    def forward(self, x, t, y):
        w = self.weight[y].view(len(x), -1, *[1] * (x.ndim - 2))
        b = self.bias[y].view(len(x), -1, *[1] * (x.ndim - 2))
        eps = torch.tanh(x * w + b + t.view(-1, *[1] * (x.ndim - 1)).to(x.dtype) / 1000)
        return torch.cat([eps, 0.5 * eps.square()], dim=1) if self.learn_sigma else eps


def _reference_guided_eps(model, x, t, y, null_class, scale):
    from ..diffusion import classifier_free_guidance

    labels = torch.cat([y, torch.full_like(y, null_class)])
    out = classifier_free_guidance(model, scale)(torch.cat([x, x]), torch.cat([t, t]), y=labels)
    return out[: len(x), : x.shape[1]]


@_keeps_random_state
def check_guided_eps(fn: Callable) -> None:
    """Check ``fn(model, x, t, y, null_class, scale)``: the classifier-free guided noise prediction ``(N, C, ...)``.

    One call of ``model`` on the doubled batch ``cat([x, x])``, ``cat([t, t])``,
    ``y=cat([y, null])``, then ``eps_u + scale * (eps_c - eps_u)`` on the first C
    channels (any variance channels are dropped); like the first half of
    ``classifier_free_guidance(model, scale)`` from ``minilib.diffusion``.
    """
    def halves(model, x, t, y, null_class):
        out = model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, null_class)]))
        return out[:, : x.shape[1]].chunk(2)

    def swapped(model, x, t, y, null_class, scale):
        cond, uncond = halves(model, x, t, y, null_class)
        return cond + scale * (uncond - cond)

    def ho_salimans_w(model, x, t, y, null_class, scale):  # (1 + w) eps_c - w eps_u with w = scale
        cond, uncond = halves(model, x, t, y, null_class)
        return cond + scale * (cond - uncond)

    def no_null(model, x, t, y, null_class, scale):  # both halves conditional
        return model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, y]))[: len(x), : x.shape[1]]

    def keeps_variance(model, x, t, y, null_class, scale):
        out = model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, null_class)]))
        cond, uncond = out.chunk(2)
        return uncond + scale * (cond - uncond)

    def whole_batch(model, x, t, y, null_class, scale):  # both halves returned
        return torch.cat([_reference_guided_eps(model, x, t, y, null_class, scale)] * 2)

    plain, sigma = _ToyEpsModel(10, 4, seed=1), _ToyEpsModel(10, 3, learn_sigma=True, seed=2)
    five = _ToyEpsModel(5, 2, learn_sigma=True, seed=3)
    y = torch.tensor([3, 7, 0])
    parts = [Part("guided noise", [
                 Case("x (3, 4, 4, 4), t = 10, 500, 999, labels 3, 7, 0, null class 10, scale 4",
                      (plain, _randn(3, 4, 4, 4, seed=50), torch.tensor([10, 500, 999]), y, 10, 4.0)),
                 Case("scale 1.5 (DiT's best FID), a single sample",
                      (plain, _randn(1, 4, 2, 2, seed=51), torch.tensor([250]), torch.tensor([9]), 10, 1.5))],
                  points=2),
             Part("edge scales: 1 is conditional, 0 unconditional", [
                 Case("scale 1: the conditional prediction alone",
                      (plain, _randn(3, 4, 2, 2, seed=52), torch.tensor([1, 2, 3]), y, 10, 1.0)),
                 Case("scale 0: the unconditional prediction alone",
                      (plain, _randn(3, 4, 2, 2, seed=53), torch.tensor([1, 2, 3]), y, 10, 0.0))], points=1),
             Part("a model with variance channels (learn_sigma)", [
                 Case("the model returns 2C = 6 channels; the guided noise has C = 3",
                      (sigma, _randn(3, 3, 4, 4, seed=54), torch.tensor([999, 100, 0]), y, 10, 4.0))], points=1),
             Part("hidden inputs", [
                 Case("5 classes (null class 5), variance channels, scale 2.5",
                      (five, _randn(4, 2, 3, 3, seed=55), torch.tensor([0, 1, 998, 400]),
                       torch.tensor([4, 0, 2, 2]), 5, 2.5)),
                 Case("scale -1 (guidance away from the label)",
                      (plain, _randn(2, 4, 2, 2, seed=56), torch.tensor([30, 700]), torch.tensor([1, 1]), 10, -1.0))],
                  points=1, hidden=True)]
    _run(fn, parts, _reference_guided_eps, "classifier_free_guidance(model, scale), first half", rtol=1e-5,
         atol=1e-5,
         mistakes=[Mistake(swapped, "start from the UNconditional prediction and move towards the conditional "
                                    "one: eps_u + scale * (eps_c - eps_u)."),
                   Mistake(ho_salimans_w, "that is Ho & Salimans' form with w = scale; their w is scale - 1: "
                                          "eps_u + scale * (eps_c - eps_u) = eps_c + (scale - 1) * (eps_c - eps_u)."),
                   Mistake(no_null, "the second half of the batch is unconditional: give it the null class, "
                                    "y = cat([y, full_like(y, null_class)])."),
                   Mistake(keeps_variance, "keep only the first C = x.shape[1] channels of the model's output: the "
                                           "rest are variance channels, which guidance does not mix."),
                   Mistake(whole_batch, "return the guided noise for the N inputs once, (N, C, ...), not both "
                                        "halves.")],
         error_hint="the model takes the doubled batch: x2 = cat([x, x]), t2 = cat([t, t]) and the labels "
                    "y=cat([y, null]) as a keyword; its output is (2N, C or 2C, ...).",
         hint="out = model(cat([x, x]), cat([t, t]), y=cat([y, null])); eps_c, eps_u = out[:, :C].chunk(2); "
              "return eps_u + scale * (eps_c - eps_u).")
