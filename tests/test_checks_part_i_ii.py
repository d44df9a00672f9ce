"""The assignments of chapters 1 to 6 (and the interlude 5b): realistic wrong answers fail with their hints.

tests/test_checks.py already runs every check on its right answer (visible and
hidden inputs) and on a NotImplementedError; here each check of these chapters
meets at least two wrong answers a student could write, and the checks with
parts give partial credit part by part.
"""

import torch

from minilib import checks
from minilib.adaln import modulate

from check_helpers import fails_with, parts_passed


# --- chapter 3: the adaLN-Zero block ----------------------------------------------------------


def dit_block(order=(0, 1, 2, 3, 4, 5), gates=True, second_reads_input=False):
    """A DiTBlock.forward written by hand, with optional mistakes."""
    def forward(block, x, c):
        six = block.adaLN_modulation(c).chunk(6, dim=1)
        shift1, scale1, gate1, shift2, scale2, gate2 = (six[k] for k in order)
        g1, g2 = (gate1.unsqueeze(1), gate2.unsqueeze(1)) if gates else (1, 1)
        h = x + g1 * block.attn(modulate(block.norm1(x), shift1, scale1))
        return h + g2 * block.mlp(modulate(block.norm2(x if second_reads_input else h), shift2, scale2))
    return forward


def test_dit_block_by_hand_passes_and_its_mistakes_get_their_hints():
    checks.check_dit_block(dit_block(), hidden=True)
    message = fails_with(checks.check_dit_block, dit_block(gates=False), "multiply each residual branch by its gate",
                         "✗ adaLN-Zero at initialisation")
    assert "✗ random blocks" in message
    fails_with(checks.check_dit_block, dit_block(order=(1, 0, 2, 4, 3, 5)), "shift_msa, scale_msa, gate_msa")
    fails_with(checks.check_dit_block, dit_block(second_reads_input=True), "norm2 is applied to the updated x")


