"""Every model family runs under bfloat16 autocast and agrees with float32.

On a GPU the book trains and samples in bf16 autocast (minilib/training.py,
benchmarks/real_models.py). CI has no GPU, but PyTorch's CPU autocast takes
the same code paths: matmuls and attention in bf16, reductions and norms in
float32, and every place where minilib mixes dtypes (attention masks, the
VQ-VAE's float32 distances, schedule tables, the diffusion head's noise) must
cope. Each test compares a forward pass in autocast with the float32 one, with
weights randomised so that zero-initialised layers (adaLN-Zero) do not hide a
difference, or samples in autocast and checks the result.
"""

import pytest
import torch

from minilib import zoo
from minilib.autoencoder import SMALL_CONFIG as VAE_CONFIG, AutoencoderKL
from minilib.diffusion import GaussianDiffusion, beta_schedule
from minilib.mmdit import SMALL_CONFIG as MMDIT_CONFIG, MMDiT


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def randomise(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * std)
    return model.eval()


def assert_close_in_bf16(reference: torch.Tensor, autocast: torch.Tensor, tolerance: float = 0.05):
    """bf16 keeps 8 bits of mantissa: expect a relative error of about 1%, allow 5%."""
    assert torch.isfinite(autocast).all()
    error = (autocast.float() - reference).norm() / reference.norm()
    assert reference.norm() > 0 and error < tolerance, f"relative error {error:.3g}"


@torch.no_grad()
def test_dit_forward():
    model = randomise(zoo.build("dit-s-2", input_size=16))
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([10, 900]), torch.tensor([1, 1000])
    reference = model(x, t, y)
    with bf16():
        out = model(x, t, y)
    assert out.dtype == torch.bfloat16
    assert_close_in_bf16(reference, out)


@torch.no_grad()
def test_mmdit_forward():
    model = randomise(MMDiT(**MMDIT_CONFIG))
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 3, 16, 16, generator=g), torch.tensor([5.0, 800.0]),
              torch.randn(2, 64, generator=g), torch.randn(2, 5, 64, generator=g))
    reference = model(*inputs)
    with bf16():
        out = model(*inputs)
    assert_close_in_bf16(reference, out)


@torch.no_grad()
def test_kl_autoencoder_round_trip():
    vae = randomise(AutoencoderKL(**VAE_CONFIG), std=0.02)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    reference = vae.decode(vae.encode(x).mode())
    with bf16():
        out = vae.decode(vae.encode(x).mode())
    assert_close_in_bf16(reference, out)


@torch.no_grad()
def test_var_samples_the_same_codes_shapes_in_autocast():
    vae = zoo.build("small-var-digits-vqvae").eval()
    var = zoo.build("small-var-digits", vae_local=vae).eval()
    var.init_weights(init_head=1.0, init_adaln_gamma=1.0)
    with bf16():
        images = var.autoregressive_infer_cfg(4, torch.arange(4), g_seed=0, cfg=2.0, top_k=20, top_p=0.9)
        codes = var.autoregressive_infer_cfg(4, torch.arange(4), g_seed=0, cfg=2.0, return_idx=True)
    assert images.shape == (4, 1, 16, 16) and torch.isfinite(images.float()).all()
    assert [c.shape for c in codes] == [(4, pn * pn) for pn in (1, 2, 3, 4)]
    assert all(((c >= 0) & (c < vae.vocab_size)).all() for c in codes)


@torch.no_grad()
def test_mar_with_its_diffusion_head_samples_in_autocast():
    model = randomise(zoo.build("mar-small-digits"), std=0.02)
    model.diffloss.gen_diffusion = model.diffloss.train_diffusion.respace(5)
    torch.manual_seed(0)
    with bf16():
        tokens = model.sample_tokens(4, num_iter=4, cfg=2.0, labels=torch.arange(4), clip_denoised=True)
    assert tokens.shape == (4, 1, 8, 8) and torch.isfinite(tokens.float()).all()
    assert tokens.float().abs().max() <= 1.0 + 1e-3  # clipped x0 keeps the tokens in range


@torch.no_grad()
def test_mar_training_loss_in_autocast():
    model = randomise(zoo.build("mar-small-digits"), std=0.02).train()
    images, labels = torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8) % 10
    torch.manual_seed(3)
    reference = model(images, labels)
    torch.manual_seed(3)
    with bf16():
        loss = model(images, labels)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - reference.item()) < 0.05 * reference.item()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@torch.no_grad()
def test_few_shot_dit_samples_in_autocast(sampler):
    model = randomise(zoo.build("vfsddpm-shapes-small"), std=0.02)
    process = GaussianDiffusion(beta_schedule("linear", 1000)).respace(4)
    support = torch.rand(2, 6, 3, 16, 16) * 2 - 1
    with bf16():
        out = model.sample(process, support, num_samples=3, seed=0, sampler=sampler, guidance_scale=2.0)
    assert out.shape == (2, 3, 3, 16, 16) and torch.isfinite(out.float()).all()
