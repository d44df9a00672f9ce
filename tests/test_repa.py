"""REPA (Yu et al. 2025): projector, alignment loss, hidden states of a DiT, where the gradients go."""

import pytest
import torch
import torch.nn.functional as F

from minilib.adaln import TinyDenoiser
from minilib.dit import DiT
from minilib.repa import Projector, alignment_loss, capture_hidden_states, hidden_states, repa_loss


def random_dit(seed=0, **kwargs) -> DiT:
    """A small DiT with every weight random (adaLN-Zero would make its blocks the identity)."""
    torch.manual_seed(seed)
    config = dict(input_size=8, patch_size=2, in_channels=2, hidden_size=32, depth=4, num_heads=2, num_classes=3,
                  learn_sigma=False, class_dropout_prob=0.0)
    model = DiT(**{**config, **kwargs})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, 0.1)
    return model.eval()


def test_the_projector_is_the_official_three_layer_mlp():
    projector = Projector(1152)  # SiT-XL's width to DINOv2-B's 768 through 2048
    assert [type(m).__name__ for m in projector] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert {k: tuple(v.shape) for k, v in projector.state_dict().items()} == {
        "0.weight": (2048, 1152), "0.bias": (2048,), "2.weight": (2048, 2048), "2.bias": (2048,),
        "4.weight": (768, 2048), "4.bias": (768,)}
    assert Projector(32, 64, 16)(torch.randn(2, 5, 32)).shape == (2, 5, 16)
    with pytest.raises(ValueError, match="projector_dim"):
        Projector(32, 0)


def test_alignment_loss_is_minus_one_for_equal_directions_and_zero_for_orthogonal_ones():
    torch.manual_seed(0)
    f = torch.randn(3, 7, 16)
    assert torch.allclose(alignment_loss(f, f), torch.tensor(-1.0))
    assert torch.allclose(alignment_loss(F.normalize(f, dim=-1), f), torch.tensor(-1.0))
    assert torch.allclose(alignment_loss(-f, f), torch.tensor(1.0))
    a, b = torch.zeros(2, 4, 6), torch.zeros(2, 4, 6)
    a[..., :3], b[..., 3:] = torch.randn(2, 4, 3), torch.randn(2, 4, 3)  # disjoint coordinates: orthogonal
    assert alignment_loss(a, b).abs() < 1e-7


def test_alignment_loss_ignores_the_length_of_each_feature_and_averages_over_patches():
    torch.manual_seed(1)
    p, f = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    scales = torch.rand(2, 5, 1) * 10 + 0.1  # a different positive scale for every patch
    assert torch.allclose(alignment_loss(p * scales, f), alignment_loss(p, f))
    assert torch.allclose(alignment_loss(p, f * 3.0), alignment_loss(p, f))
    by_hand = -F.cosine_similarity(p, f, dim=-1).mean()
    assert torch.allclose(alignment_loss(p, f), by_hand)
    with pytest.raises(ValueError, match="must match"):
        alignment_loss(p, f[:, :4])
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        alignment_loss(p[0], f[0])


def manual_forward_to_depth(model: DiT, x, t, y, depth):
    tokens = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    for block in model.blocks[:depth]:
        tokens = block(tokens, c)
    return tokens


def test_hidden_states_are_those_of_a_manual_forward_and_leave_the_output_unchanged():
    model = random_dit()
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([10.0, 500.0]), torch.tensor([0, 2])
    plain = model(x, t, y)
    for depth in (1, 2, 4):
        output, hidden = hidden_states(model, depth, x, t, y)
        assert torch.equal(output, plain)
        assert hidden.shape == (2, 16, 32)
        assert torch.allclose(hidden, manual_forward_to_depth(model, x, t, y, depth), atol=1e-6)
    assert not model.blocks[0]._forward_hooks  # the hook is gone afterwards
    with capture_hidden_states(model, 2) as captured:
        model(x, t, y)
        model(x, t, y)
    assert len(captured) == 2 and torch.equal(captured[0], captured[1])
    with pytest.raises(ValueError, match="depth must be an int from 1 to the number of blocks 4"):
        hidden_states(model, 5, x, t, y)
    with pytest.raises(ValueError, match="depth must be"):
        hidden_states(model, 0, x, t, y)


def grads(loss, params):
    return [torch.zeros_like(p) if g is None else g
            for p, g in zip(params, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))]


def test_the_alignment_term_reaches_only_the_blocks_up_to_its_depth():
    model, projector = random_dit(), Projector(32, 64, 24)
    x0, y = torch.randn(4, 2, 8, 8), torch.tensor([0, 1, 2, 0])
    features = torch.randn(4, 16, 24)  # a frozen encoder's patch features of x0
    torch.manual_seed(2)
    losses = repa_loss(model, projector, x0, features, depth=2, model_kwargs={"y": y}, proj_coeff=0.5,
                       time_scale=1000.0)
    assert torch.allclose(losses.total, losses.denoising + 0.5 * losses.alignment)
    assert -1 <= losses.alignment <= 1
    groups = {"early": list(model.blocks[:2].parameters()) + list(model.t_embedder.parameters()),
              "late": list(model.blocks[2:].parameters()) + list(model.final_layer.parameters()),
              "projector": list(projector.parameters())}
    align = {name: grads(losses.alignment, ps) for name, ps in groups.items()}
    denoise = {name: grads(losses.denoising, ps) for name, ps in groups.items()}
    total = {name: grads(losses.total, ps) for name, ps in groups.items()}
    norm = lambda gs: sum(g.abs().sum() for g in gs)  # noqa: E731
    assert norm(align["early"]) > 0 and norm(align["projector"]) > 0
    assert norm(align["late"]) == 0  # blocks after the aligned one never see the alignment term
    assert norm(denoise["projector"]) == 0  # the projector only serves the alignment
    assert norm(denoise["early"]) > 0 and norm(denoise["late"]) > 0
    for name in groups:  # the early blocks get both, the late ones the denoising gradient alone
        assert all(torch.allclose(g, d + 0.5 * a, atol=1e-6)
                   for g, d, a in zip(total[name], denoise[name], align[name]))


def test_with_zero_coefficient_repa_is_plain_flow_matching():
    from minilib.flow import flow_matching_loss
    torch.manual_seed(3)
    model = TinyDenoiser(image_size=8, patch_size=4, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                         num_classes=3, class_dropout_prob=0.0).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    x0, y, features = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2]), torch.randn(3, 4, 8)
    projector = Projector(32, 16, 8)
    torch.manual_seed(4)
    losses = repa_loss(model, projector, x0, features, depth=1, model_kwargs={"y": y}, proj_coeff=0.0)
    torch.manual_seed(4)
    assert torch.allclose(losses.total, flow_matching_loss(model, x0, {"y": y}))
    with pytest.raises(ValueError, match="must match"):  # 4 tokens, 5 features
        repa_loss(model, Projector(32, 16, 8), x0, torch.randn(3, 5, 8), depth=1, model_kwargs={"y": y})
    with pytest.raises(ValueError, match="learn_sigma"):
        repa_loss(random_dit(learn_sigma=True), Projector(32, 16, 8), torch.randn(2, 2, 8, 8),
                  torch.randn(2, 16, 8), depth=1, model_kwargs={"y": torch.tensor([0, 1])})
