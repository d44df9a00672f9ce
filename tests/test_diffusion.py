import math

import pytest
import torch

from minilib.diffusion import (GaussianDiffusion, beta_schedule, classifier_free_guidance, cosine_alpha_bar,
                               space_timesteps)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedules_are_monotone_with_alpha_bar_in_0_1(name):
    diffusion = GaussianDiffusion(beta_schedule(name, 1000))
    betas, abar = diffusion.betas, diffusion.alphas_cumprod
    assert len(betas) == 1000 and betas.dtype == torch.float64
    assert torch.all(betas[1:] >= betas[:-1]) and torch.all(abar[1:] < abar[:-1])
    assert torch.all(abar > 0) and torch.all(abar <= 1)
    assert abar[0] > 0.999 and abar[-1] < 1e-4  # from almost clean to almost pure noise


def test_linear_schedule_is_ddpms_and_scales_with_T():
    betas = beta_schedule("linear", 1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    short = beta_schedule("linear", 250)
    assert short[0].item() == pytest.approx(4e-4) and short[-1].item() == pytest.approx(0.08)


def test_cosine_alpha_bar_matches_the_closed_form():
    T = 1000
    betas = beta_schedule("cosine", T)
    assert betas.max() == 0.999  # clipped at the very end
    abar = torch.cumprod(1 - betas, 0)
    s = torch.arange(1, T + 1, dtype=torch.float64) / T
    closed = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    unclipped = betas < 0.999
    torch.testing.assert_close(abar[unclipped], closed[unclipped], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(closed, cosine_alpha_bar(s) / cosine_alpha_bar(torch.zeros(1)))


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="unknown beta schedule"):
        beta_schedule("quadratic")
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\)"):
        GaussianDiffusion(torch.tensor([0.1, 0.0]))
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\)"):
        GaussianDiffusion(torch.tensor([0.1, 1.0]))
    with pytest.raises(ValueError, match="num_steps must be between 2 and the 10"):
        space_timesteps(10, 11)


def test_q_sample_marginals():
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000))
    torch.manual_seed(0)
    x0 = torch.tensor([1.5, -0.5, 0.0])
    n = 20000
    for step in [0, 100, 500, 999]:
        t = torch.full((n,), step)
        x_t = diffusion.q_sample(x0.expand(n, 3), t, torch.randn(n, 3))
        abar = diffusion.alphas_cumprod[step].item()
        torch.testing.assert_close(x_t.mean(0), math.sqrt(abar) * x0, atol=0.03, rtol=0)
        torch.testing.assert_close(x_t.var(0), torch.full((3,), 1 - abar), atol=0.03, rtol=0.03)


def test_posterior_is_bayes_on_a_1d_gaussian():
    """q(x_{t-1} | x_t, x_0) ~ q(x_t | x_{t-1}) q(x_{t-1} | x_0), computed on a grid."""
    diffusion = GaussianDiffusion(beta_schedule("cosine", 100))
    x0, x_t = torch.tensor([[0.7]], dtype=torch.float64), torch.tensor([[-0.3]], dtype=torch.float64)
    grid = torch.linspace(-6, 6, 200001, dtype=torch.float64)
    for step in [1, 10, 50, 98]:
        beta, abar_prev = diffusion.betas[step], diffusion.alphas_cumprod_prev[step]
        log_p = (-(x_t[0, 0] - (1 - beta).sqrt() * grid) ** 2 / (2 * beta)
                 - (grid - abar_prev.sqrt() * x0[0, 0]) ** 2 / (2 * (1 - abar_prev)))
        weights = torch.softmax(log_p, 0)
        mean = (weights * grid).sum()
        var = (weights * (grid - mean) ** 2).sum()
        got_mean, got_var = diffusion.q_posterior_mean_variance(x0, x_t, torch.tensor([step]))
        assert got_mean.item() == pytest.approx(mean.item(), abs=1e-6)
        assert got_var.item() == pytest.approx(var.item(), rel=1e-4)


