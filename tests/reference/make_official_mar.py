"""Run the official MAR code on a tiny random-weight model and save what it computes.

    .venv/bin/python tests/reference/make_official_mar.py --official OFFICIAL/mar --deps DEPS

``OFFICIAL/mar`` is a checkout of https://github.com/LTH14/mar at the commit in
``official_env.OFFICIAL_COMMITS["mar"]``::

    git clone https://github.com/LTH14/mar && git -C mar checkout fe470ac24afbee924668d8c5c83e9fec60af3a73

and ``DEPS`` holds timm installed without its dependencies (see ``official_env.py``);
the official code also imports scipy and numpy, which this project's ``.venv`` has.
The result, ``tests/reference/official/mar.safetensors``, is read by
``tests/test_official_mar.py``; the tests never run this script.

Everything runs in float32 on the CPU. The official code moves tensors to the GPU with
``.cuda()`` everywhere; here ``torch.Tensor.cuda`` is replaced by "stay where you are",
which changes no value and no random draw (on the CPU, torch's ``torch.rand``, ``randn``,
``randint`` and dropout all share one generator).

Random numbers are drawn exactly as a reader of the official code would draw them:
``np.random.seed(s)`` and ``torch.manual_seed(s)`` (what ``main_mar.py`` does), then the
official function, which shuffles the generation orders with numpy's global generator,
draws the training mask ratio with scipy's ``truncnorm.rvs`` (numpy's global generator
again), and everything else with torch's. Each case records its seed in the metadata.

Saved tensors (``<case>/<name>``):

* ``state_dict/*``: the weights (every zero-initialised layer perturbed, so no output is trivial);
* ``orders/*``: ``sample_orders(3)`` after ``np.random.seed(0)``;
* ``masking/*``: ``sample_orders`` then ``random_masking`` after ``np.random.seed(1)``, and the
  mask ratio scipy drew;
* ``mae/*``: ``forward_mae_encoder`` / ``forward_mae_decoder`` in eval mode for a given mask,
  once for a batch and once for a guidance batch (``cat([tokens, tokens])``, class then fake class);
* ``train/*``: the training loss ``model(imgs, labels)`` in train mode (label drop, dropout, the
  loss's t and noise all random) and two gradients;
* ``head/*``: ``SimpleMLPAdaLN.forward`` and ``forward_with_cfg``;
* ``losses/*``: ``train_diffusion.training_losses`` with given t and noise (loss, mse, vb per token);
* ``head_sample/*``: ``DiffLoss.sample`` twice in a row after one seed, with a temperature, without
  and with guidance;
* ``sample_<name>/*``: whole ``sample_tokens`` runs (num_iter 4) and the orders they used.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from official_env import OFFICIAL_COMMITS, OUTPUT_DIR, use_official  # noqa: E402

CONFIG = dict(img_size=64, vae_stride=8, patch_size=2,  # a 4 x 4 grid of 2x2 patches: L = 16 tokens
              encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=4,
              decoder_embed_dim=48, decoder_depth=2, decoder_num_heads=4,
              mlp_ratio=4.0, vae_embed_dim=4,  # tokens of 4 * 2 * 2 = 16 numbers
              mask_ratio_min=0.7, label_drop_prob=0.5, class_num=10,
              attn_dropout=0.1, proj_dropout=0.1, buffer_size=4,
              diffloss_d=2, diffloss_w=32, num_sampling_steps="10", diffusion_batch_mul=2)

# whole sampling runs: name -> (seed, keyword arguments of sample_tokens)
SAMPLE_RUNS = {
    "cond": (10, dict(num_iter=4, cfg=1.0, labels=[3, 7], temperature=1.0)),
    "uncond": (11, dict(num_iter=4, cfg=1.0, labels=None, temperature=0.9)),
    "cfg_linear": (12, dict(num_iter=4, cfg=3.0, cfg_schedule="linear", labels=[3, 7], temperature=0.9)),
    "cfg_constant": (13, dict(num_iter=4, cfg=2.0, cfg_schedule="constant", labels=[1, 9], temperature=1.0)),
}


def seed_all(seed: int) -> None:
    """What ``main_mar.py`` does before training or evaluation."""
    np.random.seed(seed)
    torch.manual_seed(seed)


def build(official_mar):
    """The official MAR with the blocks' LayerNorm of ``mar_base`` (eps 1e-6), random weights."""
    torch.manual_seed(0)
    model = official_mar.MAR(norm_layer=partial(nn.LayerNorm, eps=1e-6), **CONFIG)
    with torch.no_grad():  # no zero layer (adaLN-Zero, biases) and no unit LayerNorm left
        for name, parameter in model.named_parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
            if name.startswith("diffloss.") and parameter.ndim == 2:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, type=Path, help="checkout of LTH14/mar")
    parser.add_argument("--deps", required=True, type=Path, help="folder with timm (installed --no-deps)")
    parser.add_argument("--output", type=Path, default=OUTPUT_DIR / "mar.safetensors")
    args = parser.parse_args()
    use_official(args.official, args.deps)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # the official code's .cuda(): stay on the CPU
    torch.set_num_threads(1)
    from models import mar as official_mar  # noqa: E402  (the official checkout)

    model = build(official_mar)
    saved: dict[str, torch.Tensor] = {f"state_dict/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    seeds: dict[str, int] = {}
    L, C = model.seq_len, model.token_embed_dim

    # --- generation orders and the training mask -------------------------------------------
    seeds["orders"] = 0
    seed_all(0)
    saved["orders/orders"] = model.sample_orders(bsz=3)

    seeds["masking"] = 1
    seed_all(1)
    orders = model.sample_orders(bsz=3)
    mask = model.random_masking(torch.zeros(3, L, C), orders)
    seed_all(1)
    model.sample_orders(bsz=3)
    saved["masking/orders"] = orders
    saved["masking/mask"] = mask.bool()
    saved["masking/mask_ratio"] = torch.tensor([model.mask_ratio_generator.rvs(1)[0]], dtype=torch.float64)

    # --- the MAE encoder and decoder, eval mode, given inputs ---------------------------------
    model.eval()
    torch.manual_seed(2)
    tokens = torch.randn(3, L, C)
    labels = torch.tensor([0, 4, 9])
    with torch.no_grad():
        class_embedding = model.class_emb(labels)
        encoded = model.forward_mae_encoder(tokens, mask, class_embedding)
        z = model.forward_mae_decoder(encoded, mask)
        # a guidance batch as sample_tokens builds it: the tokens twice, class then fake class
        both = torch.cat([class_embedding, model.fake_latent.repeat(3, 1)])
        encoded_cfg = model.forward_mae_encoder(torch.cat([tokens, tokens]), torch.cat([mask, mask]), both)
        z_cfg = model.forward_mae_decoder(encoded_cfg, torch.cat([mask, mask]))
    saved.update({"mae/tokens": tokens, "mae/labels": labels, "mae/mask": mask.bool(), "mae/encoded": encoded,
                  "mae/z": z, "mae/encoded_cfg": encoded_cfg, "mae/z_cfg": z_cfg})

    # --- the training loss, train mode, every random draw the official one -------------------
    seeds["train"] = 3
    torch.manual_seed(30)
    imgs = torch.randn(4, CONFIG["vae_embed_dim"], model.seq_h * model.patch_size, model.seq_w * model.patch_size)
    train_labels = torch.tensor([1, 2, 5, 8])
    model.train()
    model.zero_grad()
    seed_all(3)
    loss = model(imgs, train_labels)
    loss.backward()
    seed_all(3)
    train_orders = model.sample_orders(bsz=4)
    train_mask = model.random_masking(imgs.new_zeros(4, L, C), train_orders)
    saved.update({"train/imgs": imgs, "train/labels": train_labels, "train/loss": loss.detach().reshape(1),
                  "train/orders": train_orders, "train/mask": train_mask.bool(),
                  "train/grad_z_proj_weight": model.z_proj.weight.grad.clone(),
                  "train/grad_head_input_proj_weight": model.diffloss.net.input_proj.weight.grad.clone(),
                  "train/grad_fake_latent": model.fake_latent.grad.clone()})
    model.zero_grad()
    model.eval()

    # --- the diffusion head --------------------------------------------------------------------
    net = model.diffloss.net
    torch.manual_seed(4)
    x = torch.randn(6, C)
    t = torch.tensor([0, 1, 111, 500, 998, 999])
    c = torch.randn(6, CONFIG["decoder_embed_dim"])
    with torch.no_grad():
        out = net(x, t, c)
        out_cfg = net.forward_with_cfg(x, t, c, 3.0)
    saved.update({"head/x": x, "head/t": t, "head/c": c, "head/out": out, "head/out_cfg": out_cfg,
                  "head/cfg_scale": torch.tensor([3.0])})

    torch.manual_seed(5)
    target = torch.randn(6, C)
    noise = torch.randn(6, C)
    with torch.no_grad():
        terms = model.diffloss.train_diffusion.training_losses(net, target, t, dict(c=c), noise=noise)
    saved.update({"losses/target": target, "losses/noise": noise, "losses/t": t, "losses/c": c,
                  **{f"losses/{k}": v for k, v in terms.items()}})

    # --- DiffLoss.sample: two calls after one seed (the second sees where the first left the stream)
    seeds["head_sample"] = 6
    torch.manual_seed(60)
    z_sample = torch.randn(6, CONFIG["decoder_embed_dim"])
    seed_all(6)
    with torch.no_grad():
        first = model.diffloss.sample(z_sample, temperature=0.9, cfg=1.0)
        second = model.diffloss.sample(z_sample, temperature=0.9, cfg=1.0)
        guided = model.diffloss.sample(z_sample, temperature=0.8, cfg=2.5)
    saved.update({"head_sample/z": z_sample, "head_sample/first": first, "head_sample/second": second,
                  "head_sample/guided": guided})

    # --- whole sampling runs --------------------------------------------------------------------
    runs = {}
    for name, (seed, kwargs) in SAMPLE_RUNS.items():
        labels = None if kwargs["labels"] is None else torch.tensor(kwargs["labels"])
        seed_all(seed)
        with torch.no_grad():
            latents = model.sample_tokens(bsz=2, **{**kwargs, "labels": labels})
        seed_all(seed)
        saved[f"sample_{name}/orders"] = model.sample_orders(bsz=2)
        saved[f"sample_{name}/latents"] = latents
        runs[name] = dict(seed=seed, bsz=2, **kwargs)
        print(f"sample_{name}: |latents| max {latents.abs().max():.4g}")

    saved = {k: v.detach().clone().contiguous() for k, v in saved.items()}
    metadata = {"commit": OFFICIAL_COMMITS["mar"], "config": json.dumps(CONFIG), "seeds": json.dumps(seeds),
                "sample_runs": json.dumps(runs), "torch": torch.__version__, "numpy": np.__version__}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_file(saved, str(args.output), metadata=metadata)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e3:.0f} kB, {len(saved)} tensors), "
          f"loss {loss.item():.6f}")


if __name__ == "__main__":
    main()
