"""FLUX.1 (black-forest-labs/flux): 2-D rotary positions, double- and single-stream blocks, the full tree.

Facts from the official code at commit 802fb4713906133fcbd0d8dc5351620ca4773036:
``src/flux/modules/layers.py`` (block and parameter names), ``src/flux/model.py`` (``Flux``),
``src/flux/math.py`` (``rope``, ``apply_rope``), ``src/flux/util.py`` (``configs["flux-dev"]``,
``configs["flux-schnell"]``).
"""

import math

import pytest
import torch

from minilib import zoo
from minilib.flux import (FLUX1_DEV, FLUX1_SCHNELL, DoubleStreamBlock, Flux, SingleStreamBlock, apply_rope,
                          image_ids, pack, rope_2d, schedule, text_ids, unpack)
from minilib.flow import time_snr_shift
from minilib.mmdit import JointBlock

TINY = dict(in_channels=8, out_channels=8, vec_in_dim=6, context_in_dim=10, hidden_size=32, mlp_ratio=2.0,
            num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6), theta=10000.0, qkv_bias=True,
            guidance_embed=True)


def randomise(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


# ---------------------------------------------------------------- rotary positions


def test_rope_2d_gives_each_axis_its_own_block_of_frequencies():
    ids = torch.tensor([[[0.0, 2.0, 5.0], [1.0, 0.0, 3.0]]])  # (B=1, L=2, 3 axes)
    angles = rope_2d(ids, (4, 6, 6))
    assert angles.shape == (1, 2, 8) and angles.dtype == torch.float32
    omega = lambda dim: 10000.0 ** (-torch.arange(0, dim, 2) / dim)  # noqa: E731  (math.py: rope)
    expected = torch.cat([ids[..., 0, None] * omega(4), ids[..., 1, None] * omega(6), ids[..., 2, None] * omega(6)], -1)
    assert torch.allclose(angles, expected)
    assert torch.allclose(angles[0, 0, :2], torch.zeros(2))  # index axis 0 for FLUX.1's tokens
    assert angles[0, 0, 2] == 2.0 and angles[0, 0, 5] == 5.0  # each axis starts at frequency 1
    with pytest.raises(ValueError, match=r"ids must be \(B, L, 3\)"):
        rope_2d(ids[..., :2], (4, 6, 6))
    with pytest.raises(ValueError, match="positive even"):
        rope_2d(ids, (4, 5, 6))


def test_apply_rope_rotates_neighbouring_channels_like_a_complex_product():
    torch.manual_seed(0)
    x, angles = torch.randn(2, 3, 5, 8, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    rotated = apply_rope(x, angles)
    as_complex = torch.view_as_complex(x.reshape(2, 3, 5, 4, 2).contiguous())
    expected = torch.view_as_real(as_complex * torch.polar(torch.ones_like(angles), angles)[:, None])
    assert torch.allclose(rotated, expected.reshape(2, 3, 5, 8))
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1))  # a rotation: lengths unchanged
    assert apply_rope(x.float(), angles.float()).dtype == torch.float32
    with pytest.raises(ValueError, match="angles must be"):
        apply_rope(x, angles[..., :3])


def rotary_scores(q0, k0, ids, axes_dim):
    """Scores of one query vector and one key vector placed at every position of ``ids``: (H, L, L)."""
    L = ids.shape[1]
    angles = rope_2d(ids, axes_dim).double()
    q = apply_rope(q0.expand(1, -1, L, -1), angles)
    k = apply_rope(k0.expand(1, -1, L, -1), angles)
    return (q @ k.transpose(-1, -2))[0]