def test_predict_x0_inverts_q_sample():
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000))
    x0, noise, t = torch.randn(5, 2, 3, 3), torch.randn(5, 2, 3, 3), torch.tensor([0, 10, 200, 700, 990])
    x_t = diffusion.q_sample(x0, t, noise)
    torch.testing.assert_close(diffusion.predict_x0_from_eps(x_t, t, noise), x0, atol=2e-4, rtol=1e-4)


X_STAR = torch.tensor([0.8, -0.4, 0.1, 1.2]).view(1, 4, 1, 1)


def oracle_model(diffusion, learn_sigma=False):
    """The exact eps-predictor when the data is the single point X_STAR:
    x_t = sqrt(abar) x* + sqrt(1 - abar) eps, so eps = (x_t - sqrt(abar) x*) / sqrt(1 - abar).
    It reads the timestep it is given, which is the original one after respacing."""
    abar_original = diffusion.alphas_cumprod

    def model(x_t, t):
        abar = abar_original[t].float().view(-1, 1, 1, 1)
        eps = (x_t - abar.sqrt() * X_STAR) / (1 - abar).sqrt()
        return torch.cat([eps, torch.randn_like(eps)], 1) if learn_sigma else eps
    return model


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_samplers_with_an_oracle_recover_the_data_point(schedule):
    diffusion = GaussianDiffusion(beta_schedule(schedule, 1000))
    model = oracle_model(diffusion)
    shape = (6, 4, 2, 2)
    samples = {
        "ddpm, 1000 steps": diffusion.p_sample_loop(model, shape, seed=0),
        "ddpm, 50 steps": diffusion.respace(50).p_sample_loop(model, shape, seed=0),
        "ddim, 50 steps": diffusion.respace(50).ddim_sample_loop(model, shape, seed=0),
        "ddim eta=1, 50 steps": diffusion.respace(50).ddim_sample_loop(model, shape, seed=0, eta=1.0),
    }
    for name, x in samples.items():
        torch.testing.assert_close(x, X_STAR.expand(shape), atol=1e-3, rtol=0, msg=name)


def test_learned_sigma_channels_are_ignored():
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000))
    model = oracle_model(diffusion, learn_sigma=True)
    x = diffusion.respace(20).ddim_sample_loop(model, (3, 4, 1, 1), seed=0)
    torch.testing.assert_close(x, X_STAR.expand(3, 4, 1, 1), atol=1e-3, rtol=0)


def test_ddim_eta0_is_deterministic_given_the_start_noise():
    diffusion = GaussianDiffusion(beta_schedule("cosine", 1000)).respace(25)

    def model(x_t, t):  # a model that is not an oracle, so the path depends on the start
        return torch.tanh(x_t) * (t.float().view(-1, 1) / 1000)

    noise = torch.randn(8, 3)
    first = diffusion.ddim_sample_loop(model, (8, 3), noise=noise, seed=0)
    second = diffusion.ddim_sample_loop(model, (8, 3), noise=noise, seed=123)
    assert torch.equal(first, second)
    assert not torch.allclose(first, diffusion.ddim_sample_loop(model, (8, 3), noise=torch.randn(8, 3)))
    stochastic = [diffusion.ddim_sample_loop(model, (8, 3), noise=noise, seed=s, eta=1.0) for s in (0, 1)]
    assert not torch.allclose(*stochastic)
    assert torch.equal(diffusion.p_sample_loop(model, (8, 3), seed=5), diffusion.p_sample_loop(model, (8, 3), seed=5))


def test_respacing_keeps_the_original_alpha_bar():
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000))
    kept = space_timesteps(1000, 50)
    assert len(kept) == 50 and kept[0] == 0 and kept[-1] == 999 and kept == sorted(set(kept))
    assert space_timesteps(1000, 250)[:3] == [0, 4, 8]
    short = diffusion.respace(50)
    assert short.num_timesteps == 50 and short.timestep_map.tolist() == kept
    torch.testing.assert_close(short.alphas_cumprod, diffusion.alphas_cumprod[kept], rtol=1e-12, atol=0)
    torch.testing.assert_close(short.betas[0], diffusion.betas[0])
    shorter = short.respace(10)  # respacing a respaced process still points at original steps
    assert shorter.timestep_map.tolist() == [kept[i] for i in space_timesteps(50, 10)]


