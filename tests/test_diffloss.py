"""MAR's diffusion loss (``DiffLoss``) and the learned-variance extension of ``GaussianDiffusion``."""

import math

import pytest
import torch
from reference import load_reference, module_tree, num_params, reference_tree

from minilib.diffloss import DiffLoss, SimpleMLPAdaLN, draw_on_cpu
from minilib.diffusion import (GaussianDiffusion, beta_schedule, discretized_gaussian_log_likelihood, normal_kl,
                               space_timesteps)

# MAR's decoder width, the condition size z_channels: mar_base 768, mar_large 1024, mar_huge 1280.
Z_CHANNELS = {"MAR-B": 768, "MAR-L": 1024, "MAR-H": 1280}


@pytest.mark.parametrize("name", ["mar_l_diffloss_d3w1024.json", "mar_l_diffloss_d12w1536.json",
                                  "mar_b.json", "mar_l.json", "mar_h.json"])
def test_diffloss_matches_the_official_subtree(name):
    ref = load_reference(name)
    kwargs = ref["constructor"]["kwargs"]
    with torch.device("meta"):
        loss = DiffLoss(target_channels=16, z_channels=Z_CHANNELS[ref["model"].split()[0]],
                        depth=kwargs["diffloss_d"], width=kwargs["diffloss_w"],
                        num_sampling_steps=kwargs["num_sampling_steps"])
    assert module_tree(loss) == reference_tree(ref, "diffloss.")  # no buffers: the schedules are not state
    assert num_params(loss) == ref["diffloss_params"] == ref["params_by_top_level_module"]["diffloss"]
    assert loss.gen_diffusion.num_timesteps == 100 and loss.train_diffusion.num_timesteps == 1000


def test_the_two_diffusions_are_mars():
    loss = DiffLoss(4, 6, depth=1, width=8, num_sampling_steps="25")
    train, gen = loss.train_diffusion, loss.gen_diffusion
    assert train.learn_sigma and gen.learn_sigma
    torch.testing.assert_close(train.betas, beta_schedule("cosine", 1000))
    kept = space_timesteps(1000, 25)
    assert gen.timestep_map.tolist() == kept
    torch.testing.assert_close(gen.alphas_cumprod, train.alphas_cumprod[kept], rtol=1e-9, atol=0)
    assert DiffLoss(4, 6, 1, 8, num_sampling_steps=25).gen_diffusion.timestep_map.tolist() == kept


def random_head(C=3, Z=5, width=16, depth=2, sampling_steps="20", seed=0):
    """A DiffLoss whose zero-initialised layers are randomised, so that every output channel is live."""
    torch.manual_seed(seed)
    loss = DiffLoss(C, Z, depth=depth, width=width, num_sampling_steps=sampling_steps)
    with torch.no_grad():
        for p in loss.parameters():
            p.normal_(0, 0.3)
    return loss


# --- the learned-range variance and the hybrid loss ------------------------------------------


def test_learned_range_ends_are_the_posterior_variance_and_beta():
    for diffusion in [GaussianDiffusion(beta_schedule("cosine", 1000), learn_sigma=True),
                      GaussianDiffusion(beta_schedule("cosine", 1000), learn_sigma=True).respace(50)]:
        t = torch.arange(1, diffusion.num_timesteps)
        ones = torch.ones(len(t), 2, dtype=torch.float64)
        low = diffusion.learned_range_log_variance(-ones, t).exp()[:, 0]
        high = diffusion.learned_range_log_variance(ones, t).exp()[:, 0]
        torch.testing.assert_close(low, diffusion.posterior_variance[1:])
        torch.testing.assert_close(high, diffusion.betas[1:])
        mid = diffusion.learned_range_log_variance(0 * ones, t).exp()[:, 0]
        torch.testing.assert_close(mid, (low * high).sqrt())  # the geometric mean
    assert diffusion.posterior_log_variance_clipped[0] == diffusion.posterior_log_variance_clipped[1]


