import pytest
import torch

from minilib.adaln import Attention, DiTBlock, FinalLayer, TinyDenoiser, modulate


def test_modulate_formula_and_broadcast():
    x = torch.randn(2, 5, 4)
    shift, scale = torch.randn(2, 4), torch.randn(2, 4)
    out = modulate(x, shift, scale)
    torch.testing.assert_close(out[1, 3], x[1, 3] * (1 + scale[1]) + shift[1])
    torch.testing.assert_close(modulate(x, None, scale), x * (1 + scale[:, None]))
    torch.testing.assert_close(modulate(x, torch.zeros(2, 4), torch.zeros(2, 4)), x)


def test_modulate_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"x \(B, L, D\)"):
        modulate(torch.randn(2, 5, 4), torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"x \(B, L, D\)"):
        modulate(torch.randn(5, 4), torch.randn(5, 4), torch.randn(5, 4))


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = Attention(dim=8, num_heads=2)
    x = torch.randn(3, 5, 8)
    q, k, v = attn.qkv(x).reshape(3, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)  # sqrt(head_dim) = 2
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(3, 5, 8))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_dit_block_is_identity_at_init_and_not_after_training_the_modulation():
    block = DiTBlock(hidden_size=16, num_heads=4)
    x, c = torch.randn(2, 6, 16), torch.randn(2, 16)
    torch.testing.assert_close(block(x, c), x)
    torch.nn.init.normal_(block.adaLN_modulation[1].weight)
    assert not torch.allclose(block(x, c), x)


def test_dit_block_keys_follow_the_official_layout():
    keys = set(DiTBlock(hidden_size=384, num_heads=6).state_dict())
    assert keys == {"attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
                    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
                    "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"}
    block = DiTBlock(hidden_size=384, num_heads=6)
    assert block.adaLN_modulation[1].weight.shape == (2304, 384)  # DiT-S/2 reference


def test_final_layer_outputs_zero_at_init():
    layer = FinalLayer(hidden_size=16, patch_size=2, out_channels=3)
    out = layer(torch.randn(2, 6, 16), torch.randn(2, 16))
    assert out.shape == (2, 6, 12)
    assert torch.all(out == 0)


@pytest.mark.parametrize("conditioning", ["adaln_zero", "in_context"])
def test_tiny_denoiser_shapes_and_zero_output_at_init(conditioning):
    model = TinyDenoiser(image_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                         num_classes=5, conditioning=conditioning)
    x = torch.randn(4, 3, 8, 8)
    out = model(x, torch.rand(4), torch.randint(0, 5, (4,)))
    assert out.shape == x.shape
    assert torch.all(out == 0)


@pytest.mark.parametrize("conditioning", ["adaln_zero", "in_context"])
def test_tiny_denoiser_output_depends_on_label_after_a_few_steps(conditioning):
    torch.manual_seed(0)
    model = TinyDenoiser(image_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=1, num_heads=2,
                         num_classes=2, class_dropout_prob=0.0, conditioning=conditioning)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.randn(16, 1, 8, 8)
    labels = torch.arange(16) % 2
    target = torch.where(labels[:, None, None, None] == 1, 1.0, -1.0).expand_as(x)
    losses = []
    for _ in range(60):
        loss = (model(x, torch.full((16,), 0.5), labels) - target).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    model.eval()
    with torch.no_grad():
        out = model(x[:2], torch.full((2,), 0.5), torch.tensor([0, 1]))
    assert out[0].mean() < 0 < out[1].mean()


def test_tiny_denoiser_rejects_unknown_conditioning():
    with pytest.raises(ValueError, match="conditioning must be one of"):
        TinyDenoiser(conditioning="cross_attention")