def test_rope_makes_attention_scores_depend_only_on_the_offset_on_both_axes():
    torch.manual_seed(1)
    axes_dim = (4, 6, 6)
    q0, k0 = torch.randn(2, 1, 16, dtype=torch.float64), torch.randn(2, 1, 16, dtype=torch.float64)
    grid = image_ids(1, 3, 4).double()  # (0, row, column) of a 3x4 grid
    scores = rotary_scores(q0, k0, grid, axes_dim)
    for shift in ([0, 7, 0], [0, 0, -5], [0, 2.5, 11], [3, 1, 1]):  # moving every token changes nothing
        assert torch.allclose(rotary_scores(q0, k0, grid + torch.tensor(shift, dtype=torch.float64), axes_dim),
                              scores)
    # pairs with the same (row, column) offset have the same score, wherever they are
    rows, cols = grid[0, :, 1].long(), grid[0, :, 2].long()
    by_offset = {}
    for m in range(12):
        for n in range(12):
            offset = (int(rows[n] - rows[m]), int(cols[n] - cols[m]))
            by_offset.setdefault(offset, []).append(scores[:, m, n])
    assert len(by_offset) == 5 * 7
    for values in by_offset.values():
        assert all(torch.allclose(v, values[0]) for v in values)
    # and the offset matters along each axis: it is not a constant
    assert not torch.allclose(by_offset[(0, 0)][0], by_offset[(1, 0)][0])
    assert not torch.allclose(by_offset[(0, 0)][0], by_offset[(0, 1)][0])


# ---------------------------------------------------------------- blocks


def test_a_single_stream_block_equals_its_unfused_form():
    block = randomise(SingleStreamBlock(32, num_heads=2, mlp_ratio=3.0)).double()
    torch.manual_seed(2)
    x, vec = torch.randn(2, 9, 32, dtype=torch.float64), torch.randn(2, 32, dtype=torch.float64)
    angles = rope_2d(torch.randint(0, 5, (2, 9, 3)).double(), (4, 6, 6))
    out = block(x, vec, angles)
    assert out.shape == (2, 9, 32)
    assert torch.allclose(out, block.unfused(x, vec, angles))
    # fused sizes: q, k, v and the MLP input from one linear; the projection and the MLP output from another
    assert block.linear1.weight.shape == (3 * 32 + 96, 32) and block.linear2.weight.shape == (32, 32 + 96)
    # by hand: attention and MLP both read the modulated input, in parallel
    shift, scale, gate = block.modulation(vec)
    h = block.pre_norm(x) * (1 + scale[:, None]) + shift[:, None]
    qkv, mlp_in = block.linear1(h).split([96, 96], dim=-1)
    q, k, v = qkv.reshape(2, 9, 3, 2, 16).permute(2, 0, 3, 1, 4)
    q, k = block.norm.query_norm(q), block.norm.key_norm(k)
    q, k = apply_rope(q, angles), apply_rope(k, angles)
    attn = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
    mlp = torch.nn.functional.gelu(mlp_in, approximate="tanh")
    merged = torch.cat((attn.transpose(1, 2).reshape(2, 9, 32), mlp), -1)
    assert torch.allclose(out, x + gate[:, None] * block.linear2(merged))


