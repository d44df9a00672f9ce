"""MAR (minilib/mar.py): masking, the MAE encoder/decoder, the cosine schedule, sampling, CFG, the loss."""

import math

import numpy as np
import pytest
import torch
from einops import rearrange
from reference import load_reference

from minilib import zoo
from minilib.mar import MAR, Block, TruncatedNormal, mask_by_order, mask_schedule, numpy_mask_ratio, numpy_orders


def tiny(**overrides):
    """8x8 "latents" of 3 channels in 2x2 patches: L = 16 tokens of 12 numbers; no dropout."""
    torch.manual_seed(0)
    config = dict(img_size=8, vae_stride=1, patch_size=2, vae_embed_dim=3, encoder_embed_dim=32, encoder_depth=2,
                  encoder_num_heads=4, decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4, class_num=5,
                  buffer_size=3, attn_dropout=0.0, proj_dropout=0.0, diffloss_d=2, diffloss_w=32,
                  num_sampling_steps="5", diffusion_batch_mul=2)
    return MAR(**{**config, **overrides})


def randomise_head(model):
    """The diffusion head starts at exactly zero output (adaLN-Zero); give it some weights."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.diffloss.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_patchify_is_the_official_layout_and_unpatchify_inverts_it():
    model = tiny()
    x = torch.randn(2, 3, 8, 8)
    tokens = model.patchify(x)
    # the official code: reshape to (n, c, h, p, w, p) and einsum 'nchpwq->nhwcpq'
    official = torch.einsum("nchpwq->nhwcpq", x.reshape(2, 3, 4, 2, 4, 2)).reshape(2, 16, 12)
    assert torch.equal(tokens, official)
    assert torch.equal(model.unpatchify(tokens), x)
    with pytest.raises(ValueError, match=r"latents of shape \(B, 3, 8, 8\)"):
        model.patchify(torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"tokens of shape \(B, 16, 12\)"):
        model.unpatchify(torch.randn(2, 15, 12))


def test_orders_are_random_permutations():
    model = tiny()
    torch.manual_seed(0)
    orders = model.sample_orders(50)
    assert orders.shape == (50, 16) and orders.dtype == torch.long
    assert torch.equal(orders.sort(dim=1).values, torch.arange(16).expand(50, 16))
    assert len({tuple(row) for row in orders.tolist()}) == 50


def test_mask_ratio_is_the_left_half_truncated_normal_of_the_official_code():
    ours = tiny().mask_ratio_generator
    # scipy.stats.truncnorm((0.7 - 1.0) / 0.25, 0, loc=1.0, scale=0.25), as in models/mar.py:
    # its pdf at 0.65 .. 1.05 and its quantiles at 0.1 .. 0.9 (importing scipy here would take seconds)
    grid = torch.tensor([0.65, 0.7, 0.75, 0.8, 0.9, 1.0, 1.05], dtype=torch.float64)
    scipy_pdf = torch.tensor([0.0, 2.0178826137, 2.5144365699, 3.01032712, 3.8268757935, 4.1456050567, 0.0],
                             dtype=torch.float64)
    torch.testing.assert_close(ours.pdf(grid), scipy_pdf, atol=1e-9, rtol=0)
    samples = ours.rvs(20_000, generator=torch.Generator().manual_seed(0))
    assert samples.min() >= 0.7 and samples.max() <= 1.0
    quantiles = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    scipy_ppf = torch.tensor([0.7446819039, 0.7995222771, 0.8742874763, 0.9390981302, 0.9758405176],
                             dtype=torch.float64)
    torch.testing.assert_close(samples.quantile(quantiles), scipy_ppf, atol=0.006, rtol=0)
    torch.testing.assert_close(ours.ppf(quantiles), scipy_ppf, atol=1e-9, rtol=0)  # the inverse CDF itself
    assert ours.ppf(torch.tensor([0.0, 1.0])).tolist() == [0.7, 1.0]
    with pytest.raises(ValueError, match="std > 0"):
        TruncatedNormal(1.0, 0.0, 0.7, 1.0)


def test_random_masking_masks_ceil_L_r_tokens_first_in_each_order():
    model = tiny()
    x = torch.zeros(4, 16, 12)
    for seed in range(20):
        orders = model.sample_orders(4)
        torch.manual_seed(seed)
        ratio = model.mask_ratio_generator.rvs(1).item()
        torch.manual_seed(seed)
        mask = model.random_masking(x, orders)
        k = math.ceil(16 * ratio)
        assert mask.dtype == torch.bool and mask.shape == (4, 16)
        assert mask.sum(dim=1).tolist() == [k] * 4 and k >= math.ceil(0.7 * 16)
        assert torch.equal(mask, mask_by_order(k, orders))
        assert all(mask[b, orders[b, :k]].all() and not mask[b, orders[b, k:]].any() for b in range(4))


def test_numpy_orders_are_the_official_stream_of_shuffles():
    np.random.seed(4)
    orders = numpy_orders(5, 16)
    assert orders.shape == (5, 16) and orders.dtype == torch.long
    assert torch.equal(orders.sort(dim=1).values, torch.arange(16).expand(5, 16))
    np.random.seed(4)
    first = np.arange(16)
    np.random.shuffle(first)  # the official sample_orders: one in-place shuffle per image, in turn
    assert orders[0].tolist() == first.tolist() and not torch.equal(orders[0], orders[1])
    assert torch.equal(numpy_orders(5, 16, rng=np.random.RandomState(4)), orders)  # the global one, reseeded
    assert not torch.equal(numpy_orders(5, 16), orders)  # the global stream moved on
    with pytest.raises(ValueError, match="bsz and seq_len must be positive ints"):
        numpy_orders(0, 16)


def test_numpy_mask_ratio_is_scipys_inverse_cdf_draw():
    distribution = tiny().mask_ratio_generator
    np.random.seed(7)
    u = np.random.uniform(size=1)  # what scipy's truncnorm.rvs(1) takes from numpy's global generator
    np.random.seed(7)
    ratio = numpy_mask_ratio(distribution)
    assert ratio == distribution.ppf(torch.from_numpy(u)).item() and 0.7 <= ratio <= 1.0
    assert numpy_mask_ratio(distribution, rng=np.random.RandomState(7)) == ratio


def test_given_orders_and_mask_ratio_set_the_training_mask(monkeypatch):
    model = randomise_head(tiny())
    orders = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(b)) for b in range(2)])
    seen = {}
    real = model.forward_loss
    monkeypatch.setattr(model, "forward_loss", lambda z, target, mask: seen.update(mask=mask) or real(z, target, mask))
    model(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), orders=orders, mask_ratio=0.74)
    assert torch.equal(seen["mask"], mask_by_order(12, orders))  # ceil(16 * 0.74) = 12, first in each order
    images, labels = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"mask_ratio must lie in \(0, 1\]"):
        model(images, labels, orders=orders, mask_ratio=0.0)
    with pytest.raises(ValueError, match=r"orders must be an integer tensor of shape \(B, L\) = \(2, 16\)"):
        model(images, labels, orders=orders[:, :8])
    with pytest.raises(ValueError, match="orders must be an integer tensor"):
        model(images, labels, orders=orders.float())
    repeated = orders.clone()
    repeated[1, 0] = repeated[1, 1]
    with pytest.raises(ValueError, match="each row must be a permutation of 0 .. 15"):
        model(images, labels, orders=repeated)


def test_label_drop_is_drawn_with_the_cpu_generator_first():
    model = tiny(label_drop_prob=0.5)
    torch.manual_seed(3)
    x = torch.randn(8, 16, 12)
    mask = mask_by_order(10, model.sample_orders(8))
    class_embedding = model.class_emb(torch.arange(8) % 5)
    torch.manual_seed(9)
    drop = torch.rand(8) < 0.5  # the official code: torch.rand(bsz) < label_drop_prob, on the CPU
    assert 0 < drop.sum() < 8
    torch.manual_seed(9)
    with torch.no_grad():
        trained = model.train().forward_mae_encoder(x, mask, class_embedding)
        expected = torch.where(drop[:, None], model.fake_latent.expand(8, -1), class_embedding)
        torch.testing.assert_close(trained, model.eval().forward_mae_encoder(x, mask, expected))


def masked_setup(model, num_masked=10):
    torch.manual_seed(3)
    x = torch.randn(2, 16, 12)
    mask = mask_by_order(num_masked, model.sample_orders(2))
    return x, mask, model.class_emb(torch.tensor([1, 4]))


def test_the_encoder_sees_only_the_unmasked_tokens_and_the_buffer():
    model = tiny().eval()
    x, mask, class_embedding = masked_setup(model)
    with torch.no_grad():
        encoded = model.forward_mae_encoder(x, mask, class_embedding)
        assert encoded.shape == (2, 3 + 16 - 10, 32)  # buffer + unmasked tokens only
        z = model.forward_mae_decoder(encoded, mask)
        assert z.shape == (2, 16, 32)
        changed = x.clone()
        changed[mask] = 100 * torch.randn_like(changed[mask])  # new values at the masked positions
        assert torch.equal(model.forward_mae_encoder(changed, mask, class_embedding), encoded)
        unmasked = x.clone()
        unmasked[~mask] += 1.0
        assert not torch.allclose(model.forward_mae_encoder(unmasked, mask, class_embedding), encoded)
        # with everything masked, only the buffer (the class) is encoded
        everything = torch.ones_like(mask)
        assert model.forward_mae_encoder(x, everything, class_embedding).shape == (2, 3, 32)


def test_training_drops_labels_to_the_fake_latent():
    x, mask, class_embedding = masked_setup(tiny())
    dropped = tiny(label_drop_prob=1.0)
    with torch.no_grad():
        train_out = dropped.train().forward_mae_encoder(x, mask, class_embedding)
        fake = dropped.fake_latent.expand(2, -1)
        assert torch.allclose(train_out, dropped.eval().forward_mae_encoder(x, mask, fake))
        kept = tiny(label_drop_prob=0.0)
        assert torch.allclose(kept.train().forward_mae_encoder(x, mask, class_embedding),
                              kept.eval().forward_mae_encoder(x, mask, class_embedding))


def test_masks_must_have_one_count_per_batch():
    model = tiny()
    x, mask, class_embedding = masked_setup(model)
    mask[0, mask[0].nonzero()[0]] = False
    with pytest.raises(ValueError, match="same number of masked tokens"):
        model.forward_mae_encoder(x, mask, class_embedding)
    with pytest.raises(ValueError, match=r"mask must have shape \(B, L\) = \(2, 16\)"):
        model.forward_mae_encoder(x, mask[:, :8], class_embedding)


def official_schedule(seq_len, num_iter):
    """The number of masked tokens after each step, as models/mar.py's sample_tokens computes it."""
    import numpy as np
    masked, out = seq_len, []
    for step in range(num_iter):
        mask_len = np.floor(seq_len * np.cos(math.pi / 2.0 * (step + 1) / num_iter))
        mask_len = max(1, min(masked - 1, mask_len))
        masked = 0 if step >= num_iter - 1 else int(mask_len)
        out.append(masked)
    return out


