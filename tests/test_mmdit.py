import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from reference import load_reference, module_tree, num_params, reference_tree

from minilib import zoo
from minilib.adaln import DiTBlock
from minilib.mmdit import SMALL_CONFIG, MMDiT, JointBlock, RMSNorm, attention, block_mixing

# ---------------------------------------------------------------- official module trees

# The configurations of the zoo entries, as MMDiT keyword arguments.
FULL_SIZE = {
    "sd3-medium-mmdit": ("sd3_medium_mmditx.json", dict(
        in_channels=16, hidden_size=1536, depth=24, num_heads=24, pos_embed_max_size=192, patch_size=2,
        adm_in_channels=2048, context_dim=4096)),
    "sd3.5-medium-mmdit": ("sd35_medium_mmditx.json", dict(
        in_channels=16, hidden_size=1536, depth=24, num_heads=24, pos_embed_max_size=384, patch_size=2,
        adm_in_channels=2048, context_dim=4096, qk_norm="rms", x_block_self_attn_layers=list(range(13)))),
    "sd3.5-large-mmdit": ("sd35_large_mmditx.json", dict(
        in_channels=16, hidden_size=2432, depth=38, num_heads=38, pos_embed_max_size=192, patch_size=2,
        adm_in_channels=2048, context_dim=4096, qk_norm="rms")),
}


def config_from_reference(ref: dict) -> dict:
    """MMDiT's keyword arguments from the official constructor arguments in a reference file."""
    kw = ref["constructor"]["kwargs_resolved"]
    assert kw["context_embedder_config"]["target"] == "torch.nn.Linear"
    assert kw["defaults_left"]["register_length"] == 0 and kw["defaults_left"]["mlp_ratio"] == 4.0
    config = dict(in_channels=kw["in_channels"], hidden_size=ref["constructor"]["hidden_size"], depth=kw["depth"],
                  num_heads=ref["constructor"]["num_heads"], pos_embed_max_size=kw["pos_embed_max_size"],
                  patch_size=kw["patch_size"], adm_in_channels=kw["adm_in_channels"],
                  context_dim=kw["context_embedder_config"]["params"]["in_features"])
    if kw["qk_norm"] is not None:
        config["qk_norm"] = kw["qk_norm"]
    if kw["x_block_self_attn_layers"]:
        config["x_block_self_attn_layers"] = kw["x_block_self_attn_layers"]
    return config


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_model_matches_the_official_tree(name):
    file, config = FULL_SIZE[name]
    ref = load_reference(file)
    assert config == config_from_reference(ref)
    with torch.device("meta"):  # shapes only, no memory
        model = MMDiT(**config)
    assert module_tree(model) == reference_tree(ref)  # keys, shapes, param/buffer
    assert num_params(model) == ref["total_params"]
    for top, count in ref["params_by_top_level_module"].items():
        assert num_params(getattr(model, top)) == count, top


@pytest.mark.parametrize("name", FULL_SIZE)
def test_zoo_entry(name):
    if name not in zoo.names():
        pytest.skip(f"zoo entry {name!r} is not registered yet")
    entry = zoo.get(name)
    assert entry.builder == "minilib.mmdit:MMDiT" and entry.reference == FULL_SIZE[name][0]
    assert {**entry.config} == FULL_SIZE[name][1]


# ---------------------------------------------------------------- the small model


def small_model(**overrides):
    torch.manual_seed(0)
    return MMDiT(**{**SMALL_CONFIG, **overrides})


def small_inputs(model, B=2, H=32, W=32, L_c=5):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(B, model.in_channels, H, W, generator=g), torch.rand(B, generator=g) * 1000,
            torch.randn(B, 64, generator=g), torch.randn(B, L_c, 64, generator=g))


@pytest.mark.parametrize("H, W", [(32, 32), (16, 24), (8, 32), (2, 2)])
def test_small_model_outputs_exactly_zero_at_init(H, W):
    model = small_model()
    out = model(*small_inputs(model, H=H, W=W))
    assert out.shape == (2, 3, H, W)
    assert torch.equal(out, torch.zeros_like(out))  # zero adaLN and zero final linear


def test_small_config_size():
    model = small_model()
    assert num_params(model) == 2_279_692
    assert model.joint_blocks[-1].context_block.pre_only
    assert not any(block.context_block.pre_only for block in model.joint_blocks[:-1])


def first_block_inputs(model, *inputs, **kwargs):
    """The (context, x, c) that the first joint block receives."""
    seen = {}
    hook = model.joint_blocks[0].register_forward_pre_hook(lambda module, args: seen.update(args=args))
    model(*inputs, **kwargs)
    hook.remove()
    return seen["args"]


