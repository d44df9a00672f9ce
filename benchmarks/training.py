"""Training throughput of each chapter's model, in images per second, at its cpu and gpu settings.

    python benchmarks/training.py                       # every chapter, both settings, CPU (+ CUDA if present)
    python benchmarks/training.py --quick               # cpu settings only, fewer steps
    python benchmarks/training.py --chapters 05,10 --settings gpu --devices cuda

Every model is built exactly as its notebook builds it: the sizes come from the
notebook's own ``choose(ci=..., cpu=..., gpu=...)`` call, read from the
notebook file (``notebook_config``), and the few constants that live elsewhere
in the notebook are written below next to the name of the cell they come from.
The batches are random tensors of the notebook's shapes (the time does not
depend on the values), and the step is the book's own: ``minilib.training.train``
with the notebook's loss, learning rate, betas, gradient clipping and EMA, that
is forward + loss + backward + clipping + AdamW step + EMA update, in bfloat16
autocast on CUDA (as ``train`` does) and float32 on the CPU.

What is timed: ``--steps`` optimiser steps after ``--warmup`` untimed ones
(``History.seconds`` of a second ``train`` call, which starts after its setup;
``train`` reads each step's loss with ``.item()``, which waits for the GPU). The table gives seconds per step (wall clock, and the CPU time of
the process, which other jobs on a shared machine do not inflate), images per
second (for chapter 8 an image is one target of a set; for chapter 12 one 2-D
token) and what the notebook's training run would take at that speed (its
``steps`` times the time per step; the notebook also samples and scores, which
is not included).
Set ``OMP_NUM_THREADS`` to control the CPU threads.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minilib import zoo  # noqa: E402
from minilib.autoencoder import vae_loss  # noqa: E402
from minilib.datasets import COLOURS, SHAPES, caption, tokenize  # noqa: E402
from minilib.diffloss import DiffLoss  # noqa: E402
from minilib.diffusion import GaussianDiffusion, beta_schedule  # noqa: E402
from minilib.dit import DiT  # noqa: E402
from minilib.flow import flow_matching_loss, logit_normal  # noqa: E402
from minilib.mmdit import MMDiT  # noqa: E402
from minilib.text_encoder import TextEncoder, TextToImage  # noqa: E402
from minilib.training import train  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def notebook_config(chapter: str, budget: str) -> SimpleNamespace:
    """The settings of one budget, read from the ``cfg = choose(...)`` call in notebook ``chapter`` ("05")."""
    path = next(NOTEBOOKS.glob(f"{chapter}_*.ipynb"))
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        if "choose(" not in source:
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "choose":
                settings = {keyword.arg: keyword.value for keyword in node.keywords}
                return SimpleNamespace(budget=budget, **literal_settings(settings[budget]))
    raise ValueError(f"{path.name} has no cfg = choose(...) cell")


def literal_settings(node: ast.expr) -> dict:
    """``dict(steps=40, lr=1e-2)`` or ``{"steps": 40}`` (literal values only) as a dict."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict" and not node.args:
        return {keyword.arg: ast.literal_eval(keyword.value) for keyword in node.keywords}
    return ast.literal_eval(node)


@dataclass
class Job:
    """One chapter's training step: the model, its loss, one random batch and train()'s settings."""

    model: nn.Module
    loss_fn: Callable
    batch: tuple
    images_per_step: int
    notebook_steps: int
    train_kwargs: dict


def random_images(n: int, channels: int, size: int) -> torch.Tensor:
    return torch.rand(n, channels, size, size) * 2 - 1


def random_labels(n: int, classes: int = 10) -> torch.Tensor:
    return torch.randint(0, classes, (n,))


# Each job_chNN builds what chapter NN trains in its main training cell, from its config `cfg`.

