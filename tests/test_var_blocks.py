import math

import pytest
import torch
import torch.nn.functional as F
from reference import load_reference, module_tree, num_params, reference_tree
from torch import nn

from minilib.var import FFN, AdaLNBeforeHead, AdaLNSelfAttn, DropPath, SelfAttention, SharedAdaLin

# ---------------------------------------------------------------- official module trees


@pytest.mark.parametrize("name", ["var_d16.json", "var_d20.json", "var_d24.json", "var_d30.json"])
def test_blocks_and_head_nm_match_the_official_tree(name):
    ref = load_reference(name)
    cfg = ref["constructor"]["derived"]
    C, depth = cfg["embed_dim"], ref["constructor"]["depth"]
    with torch.device("meta"):  # shapes only, no memory, instant
        blocks = nn.ModuleList(
            AdaLNSelfAttn(C, C, cfg["num_heads"], mlp_ratio=cfg["mlp_ratio"], norm_eps=cfg["norm_eps"],
                          shared_aln=ref["constructor"]["shared_aln"], attn_l2_norm=ref["constructor"]["attn_l2_norm"])
            for _ in range(depth))
        head_nm = AdaLNBeforeHead(C, C, norm_eps=cfg["norm_eps"])
    assert module_tree(blocks) == reference_tree(ref, "blocks.")
    assert module_tree(head_nm) == reference_tree(ref, "head_nm.")
    assert num_params(blocks) == ref["params_by_top_level_module"]["blocks"]
    assert num_params(head_nm) == ref["params_by_top_level_module"]["head_nm"]


def test_one_var_d16_block_has_the_seed_parameter_count():
    with torch.device("meta"):
        block = AdaLNSelfAttn(embed_dim=1024, cond_dim=1024, num_heads=16, mlp_ratio=4.0)
    assert module_tree(block) == reference_tree(load_reference("var_d16.json"), "blocks.0.")
    assert module_tree(block)["attn.zero_k_bias"] == ((1024,), "buffer")
    assert num_params(block) == 18_888_720  # the official VAR-d16 printout: AdaLNSelfAttn(1-15)<:18888720x15>


# ---------------------------------------------------------------- attention

C, H, D = 32, 4, 16


def block_causal_mask(level_sizes):
    """VAR's mask: token i may attend to token j iff j's scale is not later than i's."""
    levels = torch.cat([torch.full((n,), i) for i, n in enumerate(level_sizes)])
    return torch.where(levels[:, None] >= levels[None, :], 0.0, -math.inf).view(1, 1, len(levels), len(levels))


def randomised_attention(attn_l2_norm=True):
    torch.manual_seed(0)
    attn = SelfAttention(C, H, attn_l2_norm=attn_l2_norm)
    with torch.no_grad():  # the biases start at zero; make them matter
        attn.q_bias.normal_()
        attn.v_bias.normal_()
    return attn