def test_non_square_images_use_the_centre_of_the_position_grid():
    model = small_model()
    x, t, y, context = small_inputs(model, H=12, W=20)  # a 6 x 10 patch grid in a 16 x 16 one
    _, tokens, _ = first_block_inputs(model, x, t, y, context)
    grid = model.pos_embed.reshape(16, 16, 128)
    centre = grid[5:11, 3:13].reshape(1, 60, 128)  # top = (16 - 6) // 2, left = (16 - 10) // 2
    assert torch.allclose(tokens, model.x_embedder(x) + centre)
    assert torch.equal(model.cropped_pos_embed(16, 16), model.pos_embed)  # the full grid: no crop


def test_register_tokens_are_prepended_to_the_context_and_not_output():
    model = small_model(register_length=3)
    x, t, y, context = small_inputs(model, L_c=5)
    first_context, tokens, _ = first_block_inputs(model, x, t, y, context)
    assert first_context.shape == (2, 3 + 5, 128)
    assert torch.equal(first_context[:, :3], model.register.expand(2, -1, -1))
    assert torch.allclose(first_context[:, 3:], model.context_embedder(context))
    assert tokens.shape == (2, 16 * 16, 128)
    assert model(x, t, y, context).shape == x.shape


def test_without_text_the_context_stream_is_the_registers():
    model = small_model(register_length=2, context_dim=None)
    x, t, y, _ = small_inputs(model)
    first_context, _, _ = first_block_inputs(model, x, t, y)
    assert torch.equal(first_context, model.register.expand(2, -1, -1))
    model = small_model(context_dim=None)  # no registers either: image self-attention only
    assert first_block_inputs(model, x, t, y)[0].shape == (2, 0, 128)
    assert model(x, t, y).shape == x.shape


class PassThrough(nn.Module):
    """A joint block that returns both streams unchanged."""

    def forward(self, context, x, c):
        return context, x


@pytest.mark.parametrize("skip", [[1], [0, 2], [3], [0, 1, 2, 3]])
def test_skip_layers_leave_exactly_those_blocks_out(skip):
    model = small_model(x_block_self_attn_layers=[1]).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():  # no zero layer, so every block changes the output
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    inputs = small_inputs(model, H=8, W=8)
    without = copy.deepcopy(model)
    for i in skip:
        without.joint_blocks[i] = PassThrough()
    with torch.no_grad():
        skipped = model(*inputs, skip_layers=skip)
        assert torch.equal(skipped, without(*inputs))
        assert (skipped - model(*inputs)).abs().max() > 1e-3


def test_a_few_adam_steps_reduce_the_mse():
    model = small_model()
    x, t, y, context = small_inputs(model, B=4, H=8, W=8)
    target = torch.randn_like(x)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = F.mse_loss(model(x, t, y, context), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


# ---------------------------------------------------------------- the pieces, by hand


def test_rms_norm_formula():
    torch.manual_seed(0)
    norm = RMSNorm(8)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 8)
    expected = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert torch.allclose(norm(x), expected, atol=1e-6)
    assert torch.allclose(norm(7.0 * x), norm(x), atol=1e-5)  # invariant to the scale of x
    assert [name for name, _ in norm.named_parameters()] == ["weight"]


def test_attention_helper_is_multi_head_softmax_attention():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 5, 12).double()
    heads = lambda t: t.reshape(2, 5, 3, 4).transpose(1, 2)  # noqa: E731
    weights = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(4), dim=-1)
    expected = (weights @ heads(v)).transpose(1, 2).reshape(2, 5, 12)
    assert torch.allclose(attention(q, k, v, 3), expected)


