"""MeanFlow (Geng et al. 2025): the jvp total derivative, the target, the loss, the samplers."""

import pytest
import torch

from minilib.adaln import TinyDenoiser
from minilib.dit import DiT
from minilib.meanflow import (GaussianAverageVelocity, MeanFlowDenoiser, meanflow_loss, meanflow_target,
                              sample_few_steps, sample_one_step, sample_two_times, total_derivative)


def small_denoiser(dtype=torch.float64, seed=0, **kwargs) -> MeanFlowDenoiser:
    """A tiny TinyDenoiser with two times, every weight random (adaLN-Zero would start at 0)."""
    torch.manual_seed(seed)
    backbone = TinyDenoiser(image_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                            num_classes=3, class_dropout_prob=0.0)
    model = MeanFlowDenoiser(backbone, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.to(dtype).eval()


def test_two_times_follow_the_official_sampler():
    torch.manual_seed(0)
    r, t = sample_two_times(1000)
    assert r.shape == t.shape == (1000,) and r.dtype == torch.float32
    assert ((0 < r) & (r <= t) & (t < 1)).all()
    assert (r == t).sum() >= 750 and (r[:750] == t[:750]).all()  # the first 75 %: flow matching
    assert (r[750:] < t[750:]).all()
    r, t = sample_two_times(8, fraction_r_neq_t=1.0, dtype=torch.float64)
    assert (r < t).all() and t.dtype == torch.float64
    r, t = sample_two_times(8, fraction_r_neq_t=0.0)
    assert torch.equal(r, t)
    # t = max of two logit-normal times with mean -0.4: most of the mass below 1/2, but above the median of one
    _, t = sample_two_times(20000, fraction_r_neq_t=1.0)
    assert 0.45 < t.median() < 0.6
    with pytest.raises(ValueError, match="fraction_r_neq_t"):
        sample_two_times(8, fraction_r_neq_t=1.5)


def finite_difference_du_dt(model, z, r, t, v, y, delta=1e-3):
    """du/dt along z(t + d) = z + d v with r fixed, by a central difference: (B, ...) like z."""
    ahead, behind = model(z + delta * v, r, t + delta, y), model(z - delta * v, r, t - delta, y)
    return (ahead - behind) / (2 * delta)


def test_jvp_is_the_total_derivative_along_the_path_of_a_network():
    # time_scale 1 (the official scale): the sinusoidal features are computed in float32
    # (timestep_embedding), so a finite difference in t needs a step well above float32 rounding.
    model = small_denoiser(time_scale=1.0)
    torch.manual_seed(1)
    z, v = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.randn(3, 1, 8, 8, dtype=torch.float64)
    r, t = torch.tensor([0.1, 0.3, 0.5], dtype=torch.float64), torch.tensor([0.4, 0.7, 0.6], dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    u, du_dt = total_derivative(model, z, r, t, v, y=y)
    assert torch.allclose(u, model(z, r, t, y))
    assert torch.allclose(du_dt, finite_difference_du_dt(model, z, r, t, v, y), atol=5e-5)
    assert du_dt.abs().max() > 0.1  # not trivially zero


def test_jvp_is_the_total_derivative_along_the_true_curved_path():
    exact = GaussianAverageVelocity(mu=1.5, s=0.3).double()
    torch.manual_seed(2)
    z = torch.randn(4, 2, dtype=torch.float64)
    r, t = torch.full((4,), 0.2, dtype=torch.float64), torch.full((4,), 0.7, dtype=torch.float64)
    _, du_dt = total_derivative(exact, z, r, t, exact.velocity(z, t))

    def along_path(tau):  # the flow's own path through z at time t, evaluated at time tau
        tau = torch.full((4, 1), tau, dtype=torch.float64)
        z_tau = (1 - tau) * 1.5 + exact.sigma(tau) / exact.sigma(t[:, None]) * (z - (1 - t[:, None]) * 1.5)
        return exact(z_tau, r, tau[:, 0])

    delta = 1e-5
    fd = (along_path(0.7 + delta) - along_path(0.7 - delta)) / (2 * delta)
    assert torch.allclose(du_dt, fd, atol=1e-8)
    assert du_dt.abs().max() > 1e-2  # the path is curved: u changes along it


def test_the_exact_average_velocity_obeys_the_meanflow_identity():
    """u = v - (t - r) du/dt, and the definition u = (z_t - z_r) / (t - r)."""
    exact = GaussianAverageVelocity(mu=torch.tensor([1.0, -2.0]), s=0.5).double()
    torch.manual_seed(3)
    z = torch.randn(5, 2, dtype=torch.float64)
    r, t = torch.rand(5, dtype=torch.float64) * 0.5, 0.5 + torch.rand(5, dtype=torch.float64) * 0.5
    u, target = meanflow_target(exact, z, r, t, exact.velocity(z, t))
    assert torch.allclose(u, target, atol=1e-12)
    z_r = z - (t - r)[:, None] * u  # the one-step jump lands on the path
    assert torch.allclose(exact(z_r, r, r), exact.velocity(z_r, r))  # r = t: the limit is v
    assert torch.allclose(exact(z, t, t), exact.velocity(z, t))


def test_with_r_equal_to_t_the_target_is_the_flow_matching_velocity():
    model = small_denoiser()
    torch.manual_seed(4)
    z, v = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.randn(2, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.3, 0.9], dtype=torch.float64)
    u, target = meanflow_target(model, z, t, t, v, y=torch.tensor([0, 1]))
    assert torch.equal(target, v)
    assert not target.requires_grad and u.requires_grad  # stop-gradient on the target only
    assert torch.allclose(u, model.velocity(z, t, torch.tensor([0, 1])))


def test_the_exact_average_velocity_has_zero_loss_and_a_wrong_one_does_not():
    exact = GaussianAverageVelocity(mu=0.8, s=0.4).double()
    torch.manual_seed(5)
    x0 = 0.8 + 0.4 * torch.randn(256, 3, dtype=torch.float64)
    for p in (0.0, 0.5, 1.0):
        assert meanflow_loss(exact, x0, velocity=exact.velocity, p=p, fraction_r_neq_t=1.0) < 1e-20

    class InstantaneousOnly(torch.nn.Module):  # ignores r: right only at r = t
        def forward(self, z, r, t):
            return exact.velocity(z, t)

    wrong = meanflow_loss(InstantaneousOnly(), x0, velocity=exact.velocity, p=0.0, fraction_r_neq_t=1.0)
    assert wrong > 1e-3
    assert meanflow_loss(InstantaneousOnly(), x0, velocity=exact.velocity, fraction_r_neq_t=0.0) < 1e-20


def test_adaptive_weighting_with_p_zero_is_the_summed_squared_error():
    model = small_denoiser(dtype=torch.float32)
    x0, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    torch.manual_seed(6)
    plain = meanflow_loss(model, x0, {"y": y}, p=0.0)
    torch.manual_seed(6)  # the same draws by hand
    r, t = sample_two_times(6)
    noise = torch.randn_like(x0)
    z = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
    u, target = meanflow_target(model, z, r, t, noise - x0, y=y)
    d = (u - target).pow(2).flatten(1).sum(1)
    assert torch.allclose(plain, d.mean())
    torch.manual_seed(6)
    weighted = meanflow_loss(model, x0, {"y": y}, p=1.0, eps=0.01)
    assert torch.allclose(weighted, (d / (d + 0.01)).mean())


def test_gradients_of_the_loss_reach_every_parameter_and_match_a_plain_forward():
    model = small_denoiser(dtype=torch.float32).train()
    x0, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    torch.manual_seed(7)
    meanflow_loss(model, x0, {"y": y}).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # the u of the jvp is an ordinary differentiable output: same gradients as a plain forward
    z, r, t, v = torch.randn(2, 1, 8, 8), torch.tensor([0.2, 0.1]), torch.tensor([0.6, 0.9]), torch.randn(2, 1, 8, 8)
    model.zero_grad()
    u, _ = total_derivative(model, z, r, t, v, y=y[:2])
    u.square().sum().backward()
    from_jvp = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(z, r, t, y[:2]).square().sum().backward()
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(from_jvp, model.parameters()))


