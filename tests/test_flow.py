"""Tests for minilib.flow: rectified flow, SD3's schedule, Euler/Heun/DPM-Solver++(2M) sampling, CFG, SLG."""

import math

import pytest
import torch
from torch import nn

from minilib.adaln import TinyDenoiser
from minilib.flow import (CFGDenoiser, SkipLayerCFGDenoiser, VelocityDenoiser, append_dims, calculate_denoised,
                          flow_matching_loss, interpolate, logit_normal, sample_dpmpp_2m, sample_euler,
                          sample_heun, sigmas, time_snr_shift, to_d, uniform, velocity_target)

# --- training ---------------------------------------------------------------


def test_interpolation_endpoints_and_midpoint():
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(interpolate(x0, noise, torch.zeros(3)), x0)
    torch.testing.assert_close(interpolate(x0, noise, torch.ones(3)), noise)
    mixed = interpolate(x0, noise, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(mixed[1], (x0[1] + noise[1]) / 2)
    # The velocity is the derivative of the line in t.
    t, h = torch.full((3,), 0.3), 1e-3
    slope = (interpolate(x0, noise, t + h) - interpolate(x0, noise, t)) / h
    torch.testing.assert_close(slope, velocity_target(x0, noise), atol=1e-3, rtol=1e-3)


class ToyVelocityNet(nn.Module):
    """v(x, t, y) = w x + t + y: depends on every input, so the loss checks the plumbing."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))

    def forward(self, x, t, y):
        return self.w * x + append_dims(t + y, x.ndim)


@pytest.mark.parametrize("t_sampler", [uniform, logit_normal])
def test_loss_equals_the_manual_mse_at_a_fixed_seed(t_sampler):
    model, x0, y = ToyVelocityNet(), torch.randn(8, 1, 4, 4), torch.arange(8.0)
    torch.manual_seed(0)
    loss = flow_matching_loss(model, x0, {"y": y}, t_sampler=t_sampler)
    torch.manual_seed(0)
    t = t_sampler(8)          # the loss draws t first, then the noise
    noise = torch.randn_like(x0)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    expected = ((model(x_t, t, y) - (noise - x0)) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert model.w.grad is not None


def test_timestep_samplers():
    torch.manual_seed(0)
    t = uniform(20_000)
    assert t.shape == (20_000,) and 0 <= t.min() and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.01
    t = logit_normal(20_000)
    assert 0 < t.min() and t.max() < 1
    assert abs(t.median().item() - 0.5) < 0.01
    # logit_normal concentrates on the middle: fewer samples near the ends than uniform.
    assert ((t < 0.1) | (t > 0.9)).float().mean() < 0.05
    shifted = logit_normal(20_000, mean=1.0, std=0.5)
    assert abs(shifted.median().item() - 1 / (1 + math.exp(-1.0))) < 0.01


# --- SD3's schedule ---------------------------------------------------------


def test_time_snr_shift_fixes_the_ends_is_monotone_and_1_is_the_identity():
    t = torch.linspace(0, 1, 101)
    for shift in [0.5, 1.0, 3.0, 6.0]:
        sigma = time_snr_shift(shift, t)
        assert sigma[0] == 0 and sigma[-1] == pytest.approx(1.0)
        assert torch.all(sigma[1:] > sigma[:-1])
    torch.testing.assert_close(time_snr_shift(1.0, t), t)
    assert time_snr_shift(3.0, 0.5) == pytest.approx(0.75)        # more noise than t
    # The SNR ((1 - sigma) / sigma)^2 is the unshifted one divided by shift^2.
    snr = lambda s: ((1 - s) / s) ** 2
    assert snr(time_snr_shift(3.0, 0.2)) == pytest.approx(snr(0.2) / 9)


def sd3_reference_sigmas(steps, shift):
    """SD3's ModelSamplingDiscreteFlow table and get_sigmas loop, step by step."""
    def sigma(timestep):
        timestep = timestep / 1000.0
        return timestep if shift == 1.0 else shift * timestep / (1 + (shift - 1) * timestep)

    table = sigma(torch.arange(1, 1001, 1))
    start, end = table[-1] * 1000, table[0] * 1000
    levels = [sigma(ts) for ts in torch.linspace(start, end, steps)]
    return torch.FloatTensor(levels + [0.0])


@pytest.mark.parametrize("num_steps", [1, 2, 10, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sigmas_follow_sd3(num_steps, shift):
    levels = sigmas(num_steps, shift)
    assert levels.shape == (num_steps + 1,) and levels.dtype == torch.float32
    assert levels[0] == 1 and levels[-1] == 0
    assert torch.all(levels[1:] < levels[:-1])
    torch.testing.assert_close(levels, sd3_reference_sigmas(num_steps, shift))


def test_larger_shift_spends_more_steps_at_high_noise():
    assert torch.all(sigmas(10, 3.0)[1:-1] > sigmas(10, 1.0)[1:-1])


# --- the denoiser view ------------------------------------------------------


def test_denoised_and_to_d_are_the_velocity_view():
    x0, noise, t = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5), torch.rand(4) * 0.9 + 0.05
    x_t, v = interpolate(x0, noise, t), velocity_target(x0, noise)
    denoised = calculate_denoised(t, v, x_t)
    torch.testing.assert_close(denoised, x0)                      # the true velocity denoises exactly
    torch.testing.assert_close(to_d(x_t, t, denoised), v)         # and to_d gives it back
    denoiser = VelocityDenoiser(lambda x, t: 2 * x + append_dims(t, x.ndim))
    d = to_d(x_t, t, denoiser(x_t, t))
    torch.testing.assert_close(d, 2 * x_t + t.view(-1, 1, 1, 1))
    scaled = VelocityDenoiser(lambda x, t: append_dims(t, x.ndim).expand_as(x), timestep_scale=1000)
    torch.testing.assert_close(to_d(x_t, t, scaled(x_t, t)), (1000 * t).view(-1, 1, 1, 1).expand_as(x_t))


# --- sampling: the Gaussian case, solved exactly ----------------------------
#
# For x0 ~ N(mu, s^2 I) and noise ~ N(0, I), x_t = (1 - t) x0 + t noise and
# v = noise - x0 are jointly Gaussian, coordinate by coordinate, so
#     E[v | x_t] = E[v] + Cov(v, x_t) / Var(x_t) (x_t - E[x_t])
# with E[v] = -mu, E[x_t] = (1 - t) mu, Var(x_t) = (1 - t)^2 s^2 + t^2 and
# Cov(v, x_t) = t - (1 - t) s^2. This field is affine in x, so its ODE maps
# N(0, I) at t = 1 onto N(mu, s^2 I) at t = 0 by the increasing affine map
# x -> mu + s x: every sample has a known exact destination.

MU, S = torch.tensor([1.5, -0.5, 0.0]), 0.5


def gaussian_velocity(x, t):
    t = append_dims(t, x.ndim)
    variance = (1 - t) ** 2 * S ** 2 + t ** 2
    covariance = t - (1 - t) * S ** 2
    return -MU + covariance / variance * (x - (1 - t) * MU)


@pytest.fixture(scope="module")
def start_noise():
    return torch.randn(4096, 3, generator=torch.Generator().manual_seed(0))


def transport_error(sampler, x1, num_steps, shift=1.0):
    """Largest distance of a sample from its exact destination ``mu + s x1``, and the samples."""
    x0 = sampler(VelocityDenoiser(gaussian_velocity), x1, sigmas(num_steps, shift))
    return (x0 - (MU + S * x1)).abs().max().item(), x0


def test_gaussian_velocity_is_the_conditional_mean(start_noise):
    # Check the closed form against a Monte Carlo estimate near one x_t.
    generator = torch.Generator().manual_seed(1)
    x0 = MU[0] + S * torch.randn(400_000, generator=generator)
    noise = torch.randn(400_000, generator=generator)
    t = 0.4
    x_t = (1 - t) * x0 + t * noise
    near = (x_t - 0.8).abs() < 0.01
    monte_carlo = (noise - x0)[near].mean().item()
    exact = gaussian_velocity(torch.tensor([[0.8, 0.0, 0.0]]), torch.tensor([t]))[0, 0].item()
    assert monte_carlo == pytest.approx(exact, abs=0.03)


def test_euler_transports_noise_to_the_data_gaussian(start_noise):
    error, x0 = transport_error(sample_euler, start_noise, num_steps=200)
    assert error < 0.02
    torch.testing.assert_close(x0.mean(0), MU, atol=0.03, rtol=0)
    torch.testing.assert_close(x0.std(0), torch.full((3,), S), atol=0.03, rtol=0)
    # With the shifted grid too.
    assert transport_error(sample_euler, start_noise, num_steps=200, shift=3.0)[0] < 0.04


def test_heun_is_more_accurate_than_euler(start_noise):
    def error(sampler, num_steps):
        return transport_error(sampler, start_noise, num_steps)[0]

    for num_steps in [5, 10, 20]:
        assert error(sample_heun, num_steps) < error(sample_euler, num_steps) / 3
    # Doubling the steps halves Euler's error (first order) and quarters Heun's (second order).
    assert error(sample_euler, 20) / error(sample_euler, 40) == pytest.approx(2, rel=0.15)
    assert error(sample_heun, 20) / error(sample_heun, 40) == pytest.approx(4, rel=0.15)
    # Heun with 10 steps (19 model calls) beats Euler with 40 calls.
    assert error(sample_heun, 10) < error(sample_euler, 40)


def test_heun_counts_model_calls():
    calls = []

    def denoiser(x, sigma):
        calls.append(sigma[0].item())
        return torch.zeros_like(x)

    sample_heun(denoiser, torch.randn(2, 3), sigmas(4, 1.0))
    assert len(calls) == 2 * 4 - 1     # no correction on the last step to sigma = 0
    assert 0.0 not in calls


# --- DPM-Solver++(2M) -------------------------------------------------------


def exact_gaussian_flow(x1, sigma):
    """Where the ODE takes ``x1`` (at sigma = 1) at level ``sigma``: the Gaussian flow's map is
    the increasing affine map between N(0, I) and N((1 - sigma) mu, ((1 - sigma)^2 s^2 + sigma^2) I)."""
    return (1 - sigma) * MU + math.sqrt((1 - sigma) ** 2 * S ** 2 + sigma ** 2) * x1


def log_uniform_sigmas(num_steps, end=0.05):
    """Levels from 1 to ``end``, equally spaced in lambda = -log sigma (DPM-Solver's natural grid)."""
    return torch.exp(torch.linspace(0.0, math.log(end), num_steps + 1))


def test_dpmpp_2m_is_second_order(start_noise):
    """On a grid uniform in lambda, doubling the steps divides DPM++(2M)'s error by 4 (Euler's by 2)."""
    exact = exact_gaussian_flow(start_noise, 0.05)

    def error(sampler, num_steps):
        out = sampler(VelocityDenoiser(gaussian_velocity), start_noise, log_uniform_sigmas(num_steps))
        return (out - exact).abs().max().item()

    assert error(sample_dpmpp_2m, 64) / error(sample_dpmpp_2m, 128) == pytest.approx(4, rel=0.15)
    assert error(sample_euler, 64) / error(sample_euler, 128) == pytest.approx(2, rel=0.15)
    # at the same number of model calls, far more accurate than Euler
    assert error(sample_dpmpp_2m, 32) < error(sample_euler, 32) / 50


def test_dpmpp_2m_converges_on_sd3s_grid(start_noise):
    def error(sampler, num_steps):
        return transport_error(sampler, start_noise, num_steps)[0]

    assert error(sample_dpmpp_2m, 80) < error(sample_dpmpp_2m, 40) / 3
    assert error(sample_dpmpp_2m, 80) < error(sample_euler, 80) / 3


def test_dpmpp_2m_is_exact_when_the_denoiser_is_constant():
    """Data at a single point mu: D = mu everywhere, and the exact solution is
    x_sigma = mu + (sigma / sigma_0) (x - mu), which every step reproduces."""
    mu = torch.tensor([[0.5, -2.0, 3.0]])
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))

    def denoiser(x, sigma):
        return mu.expand_as(x)

    torch.testing.assert_close(sample_dpmpp_2m(denoiser, x, sigmas(7, 3.0)), mu.expand_as(x), rtol=0, atol=1e-6)
    levels = torch.tensor([0.9, 0.5, 0.3, 0.2])
    torch.testing.assert_close(sample_dpmpp_2m(denoiser, x, levels), mu + (0.2 / 0.9) * (x - mu))


