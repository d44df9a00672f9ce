"""Chapter 12, the diffusion loss: one DDPM step with the learned variance."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .runner import Case, Mistake, _generator, _keeps_random_state, _name, _randn, _run

__all__ = ['check_ddpm_step']


class _ToyHead(torch.nn.Module):
    """A diffusion head for the check: nearly the exact eps of N(0, I) data, plus a random MLP's share.

    ``forward(x, t, c)``: tokens ``(N, C)``, original timesteps ``(N,)``,
    conditions ``(N, z)`` -> eps and variance values ``(N, 2C)``. For data from
    N(0, I) the best eps is ``sqrt(1 - abar_t) x_t``; a random network alone
    would make the samples grow by ``1 / sqrt(abar)`` over the chain.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, seed: int):
        super().__init__()
        from ..diffloss import SimpleMLPAdaLN

        torch.manual_seed(seed)
        self.net = SimpleMLPAdaLN(in_channels=2, model_channels=16, out_channels=4, z_channels=8, num_res_blocks=2)
        generator = _generator(seed)
        with torch.no_grad():
            for p in self.net.parameters():  # adaLN-Zero starts at zero: make every output depend on its input
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.eval()

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        out = self.net(x, t, c)
        abar = self.alphas_cumprod[t][:, None]
        eps = (1 - abar).sqrt() * x + 0.2 * out[:, :2]
        return torch.cat([eps, out[:, 2:].tanh()], dim=1)


def _random_head(seed: int):
    """A 10-step respaced process with the learned variance (DiT's linear schedule) and a ``_ToyHead``."""
    from ..diffusion import GaussianDiffusion, beta_schedule

    process = GaussianDiffusion(beta_schedule("linear", 1000), learn_sigma=True)
    return process.respace(10), _ToyHead(process.alphas_cumprod, seed)


def _reference_ddpm_step(process, net, x_t, i, z, temperature, xi):
    t = torch.full((len(x_t),), i, dtype=torch.long)
    eps, var_values = process._model_output(net, x_t, t, dict(c=z))
    x0 = process.predict_x0_from_eps(x_t, t, eps)
    return process._ddpm_step(x_t, t, x0, xi if i > 0 else torch.zeros_like(x_t), var_values, temperature=temperature)


