"""The few-shot model VFSDDPM (Giannone et al.; the JAX port's CIFAR-100 configuration): set encoder,
leave-one-out, conditioning, full-size counts against the parameter summary published with that configuration."""

import math

import pytest
import torch
from reference import load_reference

from minilib import zoo
from minilib.datasets import ShapesDataset
from minilib.diffusion import GaussianDiffusion, beta_schedule
from minilib.fewshot import (ContextDiT, LocalitySelfAttention, SetViT, ShiftedPatchTokenization, VFSDDPM,
                             class_sets, component_parameters, gaussian_kl, infinite_sets, leave_one_out,
                             leave_one_out_index)

# the published parameter summary (book/vfsddpm-parameters.md), row by row (its own arithmetic adds up to these totals)
SUMMARY_DIT = {"x_embedder": 4_608, "pos_embed": 98_304, "t_embedder": 245_760, "context_proj": 147_840,
            "blocks": 31_938_048, "final_layer": 301_068}
SUMMARY_ENCODER = {"spt": 28_032, "pos_embedding": 98_688, "blocks": 10_646_784, "norm": 768}

# minilib's vfsddpm-cifar100, pinned
DIT = {"x_embedder": 4_992, "pos_embed": 98_304, "t_embedder": 246_528, "context_proj": 147_840,
       "blocks": 31_919_616, "final_layer": 300_300}
ENCODER = {"spt": 23_544, "cls_token": 384, "pos_embedding": 98_688, "blocks": 10_646_790, "norm": 768}


def small(**kwargs):
    torch.manual_seed(0)
    config = dict(image_size=8, in_channels=3, patch_size=2, hidden_size=32, depth=2, num_heads=4, hdim=32,
                  encoder_depth=2, sample_size=4)
    return VFSDDPM(**{**config, **kwargs})


# --- the full-size configuration of the JAX port ------------------------------------


def test_vfsddpm_cifar100_has_the_jax_port_hyper_parameters():
    config = zoo.get("vfsddpm-cifar100").config
    port = load_reference("vfsddpm_jax_seedcfg_9ea3f86.json")["constructor"]["resolved_cfg"]
    for key in ["image_size", "in_channels", "sample_size", "hdim", "hidden_size", "depth", "num_heads",
                "mlp_ratio", "patch_size"]:
        assert config[key] == port[key], key
    assert (config["conditioning"], config["context"]) == (port["mode_conditioning"], port["mode_context"])
    assert config["encoder_depth"] == 6      # "Transformer Blocks (x6)"
    assert port["context_channels"] == port["hdim"]  # the context projection is hdim -> hidden_size


def test_vfsddpm_cifar100_parameters_component_by_component():
    model = zoo.build("vfsddpm-cifar100", device="meta")
    counts = component_parameters(model)
    assert {k[4:]: v for k, v in counts.items() if k.startswith("dit/")} == DIT
    assert {k[8:]: v for k, v in counts.items() if k.startswith("encoder/")} == ENCODER
    assert sum(DIT.values()) == 32_717_580
    assert sum(ENCODER.values()) == 10_770_174
    assert zoo.count_parameters(model) == 43_487_754
    # the frozen sin-cos table is counted, as in DiT; everything else trains
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["dit.pos_embed"]


def test_per_block_counts():
    model = zoo.build("vfsddpm-cifar100", device="meta")
    block = model.dit.blocks[0]
    n = lambda m: sum(p.numel() for p in m.parameters())
    assert (n(block.attn), n(block.mlp), n(block.adaLN_modulation)) == (591_360, 1_181_568, 887_040)
    assert n(block) == 2_659_968  # no LayerNorm weights: adaLN supplies shift and scale
    layer = model.encoder.blocks[0]
    assert (n(layer.norm1) + n(layer.norm2), n(layer.attn), n(layer.mlp)) == (1_536, 591_361, 1_181_568)
    assert n(layer) == 1_774_465 and len(model.encoder.blocks) == 6 and len(model.dit.blocks) == 12