def test_dpmpp_2m_by_hand():
    """Three steps of the update written out: first order, second order, first order onto 0."""
    def denoiser(x, sigma):
        return 0.5 * x + append_dims(sigma, x.ndim) ** 2

    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    s0, s1, s2 = 1.0, 0.6, 0.25
    lam = [-math.log(s0), -math.log(s1), -math.log(s2)]
    d0 = denoiser(x, torch.full((2,), s0, dtype=torch.float64))
    x1 = (s1 / s0) * x - math.expm1(-(lam[1] - lam[0])) * d0
    d1 = denoiser(x1, torch.full((2,), s1, dtype=torch.float64))
    r = (lam[1] - lam[0]) / (lam[2] - lam[1])
    x2 = (s2 / s1) * x1 - math.expm1(-(lam[2] - lam[1])) * ((1 + 1 / (2 * r)) * d1 - 1 / (2 * r) * d0)
    d2 = denoiser(x2, torch.full((2,), s2, dtype=torch.float64))
    levels = torch.tensor([s0, s1, s2, 0.0], dtype=torch.float64)
    torch.testing.assert_close(sample_dpmpp_2m(denoiser, x, levels[:3]), x2)
    torch.testing.assert_close(sample_dpmpp_2m(denoiser, x, levels), d2)  # onto 0: the last denoised estimate


