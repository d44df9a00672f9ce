"""Reference outputs of the official VAR code (FoundationVision/VAR) for tests/test_official_var.py.

    .venv/bin/python tests/reference/make_official_var.py --official OFFICIAL/VAR --deps DEPS

``OFFICIAL/VAR`` is a checkout of the pinned commit (``official_env.OFFICIAL_COMMITS["VAR"]``):

    git clone https://github.com/FoundationVision/VAR OFFICIAL/VAR
    git -C OFFICIAL/VAR checkout 78b95394fc5896192e3a003e4b295f8ea743c48f

``DEPS`` holds ``huggingface_hub<0.27`` (VAR's model class inherits its hub mixin) and
``timm`` (see ``official_env.py``). The script runs the official classes on small models
in float32 on the CPU, on one thread (a convolution may round differently with more), and
writes ``tests/reference/official/var.safetensors``:

* ``vqvae/``: a VQ-VAE (ch 32, 64 codes of 8 channels, scales 1, 2, 3, 4, so 64x64
  images) applied to two random images: the index pyramid (``img_to_idxBl``), the
  reconstruction from it (``idxBl_to_img``) and the VQ loss of the training pass
  (``forward``). Its 4.4 M weights (17 MB) are too many to store; they come from
  ``synthetic_weights.py`` (each tensor seeded by its name, so the same on both sides)
  and the file stores the official key -> shape list, so the test can load them with
  ``strict=True``.
* ``quant_<name>/``: the multi-scale quantiser alone, in seven configurations (phis
  partially shared, shared, not shared, none; ``using_znorm``, also with near-tied codes;
  more scales): index pyramids (also for non-square scales), ``f_hat`` after every scale,
  ``idxBl_to_var_input``, the inputs ``get_next_autoregressive_input`` makes one scale at
  a time, ``embed_to_fhat`` without up-sampling to the largest scale, and ``forward``
  (f_hat, loss, code usages). Their state dicts are stored.
* ``var/`` and ``var_shared/``: two 2-block transformers on 10 classes, their state dicts
  (``var``: width 32, cosine attention with one head's temperature above the clamp at 100,
  stochastic depth; ``var_shared``: shared adaLN, plain attention); teacher-forced logits
  in eval mode after ``torch.manual_seed`` (the official forward draws ``torch.rand(B)``
  for label dropout in every mode) and, for ``var``, in training mode (label dropout and
  stochastic depth), each with the next numbers of the global generator afterwards.
* ``run_<name>/``: whole ``autoregressive_infer_cfg`` runs (labels given, ``None``, an
  int, the null class; guidance; top-k, top-p; ``more_smooth``; the global generator):
  the images, the index map sampled at every scale (recorded by wrapping the official
  ``sample_with_top_k_top_p_``; the official code itself is not changed) and the next
  numbers of the global generator (a seeded run must leave it alone).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.distributed as tdist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_env import OFFICIAL_COMMITS, OUTPUT_DIR, use_official  # noqa: E402
from synthetic_weights import fill_  # noqa: E402

VQVAE_CONFIG = dict(vocab_size=64, z_channels=8, ch=32, share_quant_resi=4, v_patch_nums=(1, 2, 3, 4))
VAR_CONFIGS = {
    "var": dict(num_classes=10, depth=2, embed_dim=32, num_heads=2, mlp_ratio=4.0, drop_path_rate=0.3,
                norm_eps=1e-6, shared_aln=False, cond_drop_rate=0.25, attn_l2_norm=True, patch_nums=(1, 2, 3, 4)),
    "var_shared": dict(num_classes=10, depth=2, embed_dim=32, num_heads=4, mlp_ratio=2.0, drop_path_rate=0.0,
                       norm_eps=1e-5, shared_aln=True, cond_drop_rate=0.1, attn_l2_norm=False,
                       patch_nums=(1, 2, 3, 4)),
}
QUANT_CASES = {  # VectorQuantizer2 settings (vocab_size 64, Cvae 8, beta 0.25 in all)
    "partial4": dict(share_quant_resi=4, v_patch_nums=(1, 2, 3, 4, 6)),
    "partial3": dict(share_quant_resi=3, v_patch_nums=(1, 2, 3, 4)),
    "shared": dict(share_quant_resi=1, quant_resi=-0.3, v_patch_nums=(1, 2, 4)),
    "nonshared3": dict(share_quant_resi=0, default_qresi_counts=3, v_patch_nums=(1, 2, 3, 4)),
    "znorm": dict(share_quant_resi=4, using_znorm=True, v_patch_nums=(1, 2, 3, 4)),
    # codes in pairs of almost the same direction: which of a pair wins is decided by rounding
    "znorm_near_ties": dict(share_quant_resi=4, using_znorm=True, v_patch_nums=(1, 2, 3, 4), near_ties=True),
    "identity": dict(share_quant_resi=4, quant_resi=0.0, v_patch_nums=(1, 2, 3, 4)),
}
QUANT_B = 4  # feature maps per quantiser case
CUSTOM_PATCHES = [(1, 1), (1, 2), (3, 2), (6, 6)]  # non-square scales for f_to_idxBl_or_fhat ("partial4")
WEIGHT_SEED = 20241203
FORWARD_LABELS = [3, 6, 10, 0]  # 10: the null class
RUNS = {  # name: (model, B, label_B, g_seed, cfg, top_k, top_p, more_smooth)
    "labels": ("var", 2, [3, 7], 0, 1.5, 0, 0.0, False),
    "random_labels": ("var", 2, None, 1, 4.0, 16, 0.9, False),
    "smooth": ("var", 2, [1, 2], 2, 3.0, 0, 0.0, True),
    "smooth_random_filtered": ("var", 2, None, 5, 1.0, 20, 0.95, True),
    "int_label": ("var", 1, 7, 6, 0.5, 8, 0.7, False),
    "null_label": ("var", 1, -1, 3, 2.0, 0, 0.0, False),
    "global_rng": ("var", 1, None, None, 1.5, 0, 0.9, True),  # after torch.manual_seed(GLOBAL_SEED)
    "shared": ("var_shared", 1, [5], 8, 1.5, 10, 0.0, False),
}
GLOBAL_SEED = 11
HIT_MARGIN_SCALE = 0.24  # usage buffers uniform in [0, 0.24): about half above VAR's margin here


def quantizer_case(VectorQuantizer2, name: str, config: dict, seed: int) -> tuple[dict, dict]:
    """Run one official quantiser; return (its state dict, its outputs)."""
    quant = VectorQuantizer2(vocab_size=64, Cvae=8, using_znorm=config.get("using_znorm", False), beta=0.25,
                             default_qresi_counts=config.get("default_qresi_counts", 0),
                             v_patch_nums=config["v_patch_nums"], quant_resi=config.get("quant_resi", 0.5),
                             share_quant_resi=config["share_quant_resi"]).eval()
    fill_(quant, seed)
    generator = torch.Generator().manual_seed(seed)
    if config.get("near_ties"):
        with torch.no_grad():
            base = quant.embedding.weight[::2]
            twins = base + 3e-7 * torch.randn(base.shape, generator=generator)
            quant.embedding.weight.copy_(torch.stack((base, twins), dim=1).reshape(64, 8))
    with torch.no_grad():  # code-usage buffer: random counts, so that forward's usages are not all 0
        quant.ema_vocab_hit_SV.copy_(torch.rand(quant.ema_vocab_hit_SV.shape, generator=generator) * HIT_MARGIN_SCALE)
    side = config["v_patch_nums"][-1]
    batch = 2 * QUANT_B if config.get("near_ties") else QUANT_B
    f = torch.randn(batch, 8, side, side, generator=generator)
    out = {"f": f}
    with torch.no_grad():
        idx = quant.f_to_idxBl_or_fhat(f, to_fhat=False)
        fhat = quant.f_to_idxBl_or_fhat(f, to_fhat=True)
        out["var_input"] = quant.idxBl_to_var_input(idx)
        codes = [quant.embedding(idx_Bl).transpose(1, 2).reshape(batch, 8, pn, pn)
                 for idx_Bl, pn in zip(idx, config["v_patch_nums"])]
        f_hat = torch.zeros(batch, 8, side, side)
        for si, h_BChw in enumerate(codes):
            f_hat, next_input = quant.get_next_autoregressive_input(si, len(codes), f_hat, h_BChw)
            out[f"next_{si}"] = next_input.clone()
        small = quant.embed_to_fhat(codes, all_to_max_scale=False, last_one=False)
        f_hat_fwd, usages, vq_loss = quant(f, ret_usages=True)
    for si, (idx_Bl, fhat_k, small_k) in enumerate(zip(idx, fhat, small)):
        out[f"idx_{si}"], out[f"fhat_{si}"], out[f"fhat_small_{si}"] = idx_Bl, fhat_k, small_k
    out["forward_fhat"], out["forward_loss"], out["forward_usages"] = f_hat_fwd, vq_loss, torch.tensor(usages)
    if name == "partial4":
        f_custom = torch.randn(QUANT_B, 8, side, side, generator=generator)
        out["f_custom"] = f_custom
        with torch.no_grad():
            for si, idx_Bl in enumerate(quant.f_to_idxBl_or_fhat(f_custom, to_fhat=False, v_patch_nums=CUSTOM_PATCHES)):
                out[f"custom_idx_{si}"] = idx_Bl
    return quant.state_dict(), out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--official", required=True, type=Path)
    parser.add_argument("--deps", type=Path)
    args = parser.parse_args()
    use_official(args.official, args.deps)
    import models.var as official_var  # noqa: E402
    from models import VAR, VQVAE  # noqa: E402
    from models.quant import VectorQuantizer2  # noqa: E402

    torch.set_num_threads(1)
    # VectorQuantizer2.forward asks torch.distributed for the world size: a group of one.
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    out: dict[str, torch.Tensor] = {}

    # ---- the multi-scale quantiser on its own
    for k, (name, config) in enumerate(QUANT_CASES.items()):
        state, tensors = quantizer_case(VectorQuantizer2, name, config, WEIGHT_SEED + 10 + k)
        out.update({f"quant_{name}/state_dict/{key}": value for key, value in state.items()})
        out.update({f"quant_{name}/{key}": value for key, value in tensors.items()})

    # ---- the VQ-VAE (synthetic weights, see the docstring)
    torch.manual_seed(0)
    vae = VQVAE(test_mode=True, **VQVAE_CONFIG).eval()
    fill_(vae, WEIGHT_SEED)
    vqvae_shapes = {key: list(value.shape) for key, value in vae.state_dict().items()}
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        idx = vae.img_to_idxBl(images)
        out["vqvae/images"] = images
        for si, idx_Bl in enumerate(idx):
            out[f"vqvae/idx_{si}"] = idx_Bl
        out["vqvae/recon"] = vae.idxBl_to_img(idx, same_shape=True, last_one=True)
        out["vqvae/forward_loss"] = vae(images)[2]  # VQVAE.forward: the VQ loss of the training pass

    # ---- the transformers: state dicts and teacher-forced logits
    models = {}
    for k, (name, config) in enumerate(VAR_CONFIGS.items()):
        var = VAR(vae_local=vae, drop_rate=0.0, attn_drop_rate=0.0, flash_if_available=False,
                  fused_if_available=False, **config)
        var.init_weights(init_adaln=0.5, init_adaln_gamma=1e-5, init_head=0.02, init_std=-1)  # as build_vae_var
        fill_(var, WEIGHT_SEED + 1 + k, skip=lambda key: key in ("attn_bias_for_masking", "lvl_1L"))
        if config["attn_l2_norm"]:  # one head's temperature beyond the clamp at 100
            with torch.no_grad():
                var.blocks[0].attn.scale_mul_1H11[0, 1] = math.log(150.0)
        models[name] = var.eval()
        out.update({f"{name}/state_dict/{key}": value for key, value in var.state_dict().items()})

        generator = torch.Generator().manual_seed(WEIGHT_SEED + 5 + k)
        idx = [torch.randint(0, VQVAE_CONFIG["vocab_size"], (4, pn * pn), generator=generator)
               for pn in config["patch_nums"]]
        labels = torch.tensor(FORWARD_LABELS)
        with torch.no_grad():
            x_BLCv = vae.quantize.idxBl_to_var_input(idx)
            torch.manual_seed(7)
            out[f"{name}/logits_eval"] = var(labels, x_BLCv)
            out[f"{name}/next_rand_eval"] = torch.rand(4)  # where the global stream stands afterwards
            if name == "var":
                var.train()
                torch.manual_seed(11)
                out[f"{name}/logits_train"] = var(labels, x_BLCv)
                out[f"{name}/next_rand_train"] = torch.rand(4)
                var.eval()
        for si, idx_Bl in enumerate(idx):
            out[f"{name}/idx_{si}"] = idx_Bl
        out[f"{name}/x_BLCv"] = x_BLCv
        out[f"{name}/labels"] = labels

    # ---- whole sampling runs, with the token map of every scale
    recorded: list[torch.Tensor] = []
    sample = official_var.sample_with_top_k_top_p_

    def recording(*a, **kw):
        result = sample(*a, **kw)
        recorded.append(result[:, :, 0].clone())
        return result

    official_var.sample_with_top_k_top_p_ = recording
    for name, (model, B, labels, g_seed, cfg, top_k, top_p, more_smooth) in RUNS.items():
        recorded.clear()
        label_B = torch.tensor(labels) if isinstance(labels, list) else labels
        torch.manual_seed(GLOBAL_SEED)
        with torch.no_grad():
            images = models[model].autoregressive_infer_cfg(B=B, label_B=label_B, g_seed=g_seed, cfg=cfg, top_k=top_k,
                                                            top_p=top_p, more_smooth=more_smooth)
        out[f"run_{name}/next_rand"] = torch.rand(4)  # untouched by a seeded run; not by g_seed=None
        out[f"run_{name}/images"] = images
        for si, idx_Bl in enumerate(recorded):
            out[f"run_{name}/idx_{si}"] = idx_Bl
    official_var.sample_with_top_k_top_p_ = sample
    tdist.destroy_process_group()

    metadata = {"commit": OFFICIAL_COMMITS["VAR"], "vqvae_config": json.dumps(VQVAE_CONFIG),
                "vqvae_state_dict_shapes": json.dumps(vqvae_shapes), "var_configs": json.dumps(VAR_CONFIGS),
                "quant_cases": json.dumps(QUANT_CASES), "custom_patches": json.dumps(CUSTOM_PATCHES),
                "weight_seed": str(WEIGHT_SEED), "runs": json.dumps(RUNS), "global_seed": str(GLOBAL_SEED),
                "threads": "1"}
    OUTPUT_DIR.mkdir(exist_ok=True)
    path = OUTPUT_DIR / "var.safetensors"
    save_file({k: v.contiguous() for k, v in out.items()}, str(path), metadata=metadata)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB, {len(out)} tensors)")


if __name__ == "__main__":
    main()
