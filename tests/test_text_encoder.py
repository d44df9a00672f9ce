import pytest
import torch

from minilib.datasets import tokenize
from minilib.mmdit import MMDiT
from minilib.text_encoder import TextEncoder, TextToImage

CAPTIONS = ["a red circle, top left", "a blue cross, centre", ""]


def test_shapes():
    encoder = TextEncoder(dim=32, depth=2, num_heads=4, max_length=8)
    tokens = tokenize(CAPTIONS)
    context, pooled = encoder(tokens)
    assert context.shape == (3, 1 + tokens.shape[1], 32)
    assert pooled.shape == (3, 32)
    assert torch.isfinite(context).all() and torch.isfinite(pooled).all()  # the empty caption too
    assert torch.equal(context[0, 1 + 6:], torch.zeros_like(context[0, 7:]))  # padding rows are zero


def test_padding_invariance():
    torch.manual_seed(0)
    encoder = TextEncoder(dim=32, max_length=8).eval()
    short, long = tokenize(CAPTIONS), tokenize(CAPTIONS, length=8)
    context_short, pooled_short = encoder(short)
    context_long, pooled_long = encoder(long)
    torch.testing.assert_close(pooled_short, pooled_long, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(context_short, context_long[:, :context_short.shape[1]], atol=1e-5, rtol=1e-5)
    assert torch.all(context_long[:, context_short.shape[1]:] == 0)


def test_determinism():
    torch.manual_seed(1)
    encoder = TextEncoder(dim=32)
    tokens = tokenize(CAPTIONS)
    a, b = encoder(tokens), encoder(tokens)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.manual_seed(1)
    again = TextEncoder(dim=32)
    assert torch.equal(again(tokens)[1], a[1])


def test_bad_input():
    encoder = TextEncoder(dim=32, max_length=4)
    with pytest.raises(ValueError, match="integer"):
        encoder(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="integer"):
        encoder(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="max_length"):
        encoder(tokenize(["a red circle, top left"]))
    with pytest.raises(ValueError, match="token ids"):
        encoder(torch.full((1, 2), 999))
    with pytest.raises(ValueError, match="divisible"):
        TextEncoder(dim=30, num_heads=4)


def test_text_to_image_runs_and_learns_gradients():
    torch.manual_seed(0)
    encoder = TextEncoder(dim=16, num_heads=2)
    mmdit = MMDiT(in_channels=3, hidden_size=32, depth=2, num_heads=2, pos_embed_max_size=8, patch_size=4,
                  adm_in_channels=16, context_dim=16)
    model = TextToImage(encoder, mmdit)
    x, t, tokens = torch.randn(3, 3, 16, 16), torch.rand(3), tokenize(CAPTIONS)
    out = model(x, t, tokens)
    assert out.shape == x.shape
    torch.nn.init.normal_(mmdit.final_layer.linear.weight, std=0.1)  # open the zero-initialised output
    for block in mmdit.joint_blocks:
        torch.nn.init.normal_(block.x_block.adaLN_modulation[1].weight, std=0.1)
    model(x, t, tokens).pow(2).mean().backward()
    assert encoder.word_embedding.weight.grad.abs().sum() > 0