def joint_block_from(block: DoubleStreamBlock) -> JointBlock:
    """SD3's JointBlock (qk_norm='rms') with the weights of a FLUX double-stream block."""
    joint = JointBlock(block.hidden_size, block.num_heads, mlp_ratio=block.img_mlp[0].out_features / block.hidden_size,
                       qk_norm="rms").to(block.img_mod.lin.weight.dtype)
    rename = {"mod.lin": "adaLN_modulation.1", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj",
              "attn.norm.query_norm.scale": "attn.ln_q.weight", "attn.norm.key_norm.scale": "attn.ln_k.weight",
              "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}
    state = {}
    for key, value in block.state_dict().items():
        stream, rest = key.split("_", 1)
        for flux_name, sd3_name in rename.items():
            if rest.startswith(flux_name):
                target = {"img": "x_block", "txt": "context_block"}[stream]
                state[f"{target}.{sd3_name}{rest[len(flux_name):]}"] = value
    joint.load_state_dict(state, strict=True)
    return joint


def test_a_double_stream_block_is_sd3s_joint_block_plus_rotary_positions():
    block = randomise(DoubleStreamBlock(32, num_heads=2, mlp_ratio=2.0, qkv_bias=True)).double()
    joint = joint_block_from(block)
    torch.manual_seed(3)
    img, txt = torch.randn(2, 6, 32, dtype=torch.float64), torch.randn(2, 4, 32, dtype=torch.float64)
    vec = torch.randn(2, 32, dtype=torch.float64)
    at_origin = torch.zeros(2, 10, 8, dtype=torch.float64)  # all positions 0: no rotation
    flux_img, flux_txt = block(img, txt, vec, at_origin)
    sd3_txt, sd3_img = joint(txt, img, vec)
    assert torch.allclose(flux_img, sd3_img) and torch.allclose(flux_txt, sd3_txt)
    positions = rope_2d(torch.cat((text_ids(2, 4), image_ids(2, 2, 3)), dim=1).double(), (4, 6, 6))
    moved_img, _ = block(img, txt, vec, positions)
    assert not torch.allclose(moved_img, sd3_img)  # with positions, the rotation matters


# ---------------------------------------------------------------- the model


def tiny_inputs(batch=2, h=3, w=4, txt_len=5):
    torch.manual_seed(4)
    latents = torch.randn(batch, 2, 2 * h, 2 * w)
    return dict(img=pack(latents), img_ids=image_ids(batch, h, w), txt=torch.randn(batch, txt_len, 10),
                txt_ids=text_ids(batch, txt_len), timesteps=torch.rand(batch), y=torch.randn(batch, 6),
                guidance=torch.full((batch,), 3.5))


def test_flux_shapes_and_input_checks():
    model = randomise(Flux(**TINY))
    inputs = tiny_inputs()
    out = model(**inputs)
    assert out.shape == (2, 12, 8)
    assert unpack(out, 6, 8).shape == (2, 2, 6, 8)
    assert Flux(**TINY)(**inputs).abs().max() == 0  # zero-initialised modulations and output layer
    with pytest.raises(ValueError, match="guidance-distilled"):
        model(**{**inputs, "guidance": None})
    schnell = randomise(Flux(**{**TINY, "guidance_embed": False}))
    assert torch.equal(schnell(**inputs), schnell(**{**inputs, "guidance": None}))  # ignored, as officially
    with pytest.raises(ValueError, match="img_ids must be"):
        model(**{**inputs, "img_ids": inputs["img_ids"][:, :5]})
    with pytest.raises(ValueError, match=r"txt must be \(2, L, 10\)"):
        model(**{**inputs, "txt": torch.randn(2, 5, 9)})
    with pytest.raises(ValueError, match="must add up to the head width"):
        Flux(**{**TINY, "axes_dim": (4, 4, 4)})
    with pytest.raises(ValueError, match="divisible"):
        Flux(**{**TINY, "num_heads": 3})


def test_flux_only_sees_offsets_between_tokens():
    """Moving every token (text and image) by the same offset changes nothing; moving the image alone
    changes its offsets to the text tokens, and the output."""
    model = randomise(Flux(**{**TINY, "depth": 1, "depth_single_blocks": 1}), std=0.2)
    inputs = tiny_inputs(batch=1)
    out = model(**inputs)
    offset = torch.tensor([0.0, 10.0, 20.0])
    moved = model(**{**inputs, "img_ids": inputs["img_ids"] + offset, "txt_ids": inputs["txt_ids"] + offset})
    assert torch.allclose(moved, out, atol=1e-4)
    assert (model(**{**inputs, "img_ids": inputs["img_ids"] + offset}) - out).abs().max() > 0.01


def test_pack_unpack_and_ids_follow_the_official_layout():
    latents = torch.arange(2 * 3 * 4 * 6.0).reshape(2, 3, 4, 6)
    tokens = pack(latents)
    assert tokens.shape == (2, 6, 12)
    # token (row 1, column 2) holds channel 0's 2x2 patch first, then channel 1's, ... (c ph pw)
    assert torch.equal(tokens[0, 1 * 3 + 2, :4], latents[0, 0, 2:4, 4:6].reshape(4))
    assert torch.equal(unpack(tokens, 4, 6), latents)
    ids = image_ids(2, 2, 3)
    assert ids.shape == (2, 6, 3) and ids[0].tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1],
                                                         [0, 1, 2]]
    assert text_ids(2, 7).abs().sum() == 0
    with pytest.raises(ValueError, match="divisible"):
        pack(torch.zeros(1, 3, 5, 6))