def hand_pre_attention(block, x, c):
    """A DismantledBlock's modulation and q, k, v, written out (heads as (B, H, L, d))."""
    D, H = x.shape[-1], block.attn.num_heads
    mods = (F.silu(c) @ block.adaLN_modulation[1].weight.T + block.adaLN_modulation[1].bias).chunk(block.n_mods, 1)
    x_norm = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)

    def qkv(attn, shift, scale):
        u = x_norm * (1 + scale[:, None]) + shift[:, None]
        q, k, v = (u @ attn.qkv.weight.T + attn.qkv.bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(*t.shape[:2], H, D // H).transpose(1, 2) for t in (q, k, v))
        rms = lambda t, g: t / torch.sqrt((t ** 2).mean(-1, keepdim=True) + 1e-6) * g  # noqa: E731
        return rms(q, attn.ln_q.weight), rms(k, attn.ln_k.weight), v

    return mods, qkv(block.attn, mods[0], mods[1]), (qkv(block.attn2, mods[6], mods[7]) if block.n_mods == 9 else None)


def hand_attention(q, k, v):
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    out = weights @ v  # (B, H, L, d)
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def hand_post_attention(block, x, attn, mods, qkv2):
    linear = lambda layer, u: u @ layer.weight.T + layer.bias  # noqa: E731
    x = x + mods[2][:, None] * linear(block.attn.proj, attn)
    if qkv2 is not None:
        x = x + mods[8][:, None] * linear(block.attn2.proj, hand_attention(*qkv2))
    x_norm = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
    u = x_norm * (1 + mods[4][:, None]) + mods[3][:, None]
    return x + mods[5][:, None] * linear(block.mlp.fc2, F.gelu(linear(block.mlp.fc1, u), approximate="tanh"))


@pytest.mark.parametrize("pre_only", [False, True])
@pytest.mark.parametrize("x_block_self_attn", [False, True])
def test_block_mixing_is_one_attention_over_both_streams(pre_only, x_block_self_attn):
    torch.manual_seed(0)
    block = JointBlock(32, 4, qk_norm="rms", pre_only=pre_only, x_block_self_attn=x_block_self_attn).double()
    with torch.no_grad():
        for p in block.parameters():  # nothing zero, nothing the identity
            p.normal_(std=0.3)
    context, x, c = torch.randn(2, 5, 32).double(), torch.randn(2, 7, 32).double(), torch.randn(2, 32).double()
    context_out, x_out = block(context, x, c)

    context_mods, (qc, kc, vc), _ = hand_pre_attention(block.context_block, context, c)
    x_mods, (qx, kx, vx), qkv2 = hand_pre_attention(block.x_block, x, c)
    joint = hand_attention(torch.cat([qc, qx], 2), torch.cat([kc, kx], 2), torch.cat([vc, vx], 2))  # (B, 12, D)
    assert torch.allclose(x_out, hand_post_attention(block.x_block, x, joint[:, 5:], x_mods, qkv2))
    if pre_only:
        assert context_out is None
        assert not hasattr(block.context_block, "mlp") and not hasattr(block.context_block.attn, "proj")
        assert block.context_block.adaLN_modulation[1].out_features == 2 * 32
    else:
        assert torch.allclose(context_out, hand_post_attention(block.context_block, context, joint[:, :5],
                                                               context_mods, None))


def test_a_dismantled_block_on_its_own_is_a_dit_block():
    torch.manual_seed(0)
    joint = JointBlock(32, 4)
    with torch.no_grad():
        for p in joint.parameters():
            p.normal_(std=0.3)
    dit = DiTBlock(32, 4)
    dit.load_state_dict(joint.x_block.state_dict())  # the same names: attn.qkv, attn.proj, mlp.fc1, ...
    x, c = torch.randn(2, 7, 32), torch.randn(2, 32)
    assert torch.allclose(joint.x_block(x, c), dit(x, c), atol=1e-5)


def test_block_mixing_rejects_mismatched_streams():
    block = JointBlock(32, 4)
    with pytest.raises(ValueError, match="block_mixing expects"):
        block_mixing(torch.randn(3, 5, 32), torch.randn(2, 7, 32), block.context_block, block.x_block,
                     torch.randn(2, 32))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("change, message", [
    (dict(context=torch.randn(2, 5, 48)), r"context of shape \(2, L_c, 64\)"),
    (dict(context=None), r"needs context"),
    (dict(x=torch.randn(2, 3, 15, 16)), "not divisible by the patch size 2"),
    (dict(x=torch.randn(2, 3, 34, 16)), "too large.*largest is 32x32"),
    (dict(x=torch.randn(2, 4, 16, 16)), "expects 3 channels"),
    (dict(y=None), r"pooled embedding y of shape \(2, 64\)"),
    (dict(y=torch.randn(2, 32)), r"pooled embedding y of shape \(2, 64\)"),
    (dict(t=torch.rand(3)), r"t of shape \(2,\)"),
])
def test_bad_input_raises_a_clear_error(change, message):
    model = small_model()
    x, t, y, context = small_inputs(model, H=16, W=16)
    inputs = {**dict(x=x, t=t, y=y, context=context), **change}
    with pytest.raises(ValueError, match=message):
        model(**inputs)


def test_bad_configuration_raises_a_clear_error():
    with pytest.raises(ValueError, match="qk_norm"):
        small_model(qk_norm="ln")
    with pytest.raises(ValueError, match="not block indices"):
        small_model(x_block_self_attn_layers=[4])
    with pytest.raises(ValueError, match=r"hidden_size \(\d+\) must be divisible by num_heads"):
        small_model(num_heads=5)
    with pytest.raises(ValueError, match=r"skip_layers \[4\] are not block indices 0..3"):
        model = small_model()
        model(*small_inputs(model, H=8, W=8), skip_layers=[1, 4])
    with pytest.raises(ValueError, match="takes no y"):
        model = small_model(adm_in_channels=None)
        x, t, y, context = small_inputs(model)
        model(x, t, y, context)
