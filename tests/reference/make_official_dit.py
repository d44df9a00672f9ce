"""Run the official DiT code on a tiny random-weight model and save what it computes.

    .venv/bin/python tests/reference/make_official_dit.py --official OFFICIAL/DiT --deps DEPS

``OFFICIAL/DiT`` is a checkout of https://github.com/facebookresearch/DiT at the commit in
``official_env.OFFICIAL_COMMITS["DiT"]``::

    git clone https://github.com/facebookresearch/DiT && git -C DiT checkout ed81ce2229091fd4ecc9a223645f95cf379d582b

and ``DEPS`` holds timm installed without its dependencies (see ``official_env.py``). DiT's
``diffusion/`` package is guided-diffusion's (MAR carries a copy of it). The result,
``tests/reference/official/dit.safetensors``, is read by ``tests/test_official_dit.py``; the
tests never run this script.

Everything runs in float32 on the CPU, where ``torch.manual_seed(s)`` seeds the one generator
that ``torch.randn``, ``randn_like`` and ``rand`` all draw from. Each case records its seed in
the metadata (``seeds``). Saved tensors (``<case>/<name>``):

* ``state_dict/*``: the weights of ``DiT(**CONFIG)`` (every zero-initialised layer perturbed);
* ``forward/*``: ``model(x, t, y)`` in eval mode (t from 0 to 999, y with the null class), and in
  train mode after a seed (label dropout); ``labels/*``: ``y_embedder.token_drop`` at random and
  with ``force_drop_ids``; ``t_embedder/*``: the timestep embedder on fractional t;
* ``cfg/*``: ``model.forward_with_cfg(x, t, y, 4.0)`` (the official 3-channel guidance);
* ``tables/<name>/*``: every float64 table of ``create_diffusion(respacing, schedule)`` and its
  ``timestep_map``, for ``TABLES``; ``space/<i>``: ``sorted(space_timesteps(T, spec))`` for
  ``SPACINGS[i]``;
* ``q_sample/*``: ``q_sample(x, t, noise)`` at t = 0, 1, 500, 999;
* ``losses_<name>/*``: ``training_losses(model, x, t, dict(y=y), noise)`` ("loss", "mse", "vb"),
  t = 0 included, on the 1000-step process and on a respaced one;
* ``pmv/*``: ``p_mean_variance`` (clip_denoised False and True) on ``create_diffusion("10")``;
* ``p_sample/*``, ``ddim_sample/*``, ``ddim_reverse/*``: one step each after a seed;
* ``run_<name>/*``: whole sampling runs, ``RUNS``: guided ones exactly as ``sample.py`` does
  them (seed, z = randn, z = cat([z, z]), y = cat([y, null]), ``forward_with_cfg``,
  ``clip_denoised=False``) with DDPM and DDIM, and unguided ones that draw their start noise
  themselves.
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

CONFIG = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4,
              mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=True)
NULL = CONFIG["num_classes"]

# name -> (timestep_respacing, noise_schedule) for create_diffusion; "squaredcos_cap_v2" is the
# cosine schedule (MAR's copy names it "cosine").
TABLES = {"linear": ("", "linear"), "cosine": ("", "squaredcos_cap_v2"), "linear_ddim10": ("ddim10", "linear"),
          "linear_25": ("25", "linear"), "linear_sections": ("10,15,20", "linear"),
          "cosine_10": ("10", "squaredcos_cap_v2")}
TABLE_NAMES = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "alphas_cumprod_next", "sqrt_alphas_cumprod",
               "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
               "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
               "posterior_mean_coef1", "posterior_mean_coef2"]
# (num_timesteps, section_counts) for space_timesteps
SPACINGS = [(1000, "ddim10"), (1000, "ddim25"), (1000, "ddim50"), (1000, "ddim3"), (1000, "10"), (1000, "25"),
            (1000, "50"), (1000, "100"), (1000, "250"), (1000, "999"), (1000, "10,15,20"), (300, "10,15,20"),
            (1000, "1,2,3,4"), (100, "7,0,5"), (10, "2,3"), (11, "1,1")]

# whole runs: name -> (seed, sampler, respacing, schedule, guided, eta, clip_denoised). The guided
# ones are sample.py's (clip_denoised=False); random weights then give samples of a size in the
# hundreds, which is harmless except where DDIM's noise is on (eta > 0): there x0_hat is clipped.
RUNS = {"ddpm_cfg": (0, "ddpm", "10", "linear", True, 0.0, False),
        "ddim_cfg": (1, "ddim", "ddim10", "linear", True, 0.0, False),
        "ddpm_uncond": (2, "ddpm", "25", "linear", False, 0.0, False),
        "ddim_eta1_uncond": (3, "ddim", "ddim10", "linear", False, 1.0, True),
        "ddpm_cosine_cfg": (4, "ddpm", "10", "squaredcos_cap_v2", True, 0.0, False)}
RUN_LABELS = [3, 7, 0]


def build(official_models):
    torch.manual_seed(0)
    model = official_models.DiT(**CONFIG)
    with torch.no_grad():  # leave the adaLN-Zero start, so that no output is trivially zero
        for name, parameter in model.named_parameters():
            if name == "pos_embed":
                continue
            parameter.add_(0.05 * torch.randn_like(parameter))
            if "adaLN_modulation" in name or "final_layer" in name:
                parameter.add_(0.2 * torch.randn_like(parameter))
    return model.float().eval()


def tables(diffusion) -> dict[str, torch.Tensor]:
    out = {name: torch.from_numpy(getattr(diffusion, name)).to(torch.float64) for name in TABLE_NAMES}
    out["timestep_map"] = torch.tensor(diffusion.timestep_map, dtype=torch.int64)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", required=True, type=Path, help="checkout of facebookresearch/DiT")
    parser.add_argument("--deps", required=True, type=Path, help="folder with timm (installed --no-deps)")
    parser.add_argument("--output", type=Path, default=OUTPUT_DIR / "dit.safetensors")
    args = parser.parse_args()
    use_official(args.official, args.deps)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    import models as official_models  # noqa: E402  (the official checkout)
    from diffusion import create_diffusion  # noqa: E402
    from diffusion.respace import space_timesteps  # noqa: E402

    model = build(official_models)
    saved: dict[str, torch.Tensor] = {f"state_dict/{k}": v.detach().clone() for k, v in model.state_dict().items()}
    seeds: dict[str, int] = {}
    C, H = CONFIG["in_channels"], CONFIG["input_size"]

    def randn(*shape, seed):
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    # --- the network ----------------------------------------------------------------------
    x, t, y = randn(6, C, H, H, seed=100), torch.tensor([0, 1, 250, 500, 998, 999]), torch.tensor([0, 3, 9, NULL, 5, NULL])
    saved.update({"forward/x": x, "forward/t": t, "forward/y": y, "forward/out": model(x, t, y)})
    seeds["forward_train"] = 101
    x_train, t_train, y_train = randn(16, C, H, H, seed=102), torch.arange(0, 1000, 63), torch.arange(16) % 10
    model.train()
    torch.manual_seed(101)
    saved["forward/train_out"] = model(x_train, t_train, y_train)
    model.eval()
    saved.update({"forward/train_x": x_train, "forward/train_t": t_train, "forward/train_y": y_train})

    seeds["labels"] = 103
    labels = torch.arange(40) % 10
    torch.manual_seed(103)
    saved["labels/random_drop"] = model.y_embedder.token_drop(labels)
    force = torch.tensor([1, 0] * 20)
    saved.update({"labels/labels": labels, "labels/force_drop_ids": force,
                  "labels/forced": model.y_embedder(labels, False, force_drop_ids=force)})
    t_float = torch.tensor([0.0, 0.5, 17.25, 999.0])
    saved.update({"t_embedder/t": t_float, "t_embedder/out": model.t_embedder(t_float)})

    x_half = randn(3, C, H, H, seed=104)
    x_cfg, t_cfg = torch.cat([x_half, x_half]), torch.tensor([10, 500, 999, 10, 500, 999])
    y_cfg = torch.tensor([1, 4, 8, NULL, NULL, NULL])
    saved.update({"cfg/x": x_cfg, "cfg/t": t_cfg, "cfg/y": y_cfg, "cfg/out": model.forward_with_cfg(x_cfg, t_cfg, y_cfg, 4.0)})

    # --- schedules and respacing ------------------------------------------------------------
    for name, (respacing, schedule) in TABLES.items():
        for key, value in tables(create_diffusion(respacing, noise_schedule=schedule)).items():
            saved[f"tables/{name}/{key}"] = value
    for i, (T, spec) in enumerate(SPACINGS):
        saved[f"space/{i}"] = torch.tensor(sorted(space_timesteps(T, spec)), dtype=torch.int64)

    full = create_diffusion("")
    x0, noise, t4 = randn(4, C, H, H, seed=105), randn(4, C, H, H, seed=106), torch.tensor([0, 1, 500, 999])
    saved.update({"q_sample/x": x0, "q_sample/noise": noise, "q_sample/t": t4,
                  "q_sample/out": full.q_sample(x0, t4, noise=noise)})

    # --- training losses (mse + vb, the t = 0 decoder term included) ------------------------
    x_start = (randn(5, C, H, H, seed=107) * 0.6).clamp(-1, 1)
    for name, respacing, t_loss in [("full", "", torch.tensor([0, 1, 10, 500, 999])),
                                    ("spaced25", "25", torch.tensor([0, 1, 12, 23, 24]))]:
        noise = randn(5, C, H, H, seed=108)
        y_loss = torch.tensor([0, 1, 2, 3, NULL])
        terms = create_diffusion(respacing).training_losses(model, x_start, t_loss, dict(y=y_loss), noise=noise)
        saved.update({f"losses_{name}/x": x_start, f"losses_{name}/t": t_loss, f"losses_{name}/y": y_loss,
                      f"losses_{name}/noise": noise, **{f"losses_{name}/{k}": v for k, v in terms.items()}})

    # --- single reverse steps on create_diffusion("10") ----------------------------------
    ten = create_diffusion("10")
    x_step, t_step, y_step = randn(4, C, H, H, seed=109) * 1.5, torch.tensor([0, 3, 9, 5]), torch.tensor([2, 4, 6, NULL])
    saved.update({"step/x": x_step, "step/t": t_step, "step/y": y_step})
    for clip in (False, True):
        out = ten.p_mean_variance(model, x_step, t_step, clip_denoised=clip, model_kwargs=dict(y=y_step))
        for key in ("mean", "variance", "log_variance", "pred_xstart"):
            saved[f"pmv/{'clip' if clip else 'noclip'}_{key}"] = out[key]
    seeds["p_sample"], seeds["ddim_sample"] = 110, 111
    torch.manual_seed(110)
    out = ten.p_sample(model, x_step, t_step, clip_denoised=False, model_kwargs=dict(y=y_step))
    saved.update({"p_sample/sample": out["sample"], "p_sample/pred_xstart": out["pred_xstart"]})
    for eta in (0.0, 0.5):
        torch.manual_seed(111)
        out = ten.ddim_sample(model, x_step, t_step, clip_denoised=True, model_kwargs=dict(y=y_step), eta=eta)
        saved.update({f"ddim_sample/eta{eta}_sample": out["sample"], f"ddim_sample/eta{eta}_pred_xstart": out["pred_xstart"]})
    t_reverse = torch.tensor([0, 3, 8, 5])
    out = ten.ddim_reverse_sample(model, x_step, t_reverse, clip_denoised=False, model_kwargs=dict(y=y_step))
    saved.update({"ddim_reverse/t": t_reverse, "ddim_reverse/sample": out["sample"],
                  "ddim_reverse/pred_xstart": out["pred_xstart"]})

    # --- whole seeded runs --------------------------------------------------------------
    for name, (seed, sampler, respacing, schedule, guided, eta, clip) in RUNS.items():
        diffusion = create_diffusion(respacing, noise_schedule=schedule)
        loop = diffusion.p_sample_loop if sampler == "ddpm" else diffusion.ddim_sample_loop
        extra = dict(eta=eta) if sampler == "ddim" else {}
        seeds[f"run_{name}"] = seed
        torch.manual_seed(seed)
        n = len(RUN_LABELS)
        if guided:  # sample.py, line by line
            z = torch.randn(n, C, H, H)
            y_run = torch.tensor(RUN_LABELS)
            z = torch.cat([z, z], 0)
            y_run = torch.cat([y_run, torch.tensor([NULL] * n)], 0)
            samples = loop(model.forward_with_cfg, z.shape, z, clip_denoised=clip,
                           model_kwargs=dict(y=y_run, cfg_scale=4.0), device="cpu", **extra)
        else:  # the loop draws its start noise itself
            y_run = torch.tensor(RUN_LABELS)
            samples = loop(model, (n, C, H, H), clip_denoised=clip, model_kwargs=dict(y=y_run), device="cpu", **extra)
        saved.update({f"run_{name}/y": y_run, f"run_{name}/samples": samples})

    metadata = {"commit": OFFICIAL_COMMITS["DiT"], "config": json.dumps(CONFIG), "seeds": json.dumps(seeds),
                "tables": json.dumps(TABLES), "table_names": json.dumps(TABLE_NAMES),
                "spacings": json.dumps(SPACINGS), "runs": json.dumps(RUNS), "run_labels": json.dumps(RUN_LABELS)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in saved.items()}, str(args.output), metadata=metadata)
    size = args.output.stat().st_size
    print(f"wrote {args.output} ({len(saved)} tensors, {size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
