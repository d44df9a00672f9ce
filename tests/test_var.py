"""The VAR transformer: mask, teacher forcing, sampling (CFG, top-k/top-p, KV cache), checkpoints."""

import math

import pytest
import torch
import torch.nn.functional as F
from reference import load_reference, module_tree, reference_tree

from minilib import zoo
from minilib.var import (VAR, block_causal_mask, build_var, gumbel_softmax_with_rng, sample_with_top_k_top_p_,
                         scale_levels)
from minilib.vqvae import VQVAE

PATCH_NUMS = (1, 2, 3, 4)  # L = 1 + 4 + 9 + 16 = 30 tokens
L = 30
NUM_CLASSES, V, CVAE = 3, 32, 8


def tiny_vae():
    torch.manual_seed(0)
    return VQVAE(vocab_size=V, z_channels=CVAE, ch=16, ch_mult=(1, 2), num_res_blocks=1, v_patch_nums=PATCH_NUMS,
                 norm_groups=8, test_mode=True)


def tiny_var(vae=None, **kwargs):
    """A small VAR whose logits are far from uniform (so sampling is not trivially random)."""
    torch.manual_seed(1)
    settings = dict(num_classes=NUM_CLASSES, depth=2, embed_dim=32, num_heads=2, patch_nums=PATCH_NUMS)
    if vae is None:
        settings.update(Cvae=CVAE, vocab_size=V)
    var = VAR(vae, **{**settings, **kwargs})
    var.init_weights(init_head=1.0, init_adaln_gamma=1.0)
    return var.eval()


def random_pyramid(B, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(V, (B, pn * pn), generator=generator) for pn in PATCH_NUMS]


# ---------------------------------------------------------------- the module tree


def test_var_d16_keeps_the_vqvae_out_of_its_state_dict():
    with torch.device("meta"):
        vae = VQVAE(ch=160, test_mode=True)  # the official 4096 x 32 VQ-VAE, shapes only
        var = zoo.build("var-d16", vae_local=vae)
    reference = load_reference("var_d16.json")
    assert module_tree(var) == reference_tree(reference)
    assert zoo.count_parameters(var) == 310_283_520 == reference["total_params"]
    assert var.vae_proxy[0] is vae and var.vae_quant_proxy[0] is vae.quantize
    assert not any(name.startswith(("vae", "quantize")) for name, _ in var.named_modules() if name)
    assert (var.C, var.num_heads, var.depth, var.L, var.V, var.Cvae) == (1024, 16, 16, 680, 4096, 32)
    assert [round(block.drop_path.p, 6) for block in var.blocks[1:3]] == [round(0.1 * 16 / 24 / 15 * i, 6)
                                                                          for i in (1, 2)]


def test_an_official_key_state_dict_loads_strictly():
    reference = load_reference("var_d16.json")
    official = {key: torch.empty(entry["shape"], dtype=getattr(torch, entry["dtype"]), device="meta")
                for key, entry in reference["state_dict"].items()}
    var = zoo.build("var-d16", device="meta")
    var.load_state_dict(official, strict=True, assign=True)
    official["head.weigth"] = official.pop("head.weight")
    with pytest.raises(RuntimeError, match=r"(?s)Missing key\(s\).*head\.weight.*Unexpected key\(s\).*head\.weigth"):
        var.load_state_dict(official, strict=True, assign=True)


def test_a_saved_small_var_reloads_strictly_and_gives_the_same_logits():
    source, target = tiny_var(), tiny_var()
    with torch.no_grad():
        target.head.weight.add_(1.0)
    x = torch.randn(2, L - 1, CVAE)
    labels = torch.tensor([0, 2])
    assert not torch.allclose(source(labels, x), target(labels, x))
    target.load_state_dict(source.state_dict(), strict=True)
    torch.testing.assert_close(source(labels, x), target(labels, x))


