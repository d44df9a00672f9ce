import math

import pytest
import torch

from minilib.diffusion import (GaussianDiffusion, beta_schedule, classifier_free_guidance, cosine_alpha_bar,
                               normal_kl, space_timesteps)


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
    with pytest.raises(ValueError, match="cannot take 11 steps from a section of 10"):
        space_timesteps(10, 11)


def test_space_timesteps_takes_the_official_forms():
    assert space_timesteps(1000, "ddim10") == list(range(0, 1000, 100))
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim3") == [0, 334, 668]  # the smallest stride giving exactly 3 steps
    assert space_timesteps(1000, "50") == space_timesteps(1000, 50) == space_timesteps(1000, [50])
    assert space_timesteps(1000, "250")[:3] == [0, 4, 8] and space_timesteps(1000, 250)[-1] == 999
    # "10,15,20" of 300: sections 0..99, 100..199, 200..299, each spread over its own length
    three = space_timesteps(300, "10,15,20")
    assert len(three) == 45 and three == sorted(set(three))
    assert three[:10] == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    assert three[10] == 100 and three[24] == 199 and three[25] == 200 and three[-1] == 299
    assert space_timesteps(10, "2,3") == [0, 4, 5, 7, 9]  # sections of 5 and 5
    assert space_timesteps(11, "1,1") == [0, 6]  # the first section is one step longer
    # the step positions are summed up step by step (the official rounding), not multiplied:
    # 0.1 * 3 != 0.1 + 0.1 + 0.1 in floating point, which changes round() at the halves
    assert space_timesteps(2 + 1, "3") == [0, 1, 2]
    d = GaussianDiffusion(beta_schedule("linear", 1000))
    assert d.respace("ddim25").timestep_map.tolist() == list(range(0, 1000, 40))
    assert d.respace("10,15,20").num_timesteps == 45


@pytest.mark.parametrize("bad, message", [
    ("ddim", "section_counts must be"), ("ddimx", "section_counts must be"), ("ten", "section_counts must be"),
    ("10,,5", "section_counts must be"), ("-5", "section_counts must be"), (2.5, "section_counts must be"),
    ("ddim700", "no integer stride gives exactly 700"), ("0", "keeps no timestep"),
    ("600,600", "cannot take 600 steps from a section of 500"), ([], "section_counts must be"),
    ([10, "5"], "section_counts must be"), ([10, -1], "cannot take -1 steps"), (True, "section_counts must be")])
def test_space_timesteps_rejects_bad_specs(bad, message):
    with pytest.raises(ValueError, match=message):
        space_timesteps(1000, bad)


def test_respace_needs_two_steps():
    with pytest.raises(ValueError, match="at least 2"):
        GaussianDiffusion(beta_schedule("linear", 1000)).respace("1")


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tables_are_float64_until_looked_up(dtype):
    """Near t = 0, 1 - abar_t = 1e-4: computed in float32 (or bf16) after the lookup it keeps few digits."""
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000))
    t = torch.tensor([0, 1, 500])
    x = diffusion.q_sample(torch.zeros(3, dtype=dtype), t, torch.ones(3, dtype=dtype))
    exact = (1 - diffusion.alphas_cumprod[t]).sqrt()  # float64
    assert x.dtype == dtype and torch.equal(x, exact.to(dtype))  # rounded once, at the end
    naive = (1 - diffusion.alphas_cumprod[t].to(dtype)).sqrt()  # rounded, then 1 - abar
    assert (naive[0] - 0.01).abs() > 50 * (x[0] - 0.01).abs()


def test_x0_from_eps_near_t0_is_as_precise_as_float32():
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000))
    t = torch.tensor([0, 1])
    x0, eps = torch.full((2,), 0.3), torch.full((2,), -1.7)
    x_t = diffusion.q_sample(x0, t, eps)
    torch.testing.assert_close(diffusion.predict_x0_from_eps(x_t, t, eps), x0, rtol=3e-7, atol=0)
    torch.testing.assert_close(diffusion.predict_eps_from_x0(x_t, t, x0), eps, rtol=1e-4, atol=0)
    abar = diffusion.alphas_cumprod[t].float()  # the same in float32 after the lookup: 10x worse
    naive = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
    assert (naive - x0).abs().max() > 1e-6


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
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\], got -1.0"):
        diffusion.ddim_sample_loop(lambda x, t: x, (2, 3), eta=-1.0)


def wobbly_model(x_t, t):
    """Not an oracle: the path depends on every draw. Returns eps and variance values in [-1, 1]."""
    return torch.cat([torch.tanh(x_t) * (t.float().view(-1, 1) / 1000), torch.sin(3 * x_t)], 1)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_samplers_draw_once_per_step_also_at_the_last(sampler):
    """The official p_sample and ddim_sample draw randn_like(x) at every step, t = 0 and eta = 0 included,
    so whatever the global generator draws next is the same after minilib's loop as after theirs."""
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000), learn_sigma=True).respace(5)
    loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
    torch.manual_seed(3)
    loop(wobbly_model, (4, 2))
    after = torch.randn(3)
    torch.manual_seed(3)
    for _ in range(1 + 5):  # the start noise, then one draw per step
        torch.randn(4, 2)
    assert torch.equal(after, torch.randn(3))