def test_every_difference_from_the_published_summary_is_accounted_for():
    """Each row differs from the published parameter summary by exactly the amount the appendix explains."""
    assert sum(SUMMARY_DIT.values()) == 32_735_628 and sum(SUMMARY_ENCODER.values()) == 10_774_272
    assert DIT["x_embedder"] - SUMMARY_DIT["x_embedder"] == 384                   # the patch conv's bias
    assert DIT["t_embedder"] - SUMMARY_DIT["t_embedder"] == 384 + 384             # the two MLP biases
    assert SUMMARY_DIT["blocks"] - DIT["blocks"] == 12 * 2 * 2 * 384              # LayerNorm weights adaLN replaces
    assert SUMMARY_DIT["final_layer"] - DIT["final_layer"] == 2 * 384             # likewise in the final layer
    assert SUMMARY_ENCODER["spt"] == (2 * 2 * 3 * 6) * 384 + 384                  # 6 images stacked, no shifts
    assert ENCODER["spt"] == (2 * 2 * 3 * 5) * 384 + 384 + 2 * 60              # image + 4 shifts, LayerNorm(60)
    assert ENCODER["blocks"] - SUMMARY_ENCODER["blocks"] == 6                     # one LSA temperature per block
    assert ENCODER["pos_embedding"] == (1 + 256) * 384 == SUMMARY_ENCODER["pos_embedding"]
    # the DiT built from chapter 5's blocks is exactly the DiT of the built JAX code at 9ea3f86
    jax = load_reference("vfsddpm_jax_seedcfg_9ea3f86.json")
    assert sum(DIT.values()) == jax["params_by_part"]["dit"]
    assert jax["seed_table"]["dit_total"] == sum(SUMMARY_DIT.values())
    assert jax["seed_table"]["encoder_total"] == sum(SUMMARY_ENCODER.values())


# --- the set encoder ------------------------------------------------------------


def test_shifted_patch_tokenization_concatenates_four_diagonal_shifts():
    spt = ShiftedPatchTokenization(patch_size=4, in_channels=3, dim=16)
    x = torch.randn(2, 3, 8, 8)
    copies = spt.shifted_copies(x)
    assert copies.shape == (2, 15, 8, 8) and spt.shift == 2
    torch.testing.assert_close(copies[:, :3], x)
    # left-up: the pixel at (y, x) comes from (y + 2, x + 2); the vacated rim is zero
    torch.testing.assert_close(copies[:, 3:6, :6, :6], x[:, :, 2:, 2:])
    assert torch.all(copies[:, 3:6, 6:] == 0) and torch.all(copies[:, 3:6, :, 6:] == 0)
    torch.testing.assert_close(copies[:, 6:9, :6, 2:], x[:, :, 2:, :6])    # right-up
    torch.testing.assert_close(copies[:, 9:12, 2:, :6], x[:, :, :6, 2:])   # left-down
    torch.testing.assert_close(copies[:, 12:15, 2:, 2:], x[:, :, :6, :6])  # right-down
    assert spt(x).shape == (2, 4, 16) and spt.proj.in_features == 4 * 4 * 15


def test_locality_self_attention_masks_the_diagonal_and_learns_its_temperature():
    torch.manual_seed(0)
    lsa = LocalitySelfAttention(dim=8, num_heads=2)
    assert lsa.temperature.shape == () and math.isclose(lsa.temperature.item(), math.log(4 ** -0.5), rel_tol=1e-6)
    x = torch.randn(3, 5, 8)
    q, k, v = lsa.qkv(x).reshape(3, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) * lsa.temperature.exp()
    logits = logits.masked_fill(torch.eye(5, dtype=torch.bool), float("-inf"))
    expected = lsa.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(3, 5, 8))
    torch.testing.assert_close(lsa(x), expected)
    # with two tokens each one can only read the other
    pair = torch.randn(1, 2, 8)
    v = lsa.qkv(pair)[..., 16:]
    torch.testing.assert_close(lsa(pair), lsa.proj(v.flip(1)))
    lsa(x).sum().backward()
    assert lsa.temperature.grad is not None and lsa.temperature.grad != 0
    with pytest.raises(ValueError, match="at least 2 tokens"):
        lsa(torch.randn(1, 1, 8))