def test_respaced_sampler_calls_the_model_on_original_timesteps():
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000)).respace(10)
    seen = []

    def model(x_t, t):
        seen.append(t[0].item())
        return torch.zeros_like(x_t)

    diffusion.ddim_sample_loop(model, (2, 3), seed=0)
    assert seen == space_timesteps(1000, 10)[::-1]


def test_training_loss_is_the_eps_mse_at_the_sampled_t():
    diffusion = GaussianDiffusion(beta_schedule("cosine", 1000))
    weight = torch.randn(3, 3)

    def model(x_t, t, scale):
        out = torch.einsum("ij,bjhw->bihw", weight, x_t) * (t.float().view(-1, 1, 1, 1) / 1000) * scale
        return torch.cat([out, torch.ones_like(out)], 1)  # learned-sigma channels are not in the loss

    x0 = torch.randn(16, 3, 4, 4)
    torch.manual_seed(0)
    loss = diffusion.training_loss(model, x0, dict(scale=2.0))
    torch.manual_seed(0)
    t = torch.randint(0, 1000, (16,))
    noise = torch.randn_like(x0)
    abar = diffusion.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    expected = ((noise - model(x_t, t, 2.0)[:, :3]) ** 2).mean()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(diffusion.training_loss(model, x0, dict(scale=2.0), t=t, noise=noise), expected)


def test_classifier_free_guidance_helper():
    def model(x, t, y):  # eps depends on the label; one variance channel
        eps = x * y.float().view(-1, 1)
        return torch.cat([eps, -eps[:, :1]], 1)

    x = torch.randn(3, 2)
    x2, t2, y2 = torch.cat([x, x]), torch.zeros(6, dtype=torch.long), torch.tensor([1, 2, 3, 0, 0, 0])
    out = classifier_free_guidance(model, 3.0)(x2, t2, y=y2)
    cond, uncond = model(x, t2[:3], y2[:3]), model(x, t2[:3], y2[3:])
    torch.testing.assert_close(out[:3, :2], uncond[:, :2] + 3.0 * (cond[:, :2] - uncond[:, :2]))
    torch.testing.assert_close(out[3:, :2], out[:3, :2])
    torch.testing.assert_close(out[:, 2:], torch.cat([cond, uncond])[:, 2:])
    torch.testing.assert_close(classifier_free_guidance(model, 1.0)(x2, t2, y=y2)[:3], cond)


def test_classifier_free_guidance_agrees_with_dit():
    from minilib.dit import DiT
    torch.manual_seed(0)
    dit = DiT(input_size=4, patch_size=2, in_channels=2, hidden_size=16, depth=1, num_heads=2, num_classes=3).eval()
    with torch.no_grad():
        for p in dit.final_layer.parameters():
            p.normal_()
    x = torch.randn(2, 2, 4, 4)
    x2, t2, y2 = torch.cat([x, x]), torch.tensor([10, 500, 10, 500]), torch.tensor([0, 2, 3, 3])
    torch.testing.assert_close(classifier_free_guidance(dit, 2.5)(x2, t2, y=y2), dit.forward_with_cfg(x2, t2, y2, 2.5))


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match="needs T >= 21"):
        beta_schedule("linear", 20)
    diffusion = GaussianDiffusion(beta_schedule("cosine", 10))
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 9\]"):
        diffusion.q_sample(torch.zeros(2, 3), torch.tensor([0, 10]), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"t must be a \(N,\) integer tensor"):
        diffusion.q_sample(torch.zeros(2, 3), torch.tensor([0.5, 1.0]), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="the model must return eps"):
        diffusion.p_sample_loop(lambda x, t: x[:, :2], (2, 3), seed=0)
    with pytest.raises(ValueError, match="noise has shape"):
        diffusion.ddim_sample_loop(lambda x, t: x, (2, 3), noise=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="eta must lie in"):
        diffusion.ddim_sample_loop(lambda x, t: x, (2, 3), eta=-1.0)