def test_dit_block_gates_without_a_token_axis_crash_with_a_hint_and_scale_only_mistakes_score_partially():
    def no_unsqueeze(block, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = block.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1 * block.attn(modulate(block.norm1(x), shift1, scale1))
        return x + gate2 * block.mlp(modulate(block.norm2(x), shift2, scale2))

    fails_with(checks.check_dit_block, no_unsqueeze, "raised RuntimeError", "gate.unsqueeze(1)")
    # swapping shift and scale goes unnoticed where both are zero: the block as built still earns its point
    assert parts_passed(checks.check_dit_block, dit_block(order=(1, 0, 2, 4, 3, 5))) == {
        "random blocks": False, "adaLN-Zero at initialisation: the identity": True, "hidden inputs": False}


# --- chapter 5: the forward process, DDIM, classifier-free guidance ----------------------------


def guided(sign=1.0, w_is_scale=False, null=True, channels=True):
    """A hand-written guided eps, with optional mistakes."""
    def my_guided_eps(model, x, t, y, null_class, scale):
        labels = torch.cat([y, torch.full_like(y, null_class) if null else y])
        out = model(torch.cat([x, x]), torch.cat([t, t]), y=labels)
        cond, uncond = (out[:, : x.shape[1]] if channels else out).chunk(2)
        if w_is_scale:
            return cond + scale * (cond - uncond)
        return uncond + scale * (cond - uncond) if sign > 0 else cond + scale * (uncond - cond)
    return my_guided_eps


def test_guided_eps_by_hand_passes_and_its_mistakes_get_their_hints():
    checks.check_guided_eps(guided(), hidden=True)
    fails_with(checks.check_guided_eps, guided(sign=-1.0), "start from the UNconditional prediction")
    fails_with(checks.check_guided_eps, guided(w_is_scale=True), "their w is scale - 1")
    fails_with(checks.check_guided_eps, guided(null=False), "give it the null class")


def test_guided_eps_keeping_the_variance_channels_loses_only_those_parts():
    fails_with(checks.check_guided_eps, guided(channels=False), "variance channels", "expected shape (3, 3, 4, 4)")
    assert parts_passed(checks.check_guided_eps, guided(channels=False)) == {
        "guided noise": True, "edge scales: 1 is conditional, 0 unconditional": True,
        "a model with variance channels (learn_sigma)": False, "hidden inputs": False}


def test_guided_eps_with_one_t_for_both_halves_crashes_with_a_hint():
    def my_guided_eps(model, x, t, y, null_class, scale):
        out = model(torch.cat([x, x]), t, y=torch.cat([y, torch.full_like(y, null_class)]))
        cond, uncond = out[:, : x.shape[1]].chunk(2)
        return uncond + scale * (cond - uncond)

    fails_with(checks.check_guided_eps, my_guided_eps, "raised RuntimeError", "t2 = cat([t, t])")


def test_q_sample_and_ddim_step_hidden_inputs_catch_an_answer_tuned_to_the_visible_ones():
    def q_sample_in_float32(process, x0, t, noise):  # float32 square roots are close enough for q_sample
        abar = process.alphas_cumprod[t].to(x0.dtype).view(-1, *[1] * (x0.ndim - 1))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    assert checks.grade(checks.check_q_sample, q_sample_in_float32).passed
    fails_with(checks.check_q_sample, lambda process, x0, t, noise: process.q_sample(x0, t.flip(0), noise),
               "wrong answer on input 1 of 3")

    def ddim_no_t0(process, x_t, t, x0):  # uses abar[t - 1] everywhere: wrong at t = 0, also in the hidden part
        view = (-1,) + (1,) * (x_t.ndim - 1)
        abar, prev = process.alphas_cumprod[t], process.alphas_cumprod[t - 1]
        eps = (x_t - abar.sqrt().to(x_t.dtype).view(view) * x0) / (1 - abar).sqrt().to(x_t.dtype).view(view)
        return prev.sqrt().to(x_t.dtype).view(view) * x0 + (1 - prev).sqrt().to(x_t.dtype).view(view) * eps

    assert not checks.grade(checks.check_ddim_step, ddim_no_t0).parts[-1].passed


# --- interlude 5b: the velocity from eps, DDIM with eta = 1 -------------------------------------


def ddim_eta_step(sigma_power=0.5, eps_keeps_all=False, fresh_noise=True, uses_eta=True):
    """DDIM's step written by hand, with optional mistakes."""
    def my_ddim_eta_step(x_t, eps, abar_t, abar_prev, eta, z):
        eta = eta if uses_eta else 1.0
        sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** sigma_power
        x0_hat = (x_t - (1 - abar_t) ** 0.5 * eps) / abar_t ** 0.5
        eps_scale = (1 - abar_prev) ** 0.5 if eps_keeps_all else (1 - abar_prev - sigma ** 2) ** 0.5
        return abar_prev ** 0.5 * x0_hat + eps_scale * eps + (sigma * z if fresh_noise else 0)
    return my_ddim_eta_step


def test_ddim_eta_step_by_hand_passes_and_its_mistakes_get_their_hints():
    checks.check_ddim_eta_step(ddim_eta_step(), hidden=True)
    fails_with(checks.check_ddim_eta_step, ddim_eta_step(sigma_power=1.0), "sigma is a standard deviation")
    fails_with(checks.check_ddim_eta_step, ddim_eta_step(eps_keeps_all=True), "sqrt(1 - abar_prev - sigma^2) eps")
    fails_with(checks.check_ddim_eta_step, ddim_eta_step(fresh_noise=False), "add the fresh noise sigma * z")


def test_ddim_eta_step_always_at_eta_one_earns_the_ddpm_part_only():
    wrong = ddim_eta_step(uses_eta=False)
    fails_with(checks.check_ddim_eta_step, wrong, "sigma scales with eta", "✓ eta = 1 is DDPM's posterior step")
    report = checks.grade(checks.check_ddim_eta_step, wrong)
    assert (report.score, report.max_score) == (2, 5)


def test_velocity_from_eps_rejects_a_rectified_flow_only_answer_on_visible_and_hidden_inputs():
    def rectified_flow_only(x_t, eps, a, b, da, db):  # v = eps - x0_hat, whatever the coefficients
        return eps - (x_t - b * eps) / a

    fails_with(checks.check_velocity_from_eps, rectified_flow_only, "input 2 of 3")
    report = checks.grade(checks.check_velocity_from_eps, rectified_flow_only)
    assert [part.passed for part in report.parts] == [False, False]  # the hidden cosine-like path too


# --- chapter 6: the ODE slope, one Euler step, the exact Gaussian field, a sampling grid ------


def gaussian_velocity(sign=1.0, noise_variance_power=2, centre=True, divide_by_t=False):
    """The exact Gaussian field written by hand, with optional mistakes."""
    def my_gaussian_velocity(x, t, mean, std):
        t = t.to(x.dtype)[:, None]
        variance = (1 - t) ** 2 * std ** 2 + t ** noise_variance_power
        centred = x - (1 - t) * mean if centre else x - mean
        x0_mean = mean + (1 - t) * std ** 2 / variance * centred
        if divide_by_t:
            return (x - x0_mean) / t
        return sign * (t / variance * centred - x0_mean)
    return my_gaussian_velocity


def test_gaussian_velocity_by_hand_passes_and_its_mistakes_get_their_hints():
    checks.check_gaussian_velocity(gaussian_velocity(), hidden=True)
    fails_with(checks.check_gaussian_velocity, gaussian_velocity(sign=-1.0), "not x0 - eps")
    fails_with(checks.check_gaussian_velocity, gaussian_velocity(noise_variance_power=1), "its variance is t^2")
    fails_with(checks.check_gaussian_velocity, gaussian_velocity(centre=False), "x - (1 - t) mean")


def test_gaussian_velocity_dividing_by_t_loses_only_the_end_points():
    wrong = gaussian_velocity(divide_by_t=True)
    fails_with(checks.check_gaussian_velocity, wrong, "divides by zero at t = 0", "✓ inside times")
    assert parts_passed(checks.check_gaussian_velocity, wrong) == {
        "inside times": True, "the ends t = 0 and t = 1": False, "special data": True, "hidden inputs": False}


def test_sampling_schedule_grades_the_error_against_its_targets():
    from minilib.flow import sigmas, time_snr_shift

    def grid(shift):
        return lambda steps: time_snr_shift(shift, torch.linspace(1, 0, steps + 1))

    checks.check_sampling_schedule(grid(0.1), hidden=True)
    checks.check_sampling_schedule(lambda steps: torch.tensor([1.0, 0.1, 0.05, 0.02, 0.0]))  # another answer
    fails_with(checks.check_sampling_schedule, lambda steps: torch.linspace(1, 0, steps + 1),
               "expected an Euler error below 0.6", "it is 1.06", "put more levels close to 0")
    fails_with(checks.check_sampling_schedule, lambda steps: sigmas(steps, shift=3.0), "try a shift below 1")
    # a shift of 0.2 reaches the first target only: partial credit
    assert parts_passed(checks.check_sampling_schedule, grid(0.2)) == {
        "4 steps, error below 0.6": True, "4 steps, error below 0.45": False, "hidden inputs": False}


def test_sampling_schedule_rejects_grids_that_are_not_grids():
    fails_with(checks.check_sampling_schedule, lambda steps: torch.linspace(0, 1, steps + 1), "starts at 1")
    fails_with(checks.check_sampling_schedule, lambda steps: torch.tensor([1.0, 0.1, 0.2, 0.05, 0.0]),
               "decrease strictly")
    fails_with(checks.check_sampling_schedule, lambda steps: torch.linspace(1, 0, steps), "expected 5 levels")


def test_to_d_and_euler_step_more_wrong_answers():
    fails_with(checks.check_to_d, lambda x, sigma, denoised: (x - denoised) * sigma.reshape(-1, *[1] * (x.ndim - 1)),
               "wrong answer on input 1 of 3")

    def divides_by_next(denoiser, x, sigma, sigma_next):
        return x + (sigma_next - sigma) * (x - denoiser(x, sigma * torch.ones(len(x)))) / sigma_next

    fails_with(checks.check_euler_step, divides_by_next, "the slope uses the current level")
    fails_with(checks.check_euler_step, lambda denoiser, x, sigma, sigma_next: denoiser(x, sigma * torch.ones(len(x))),
               "does not jump to the denoised image")


# --- chapter 2: the timestep embedding, label dropout -------------------------------------------


def label_dropout(null_offset=0, keep_prob=False, use_force=True, also_random=False):
    """Label dropout written by hand, with optional mistakes."""
    def my_label_dropout(labels, num_classes, dropout_prob, generator, force_drop_ids=None):
        if force_drop_ids is None or not use_force or also_random:
            u = torch.rand(labels.shape[0], generator=generator)
            drop = u > dropout_prob if keep_prob else u < dropout_prob
            if force_drop_ids is not None and also_random:
                drop = drop | (force_drop_ids == 1)
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, num_classes + null_offset), labels)
    return my_label_dropout


