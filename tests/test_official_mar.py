"""minilib's MAR computes what the official MAR code computes, with the same weights and seeds.

``tests/reference/official/mar.safetensors`` holds the weights of a tiny random MAR
and what the official code (LTH14/mar, commit in the file's metadata) computed with
them in float32 on the CPU; ``tests/reference/make_official_mar.py`` made it. Here
the same weights go into ``minilib.mar.MAR`` with ``strict=True``, every case is
recomputed, and floats must agree to float32 rounding, orders and masks exactly.

The official code draws generation orders and the training mask ratio with numpy's
global generator; ``numpy_orders`` and ``numpy_mask_ratio`` draw them the same way,
and everything else is torch's stream in both. So each case starts like the
official run did, with ``np.random.seed(s)`` and ``torch.manual_seed(s)``.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from minilib.mar import MAR, numpy_mask_ratio, numpy_orders

REFERENCE = Path(__file__).resolve().parent / "reference" / "official" / "mar.safetensors"
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def reference():
    with safe_open(str(REFERENCE), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        metadata = f.metadata()
    assert metadata["commit"] == "fe470ac24afbee924668d8c5c83e9fec60af3a73"
    return tensors, {key: json.loads(metadata[key]) for key in ("config", "seeds", "sample_runs")}


def case(reference, name):
    """The tensors saved under ``name/``, without the prefix."""
    tensors, _ = reference
    return {key[len(name) + 1:]: value for key, value in tensors.items() if key.startswith(name + "/")}


def official_model(reference, train=False):
    """minilib's MAR with the official weights (strict: every key and shape must match)."""
    _, meta = reference
    model = MAR(**meta["config"])
    model.load_state_dict(case(reference, "state_dict"), strict=True)
    return model.train(train)


def test_the_weights_load_strictly_and_the_file_is_the_official_config(reference):
    model = official_model(reference)
    assert model.seq_len == 16 and model.token_embed_dim == 16 and model.buffer_size == 4
    assert len(case(reference, "state_dict")) == len(model.state_dict())


def test_orders_are_the_official_numpy_shuffles(reference):
    np.random.seed(reference[1]["seeds"]["orders"])
    orders = numpy_orders(3, 16)
    assert orders.dtype == torch.long and torch.equal(orders, case(reference, "orders")["orders"])
    # torch's own orders are a different stream: the numpy helper is needed
    torch.manual_seed(0)
    assert not torch.equal(official_model(reference).sample_orders(3), orders)


def test_the_training_mask_is_the_official_one(reference):
    expected = case(reference, "masking")
    model = official_model(reference)
    np.random.seed(reference[1]["seeds"]["masking"])
    orders = numpy_orders(3, 16)
    ratio = numpy_mask_ratio(model.mask_ratio_generator)  # scipy's truncnorm.rvs(1), drawn after the orders
    assert torch.equal(orders, expected["orders"])
    assert ratio == pytest.approx(expected["mask_ratio"].item(), rel=0, abs=1e-12)
    mask = model.random_masking(torch.zeros(3, 16, 16), orders, mask_ratio=ratio)
    assert torch.equal(mask, expected["mask"])


def test_encoder_and_decoder_with_the_buffer_match(reference):
    expected = case(reference, "mae")
    model = official_model(reference)
    tokens, mask = expected["tokens"], expected["mask"]
    with torch.no_grad():
        class_embedding = model.class_emb(expected["labels"])
        encoded = model.forward_mae_encoder(tokens, mask, class_embedding)
        torch.testing.assert_close(encoded, expected["encoded"], **TOLERANCE)
        torch.testing.assert_close(model.forward_mae_decoder(encoded, mask), expected["z"], **TOLERANCE)
        # the guidance batch of sample_tokens: tokens twice, the class then the fake class
        both = torch.cat([class_embedding, model.fake_latent.repeat(3, 1)])
        encoded = model.forward_mae_encoder(torch.cat([tokens, tokens]), torch.cat([mask, mask]), both)
        torch.testing.assert_close(encoded, expected["encoded_cfg"], **TOLERANCE)
        z = model.forward_mae_decoder(encoded, torch.cat([mask, mask]))
        torch.testing.assert_close(z, expected["z_cfg"], **TOLERANCE)