def test_seeded_loop_is_the_global_generators_stream():
    """seed=s draws from torch.Generator().manual_seed(s): on the CPU the same numbers as torch.manual_seed(s)."""
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000), learn_sigma=True).respace(6)
    seeded = diffusion.p_sample_loop(wobbly_model, (4, 2), seed=11, temperature=0.8)
    torch.manual_seed(11)
    torch.testing.assert_close(diffusion.p_sample_loop(wobbly_model, (4, 2), temperature=0.8), seeded, rtol=0, atol=0)
    # a generator that drew the start noise itself continues its stream (DiT's sample.py: z, then cat([z, z]))
    generator = torch.Generator().manual_seed(11)
    start = torch.randn(4, 2, generator=generator)
    again = diffusion.p_sample_loop(wobbly_model, (4, 2), noise=start, generator=generator, temperature=0.8)
    torch.testing.assert_close(again, seeded, rtol=0, atol=0)
    with pytest.raises(ValueError, match="seed or generator, not both"):
        diffusion.p_sample_loop(wobbly_model, (4, 2), seed=1, generator=generator)
    with pytest.raises(ValueError, match="model_kwargs must be a dict"):
        diffusion.p_sample_loop(wobbly_model, (4, 2), start)  # the official loop's third argument is the noise


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_single_steps_make_up_the_loops(learn_sigma):
    diffusion = GaussianDiffusion(beta_schedule("cosine", 1000), learn_sigma=learn_sigma).respace("ddim4")
    x = start = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    y = start.clone()
    generator, other = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for i in reversed(range(4)):
        t = torch.full((4,), i)
        out = diffusion.p_mean_variance(wobbly_model, x, t, clip_denoised=False)
        step = diffusion.p_sample(wobbly_model, x, t, clip_denoised=False, generator=generator)
        torch.testing.assert_close(step["pred_xstart"], out["pred_xstart"])
        z = torch.randn(4, 2, generator=other)
        expected = out["mean"] + (0.5 * out["log_variance"]).exp() * z * (i > 0)
        torch.testing.assert_close(step["sample"], expected)
        assert set(out) == {"mean", "variance", "log_variance", "pred_xstart"}
        assert all(v.shape == x.shape for v in out.values())
        if i > 0 or learn_sigma:  # (the fixed b~_0 = 0 has its log clipped to log b~_1)
            torch.testing.assert_close(out["variance"], out["log_variance"].exp())
        x = step["sample"]
        y = diffusion.ddim_sample(wobbly_model, y, t, clip_denoised=True)["sample"]  # eta 0: any noise
    torch.testing.assert_close(x, diffusion.p_sample_loop(wobbly_model, (4, 2), noise=start, seed=1))
    loop_ddim = diffusion.ddim_sample_loop(wobbly_model, (4, 2), noise=start, clip_denoised=True)
    torch.testing.assert_close(y, loop_ddim)


