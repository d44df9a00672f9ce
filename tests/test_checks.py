"""The assignments' checks (minilib.checks): right answers pass, wrong ones fail with a useful message.

For every check: minilib's own function (or a hand-written solution) passes and
prints a confirmation; a function that still raises NotImplementedError is
reported as "not implemented yet"; typical wrong implementations fail with the
hint written for that mistake.
"""

import math

import pytest
import torch

from minilib import checks
from minilib.adaln import modulate
from minilib.autoencoder import DiagonalGaussian
from minilib.checks import ExerciseError
from minilib.diffusion import classifier_free_guidance
from minilib.fewshot import leave_one_out
from minilib.flow import CFGDenoiser, append_dims, sample_euler, time_snr_shift, to_d
from minilib.flux import apply_rope, image_ids, text_ids
from minilib.mar import mask_schedule
from minilib.meanflow import meanflow_target, sample_few_steps
from minilib.parameterisation import velocity_from_eps
from minilib.mmdit import attention, block_mixing
from minilib.patch_embed import get_1d_sincos_pos_embed, patchify
from minilib.quantize import nearest_code
from minilib.repa import alignment_loss, hidden_states
from minilib.timestep import timestep_embedding
from minilib.training import compare_state_dicts
from minilib.var import block_causal_mask

from check_helpers import fails_with, not_implemented


# (check, a right answer) for every check
RIGHT = {
    "check_patchify": patchify,
    "check_sincos_embedding": get_1d_sincos_pos_embed,
    "check_timestep_embedding": timestep_embedding,
    "check_label_dropout": checks.ch02._label_dropout,
    "check_modulate": modulate,
    "check_dit_block": lambda block, x, c: block(x, c),
    "check_reparameterise": lambda mean, logvar, generator: DiagonalGaussian(mean, logvar).sample(generator),
    "check_kl": lambda mean, logvar: DiagonalGaussian(mean, logvar).kl(),
    "check_vae_loss": checks.ch04._vae_loss,
    "check_q_sample": lambda process, x0, t, noise: process.q_sample(x0, t, noise),
    "check_ddim_step": lambda process, x_t, t, x0: process._ddim_step(x_t, t, x0, torch.zeros_like(x_t), eta=0.0),
    "check_guided_eps": lambda model, x, t, y, null, s: classifier_free_guidance(model, s)(
        torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, torch.full_like(y, null)]))[: len(x), : x.shape[1]],
    "check_to_d": to_d,
    "check_velocity_from_eps": velocity_from_eps,
    "check_ddim_eta_step": checks.ch05b._ddim_general_step,
    "check_euler_step": lambda denoiser, x, sigma, sigma_next: sample_euler(denoiser, x, torch.stack([sigma, sigma_next])),
    "check_gaussian_velocity": checks.ch06._gaussian_velocity,
    "check_sampling_schedule": lambda steps: time_snr_shift(0.1, torch.linspace(1, 0, steps + 1)),
    "check_block_mixing": block_mixing,
    "check_leave_one_out": leave_one_out,
    "check_nearest_code": nearest_code,
    "check_block_causal_mask": block_causal_mask,
    "check_mask_schedule": mask_schedule,
    "check_ddpm_step": checks._reference_ddpm_step,
    "check_compare_state_dicts": compare_state_dicts,
    "check_meanflow_target": lambda model, z, r, t, v: meanflow_target(model, z, r, t, v),
    "check_alignment_loss": alignment_loss,
    "check_apply_rope": apply_rope,
    "check_few_step_sampler": lambda model, noise, steps: sample_few_steps(model, noise, steps=steps),
    "check_block_hidden_states": lambda model, depth, x, t, y: hidden_states(model, depth, x, t, y)[1],
    "check_sequence_ids": lambda b, n, h, w: torch.cat([text_ids(b, n), image_ids(b, h, w)], dim=1),
    "check_guided_denoiser": lambda denoiser, x, sigma, cond, uncond, cond_scale: CFGDenoiser(denoiser)(
        x, sigma, cond, uncond, cond_scale),
    "check_lsa_attention": checks.ch08._lsa_reference,
    "check_straight_through": checks.ch09._quantise_reference,
    "check_codebook_rescue": lambda: dict(dead_code_threshold=1.0),
    "check_next_scale_input": checks.ch10._next_scale_input,
    "check_mae_routing": checks.ch11._mae_routing,
    "check_mixture_eps": checks.ch12._mixture_eps,
    "check_dit_parameter_count": checks.ch13._dit_formula,
}