def test_training_losses_mse_and_vb_by_hand():
    loss = random_head()
    diffusion, net = loss.train_diffusion, loss.net
    N, C = 6, 3
    x0, z, noise = torch.randn(N, C), torch.randn(N, 5), torch.randn(N, C)
    t = torch.tensor([0, 1, 10, 300, 700, 990])  # (the last betas are clipped: no closed form there)
    terms = diffusion.training_losses(net, x0, t=t, model_kwargs=dict(c=z), noise=noise)
    assert set(terms) == {"mse", "vb", "loss"} and all(v.shape == (N,) for v in terms.values())
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])

    # by hand, in float64, from the closed form of the cosine schedule
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    abar = torch.tensor([f((k + 1) / 1000) / f(0) for k in t.tolist()], dtype=torch.float64)[:, None]
    abar_prev = torch.tensor([f(k / 1000) / f(0) for k in t.tolist()], dtype=torch.float64)[:, None]
    beta = 1 - abar / abar_prev
    x0d, noised = x0.double(), noise.double()
    x_t = abar.sqrt() * x0d + (1 - abar).sqrt() * noised
    out = net(x_t.float(), t, z).double()
    eps, v = out[:, :C], out[:, C:]
    torch.testing.assert_close(terms["mse"], ((noised - eps) ** 2).mean(1).float(), rtol=1e-4, atol=1e-5)

    post_var = beta * (1 - abar_prev) / (1 - abar)

    def post_mean(x_start):
        return (beta * abar_prev.sqrt() * x_start + (1 - abar_prev) * (1 - beta).sqrt() * x_t) / (1 - abar)

    x0_hat = (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()
    log_low = torch.where(t[:, None] == 0, diffusion.posterior_variance[1], post_var).log()
    frac = (v + 1) / 2
    model_var = (frac * beta.log() + (1 - frac) * log_low).exp()
    p = torch.distributions.Normal(post_mean(x0_hat), model_var.sqrt())
    q = torch.distributions.Normal(post_mean(x0d), log_low.exp().sqrt())
    kl_bits = torch.distributions.kl_divergence(q, p).mean(1) / math.log(2)
    torch.testing.assert_close(terms["vb"][1:], kl_bits[1:].float(), rtol=2e-3, atol=1e-4)
    # t = 0: the discretised decoder NLL, -log P(x0 - 1/255 < X < x0 + 1/255) for |x0| < 0.999
    inside = x0d[0].abs() < 0.999
    assert inside.any()
    exact = -(p.cdf(x0d + 1 / 255) - p.cdf(x0d - 1 / 255)).log()[0]
    approx = -discretized_gaussian_log_likelihood(x0d, p.mean, p.stddev.log())[0]
    torch.testing.assert_close(approx[inside], exact[inside], rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(terms["vb"][0], (approx.mean() / math.log(2)).float(), rtol=1e-3, atol=1e-4)


def test_normal_kl_is_the_gaussian_kl():
    m1, m2, lv1, lv2 = torch.randn(4, 10, dtype=torch.float64)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, (0.5 * lv1).exp()),
                                                 torch.distributions.Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)


