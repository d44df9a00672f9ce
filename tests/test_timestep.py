import math

import pytest
import torch

from minilib.timestep import LabelEmbedder, TimestepEmbedder, timestep_embedding


def test_timestep_embedding_matches_direct_formula():
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    dim, half = 10, 5
    emb = timestep_embedding(t, dim)
    assert emb.shape == (4, 10)
    for n, tn in enumerate(t.tolist()):
        for i in range(half):
            freq = math.exp(-math.log(10000) * i / half)
            assert emb[n, i].item() == pytest.approx(math.cos(tn * freq), abs=1e-4)
            assert emb[n, half + i].item() == pytest.approx(math.sin(tn * freq), abs=1e-4)


def test_odd_dim_is_zero_padded_and_t0_is_all_cosines():
    emb = timestep_embedding(torch.tensor([0.0, 3.0]), 7)
    assert emb.shape == (2, 7)
    assert torch.all(emb[:, -1] == 0)
    torch.testing.assert_close(emb[0, :3], torch.ones(3))
    torch.testing.assert_close(emb[0, 3:6], torch.zeros(3))


def test_integer_timesteps_give_float32_and_fractional_keep_dtype():
    assert timestep_embedding(torch.tensor([1, 2]), 8).dtype == torch.float32
    assert timestep_embedding(torch.tensor([0.5], dtype=torch.float64), 8).dtype == torch.float64


def test_timestep_embedder_shapes_and_keys():
    embedder = TimestepEmbedder(32)
    assert embedder(torch.rand(5) * 1000).shape == (5, 32)
    assert set(embedder.state_dict()) == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias"}
    assert embedder.mlp[0].weight.shape == (32, 256)


def test_label_embedder_null_class_and_dropout():
    torch.manual_seed(0)
    embedder = LabelEmbedder(num_classes=10, hidden_size=8, dropout_prob=0.5)
    assert embedder.embedding_table.weight.shape == (11, 8)
    labels = torch.arange(10).repeat(100)
    dropped = embedder.token_drop(labels)
    share = (dropped == 10).float().mean().item()
    assert 0.4 < share < 0.6
    kept = dropped != 10
    assert torch.equal(dropped[kept], labels[kept])
    forced = embedder(torch.tensor([3, 4]), train=False, force_drop_ids=torch.tensor([1, 0]))
    torch.testing.assert_close(forced[0], embedder.embedding_table.weight[10])
    torch.testing.assert_close(forced[1], embedder.embedding_table.weight[4])
    embedder.eval()
    torch.testing.assert_close(embedder(labels[:10]), embedder.embedding_table.weight[:10])


def test_label_embedder_without_dropout_has_no_null_class():
    embedder = LabelEmbedder(num_classes=4, hidden_size=8, dropout_prob=0.0)
    assert embedder.embedding_table.num_embeddings == 4
    with pytest.raises(ValueError, match="no null class"):
        embedder.null_class


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        timestep_embedding(torch.zeros(2, 2), 8)
    embedder = LabelEmbedder(num_classes=4, hidden_size=8)
    with pytest.raises(ValueError, match=r"lie in \[0, 4\]"):
        embedder(torch.tensor([5]))
    with pytest.raises(ValueError, match="1-D integer"):
        embedder(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="dropout_prob"):
        LabelEmbedder(4, 8, dropout_prob=1.0)