def test_set_encoder_is_invariant_to_the_order_of_the_set():
    torch.manual_seed(0)
    encoder = SetViT(image_size=8, patch_size=2, in_channels=3, dim=32, depth=2, num_heads=4)
    sets = torch.randn(3, 5, 3, 8, 8)
    pooled, tokens = encoder(sets)
    assert pooled.shape == (3, 32) and tokens.shape == (3, 1 + 16, 32)
    for seed in range(3):
        order = torch.randperm(5, generator=torch.Generator().manual_seed(seed))
        p2, t2 = encoder(sets[:, order])
        torch.testing.assert_close(p2, pooled, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(t2, tokens, atol=1e-5, rtol=1e-5)
    # ... but not to the content: replacing one image changes the context
    changed = sets.clone()
    changed[:, 2] = torch.randn(3, 3, 8, 8)
    assert (encoder(changed)[0] - pooled).abs().max() > 1e-3
    # any set size works, down to a single image
    assert encoder(sets[:, :1])[0].shape == (3, 32)


# --- leave-one-out --------------------------------------------------------------


def test_leave_one_out_context_never_contains_its_target():
    assert leave_one_out_index(4).tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    sets = torch.randn(3, 4, 1, 2, 2)
    targets, contexts = leave_one_out(sets)
    assert targets.shape == (12, 1, 2, 2) and contexts.shape == (12, 3, 1, 2, 2)
    for b in range(3):
        for j in range(4):
            target, context = targets[4 * b + j], contexts[4 * b + j]
            torch.testing.assert_close(target, sets[b, j])
            assert not any(torch.equal(image, target) for image in context)
            torch.testing.assert_close(context, sets[b, [i for i in range(4) if i != j]])
    with pytest.raises(ValueError, match="at least 2"):
        leave_one_out(torch.randn(2, 1, 3))


def test_training_loss_encodes_exactly_the_leave_one_out_contexts(monkeypatch):
    model = small()
    sets = torch.randn(2, 4, 3, 8, 8)
    seen = []
    original = model.encode
    monkeypatch.setattr(model, "encode", lambda s, **kw: seen.append(s) or original(s, **kw))
    diffusion = GaussianDiffusion(beta_schedule("cosine", 100))
    out = model.training_loss(diffusion, sets)
    torch.testing.assert_close(seen[0], leave_one_out(sets)[1])
    assert set(out) == {"loss", "mse", "kl"} and out["kl"] == 0 and out["loss"] == out["mse"]


# --- conditioning ------------------------------------------------------------------


def colour_sets(colours, set_size, generator):
    """Sets of nearly flat images, one colour per set: ``colours (B, 3) -> (B, S, 3, 8, 8)``."""
    noise = 0.05 * torch.randn(len(colours), set_size, 3, 8, 8, generator=generator)
    return (colours.view(-1, 1, 3, 1, 1) + noise).clamp(-1, 1)


@pytest.fixture(scope="module", params=["film", "tokens"])
def trained(request):
    """A small model trained for 40 leave-one-out steps on sets of one colour each."""
    model = small(conditioning=request.param)
    diffusion = GaussianDiffusion(beta_schedule("cosine", 100))
    generator = torch.Generator().manual_seed(0)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        sets = colour_sets(torch.rand(6, 3, generator=generator) * 2 - 1, 4, generator)
        loss = model.training_loss(diffusion, sets)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return model.eval(), diffusion, losses


def test_leave_one_out_training_lowers_the_loss(trained):
    _, _, losses = trained
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_two_different_support_sets_give_different_samples(trained):
    model, diffusion, _ = trained
    colours = torch.tensor([[0.9, -0.6, -0.6], [-0.6, -0.6, 0.9]])  # a red set and a blue set
    support = colour_sets(colours, 5, torch.Generator().manual_seed(1))
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    samples = model.sample(diffusion.respace(10), support, num_samples=4, noise=noise)  # same start noise
    assert samples.shape == (2, 4, 3, 8, 8)
    assert (samples[0] - samples[1]).abs().mean() > 0.1
    mean_colour = samples.mean(dim=(3, 4))  # (2, 4, 3)
    redness = mean_colour[..., 0] - mean_colour[..., 2]  # red minus blue, (2, 4)
    assert torch.all(redness[0] > redness[1])  # from the same noise, the red set's sample is the redder one
    again = model.sample(diffusion.respace(10), support[[0, 0]], num_samples=4, noise=noise)
    torch.testing.assert_close(again[0], again[1])
    torch.testing.assert_close(again[0], samples[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="noise"):
        model.sample(diffusion, support, num_samples=2, noise=noise)


def test_film_and_token_conditioning_shapes():
    film = ContextDiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=4,
                      context_dim=16, conditioning="film")
    tokens = ContextDiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=4,
                        context_dim=16, conditioning="tokens")
    x, t = torch.randn(2, 3, 8, 8), torch.randint(0, 1000, (2,))
    out = film(x, t, torch.randn(2, 16))
    assert out.shape == (2, 3, 8, 8) and torch.all(out == 0)  # adaLN-Zero: an untrained DiT predicts 0
    assert tokens(x, t, torch.randn(2, 7, 16)).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="context"):
        film(x, t, torch.randn(2, 7, 16))
    with pytest.raises(ValueError, match="context"):
        tokens(x, t, torch.randn(2, 16))
    assert small(conditioning="tokens").encode(torch.randn(2, 5, 3, 8, 8))[0].shape == (2, 1 + 16, 32)


