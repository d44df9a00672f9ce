"""VAR's multi-scale VQ-VAE: phis, the token pyramid, f_hat, the teacher-forcing input, official keys."""

import pytest
import torch
import torch.nn.functional as F

from minilib import zoo
from minilib.autoencoder import AttnBlock
from minilib.datasets import ShapesDataset
from minilib.vqvae import VQVAE, Phi, PhiNonShared, PhiPartiallyShared, PhiShared, VectorQuantizer2
from reference import load_reference

TINY = dict(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2), num_res_blocks=1, norm_groups=4,
            v_patch_nums=(1, 2, 3, 4))


def tiny_vqvae(seed=0, **overrides):
    torch.manual_seed(seed)
    vae = VQVAE(**{**TINY, **overrides}).eval()
    vae.quantize.embedding.weight.data.normal_()
    return vae


def colour_quantizer(v_patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), quant_resi=0.0):
    """A multi-scale quantiser on raw RGB (Cvae = 3) whose codebook is a 17^3 grid of colours (spacing 0.25)."""
    g = torch.linspace(-2, 2, 17)
    grid = torch.cartesian_prod(g, g, g)
    q = VectorQuantizer2(len(grid), 3, v_patch_nums=v_patch_nums, quant_resi=quant_resi)
    q.embedding.weight.data.copy_(grid)
    return q


def test_phi_blends_the_identity_and_a_conv():
    torch.manual_seed(0)
    phi = Phi(6, quant_resi=0.5)
    h = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(phi(h), 0.5 * h + 0.5 * F.conv2d(h, phi.weight, phi.bias, padding=1))
    assert phi.weight.shape == (6, 6, 3, 3)