def test_one_step_with_the_exact_average_velocity_lands_on_the_data_distribution():
    exact = GaussianAverageVelocity(mu=torch.tensor([2.0, -1.0]), s=0.25)
    torch.manual_seed(8)
    noise = torch.randn(20000, 2)
    x = sample_one_step(exact, noise)
    assert torch.allclose(x, torch.tensor([2.0, -1.0]) + 0.25 * noise, atol=1e-5)  # z_0 = mu + s z_1
    assert torch.allclose(x.mean(0), torch.tensor([2.0, -1.0]), atol=0.01)
    assert torch.allclose(x.std(0), torch.tensor([0.25, 0.25]), atol=0.005)
    # exact jumps stay on the path: 1, 3 or 10 steps give the same sample
    for steps in (3, 10):
        assert torch.allclose(sample_few_steps(exact, noise[:100], steps=steps), x[:100], atol=1e-5)
    # the instantaneous velocity with one Euler step does not: the path is curved
    euler = noise[:100] - exact.velocity(noise[:100], torch.ones(100))
    assert (euler - x[:100]).abs().max() > 0.1


def test_samplers_with_a_network_give_the_right_shapes():
    model = small_denoiser(dtype=torch.float32)
    noise, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    assert sample_one_step(model, noise, {"y": y}).shape == (5, 1, 8, 8)
    assert sample_few_steps(model, noise, steps=4, model_kwargs={"y": y}).shape == (5, 1, 8, 8)
    out = sample_few_steps(model, noise, model_kwargs={"y": y}, times=torch.tensor([1.0, 0.6, 0.0]))
    assert out.shape == (5, 1, 8, 8) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="steps must be a positive int"):
        sample_few_steps(model, noise, steps=0, model_kwargs={"y": y})
    with pytest.raises(ValueError, match="decrease strictly"):
        sample_few_steps(model, noise, model_kwargs={"y": y}, times=torch.tensor([0.0, 1.0]))


