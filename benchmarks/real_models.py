"""Sampling time of the full-size models, random weights: VAR-d16 (KV cache), MAR-B, DiT-XL/2.

    python benchmarks/real_models.py                       # CPU (+ GPU if present), batch 1 and 4
    python benchmarks/real_models.py --batches 1,16 --devices cuda --full

Each model samples exactly as its paper evaluates it (chapter 13), with random
weights, so the cost is real and the images are noise:

- VAR-d16: ``autoregressive_infer_cfg`` over the 10 scales with the KV cache, guidance 4,
  top-k 900, top-p 0.96, then the VQ-VAE decoder;
- MAR-B: ``sample_tokens`` with 64 autoregressive steps, guidance 2.9 (linear), the
  diffusion head's 100 steps for every token, then the KL-16 decoder;
- DiT-XL/2: 250 DDPM steps with the learned variance and guidance 4 (a doubled
  batch), then Stable Diffusion's VAE decoder.

On a CPU the full schedules take far too long (DiT-XL/2 takes seconds per step),
so without ``--full`` MAR and DiT run two short schedules, ``S/2`` and ``S``
steps (``S = --cpu-mar-steps``, ``--cpu-dit-steps``), and the full-schedule time
is extrapolated along the line through the two, ``time(K) = a + b K``: ``b`` is
the cost of one step, ``a`` what does not grow with the steps (the decoder, and
for MAR the diffusion head, which samples every token once however many steps
reveal them). Extrapolated figures are marked "~". VAR always runs all 10
scales. On a GPU every run is complete, in bfloat16 autocast.

Peak memory: GPU ``torch.cuda.max_memory_allocated`` over the call (minus what
was allocated before); CPU the polled resident set size (see var_kv_cache.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minilib import zoo  # noqa: E402
from minilib.diffusion import GaussianDiffusion, beta_schedule  # noqa: E402
from var_kv_cache import PeakRSS, return_freed_memory_to_the_os  # noqa: E402

FULL_STEPS = {"var-d16": 10, "mar-base": 64, "dit-xl-2": 250}


class Sampler:
    """Builds one model (and its decoder) once; ``run(batch, steps)`` samples and decodes."""

    def __init__(self, name: str, device: torch.device):
        self.name, self.device = name, device
        torch.manual_seed(0)
        if name == "var-d16":
            self.vae = zoo.build("var-vqvae", test_mode=True)
            self.model = zoo.build("var-d16", vae_local=self.vae)
        elif name == "mar-base":
            self.vae = zoo.build("mar-kl16-vae")
            self.model = zoo.build("mar-base")
        elif name == "dit-xl-2":
            self.vae = zoo.build("sd-vae-ft-ema")
            self.model = zoo.build("dit-xl-2")
            self.diffusion = GaussianDiffusion(beta_schedule("linear", 1000), learn_sigma=True)
        else:
            raise ValueError(f"unknown model {name!r}; choose from {sorted(FULL_STEPS)}")
        self.vae.to(device).eval()
        self.model.to(device).eval()

    @torch.inference_mode()
    def run(self, batch: int, steps: int) -> torch.Tensor:
        labels = torch.arange(batch, device=self.device) % 1000
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            if self.name == "var-d16":
                return self.model.autoregressive_infer_cfg(batch, labels, g_seed=0, cfg=4.0, top_k=900, top_p=0.96)
            if self.name == "mar-base":
                tokens = self.model.sample_tokens(batch, num_iter=steps, cfg=2.9, cfg_schedule="linear",
                                                  labels=labels, temperature=1.0)
                return self.vae.decode(tokens / 0.2325)
            diffusion = self.diffusion.respace(steps)
            null = torch.full_like(labels, 1000)
            noise = torch.randn(batch, 4, 32, 32, generator=torch.Generator().manual_seed(0)).to(self.device)
            latents = diffusion.p_sample_loop(lambda x, t, y: self.model.forward_with_cfg(x, t, y, cfg_scale=4.0),
                                              (2 * batch, 4, 32, 32), dict(y=torch.cat([labels, null])),
                                              noise=torch.cat([noise, noise]))[:batch]
            return self.vae.decode(latents / 0.18215)


def measure(sampler: Sampler, batch: int, steps: int) -> tuple[float, int | None]:
    """Wall-clock seconds and peak memory increase (bytes) of one sampling call."""
    if sampler.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        sampler.run(batch, steps)
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() - before
    with PeakRSS() as rss:
        start = time.perf_counter()
        sampler.run(batch, steps)
        seconds = time.perf_counter() - start
    return seconds, rss.increase


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="var-d16,mar-base,dit-xl-2")
    parser.add_argument("--devices", default="auto", help="cpu, cuda, or auto (cpu, plus cuda if available)")
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    parser.add_argument("--full", action="store_true", help="full schedules on the CPU too (very slow)")
    parser.add_argument("--cpu-mar-steps", type=int, default=4)
    parser.add_argument("--cpu-dit-steps", type=int, default=4)
    args = parser.parse_args()
    # Two short runs, S/2 and S steps, draw the line; DDPM's respacing needs at least 2 steps.
    if args.cpu_mar_steps < 2:
        parser.error(f"--cpu-mar-steps must be at least 2 (runs of S/2 and S steps), got {args.cpu_mar_steps}")
    if args.cpu_dit_steps < 4:
        parser.error(f"--cpu-dit-steps must be at least 4 (DDPM needs 2 steps in the S/2 run), "
                     f"got {args.cpu_dit_steps}")
    return_freed_memory_to_the_os()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto" \
        else args.devices.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), random weights", file=sys.stderr)

    print("| model | device | batch | steps run | time | per step | full schedule | per image (full) | "
          "peak memory increase |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for device_name in devices:
        device = torch.device(device_name)
        for name in args.models.split(","):
            sampler = Sampler(name, device)
            full = FULL_STEPS[name]
            steps = full
            if device.type == "cpu" and not args.full:
                steps = {"var-d16": full, "mar-base": args.cpu_mar_steps, "dit-xl-2": args.cpu_dit_steps}[name]
            sampler.run(1, min(steps, 2) if name != "var-d16" else steps)  # warm-up, not timed
            for batch in batches:
                seconds, memory = measure(sampler, batch, steps)
                if steps == full:
                    per_step, total = seconds / steps, seconds
                else:  # a line through (steps / 2, t_half) and (steps, seconds)
                    half = steps // 2
                    t_half, _ = measure(sampler, batch, half)
                    per_step = (seconds - t_half) / (steps - half)
                    total = seconds + per_step * (full - steps)
                print_row(name, device_name, batch, steps, full, seconds, per_step, total, memory)
            del sampler
    print("\n~ = extrapolated along the line through runs of S/2 and S steps (time = a + b * steps).")


def print_row(name, device, batch, steps, full, seconds, per_step, total, memory) -> None:
    mark = "" if steps == full else "~"
    memory_text = "n/a" if memory is None else f"{memory / 2**20:,.0f} MiB"
    print(f"| {name} | {device} | {batch} | {steps} of {full} | {seconds:.1f} s | {per_step:.2f} s | "
          f"{mark}{total:.0f} s | {mark}{total / batch:.1f} s | {memory_text} |", flush=True)


if __name__ == "__main__":
    main()