def test_ddim_reverse_sample_follows_the_forward_process_with_an_oracle():
    """With the exact eps, one deterministic step forwards from q_sample(x*, i, e) is q_sample(x*, i + 1, e)."""
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000)).respace("ddim20")
    model = oracle_model(GaussianDiffusion(beta_schedule("linear", 1000)))
    x_star, e = X_STAR.expand(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    x = diffusion.q_sample(x_star, torch.zeros(3, dtype=torch.long), e)
    for i in range(20):
        out = diffusion.ddim_reverse_sample(model, x, torch.full((3,), i), clip_denoised=False)
        torch.testing.assert_close(out["pred_xstart"], x_star, atol=2e-4, rtol=0)
        x = out["sample"]
        expected = diffusion.q_sample(x_star, torch.full((3,), i + 1), e) if i < 19 else e  # abar_T = 0
        torch.testing.assert_close(x, expected, atol=3e-4, rtol=0)


def test_training_losses_takes_t_third_as_the_official_one():
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000), learn_sigma=True)
    x0, noise, t = torch.rand(4, 2) * 2 - 1, torch.randn(4, 2), torch.tensor([0, 1, 500, 999])
    terms = diffusion.training_losses(wobbly_model, x0, t, None, noise)
    assert set(terms) == {"loss", "mse", "vb"} and all(v.shape == (4,) for v in terms.values())
    x_t = diffusion.q_sample(x0, t, noise)
    eps, v = wobbly_model(x_t, t).chunk(2, dim=1)
    torch.testing.assert_close(terms["mse"], ((noise - eps) ** 2).mean(1))
    torch.testing.assert_close(terms["vb"], diffusion.variational_bound_term(x0, x_t, t, eps, v))
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    assert terms["vb"][0] > 0  # the decoder NLL at t = 0
    with pytest.raises(ValueError, match="t must be a"):
        diffusion.training_losses(wobbly_model, x0, dict(y=1))


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_step_near_t0_is_as_precise_as_float32(eta):
    """The DDIM step reads sqrt(abar_{t-1}), 1 - abar_{t-1} and sigma_t from float64 tables. The same formula
    on float32 abar (as the official code computes it) loses digits at t = 1, where abar_{t-1} = 0.9999."""
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000)).respace("ddim10")
    generator = torch.Generator().manual_seed(0)
    x, x0, z = (torch.randn(4096, generator=generator) for _ in range(3))
    x0 = x0.clamp(-1, 1)
    t = torch.ones(4096, dtype=torch.long)
    step = diffusion._ddim_step(x, t, x0, z, eta=eta)
    exact = diffusion._ddim_step(x.double(), t, x0.double(), z.double(), eta=eta)
    assert (step.double() - exact).abs().max() < 5e-7
    abar, abar_prev = diffusion.alphas_cumprod[t].float(), diffusion.alphas_cumprod_prev[t].float()
    sigma = eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
    eps = ((1 / abar).sqrt() * x - x0) / (1 / abar - 1).sqrt()
    in_float32 = x0 * abar_prev.sqrt() + (1 - abar_prev - sigma ** 2).sqrt() * eps + sigma * z
    assert (in_float32.double() - exact).abs().max() > 2e-6


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_in_bfloat16_stays_finite_and_close(eta):
    """bf16 keeps 1 - abar_{t-1} = 1e-4 only because it comes from a float64 table (1 - bf16(0.9999) = 0)."""
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000)).respace("ddim10")
    oracle = oracle_model(GaussianDiffusion(beta_schedule("linear", 1000)))

    def model(x, t):  # the oracle, rounded to x's dtype
        return oracle(x.float(), t).to(x.dtype)

    noise = torch.randn(64, 4, 1, 1, generator=torch.Generator().manual_seed(0))
    low = diffusion.ddim_sample_loop(model, noise.shape, noise=noise.bfloat16(), seed=1, eta=eta)
    high = diffusion.ddim_sample_loop(model, noise.shape, noise=noise, seed=1, eta=eta)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), high, atol=0.03, rtol=0)


def test_the_bound_term_is_a_weighted_squared_noise_error():
    """DDPM eq. 12: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) = beta^2 / (2 sigma^2 alpha (1 - abar)) |eps - eps_theta|^2."""
    diffusion = GaussianDiffusion(beta_schedule("cosine", 1000))
    torch.manual_seed(0)
    t = torch.tensor([1, 10, 100, 500, 999])
    x0, eps, eps_theta = torch.randn(5, 2, 3, 3), torch.randn(5, 2, 3, 3), torch.randn(5, 2, 3, 3)
    x_t = diffusion.q_sample(x0, t, eps)
    true_mean, variance = diffusion.q_posterior_mean_variance(x0, x_t, t)
    model_mean, _ = diffusion.q_posterior_mean_variance(diffusion.predict_x0_from_eps(x_t, t, eps_theta), x_t, t)
    kl = normal_kl(true_mean, variance.log(), model_mean, variance.log()).flatten(1).sum(1)
    beta, abar = diffusion.betas[t], diffusion.alphas_cumprod[t]
    weight = (beta ** 2 / (2 * diffusion.posterior_variance[t] * (1 - beta) * (1 - abar))).float()
    torch.testing.assert_close(kl, weight * (eps - eps_theta).pow(2).flatten(1).sum(1), rtol=1e-3, atol=0)


def test_tweedie_the_best_noise_predictor_is_the_scaled_score():
    """For x0 ~ N(m, s^2), E[eps | x_t] = -sqrt(1 - abar) * score of p_t, recovered by least squares."""
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000))
    generator = torch.Generator().manual_seed(0)
    m, s = -0.7, 0.3
    for step in (100, 600):
        a, b = diffusion.alphas_cumprod[step].sqrt().item(), (1 - diffusion.alphas_cumprod[step]).sqrt().item()
        x0 = m + s * torch.randn(400_000, generator=generator, dtype=torch.float64)
        eps = torch.randn(400_000, generator=generator, dtype=torch.float64)
        x_t = a * x0 + b * eps
        design = torch.stack([x_t, torch.ones_like(x_t)], dim=1)
        slope, intercept = torch.linalg.lstsq(design, eps[:, None]).solution.flatten().tolist()
        variance = a ** 2 * s ** 2 + b ** 2  # p_t = N(a m, variance): score(x) = -(x - a m) / variance
        assert slope == pytest.approx(b / variance, abs=5e-3)
        assert intercept == pytest.approx(-b * a * m / variance, abs=5e-3)
