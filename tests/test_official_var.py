"""minilib's VQ-VAE, quantiser and VAR compute what the official VAR code computes.

``tests/reference/official/var.safetensors`` holds what FoundationVision/VAR (commit in the
file's metadata) computed in float32 on the CPU, on one thread, with small models; made by
``tests/reference/make_official_var.py``, whose docstring lists the cases. The quantisers' and
transformers' state dicts are in the file; the VQ-VAE's weights are too many, so the file
lists the official keys and shapes and both sides fill them from ``synthetic_weights.py``.
Every model here loads its official state dict with ``strict=True``. Tokens and indices must
agree exactly, floats to float32 rounding (``TOLERANCE``).
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from minilib.var import VAR
from minilib.vqvae import VQVAE, VectorQuantizer2

REFERENCE = Path(__file__).resolve().parent / "reference" / "official" / "var.safetensors"
sys.path.insert(0, str(REFERENCE.parent.parent))
from synthetic_weights import synthetic_value  # noqa: E402

TOLERANCE = dict(rtol=1e-5, atol=1e-5)
# Sampling without the KV cache (minilib's option; the official code always caches) recomputes
# the prefix under the mask, so its logits round differently; more_smooth's Gumbel-softmax at
# temperature 0.0135 then magnifies that about 70 times in the soft codes. The tokens still agree.
NO_CACHE_TOLERANCE = dict(rtol=1e-4, atol=1e-4)
RUN_NAMES = ["labels", "random_labels", "smooth", "smooth_random_filtered", "int_label", "null_label",
             "global_rng", "shared"]
QUANT_NAMES = ["partial4", "partial3", "shared", "nonshared3", "znorm", "znorm_near_ties", "identity"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The reference ran on one thread; so do we (a convolution may round differently on more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference():
    with safe_open(str(REFERENCE), framework="pt") as f:
        tensors = {key: f.get_tensor(key).clone() for key in f.keys()}  # clone: aligned copies
        metadata = f.metadata()
    assert metadata.pop("commit") == "78b95394fc5896192e3a003e4b295f8ea743c48f"
    return tensors, {key: json.loads(value) for key, value in metadata.items()}


def state_dict(tensors, prefix):
    """The tensors saved under ``prefix`` + official key, keyed by the official key."""
    return {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}


def pyramid(tensors, prefix):
    """The index maps ``prefix + idx_0, idx_1, ...`` (coarse to fine)."""
    count = sum(key.startswith(prefix + "idx_") for key in tensors)
    return [tensors[f"{prefix}idx_{si}"] for si in range(count)]


def assert_same_tokens(ours, official):
    assert len(official) > 0
    for si, (a, b) in enumerate(zip(ours, official, strict=True)):
        assert a.dtype == torch.int64 and torch.equal(a, b), f"scale {si}: indices differ"


@pytest.fixture(scope="module")
def vae(reference):
    _, meta = reference
    config = {**meta["vqvae_config"], "v_patch_nums": tuple(meta["vqvae_config"]["v_patch_nums"])}
    vae = VQVAE(test_mode=True, **config)
    weights = {key: synthetic_value(key, torch.empty(shape), meta["weight_seed"])
               for key, shape in meta["vqvae_state_dict_shapes"].items()}
    vae.load_state_dict(weights, strict=True)
    return vae


@pytest.fixture(scope="module")
def models(reference, vae):
    tensors, meta = reference
    models = {}
    for name, config in meta["var_configs"].items():
        var = VAR(vae_local=vae, **{**config, "patch_nums": tuple(config["patch_nums"])})
        var.load_state_dict(state_dict(tensors, f"{name}/state_dict/"), strict=True)
        models[name] = var.eval()
    assert models["var"].blocks[0].attn.scale_mul_1H11.max() > torch.log(torch.tensor(100.0))  # the clamp acts
    return models


@pytest.mark.parametrize("name", QUANT_NAMES)
def test_multi_scale_quantiser(reference, name):
    tensors, meta = reference
    case = meta["quant_cases"][name]
    out = state_dict(tensors, f"quant_{name}/")
    quant = VectorQuantizer2(64, 8, using_znorm=case.get("using_znorm", False), beta=0.25,
                             default_qresi_counts=case.get("default_qresi_counts", 0),
                             v_patch_nums=case["v_patch_nums"], quant_resi=case.get("quant_resi", 0.5),
                             share_quant_resi=case["share_quant_resi"])
    quant.load_state_dict(state_dict(out, "state_dict/"), strict=True)
    quant.eval()
    f = out["f"]
    with torch.no_grad():
        idx = quant.f_to_idxBl_or_fhat(f, to_fhat=False)
        assert_same_tokens(idx, pyramid(out, ""))
        for si, fhat in enumerate(quant.f_to_idxBl_or_fhat(f, to_fhat=True)):
            torch.testing.assert_close(fhat, out[f"fhat_{si}"], **TOLERANCE)
        torch.testing.assert_close(quant.idxBl_to_var_input(idx), out["var_input"], **TOLERANCE)
        codes = [quant.embedding(idx_Bl).transpose(1, 2).reshape(f.shape[0], 8, pn, pn)
                 for idx_Bl, pn in zip(idx, case["v_patch_nums"])]
        f_hat = torch.zeros_like(f)
        for si, h_BChw in enumerate(codes):
            f_hat, next_input = quant.get_next_autoregressive_input(si, len(codes), f_hat, h_BChw)
            torch.testing.assert_close(next_input, out[f"next_{si}"], **TOLERANCE)
        for si, small in enumerate(quant.embed_to_fhat(codes, all_to_max_scale=False)):
            torch.testing.assert_close(small, out[f"fhat_small_{si}"], **TOLERANCE)
        f_hat, usages, loss = quant(f, ret_usages=True)
    torch.testing.assert_close(f_hat, out["forward_fhat"], **TOLERANCE)
    torch.testing.assert_close(loss, out["forward_loss"], **TOLERANCE)
    assert usages == out["forward_usages"].tolist()
    if name == "partial4":
        assert 0 < min(usages) and max(usages) < 100  # the usage case is not trivial
        patches = [tuple(hw) for hw in meta["custom_patches"]]
        assert_same_tokens(quant.f_to_idxBl_or_fhat(out["f_custom"], to_fhat=False, v_patch_nums=patches),
                           pyramid(out, "custom_"))


def test_vqvae_tokens_reconstruction_and_loss(reference, vae):
    tensors, _ = reference
    images = tensors["vqvae/images"]
    with torch.no_grad():
        idx = vae.img_to_idxBl(images)
        assert_same_tokens(idx, pyramid(tensors, "vqvae/"))
        recon = vae.idxBl_to_img(idx, same_shape=True, last_one=True)
        loss = vae(images)[2]
    torch.testing.assert_close(recon, tensors["vqvae/recon"], **TOLERANCE)
    torch.testing.assert_close(loss, tensors["vqvae/forward_loss"], **TOLERANCE)


@pytest.mark.parametrize("name", ["var", "var_shared"])
def test_teacher_forced_logits_with_the_official_eval_mode_label_draw(reference, models, name):
    tensors, _ = reference
    var = models[name]
    with torch.no_grad():
        x = var.vae_quant_proxy[0].idxBl_to_var_input(pyramid(tensors, f"{name}/"))
        torch.testing.assert_close(x, tensors[f"{name}/x_BLCv"], **TOLERANCE)
        torch.manual_seed(7)
        logits = var(tensors[f"{name}/labels"], x, drop_labels=True)
        next_rand = torch.rand(4)
    torch.testing.assert_close(logits, tensors[f"{name}/logits_eval"], **TOLERANCE)
    assert torch.equal(next_rand, tensors[f"{name}/next_rand_eval"])  # the same draws, so the same stream after


def test_eval_mode_keeps_the_labels_and_draws_nothing(reference, models):
    """The book's choice: in eval mode no label is dropped and the global generator is not touched.

    The official eval-mode logits are then those of the labels the official draw kept.
    """
    tensors, _ = reference
    var = models["var"]
    labels, x = tensors["var/labels"], tensors["var/x_BLCv"]
    torch.manual_seed(7)
    dropped = torch.rand(4) < var.cond_drop_rate  # the official draw after the same seed
    assert dropped.any() and not dropped.all()
    with torch.no_grad():
        torch.manual_seed(7)
        kept = var(labels, x)
        after = torch.rand(4)
        as_official = var(torch.where(dropped, var.num_classes, labels), x)
    torch.manual_seed(7)
    assert torch.equal(after, torch.rand(4))  # no draw in eval mode
    assert not torch.allclose(kept, tensors["var/logits_eval"])
    torch.testing.assert_close(as_official, tensors["var/logits_eval"], **TOLERANCE)


def test_training_mode_forward_draws_label_dropout_then_stochastic_depth(reference, models):
    tensors, _ = reference
    var = models["var"]
    labels, x = tensors["var/labels"], tensors["var/x_BLCv"]
    assert var.blocks[1].drop_path.p > 0
    var.train()
    try:
        with torch.no_grad():
            torch.manual_seed(11)
            logits = var(labels, x)
            next_rand = torch.rand(4)
    finally:
        var.eval()
    torch.testing.assert_close(logits, tensors["var/logits_train"], **TOLERANCE)
    assert torch.equal(next_rand, tensors["var/next_rand_train"])
    torch.manual_seed(11)
    dropped = torch.rand(4) < var.cond_drop_rate
    with torch.no_grad():
        without_drop_path = var(torch.where(dropped, var.num_classes, labels), x)
    assert dropped.any() and not torch.allclose(logits, without_drop_path)  # both kinds of dropout acted


@pytest.mark.parametrize("name", RUN_NAMES)
def test_seeded_sampling_runs(reference, models, name):
    tensors, meta = reference
    model, B, labels, g_seed, cfg, top_k, top_p, more_smooth = meta["runs"][name]
    label_B = torch.tensor(labels) if isinstance(labels, list) else labels
    official = pyramid(tensors, f"run_{name}/")
    for use_kv_cache in (True, False):
        kwargs = dict(B=B, label_B=label_B, g_seed=g_seed, cfg=cfg, top_k=top_k, top_p=top_p,
                      more_smooth=more_smooth, use_kv_cache=use_kv_cache)
        with torch.no_grad():
            torch.manual_seed(meta["global_seed"])
            idx = models[model].autoregressive_infer_cfg(**kwargs, return_idx=True)
            torch.manual_seed(meta["global_seed"])
            images = models[model].autoregressive_infer_cfg(**kwargs)
            next_rand = torch.rand(4)
        assert_same_tokens(idx, official)
        torch.testing.assert_close(images, tensors[f"run_{name}/images"],
                                   **(TOLERANCE if use_kv_cache else NO_CACHE_TOLERANCE))
        assert torch.equal(next_rand, tensors[f"run_{name}/next_rand"])  # the same global draws, or none