def test_partially_shared_phi_picks_the_nearest_tick():
    phis = PhiPartiallyShared(torch.nn.ModuleList(Phi(4, 0.5) for _ in range(4)))
    torch.testing.assert_close(torch.tensor(phis.ticks), torch.tensor([1 / 12, 13 / 36, 23 / 36, 11 / 12], dtype=torch.float64))
    # VAR's 10 scales share the 4 phis as 0,0,1,1,1,2,2,3,3,3 (the official checkpoint depends on it)
    assert [phis.index(si / 9) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [phis.index(si / 5) for si in range(6)] == [0, 0, 1, 2, 3, 3]
    assert phis[0.95] is phis.qresi_ls[3] and phis[0.0] is phis.qresi_ls[0]
    # K != 4 uses ticks at (2i + 1) / 2K
    three = PhiPartiallyShared(torch.nn.ModuleList(Phi(4, 0.5) for _ in range(3)))
    torch.testing.assert_close(torch.tensor(three.ticks), torch.tensor([1 / 6, 1 / 2, 5 / 6], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        phis[1.5]


def test_shared_and_non_shared_phis():
    shared = PhiShared(Phi(4, 0.5))
    assert shared[0.0] is shared[1.0] is shared.qresi
    non_shared = PhiNonShared([Phi(4, 0.5) for _ in range(6)])
    assert [non_shared[si / 5] for si in range(6)] == list(non_shared._modules.values())
    q = VectorQuantizer2(16, 4, v_patch_nums=(1, 2, 4), share_quant_resi=0)
    assert isinstance(q.quant_resi, PhiNonShared) and len(q.quant_resi) == 3
    assert isinstance(VectorQuantizer2(16, 4, v_patch_nums=(1, 2, 4), share_quant_resi=1).quant_resi, PhiShared)
    assert isinstance(VectorQuantizer2(16, 4, v_patch_nums=(1, 2, 4), quant_resi=0.0).phi(0), torch.nn.Identity)


def test_multiscale_quantisation_of_an_image_gets_better_with_every_scale():
    images = ShapesDataset(16, image_size=32, seed=3).images
    f = F.interpolate(images, size=(16, 16), mode="area")      # an RGB "feature map"
    q = colour_quantizer()
    f_hats = q.f_to_idxBl_or_fhat(f, to_fhat=True)
    errors = [F.mse_loss(f_hat, f).item() for f_hat in f_hats]
    assert len(errors) == 10
    assert all(b < a for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.125 ** 2         # the last scale quantises the rest to the grid


def test_forward_is_straight_through_with_the_var_vq_loss():
    torch.manual_seed(0)
    q = VectorQuantizer2(32, 4, v_patch_nums=(1, 2, 4), beta=0.25)
    f = torch.randn(3, 4, 4, 4, requires_grad=True)
    f_hat, usages, loss = q(f, ret_usages=True)
    assert usages is not None and len(usages) == 3
    partial = q.f_to_idxBl_or_fhat(f.detach(), to_fhat=True)
    torch.testing.assert_close(f_hat, partial[-1])
    expected = sum(1.25 * F.mse_loss(p, f.detach()) for p in partial) / 3
    torch.testing.assert_close(loss, expected)
    w = torch.randn_like(f)
    (f_hat * w).sum().backward()
    torch.testing.assert_close(f.grad, w)              # d f_hat / d f = identity
    f.grad = None
    _, _, loss = q(f)
    loss.backward()
    assert q.embedding.weight.grad.abs().sum() > 0 and q.quant_resi.qresi_ls[0].weight.grad is not None
    assert f.grad.abs().sum() > 0                       # the commitment term reaches the encoder


def test_training_records_code_hits_per_scale():
    q = VectorQuantizer2(32, 4, v_patch_nums=(1, 2, 4)).train()
    f = torch.randn(5, 4, 4, 4)
    q(f)
    assert q.ema_vocab_hit_SV.sum(1).tolist() == [5.0, 20.0, 80.0]
    q.eval()(f)
    assert q.ema_vocab_hit_SV.sum(1).tolist() == [5.0, 20.0, 80.0]


def test_tokens_to_image_matches_the_fhat_path():
    vae = tiny_vqvae()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    idx = vae.img_to_idxBl(x)
    assert [tuple(i.shape) for i in idx] == [(2, 1), (2, 4), (2, 9), (2, 16)]
    assert all(i.dtype == torch.int64 for i in idx)
    with torch.no_grad():
        from_tokens = vae.idxBl_to_img(idx, same_shape=True)
        from_fhat = vae.img_to_reconstructed_img(x)
        for a, b in zip(from_tokens, from_fhat):
            assert a.shape == (2, 3, 8, 8) and a.abs().max() <= 1
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vae.idxBl_to_img(idx, same_shape=True, last_one=True), from_fhat[-1])
        # the official experimental path: f_hat grows scale by scale instead of living at full size
        growing = vae.idxBl_to_img(idx, same_shape=False)
        assert [tuple(img.shape) for img in growing] == [(2, 3, 2 * p, 2 * p) for p in (1, 2, 3, 4)]
        torch.testing.assert_close(vae.img_to_reconstructed_img(x, last_one=True), from_fhat[-1])
        f_hat = vae.quantize.f_to_idxBl_or_fhat(vae.encode(x), to_fhat=True)[-1]
        torch.testing.assert_close(vae.fhat_to_img(f_hat), from_fhat[-1])
        rec, usages, vq_loss = vae(x)
        torch.testing.assert_close(rec.clamp(-1, 1), from_fhat[-1], atol=1e-5, rtol=1e-5)
        assert usages is None and vq_loss.ndim == 0


def test_teacher_forcing_input_matches_autoregressive_steps():
    vae = tiny_vqvae()
    q = vae.quantize
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    idx = vae.img_to_idxBl(x)
    with torch.no_grad():
        var_input = q.idxBl_to_var_input(idx)
        assert var_input.shape == (3, 4 + 9 + 16, 8) and var_input.dtype == torch.float32
        f_hat = torch.zeros(3, 8, 4, 4)
        pieces = []
        SN = len(q.v_patch_nums)
        for si, pn in enumerate(q.v_patch_nums):
            h = q.embedding(idx[si]).transpose(1, 2).reshape(3, 8, pn, pn)
            f_hat, next_input = q.get_next_autoregressive_input(si, SN, f_hat, h)
            if si < SN - 1:
                assert next_input.shape == (3, 8, q.v_patch_nums[si + 1], q.v_patch_nums[si + 1])
                pieces.append(next_input.flatten(2).transpose(1, 2))
        torch.testing.assert_close(var_input, torch.cat(pieces, 1))
        # sampling ends at the same f_hat as quantising the image
        torch.testing.assert_close(f_hat, q.f_to_idxBl_or_fhat(vae.encode(x), to_fhat=True)[-1])
        # the first piece is the area-down-sampled f_hat after the 1x1 scale
        first = q.phi(0)(F.interpolate(q.embedding(idx[0]).transpose(1, 2).reshape(3, 8, 1, 1), size=(4, 4),
                                       mode="bicubic"))
        torch.testing.assert_close(var_input[:, :4], F.interpolate(first, size=(2, 2), mode="area").flatten(2).transpose(1, 2))


def test_fused_qkv_attention_is_the_official_computation():
    torch.manual_seed(0)
    block = AttnBlock(32, norm_groups=8, fused_qkv=True)
    assert set(dict(block.named_parameters())) == {"norm.weight", "norm.bias", "qkv.weight", "qkv.bias",
                                                   "proj_out.weight", "proj_out.bias"}
    x = torch.randn(2, 32, 3, 5)
    # VAR's basic_vae.AttnBlock, written out
    B, C, H, W = x.shape
    q, k, v = block.qkv(block.norm(x)).reshape(B, 3, C, H, W).unbind(1)
    w = torch.softmax(torch.bmm(q.view(B, C, H * W).permute(0, 2, 1), k.view(B, C, H * W)) * C ** -0.5, dim=2)
    h = torch.bmm(v.view(B, C, H * W), w.permute(0, 2, 1)).view(B, C, H, W)
    torch.testing.assert_close(block(x), x + block.proj_out(h), atol=1e-5, rtol=1e-5)
    # and the same function as the unfused block with split weights
    split = AttnBlock(32, norm_groups=8)
    state = {k: v for k, v in block.state_dict().items() if not k.startswith("qkv")}
    for name, wq, bq in zip("qkv", block.qkv.weight.chunk(3), block.qkv.bias.chunk(3)):
        state[f"{name}.weight"], state[f"{name}.bias"] = wq, bq
    split.load_state_dict(state)
    torch.testing.assert_close(split(x), block(x))


def test_official_key_state_dict_loads_strictly():
    reference = load_reference("var_vqvae_ch160v4096z32.json")
    full = zoo.build("var-vqvae", device="meta")
    assert zoo.count_parameters(full) == 108_948_355 == reference["total_params"]
    official = {key: torch.empty(entry["shape"], device="meta") for key, entry in reference["state_dict"].items()}
    full.load_state_dict(official, strict=True, assign=True)
    assert full.quantize.ema_vocab_hit_SV.shape == (10, 4096)
    assert [full.quantize.quant_resi.index(si / 9) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    # a small model: a round trip with strict=True, and a hit buffer of another scale count is ignored
    vae = tiny_vqvae()
    state = {k: torch.randn_like(v) for k, v in vae.state_dict().items()}
    state["quantize.ema_vocab_hit_SV"] = torch.zeros(7, 64)
    vae.load_state_dict(state, strict=True)
    torch.testing.assert_close(vae.quantize.embedding.weight, state["quantize.embedding.weight"])
    state["quantize.embedding.weigth"] = state.pop("quantize.embedding.weight")
    with pytest.raises(RuntimeError, match=r"(?s)Missing key.*quantize\.embedding\.weight"):
        vae.load_state_dict(state, strict=True)


def test_test_mode_freezes_and_the_small_zoo_model_trains_a_step():
    frozen = VQVAE(**TINY, test_mode=True)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    vae = zoo.build("small-var-vqvae").train()
    assert vae.image_size == 32 and vae.quantize.v_patch_nums == (1, 2, 3, 4, 6, 8)
    x = ShapesDataset(4, seed=0).images
    rec, usages, vq_loss = vae(x, ret_usages=True)
    assert rec.shape == x.shape and len(usages) == 6
    ((rec - x).pow(2).mean() + vq_loss).backward()
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0 and vae.quantize.embedding.weight.grad.abs().sum() > 0


def test_bad_input_raises_clear_errors():
    vae = tiny_vqvae()
    with pytest.raises(ValueError, match=r"images \(B, 3, 8, 8\)"):
        vae(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"inp_img_no_grad must have 4 dimensions \(B, C, H, W\)"):
        vae.img_to_idxBl(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match="last scale"):
        vae.img_to_idxBl(torch.randn(1, 3, 12, 12))
    with pytest.raises(ValueError, match="v_patch_nums"):
        vae.quantize(torch.randn(1, 8, 6, 6))
    with pytest.raises(ValueError, match=r"feature map \(B, 8, h, w\)"):
        vae.quantize(torch.randn(1, 5, 4, 4))
    idx = vae.img_to_idxBl(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="one per scale"):
        vae.idxBl_to_img(idx[:3])
    with pytest.raises(ValueError, match=r"scale 2 needs integer indices \(B, 9\)"):
        vae.idxBl_to_img([idx[0], idx[1], idx[3], idx[3]])
    with pytest.raises(ValueError, match="increasing"):
        VectorQuantizer2(16, 4, v_patch_nums=(2, 1))


def test_eini_reinitialises_the_codebook():
    q = VectorQuantizer2(64, 4, v_patch_nums=(1, 2))
    q.eini(-1.0)
    assert q.embedding.weight.abs().max() <= 1 / 64
    torch.manual_seed(0)
    q.eini(0.5)
    assert 0.4 < q.embedding.weight.std() < 0.6 and q.embedding.weight.abs().max() <= 2.0   # truncated at +-2
    before = q.embedding.weight.clone()
    q.eini(0.0)
    torch.testing.assert_close(q.embedding.weight, before)