def test_shared_adaln_variant():
    var = tiny_var(shared_aln=True)
    params = dict(var.named_parameters())
    assert params["shared_ada_lin.1.weight"].shape == (6 * 32, 32)
    assert "blocks.0.ada_gss" in params and not any(".ada_lin." in key for key in params if key.startswith("blocks"))
    assert var(torch.tensor([1]), torch.randn(1, L - 1, CVAE)).shape == (1, L, V)


# ---------------------------------------------------------------- the block-causal mask


def test_the_mask_lets_a_token_see_exactly_its_own_and_earlier_scales():
    var = tiny_var()
    levels = torch.tensor([0] + [1] * 4 + [2] * 9 + [3] * 16)
    assert torch.equal(scale_levels(PATCH_NUMS), levels) and torch.equal(var.lvl_1L, levels[None])
    mask = var.attn_bias_for_masking
    assert mask.shape == (1, 1, L, L) and torch.equal(mask, block_causal_mask(PATCH_NUMS))
    visible = mask[0, 0] == 0
    for i in range(L):
        for j in range(L):
            assert visible[i, j] == (levels[j] <= levels[i])
    assert torch.all(mask[0, 0][~visible] == -math.inf)
    assert visible.sum(1).tolist()[:6] == [1, 5, 5, 5, 5, 14]


@pytest.mark.parametrize("scale", [1, 2, 3])
def test_changing_one_scale_changes_the_logits_of_that_scale_and_later_ones_only(scale):
    var = tiny_var()
    labels, x = torch.tensor([0, 1]), torch.randn(2, L - 1, CVAE)
    start, end = var.begin_ends[scale]
    y = x.clone()
    y[:, start - 1:end - 1] = torch.randn(2, end - start, CVAE)  # x has no first scale: shift by first_l = 1
    before, after = var(labels, x), var(labels, y)
    torch.testing.assert_close(before[:, :start], after[:, :start], atol=1e-6, rtol=0)
    assert (before[:, start:end] - after[:, start:end]).abs().amax(-1).min() > 1e-4  # every token of the scale


# ---------------------------------------------------------------- teacher forcing


def test_forward_shapes_and_the_first_position_is_the_class_token():
    var = tiny_var()
    x = torch.randn(3, L - 1, CVAE)
    logits = var(torch.tensor([0, 1, 3]), x)  # 3 = the null class
    assert logits.shape == (3, L, V)
    # the first scale sees only its class token: the inputs x do not matter for it
    torch.testing.assert_close(logits[:, 0], var(torch.tensor([0, 1, 3]), torch.randn_like(x))[:, 0])
    assert not torch.allclose(logits[0, 0], var(torch.tensor([2, 1, 3]), x)[0, 0])


def test_label_dropout_only_in_training_mode():
    var = tiny_var(cond_drop_rate=0.5)
    labels, x = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.randn(8, L - 1, CVAE)
    torch.manual_seed(5)
    dropped = torch.rand(8) < 0.5
    assert 0 < dropped.sum() < 8
    expected = var.eval()(torch.where(dropped, NUM_CLASSES, labels), x)
    torch.manual_seed(5)
    torch.testing.assert_close(var.train()(labels, x), expected)
    torch.testing.assert_close(var.eval()(labels, x), var(labels, x))  # eval: never dropped


def test_drop_labels_overrides_the_mode_and_draws_exactly_b_numbers():
    """drop_labels=True in eval mode is the official eval pass; False in training draws nothing."""
    var = tiny_var(cond_drop_rate=0.5)
    labels, x = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), torch.randn(8, L - 1, CVAE)
    torch.manual_seed(5)
    dropped, after_official = torch.rand(8) < 0.5, torch.rand(2)
    expected = var.eval()(torch.where(dropped, NUM_CLASSES, labels), x)
    torch.manual_seed(5)
    torch.testing.assert_close(var.eval()(labels, x, drop_labels=True), expected)
    assert torch.equal(torch.rand(2), after_official)  # the global stream moved by B = 8 numbers
    torch.manual_seed(5)
    torch.testing.assert_close(var.train()(labels, x, drop_labels=False), var.eval()(labels, x))
    assert torch.equal(torch.rand(8) < 0.5, dropped)  # nothing drawn
    with pytest.raises(ValueError, match="drop_labels must be True, False or None"):
        var(labels, x, drop_labels=1)


