import pytest
import torch
from reference import load_reference, module_tree, num_params, reference_tree

from minilib.diffloss import ResBlock, SimpleMLPAdaLN, modulate_vectors

# MAR's transformer width (encoder = decoder embed dim), which is the head's z_channels;
# models/mar.py: mar_base 768, mar_large 1024, mar_huge 1280.
Z_CHANNELS = {"MAR-B": 768, "MAR-L": 1024, "MAR-H": 1280}


@pytest.mark.parametrize("name", ["mar_b.json", "mar_l.json", "mar_h.json",
                                  "mar_l_diffloss_d12w1536.json", "mar_l_diffloss_d3w1024.json"])
def test_head_matches_the_official_tree(name):
    ref = load_reference(name)
    kwargs = ref["constructor"]["kwargs"]
    token_channels = kwargs["vae_embed_dim"] * kwargs["patch_size"] ** 2
    z_channels = Z_CHANNELS[ref["model"].split()[0]]
    with torch.device("meta"):
        net = SimpleMLPAdaLN(in_channels=token_channels, model_channels=kwargs["diffloss_w"],
                             out_channels=2 * token_channels,  # learned sigma
                             z_channels=z_channels, num_res_blocks=kwargs["diffloss_d"])
    assert module_tree(net) == reference_tree(ref, "diffloss.net.")
    assert num_params(net) == ref["diffloss_params"]


def test_seed_head_is_mar_large_d12_w1536():
    with torch.device("meta"):
        net = SimpleMLPAdaLN(16, 1536, 32, 1024, 12)
    assert num_params(net) == 150_813_728
    assert len(net.res_blocks) == 12 and net.final_layer.linear.weight.shape == (32, 1536)


def tiny_head(**kwargs):
    torch.manual_seed(0)
    return SimpleMLPAdaLN(**{"in_channels": 4, "model_channels": 32, "out_channels": 8, "z_channels": 6,
                             "num_res_blocks": 3, **kwargs})


def inputs(n=10):
    return torch.randn(n, 4), torch.randint(0, 1000, (n,)), torch.randn(n, 6)


def test_output_shape_and_exact_zero_at_init():
    net = tiny_head()
    out = net(*inputs())
    assert out.shape == (10, 8)
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero and a zero final linear


def test_every_res_block_is_the_identity_at_init():
    net = tiny_head()
    x, y = torch.randn(10, 32), torch.randn(10, 32)
    for block in net.res_blocks:
        assert torch.equal(block(x, y), x)
    assert all(torch.all(m.bias == 0) for m in net.modules() if isinstance(m, torch.nn.Linear))


def test_res_block_formula():
    torch.manual_seed(0)
    block = ResBlock(8)
    torch.nn.init.normal_(block.adaLN_modulation[1].weight)
    x, y = torch.randn(5, 8), torch.randn(5, 8)
    shift, scale, gate = block.adaLN_modulation(y).chunk(3, dim=-1)
    expected = x + gate * block.mlp(block.in_ln(x) * (1 + scale) + shift)
    torch.testing.assert_close(block(x, y), expected)
    torch.testing.assert_close(modulate_vectors(x, shift, scale), x * (1 + scale) + shift)


def test_a_few_adam_steps_fit_a_conditional_regression():
    net = tiny_head()
    torch.manual_seed(1)
    x, t, c = inputs(64)
    target = torch.cat([c[:, :4] - x, torch.zeros(64, 4)], dim=1)  # depends on the condition and the input
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (net(x, t, c) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_forward_with_cfg_guides_the_noise_only():
    net = tiny_head()
    for p in net.parameters():  # leave the all-zero init so the halves differ
        torch.nn.init.normal_(p, std=0.1)
    x, t, c = inputs(6)
    guided = net.forward_with_cfg(x, t, c, cfg_scale=3.0)
    raw = net(torch.cat([x[:3], x[:3]]), t, c)
    eps_c, eps_u = raw[:3, :4], raw[3:, :4]
    torch.testing.assert_close(guided[:3, :4], eps_u + 3.0 * (eps_c - eps_u))
    torch.testing.assert_close(guided[3:, :4], guided[:3, :4])
    torch.testing.assert_close(guided[:, 4:], raw[:, 4:])
    torch.testing.assert_close(net.forward_with_cfg(x, t, c, cfg_scale=1.0)[:3], raw[:3])


def test_bad_input_fails_with_a_clear_message():
    net = tiny_head()
    x, t, c = inputs()
    with pytest.raises(ValueError, match=r"x \(N, 4\), t \(N,\), c \(N, 6\)"):
        net(torch.randn(10, 5), t, c)
    with pytest.raises(ValueError, match="SimpleMLPAdaLN expects"):
        net(x, t[:, None], c)
    with pytest.raises(ValueError, match="SimpleMLPAdaLN expects"):
        net(x, t, c[:9])
    with pytest.raises(ValueError, match="even batch"):
        net.forward_with_cfg(x[:3], t[:3], c[:3], cfg_scale=2.0)