def test_dpmpp_2m_makes_one_call_per_step_never_at_zero():
    calls = []

    def denoiser(x, sigma):
        calls.append(sigma[0].item())
        return 0.3 * x

    out = sample_dpmpp_2m(denoiser, torch.randn(2, 3), sigmas(6, 3.0))
    assert calls == pytest.approx(sigmas(6, 3.0)[:-1].tolist())
    assert torch.isfinite(out).all()


def test_dpmpp_2m_reads_nothing_back_and_runs_on_meta():
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountReads(TorchDispatchMode):
        reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                self.reads += 1
            return func(*args, **(kwargs or {}))

    denoiser = VelocityDenoiser(lambda x, t: 0.5 * x)
    with CountReads() as counter:
        sample_dpmpp_2m(denoiser, torch.randn(2, 4), sigmas(5))
    assert counter.reads == 0
    meta = torch.device("meta")
    assert sample_dpmpp_2m(denoiser, torch.randn(2, 4, device=meta), sigmas(5).to(meta)).device == meta


@pytest.mark.parametrize("sampler", [sample_euler, sample_heun, sample_dpmpp_2m])
@pytest.mark.parametrize("levels", [[1.0, 0.5, 0.5, 0.0], [0.2, 0.5, 0.0], [1.0, 0.5, -0.1]])
def test_samplers_reject_levels_that_do_not_decrease(sampler, levels):
    with pytest.raises(ValueError, match="sigmas must decrease strictly"):
        sampler(lambda x, s: x, torch.randn(2, 3), torch.tensor(levels))


