"""Sampling time per image of every sampler in the book, with a small model and at full size.

    python benchmarks/samplers.py                  # small and full-size models, CPU (+ CUDA if present)
    python benchmarks/samplers.py --quick          # small models only
    python benchmarks/samplers.py --sizes full --devices cuda

The models have random weights (the time does not depend on them) and sample
with classifier-free guidance, which doubles the batch the network sees:

| sampler | small model (sizes from the notebooks' cpu budget) | full size |
|---|---|---|
| DDPM, DDIM (``minilib.diffusion``) | chapter 5's latent DiT on 4x4x4 latents of 16x16 digits, guidance 2 | DiT-XL/2 (256 px, 32x32x4 latents), guidance 4 |
| Euler, Heun (``minilib.flow``) | chapter 7's MM-DiT + text encoder, 16x16 RGB, guidance 3 | SD3 Medium's MM-DiT, guidance 5, shift 3 |
| VAR, with and without the KV cache | chapter 10's small-var-digits (4 scales) | VAR-d16: see ``var_kv_cache.py`` |
| MAR (``sample_tokens``) | chapter 11's mar-small-digits, without guidance | MAR-B (256 tokens), without guidance |

The VAR rows reuse ``var_kv_cache.py`` (its models and its ``sample``), the
MAR rows ``mar_sampling.py`` (``time_sampling``, which also gives the share of
the time spent in the diffusion head). Neither image decoder is run.

On the CPU the full-size models run only a few steps (``--cpu-steps``), and the
full schedule is extrapolated from the time per model call (DDPM, DDIM, Euler:
one call per step; Heun: two, one at the last step); MAR-B runs ``--cpu-steps``
autoregressive steps with 25 diffusion steps and is extrapolated to 64 x 100
from its two parts (the transformer runs once per autoregressive step, the
head once per diffusion step for every token). Extrapolated figures are marked
"~". SD3 Medium runs at ``--sd3-px`` pixels (1024 is its native size; on a CPU
one call at 1024 px takes minutes, so the default is 256). On CUDA every
schedule runs complete, in bfloat16 autocast.

Each case runs once untimed as a warm-up (1 or 2 steps; the memory a step
needs does not grow with the number of steps), which also measures the peak
memory: the increase over what was allocated before the call, on the CPU the
resident set size polled every 2 ms (``var_kv_cache.PeakRSS``, see
``peak_memory``), on CUDA ``torch.cuda.max_memory_allocated``. The timed run
follows. Set ``OMP_NUM_THREADS`` to control the CPU threads.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))       # the other benchmark scripts

from mar_sampling import time_sampling  # noqa: E402
from minilib import zoo  # noqa: E402
from minilib.datasets import COLOURS, SHAPES, caption, tokenize  # noqa: E402
from minilib.diffusion import GaussianDiffusion, beta_schedule, classifier_free_guidance  # noqa: E402
from minilib.dit import DiT  # noqa: E402
from minilib.flow import CFGDenoiser, VelocityDenoiser, sample_euler, sample_heun, sigmas  # noqa: E402
from minilib.mmdit import MMDiT  # noqa: E402
from minilib.text_encoder import TextEncoder, TextToImage  # noqa: E402
from training import notebook_config  # noqa: E402
from var_kv_cache import PeakRSS, return_freed_memory_to_the_os, small_models  # noqa: E402
from var_kv_cache import sample as var_sample  # noqa: E402

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
SMALL_BATCH = 100  # images per call for the small models (chapter 5 draws 10 per digit)


@dataclass
class Row:
    sampler: str
    model: str
    device: str
    batch: int
    steps: str          # what ran, e.g. "2 of 250 (2 calls)"
    per_image: float    # seconds per image, for the full schedule
    per_call: float | None
    memory: int | None  # bytes
    extrapolated: bool
    note: str = ""


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def sampling_mode(device: torch.device):
    """No autograd, and bf16 autocast on CUDA."""
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        yield


def peak_memory(run: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory increase (bytes) of ``run()``; also serves as the untimed warm-up.

    On the CPU glibc first returns the free memory it holds (``malloc_trim``) and, for
    this call only, returns freed blocks to the system at once
    (``var_kv_cache.return_freed_memory_to_the_os``), so that the polled RSS follows the
    live tensors. Afterwards it keeps them again (fixed thresholds at the top of glibc's
    own dynamic range), because an mmap and munmap for every block of 64 KiB or more slows
    the small models' sampling down by a half or more.
    """
    with sampling_mode(device):
        if device.type == "cuda":
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            run()
            synchronize(device)
            return torch.cuda.max_memory_allocated(device) - before
        libc = glibc()
        if libc is not None:
            libc.malloc_trim(0)
        return_freed_memory_to_the_os()
        try:
            with PeakRSS() as rss:
                run()
        finally:
            if libc is not None:  # glibc's thresholds after it has seen large blocks freed
                libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
                libc.mallopt(M_TRIM_THRESHOLD, 64 * 2**20)
        return rss.increase


def glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def wall_time(run: Callable[[], object], device: torch.device) -> float:
    """Seconds of one ``run()``, synchronised on CUDA."""
    with sampling_mode(device):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        return time.perf_counter() - start


def time_schedule(sampler: str, model: str, device: torch.device, batch: int, full_steps: int, run_steps: int,
                  sample: Callable[[int], object], calls: Callable[[int], int] = lambda n: n,
                  warm_up_steps: int = 1) -> Row:
    """Peak memory of ``sample(warm_up_steps)`` (the warm-up), then the time of ``sample(run_steps)``,
    scaled to ``full_steps`` by the number of model calls."""
    memory = peak_memory(lambda: sample(warm_up_steps), device)
    seconds = wall_time(lambda: sample(run_steps), device)
    per_call = seconds / calls(run_steps)
    total = per_call * calls(full_steps)
    return Row(sampler, model, device.type, batch, f"{run_steps} of {full_steps} ({calls(run_steps)} calls)",
               total / batch, per_call, memory, extrapolated=run_steps != full_steps)


# --- DDPM and DDIM -------------------------------------------------------------------------------

def ddpm_ddim_rows(model: DiT, diffusion: GaussianDiffusion, name: str, device: torch.device, batch: int,
                   shape: tuple, guidance: float, steps: dict, run_steps: dict) -> list[Row]:
    """DDPM (``p_sample_loop``) and DDIM (``ddim_sample_loop``, eta 0) with guidance, a doubled batch."""
    model.to(device).eval()
    guided = classifier_free_guidance(model, guidance)
    labels = torch.arange(batch, device=device) % model.y_embedder.null_class
    y = torch.cat([labels, torch.full_like(labels, model.y_embedder.null_class)])

    def loop(method: str, n: int):
        respaced = diffusion.respace(n)
        sample = respaced.p_sample_loop if method == "DDPM" else respaced.ddim_sample_loop
        return sample(guided, (2 * batch, *shape), dict(y=y), seed=0, device=device)

    return [time_schedule(method, name, device, batch, steps[method], run_steps[method],
                          lambda n, method=method: loop(method, n), warm_up_steps=2)
            for method in ("DDPM", "DDIM")]


def dit_small(device: torch.device, args) -> list[Row]:
    """Chapter 5's latent DiT at its cpu settings (cells "latent_shape ... def build_dit"): 4x4x4 latents of
    the 16x16 digits, DiT's linear schedule, the notebook's step counts (the decoder is not timed)."""
    cfg = notebook_config("05", "cpu")
    side = cfg.image_size // 4
    model = DiT(input_size=side, patch_size=cfg.patch_size, in_channels=4, hidden_size=cfg.hidden_size,
                depth=cfg.depth, num_heads=4, num_classes=10, learn_sigma=False)
    steps = {"DDPM": cfg.ddpm_steps, "DDIM": cfg.ddim_steps}
    return ddpm_ddim_rows(model, GaussianDiffusion(beta_schedule("linear", 1000)),
                          f"ch. 5 latent DiT ({zoo.count_parameters(model) / 1e6:.2f}M)", device, SMALL_BATCH,
                          (4, side, side), 2.0, steps, steps)


def dit_xl(device: torch.device, args) -> list[Row]:
    """DiT-XL/2 as the paper samples: 250 DDPM steps (and DDIM with 50), learned sigma, guidance 4."""
    model = zoo.build("dit-xl-2")
    steps = {"DDPM": 250, "DDIM": 50}
    run_steps = steps if device.type == "cuda" else {name: args.cpu_steps for name in steps}
    return ddpm_ddim_rows(model, GaussianDiffusion(beta_schedule("linear", 1000), learn_sigma=True),
                          "DiT-XL/2 (675M)", device, 1, (4, 32, 32), 4.0, steps, run_steps)


# --- Euler and Heun ------------------------------------------------------------------------------