def test_context_dropout_and_classifier_free_guidance():
    model = small(context_dropout_prob=0.25)
    assert model.null_context.shape == (32,)
    context = torch.randn(4000, 32)
    assert torch.equal(model.null_contexts(context), model.null_context.expand(4000, 32))
    # training replaces about a quarter of the contexts by the null context
    model.null_context.data.fill_(7.0)
    seen = []
    model.dit.forward = lambda x, t, context: seen.append(context) or torch.zeros_like(x)
    model.train().training_loss(GaussianDiffusion(beta_schedule("cosine", 100)), torch.randn(200, 4, 3, 8, 8))
    dropped = (seen[0] == 7.0).all(dim=1).float().mean().item()
    assert 0.2 < dropped < 0.3
    del model.dit.forward
    # guided sampling: eps = eps(null) + s (eps(c) - eps(null)), with the same start noise in both halves
    model = small(context_dropout_prob=0.1).eval()
    with torch.no_grad():
        for p in model.parameters():
            if torch.all(p == 0):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    diffusion = GaussianDiffusion(beta_schedule("cosine", 100)).respace(4)
    support, noise = torch.randn(2, 5, 3, 8, 8), torch.randn(2, 3, 3, 8, 8)
    torch.testing.assert_close(model.sample(diffusion, support, 3, noise=noise, guidance_scale=1.0),
                               model.sample(diffusion, support, 3, noise=noise))
    c = model.encode(support)[0].repeat_interleave(3, dim=0)

    def by_hand(x, t, context):
        unconditional = model(x, t, model.null_contexts(context))
        return unconditional + 3.0 * (model(x, t, context) - unconditional)

    expected = diffusion.ddim_sample_loop(by_hand, (6, 3, 8, 8), dict(context=c), noise=noise.flatten(0, 1),
                                          clip_denoised=True)
    torch.testing.assert_close(model.sample(diffusion, support, 3, noise=noise, guidance_scale=3.0),
                               expected.view(2, 3, 3, 8, 8), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="null context"):
        small().eval().sample(diffusion, support, 3, guidance_scale=2.0)


# --- the variational context ----------------------------------------------------------


