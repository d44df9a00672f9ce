"""Chapter 12, the diffusion loss: one DDPM step with the learned variance; the exact eps of a Gaussian mixture."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .runner import Case, Mistake, Part, _generator, _keeps_random_state, _name, _randn, _run

__all__ = ["check_ddpm_step", "check_mixture_eps"]


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
    hidden = [Case("i = 1, the step before the last, temperature 1.3", (process, net, _randn(3, 2, seed=114), 1,
                                                                        _randn(3, 8, seed=115), 1.3,
                                                                        _randn(3, 2, seed=116))),
              Case("the whole chain from another start, temperature 1, noise seed 7",
                   (process, net, _randn(4, 2, seed=117), process.num_timesteps, _randn(4, 8, seed=118), 1.0, 7))]
    _run(student_or_chain, cases, reference, "GaussianDiffusion's DDPM step (p_sample_loop)", rtol=1e-4, atol=1e-4,
         hidden=hidden,
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


def _mixture_eps(x_t: torch.Tensor, abar: torch.Tensor, means: torch.Tensor, weights: torch.Tensor,
                 std: float) -> torch.Tensor:
    """``E[eps | x_t]`` for data ``sum_k w_k N(mu_k, std^2 I)`` and ``x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps``.

    Given component k, ``x_t ~ N(sqrt(abar) mu_k, v I)`` with ``v = abar std^2 + 1 - abar``
    and ``E[eps | x_t, k] = sqrt(1 - abar) (x_t - sqrt(abar) mu_k) / v``; the
    posterior weights are ``softmax_k(log w_k - ||x_t - sqrt(abar) mu_k||^2 / (2 v))``.
    ``x_t (N, C)``, ``abar (N,)``, ``means (K, C)``, ``weights (K,)`` -> ``(N, C)``.
    """
    a = abar.to(x_t.dtype)[:, None, None]                                  # (N, 1, 1)
    v = a * std ** 2 + 1 - a
    centred = x_t[:, None, :] - a.sqrt() * means[None]                     # (N, K, C)
    logits = weights.log()[None] - centred.square().sum(-1) / (2 * v[:, :, 0])
    posterior = logits.softmax(dim=1)[:, :, None]                          # (N, K, 1)
    return (posterior * (1 - a).sqrt() * centred / v).sum(1)


@_keeps_random_state
def check_mixture_eps(fn: Callable) -> None:
    """Check ``fn(x_t, abar, means, weights, std)``: the exact noise predictor of a Gaussian mixture.

    A derivation to verify: for data ``sum_k w_k N(mu_k, std^2 I)``, ``eps*(x_t) =
    E[eps | x_t]`` is the posterior-weighted sum of the one-Gaussian answers
    ``sqrt(1 - abar) (x_t - sqrt(abar) mu_k) / (abar std^2 + 1 - abar)``, with
    posterior weights proportional to ``w_k N(x_t; sqrt(abar) mu_k, (abar std^2 + 1 -
    abar) I)``. ``x_t (N, C)``, ``abar (N,)``, ``means (K, C)``, ``weights (K,)``
    -> ``(N, C)``.
    """
    def one_gaussian(a, std):
        return a * std ** 2 + 1 - a

    def variant(scaled_means=True, posterior="soft", v_of=one_gaussian, root=True, stable=True):
        def wrong(x_t, abar, means, weights, std):
            a = abar.to(x_t.dtype)[:, None, None]
            v = v_of(a, std)
            centred = x_t[:, None, :] - (a.sqrt() if scaled_means else 1) * means[None]
            exact = x_t[:, None, :] - a.sqrt() * means[None]
            logits = weights.log()[None] - centred.square().sum(-1) / (2 * v[:, :, 0])
            if posterior == "prior":
                p = weights[None].expand_as(logits)
            elif posterior == "hard":
                p = torch.nn.functional.one_hot(logits.argmax(1), len(weights)).to(x_t.dtype)
            elif stable:
                p = logits.softmax(1)
            else:
                p = logits.exp() / logits.exp().sum(1, keepdim=True)
            return (p[:, :, None] * ((1 - a).sqrt() if root else (1 - a)) * exact / v).sum(1)
        return wrong

    ring = torch.stack([torch.cos(torch.arange(8) * math.pi / 4), torch.sin(torch.arange(8) * math.pi / 4)], 1) * 0.8
    uniform = torch.full((8,), 1 / 8)
    abar_grid = torch.linspace(0.02, 0.98, 40)
    parts = [Part("the derivation: posterior weights and the one-Gaussian terms", [
                 Case("x_t (40, 2), the 8-mode ring of radius 0.8, std 0.1, abar from 0.02 to 0.98",
                      (_randn(40, 2, seed=700), abar_grid, ring, uniform, 0.1)),
                 Case("3 modes in 4-D with weights 0.5, 0.3, 0.2, std 0.3",
                      (_randn(6, 4, seed=701), torch.tensor([0.1, 0.4, 0.6, 0.7, 0.9, 0.95]), _randn(3, 4, seed=702),
                       torch.tensor([0.5, 0.3, 0.2]), 0.3))], points=2),
             Part("edge cases", [
                 Case("one component: the single-Gaussian formula of section 12.6",
                      (_randn(5, 1, seed=703), torch.tensor([0.05, 0.3, 0.5, 0.8, 0.99]), torch.zeros(1, 1),
                       torch.ones(1), 0.3)),
                 Case("nearly clean data (abar = 0.9999) with narrow modes (std 0.02): the posterior must not "
                      "overflow or divide 0 by 0",
                      (ring[torch.tensor([0, 3, 5])] + 0.3, torch.full((3,), 0.9999), ring, uniform, 0.02))],
                  points=1),
             Part("hidden inputs", [
                 Case("x_t (30, 3), 5 modes, std 0.5, abar 0.001 .. 0.999",
                      (_randn(30, 3, seed=704), torch.linspace(0.001, 0.999, 30), _randn(5, 3, seed=705),
                       torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15]), 0.5)),
                 Case("x_t in float64, two far modes",
                      (_randn(8, 2, seed=706).double(), torch.linspace(0.1, 0.9, 8).double(),
                       torch.tensor([[-2.0, 0.0], [2.0, 0.0]], dtype=torch.float64),
                       torch.tensor([0.5, 0.5], dtype=torch.float64), 0.2))], points=1, hidden=True)]
    _run(fn, parts, _mixture_eps, "the exact E[eps | x_t] of the mixture", rtol=1e-4, atol=1e-5,
         mistakes=[Mistake(variant(scaled_means=False), "given component k, x_t is centred at sqrt(abar) mu_k, not "
                                                        "at mu_k: the clean data are scaled by sqrt(abar)."),
                   Mistake(variant(posterior="prior"), "weigh the components by their POSTERIOR probability given "
                                                       "x_t, w_k N(x_t; sqrt(abar) mu_k, v I) normalised, not by "
                                                       "the prior weights w_k."),
                   Mistake(variant(posterior="hard"), "use the soft posterior weights, not only the most likely "
                                                      "component: E[eps | x_t] averages over the components."),
                   Mistake(variant(v_of=lambda a, std: std ** 2 + 1 - a),
                           "the variance of x_t given component k is abar std^2 + 1 - abar: the data's std^2 is "
                           "scaled by abar too."),
                   Mistake(variant(v_of=lambda a, std: torch.ones_like(a)),
                           "the variance of x_t given component k is v = abar std^2 + 1 - abar, in the posterior "
                           "weights and in the one-Gaussian term; it is not 1."),
                   Mistake(variant(root=False), "the one-Gaussian term is sqrt(1 - abar) (x_t - sqrt(abar) mu_k) / v: "
                                                "take the square root of 1 - abar."),
                   Mistake(variant(stable=False), "exp of the log-weights underflows when the modes are narrow and "
                                                  "x_t is far from them (0 / 0 = nan): normalise with softmax (it "
                                                  "subtracts the largest logit first).")],
         error_hint="x_t (N, C), abar (N,), means (K, C), weights (K,): broadcast to (N, K, C) with "
                    "x_t[:, None, :] and means[None].",
         hint="v = abar std^2 + 1 - abar; d_k = x_t - sqrt(abar) mu_k; p = softmax_k(log w_k - |d_k|^2 / (2 v)); "
              "eps = sum_k p_k sqrt(1 - abar) d_k / v.")