def test_the_two_time_wrapper_reuses_the_backbone_and_checks_its_inputs():
    model = small_denoiser(dtype=torch.float32)
    assert model.time_scale == 1.0  # the official model feeds its times unscaled
    backbone = model.backbone
    z, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    t = torch.tensor([0.5, 0.25])
    # h = t - r = 0 and a zero h_embedder bias: the backbone with one extra constant in c
    with torch.no_grad():
        before = model(z, t, t, y)
        c = backbone.t_embedder(t) + model.h_embedder(torch.zeros(2)) + backbone.y_embedder(y)  # unscaled
        tokens = backbone.x_embedder(z) + backbone.pos_embed
        for block in backbone.blocks:
            tokens = block(tokens, c)
        from minilib.patch_embed import unpatchify
        assert torch.allclose(before, unpatchify(backbone.final_layer(tokens, c), 4, 1), atol=1e-6)
    r_model = small_denoiser(dtype=torch.float32, second_time="r")
    assert r_model(z, t / 2, t, y).shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="t - r"):
        model(z, t, t / 2, y)  # r > t
    with pytest.raises(ValueError, match="MeanFlowDenoiser: t must lie"):
        model(z, t, t * 4, y)
    with pytest.raises(ValueError, match="adaLN-Zero backbone"):
        MeanFlowDenoiser(TinyDenoiser(image_size=8, conditioning="in_context"))
    with pytest.raises(ValueError, match="learn_sigma"):
        MeanFlowDenoiser(DiT(input_size=8, patch_size=4, in_channels=2, hidden_size=32, depth=1, num_heads=2,
                             num_classes=3))
    with pytest.raises(ValueError, match="second_time"):
        MeanFlowDenoiser(backbone, second_time="r-t")


def test_a_dit_backbone_works_too():
    torch.manual_seed(9)
    dit = DiT(input_size=8, patch_size=4, in_channels=2, hidden_size=32, depth=2, num_heads=2, num_classes=3,
              learn_sigma=False, class_dropout_prob=0.0)
    model = MeanFlowDenoiser(dit)
    x0, y = torch.randn(4, 2, 8, 8), torch.tensor([0, 1, 2, 0])
    loss = meanflow_loss(model, x0, {"y": y})
    loss.backward()
    assert loss > 0 and model.backbone.final_layer.linear.weight.grad.abs().sum() > 0
    assert sample_one_step(model, torch.randn(4, 2, 8, 8), {"y": y}).shape == (4, 2, 8, 8)


def test_few_step_sampling_never_waits_for_the_device():
    """On PyTorch's meta device any read-back (.item(), bool(tensor)) raises: the loop has none."""
    model = small_denoiser(dtype=torch.float32).to("meta")
    noise, y = torch.randn(2, 1, 8, 8, device="meta"), torch.tensor([0, 1], device="meta")
    out = sample_few_steps(model, noise, steps=3, model_kwargs={"y": y})
    assert out.device.type == "meta" and out.shape == (2, 1, 8, 8)


def test_meanflow_target_equals_the_finite_difference_estimate_of_the_total_derivative():
    """target = v - (t - r) du/dt, with du/dt estimated by a central difference along z(t + d) = z + d v, r fixed."""
    model = small_denoiser(time_scale=1.0)
    torch.manual_seed(6)
    z, v = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.randn(3, 1, 8, 8, dtype=torch.float64)
    r, t = torch.tensor([0.0, 0.2, 0.45], dtype=torch.float64), torch.tensor([0.9, 0.6, 0.5], dtype=torch.float64)
    y = torch.tensor([2, 0, 1])
    u, target = meanflow_target(model, z, r, t, v, y=y)
    with torch.no_grad():
        estimate = v - (t - r)[:, None, None, None] * finite_difference_du_dt(model, z, r, t, v, y)
    assert torch.allclose(target, estimate, atol=5e-5)
    assert (target - v).abs().max() > 0.05  # the correction is not negligible
    assert torch.allclose(u, model(z, r, t, y))