@pytest.mark.parametrize("seq_len", [1, 2, 5, 16, 256])
def test_cosine_schedule_reveals_every_token_by_the_last_step_and_is_monotone(seq_len):
    for num_iter in sorted({min(n, seq_len) for n in (1, 2, 3, seq_len // 4 or 1, seq_len // 2 or 1, seq_len, 64)}):
        schedule = mask_schedule(seq_len, num_iter)
        assert len(schedule) == num_iter and schedule[-1] == 0
        revealed = [before - after for before, after in zip([seq_len] + schedule, schedule)]
        assert all(r >= 1 for r in revealed) and sum(revealed) == seq_len
        assert schedule == official_schedule(seq_len, num_iter)
    assert mask_schedule(16, 8) == [15, 14, 13, 11, 8, 6, 3, 0]
    with pytest.raises(ValueError, match="num_iter must be an int from 1 to seq_len"):
        mask_schedule(seq_len, seq_len + 1)


def test_sampling_reveals_tokens_by_the_schedule_in_the_random_order():
    model = randomise_head(tiny()).eval()
    torch.manual_seed(5)
    orders = model.sample_orders(3)
    torch.manual_seed(5)
    latents, history = model.sample_tokens(3, num_iter=6, labels=torch.tensor([0, 2, 4]), return_history=True)
    schedule = mask_schedule(16, 6)
    assert latents.shape == (3, 3, 8, 8) and len(history) == 6
    seen = torch.zeros(3, 16, dtype=torch.bool)
    for k, step in enumerate(history):
        before = 16 if k == 0 else schedule[k - 1]
        assert step["revealed"].sum(dim=1).tolist() == [before - schedule[k]] * 3
        assert not (step["revealed"] & seen).any()  # each token is sampled once
        seen |= step["revealed"]
        assert torch.equal(step["masked"], ~seen)
        for b in range(3):  # the first `schedule[k]` entries of each order stay masked
            assert set(step["revealed"][b].nonzero().flatten().tolist()) == set(orders[b, schedule[k]:before].tolist())
        if k:  # tokens sampled earlier never change
            known = history[k - 1]["tokens"][~history[k - 1]["masked"]]
            assert torch.equal(step["tokens"][~history[k - 1]["masked"]], known)
    assert seen.all() and torch.equal(latents, model.unpatchify(history[-1]["tokens"]))


def test_clip_denoised_keeps_a_poorly_trained_heads_pixels_in_range():
    model = randomise_head(tiny()).eval()
    torch.manual_seed(0)
    clipped = model.sample_tokens(2, num_iter=4, cfg=2.0, labels=torch.tensor([0, 1]), clip_denoised=True)
    assert clipped.abs().max() <= 1.0 + 1e-4 and torch.isfinite(clipped).all()


def test_sampling_with_given_orders_and_a_seed_is_repeatable_and_leaves_the_global_stream():
    model = randomise_head(tiny()).eval()
    orders = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(b)) for b in range(2)])
    torch.manual_seed(100)
    before = torch.random.get_rng_state()
    latents, history = model.sample_tokens(2, num_iter=4, orders=orders, seed=3, return_history=True)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's stream is untouched
    first = mask_schedule(16, 4)[0]
    for b in range(2):  # the tokens revealed first are the last ones of the given order
        assert set(history[0]["revealed"][b].nonzero().flatten().tolist()) == set(orders[b, first:].tolist())
    assert torch.equal(model.sample_tokens(2, num_iter=4, orders=orders, seed=3), latents)
    assert not torch.allclose(model.sample_tokens(2, num_iter=4, orders=orders, seed=4), latents)
    torch.manual_seed(3)  # seed=s is torch.manual_seed(s) before a plain call, also for the orders
    assert torch.equal(model.sample_tokens(2, num_iter=4, orders=orders), latents)
    torch.manual_seed(3)
    assert torch.equal(model.sample_tokens(2, num_iter=4), model.sample_tokens(2, num_iter=4, seed=3))
    with pytest.raises(ValueError, match="seed must be an int or None"):
        model.sample_tokens(2, num_iter=4, seed=1.5)
    with pytest.raises(ValueError, match="each row must be a permutation"):
        model.sample_tokens(2, num_iter=4, orders=torch.zeros(2, 16, dtype=torch.long))