def test_init_weights_starts_near_uniform_with_quiet_blocks():
    var = build_var(depth=2, num_classes=NUM_CLASSES, patch_nums=PATCH_NUMS).eval()  # C = 128, 2 heads
    gamma_rows = var.blocks[0].ada_lin[1].weight[:2 * var.C]
    assert gamma_rows.abs().max() < 1e-4 and var.blocks[0].ada_lin[1].bias.abs().max() == 0
    logits = var(torch.tensor([0, 1]), torch.randn(2, L - 1, 32))
    assert logits.abs().max() < 0.1  # head scaled by 0.02: close to uniform over the 4096 codes
    assert var.class_emb.weight.shape == (NUM_CLASSES + 1, 128)


def test_training_loss_is_cross_entropy_over_all_scales():
    vae = tiny_vae()
    var = tiny_var(vae)
    labels, pyramid = torch.tensor([0, 2]), random_pyramid(2)
    logits = var(labels, vae.quantize.idxBl_to_var_input(pyramid))
    expected = F.cross_entropy(logits.reshape(-1, V), torch.cat(pyramid, 1).reshape(-1))
    torch.testing.assert_close(var.training_loss(labels, pyramid), expected)


def test_teacher_forced_loss_falls_on_a_tiny_problem():
    vae = tiny_vae()
    var = VAR(vae, num_classes=NUM_CLASSES, depth=2, embed_dim=32, num_heads=2, patch_nums=PATCH_NUMS,
              cond_drop_rate=0.0)  # initialised as VAR initialises it
    labels = torch.arange(NUM_CLASSES).repeat(4)  # each class always has the same pyramid
    pyramids = random_pyramid(NUM_CLASSES, seed=3)
    pyramid = [p[labels] for p in pyramids]
    optimiser = torch.optim.AdamW(var.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        loss = var.training_loss(labels, pyramid)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert abs(losses[0] - math.log(V)) < 0.05  # near-uniform at initialisation
    assert losses[-1] < 0.3 * losses[0]


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("cfg, top_k, top_p", [(1.5, 0, 0.0), (3.0, 5, 0.8)])
def test_sampling_with_and_without_the_kv_cache_gives_the_same_tokens(cfg, top_k, top_p):
    vae = tiny_vae()
    var = tiny_var(vae)
    labels = torch.tensor([0, 1, 2, 3, 1])  # 3 = unconditional
    kwargs = dict(g_seed=7, cfg=cfg, top_k=top_k, top_p=top_p, return_idx=True)
    cached = var.autoregressive_infer_cfg(5, labels, use_kv_cache=True, **kwargs)
    recomputed = var.autoregressive_infer_cfg(5, labels, use_kv_cache=False, **kwargs)
    assert [idx.shape for idx in cached] == [(5, pn * pn) for pn in PATCH_NUMS]
    for a, b in zip(cached, recomputed):
        assert torch.equal(a, b)
    assert all(block.attn.cached_k is None and not block.attn.caching for block in var.blocks)
    other_seed = var.autoregressive_infer_cfg(5, labels, **{**kwargs, "g_seed": 8})
    assert not all(torch.equal(a, b) for a, b in zip(cached, other_seed))
    images = var.autoregressive_infer_cfg(5, labels, g_seed=7, cfg=cfg, top_k=top_k, top_p=top_p)
    assert images.shape == (5, 3, 8, 8) and images.min() >= 0 and images.max() <= 1
    torch.testing.assert_close(images, vae.idxBl_to_img(cached, last_one=True).add(1).mul(0.5))


def test_top_k_1_is_greedy_and_cfg_0_is_the_conditional_model():
    vae = tiny_vae()
    var = tiny_var(vae)
    labels = torch.tensor([0, 1, 2, 2])
    pyramid = var.autoregressive_infer_cfg(4, labels, g_seed=0, cfg=0.0, top_k=1, return_idx=True)
    logits = var(labels, vae.quantize.idxBl_to_var_input(pyramid))  # teacher forcing on the sampled pyramid
    assert torch.equal(logits.argmax(-1), torch.cat(pyramid, dim=1))


def test_guidance_rises_linearly_over_the_scales():
    vae = tiny_vae()
    var = tiny_var(vae)
    labels, cfg = torch.tensor([0, 1, 2]), 4.0
    pyramid = var.autoregressive_infer_cfg(3, labels, cfg=cfg, top_k=1, return_idx=True)
    x = vae.quantize.idxBl_to_var_input(pyramid)
    cond, uncond = var(labels, x), var(torch.full_like(labels, NUM_CLASSES), x)
    for si, (start, end) in enumerate(var.begin_ends):
        t = cfg * si / (len(PATCH_NUMS) - 1)  # 0 at the first scale, cfg at the last
        guided = (1 + t) * cond[:, start:end] - t * uncond[:, start:end]
        assert torch.equal(guided.argmax(-1), pyramid[si])
    unguided = var.autoregressive_infer_cfg(3, labels, cfg=0.0, top_k=1, return_idx=True)
    assert torch.equal(unguided[0], pyramid[0])  # t = 0 at the first scale
    assert not all(torch.equal(a, b) for a, b in zip(unguided, pyramid))


def test_label_options_and_more_smooth():
    vae = tiny_vae()
    var = tiny_var(vae)
    random_labels = var.autoregressive_infer_cfg(6, None, g_seed=1, return_idx=True)
    assert [p.shape for p in random_labels] == [(6, pn * pn) for pn in PATCH_NUMS]
    unconditional = var.autoregressive_infer_cfg(2, -1, g_seed=1, cfg=0.0, top_k=1, return_idx=True)
    null = var.autoregressive_infer_cfg(2, torch.tensor([NUM_CLASSES] * 2), g_seed=1, cfg=0.0, top_k=1,
                                        return_idx=True)
    assert all(torch.equal(a, b) for a, b in zip(unconditional, null))
    smooth = var.autoregressive_infer_cfg(2, 1, g_seed=1, more_smooth=True)
    assert smooth.shape == (2, 3, 8, 8) and 0 <= smooth.min() and smooth.max() <= 1


# ---------------------------------------------------------------- filtering


def test_top_k_and_top_p_filter_the_expected_tokens():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log().view(1, 1, 4)
    kept = lambda filtered: torch.isfinite(filtered[0, 0]).tolist()  # noqa: E731

    filtered = logits.clone()
    sample_with_top_k_top_p_(filtered, top_k=2)
    assert kept(filtered) == [False, True, False, True]
    torch.testing.assert_close(filtered.softmax(-1)[0, 0], torch.tensor([0.0, 0.5, 0.0, 0.3]) / 0.8)

    for top_p, expected in [(0.45, [False, True, False, False]), (0.7, [False, True, False, True]),
                            (0.9, [False, True, True, True]), (0.99, [True, True, True, True])]:
        filtered = logits.clone()
        sample_with_top_k_top_p_(filtered, top_p=top_p)
        assert kept(filtered) == expected, top_p

    filtered = logits.clone()
    sample_with_top_k_top_p_(filtered, top_k=3, top_p=0.7)
    assert kept(filtered) == [False, True, False, True]
    unfiltered = logits.clone()
    sample_with_top_k_top_p_(unfiltered, top_k=10)  # k >= V keeps everything
    assert torch.equal(unfiltered, logits)


def test_sampling_follows_the_filtered_distribution():
    logits = torch.tensor([0.05, 0.5, 0.15, 0.3]).log().view(1, 1, 4).expand(1, 20_000, 4).clone()
    idx = sample_with_top_k_top_p_(logits, top_k=3, rng=torch.Generator().manual_seed(0))
    assert idx.shape == (1, 20_000, 1)
    frequencies = torch.bincount(idx.flatten(), minlength=4).float() / 20_000
    torch.testing.assert_close(frequencies, torch.tensor([0.0, 0.5, 0.15, 0.3]) / 0.95, atol=0.01, rtol=0)
    assert sample_with_top_k_top_p_(torch.randn(2, 3, 5), num_samples=4).shape == (2, 3, 4)


def test_gumbel_softmax_is_a_soft_sample_that_sharpens_as_tau_falls():
    logits = torch.randn(1000, 6)
    rng = torch.Generator().manual_seed(0)
    soft = gumbel_softmax_with_rng(logits, tau=1.0, rng=rng)
    torch.testing.assert_close(soft.sum(-1), torch.ones(1000))
    sharp = gumbel_softmax_with_rng(logits, tau=0.01, rng=rng)
    assert sharp.amax(-1).mean() > 0.99 > soft.amax(-1).mean()


# ---------------------------------------------------------------- bad input


def test_bad_input_fails_with_a_clear_message():
    vae = tiny_vae()
    var = tiny_var(vae)
    x = torch.randn(2, L - 1, CVAE)
    with pytest.raises(ValueError, match=r"\(B, 29, 8\)"):
        var(torch.tensor([0, 1]), torch.randn(2, L, CVAE))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\]"):
        var(torch.tensor([0, 4]), x)
    with pytest.raises(ValueError, match="integer tensor of shape"):
        var(torch.tensor([0.0, 1.0]), x)
    with pytest.raises(ValueError, match="integer tensor of shape"):
        var(torch.tensor([0, 1, 2]), x)
    with pytest.raises(ValueError, match="has no VQ-VAE"):
        tiny_var().autoregressive_infer_cfg(2, 0)
    with pytest.raises(ValueError, match="has no VQ-VAE"):
        tiny_var().training_loss(torch.tensor([0, 1]), random_pyramid(2))
    with pytest.raises(ValueError, match="list of 4 index maps"):
        var.training_loss(torch.tensor([0, 1]), random_pyramid(2)[:3])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 31\]"):
        var.training_loss(torch.tensor([0, 1]), [p + V for p in random_pyramid(2)])
    with pytest.raises(ValueError, match="B must be a positive int"):
        var.autoregressive_infer_cfg(0, 0)
    with pytest.raises(ValueError, match="cfg must be a finite number >= 0"):
        var.autoregressive_infer_cfg(2, 0, cfg=-1.0)
    with pytest.raises(ValueError, match="top_k must be an int >= 0"):
        var.autoregressive_infer_cfg(2, 0, top_k=-1)
    with pytest.raises(ValueError, match=r"top_p must be in \[0, 1\]"):
        var.autoregressive_infer_cfg(2, 0, top_p=1.5)
    with pytest.raises(ValueError, match=r"float tensor of shape \(B, l, V\)"):
        sample_with_top_k_top_p_(torch.randn(4, 5))
    with pytest.raises(ValueError, match="differ from the VQ-VAE's v_patch_nums"):
        VAR(vae, num_classes=3, depth=1, embed_dim=32, num_heads=2, patch_nums=(1, 2, 4))
    with pytest.raises(ValueError, match="Cvae=16 differs"):
        VAR(vae, num_classes=3, depth=1, embed_dim=32, num_heads=2, patch_nums=PATCH_NUMS, Cvae=16)
    with pytest.raises(ValueError, match="needs Cvae and vocab_size"):
        VAR(None, num_classes=3, depth=1, embed_dim=32, num_heads=2)
    with pytest.raises(ValueError, match=r"embed_dim \(30\) must be divisible by num_heads \(4\)"):
        VAR(vae, num_classes=3, depth=1, embed_dim=30, num_heads=4, patch_nums=PATCH_NUMS)