def test_label_dropout_by_hand_passes_and_its_mistakes_get_their_hints():
    checks.check_label_dropout(label_dropout(), hidden=True)
    fails_with(checks.check_label_dropout, label_dropout(null_offset=-1), "index num_classes (one past")
    fails_with(checks.check_label_dropout, label_dropout(keep_prob=True), "not kept")
    fails_with(checks.check_label_dropout, label_dropout(also_random=True), "it decides alone")


def test_label_dropout_ignoring_the_forced_ids_loses_only_that_part():
    wrong = label_dropout(use_force=False)
    fails_with(checks.check_label_dropout, wrong, "drop exactly where it is 1", "✓ random dropout")
    assert parts_passed(checks.check_label_dropout, wrong) == {
        "random dropout": True, "forced dropout (sampling with guidance)": False, "hidden inputs": False}


def test_label_dropout_that_ignores_the_generator_is_told_to_use_it():
    def global_rng(labels, num_classes, dropout_prob, generator, force_drop_ids=None):
        drop = torch.rand(labels.shape[0]) < dropout_prob if force_drop_ids is None else force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, num_classes), labels)

    fails_with(checks.check_label_dropout, global_rng, "torch.rand(len(labels), generator=generator)")


def test_timestep_embedding_hidden_inputs_and_one_more_wrong_answer():
    def sin_first(t, dim, max_period=10000):
        half = dim // 2
        args = t[:, None].float() * max_period ** (-torch.arange(half) / half)[None]
        return torch.cat([args.sin(), args.cos(), torch.zeros(len(t), dim % 2)], dim=-1)

    fails_with(checks.check_timestep_embedding, sin_first, "the cosines come first")

    def ignores_max_period(t, dim, max_period=10000):
        from minilib.timestep import timestep_embedding
        return timestep_embedding(t, dim)

    fails_with(checks.check_timestep_embedding, ignores_max_period, "use the max_period argument")
    assert not checks.grade(checks.check_timestep_embedding, ignores_max_period).parts[-1].passed  # hidden too