def spy_on_sampling(model, monkeypatch):
    calls = []
    real = model.diffloss.sample

    def sample(z, temperature=1.0, cfg=1.0, clip_denoised=False):
        calls.append((z.clone(), float(cfg), temperature))
        assert not clip_denoised  # the official sampler does not clip
        return real(z, temperature, cfg, clip_denoised=clip_denoised)

    monkeypatch.setattr(model.diffloss, "sample", sample)
    return calls


def test_cfg_runs_a_conditional_and_an_unconditional_half_with_the_linear_schedule(monkeypatch):
    model = randomise_head(tiny()).eval()
    calls = spy_on_sampling(model, monkeypatch)
    labels = torch.tensor([1, 3])
    runs = {}
    for name, kwargs in [("cond", dict(cfg=1.0, labels=labels)), ("uncond", dict(cfg=1.0, labels=None)),
                         ("linear", dict(cfg=3.0, labels=labels)),
                         ("constant", dict(cfg=3.0, labels=labels, cfg_schedule="constant"))]:
        calls.clear()
        torch.manual_seed(0)
        model.sample_tokens(2, num_iter=4, temperature=0.7, **kwargs)
        runs[name] = list(calls)
    schedule = mask_schedule(16, 4)
    # scale 1: one pass, the conditional model alone
    assert [len(z) for z, _, _ in runs["cond"]] == [2 * (b - a) for b, a in zip([16] + schedule, schedule)]
    assert all(cfg == 1.0 and temperature == 0.7 for _, cfg, temperature in runs["cond"])
    # guided: twice the batch; the halves are the conditional and the unconditional model
    z_cond, z_uncond, z_guided = runs["cond"][0][0], runs["uncond"][0][0], runs["linear"][0][0]
    assert len(z_guided) == 2 * len(z_cond)
    torch.testing.assert_close(z_guided[: len(z_cond)], z_cond)
    torch.testing.assert_close(z_guided[len(z_cond):], z_uncond)
    expected = [1 + 2.0 * (16 - max(m, 1)) / 16 for m in schedule]
    assert [cfg for _, cfg, _ in runs["linear"]] == pytest.approx(expected)
    assert expected[0] < expected[-1] < 3.0
    assert [cfg for _, cfg, _ in runs["constant"]] == [3.0] * 4