def job_ch04(cfg) -> Job:
    """Chapter 4, cell "checkpoint_dir ... autoencoder_loss": small-kl-vae on 32x32 RGB shapes."""
    vae = zoo.build("small-kl-vae")

    def loss_fn(model, batch):
        images, _ = batch
        recon, posterior = model(images)
        return vae_loss(recon, images, posterior, 1e-6, reconstruction="mse").loss

    return Job(vae, loss_fn, (random_images(cfg.batch_size, 3, 32), random_labels(cfg.batch_size)),
               cfg.batch_size, cfg.steps,
               dict(lr=cfg.lr, warmup_steps=20, schedule="cosine", grad_clip=None, betas=(0.9, 0.99)))


def job_ch05(cfg) -> Job:
    """Chapter 5, cells "latent_shape ... def build_dit" (num_heads=4, learn_sigma=False) and "def train_dit":
    DDPM with DiT's linear schedule on the latents of chapter 4's autoencoder (4 channels, sides f = 4 times
    smaller than the images: 4x4x4 for the 16x16 digits of the cpu budget, 4x8x8 for CIFAR-10 in the gpu one).
    The autoencoder's one-off training and encoding are not part of this step."""
    side = cfg.image_size // 4
    model = DiT(input_size=side, patch_size=cfg.patch_size, in_channels=4, hidden_size=cfg.hidden_size,
                depth=cfg.depth, num_heads=4, num_classes=10, learn_sigma=False, class_dropout_prob=0.1)
    diffusion = GaussianDiffusion(beta_schedule("linear", 1000))

    def loss_fn(model, batch):
        latents, labels = batch
        return diffusion.training_loss(model, latents, dict(y=labels))

    return Job(model, loss_fn, (torch.randn(cfg.batch_size, 4, side, side), random_labels(cfg.batch_size)),
               cfg.batch_size, cfg.steps, dict(lr=cfg.lr, schedule="cosine", warmup_steps=min(50, cfg.steps // 4),
                                               ema_decay=cfg.ema_decay))


def job_ch06(cfg) -> Job:
    """Chapter 6, cell "def digits_loss": tiny-denoiser-adaln-zero trained by flow matching (lr 2e-3, EMA 0.995)."""
    def loss_fn(model, batch):
        images, labels = batch
        return flow_matching_loss(model, images, {"y": labels})

    return Job(zoo.build("tiny-denoiser-adaln-zero"), loss_fn,
               (random_images(cfg.batch_size, 1, 16), random_labels(cfg.batch_size)), cfg.batch_size, cfg.steps,
               dict(lr=2e-3, schedule="cosine", warmup_steps=50, ema_decay=0.995))


def job_ch07(cfg) -> Job:
    """Chapter 7, cells "def build_model" (the latent model: MAX_WORDS = 6, 2x2 patches) and "def
    text_to_image_loss": the MM-DiT on the 4x8x8 latents of chapter 4's autoencoder (32x32 shapes, f = 4, in
    every budget), told 1000 t. The autoencoder's one-off training and encoding are not part of this step."""
    max_words = 6
    text_encoder = TextEncoder(dim=cfg.text_dim, depth=2, num_heads=4, max_length=max_words)
    mmdit = MMDiT(in_channels=4, hidden_size=cfg.hidden, depth=cfg.depth, num_heads=4, pos_embed_max_size=4,
                  patch_size=2, adm_in_channels=cfg.text_dim, context_dim=cfg.text_dim, qk_norm="rms",
                  register_length=2)
    captions = [caption(SHAPES[i % len(SHAPES)], COLOURS[i % len(COLOURS)], "centre") for i in range(cfg.batch_size)]

    def loss_fn(model, batch, drop_rate=0.1):
        latents, tokens = batch
        dropped = torch.rand(len(tokens), device=tokens.device) < drop_rate
        tokens = tokens.masked_fill(dropped[:, None], 0)
        network = lambda x_t, t, tokens: model(x_t, 1000 * t, tokens)  # noqa: E731 (SD3: timestep = 1000 sigma)
        return flow_matching_loss(network, latents, dict(tokens=tokens), t_sampler=logit_normal)

    return Job(TextToImage(text_encoder, mmdit), loss_fn,
               (torch.randn(cfg.batch_size, 4, 8, 8), tokenize(captions, length=max_words)), cfg.batch_size,
               cfg.steps, dict(lr=2e-3, warmup_steps=50, schedule="cosine", ema_decay=0.995))


def job_ch08(cfg) -> Job:
    """Chapter 8, cells "IMAGE_SIZE, SET_SIZE = 16, 6" and "def train_few_shot": the FiLM few-shot DiT."""
    image_size, set_size = 16, 6
    model = zoo.build("vfsddpm-shapes-small", conditioning="film", hidden_size=cfg.hidden, depth=cfg.depth,
                      hdim=cfg.hdim, encoder_depth=cfg.encoder_depth, patch_size=cfg.patch,
                      encoder_patch_size=cfg.encoder_patch)
    diffusion = GaussianDiffusion(beta_schedule("cosine", 1000))
    sets = torch.rand(cfg.sets_per_batch, set_size, 3, image_size, image_size) * 2 - 1
    return Job(model, lambda m, batch: m.training_loss(diffusion, batch[0])["loss"], (sets,),
               cfg.sets_per_batch * set_size, cfg.steps,
               dict(lr=cfg.lr, warmup_steps=min(50, cfg.steps // 4), schedule="cosine", ema_decay=0.995))


def job_ch09(cfg) -> Job:
    """Chapter 9, cell "vae = zoo.build('small-var-vqvae')": the multi-scale VQ-VAE on 32x32 shapes."""
    vae = zoo.build("small-var-vqvae")
    vae.quantize.eini(-1)

    def loss_fn(model, batch):
        images, _ = batch
        recon, _, vq_loss = model(images, ret_usages=True)
        return F.mse_loss(recon, images) + vq_loss

    return Job(vae, loss_fn, (random_images(cfg.batch_size, 3, 32), random_labels(cfg.batch_size)),
               cfg.batch_size, cfg.vae_steps,
               dict(lr=cfg.lr, warmup_steps=20, schedule="cosine", grad_clip=1.0))


def job_ch10(cfg) -> Job:
    """Chapter 10, cells "var = zoo.build('small-var-digits', ...)" and "def train_var": VAR on token pyramids."""
    vae = zoo.build("small-var-digits-vqvae")
    vae.eval().requires_grad_(False)  # frozen, as in the notebook
    var = zoo.build("small-var-digits", vae_local=vae, depth=cfg.var_depth, embed_dim=cfg.var_width,
                    num_heads=cfg.var_heads)
    pyramid = tuple(torch.randint(0, vae.vocab_size, (cfg.batch_size, pn * pn)) for pn in vae.quantize.v_patch_nums)

    def loss_fn(model, batch):
        labels_B, *gt_idx_Bl = batch
        return model.training_loss(labels_B, gt_idx_Bl)

    return Job(var, loss_fn, (random_labels(cfg.batch_size), *pyramid), cfg.batch_size, cfg.var_steps,
               dict(lr=cfg.var_lr, weight_decay=0.05, betas=(0.9, 0.95), warmup_steps=min(50, cfg.var_steps // 4),
                    schedule="cosine"))


def job_ch11(cfg) -> Job:
    """Chapter 11, cells "model = zoo.build('mar-small-digits', ...)" and "def mar_loss": MAR on 8x8 digits."""
    model = zoo.build("mar-small-digits", encoder_embed_dim=cfg.width, decoder_embed_dim=cfg.width,
                      encoder_depth=cfg.depth, decoder_depth=cfg.depth, diffloss_w=cfg.head_width,
                      diffloss_d=cfg.head_depth, num_sampling_steps=cfg.diffusion_steps)
    return Job(model, lambda m, batch: m(*batch), (random_images(cfg.batch_size, 1, 8), random_labels(cfg.batch_size)),
               cfg.batch_size, cfg.steps,
               dict(lr=cfg.lr, schedule="cosine", warmup_steps=min(50, cfg.steps // 4), ema_decay=cfg.ema_decay))


class ToyMAR(nn.Module):
    """Chapter 12, cell "class ToyMAR": a class label -> z -> the diffusion head on a 2-D token."""

    def __init__(self, cfg):
        super().__init__()
        self.z_embed = nn.Embedding(4, cfg.z_dim)  # three classes and the null class
        self.diffloss = DiffLoss(target_channels=2, z_channels=cfg.z_dim, depth=cfg.depth, width=cfg.width,
                                 num_sampling_steps=cfg.sampling_steps)


def job_ch12(cfg) -> Job:
    """Chapter 12, cell "class ToyMAR": the diffusion head alone, trained on 2-D points."""
    def loss_fn(model, batch):
        x, y = batch
        return model.diffloss(x, model.z_embed(y))

    return Job(ToyMAR(cfg), loss_fn, (torch.randn(cfg.batch_size, 2), random_labels(cfg.batch_size, 4)),
               cfg.batch_size, cfg.steps,
               dict(lr=cfg.lr, schedule="cosine", warmup_steps=min(100, cfg.steps // 5), ema_decay=cfg.ema_decay))


JOBS = {  # chapter: (what, builder)
    "04": ("KL autoencoder (small-kl-vae)", job_ch04),
    "05": ("latent DiT, DDPM loss", job_ch05),
    "06": ("DiT, flow matching (tiny-denoiser)", job_ch06),
    "07": ("latent MM-DiT + text encoder", job_ch07),
    "08": ("VFSDDPM (FiLM)", job_ch08),
    "09": ("multi-scale VQ-VAE (small-var-vqvae)", job_ch09),
    "10": ("VAR (small-var-digits)", job_ch10),
    "11": ("MAR (mar-small-digits)", job_ch11),
    "12": ("diffusion head (ToyMAR)", job_ch12),
}


def repeat(batch: tuple):
    while True:
        yield batch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(job: Job, device: torch.device, warmup: int, steps: int) -> tuple[float, float]:
    """Wall-clock and CPU seconds (of this process) per optimiser step of ``job`` on ``device``,
    after ``warmup`` untimed steps."""
    batch = tuple(tensor.to(device) for tensor in job.batch)
    settings = dict(job.train_kwargs, device=device, progress=False, seed=0)
    train(job.model, job.loss_fn, repeat(batch), steps=warmup, **settings)
    synchronize(device)
    start_cpu = time.process_time()
    history = train(job.model, job.loss_fn, repeat(batch), steps=steps, **settings)
    return history.seconds / steps, (time.process_time() - start_cpu) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chapters", default=",".join(JOBS), help="comma-separated chapter numbers")
    parser.add_argument("--settings", default="cpu,gpu", help="the notebook budgets whose sizes to use")
    parser.add_argument("--devices", default="auto", help="cpu, cuda, or auto (cpu, plus cuda if available)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (gpu settings on the CPU: half)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="cpu settings only, 4 timed steps")
    args = parser.parse_args()
    settings = ["cpu"] if args.quick else args.settings.split(",")
    steps = 4 if args.quick else args.steps
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto" \
        else args.devices.split(",")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)"
          + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "") + "\n")
    print("| chapter | model | settings | device | params | images per step | s per step | CPU s per step | "
          "images/s | notebook's training run at this speed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for chapter in args.chapters.split(","):
        what, build_job = JOBS[chapter.zfill(2)]
        for budget in settings:
            for device_name in devices:
                device = torch.device(device_name)
                torch.manual_seed(0)
                job = build_job(notebook_config(chapter.zfill(2), budget))
                timed = max(2, steps // 2) if (budget == "gpu" and device.type == "cpu") else steps
                per_step, cpu_per_step = time_steps(job, device, args.warmup, timed)
                print(f"| {chapter} | {what} | {budget} | {device_name} | "
                      f"{zoo.count_parameters(job.model) / 1e6:.2f}M | {job.images_per_step} | {per_step:.3f} | "
                      f"{cpu_per_step:.3f} | "
                      f"{job.images_per_step / per_step:,.0f} | {job.notebook_steps} steps: "
                      f"{job.notebook_steps * per_step / 60:.1f} min |", flush=True)
                del job
    print("\nCPU s: time.process_time of the whole process per step (all its threads), which other jobs on a "
          "shared machine do not inflate; on CUDA it is the host's time launching the kernels.")


if __name__ == "__main__":
    main()
