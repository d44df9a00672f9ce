"""Reference outputs of the official VAR code (FoundationVision/VAR) for tests/test_official_var.py.

    .venv/bin/python tests/reference/make_official_var.py --official OFFICIAL/VAR --deps DEPS

``OFFICIAL/VAR`` is a checkout of https://github.com/FoundationVision/VAR at the commit in
``official_env.OFFICIAL_COMMITS["VAR"]``; ``DEPS`` holds ``huggingface_hub`` (see
``official_env.py``). The script builds a small VQ-VAE (ch 32, 64 codes of 8 channels,
scales 1, 2, 3, 4, so 64x64 images) and a 2-block VAR of width 64 on 10 classes, fills both
with the deterministic weights of ``synthetic_weights.py`` (so the file stores no weights),
and saves, in float32 on the CPU:

* ``vqvae/``: an image batch, its index pyramid (``img_to_idxBl``) and its reconstruction;
* ``forward/``: the teacher-forced logits in eval mode after ``torch.manual_seed(7)`` (the
  official forward draws ``torch.rand(B)`` for label dropout even in eval mode);
* ``run_<name>/``: whole ``autoregressive_infer_cfg`` runs (labels given or ``None``,
  guidance, top-k/top-p, ``more_smooth``), the images and the index map sampled at every
  scale (recorded by wrapping the official ``sample_with_top_k_top_p_``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_env import OFFICIAL_COMMITS, OUTPUT_DIR, use_official  # noqa: E402
from synthetic_weights import fill_  # noqa: E402

VQVAE_CONFIG = dict(vocab_size=64, z_channels=8, ch=32, share_quant_resi=4, v_patch_nums=(1, 2, 3, 4))
VAR_CONFIG = dict(num_classes=10, depth=2, embed_dim=64, num_heads=4, mlp_ratio=4.0, drop_path_rate=0.0,
                  norm_eps=1e-6, shared_aln=False, cond_drop_rate=0.1, attn_l2_norm=True, patch_nums=(1, 2, 3, 4))
WEIGHT_SEED = 20241203
RUNS = {  # name: (label_B, g_seed, cfg, top_k, top_p, more_smooth)
    "labels": ([3, 7, 0], 0, 1.5, 0, 0.0, False),
    "random_labels": (None, 1, 4.0, 16, 0.9, False),
    "smooth": ([1, 2, 5], 2, 3.0, 0, 0.0, True),
    "no_cache_labels": ([9, 4, 4], 3, 2.0, 8, 0.0, False),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--official", required=True, type=Path)
    parser.add_argument("--deps", type=Path)
    args = parser.parse_args()
    use_official(args.official, args.deps)
    import models.var as official_var  # noqa: E402
    from models import VAR, VQVAE  # noqa: E402

    torch.manual_seed(0)
    vae = VQVAE(test_mode=True, **VQVAE_CONFIG).eval()
    var = VAR(vae_local=vae, drop_rate=0.0, attn_drop_rate=0.0, flash_if_available=False, fused_if_available=False,
              **VAR_CONFIG).eval()
    fill_(vae, WEIGHT_SEED)
    fill_(var, WEIGHT_SEED + 1, skip=lambda name: name in ("attn_bias_for_masking", "lvl_1L"))
    out: dict[str, torch.Tensor] = {}

    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        idx = vae.img_to_idxBl(images)
        out["vqvae/images"] = images
        for k, idx_Bl in enumerate(idx):
            out[f"vqvae/idx_{k}"] = idx_Bl
        out["vqvae/recon"] = vae.idxBl_to_img(idx, same_shape=True, last_one=True)
        x_BLCv = vae.quantize.idxBl_to_var_input(idx)
        out["forward/x_BLCv"] = x_BLCv
        out["forward/labels"] = torch.tensor([3, 10, 6])  # 10: the null class
        torch.manual_seed(7)
        out["forward/logits"] = var(out["forward/labels"], x_BLCv)
        out["forward/next_rand"] = torch.rand(4)  # where the global stream stands afterwards

    recorded: list[torch.Tensor] = []
    sample = official_var.sample_with_top_k_top_p_

    def recording(*a, **kw):
        result = sample(*a, **kw)
        recorded.append(result[:, :, 0].clone())
        return result

    official_var.sample_with_top_k_top_p_ = recording
    for name, (labels, g_seed, cfg, top_k, top_p, more_smooth) in RUNS.items():
        recorded.clear()
        label_B = None if labels is None else torch.tensor(labels)
        with torch.no_grad():
            imgs = var.autoregressive_infer_cfg(B=3, label_B=label_B, g_seed=g_seed, cfg=cfg, top_k=top_k,
                                                top_p=top_p, more_smooth=more_smooth)
        out[f"run_{name}/images"] = imgs
        for k, idx_Bl in enumerate(recorded):
            out[f"run_{name}/idx_{k}"] = idx_Bl
    official_var.sample_with_top_k_top_p_ = sample

    metadata = {"commit": OFFICIAL_COMMITS["VAR"], "vqvae_config": json.dumps(VQVAE_CONFIG),
                "var_config": json.dumps(VAR_CONFIG), "weight_seed": str(WEIGHT_SEED), "runs": json.dumps(RUNS)}
    OUTPUT_DIR.mkdir(exist_ok=True)
    path = OUTPUT_DIR / "var.safetensors"
    save_file({k: v.contiguous() for k, v in out.items()}, str(path), metadata=metadata)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB, {len(out)} tensors)")


if __name__ == "__main__":
    main()