def test_gaussian_kl_matches_torch_distributions():
    mu, logvar = torch.randn(4, 6), torch.randn(4, 6)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros(4, 6), torch.ones(4, 6))
    torch.testing.assert_close(gaussian_kl(mu, logvar), torch.distributions.kl_divergence(q, p))
    assert torch.all(gaussian_kl(torch.zeros(3), torch.zeros(3)) == 0)


def test_variational_context_samples_in_training_and_uses_the_mean_in_eval():
    model = small(context="variational")
    assert sum(p.numel() for p in model.posterior.parameters()) == (32 * 32 + 32) + (32 * 64 + 64)
    sets = torch.randn(2, 5, 3, 8, 8)
    model.train()
    (c1, kl), (c2, _) = model.encode(sets), model.encode(sets)
    assert c1.shape == (2, 32) and kl.shape == (2,) and torch.all(kl > 0) and not torch.allclose(c1, c2)
    model.eval()
    (m1, _), (m2, _) = model.encode(sets), model.encode(sets)
    torch.testing.assert_close(m1, m2)
    mu, logvar = model.posterior(model.encoder(sets)[0]).chunk(2, dim=-1)
    torch.testing.assert_close(m1, mu)
    torch.testing.assert_close(model.encode(sets)[1], gaussian_kl(mu, logvar).mean(dim=1))
    model.train()
    torch.manual_seed(0)
    out = model.training_loss(GaussianDiffusion(beta_schedule("cosine", 100)), torch.randn(2, 4, 3, 8, 8),
                              kl_weight=0.5)
    torch.testing.assert_close(out["loss"], out["mse"] + 0.5 * out["kl"])
    out["loss"].backward()
    assert model.posterior[0].weight.grad.abs().sum() > 0


# --- data and input checks ------------------------------------------------------------


def test_class_sets_and_infinite_sets_draw_distinct_images_of_one_class():
    data = ShapesDataset(240, image_size=8, seed=0)
    batch = next(infinite_sets(data, set_size=5, batch_size=3, seed=0))
    assert batch.shape == (3, 5, 3, 8, 8)
    index = {tuple(img.flatten().tolist()): i for i, img in enumerate(data.images)}
    for s in batch:
        ids = [index[tuple(img.flatten().tolist())] for img in s]
        assert len(set(ids)) == 5 and len({data.labels[i].item() for i in ids}) == 1
    again = next(infinite_sets(data, set_size=5, batch_size=3, seed=0))
    torch.testing.assert_close(batch, again)
    sets = class_sets(data.images, data.labels, [2, 2, 7], 4, torch.Generator().manual_seed(0))
    assert sets.shape == (3, 4, 3, 8, 8)
    with pytest.raises(ValueError, match="fewer than the set size"):
        class_sets(data.images, data.labels, [0], 100)


def test_bad_inputs_fail_readably():
    model = small()
    diffusion = GaussianDiffusion(beta_schedule("cosine", 100))
    with pytest.raises(ValueError, match=r"\(B, S, C, H, W\)"):
        model.encode(torch.randn(5, 3, 8, 8))
    with pytest.raises(ValueError, match="expected sets"):
        model.encode(torch.randn(2, 5, 1, 8, 8))
    with pytest.raises(ValueError, match="sample_size=4"):
        model.training_loss(diffusion, torch.randn(2, 6, 3, 8, 8))
    with pytest.raises(ValueError, match="conditioning"):
        small(conditioning="cross")
    with pytest.raises(ValueError, match="context"):
        small(context="discrete")
    with pytest.raises(ValueError, match="at least 2"):
        small(sample_size=1)
    with pytest.raises(ValueError, match="context_dropout_prob"):
        small(context_dropout_prob=1.0)


def test_the_chapter_configuration_builds_and_runs():
    model = zoo.build("vfsddpm-shapes-small")
    sets = torch.randn(2, model.sample_size, 3, 16, 16)
    out = model.training_loss(GaussianDiffusion(beta_schedule("cosine", 1000)), sets)
    assert torch.isfinite(out["loss"])