def test_cfg_scale_1_equals_the_conditional_model(monkeypatch):
    model = randomise_head(tiny()).eval()
    calls = spy_on_sampling(model, monkeypatch)
    labels = torch.tensor([2, 2])
    torch.manual_seed(0)
    orders = model.sample_orders(2)
    torch.manual_seed(0)
    model.sample_tokens(2, num_iter=4, cfg=1.0, labels=labels)
    # by hand: the conditional model's conditions at the first step, for the tokens it reveals
    with torch.no_grad():
        everything = torch.ones(2, 16, dtype=torch.bool)
        encoded = model.forward_mae_encoder(torch.zeros(2, 16, 12), everything, model.class_emb(labels))
        z = model.forward_mae_decoder(encoded, everything)
    first = ~mask_by_order(mask_schedule(16, 4)[0], orders)
    assert calls[0][1] == 1.0
    torch.testing.assert_close(calls[0][0], z[first])
    # With the fake latent equal to the class embedding the two halves agree, and then
    # eps_u + s (eps_c - eps_u) = eps_c: guidance at any scale is the conditional model.
    with torch.no_grad():
        model.fake_latent.copy_(model.class_emb.weight[2:3])
    calls.clear()
    torch.manual_seed(0)
    model.sample_tokens(2, num_iter=4, cfg=3.0, labels=labels)
    z_pair, scale, _ = calls[0]
    n = len(z_pair) // 2
    torch.testing.assert_close(z_pair[:n], z_pair[n:])
    x, t = torch.randn(n, 12), torch.randint(0, 1000, (n,))
    with torch.no_grad():
        guided = model.diffloss.net.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), z_pair, scale)
        conditional = model.diffloss.net(x, t, z_pair[:n])
    torch.testing.assert_close(guided[:n, :12], conditional[:, :12])