def test_the_training_loss_and_its_gradients_match_with_the_official_random_stream(reference):
    """Train mode: label drop, dropout, the loss's t and noise: all the official draws."""
    expected = case(reference, "train")
    model = official_model(reference, train=True)
    seed = reference[1]["seeds"]["train"]
    np.random.seed(seed)
    torch.manual_seed(seed)
    orders = numpy_orders(4, 16)
    ratio = numpy_mask_ratio(model.mask_ratio_generator)
    assert torch.equal(model.random_masking(torch.zeros(4, 16, 16), orders, ratio), expected["mask"])
    loss = model(expected["imgs"], expected["labels"], orders=orders, mask_ratio=ratio)
    loss.backward()
    torch.testing.assert_close(loss.detach().reshape(1), expected["loss"], **TOLERANCE)
    torch.testing.assert_close(model.z_proj.weight.grad, expected["grad_z_proj_weight"], **TOLERANCE)
    torch.testing.assert_close(model.diffloss.net.input_proj.weight.grad, expected["grad_head_input_proj_weight"],
                               **TOLERANCE)
    torch.testing.assert_close(model.fake_latent.grad, expected["grad_fake_latent"], **TOLERANCE)
    # with torch's orders and ratio instead, the same seed gives another loss
    torch.manual_seed(seed)
    assert abs(model(expected["imgs"], expected["labels"]).item() - loss.item()) > 1e-3


def test_the_diffusion_head_and_its_guidance_match(reference):
    expected = case(reference, "head")
    net = official_model(reference).diffloss.net
    with torch.no_grad():
        torch.testing.assert_close(net(expected["x"], expected["t"], expected["c"]), expected["out"], **TOLERANCE)
        guided = net.forward_with_cfg(expected["x"], expected["t"], expected["c"], expected["cfg_scale"].item())
    torch.testing.assert_close(guided, expected["out_cfg"], **TOLERANCE)


def test_the_per_token_diffusion_losses_match_for_given_t_and_noise(reference):
    expected = case(reference, "losses")
    diffloss = official_model(reference).diffloss
    with torch.no_grad():
        terms = diffloss.train_diffusion.training_losses(diffloss.net, expected["target"], t=expected["t"],
                                                         model_kwargs=dict(c=expected["c"]), noise=expected["noise"])
    for name in ("mse", "vb", "loss"):
        torch.testing.assert_close(terms[name], expected[name], **TOLERANCE)


def test_the_diffusion_heads_sampling_matches_call_after_call(reference):
    """Two calls after one seed: the second starts where the first left torch's stream."""
    expected = case(reference, "head_sample")
    diffloss = official_model(reference).diffloss
    torch.manual_seed(reference[1]["seeds"]["head_sample"])
    z = expected["z"]
    torch.testing.assert_close(diffloss.sample(z, temperature=0.9, cfg=1.0), expected["first"], **TOLERANCE)
    torch.testing.assert_close(diffloss.sample(z, temperature=0.9, cfg=1.0), expected["second"], **TOLERANCE)
    torch.testing.assert_close(diffloss.sample(z, temperature=0.8, cfg=2.5), expected["guided"], **TOLERANCE)


@pytest.mark.parametrize("name", ["cond", "uncond", "cfg_linear", "cfg_constant"])
def test_whole_sampling_runs_match(reference, name):
    expected = case(reference, f"sample_{name}")
    run = dict(reference[1]["sample_runs"][name])
    seed, bsz = run.pop("seed"), run.pop("bsz")
    labels = None if run["labels"] is None else torch.tensor(run["labels"])
    model = official_model(reference)
    np.random.seed(seed)
    orders = numpy_orders(bsz, model.seq_len)
    assert torch.equal(orders, expected["orders"])
    latents = model.sample_tokens(bsz, **{**run, "labels": labels}, orders=orders, seed=seed)
    torch.testing.assert_close(latents, expected["latents"], **TOLERANCE)


def test_the_seed_argument_is_the_global_seed_and_leaves_it_alone(reference):
    """``seed=s`` draws what ``torch.manual_seed(s)`` then a plain call draws, and restores the stream."""
    expected = case(reference, "sample_cond")
    run = reference[1]["sample_runs"]["cond"]
    model = official_model(reference)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    with_seed = model.sample_tokens(2, num_iter=4, labels=torch.tensor(run["labels"]), orders=expected["orders"],
                                    seed=run["seed"])
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(run["seed"])
    plain = model.sample_tokens(2, num_iter=4, labels=torch.tensor(run["labels"]), orders=expected["orders"])
    assert torch.equal(with_seed, plain)
    torch.testing.assert_close(plain, expected["latents"], **TOLERANCE)
