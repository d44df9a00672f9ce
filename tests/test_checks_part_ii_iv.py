"""The assignments of chapters 7 to 13: every check fails on realistic wrong answers with the hint written for each,
grades its parts and hidden inputs, and its reference is minilib's own code.

The generic tests of tests/test_checks.py (the right answer passes, "not implemented yet", full marks with the
hidden inputs) run on these checks too, through their RIGHT entries.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from minilib import checks
from minilib.fewshot import LocalitySelfAttention, leave_one_out
from minilib.mar import mask_schedule
from minilib.mmdit import attention
from minilib.quantize import VectorQuantizer, nearest_code
from minilib.training import compare_state_dicts
from minilib.var import block_causal_mask

from check_helpers import fails_with, not_implemented


NEW = ["check_guided_denoiser", "check_lsa_attention", "check_straight_through", "check_codebook_rescue",
       "check_next_scale_input", "check_mae_routing", "check_mixture_eps", "check_dit_parameter_count"]
OLD = ["check_block_mixing", "check_leave_one_out", "check_nearest_code", "check_block_causal_mask",
       "check_mask_schedule", "check_ddpm_step", "check_compare_state_dicts"]


@pytest.mark.parametrize("name", NEW + OLD)
def test_every_check_of_these_chapters_has_hidden_inputs(name):
    report = checks.grade(getattr(checks, name), not_implemented)
    assert any(part.hidden for part in report.parts), f"{name} has no hidden inputs"
    assert report.score == 0 and all("is not implemented yet" in part.message for part in report.parts)


# --- chapter 7 --------------------------------------------------------------


def test_block_mixing_wrong_answers():
    def separate(context, x, context_block, x_block, c):
        (qc, kc, vc), sc = context_block.pre_attention(context, c)
        (qx, kx, vx), sx = x_block.pre_attention(x, c)
        context_out = None if context_block.pre_only else context_block.post_attention(attention(qc, kc, vc, 4), *sc)
        return context_out, x_block.post_attention(attention(qx, kx, vx, 4), *sx)

    fails_with(checks.check_block_mixing, separate, "attend jointly", "input 1 of 3")

    def x_first(context, x, context_block, x_block, c):  # concatenated context first, split as if x came first
        (qc, kc, vc), sc = context_block.pre_attention(context, c)
        (qx, kx, vx), sx = x_block.pre_attention(x, c)
        attn = attention(torch.cat([qc, qx], 1), torch.cat([kc, kx], 1), torch.cat([vc, vx], 1), 4)
        x_attn, context_attn = attn[:, :x.shape[1]], attn[:, x.shape[1]:]
        context_out = None if context_block.pre_only else context_block.post_attention(context_attn, *sc)
        return context_out, x_block.post_attention(x_attn, *sx)

    fails_with(checks.check_block_mixing, x_first, "in the order you concatenated")


def my_guided(denoiser, x, sigma, cond, uncond, cond_scale):
    out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **{k: torch.cat([cond[k], uncond[k]]) for k in cond})
    d_cond, d_uncond = out.chunk(2)
    return d_uncond + cond_scale * (d_cond - d_uncond)


def test_guided_denoiser_by_hand_passes_and_wrong_mixtures_get_their_hints():
    checks.check_guided_denoiser(my_guided, hidden=True)

    def halves_swapped(denoiser, x, sigma, cond, uncond, cond_scale):
        out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]),
                       **{k: torch.cat([cond[k], uncond[k]]) for k in cond})
        d_uncond, d_cond = out.chunk(2)  # the first half is the conditional one
        return d_uncond + cond_scale * (d_cond - d_uncond)

    fails_with(checks.check_guided_denoiser, halves_swapped, "roles swapped", "input 1 of 5")

    def ho_salimans(denoiser, x, sigma, cond, uncond, cond_scale):
        d_cond, d_uncond = denoiser(x, sigma, **cond), denoiser(x, sigma, **uncond)
        return d_cond + cond_scale * (d_cond - d_uncond)

    fails_with(checks.check_guided_denoiser, ho_salimans, "Ho & Salimans")

    def no_empty_caption(denoiser, x, sigma, cond, uncond, cond_scale):
        return cond_scale * denoiser(x, sigma, **cond)

    fails_with(checks.check_guided_denoiser, no_empty_caption, "unconditional prediction too")

    def one_sigma(denoiser, x, sigma, cond, uncond, cond_scale):  # sigma not doubled with the batch
        out = denoiser(torch.cat([x, x]), sigma, **{k: torch.cat([cond[k], uncond[k]]) for k in cond})
        d_cond, d_uncond = out.chunk(2)
        return d_uncond + cond_scale * (d_cond - d_uncond)

    fails_with(checks.check_guided_denoiser, one_sigma, "raised ValueError", "torch.cat([sigma, sigma])")


def test_guided_denoiser_reference_is_cfg_denoiser_and_grades_its_parts():
    def unconditional_at_zero_wrong(denoiser, x, sigma, cond, uncond, cond_scale):  # right except cond_scale 0
        scale = 1.0 if cond_scale == 0 else cond_scale
        return my_guided(denoiser, x, sigma, cond, uncond, scale)

    report = checks.grade(checks.check_guided_denoiser, unconditional_at_zero_wrong)
    assert [(p.name, p.passed) for p in report.parts] == [
        ("guidance: D_uncond + s (D_cond - D_uncond)", True), ("edge cases", False), ("hidden inputs", True)]
    assert (report.score, report.max_score) == (3, 4)


# --- chapter 8 --------------------------------------------------------------


def test_leave_one_out_wrong_answers():
    fails_with(checks.check_leave_one_out, lambda s: (s.flatten(0, 1), s.repeat_interleave(s.shape[1], 0)),
               "must not be in its own context")
    fails_with(checks.check_leave_one_out, lambda s: leave_one_out(s.transpose(0, 1).contiguous()), "set by set")

    def rolled(sets):
        S = sets.shape[1]
        others = torch.stack([torch.tensor([(j + k) % S for k in range(1, S)]) for j in range(S)])
        return sets.flatten(0, 1), sets[:, others].flatten(0, 1)

    fails_with(checks.check_leave_one_out, rolled, "original order")


def my_lsa(q, k, v, temperature):
    logits = q @ k.transpose(-2, -1) * temperature.exp()
    eye = torch.eye(q.shape[-2], dtype=torch.bool)
    return logits.masked_fill(eye, float("-inf")).softmax(dim=-1) @ v


def test_lsa_reference_is_the_module_and_a_hand_written_version_passes():
    torch.manual_seed(0)
    module = LocalitySelfAttention(16, 2)
    with torch.no_grad():
        module.temperature.fill_(0.4)
    x = torch.randn(3, 5, 16)
    q, k, v = module.qkv(x).reshape(3, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    out = checks.ch08._lsa_reference(q, k, v, module.temperature)
    torch.testing.assert_close(module.proj(out.transpose(1, 2).reshape(3, 5, 16)), module(x))
    checks.check_lsa_attention(my_lsa, hidden=True)


def test_lsa_wrong_answers():
    def no_mask(q, k, v, temperature):
        return (q @ k.transpose(-2, -1) * temperature.exp()).softmax(-1) @ v

    fails_with(checks.check_lsa_attention, no_mask, "mask the diagonal", "input 1 of 5")
    def fixed_scale(q, k, v, temperature):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=~torch.eye(q.shape[-2], dtype=torch.bool))

    fails_with(checks.check_lsa_attention, fixed_scale, "use the learned temperature")

    def temperature_as_scale(q, k, v, temperature):
        logits = q @ k.transpose(-2, -1) * temperature
        return logits.masked_fill(torch.eye(q.shape[-2], dtype=torch.bool), float("-inf")).softmax(-1) @ v

    fails_with(checks.check_lsa_attention, temperature_as_scale, "the temperature is a log-scale")

    def double_scaled(q, k, v, temperature):
        return my_lsa(q, k, v, temperature - 0.5 * math.log(q.shape[-1]))

    fails_with(checks.check_lsa_attention, double_scaled, "do not divide by sqrt(d) as well")

    def keys_axis(q, k, v, temperature):
        logits = (q @ k.transpose(-2, -1) * temperature.exp()).masked_fill(torch.eye(q.shape[-2], dtype=torch.bool),
                                                                           float("-inf"))
        return logits.softmax(dim=-2) @ v

    fails_with(checks.check_lsa_attention, keys_axis, "over the keys")


def test_lsa_grades_its_parts_separately():
    def unstable_softmax(q, k, v, temperature):  # exp without subtracting the largest logit overflows
        logits = (q @ k.transpose(-2, -1) * temperature.exp()).exp()
        weights = logits.masked_fill(torch.eye(q.shape[-2], dtype=torch.bool), 0.0)
        return weights / weights.sum(-1, keepdim=True) @ v

    report = checks.grade(checks.check_lsa_attention, unstable_softmax)
    assert [p.passed for p in report.parts] == [True, True, False]
    assert (report.score, report.max_score) == (3, 4)


# --- chapter 9 --------------------------------------------------------------


def test_nearest_code_wrong_answers():
    fails_with(checks.check_nearest_code, lambda z, cb: torch.cdist(z.reshape(-1, z.shape[-1]), cb).argmax(1)
               .reshape(z.shape[:-1]), "argmin, not argmax")
    fails_with(checks.check_nearest_code, lambda z, cb: (z.reshape(-1, z.shape[-1]) @ cb.T).argmax(1)
               .reshape(z.shape[:-1]), "same norm")
    fails_with(checks.check_nearest_code, lambda z, cb: nearest_code(z, cb).reshape(-1), "z.shape[:-1]")


def my_quantise(z, codebook, beta):
    e = codebook[nearest_code(z.detach(), codebook.detach())]
    return z + (e - z).detach(), F.mse_loss(e, z.detach()) + beta * F.mse_loss(z, e.detach())


def test_straight_through_reference_is_the_vector_quantizer():
    torch.manual_seed(1)
    vq = VectorQuantizer(12, 3, beta=0.4)
    z = torch.randn(2, 5, 3, requires_grad=True)
    out = vq(z)
    z_q, loss = checks.ch09._quantise_reference(z, vq.embedding.weight, 0.4)
    torch.testing.assert_close((z_q, loss), (out.z_q, out.loss))
    checks.check_straight_through(my_quantise, hidden=True)


def test_straight_through_wrong_answers_get_their_hints():
    def code_only(z, codebook, beta):
        e = codebook[nearest_code(z.detach(), codebook.detach())]
        return e, F.mse_loss(e, z.detach()) + beta * F.mse_loss(z, e.detach())

    message = fails_with(checks.check_straight_through, code_only, "no gradient path to z", "input 3 of 5")
    assert "✓ the values of z_q and the loss" in message  # the values are right: that part scores

    def no_detach(z, codebook, beta):
        e = codebook[nearest_code(z.detach(), codebook.detach())]
        return z + (e - z), F.mse_loss(e, z.detach()) + beta * F.mse_loss(z, e.detach())

    fails_with(checks.check_straight_through, no_detach, "without .detach(), which is the same")

    def one_loss(z, codebook, beta):
        e = codebook[nearest_code(z.detach(), codebook.detach())]
        return z + (e - z).detach(), (1 + beta) * F.mse_loss(z, e)

    fails_with(checks.check_straight_through, one_loss, "different stop-gradients")

    def beta_misplaced(z, codebook, beta):
        e = codebook[nearest_code(z.detach(), codebook.detach())]
        return z + (e - z).detach(), beta * F.mse_loss(e, z.detach()) + F.mse_loss(z, e.detach())

    fails_with(checks.check_straight_through, beta_misplaced, "beta weighs the commitment loss")

    def sums(z, codebook, beta):
        e = codebook[nearest_code(z.detach(), codebook.detach())]
        return z + (e - z).detach(), ((e - z.detach()) ** 2).sum() + beta * ((z - e.detach()) ** 2).sum()

    fails_with(checks.check_straight_through, sums, "means over all entries")


def test_codebook_rescue_reaches_its_targets_with_a_remedy_and_explains_the_collapse():
    checks.check_codebook_rescue(lambda: dict(kmeans_init=True), hidden=True)
    default = checks.grade(checks.check_codebook_rescue, lambda: {})
    assert default.score == 0 and "dead codes" in default.parts[0].message
    assert "the perplexity after training is 1" in default.parts[0].message
    fails_with(checks.check_codebook_rescue, lambda: dict(lr=0.2), "no gradient at any learning rate")
    fails_with(checks.check_codebook_rescue, lambda: dict(temperature=2.0), "raised ValueError", "other keys")
    fails_with(checks.check_codebook_rescue, lambda: [("dead_code_threshold", 1.0)], "return a dict")


def test_codebook_rescue_with_a_tiny_learning_rate_misses_both_targets_and_says_by_how_much():
    report = checks.grade(checks.check_codebook_rescue, lambda: dict(dead_code_threshold=1.0, lr=1e-3))
    assert report.score == 0 and [p.passed for p in report.parts] == [False, False, False]
    assert "the perplexity after training is 13.4; the target is >= 14" in report.parts[0].message
    assert "the error after training is 0.1234; the target is <= 0.07" in report.parts[1].message


# --- chapter 10 -------------------------------------------------------------


def test_block_causal_mask_wrong_answers():
    def token_causal(patch_nums):
        L = sum(p * p for p in patch_nums)
        return torch.full((L, L), -torch.inf).triu(1).view(1, 1, L, L)

    fails_with(checks.check_block_causal_mask, token_causal, "its own scale")
    fails_with(checks.check_block_causal_mask, lambda pn: block_causal_mask(pn).transpose(2, 3),
               "coarse tokens see finer ones")
    fails_with(checks.check_block_causal_mask, lambda pn: block_causal_mask(pn)[0, 0], "(1, 1, L, L)")


def test_next_scale_input_reference_is_idxBl_to_var_input():
    from minilib.vqvae import VectorQuantizer2

    torch.manual_seed(2)
    patch_nums = (1, 2, 3, 4)
    vq = VectorQuantizer2(32, 4, v_patch_nums=patch_nums, quant_resi=0.5, share_quant_resi=4).eval()
    idx = [torch.randint(32, (2, p * p)) for p in patch_nums]
    maps = [vq.embedding(i).transpose(1, 2).reshape(2, 4, p, p) for i, p in zip(idx, patch_nums)]
    phis = [vq.phi(k, len(patch_nums)) for k in range(len(patch_nums))]
    with torch.no_grad():
        torch.testing.assert_close(checks.ch10._next_scale_input(maps, phis), vq.idxBl_to_var_input(idx))


def my_next_scale_input(maps, phis, up="bicubic", down="area", accumulate=True, flatten=True):
    B, C, H = maps[0].shape[0], maps[0].shape[1], maps[-1].shape[-1]
    f_hat, pieces = torch.zeros(B, C, H, H), []
    for k in range(len(maps) - 1):
        h = phis[k](F.interpolate(maps[k], size=(H, H), mode=up))
        f_hat = f_hat + h if accumulate else h
        p = maps[k + 1].shape[-1]
        small = F.interpolate(f_hat, size=(p, p), mode=down)
        pieces.append(small.flatten(2).transpose(1, 2) if flatten else small.reshape(B, p * p, C))
    return torch.cat(pieces, 1) if pieces else None


def test_next_scale_input_wrong_answers():
    checks.check_next_scale_input(my_next_scale_input, hidden=True)
    fails_with(checks.check_next_scale_input, lambda m, p: my_next_scale_input(m, p, accumulate=False),
               "ALL scales so far", "input 1 of 4")
    fails_with(checks.check_next_scale_input, lambda m, p: my_next_scale_input(m, p, up="bilinear"), "'bicubic'")
    fails_with(checks.check_next_scale_input, lambda m, p: my_next_scale_input(m, p, down="bilinear"), "'area'")
    fails_with(checks.check_next_scale_input, lambda m, p: my_next_scale_input(m, p, flatten=False),
               ".flatten(2).transpose(1, 2)")
    fails_with(checks.check_next_scale_input, lambda m, p: my_next_scale_input(m, [lambda h: h] * len(m)),
               "through its phi", "input 2 of 4")

    def returns_empty(maps, phis):  # a single scale: an empty tensor instead of None
        out = my_next_scale_input(maps, phis)
        return out if out is not None else torch.zeros(maps[0].shape[0], 0, maps[0].shape[1])

    message = fails_with(checks.check_next_scale_input, returns_empty, "expected None", "input 3 of 4")
    assert "✓ the running f_hat" in message


# --- chapter 11 -------------------------------------------------------------


def test_mask_schedule_wrong_answers():
    def plain_cosine(L, K):
        return [math.floor(L * math.cos(math.pi / 2 * (k + 1) / K)) for k in range(K)]

    fails_with(checks.check_mask_schedule, plain_cosine, "at least one")
    fails_with(checks.check_mask_schedule, lambda L, K: mask_schedule(L, K)[:-1], "the last number is 0")

    def ceil_schedule(L, K):
        masked, out = L, []
        for k in range(K - 1):
            masked = max(1, min(masked - 1, math.ceil(L * math.cos(math.pi / 2 * (k + 1) / K))))
            out.append(masked)
        return out + [0]

    fails_with(checks.check_mask_schedule, ceil_schedule, "round down")


def my_route(x, orders, mask_rate, class_embedding, buffer_size, count=math.ceil, scatter=True, keep_known=True,
             fill=True):
    B, L, D = x.shape
    n = count(L * mask_rate)
    if scatter:
        mask = torch.zeros(B, L, dtype=torch.bool).scatter(1, orders[:, :n], True)
    else:
        mask = orders < n
    buffer = class_embedding[:, None].expand(B, buffer_size, D) if fill else torch.zeros(B, buffer_size, D)
    kept = x[~mask] if keep_known else x.reshape(B * L, D)
    return mask, torch.cat([buffer, kept.reshape(B, -1, D)], dim=1)


def test_mae_routing_reference_is_mar():
    from minilib import zoo

    torch.manual_seed(3)
    model = zoo.build("mar-small-digits", vae_embed_dim=3, encoder_embed_dim=16, decoder_embed_dim=16,
                      encoder_num_heads=2, decoder_num_heads=2, diffloss_w=16).eval()
    x = torch.randn(2, model.seq_len, model.token_embed_dim)
    orders = torch.stack([torch.randperm(model.seq_len) for _ in range(2)])
    mask, sequence = checks.ch11._mae_routing(model.z_proj(x), orders, 0.6, torch.randn(2, 16), model.buffer_size)
    assert torch.equal(mask, model.random_masking(x, orders, mask_ratio=0.6))
    model.encoder_blocks, model.z_proj_ln, model.encoder_norm = torch.nn.ModuleList(), torch.nn.Identity(), \
        torch.nn.Identity()
    with torch.no_grad():
        model.encoder_pos_embed_learned.zero_()
    class_embedding = torch.randn(2, 16)
    with torch.no_grad():
        routed = model.forward_mae_encoder(x, mask, class_embedding)
        _, expected = checks.ch11._mae_routing(model.z_proj(x), orders, 0.6, class_embedding, model.buffer_size)
    torch.testing.assert_close(routed, expected)


def test_mae_routing_wrong_answers():
    checks.check_mae_routing(my_route, hidden=True)
    message = fails_with(checks.check_mae_routing, lambda *a: my_route(*a, count=round), "math.ceil")
    assert "not round" in message
    fails_with(checks.check_mae_routing, lambda *a: my_route(*a, scatter=False), "orders[b] lists positions")
    message = fails_with(checks.check_mae_routing, lambda *a: my_route(*a, keep_known=False), "drops the masked tokens")
    assert "✓ the random mask" in message
    fails_with(checks.check_mae_routing, lambda *a: my_route(*a, fill=False), "class embedding")

    def inverted(*args):
        mask, sequence = my_route(*args)
        return ~mask, sequence

    fails_with(checks.check_mae_routing, inverted, "True means masked")


# --- chapter 12 -------------------------------------------------------------


def test_ddpm_step_wrong_answers():
    fails_with(checks.check_ddpm_step, checks._unmapped_step, "timestep_map[i]")

    def sqrt_temperature(process, net, x_t, i, z, temperature, xi):
        mean = checks._reference_ddpm_step(process, net, x_t, i, z, 0.0, xi)
        full = checks._reference_ddpm_step(process, net, x_t, i, z, 1.0, xi)
        return mean + math.sqrt(temperature) * (full - mean)

    fails_with(checks.check_ddpm_step, sqrt_temperature, "multiplies the standard deviation")

    def noise_everywhere(process, net, x_t, i, z, temperature, xi):
        t = torch.full((len(x_t),), i, dtype=torch.long)
        mean = checks._reference_ddpm_step(process, net, x_t, i, z, 0.0, xi)
        _, var_values = process._model_output(net, x_t, t, dict(c=z))
        return mean + temperature * (0.5 * process.learned_range_log_variance(var_values, t)).exp() * xi

    fails_with(checks.check_ddpm_step, noise_everywhere, "add no noise at the last step", "input 4 of 5")


def my_mixture_eps(x_t, abar, means, weights, std, centre_scaled=True, posterior=True, stable=True):
    a = abar.to(x_t.dtype)[:, None, None]
    v = a * std ** 2 + 1 - a
    d = x_t[:, None] - a.sqrt() * means[None]
    dist = (x_t[:, None] - (a.sqrt() if centre_scaled else 1) * means[None]).square().sum(-1)
    logits = weights.log() - dist / (2 * v[..., 0])
    if not posterior:
        p = weights.expand_as(logits)
    elif stable:
        p = torch.softmax(logits, dim=1)
    else:
        p = logits.exp() / logits.exp().sum(1, keepdim=True)
    return (p[..., None] * (1 - a).sqrt() * d / v).sum(1)


def test_mixture_eps_agrees_with_monte_carlo_and_the_one_gaussian_formula():
    generator = torch.Generator().manual_seed(4)
    means, weights, std, abar = torch.tensor([[1.0, 0.0], [-1.0, 0.5]]), torch.tensor([0.3, 0.7]), 0.3, 0.5
    n = 400_000
    k = torch.multinomial(weights, n, replacement=True, generator=generator)
    eps = torch.randn(n, 2, generator=generator)
    x_t = math.sqrt(abar) * (means[k] + std * torch.randn(n, 2, generator=generator)) + math.sqrt(1 - abar) * eps
    point = torch.tensor([0.2, 0.1])
    near = (x_t - point).norm(dim=1) < 0.06
    exact = checks.ch12._mixture_eps(point[None], torch.tensor([abar]), means, weights, std)[0]
    assert near.sum() > 500 and (eps[near].mean(0) - exact).abs().max() < 0.08
    x, a = torch.randn(5, 1), torch.rand(5)
    one = checks.ch12._mixture_eps(x, a, torch.zeros(1, 1), torch.ones(1), 0.3)
    torch.testing.assert_close(one, (1 - a[:, None]).sqrt() * x / (a[:, None] * 0.09 + 1 - a[:, None]))


def test_mixture_eps_wrong_answers():
    checks.check_mixture_eps(my_mixture_eps, hidden=True)
    fails_with(checks.check_mixture_eps, lambda *a: my_mixture_eps(*a, centre_scaled=False),
               "sqrt(abar) mu_k, not at mu_k")
    fails_with(checks.check_mixture_eps, lambda *a: my_mixture_eps(*a, posterior=False), "POSTERIOR probability")
    message = fails_with(checks.check_mixture_eps, lambda *a: my_mixture_eps(*a, stable=False), "softmax",
                         "input 4 of 4")
    assert "✓ the derivation" in message

    def hard(x_t, abar, means, weights, std):
        a = abar[:, None, None]
        v = a * std ** 2 + 1 - a
        d = x_t[:, None] - a.sqrt() * means[None]
        best = (weights.log() - d.square().sum(-1) / (2 * v[..., 0])).argmax(1)
        return ((1 - a).sqrt() * d / v)[torch.arange(len(x_t)), best]

    fails_with(checks.check_mixture_eps, hard, "soft posterior weights")


# --- chapter 13 -------------------------------------------------------------


def test_compare_state_dicts_wrong_answers():
    def my_compare(expected, found):
        return {"missing": [k for k in expected if k not in found],
                "unexpected": [k for k in found if k not in expected],
                "shape_mismatch": [(k, expected[k].shape, found[k].shape) for k in expected
                                   if k in found and expected[k].shape != found[k].shape]}

    checks.check_compare_state_dicts(my_compare, hidden=True)
    fails_with(checks.check_compare_state_dicts, lambda e, f: dict(my_compare(e, f), missing=my_compare(e, f)[
        "unexpected"], unexpected=my_compare(e, f)["missing"]), "Yours are swapped")
    fails_with(checks.check_compare_state_dicts, lambda e, f: dict(my_compare(e, f), shape_mismatch=[
        (k, b, a) for k, a, b in my_compare(e, f)["shape_mismatch"]]), "model's (expected) shape first")

    def mismatch_missing(expected, found):
        report = compare_state_dicts(expected, found)
        return dict(report, missing=report["missing"] + [k for k, _, _ in report["shape_mismatch"]], shape_mismatch=[])

    fails_with(checks.check_compare_state_dicts, mismatch_missing, "not a missing key")


CONFIGS = [(32, 2, 4, 384, 12, 4.0, 1000, True), (32, 2, 4, 1152, 28, 4.0, 1000, True),
           (16, 4, 3, 64, 3, 2.0, 10, False), (2, 2, 1, 32, 1, 4.0, 5, True), (8, 2, 2, 40, 2, 2.5, 3, True),
           (32, 4, 4, 768, 12, 4.0, 1000, True), (28, 7, 1, 48, 2, 3.0, 10, False)]


@pytest.mark.parametrize("config", CONFIGS)
def test_the_parameter_count_reference_is_dit_built_on_meta(config):
    assert checks.ch13._dit_formula(*config) == checks.ch13._dit_parameters(*config)


def test_dit_parameter_count_wrong_answers():
    formula = checks.ch13._dit_formula
    checks.check_dit_parameter_count(lambda *a: torch.tensor(formula(*a)), hidden=True)  # a 0-d int tensor is fine
    fails_with(checks.check_dit_parameter_count, lambda *a: formula(*a, null_class=False), "null class",
               "a difference of -384")
    fails_with(checks.check_dit_parameter_count, lambda *a: formula(*a, pos_embed=False), "pos_embed")
    fails_with(checks.check_dit_parameter_count, lambda *a: formula(*a, final_adaln=6), "only shift and scale")
    fails_with(checks.check_dit_parameter_count, lambda *a: formula(*a, biases=False), "a bias too")
    fails_with(checks.check_dit_parameter_count, lambda *a: formula(*a, adaln=4), "6 D^2 + 6 D")
    fails_with(checks.check_dit_parameter_count, lambda *a: float(formula(*a)) + 0.5, "expected an int")
    report = checks.grade(checks.check_dit_parameter_count, lambda *a: formula(*a, sigma=a[-1] and False))
    assert [p.passed for p in report.parts] == [False, False, False]