def test_vb_trains_only_the_variance_and_mse_only_the_mean():
    diffusion = GaussianDiffusion(beta_schedule("cosine", 1000), learn_sigma=True)
    x0, noise = torch.randn(8, 3), torch.randn(8, 3)
    t = torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(0))
    out = torch.randn(8, 6, requires_grad=True)
    terms = diffusion.training_losses(lambda x, t: out, x0, t=t, noise=noise)
    (grad_vb,) = torch.autograd.grad(terms["vb"].sum(), out)
    assert torch.all(grad_vb[:, :3] == 0) and torch.all(grad_vb[:, 3:].abs().sum(1) > 0)
    (grad_mse,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert torch.all(grad_mse[:, 3:] == 0)
    torch.testing.assert_close(diffusion.training_loss(lambda x, t: out, x0, t=t, noise=noise),
                               terms["loss"].mean())


def test_without_learn_sigma_nothing_changes():
    diffusion = GaussianDiffusion(beta_schedule("cosine", 1000))
    x0, noise, t = torch.randn(8, 3), torch.randn(8, 3), torch.randint(0, 1000, (8,))
    out = torch.randn(8, 6)
    terms = diffusion.training_losses(lambda x, t: out, x0, t=t, noise=noise)
    assert set(terms) == {"mse", "loss"}
    torch.testing.assert_close(terms["loss"], ((noise - out[:, :3]) ** 2).mean(1))
    torch.testing.assert_close(diffusion.training_loss(lambda x, t: out, x0, t=t, noise=noise),
                               ((noise - out[:, :3]) ** 2).mean())


# --- DiffLoss.forward ------------------------------------------------------------------------


def test_forward_is_the_mean_hybrid_loss_at_random_t():
    loss = random_head()
    target, z = torch.randn(10, 3), torch.randn(10, 5)
    torch.manual_seed(1)
    got = loss(target, z)
    torch.manual_seed(1)
    t = torch.randint(0, 1000, (10,))
    noise = torch.randn_like(target)
    terms = loss.train_diffusion.training_losses(loss.net, target, t=t, model_kwargs=dict(c=z), noise=noise)
    torch.testing.assert_close(got, terms["loss"].mean())
    assert got.requires_grad


def test_mask_weighting():
    loss = random_head()
    target, z = torch.randn(10, 3), torch.randn(10, 5)
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0, 1, 1], dtype=torch.float32)
    torch.manual_seed(2)
    got = loss(target, z, mask)
    torch.manual_seed(2)
    t = torch.randint(0, 1000, (10,))
    per_token = loss.train_diffusion.training_losses(loss.net, target, t=t, model_kwargs=dict(c=z),
                                                     noise=torch.randn_like(target))["loss"]
    torch.testing.assert_close(got, (per_token * mask).sum() / mask.sum())
    # tokens with mask 0 do not count: changing them leaves the loss as it is
    changed = target.clone()
    changed[mask == 0] = 100.0
    torch.manual_seed(2)
    torch.testing.assert_close(loss(changed, z, mask), got)
    torch.manual_seed(2)
    unmasked = loss(target, z)
    torch.manual_seed(2)
    torch.testing.assert_close(loss(target, z, torch.ones(10)), unmasked)


def test_a_small_head_learns_a_conditional_gaussian():
    torch.manual_seed(0)
    loss = DiffLoss(2, 4, depth=2, width=64, num_sampling_steps="50")
    opt = torch.optim.AdamW(loss.parameters(), lr=2e-3)
    z = torch.eye(4)[torch.arange(256) % 4]
    means = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])

    def eval_loss():
        torch.manual_seed(123)
        with torch.no_grad():
            return loss(means[z.argmax(1)] + 0.1 * torch.randn(256, 2), z).item()

    before = eval_loss()
    torch.manual_seed(1)
    for _ in range(80):
        batch = loss(means[z.argmax(1)] + 0.1 * torch.randn(256, 2), z)
        opt.zero_grad()
        batch.backward()
        opt.step()
    assert eval_loss() < 0.6 * before


# --- sampling --------------------------------------------------------------------------------

MU, S = torch.tensor([0.5, -1.0]), 0.3


class GaussianOracle(torch.nn.Module):
    """The exact eps and the exact reverse variance (as learned-range values) for data N(MU, S^2 I).

    For Gaussian data x_t ~ N(sqrt(abar) MU, abar S^2 + 1 - abar), so
    E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) MU) / (abar S^2 + 1 - abar), and the true
    q(x_{i-1} | x_i) has variance b~_i + coef_x0_i^2 Var(x_0 | x_i), which lies between b~_i and b_i.
    The sampling process is needed to turn that variance into the values v.
    """

    def __init__(self, process: GaussianDiffusion, mu=MU):
        super().__init__()
        self.process, self.mu = process, mu
        self.index = torch.full((1000,), -1)
        self.index[process.timestep_map] = torch.arange(process.num_timesteps)
        self.abar = GaussianDiffusion(beta_schedule("cosine", 1000)).alphas_cumprod

    def forward(self, x, t, c=None):
        i = self.index[t]
        abar = self.abar[t].view(-1, 1)
        mu = self.mu if c is None else c
        eps = (1 - abar).sqrt() * (x.double() - abar.sqrt() * mu) / (abar * S ** 2 + 1 - abar)
        var_x0 = S ** 2 * (1 - abar) / (abar * S ** 2 + 1 - abar)
        p = self.process
        variance = p.posterior_variance[i].view(-1, 1) + p.posterior_mean_coef_x0[i].view(-1, 1) ** 2 * var_x0
        low, high = p.posterior_log_variance_clipped[i].view(-1, 1), p.betas[i].log().view(-1, 1)
        v = 2 * (variance.log() - low) / (high - low) - 1
        return torch.cat([eps, v.expand_as(eps)], 1).float()