def test_schedule_is_sd3s_shift_with_a_resolution_dependent_mu():
    times = schedule(4, 4096)
    assert times[0] == 1.0 and times[-1] == 0.0 and len(times) == 5
    mu = 1.15  # at 4096 tokens (sampling.py: get_lin_function(x1=256, y1=0.5, x2=4096, y2=1.15))
    official = lambda t: math.exp(mu) / (math.exp(mu) + (1 / t - 1))  # noqa: E731  time_shift(mu, 1.0, t)
    for t, shifted in zip([0.75, 0.5, 0.25], times[1:-1]):
        assert shifted == pytest.approx(official(t), rel=1e-6)
        assert shifted == pytest.approx(time_snr_shift(math.exp(mu), t), rel=1e-6)
    assert schedule(4, 256)[1] == pytest.approx(math.exp(0.5) * 0.75 / (1 + (math.exp(0.5) - 1) * 0.75), rel=1e-6)
    assert schedule(4, 4096, shift=False) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def wave(shape, phase, scale=0.2, rate=0.37):
    """Deterministic numbers (no random generator), the same on every machine."""
    n = math.prod(shape)
    return (scale * torch.sin(torch.arange(n, dtype=torch.float64) * rate + phase)).reshape(shape).float()


def test_flux_computes_what_the_official_code_computes():
    """Outputs of the official ``Flux`` (commit 802fb47, float32, CPU) for these deterministic weights and
    inputs, recorded once by running it; minilib matched them to 0.0 (every element equal)."""
    model = Flux(**TINY)
    model.load_state_dict({key: wave(value.shape, i) for i, (key, value) in enumerate(sorted(
        model.state_dict().items()))}, strict=True)
    img = wave((1, 12, 8), 0.5, 1.0, 0.11)
    txt = wave((1, 5, 10), 1.5, 1.0, 0.23)
    txt_ids = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [2, 1, 0], [3, 0, 2], [4, 2, 1]]])
    with torch.no_grad():
        out = model(img, image_ids(1, 3, 4), txt, txt_ids, torch.tensor([0.3]), wave((1, 6), 2.0, 1.0, 0.5),
                    torch.tensor([3.5]))
    official_first = [[1.2424681186676025, 1.5582199096679688, 1.0950599908828735, 0.11285476386547089],
                      [1.3184492588043213, 1.59627366065979, 1.075976014137268, 0.04626713693141937],
                      [1.3586835861206055, 1.6749637126922607, 1.1533974409103394, 0.08333604037761688]]
    official_last = [1.347811222076416, 1.7192450761795044, 1.2304785251617432, 0.15430472791194916,
                     -0.9445176124572754, -1.4972738027572632, -1.2202874422073364, -0.2587539553642273]
    assert torch.allclose(out[0, :3, :4], torch.tensor(official_first), atol=1e-4)
    assert torch.allclose(out[0, -1], torch.tensor(official_last), atol=1e-4)
    assert out.sum().item() == pytest.approx(6.463979721069336, abs=1e-3)


# ---------------------------------------------------------------- official module trees


