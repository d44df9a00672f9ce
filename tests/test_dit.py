import pytest
import torch
from reference import load_reference, reference_tree
from safetensors.torch import save_file

from minilib.dit import DIT_CONFIGS, DiT
from minilib.patch_embed import get_2d_sincos_pos_embed
from minilib.training import load_checkpoint


def tree_with_frozen(module):
    """``{key: (shape, kind)}`` with the reference files' three kinds: param, param_frozen, buffer."""
    params = dict(module.named_parameters())
    kinds = {key: ("param" if p.requires_grad else "param_frozen") for key, p in params.items()}
    return {key: (tuple(value.shape), kinds.get(key, "buffer")) for key, value in module.state_dict().items()}


@pytest.mark.parametrize("name, file", [("DiT-S/2", "dit_s_2.json"), ("DiT-B/2", "dit_b_2.json"),
                                        ("DiT-XL/2", "dit_xl_2.json")])
def test_full_size_trees_match_the_official_ones(name, file):
    ref = load_reference(file)
    config = {**DIT_CONFIGS[name], "input_size": 32, "num_classes": 1000}
    assert {key: config[key] for key in DIT_CONFIGS[name]} == \
        {key: ref["constructor"]["kwargs_resolved"][key] for key in DIT_CONFIGS[name]}
    with torch.device("meta"):
        model = DiT(**config)
    assert tree_with_frozen(model) == reference_tree(ref)
    assert sum(p.numel() for p in model.parameters()) == ref["total_params"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        ref["trainable_params_at_construction"]


def tiny_dit(**kwargs):
    torch.manual_seed(0)
    return DiT(**{"input_size": 8, "patch_size": 2, "in_channels": 3, "hidden_size": 32, "depth": 2,
                  "num_heads": 4, "num_classes": 5, **kwargs})


def inputs(n=4, channels=3, size=8):
    return torch.randn(n, channels, size, size), torch.randint(0, 1000, (n,)), torch.randint(0, 5, (n,))


def perturb(model):
    """Leave the adaLN-Zero start: random modulation and output weights."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name:
                p.normal_(std=0.05)
    return model


@pytest.mark.parametrize("learn_sigma, out_channels", [(True, 6), (False, 3)])
def test_shapes_and_exact_zero_at_init(learn_sigma, out_channels):
    model = tiny_dit(learn_sigma=learn_sigma)
    out = model(*inputs())
    assert model.out_channels == out_channels and out.shape == (4, out_channels, 8, 8)
    assert torch.equal(out, torch.zeros_like(out))


def test_initialisation_follows_dit():
    model = tiny_dit()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(torch.all(m.bias == 0) for m in linears)
    assert torch.all(model.blocks[0].attn.qkv.weight != 0)  # xavier, not zeroed
    for block in model.blocks:
        assert torch.all(block.adaLN_modulation[1].weight == 0)
    bound = (6 / (32 + 3 * 2 * 2)) ** 0.5  # xavier on the patch kernel as a (D, C*p*p) matrix
    assert model.x_embedder.proj.weight.abs().max() <= bound
    assert model.x_embedder.proj.weight.abs().max() > 0.8 * bound


def test_pos_embed_is_fixed_sincos():
    model = tiny_dit()
    assert not model.pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed[0], get_2d_sincos_pos_embed(32, 4))
    perturb(model)(*inputs()).sum().backward()
    assert model.pos_embed.grad is None


def test_cfg_with_scale_one_is_the_conditional_prediction():
    model = perturb(tiny_dit()).eval()
    x, t, y = inputs(2)
    x2, t2, y2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 5)])
    cond = model(x, t, y)
    out = model.forward_with_cfg(x2, t2, y2, cfg_scale=1.0)
    torch.testing.assert_close(out[:2], cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2:, :3], cond[:, :3], atol=1e-5, rtol=1e-5)
    uncond = model(x, t, torch.full_like(y, 5))
    out4 = model.forward_with_cfg(x2, t2, y2, cfg_scale=4.0)
    torch.testing.assert_close(out4[:2, :3], uncond[:, :3] + 4 * (cond[:, :3] - uncond[:, :3]),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out4[:, 3:], torch.cat([cond, uncond])[:, 3:])  # variance passes through
    with pytest.raises(ValueError, match="odd batch size"):
        model.forward_with_cfg(x[:1], t[:1], y[:1], 2.0)


def test_guided_channels_3_guides_as_the_official_code():
    """The official forward_with_cfg guides eps channels 0-2 only; channel 3 keeps each half's own value."""
    model = perturb(tiny_dit(in_channels=4, guided_channels=3)).eval()
    x, t, y = inputs(2, channels=4)
    x2, t2, y2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 5)])
    raw = model(x2, t2, y2)
    cond, uncond = raw.chunk(2)
    out = model.forward_with_cfg(x2, t2, y2, cfg_scale=4.0)
    guided = uncond[:, :3] + 4 * (cond[:, :3] - uncond[:, :3])
    torch.testing.assert_close(out[:, :3], torch.cat([guided, guided]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, 3:], raw[:, 3:], rtol=0, atol=0)  # channel 3 and the variances: unguided
    assert not torch.allclose(out[:2, 3], out[2:, 3])
    model.guided_channels = None  # the default: all 4 guided
    every = model.forward_with_cfg(x2, t2, y2, cfg_scale=4.0)
    torch.testing.assert_close(every[:2, :4], uncond[:, :4] + 4 * (cond[:, :4] - uncond[:, :4]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(every[:, :3], out[:, :3], rtol=0, atol=0)


def test_zoo_builds_the_official_dits_with_their_guidance():
    from minilib import zoo
    for name in ["dit-s-2", "dit-b-2", "dit-xl-2"]:
        with torch.device("meta"):
            assert zoo.build(name).guided_channels == 3, name
    assert tiny_dit().guided_channels is None


@pytest.mark.parametrize("bad", [0, 4, 2.0, True])
def test_bad_guided_channels(bad):
    with pytest.raises(ValueError, match="guided_channels must be None or an int from 1 to in_channels = 3"):
        tiny_dit(guided_channels=bad)


def test_label_dropout_only_in_training():
    model = perturb(tiny_dit(class_dropout_prob=0.5))
    x, t, _ = inputs(1)
    x, t, y = x.expand(64, -1, -1, -1), t.expand(64), torch.full((64,), 2)
    null = model.eval()(x[:1], t[:1], torch.tensor([5]))
    model.train()
    torch.manual_seed(0)
    dropped = (model(x, t, y) - null).flatten(1).abs().amax(1) < 1e-5
    assert 10 < dropped.sum() < 54  # about half the labels became the null class
    model.eval()
    assert not ((model(x, t, y) - null).flatten(1).abs().amax(1) < 1e-5).any()


def test_bad_inputs_are_explained():
    model = tiny_dit()
    x, t, y = inputs()
    with pytest.raises(ValueError, match=r"same batch size, got x 4, t 3, y 4"):
        model(x, t[:3], y)
    with pytest.raises(ValueError, match="built for 8x8"):
        model(torch.randn(4, 3, 16, 16), t, y)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(4, 1, 8, 8), t, y)


def test_official_keys_load_strictly():
    ref = load_reference("dit_s_2.json")
    # a stand-in for DiT-S-2's checkpoint: every tensor filled with its own index, so a tensor
    # loaded under the wrong name would show
    state = {key: torch.full(entry["shape"], float(i)) for i, (key, entry) in enumerate(ref["state_dict"].items())}
    model = DiT(**DIT_CONFIGS["DiT-S/2"])
    model.load_state_dict(state, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_mismatched_checkpoint_lists_missing_and_unexpected_keys(tmp_path):
    model = tiny_dit()
    state = dict(model.state_dict())
    state["final_layer.proj.weight"] = state.pop("final_layer.linear.weight")
    with pytest.raises(RuntimeError, match=r'(?s)Missing key.*"final_layer\.linear\.weight".*'
                                           r'Unexpected key.*"final_layer\.proj\.weight"'):
        model.load_state_dict(state, strict=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError) as error:
        load_checkpoint(tmp_path / "bad.safetensors", model)
    message = str(error.value)
    assert "1 key(s) missing from the checkpoint" in message and "final_layer.linear.weight" in message
    assert "1 key(s) unexpected in the checkpoint" in message and "final_layer.proj.weight" in message
