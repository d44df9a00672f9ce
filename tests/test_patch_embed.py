import pytest
import torch

from minilib.patch_embed import (PatchEmbed, cropped_pos_embed, get_1d_sincos_pos_embed, sincos_shift_matrix,
                                 get_2d_sincos_pos_embed, patchify, unpatchify)


def test_patch_embed_shapes():
    embed = PatchEmbed(patch_size=4, in_chans=3, embed_dim=32, img_size=16)
    tokens = embed(torch.randn(2, 3, 16, 16))
    assert tokens.shape == (2, 16, 32)
    assert embed.num_patches == 16 and embed.patch_size == (4, 4)


def test_strided_conv_equals_linear_map_on_flattened_patches():
    torch.manual_seed(0)
    embed = PatchEmbed(patch_size=4, in_chans=3, embed_dim=24)
    images = torch.randn(2, 3, 12, 8)
    by_linear = patchify(images, 4) @ embed.as_linear_weight().T + embed.proj.bias
    torch.testing.assert_close(embed(images), by_linear, atol=1e-5, rtol=1e-5)


def test_patchify_takes_patches_in_row_major_order():
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    patches = patchify(images, 2)  # (2, 4, 4)
    torch.testing.assert_close(patches[0, 1], images[0, 0, 0:2, 2:4].reshape(-1))  # top right
    torch.testing.assert_close(patches[1, 2], images[1, 0, 2:4, 0:2].reshape(-1))  # bottom left


@pytest.mark.parametrize("height,width", [(8, 8), (8, 12)])
def test_unpatchify_inverts_patchify(height, width):
    images = torch.randn(3, 2, height, width)
    grid = dict(height=height // 4, width=width // 4) if height != width else {}
    torch.testing.assert_close(unpatchify(patchify(images, 4), 4, 2, **grid), images)


def test_1d_sincos_matches_the_formula_entry_by_entry():
    dim, positions = 8, torch.tensor([0.0, 1.0, 5.0])
    emb = get_1d_sincos_pos_embed(dim, positions)
    for row, pos in enumerate(positions.tolist()):
        for i in range(dim // 2):
            angle = pos / 10000 ** (2 * i / dim)
            assert emb[row, i].item() == pytest.approx(torch.sin(torch.tensor(angle, dtype=torch.float64)).item())
            assert emb[row, dim // 2 + i].item() == pytest.approx(torch.cos(torch.tensor(angle, dtype=torch.float64)).item())


def test_2d_sincos_halves_encode_column_and_row():
    dim, grid = 16, 5
    emb = get_2d_sincos_pos_embed(dim, grid).reshape(grid, grid, dim)
    # the first half depends only on the column, the second only on the row
    torch.testing.assert_close(emb[0, :, : dim // 2], emb[3, :, : dim // 2])
    torch.testing.assert_close(emb[:, 0, dim // 2:], emb[:, 4, dim // 2:])
    torch.testing.assert_close(emb[2, 3, : dim // 2], get_1d_sincos_pos_embed(dim // 2, torch.tensor([3.0]))[0].float())


def test_2d_sincos_nearby_positions_are_more_similar():
    emb = get_2d_sincos_pos_embed(64, 8)
    emb = emb / emb.norm(dim=1, keepdim=True)
    similarity = emb @ emb.T
    centre = 3 * 8 + 3
    assert similarity[centre, centre + 1] > similarity[centre, centre + 3] > similarity[centre, 7 * 8 + 7]


def test_cropped_pos_embed_takes_the_centre():
    max_size, dim = 6, 4
    full = get_2d_sincos_pos_embed(dim, max_size).unsqueeze(0)
    crop = cropped_pos_embed(full, max_size, 2, 4)
    assert crop.shape == (1, 8, dim)
    grid = full.reshape(max_size, max_size, dim)
    torch.testing.assert_close(crop.reshape(2, 4, dim), grid[2:4, 1:5])
    torch.testing.assert_close(cropped_pos_embed(full, max_size, 6, 6), full)


def test_bad_inputs_raise_clear_errors():
    embed = PatchEmbed(patch_size=4, in_chans=3, embed_dim=8, img_size=16)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        PatchEmbed(4, 3, 8)(torch.randn(1, 3, 10, 16))
    with pytest.raises(ValueError, match="expects 3 channels"):
        embed(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        embed(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match="built for 16x16"):
        embed(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"img_size \(18\) must be divisible by patch_size \(4\)"):
        PatchEmbed(4, 3, 8, img_size=18)
    with pytest.raises(ValueError, match="does not fit"):
        cropped_pos_embed(torch.zeros(1, 16, 4), 4, 5, 2)
    with pytest.raises(ValueError, match="last dimension"):
        unpatchify(torch.zeros(1, 4, 10), 2, 3)
    with pytest.raises(ValueError, match="divisible by 4"):
        get_2d_sincos_pos_embed(6, 3)


@pytest.mark.parametrize("offset", [0, 1, 5, -3, 2.5])
def test_a_shift_of_position_is_a_rotation_of_the_sincos_embedding(offset):
    positions = torch.arange(-4, 20, dtype=torch.float64)
    rotation = sincos_shift_matrix(16, offset)
    shifted = get_1d_sincos_pos_embed(16, positions + offset)
    torch.testing.assert_close(get_1d_sincos_pos_embed(16, positions) @ rotation.T, shifted)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(16, dtype=torch.float64))  # orthogonal
    # so the dot product of two positions depends on their offset only
    products = (get_1d_sincos_pos_embed(16, positions) * shifted).sum(dim=1)
    torch.testing.assert_close(products, products[:1].expand_as(products))


def test_sincos_shift_matrix_rejects_an_odd_width():
    with pytest.raises(ValueError, match="even"):
        sincos_shift_matrix(7, 1)