def expected_tree(depth, depth_single, hidden, heads, mlp_ratio, in_ch, out_ch, vec_in, context_in,
                  guidance_embed=True, qkv_bias=True) -> dict:
    """Every state-dict key and shape of the official ``Flux``, written from ``model.py`` and ``layers.py``."""
    D, d, M = hidden, hidden // heads, int(hidden * mlp_ratio)
    tree = {"img_in.weight": (D, in_ch), "img_in.bias": (D,)}
    for name, width in (("time_in", 256), ("vector_in", vec_in)):
        tree.update({f"{name}.in_layer.weight": (D, width), f"{name}.in_layer.bias": (D,),
                     f"{name}.out_layer.weight": (D, D), f"{name}.out_layer.bias": (D,)})
    if guidance_embed:  # model.py registers guidance_in after vector_in
        tree.update({"guidance_in.in_layer.weight": (D, 256), "guidance_in.in_layer.bias": (D,),
                     "guidance_in.out_layer.weight": (D, D), "guidance_in.out_layer.bias": (D,)})
    tree.update({"txt_in.weight": (D, context_in), "txt_in.bias": (D,)})
    for i in range(depth):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}_"
            tree.update({p + "mod.lin.weight": (6 * D, D), p + "mod.lin.bias": (6 * D,),
                         p + "attn.qkv.weight": (3 * D, D)})
            if qkv_bias:
                tree[p + "attn.qkv.bias"] = (3 * D,)
            tree.update({p + "attn.norm.query_norm.scale": (d,), p + "attn.norm.key_norm.scale": (d,),
                         p + "attn.proj.weight": (D, D), p + "attn.proj.bias": (D,),
                         p + "mlp.0.weight": (M, D), p + "mlp.0.bias": (M,),
                         p + "mlp.2.weight": (D, M), p + "mlp.2.bias": (D,)})
    for i in range(depth_single):
        p = f"single_blocks.{i}."
        tree.update({p + "linear1.weight": (3 * D + M, D), p + "linear1.bias": (3 * D + M,),
                     p + "linear2.weight": (D, D + M), p + "linear2.bias": (D,),
                     p + "norm.query_norm.scale": (d,), p + "norm.key_norm.scale": (d,),
                     p + "modulation.lin.weight": (3 * D, D), p + "modulation.lin.bias": (3 * D,)})
    tree.update({"final_layer.linear.weight": (out_ch, D), "final_layer.linear.bias": (out_ch,),
                 "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,)})
    return tree


def tree_of(model):
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def test_a_tiny_flux_has_exactly_the_official_keys():
    model = Flux(**TINY)
    expected = expected_tree(2, 2, 32, 2, 2.0, 8, 8, 6, 10)
    assert tree_of(model) == expected and list(tree_of(model)) == list(expected)  # keys, shapes and order
    state = {key: torch.zeros(shape) for key, shape in expected.items()}
    model.load_state_dict(state, strict=True)
    assert not list(model.buffers())  # rotary angles are computed, never stored
    no_guidance = Flux(**{**TINY, "guidance_embed": False, "qkv_bias": False})
    assert tree_of(no_guidance) == expected_tree(2, 2, 32, 2, 2.0, 8, 8, 6, 10, guidance_embed=False, qkv_bias=False)


# Public figures for the parameter counts. The diffusers folder transformer/ of black-forest-labs/FLUX.1-dev
# holds its weights in bf16 (2 bytes each): its diffusion_pytorch_model.safetensors.index.json gives
# total_size = 23,802,816,640 bytes for [dev] and 23,782,357,120 for [schnell], as recorded in
# exo-explore/exo, src/exo/shared/models/model_cards.py (the ComponentInfo "transformer" of flux1-dev and
# flux1-schnell, read from the index's metadata.total_size). Halved: 11,901,408,320 and 11,891,178,560
# parameters, which is also the Hub's parameter count ("safetensors.total") of the two repositories; the
# official model cards (model_cards/FLUX.1-dev.md) say "12 billion". They differ by guidance_in:
# (256 + 1) * 3072 + (3072 + 1) * 3072 = 10,229,760.
FLUX1_DEV_PARAMS = 23_802_816_640 // 2
FLUX1_SCHNELL_PARAMS = 23_782_357_120 // 2


@pytest.mark.parametrize("name, config, total", [("flux.1-dev", FLUX1_DEV, FLUX1_DEV_PARAMS),
                                                 ("flux.1-schnell", FLUX1_SCHNELL, FLUX1_SCHNELL_PARAMS)])
def test_the_zoo_builds_the_full_flux1_tree_with_the_official_keys_and_count(name, config, total):
    entry = zoo.get(name)
    assert entry.config == config and entry.builder == "minilib.flux:Flux"
    model = zoo.build(name, device="meta")
    expected = expected_tree(19, 38, 3072, 24, 4.0, 64, 64, 768, 4096, guidance_embed=config["guidance_embed"])
    assert tree_of(model) == expected
    assert len(expected) == (780 if config["guidance_embed"] else 776)
    assert zoo.count_parameters(model) == total == sum(math.prod(shape) for shape in expected.values())
    assert FLUX1_DEV_PARAMS - FLUX1_SCHNELL_PARAMS == (256 + 1) * 3072 + (3072 + 1) * 3072


def test_the_official_configurations_differ_only_in_guidance():
    assert {k for k in FLUX1_DEV if FLUX1_DEV[k] != FLUX1_SCHNELL[k]} == {"guidance_embed"}
    assert FLUX1_DEV["hidden_size"] // FLUX1_DEV["num_heads"] == sum(FLUX1_DEV["axes_dim"]) == 128


def test_a_flux_forward_never_waits_for_the_device():
    """On PyTorch's meta device any read-back (.item(), bool(tensor)) raises: the forward has none."""
    model = Flux(**TINY).to("meta")
    out = model(**{name: value.to("meta") for name, value in tiny_inputs().items()})
    assert out.device.type == "meta" and out.shape == (2, 12, 8)
