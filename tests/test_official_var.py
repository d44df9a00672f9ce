"""minilib's VQ-VAE and VAR compute what the official VAR code computes.

``tests/reference/official/var.safetensors`` holds what FoundationVision/VAR (commit in the
file's metadata) computed in float32 on the CPU with a small VQ-VAE and VAR whose weights
come from ``synthetic_weights.py`` (the same deterministic values on both sides, so the file
stores none): an image's index pyramid and reconstruction, teacher-forced logits, and whole
seeded ``autoregressive_infer_cfg`` runs with the index map sampled at every scale.
``tests/reference/make_official_var.py`` made it. Tokens must agree exactly, floats to
float32 rounding.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from minilib.var import VAR
from minilib.vqvae import VQVAE

REFERENCE = Path(__file__).resolve().parent / "reference" / "official" / "var.safetensors"
sys.path.insert(0, str(REFERENCE.parent.parent))
from synthetic_weights import fill_  # noqa: E402

TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def reference():
    with safe_open(str(REFERENCE), framework="pt") as f:
        tensors = {key: f.get_tensor(key).clone() for key in f.keys()}  # clone: aligned copies
        metadata = f.metadata()
    assert metadata["commit"] == "78b95394fc5896192e3a003e4b295f8ea743c48f"
    return tensors, {key: json.loads(value) for key, value in metadata.items() if key != "commit"}


@pytest.fixture(scope="module")
def models(reference):
    _, meta = reference
    vae = VQVAE(test_mode=True, **{**meta["vqvae_config"], "v_patch_nums": tuple(meta["vqvae_config"]["v_patch_nums"])})
    var_config = {**meta["var_config"], "patch_nums": tuple(meta["var_config"]["patch_nums"])}
    var = VAR(vae_local=vae, **var_config)
    fill_(vae.eval(), meta["weight_seed"])
    fill_(var.eval(), meta["weight_seed"] + 1, skip=lambda name: name in ("attn_bias_for_masking", "lvl_1L"))
    return vae, var


def pyramid(tensors, prefix):
    return [tensors[f"{prefix}idx_{k}"] for k in range(sum(key.startswith(f"{prefix}idx_") for key in tensors))]


def test_vqvae_tokens_and_reconstruction(reference, models):
    tensors, _ = reference
    vae, _ = models
    with torch.no_grad():
        idx = vae.img_to_idxBl(tensors["vqvae/images"])
        for ours, official in zip(idx, pyramid(tensors, "vqvae/"), strict=True):
            assert torch.equal(ours, official)
        recon = vae.idxBl_to_img(idx, same_shape=True, last_one=True)
    torch.testing.assert_close(recon, tensors["vqvae/recon"], **TOLERANCE)


def test_teacher_forced_logits_with_the_official_eval_mode_label_draw(reference, models):
    tensors, _ = reference
    vae, var = models
    with torch.no_grad():
        x = vae.quantize.idxBl_to_var_input(pyramid(tensors, "vqvae/"))
        torch.testing.assert_close(x, tensors["forward/x_BLCv"], **TOLERANCE)
        torch.manual_seed(7)
        logits = var(tensors["forward/labels"], x, drop_labels=True)
        next_rand = torch.rand(4)
    torch.testing.assert_close(logits, tensors["forward/logits"], **TOLERANCE)
    assert torch.equal(next_rand, tensors["forward/next_rand"])  # the same draws, so the same stream after


def test_eval_mode_leaves_the_labels_alone_and_draws_nothing(reference, models):
    tensors, _ = reference
    _, var = models
    labels = tensors["forward/labels"]
    with torch.no_grad():
        torch.manual_seed(7)
        kept = var(labels, tensors["forward/x_BLCv"])
        after = torch.rand(1)
        dropped = var(torch.full_like(labels, 10), tensors["forward/x_BLCv"])
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(1))  # no draw in eval mode
    assert not torch.allclose(kept, dropped)


@pytest.mark.parametrize("name", ["labels", "random_labels", "smooth", "no_cache_labels"])
def test_seeded_sampling_runs(reference, models, name):
    tensors, meta = reference
    _, var = models
    labels, g_seed, cfg, top_k, top_p, more_smooth = meta["runs"][name]
    label_B = None if labels is None else torch.tensor(labels)
    for use_kv_cache in ([True, False] if name == "no_cache_labels" else [True]):
        kwargs = dict(B=3, label_B=label_B, g_seed=g_seed, cfg=cfg, top_k=top_k, top_p=top_p,
                      more_smooth=more_smooth, use_kv_cache=use_kv_cache)
        with torch.no_grad():
            idx = var.autoregressive_infer_cfg(**kwargs, return_idx=True)
            images = var.autoregressive_infer_cfg(**kwargs)
        for ours, official in zip(idx, pyramid(tensors, f"run_{name}/"), strict=True):
            assert torch.equal(ours, official), f"scale {ours.shape[1]}: tokens differ"
        torch.testing.assert_close(images, tensors[f"run_{name}/images"], **TOLERANCE)