def test_attention_matches_the_cosine_formula_with_clamped_temperature():
    attn = randomised_attention()
    with torch.no_grad():
        attn.scale_mul_1H11.copy_(torch.tensor([0.0, 1.0, 3.0, 7.0]).view(1, H, 1, 1))  # 7 > log 100: clamped
    x = torch.randn(2, 5, C)
    q = (x @ attn.mat_qkv.weight[:C].T + attn.q_bias).view(2, 5, H, C // H).transpose(1, 2)
    k = (x @ attn.mat_qkv.weight[C:2 * C].T).view(2, 5, H, C // H).transpose(1, 2)  # no key bias
    v = (x @ attn.mat_qkv.weight[2 * C:].T + attn.v_bias).view(2, 5, H, C // H).transpose(1, 2)
    temperature = torch.tensor([1.0, math.e, math.exp(3.0), 100.0]).view(1, H, 1, 1)
    logits = temperature * F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
    expected = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 5, C))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(attn.scale_mul_1H11.new_tensor(4.0).log(), SelfAttention(C, H).scale_mul_1H11)


def test_attention_without_l2_norm_uses_a_fixed_scale():
    attn = randomised_attention(attn_l2_norm=False)
    assert not hasattr(attn, "scale_mul_1H11") and attn.scale == 0.25 / math.sqrt(C // H)
    assert attn(torch.randn(2, 5, C)).shape == (2, 5, C)


def test_zero_bias_equals_no_mask():
    attn = randomised_attention()
    x = torch.randn(2, 6, C)
    torch.testing.assert_close(attn(x, torch.zeros(1, 1, 6, 6)), attn(x))


def test_causal_mask_hides_later_tokens():
    attn = randomised_attention()
    x = torch.randn(2, 6, C)
    mask = block_causal_mask([1] * 6)  # one token per "scale": plain causal
    y = x.clone()
    y[:, 1:] = torch.randn(2, 5, C)
    torch.testing.assert_close(attn(x, mask)[:, 0], attn(y, mask)[:, 0])
    assert not torch.allclose(attn(x)[:, 0], attn(y)[:, 0])  # without the mask token 0 does see them


# ---------------------------------------------------------------- adaLN blocks


def randomised_block(**kwargs):
    torch.manual_seed(0)
    block = AdaLNSelfAttn(C, D, H, **kwargs)
    with torch.no_grad():
        block.attn.q_bias.normal_()
        block.attn.v_bias.normal_()
    return block


def test_block_follows_vars_gamma_scale_shift_order():
    block = randomised_block()
    x, cond = torch.randn(2, 5, C), torch.randn(2, D)
    gamma1, gamma2, scale1, scale2, shift1, shift2 = block.ada_lin(cond).view(2, 1, 6, C).unbind(2)
    ln = lambda t: F.layer_norm(t, (C,), eps=1e-6)  # noqa: E731
    h = x + block.attn(ln(x) * (1 + scale1) + shift1) * gamma1
    expected = h + block.ffn(ln(h) * (1 + scale2) + shift2) * gamma2
    torch.testing.assert_close(block(x, cond), expected)


def test_block_and_head_shapes():
    block, head_nm = randomised_block(), AdaLNBeforeHead(C, D)
    x, cond = torch.randn(3, 7, C), torch.randn(3, D)
    assert block(x, cond).shape == (3, 7, C)
    assert block(x, cond, block_causal_mask([1, 2, 4])).shape == (3, 7, C)
    assert head_nm(x, cond).shape == (3, 7, C)
    assert FFN(C, 4 * C)(x).shape == (3, 7, C)


def test_head_nm_is_scale_then_shift():
    head_nm = AdaLNBeforeHead(C, D)
    x, cond = torch.randn(2, 5, C), torch.randn(2, D)
    scale, shift = head_nm.ada_lin(cond).view(2, 1, 2, C).unbind(2)
    torch.testing.assert_close(head_nm(x, cond), F.layer_norm(x, (C,), eps=1e-6) * (1 + scale) + shift)


def test_kv_cache_scale_by_scale_equals_one_block_causal_pass():
    block = randomised_block().eval()
    level_sizes = [1, 4, 9]
    x, cond = torch.randn(2, sum(level_sizes), C), torch.randn(2, D)
    full = block(x, cond, block_causal_mask(level_sizes))

    block.attn.kv_caching(True)
    chunks, start = [], 0
    for n in level_sizes:  # as in sampling: no mask, each scale sees the cache plus itself
        chunks.append(block(x[:, start:start + n], cond))
        start += n
    assert block.attn.cached_k.shape == (2, H, sum(level_sizes), C // H)
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)

    block.attn.kv_caching(False)
    assert block.attn.cached_k is None and block.attn.cached_v is None


def test_shared_adaln_block_adds_its_ada_gss_to_the_shared_conditioning():
    block = randomised_block(shared_aln=True)
    params = dict(block.named_parameters())
    assert params["ada_gss"].shape == (1, 1, 6, C) and not any(k.startswith("ada_lin") for k in params)
    assert num_params(randomised_block()) - num_params(block) == (D + 1) * 6 * C - 6 * C

    shared_ada_lin = nn.Sequential(nn.SiLU(), SharedAdaLin(D, 6 * C))  # lives once in the parent model
    x, cond = torch.randn(2, 5, C), torch.randn(2, D)
    shared = shared_ada_lin(cond)
    assert shared.shape == (2, 1, 6, C)
    gamma1, gamma2, scale1, scale2, shift1, shift2 = (block.ada_gss + shared).unbind(2)
    ln = lambda t: F.layer_norm(t, (C,), eps=1e-6)  # noqa: E731
    h = x + block.attn(ln(x) * (1 + scale1) + shift1) * gamma1
    expected = h + block.ffn(ln(h) * (1 + scale2) + shift2) * gamma2
    torch.testing.assert_close(block(x, shared), expected)


def test_drop_path_drops_whole_samples_in_training_only():
    torch.manual_seed(0)
    drop, x = DropPath(0.5), torch.randn(64, 3, 4)
    assert torch.equal(drop.eval()(x), x)
    out = drop.train()(x)
    kept = (out == 2 * x).flatten(1).all(1)
    dropped = (out == 0).flatten(1).all(1)
    assert torch.all(kept | dropped) and kept.any() and dropped.any()
    assert isinstance(AdaLNSelfAttn(C, D, H, drop_path=0.1).drop_path, DropPath)
    assert isinstance(AdaLNSelfAttn(C, D, H).drop_path, nn.Identity)


# ---------------------------------------------------------------- bad input


def test_bad_input_fails_with_a_clear_message():
    block, attn = randomised_block(), randomised_attention()
    x, cond = torch.randn(2, 5, C), torch.randn(2, D)
    with pytest.raises(ValueError, match="not divisible"):
        SelfAttention(30, 4)
    with pytest.raises(ValueError, match=r"\(B, L, 32\)"):
        attn(torch.randn(2, 5, C + 1))
    with pytest.raises(ValueError, match="additive float mask"):
        attn(x, torch.ones(1, 1, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"1 or H, 5, 5\)"):
        attn(x, torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"cond_BD must have shape \(2, 16\)"):
        block(x, torch.randn(2, C))
    with pytest.raises(ValueError, match="shared_ada_lin output"):
        randomised_block(shared_aln=True)(x, cond)
    with pytest.raises(ValueError, match="AdaLNBeforeHead expects"):
        AdaLNBeforeHead(C, D)(x, torch.randn(3, D))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        DropPath(1.0)