def test_every_check_is_listed_and_exported():
    names = {name for name in dir(checks) if name.startswith("check_")}
    assert names == set(RIGHT) == set(checks.__all__) - {"ExerciseError"}


@pytest.mark.parametrize("name", sorted(RIGHT))
def test_the_right_answer_passes_and_says_so(name, capsys):
    assert getattr(checks, name)(RIGHT[name]) is None
    out = capsys.readouterr().out
    assert out.startswith("✓ ") and "agrees with" in out and "test inputs" in out


@pytest.mark.parametrize("name", sorted(RIGHT))
def test_not_implemented_is_reported_as_such(name):
    def my_function(*args, **kwargs):
        raise NotImplementedError()

    message = fails_with(getattr(checks, name), my_function, "my_function is not implemented yet")
    assert "raise NotImplementedError()" in message


def test_the_checks_leave_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    checks.check_modulate(modulate)
    checks.check_block_mixing(block_mixing)
    checks.check_ddpm_step(checks._reference_ddpm_step)
    assert torch.equal(torch.rand(3), expected)


def test_a_crash_names_the_input_and_keeps_the_cause():
    def my_modulate(x, shift, scale):
        return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # forgets shift=None

    with pytest.raises(ExerciseError) as info:
        checks.check_modulate(my_modulate)
    message = str(info.value)
    assert "my_modulate raised AttributeError on input shift=None" in message and "shift may be None" in message
    assert isinstance(info.value.__cause__, AttributeError)  # the notebook shows the student's own line too


def test_a_value_instead_of_a_function_is_explained():
    fails_with(checks.check_modulate, 3.0, "pass your function itself")


# --- chapter 1 --------------------------------------------------------------