# --- chapter 4: the reparameterised sample, the KL term, the VAE loss --------------------------


def vae_loss(batch_reduce="mean", pixel_reduce="sum", weighted=True, root=False):
    """The VAE loss written by hand, with optional mistakes."""
    def my_vae_loss(recon, x, mean, logvar, kl_weight, reconstruction="l1"):
        error = (x - recon).abs() if reconstruction == "l1" else (x - recon).pow(2)
        per_image = error.flatten(1).sum(1) if pixel_reduce == "sum" else error.flatten(1).mean(1)
        if root and reconstruction == "mse":
            per_image = per_image.sqrt()
        logvar = logvar.clamp(-30.0, 20.0)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)
        rec, kl = (per_image.mean(), kl.mean()) if batch_reduce == "mean" else (per_image.sum(), kl.sum())
        return rec + (kl_weight if weighted else 1.0) * kl, rec, kl
    return my_vae_loss


def test_vae_loss_by_hand_passes_and_its_mistakes_get_their_hints():
    checks.check_vae_loss(vae_loss(), hidden=True)
    fails_with(checks.check_vae_loss, vae_loss(batch_reduce="sum"), "average over the batch")
    fails_with(checks.check_vae_loss, vae_loss(weighted=False), "multiply the KL term by kl_weight")


def test_vae_loss_partial_mistakes_lose_only_their_parts():
    assert parts_passed(checks.check_vae_loss, vae_loss(root=True)) == {
        "L1 reconstruction": True, "squared error (reconstruction='mse')": False, "the KL weight": True,
        "hidden inputs": False}
    fails_with(checks.check_vae_loss, vae_loss(root=True), "with no square root")
    # a mean over the pixels instead of a sum is caught on the first input
    fails_with(checks.check_vae_loss, vae_loss(pixel_reduce="mean"), "not .mean()", "input 1 of 5")


def test_reparameterise_and_kl_hidden_inputs_catch_a_clamp_on_one_side_only():
    def clamp_below_only(mean, logvar):
        logvar = logvar.clamp(min=-30.0)
        return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)

    fails_with(checks.check_kl, clamp_below_only, "input 2 of 4")
    assert not checks.grade(checks.check_kl, clamp_below_only).parts[-1].passed

    def sample_clamped_below_only(mean, logvar, generator):
        return mean + (0.5 * logvar.clamp(min=-30.0)).exp() * torch.randn(mean.shape, generator=generator)

    fails_with(checks.check_reparameterise, sample_clamped_below_only, "input 2 of 4")


# --- chapter 1: patchify, the 1-D sin-cos embedding ---------------------------------------------


def test_patchify_more_wrong_answers():
    def transposed_image(x, p):  # the image's rows and columns swapped before cutting
        from minilib.patch_embed import patchify
        return patchify(x.transpose(2, 3), p)

    fails_with(checks.check_patchify, transposed_image, "wrong answer on input 1 of 5")

    def square_only(x, p):  # assumes H == W
        B, C, H, _ = x.shape
        return x.reshape(B, C, H // p, p, H // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, p * p * C)

    fails_with(checks.check_patchify, square_only, "raised RuntimeError on input x (1, 4, 4, 6)", "a wide image")


def test_sincos_embedding_hidden_negative_positions_and_interleaving():
    def interleaved(D, pos):
        omega = 1.0 / 10000 ** (torch.arange(D // 2, dtype=torch.float64) / (D / 2))
        angles = pos.reshape(-1).double()[:, None] * omega
        return torch.stack([angles.sin(), angles.cos()], dim=2).reshape(len(angles), D)

    fails_with(checks.check_sincos_embedding, interleaved, "do not interleave")

    def absolute(D, pos):  # right for every visible input, wrong for negative positions
        omega = 1.0 / 10000 ** (torch.arange(D // 2, dtype=torch.float64) / (D / 2))
        angles = pos.reshape(-1).double().abs()[:, None] * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    checks.check_sincos_embedding(absolute)
    assert parts_passed(checks.check_sincos_embedding, absolute) == {"test inputs": True, "hidden inputs": False}