def euler_heun_rows(model, name: str, device: torch.device, batch: int, noise_shape: tuple, cond: dict,
                    uncond: dict, guidance: float, shift: float, timestep_scale: float, full_steps: int,
                    run_steps: int) -> list[Row]:
    """Euler (one call per step) and Heun (two, one at the last step) with ``CFGDenoiser``."""
    model.to(device).eval()
    denoiser = CFGDenoiser(VelocityDenoiser(model, timestep_scale=timestep_scale))
    noise = torch.randn(batch, *noise_shape, generator=torch.Generator().manual_seed(0)).to(device)
    extra = dict(cond=cond, uncond=uncond, cond_scale=guidance)
    rows = []
    for method, sampler, calls in [("Euler", sample_euler, lambda n: n), ("Heun", sample_heun, lambda n: 2 * n - 1)]:
        rows.append(time_schedule(method, name, device, batch, full_steps, run_steps,
                                  lambda n, sampler=sampler: sampler(denoiser, noise, sigmas(n, shift).to(device),
                                                                     extra_args=extra), calls))
    return rows


def mmdit_small(device: torch.device, args) -> list[Row]:
    """Chapter 7's text-to-image MM-DiT at its cpu settings (cell "def build_model"): the latent model, 4x8x8
    latents in 2x2 patches, told 1000 t (the decoder's cost is not included)."""
    cfg = notebook_config("07", "cpu")
    max_words = 6
    model = TextToImage(TextEncoder(dim=cfg.text_dim, depth=2, num_heads=4, max_length=max_words),
                        MMDiT(in_channels=4, hidden_size=cfg.hidden, depth=cfg.depth, num_heads=4,
                              pos_embed_max_size=4, patch_size=2, adm_in_channels=cfg.text_dim,
                              context_dim=cfg.text_dim, qk_norm="rms", register_length=2))
    captions = [caption(SHAPES[i % len(SHAPES)], COLOURS[i % len(COLOURS)], "centre") for i in range(SMALL_BATCH)]
    tokens = tokenize(captions, length=max_words).to(device)
    return euler_heun_rows(model, f"ch. 7 latent MM-DiT ({zoo.count_parameters(model) / 1e6:.2f}M)", device,
                           SMALL_BATCH, (4, 8, 8), dict(tokens=tokens), dict(tokens=torch.zeros_like(tokens)), 3.0,
                           shift=1.0, timestep_scale=1000.0, full_steps=cfg.sample_steps, run_steps=cfg.sample_steps)


def sd3_medium(device: torch.device, args) -> list[Row]:
    """SD3 Medium's MM-DiT (2B), 28 steps, shift 3, guidance 5; random CLIP/T5 embeddings (154 x 4096)."""
    model = zoo.build("sd3-medium-mmdit")
    generator = torch.Generator().manual_seed(0)
    cond = dict(y=torch.randn(1, 2048, generator=generator).to(device),
                context=torch.randn(1, 154, 4096, generator=generator).to(device))
    uncond = {key: torch.zeros_like(value) for key, value in cond.items()}
    latent = args.sd3_px // 8
    run_steps = 28 if device.type == "cuda" else args.cpu_steps
    return euler_heun_rows(model, f"SD3 Medium MM-DiT (2.0B), {args.sd3_px} px", device, 1, (16, latent, latent),
                           cond, uncond, 5.0, shift=3.0, timestep_scale=1000.0, full_steps=28, run_steps=run_steps)


# --- VAR and MAR ---------------------------------------------------------------------------------

def var_small(device: torch.device, args) -> list[Row]:
    """Chapter 10's small VAR, all 4 scales, with and without the KV cache (var_kv_cache.sample)."""
    torch.manual_seed(0)
    vae, var = small_models()
    vae.to(device)
    var.to(device).eval()
    name = f"small-var-digits ({zoo.count_parameters(var) / 1e6:.2f}M)"
    rows = []
    for use_kv_cache in (True, False):
        memory = peak_memory(lambda: var_sample(var, SMALL_BATCH, use_kv_cache), device)
        seconds = wall_time(lambda: var_sample(var, SMALL_BATCH, use_kv_cache), device)
        rows.append(Row("VAR, KV cache" if use_kv_cache else "VAR, no cache", name, device.type, SMALL_BATCH,
                        f"{len(var.patch_nums)} scales", seconds / SMALL_BATCH, seconds / len(var.patch_nums),
                        memory, extrapolated=False))
    return rows


