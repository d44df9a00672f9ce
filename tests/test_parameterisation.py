"""The identities of the interlude between chapters 5 and 6 (minilib/parameterisation.py)."""

import pytest
import torch

from minilib import parameterisation as P
from minilib.diffusion import GaussianDiffusion, beta_schedule
from minilib.flow import sample_euler


def toy_eps(x, t, **kwargs):
    return torch.tanh(x) * (1 + t.to(x.dtype).view(-1, 1, 1, 1) / 1000)


@pytest.mark.parametrize("a, b, da, db", [(0.6, 0.4, -1.0, 1.0), (0.9, 0.43, -0.3, 2.1), (0.05, 0.99, -4.0, 0.1)])
def test_every_prediction_converts_into_the_others_and_back(a, b, da, db):
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64).unbind(0)
    x_t = a * x0 + b * eps
    torch.testing.assert_close(P.x0_from_eps(x_t, eps, a, b), x0)
    torch.testing.assert_close(P.eps_from_x0(x_t, x0, a, b), eps)
    torch.testing.assert_close(P.eps_from_score(P.score_from_eps(eps, b), b), eps)
    v = P.velocity_from_eps(x_t, eps, a, b, da, db)
    torch.testing.assert_close(v, da * x0 + db * eps)
    torch.testing.assert_close(P.eps_from_velocity(x_t, v, a, b, da, db), eps)


def test_rectified_flow_velocity_is_noise_minus_data():
    x0, eps = torch.randn(2, 4, 4, dtype=torch.float64).unbind(0)
    a, b = P.flow_coefficients(0.3)
    torch.testing.assert_close(P.velocity_from_eps(a * x0 + b * eps, eps, a, b, -1.0, 1.0), eps - x0)


@pytest.mark.parametrize("step", [999, 600, 50, 1])
def test_a_ddim_step_is_an_euler_step_of_the_probability_flow_ode(step):
    diffusion = GaussianDiffusion(beta_schedule("cosine", 1000))
    x_t = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(step))
    t = torch.full((3,), step)
    ddim = diffusion.ddim_sample(toy_eps, x_t, t, clip_denoised=False, eta=0.0)["sample"]
    a, b = P.ddpm_coefficients(diffusion.alphas_cumprod, torch.tensor(step))
    a_next, b_next = P.ddpm_coefficients(diffusion.alphas_cumprod, torch.tensor(step - 1))
    euler = P.euler_step_in_sigma(x_t.double(), toy_eps(x_t, t).double(), a, b, a_next, b_next)
    torch.testing.assert_close(ddim.double(), euler, rtol=1e-5, atol=1e-5)


def test_the_flow_euler_sampler_is_the_same_euler_step_in_sigma():
    def denoiser(x, sigma, **kwargs):
        return torch.sin(x) * (1 - sigma.view(-1, 1))

    x = torch.randn(5, 7, dtype=torch.float64)
    for t, t_next in [(0.9, 0.7), (0.5, 0.2), (0.2, 0.0)]:
        stepped = sample_euler(denoiser, x, torch.tensor([t, t_next], dtype=torch.float64))
        eps_hat = P.eps_from_x0(x, denoiser(x, torch.full((5,), t, dtype=torch.float64)), 1 - t, t)
        torch.testing.assert_close(stepped, P.euler_step_in_sigma(x, eps_hat, 1 - t, t, 1 - t_next, t_next))


def test_ddpm_and_euler_maruyama_agree_to_first_order_in_beta():
    x_t = torch.randn(2, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    eps_hat = torch.tanh(x_t)
    gaps = []
    for T in (300, 600, 1200):
        process = GaussianDiffusion(beta_schedule("linear", T))
        step = torch.full((2,), T // 2)
        mean, _ = process.q_posterior_mean_variance(process.predict_x0_from_eps(x_t, step, eps_hat), x_t, step)
        b = (1 - process.alphas_cumprod[T // 2]).sqrt()
        em = P.euler_maruyama_reverse_step(x_t, eps_hat, process.betas[T // 2], b, torch.zeros_like(x_t))
        gaps.append((mean - em).abs().max().item())
    assert gaps[0] / gaps[1] == pytest.approx(4, rel=0.1) and gaps[1] / gaps[2] == pytest.approx(4, rel=0.1)


def test_langevin_with_the_true_score_samples_the_target():
    m, s = -1.0, 0.7
    x = torch.zeros(50_000, dtype=torch.float64)
    generator = torch.Generator().manual_seed(2)
    for _ in range(400):
        x = P.langevin_step(x, -(x - m) / s ** 2, 0.01, torch.randn(x.shape, generator=generator, dtype=torch.float64))
    assert x.mean().item() == pytest.approx(m, abs=0.02) and x.std().item() == pytest.approx(s, abs=0.02)