@_keeps_random_state
def check_ddpm_step(fn: Callable) -> None:
    """Check ``fn(process, net, x_t, i, z, temperature, xi)``: one DDPM step with the learned variance.

    The network is called as ``net(x_t, process.timestep_map[t], z)`` and returns
    eps and the variance values v (``2C`` channels); ``x0_hat`` from eps, the
    posterior mean, ``log Sigma = f log beta_i + (1 - f) log beta~_i`` with ``f =
    (v + 1) / 2``, and ``mean + temperature * sqrt(Sigma) * xi`` (no noise at
    ``i = 0``). Also checked over a whole chain against ``process.p_sample_loop``.
    """
    process, net = _random_head(110)

    def loop_with(step):
        def chain(process, net, x_t, i, z, temperature, xi):  # i: the number of steps, xi: the seed
            generator = _generator(xi)
            x = x_t
            for k in reversed(range(i)):
                noise = torch.randn(x.shape, generator=generator) if k > 0 else torch.zeros_like(x)
                x = step(process, net, x, k, z, temperature, noise)
            return x
        return chain

    def reference(process, net, x_t, i, z, temperature, xi):
        if isinstance(xi, int):  # the whole chain: the reference is minilib's sampler
            return process.p_sample_loop(net, tuple(x_t.shape), dict(c=z), noise=x_t, seed=xi, temperature=temperature)
        return _reference_ddpm_step(process, net, x_t, i, z, temperature, xi)

    def fixed_variance(process, net, x_t, i, z, temperature, xi):
        t = torch.full((len(x_t),), i, dtype=torch.long)
        eps, _ = process._model_output(net, x_t, t, dict(c=z))
        x0 = process.predict_x0_from_eps(x_t, t, eps)
        mean, variance = process.q_posterior_mean_variance(x0, x_t, t)
        return mean + temperature * variance.sqrt() * (xi if i > 0 else 0)

    def temperature_on_variance(process, net, x_t, i, z, temperature, xi):
        step = _reference_ddpm_step(process, net, x_t, i, z, 1.0, xi)
        mean = _reference_ddpm_step(process, net, x_t, i, z, 0.0, xi)
        return mean + math.sqrt(temperature) * (step - mean)

    def noise_at_zero(process, net, x_t, i, z, temperature, xi):  # the same formula at i = 0 too
        t = torch.full((len(x_t),), i, dtype=torch.long)
        mean = _reference_ddpm_step(process, net, x_t, i, z, 0.0, xi)
        _, var_values = process._model_output(net, x_t, t, dict(c=z))
        return mean + temperature * (0.5 * process.learned_range_log_variance(var_values, t)).exp() * xi

    z = _randn(5, 8, seed=111)
    x = _randn(5, 2, seed=112)
    xi = _randn(5, 2, seed=113)
    student = fn

    def student_or_chain(process, net, x_t, i, z, temperature, xi):
        if isinstance(xi, int):
            return loop_with(student)(process, net, x_t, i, z, temperature, xi)
        return student(process, net, x_t, i, z, temperature, xi)

    student_or_chain.__name__ = _name(fn)

    def mistake(step):
        def either(process, net, x_t, i, z, temperature, xi):
            if isinstance(xi, int):
                return loop_with(step)(process, net, x_t, i, z, temperature, xi)
            return step(process, net, x_t, i, z, temperature, xi)
        return either

    cases = [Case("i = 5 of a 10-step respaced process (timestep 555), temperature 1", (process, net, x, 5, z, 1.0, xi)),
             Case("i = 9, the first step (timestep 999), temperature 0.7", (process, net, x, 9, z, 0.7, xi)),
             Case("i = 3, temperature 0 (no noise: the posterior mean)", (process, net, x, 3, z, 0.0, xi)),
             Case("i = 0, the last step: no noise is added", (process, net, x, 0, z, 1.0, xi)),
             Case("the whole chain of 10 steps from a fixed start, noise from torch.Generator().manual_seed(0), "
                  "temperature 0.7, against process.p_sample_loop(net, ..., seed=0, temperature=0.7)",
                  (process, net, x, process.num_timesteps, z, 0.7, 0))]
    _run(student_or_chain, cases, reference, "GaussianDiffusion's DDPM step (p_sample_loop)", rtol=1e-4, atol=1e-4,
         mistakes=[Mistake(mistake(_unmapped_step), "call the network with the original timestep "
                                                         "process.timestep_map[i], not the respaced index i."),
                   Mistake(mistake(fixed_variance), "use the learned variance: v = the last C channels of the "
                                                    "output, f = (v + 1) / 2, log Sigma = f log beta_i + (1 - f) "
                                                    "log beta~_i (process.posterior_log_variance_clipped)."),
                   Mistake(mistake(temperature_on_variance), "the temperature multiplies the standard deviation: "
                                                             "mean + temperature * sigma * xi."),
                   Mistake(mistake(noise_at_zero), "add no noise at the last step, i = 0: return the posterior "
                                                   "mean there.")],
         error_hint="net(x_t, t, z) takes t of shape (N,): torch.full((len(x_t),), ...) of the mapped timestep.",
         hint="t = full((N,), i); out = net(x_t, process.timestep_map[t], z); eps, v = out[:, :C], out[:, C:]; "
              "x0_hat = (x_t - sqrt(1 - abar_i) eps) / sqrt(abar_i); mean = posterior_mean_coef_x0[i] x0_hat + "
              "posterior_mean_coef_xt[i] x_t; return mean + temperature * exp(log Sigma / 2) * xi for i > 0.")


def _unmapped_step(process, net, x_t, i, z, temperature, xi):
    """The DDPM step, wrongly calling the network with the respaced index i."""
    def told_i(x, t, c):
        return net(x, torch.full_like(t, i), c)
    return _reference_ddpm_step(process, told_i, x_t, i, z, temperature, xi)