def test_sample_euler_with_guidance_runs_a_tiny_denoiser():
    torch.manual_seed(0)
    model = TinyDenoiser(image_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1,
                         num_heads=2, num_classes=3).eval()
    labels = torch.tensor([0, 1, 2])
    extra_args = {"cond": {"y": labels}, "uncond": {"y": torch.full_like(labels, 3)}, "cond_scale": 2.0}
    x = sample_euler(CFGDenoiser(VelocityDenoiser(model)), torch.randn(3, 1, 8, 8), sigmas(4),
                     extra_args)
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()


# --- classifier-free guidance -----------------------------------------------


def test_cfg_mixes_conditional_and_unconditional():
    denoiser = VelocityDenoiser(lambda x, t, y: x * append_dims(y, x.ndim) + append_dims(t, x.ndim))
    x, sigma = torch.randn(4, 2, 3, 3), torch.rand(4)
    y, null = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.zeros(4)
    cond, uncond = denoiser(x, sigma, y=y), denoiser(x, sigma, y=null)
    guided = CFGDenoiser(denoiser)
    torch.testing.assert_close(guided(x, sigma, {"y": y}, {"y": null}, 1.0), cond)
    torch.testing.assert_close(guided(x, sigma, {"y": y}, {"y": null}, 0.0), uncond)
    torch.testing.assert_close(guided(x, sigma, {"y": y}, {"y": null}, 3.0), uncond + 3 * (cond - uncond))