def test_the_loss_counts_only_the_masked_tokens(monkeypatch):
    model = randomise_head(tiny())
    z = torch.randn(2, 16, 32, requires_grad=True)
    target = torch.randn(2, 16, 12)
    mask = mask_by_order(10, model.sample_orders(2))
    torch.manual_seed(0)
    loss = model.forward_loss(z, target, mask)
    loss.backward()
    changed = target.clone()
    changed[~mask] += 5.0
    torch.manual_seed(0)
    assert model.forward_loss(z, changed, mask).item() == pytest.approx(loss.item())
    assert z.grad[~mask].abs().max() == 0 and (z.grad[mask].abs().sum(dim=-1) > 0).all()
    # forward(): the diffusion loss sees every token diffusion_batch_mul times, and the mask
    seen = {}
    real = model.diffloss.forward

    def spy(target, z, mask=None):
        seen.update(target=target, z=z, mask=mask)
        return real(target, z, mask)

    monkeypatch.setattr(model.diffloss, "forward", spy)
    torch.manual_seed(7)
    model(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    assert seen["target"].shape == (2 * 2 * 16, 12) and seen["z"].shape == (2 * 2 * 16, 32)
    assert seen["mask"].sum().item() % (2 * 2) == 0 and seen["mask"].sum().item() >= 2 * 2 * 12


def test_a_tiny_mar_learns(monkeypatch):
    model = tiny(diffusion_batch_mul=4)
    torch.manual_seed(0)
    images, labels = torch.randn(8, 3, 8, 8).clamp(-1, 1), torch.arange(8) % 5
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(images, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10


def test_block_is_a_pre_norm_vit_block():
    torch.manual_seed(0)
    block = Block(16, 4).eval()
    x = torch.randn(2, 5, 16)
    h = block.norm1(x)
    q, k, v = block.attn.qkv(h).reshape(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    attention = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v
    x1 = x + block.attn.proj(attention.transpose(1, 2).reshape(2, 5, 16))
    expected = x1 + block.mlp.fc2(torch.nn.functional.gelu(block.mlp.fc1(block.norm2(x1))))
    torch.testing.assert_close(block(x), expected)


def test_bad_inputs_fail_readably():
    model = tiny().eval()
    with pytest.raises(ValueError, match="labels must be an integer tensor of shape"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\]"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"latents of shape \(B, 3, 8, 8\)"):
        model(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_iter must be an int from 1 to seq_len = 16"):
        model.sample_tokens(1, num_iter=17)
    with pytest.raises(ValueError, match="cfg_schedule must be 'linear' or 'constant'"):
        model.sample_tokens(1, num_iter=2, cfg=2.0, cfg_schedule="cosine")
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        model.sample_tokens(1, num_iter=2, temperature=0.0)
    with pytest.raises(ValueError, match="img_size 9 must be divisible"):
        tiny(img_size=9)


def test_official_key_state_dicts_load_strictly():
    reference = load_reference("mar_b.json")
    model = zoo.build("mar-base", device="meta")
    official = {key: torch.empty(entry["shape"], device="meta") for key, entry in reference["state_dict"].items()}
    model.load_state_dict(official, strict=True, assign=True)
    official["encoder_blocks.0.attn.qkv.weigth"] = official.pop("encoder_blocks.0.attn.qkv.weight")
    with pytest.raises(RuntimeError, match=r"(?s)Missing key\(s\).*qkv\.weight.*Unexpected key\(s\).*weigth"):
        model.load_state_dict(official, strict=True, assign=True)
    # a small model's own state dict (official names) round-trips exactly
    small, other = tiny(), tiny()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other.load_state_dict(small.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), other.state_dict().values()))


def test_the_seed_printout_is_mar_large_with_the_d12_w1536_head():
    model = zoo.build("mar-large-d12w1536", device="meta")
    assert zoo.count_parameters(model) == 556_909_600
    assert model.seq_len == 256 and model.token_embed_dim == 16 and model.buffer_size == 64
    assert len(model.diffloss.net.res_blocks) == 12 and model.class_emb.weight.shape == (1000, 1024)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    images, labels = torch.randn(2, 3, 8, 8), torch.tensor([0, 3])
    grads = []
    for flag in (False, True):
        model = randomise_head(tiny(grad_checkpointing=flag))
        torch.manual_seed(0)
        loss = model(images, labels)
        loss.backward()
        grads.append((loss.detach(), model.encoder_blocks[0].attn.qkv.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