@pytest.mark.parametrize("steps", [250, 20])
def test_ddpm_with_the_learned_variance_samples_the_gaussian_exactly(steps):
    process = GaussianDiffusion(beta_schedule("cosine", 1000), learn_sigma=True).respace(steps)
    oracle = GaussianOracle(process)
    x = process.p_sample_loop(oracle, (4000, 2), seed=0)
    torch.testing.assert_close(x.mean(0), MU, atol=0.03, rtol=0)
    torch.testing.assert_close(x.std(0), torch.full((2,), S), atol=0.02, rtol=0)
    if steps == 20:  # with few steps the fixed small variance (v = -1) is too small: the spread shrinks
        small = process.p_sample_loop(lambda x, t: torch.cat([oracle(x, t)[:, :2], -torch.ones_like(x)], 1),
                                      (4000, 2), seed=0)
        assert torch.all(small.std(0) < 0.9 * S)


def test_temperature_zero_is_the_chain_of_posterior_means():
    loss = random_head()
    process, net = loss.gen_diffusion, loss.net
    z, start = torch.randn(7, 5), torch.randn(7, 3)
    got = process.p_sample_loop(net, (7, 3), model_kwargs=dict(c=z), noise=start, seed=0, temperature=0.0)
    again = process.p_sample_loop(net, (7, 3), model_kwargs=dict(c=z), noise=start, seed=99, temperature=0.0)
    assert torch.equal(got, again)
    x = start
    with torch.no_grad():
        for i in reversed(range(process.num_timesteps)):
            t = torch.full((7,), i)
            eps = net(x, process.timestep_map[t], z)[:, :3]
            x0_hat = process.predict_x0_from_eps(x, t, eps)
            x, _ = process.q_posterior_mean_variance(x0_hat, x, t)
    torch.testing.assert_close(got, x)
    # with temperature 1 the seed matters
    assert not torch.allclose(process.p_sample_loop(net, (7, 3), model_kwargs=dict(c=z), noise=start, seed=0),
                              process.p_sample_loop(net, (7, 3), model_kwargs=dict(c=z), noise=start, seed=1))


def test_temperature_concentrates_the_samples_around_the_mean():
    process = GaussianDiffusion(beta_schedule("cosine", 1000), learn_sigma=True).respace(50)
    oracle = GaussianOracle(process)
    spreads = [process.p_sample_loop(oracle, (2000, 2), seed=0, temperature=tau).std(0).mean().item()
               for tau in (1.0, 0.5, 0.0)]
    assert spreads[0] > spreads[1] > spreads[2]
    zero = process.p_sample_loop(oracle, (2000, 2), seed=0, temperature=0.0)
    torch.testing.assert_close(zero.mean(0), MU, atol=0.02, rtol=0)


def test_point_mass_oracle_through_diffloss_sample():
    """A head that predicts the exact eps of a point mass at c[:, :C] gives back c[:, :C], at any temperature."""
    loss = DiffLoss(3, 3, depth=1, width=8, num_sampling_steps="30")
    abar_all = loss.train_diffusion.alphas_cumprod

    class PointMass(torch.nn.Module):
        in_channels = 3

        def forward(self, x, t, c):
            abar = abar_all[t].float().view(-1, 1)
            return torch.cat([(x - abar.sqrt() * c) / (1 - abar).sqrt(), torch.zeros_like(x)], 1)

        def forward_with_cfg(self, x, t, c, cfg_scale):
            return SimpleMLPAdaLN.forward_with_cfg(self, x, t, c, cfg_scale)

    loss.net = PointMass()
    z = torch.randn(5, 3)
    torch.manual_seed(0)
    for temperature in (1.0, 0.3, 0.0):
        torch.testing.assert_close(loss.sample(z, temperature=temperature), z, atol=1e-3, rtol=0)
    # guided with the same condition in both halves: guidance changes nothing
    torch.testing.assert_close(loss.sample(torch.cat([z, z]), cfg=4.0)[:5], z, atol=1e-3, rtol=0)