class SkipAware(nn.Module):
    """A velocity that depends on y and on which layers are skipped; records each call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y, skip_layers=()):
        self.calls.append(list(skip_layers))
        return x * append_dims(y, x.ndim) + len(skip_layers)


def test_skip_layer_guidance_formula():
    network = SkipAware()
    denoiser = VelocityDenoiser(network)
    x, sigma = torch.randn(3, 2, 4), torch.rand(3) * 0.8 + 0.1
    y, null = torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3)
    cond, uncond = denoiser(x, sigma, y=y), denoiser(x, sigma, y=null)
    skipped = denoiser(x, sigma, y=y, skip_layers=[7, 8])
    guided = SkipLayerCFGDenoiser(denoiser, steps=10, skip_layers=[7, 8], scale=2.5, start=0.0, end=1.0)
    guided.step = 1
    network.calls.clear()
    out = guided(x, sigma, {"y": y}, {"y": null}, 4.0)
    torch.testing.assert_close(out, uncond + 4.0 * (cond - uncond) + 2.5 * (cond - skipped))
    assert network.calls == [[], [7, 8]]  # one batch of 2B for CFG, then the B conditional inputs
    assert guided.step == 2


def test_skip_layer_guidance_is_active_where_sd35_medium_uses_it():
    """SD3.5 Medium: 50 steps, start 0.01, end 0.2: the skip term is added at steps 1 to 9."""
    network = SkipAware()
    guided = SkipLayerCFGDenoiser(VelocityDenoiser(network), steps=50, skip_layers=[7, 8, 9])
    labels = torch.ones(2)
    sample_euler(guided, torch.randn(2, 3), sigmas(50, 3.0),
                 extra_args=dict(cond={"y": labels}, uncond={"y": 0 * labels}, cond_scale=4.0))
    skipped_at = [step for step in range(50) if guided.guides(step)]
    assert skipped_at == list(range(1, 10))
    assert len(network.calls) == 50 + 9 and network.calls.count([7, 8, 9]) == 9
    assert guided.step == 50
    guided.reset()
    assert guided.step == 0


def test_skip_layer_guidance_with_scale_0_is_plain_cfg():
    network = SkipAware()
    denoiser = VelocityDenoiser(network)
    x, sigma, y = torch.randn(2, 3), torch.rand(2), torch.tensor([1.0, -1.0])
    plain = CFGDenoiser(denoiser)(x, sigma, {"y": y}, {"y": 0 * y}, 3.0)
    network.calls.clear()
    guided = SkipLayerCFGDenoiser(denoiser, steps=4, skip_layers=[1], scale=0.0, start=0.0, end=1.0)
    guided.step = 2
    torch.testing.assert_close(guided(x, sigma, {"y": y}, {"y": 0 * y}, 3.0), plain)
    assert network.calls == [[]]


# --- bad input --------------------------------------------------------------


def test_bad_input_raises_clear_errors():
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="num_steps"):
        sigmas(0)
    with pytest.raises(ValueError, match="shift must be positive"):
        time_snr_shift(0.0, 0.5)
    with pytest.raises(ValueError, match="std must be positive"):
        logit_normal(4, std=0)
    with pytest.raises(ValueError, match="noise must have the shape"):
        interpolate(x, torch.randn(2, 1, 4, 5), torch.rand(2))
    with pytest.raises(ValueError, match=r"t must have shape \(B,\)"):
        interpolate(x, x, torch.rand(3))
    with pytest.raises(ValueError, match="velocity of shape"):
        flow_matching_loss(lambda x, t: x[:, :, :2], x)
    with pytest.raises(ValueError, match="x0 must be a tensor"):
        flow_matching_loss(lambda x, t: x, [1.0, 2.0])
    with pytest.raises(ValueError, match="sigmas must be a 1-D tensor"):
        sample_euler(lambda x, s: x, x, torch.tensor([1.0]))
    with pytest.raises(ValueError, match="sigmas must be a 1-D tensor"):
        sample_heun(lambda x, s: x, x, [1.0, 0.0])
    with pytest.raises(ValueError, match="less"):
        append_dims(torch.zeros(2, 3), 1)
    with pytest.raises(ValueError, match="sigma must have shape"):
        VelocityDenoiser(lambda x, t: x)(x, torch.rand(3))
    guided = CFGDenoiser(VelocityDenoiser(lambda x, t, y: x))
    with pytest.raises(ValueError, match="same keys"):
        guided(x, torch.rand(2), {"y": torch.zeros(2)}, {"context": torch.zeros(2)}, 2.0)
    with pytest.raises(ValueError, match="batch size 2"):
        guided(x, torch.rand(2), {"y": torch.zeros(3)}, {"y": torch.zeros(3)}, 2.0)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        SkipLayerCFGDenoiser(guided.model, steps=0)
    with pytest.raises(ValueError, match="skip_layers"):
        SkipLayerCFGDenoiser(guided.model, steps=10, skip_layers=[])
    with pytest.raises(ValueError, match="scale must be >= 0"):
        SkipLayerCFGDenoiser(guided.model, steps=10, scale=-1.0)
    with pytest.raises(ValueError, match="start <= end"):
        SkipLayerCFGDenoiser(guided.model, steps=10, start=0.5, end=0.2)