def mar_row(model, name: str, device: torch.device, batch: int, num_iter: int, diffusion_steps: int,
            full: tuple[int, int]) -> Row:
    """``time_sampling`` once (after a warm-up of 1 x 2 steps that measures the memory); extrapolated in
    both parts to ``full`` = (K, D)."""
    model.to(device).eval()
    memory = peak_memory(lambda: time_sampling(model, batch, 1, 2, device), device)
    result = {}
    seconds = wall_time(lambda: result.update(share=time_sampling(model, batch, num_iter, diffusion_steps,
                                                                  device)[1]), device)
    head, transformer = seconds * result["share"], seconds * (1 - result["share"])
    full_head = head / diffusion_steps * full[1]
    total = transformer / num_iter * full[0] + full_head
    extrapolated = (num_iter, diffusion_steps) != full
    note = f"{100 * result['share']:.0f}% of the run in the diffusion head"
    if extrapolated:
        note += f", ~{100 * full_head / total:.0f}% of the full schedule"
    return Row("MAR", name, device.type, batch, f"{num_iter} x {diffusion_steps} of {full[0]} x {full[1]}",
               total / batch, None, memory, extrapolated=extrapolated, note=note)


def mar_small(device: torch.device, args) -> list[Row]:
    """Chapter 11's MAR at its cpu settings (cell "model = zoo.build('mar-small-digits', ...)")."""
    cfg = notebook_config("11", "cpu")
    model = zoo.build("mar-small-digits", encoder_embed_dim=cfg.width, decoder_embed_dim=cfg.width,
                      encoder_depth=cfg.depth, decoder_depth=cfg.depth, diffloss_w=cfg.head_width,
                      diffloss_d=cfg.head_depth, num_sampling_steps=cfg.diffusion_steps)
    steps = (cfg.num_iter, int(cfg.diffusion_steps))
    return [mar_row(model, f"mar-small-digits ({zoo.count_parameters(model) / 1e6:.2f}M)", device, SMALL_BATCH,
                    *steps, full=steps)]


def mar_base(device: torch.device, args) -> list[Row]:
    """MAR-B: 64 autoregressive steps, 100 diffusion steps per token (the released setting)."""
    torch.manual_seed(0)
    model = zoo.build("mar-base")
    full = (64, 100)
    steps = full if device.type == "cuda" else (args.cpu_steps, 25)
    return [mar_row(model, "MAR-B (208M)", device, 1, *steps, full=full)]


BENCHMARKS = {"small": [dit_small, mmdit_small, var_small, mar_small], "full": [dit_xl, sd3_medium, mar_base]}


def print_table(rows: list[Row]) -> None:
    print("| sampler | model | device | batch | steps run (model calls) | time per image | per model call | "
          "peak memory increase | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        mark = "~" if row.extrapolated else ""
        per_image = f"{mark}{row.per_image * 1000:,.1f} ms" if row.per_image < 1 else f"{mark}{row.per_image:,.1f} s"
        per_call = "--" if row.per_call is None else f"{row.per_call * 1000:,.1f} ms"
        memory = "n/a" if row.memory is None else f"{row.memory / 2**20:,.0f} MiB"
        print(f"| {row.sampler} | {row.model} | {row.device} | {row.batch} | {row.steps} | {per_image} | "
              f"{per_call} | {memory} | {row.note} |")
    print("\n~ = the full schedule extrapolated from the steps that ran (time per model call x calls; MAR: "
          "transformer time per autoregressive step and head time per diffusion step). Per model call: for the "
          "whole batch, guidance included (VAR: per scale).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="small,full", help="small, full or both")
    parser.add_argument("--devices", default="auto", help="cpu, cuda, or auto (cpu, plus cuda if available)")
    parser.add_argument("--cpu-steps", type=int, default=2, help="steps the full-size models run on the CPU (2 or more)")
    parser.add_argument("--sd3-px", type=int, default=256, help="image size for SD3 Medium (1024 native)")
    parser.add_argument("--quick", action="store_true", help="small models only")
    args = parser.parse_args()
    sizes = ["small"] if args.quick else args.sizes.split(",")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto" \
        else args.devices.split(",")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), random weights"
          + (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "") + "\n")
    rows = []
    for device_name in devices:
        for size in sizes:
            for benchmark in BENCHMARKS[size]:
                torch.manual_seed(0)
                new_rows = benchmark(torch.device(device_name), args)
                for row in new_rows:
                    print(f"  {row.sampler} {row.model} {row.device}: {row.per_image:.3f} s per image",
                          file=sys.stderr, flush=True)
                rows += new_rows
    print_table(rows)


if __name__ == "__main__":
    main()