def test_cfg_scale_one_equals_the_conditional_model():
    loss = random_head()
    process, net = loss.gen_diffusion, loss.net
    z, null = torch.randn(4, 5), torch.randn(1, 5).expand(4, 5)
    start = torch.randn(4, 3)
    guided = process.p_sample_loop(net.forward_with_cfg, (8, 3),
                                   model_kwargs=dict(c=torch.cat([z, null]), cfg_scale=1.0),
                                   noise=torch.cat([start, start]), temperature=0.0)
    plain = process.p_sample_loop(net, (4, 3), model_kwargs=dict(c=z), noise=start, temperature=0.0)
    torch.testing.assert_close(guided[:4], plain)
    # and DiffLoss.sample with cfg != 1 runs the guided model on the doubled batch
    torch.manual_seed(0)
    out = loss.sample(torch.cat([z, null]), temperature=0.0, cfg=3.0)
    torch.manual_seed(0)
    noise = torch.randn(4, 3)
    expected = process.p_sample_loop(net.forward_with_cfg, (8, 3),
                                     model_kwargs=dict(c=torch.cat([z, null]), cfg_scale=3.0),
                                     noise=torch.cat([noise, noise]), temperature=0.0)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(out[:4], plain)


def test_sample_uses_the_respaced_schedule_with_original_timesteps():
    loss = random_head(sampling_steps="10")
    seen = []
    forward = loss.net.forward
    loss.net.forward = lambda x, t, c: seen.append(t[0].item()) or forward(x, t, c)
    out = loss.sample(torch.randn(3, 5))
    assert out.shape == (3, 3) and seen == space_timesteps(1000, 10)[::-1]


# --- bad input -------------------------------------------------------------------------------


def test_bad_input_is_explained():
    loss = random_head()
    target, z = torch.randn(4, 3), torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"target tokens \(N, 3\)"):
        loss(torch.randn(4, 3, 1), z)
    with pytest.raises(ValueError, match=r"conditions z \(4, 5\)"):
        loss(target, torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"conditions z \(4, 5\)"):
        loss(target, torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"mask \(N,\) = \(4,\)"):
        loss(target, z, torch.ones(4, 1))
    with pytest.raises(ValueError, match=r"conditions z \(N, 5\)"):
        loss.sample(torch.randn(4))
    with pytest.raises(ValueError, match="even batch"):
        loss.sample(torch.randn(3, 5), cfg=2.0)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        loss.sample(z, temperature=-1.0)
    with pytest.raises(ValueError, match="num_sampling_steps must be a number"):
        DiffLoss(3, 5, 1, 8, num_sampling_steps="ddim25")
    with pytest.raises(ValueError, match="width must be a positive int"):
        DiffLoss(3, 5, 1, 0)
    diffusion = GaussianDiffusion(beta_schedule("cosine", 100), learn_sigma=True)
    with pytest.raises(ValueError, match=r"with learn_sigma the model must return 2 x 3 channels"):
        diffusion.training_losses(lambda x, t: x, torch.randn(4, 3), t=torch.zeros(4, dtype=torch.long))


def test_sample_can_clamp_x0_hat():
    loss = random_head()
    z = torch.randn(6, 5)
    torch.manual_seed(0)
    clipped = loss.sample(z, clip_denoised=True)
    torch.manual_seed(0)
    noise = torch.randn(6, 3)
    expected = loss.gen_diffusion.p_sample_loop(loss.net, (6, 3), model_kwargs=dict(c=z), noise=noise,
                                                clip_denoised=True)
    torch.testing.assert_close(clipped, expected)
    assert clipped.abs().max() <= 1  # the last step returns the clamped x0_hat itself


def test_the_start_noise_comes_from_the_cpu_generator():
    """As in the official code (``torch.randn(...).cuda()``): the CPU stream, then moved."""
    torch.manual_seed(0)
    expected = torch.randn(4, 3)
    torch.manual_seed(0)
    assert torch.equal(draw_on_cpu(torch.randn, (4, 3), "cpu"), expected)
    out = draw_on_cpu(torch.randn, (4, 3), "meta")
    assert out.device.type == "meta" and out.shape == (4, 3)