def test_patchify_by_hand_passes_and_wrong_orders_get_their_hints():
    def my_patchify(x, p):
        B, C, H, W = x.shape
        return x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, p * p * C)

    checks.check_patchify(my_patchify)

    def channel_first(x, p):
        B, C, H, W = x.shape
        return x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C * p * p)

    fails_with(checks.check_patchify, channel_first, "(row, column, channel)", "at [0, 0, 1]")

    def column_major(x, p):
        B, C, H, W = x.shape
        return x.reshape(B, C, H // p, p, W // p, p).permute(0, 4, 2, 3, 5, 1).reshape(B, -1, p * p * C)

    fails_with(checks.check_patchify, column_major, "row by row")


def test_sincos_mistakes():
    def cos_first(D, pos):
        return get_1d_sincos_pos_embed(D, pos).roll(D // 2, dims=1)

    fails_with(checks.check_sincos_embedding, cos_first, "sines come first")

    def over_D(D, pos):
        omega = 1.0 / 10000 ** (torch.arange(D // 2) / D)
        angles = pos.reshape(-1)[:, None] * omega
        return torch.cat([angles.sin(), angles.cos()], 1)

    fails_with(checks.check_sincos_embedding, over_D, "divide i by D/2")


# --- chapter 2 --------------------------------------------------------------


def test_timestep_embedding_by_hand_in_float32_passes_and_mistakes_get_hints():
    def my_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = max_period ** (-torch.arange(half) / half)
        args = t[:, None].float() * freqs[None]
        out = torch.cat([args.cos(), args.sin()], dim=-1)
        return torch.cat([out, torch.zeros(len(t), dim % 2)], dim=-1)

    checks.check_timestep_embedding(my_embedding)

    def linear(t, dim, max_period=10000):
        freqs = torch.linspace(1, 1 / max_period, dim // 2)
        args = t[:, None].float() * freqs[None]
        return torch.cat([args.cos(), args.sin(), torch.zeros(len(t), dim % 2)], dim=-1)

    fails_with(checks.check_timestep_embedding, linear, "log-spaced", "on input 1 of 6")
    fails_with(checks.check_timestep_embedding, lambda t, dim, max_period=10000: my_embedding(t, dim - dim % 2),
               "expected shape (3, 7), got (3, 6)", "append one column of zeros")


# --- chapter 3 --------------------------------------------------------------


def test_modulate_mistakes():
    fails_with(checks.check_modulate, lambda x, shift, scale: x * scale.unsqueeze(1) + shift.unsqueeze(1),
               "(1 + scale)", "expected", "got")
    # without unsqueeze it crashes for L != B and is silently wrong for L == B: both are explained
    fails_with(checks.check_modulate, lambda x, shift, scale: x * (1 + scale) + (0 if shift is None else shift),
               "unsqueeze(1)")


# --- chapter 4 --------------------------------------------------------------


def test_reparameterise_mistakes():
    def std_is_var(mean, logvar, generator):
        return mean + logvar.clamp(-30, 20).exp() * torch.randn(mean.shape, generator=generator)

    fails_with(checks.check_reparameterise, std_is_var, "exp(logvar / 2)")

    def no_clamp(mean, logvar, generator):
        return mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=generator)

    fails_with(checks.check_reparameterise, no_clamp, "clamp logvar to [-30, 20]", "input 2 of 4")

    def ignores_generator(mean, logvar, generator):
        return mean + (0.5 * logvar.clamp(-30, 20)).exp() * torch.randn_like(mean)

    fails_with(checks.check_reparameterise, ignores_generator, "generator=generator")


def test_kl_mistakes():
    def averaged(mean, logvar):
        logvar = logvar.clamp(-30, 20)
        return 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).flatten(1).mean(1)

    fails_with(checks.check_kl, averaged, "do not average")

    def whole_batch(mean, logvar):
        return DiagonalGaussian(mean, logvar).kl().sum()

    fails_with(checks.check_kl, whole_batch, "expected shape (2,), got ()", "one KL per sample")


# --- chapter 5 --------------------------------------------------------------


def test_q_sample_mistakes():
    def no_roots(process, x0, t, noise):
        abar = process.alphas_cumprod[t].float().view(-1, *[1] * (x0.ndim - 1))
        return abar * x0 + (1 - abar) * noise

    fails_with(checks.check_q_sample, no_roots, "take the square roots")

    def unshaped(process, x0, t, noise):
        abar = process.alphas_cumprod[t].float()
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    fails_with(checks.check_q_sample, unshaped, "raised RuntimeError", "(N, 1, 1, ...)")


def ddim_step_with(prev_of, float64=True):
    def step(process, x_t, t, x0):
        def per_sample(values):
            return (values if float64 else values.float()).to(x_t.dtype).view(-1, *[1] * (x_t.ndim - 1))
        abar, prev = process.alphas_cumprod[t], prev_of(process, t)
        if not float64:
            abar, prev = per_sample(abar), per_sample(prev)
        eps = (x_t - per_sample(abar.sqrt()) * x0) / per_sample((1 - abar).sqrt())
        return per_sample(prev.sqrt()) * x0 + per_sample((1 - prev).sqrt()) * eps
    return step


def test_ddim_step_needs_abar_minus_one_equal_to_one():
    wraps = ddim_step_with(lambda process, t: process.alphas_cumprod[t - 1])
    fails_with(checks.check_ddim_step, wraps, "t = 0 is 1", "input 2 of 3")
    checks.check_ddim_step(ddim_step_with(lambda process, t: process.alphas_cumprod_prev[t]))


def test_ddim_step_in_float32_is_told_to_compute_in_float64():
    """1 - abar_t in float32 at t = 1 of the cosine schedule loses digits the step divides by."""
    float32_first = ddim_step_with(lambda process, t: process.alphas_cumprod_prev[t], float64=False)
    fails_with(checks.check_ddim_step, float32_first, "in float64", "input 1 of 3")


# --- chapter 6 --------------------------------------------------------------


def test_to_d_and_euler_mistakes():
    fails_with(checks.check_to_d, lambda x, sigma, denoised: (denoised - x) / sigma.reshape(-1, *[1] * (x.ndim - 1)),
               "x minus the denoised image")
    # a (B,) sigma without reshaping divides along the last axis: wrong when that axis has the batch's size
    fails_with(checks.check_to_d, lambda x, sigma, denoised: (x - denoised) / sigma, "(B, 1, 1, ...)")

    def backwards(denoiser, x, sigma, sigma_next):
        return x - (sigma_next - sigma) * (x - denoiser(x, sigma * torch.ones(len(x)))) / sigma

    fails_with(checks.check_euler_step, backwards, "dt = sigma_next - sigma is negative")

    def my_step(denoiser, x, sigma, sigma_next):
        d = (x - denoiser(x, sigma * torch.ones(len(x)))) / sigma
        return x + (sigma_next - sigma) * d

    checks.check_euler_step(my_step)


# --- chapter 7 --------------------------------------------------------------


def test_block_mixing_mistakes():
    def separate(context, x, context_block, x_block, c):
        (qc, kc, vc), sc = context_block.pre_attention(context, c)
        (qx, kx, vx), sx = x_block.pre_attention(x, c)
        context_out = None if context_block.pre_only else context_block.post_attention(
            attention(qc, kc, vc, 4), *sc)
        return context_out, x_block.post_attention(attention(qx, kx, vx, 4), *sx)

    fails_with(checks.check_block_mixing, separate, "attend jointly")

    def ignores_pre_only(context, x, context_block, x_block, c):
        (qc, kc, vc), sc = context_block.pre_attention(context, c)
        (qx, kx, vx), sx = x_block.pre_attention(x, c)
        attn = attention(torch.cat([qc, qx], 1), torch.cat([kc, kx], 1), torch.cat([vc, vx], 1), 4)
        return (context_block.post_attention(attn[:, :context.shape[1]], *sc),
                x_block.post_attention(attn[:, context.shape[1]:], *sx))

    fails_with(checks.check_block_mixing, ignores_pre_only, "raised TypeError", "pre_only context block")


# --- chapters 8 to 11 (the lead adds their cells) ----------------------------


def test_leave_one_out_mistakes():
    fails_with(checks.check_leave_one_out, lambda s: (s.flatten(0, 1), s.repeat_interleave(s.shape[1], 0)),
               "must not be in its own context", "expected shape (8, 3, 1, 3, 3), got (8, 4, 1, 3, 3)")
    fails_with(checks.check_leave_one_out, lambda s: leave_one_out(s.transpose(0, 1).contiguous()),
               "set by set")


def test_nearest_code_accepts_any_nearest_and_explains_dot_products():
    def my_nearest(z, codebook):
        return torch.cdist(z.reshape(-1, z.shape[-1]), codebook).argmin(1).reshape(z.shape[:-1])

    checks.check_nearest_code(my_nearest)
    fails_with(checks.check_nearest_code,
               lambda z, cb: (z.reshape(-1, z.shape[-1]) @ cb.T).argmax(1).reshape(z.shape[:-1]),
               "same norm", "squared distance")
    fails_with(checks.check_nearest_code, lambda z, cb: nearest_code(z, cb).reshape(-1),
               "z.shape[:-1]", "input 2 of 4")


def test_block_causal_mask_mistakes():
    def token_causal(patch_nums):
        L = sum(p * p for p in patch_nums)
        return torch.full((L, L), -torch.inf).triu(1).view(1, 1, L, L)

    fails_with(checks.check_block_causal_mask, token_causal, "its own scale")
    fails_with(checks.check_block_causal_mask, lambda pn: block_causal_mask(pn).transpose(2, 3),
               "coarse tokens see finer ones")
    fails_with(checks.check_block_causal_mask, lambda pn: block_causal_mask(pn) == 0, "additive float mask")


def test_mask_schedule_mistakes():
    def plain_cosine(L, K):
        return [math.floor(L * math.cos(math.pi / 2 * (k + 1) / K)) for k in range(K)]

    fails_with(checks.check_mask_schedule, plain_cosine, "at least one")
    checks.check_mask_schedule(lambda L, K: torch.tensor(mask_schedule(L, K)))  # a tensor is fine too


# --- chapter 12 -------------------------------------------------------------


def test_ddpm_step_mistakes():
    fails_with(checks.check_ddpm_step, checks._unmapped_step, "timestep_map[i]")

    def sqrt_temperature(process, net, x_t, i, z, temperature, xi):
        mean = checks._reference_ddpm_step(process, net, x_t, i, z, 0.0, xi)
        full = checks._reference_ddpm_step(process, net, x_t, i, z, 1.0, xi)
        return mean + math.sqrt(temperature) * (full - mean)

    fails_with(checks.check_ddpm_step, sqrt_temperature, "multiplies the standard deviation", "input 2 of 5")


# --- chapter 13 -------------------------------------------------------------


def test_compare_state_dicts_accepts_any_order_and_catches_swaps():
    def my_compare(expected, found):
        return {"missing": [k for k in expected if k not in found],
                "unexpected": [k for k in found if k not in expected],
                "shape_mismatch": [(k, expected[k].shape, found[k].shape) for k in expected
                                   if k in found and expected[k].shape != found[k].shape]}

    checks.check_compare_state_dicts(my_compare)

    def swapped(expected, found):
        report = my_compare(expected, found)
        return dict(report, missing=report["unexpected"], unexpected=report["missing"])

    fails_with(checks.check_compare_state_dicts, swapped, "Yours are swapped", "['missing']")


def test_velocity_mistakes_get_their_hints():
    with pytest.raises(ExerciseError, match="da multiplies the \\*clean\\* image"):
        checks.check_velocity_from_eps(lambda x_t, eps, a, b, da, db: da * x_t + db * eps)
    with pytest.raises(ExerciseError, match="scaled by b"):
        checks.check_velocity_from_eps(lambda x_t, eps, a, b, da, db: da * (x_t - eps) / a + db * eps)


# --- chapters 14 to 16 ------------------------------------------------------


def test_meanflow_target_by_hand_passes_and_wrong_tangents_get_their_hints():
    from torch.func import jvp

    def my_target(model, z, r, t, v, tangent_r=0.0, tangent_t=1.0, sign=-1.0):
        u, du_dt = jvp(model, (z, r, t), (v, torch.full_like(r, tangent_r), torch.full_like(t, tangent_t)))
        return u, (v + sign * append_dims(t - r, z.ndim) * du_dt).detach()

    checks.check_meanflow_target(my_target)
    fails_with(checks.check_meanflow_target, lambda *a: my_target(*a, tangent_r=1.0), "r stays fixed", "input 1 of 4")
    fails_with(checks.check_meanflow_target, lambda *a: my_target(*a, tangent_t=0.0), "t moves along the path")
    fails_with(checks.check_meanflow_target, lambda *a: my_target(*a, sign=1.0), "subtract the derivative term")

    def partial_only(model, z, r, t, v):  # only the partial derivative in t: z held still
        u, du_dt = jvp(model, (z, r, t), (torch.zeros_like(z), torch.zeros_like(r), torch.ones_like(t)))
        return u, v - append_dims(t - r, z.ndim) * du_dt

    fails_with(checks.check_meanflow_target, partial_only, "z moves along the path too")


def test_alignment_loss_mistakes():
    import torch.nn.functional as F

    fails_with(checks.check_alignment_loss, lambda p, t: F.cosine_similarity(p, t, dim=-1).mean(), "MINUS the cosine")
    fails_with(checks.check_alignment_loss, lambda p, t: -(p * t).sum(-1).mean(), "normalise both vectors")
    fails_with(checks.check_alignment_loss, lambda p, t: -F.cosine_similarity(p.flatten(1), t.flatten(1)).mean(),
               "patch by patch")
    fails_with(checks.check_alignment_loss, lambda p, t: -F.cosine_similarity(p, t, dim=-1).sum(-1).mean(),
               "a mean, not a sum")


def test_apply_rope_by_complex_numbers_passes_and_the_other_layout_is_explained():
    def as_complex(x, angles):
        B, H, L, d = x.shape
        pairs = torch.view_as_complex(x.reshape(B, H, L, d // 2, 2).contiguous())
        turned = pairs * torch.polar(torch.ones_like(angles), angles)[:, None]
        return torch.view_as_real(turned).reshape(B, H, L, d)

    checks.check_apply_rope(as_complex)
    fails_with(checks.check_apply_rope, lambda x, a: as_complex(x, -a), "counter-clockwise")

    def halves(x, angles):
        first, second = x.chunk(2, dim=-1)
        cos, sin = angles.cos()[:, None], angles.sin()[:, None]
        return torch.cat((cos * first - sin * second, sin * first + cos * second), dim=-1)

    fails_with(checks.check_apply_rope, halves, "NEIGHBOURING channels")
    fails_with(checks.check_apply_rope, lambda x, a: apply_rope(x, a[0]), "raised ValueError", "a head axis")


# --- the runner: parts with points, hidden inputs, grading ---------------------------------------

from minilib.checks import runner  # noqa: E402
from minilib.checks.runner import Case, Mistake, Part  # noqa: E402


@runner.keeps_random_state
def check_toy(fn):
    """A check of ``fn(x) = 2 x`` in two visible parts (1 and 2 points) and a hidden one (3 points)."""
    runner.run_check(fn, [Part("integers", [Case("x = 3", (3,)), Case("x = -2", (-2,))], points=1),
                          Part("tensors", [Case("x = tensor (2, 3)", (torch.arange(6.0).reshape(2, 3),))], points=2),
                          Part("the edge", [Case("x = 0", (0,)), Case("x = 1e6", (1e6,))], points=3, hidden=True)],
                     lambda x: 2 * x, "twice x", mistakes=[Mistake(lambda x: x + 2, "double x, do not add 2.")])


def test_parts_pass_together_and_hidden_parts_run_only_when_asked(capsys):
    check_toy(lambda x: 2 * x)
    assert capsys.readouterr().out == "✓ <lambda> agrees with twice x on all 3 test inputs.\n"
    check_toy(lambda x: 2 * x, hidden=True)
    assert capsys.readouterr().out == "✓ <lambda> agrees with twice x on all 5 test inputs (2 of them hidden).\n"


def test_a_failing_part_raises_with_the_first_message_and_lists_the_parts():
    def my_double(x):
        return x + x if isinstance(x, torch.Tensor) else x + 2  # right on tensors, adds 2 on numbers

    message = fails_with(check_toy, my_double, "my_double gives a wrong answer on input 1 of 3, x = 3",
                         "hint: double x, do not add 2.", "parts:", "✗ integers: 0 points of 1 point (2 inputs)",
                         "✓ tensors: 2 points of 2 points (1 inputs)")
    assert "the edge" not in message  # a hidden part is not even named in the notebook


def test_grade_gives_partial_credit_part_by_part_and_never_raises(capsys):
    def my_double(x):
        return x + x if isinstance(x, torch.Tensor) or x != 1e6 else 0  # wrong only on the hidden 1e6

    report = checks.grade(check_toy, my_double)
    assert capsys.readouterr().out == ""  # grading prints nothing
    assert [(p.name, p.passed, p.points, p.hidden) for p in report.parts] == [
        ("integers", True, 1, False), ("tensors", True, 2, False), ("the edge", False, 3, True)]
    assert (report.score, report.max_score, report.fraction, report.passed) == (3, 6, 0.5, False)
    assert "input 5 of 5, x = 1e6" in report.parts[2].message  # numbered over every input run
    assert report.summary(hidden=False).count("✓") == 2 and "the edge" not in report.summary(hidden=False)
    assert report.check == "check_toy" and report.function == "my_double"

    visible = checks.grade(check_toy, my_double, hidden=False)
    assert (visible.score, visible.max_score) == (3, 3)


def test_grade_scores_not_implemented_a_value_and_a_broken_check_as_zero():
    report = checks.grade(check_toy, not_implemented)
    assert report.score == 0 and report.max_score == 6
    assert all("not_implemented is not implemented yet" in p.message for p in report.parts)
    report = checks.grade(check_toy, 3.0)
    assert report.score == 0 and "pass your function itself" in report.parts[0].message

    @runner.keeps_random_state
    def check_broken(fn):
        raise KeyError("a bug in the check")

    report = checks.grade(check_broken, lambda x: x)
    assert report.score == 0 and report.fraction == 0 and "KeyError" in report.error and report.summary() == report.error


def test_parts_are_validated():
    with pytest.raises(ValueError, match="no cases"):
        Part("empty", [])
    with pytest.raises(ValueError, match="points"):
        Part("negative", [Case("x", (1,))], points=-1)
    with pytest.raises(ValueError, match="different names"):
        runner.run_check(lambda x: x, [Part("a", [Case("x", (1,))]), Part("a", [Case("y", (2,))])], lambda x: x, "id")


@pytest.mark.parametrize("name", sorted(RIGHT))
def test_every_check_grades_the_right_answer_full_marks_with_its_hidden_inputs(name):
    report = checks.grade(getattr(checks, name), RIGHT[name])
    assert report.passed and report.score == report.max_score > 0, report.summary()


def test_each_chapter_module_holds_its_checks():
    import importlib

    owners = {}
    for module in ("ch01", "ch02", "ch03", "ch04", "ch05", "ch05b", "ch06", "ch07", "ch08", "ch09", "ch10",
                   "ch11", "ch12", "ch13", "ch14", "ch15", "ch16"):
        for check in importlib.import_module(f"minilib.checks.{module}").__all__:
            owners[check] = module
    assert set(owners) == set(RIGHT)
    assert owners["check_patchify"] == "ch01" and owners["check_velocity_from_eps"] == "ch05b"
