"""Before/after figures for the speed changes tried on minilib (the appendix's "Optimisations").

    python benchmarks/optimisations.py attention       # fused attention vs softmax(q k^T) v
    python benchmarks/optimisations.py compile         # torch.compile on a small DiT's training step (2+ min)
    python benchmarks/optimisations.py channels-last   # channels-last memory format for chapter 4's autoencoder

Each prints a markdown table. Set ``OMP_NUM_THREADS`` to choose the CPU threads
(the appendix uses 1). Times are the best of a few repeats, so a busy machine
inflates them less.

- ``attention``: every attention layer in minilib calls
  ``F.scaled_dot_product_attention``; this compares it with the textbook
  ``softmax(q k^T / sqrt(d)) v`` at the sizes of three real models.
- ``compile``: ``torch.compile`` of the loss of a DiT training step against
  eager mode (the first compiled step includes the compilation).
- ``channels-last``: a training step and an encode/decode of the small KL
  autoencoder with the model and images in channels-last memory format.

The sampling loops' host-device synchronisations are not timed here (that
needs a GPU); tests/test_no_host_sync.py shows they are gone by running the
samplers on PyTorch's ``meta`` device, where any read of a value fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minilib import zoo  # noqa: E402
from minilib.diffusion import GaussianDiffusion, beta_schedule  # noqa: E402
from minilib.dit import DiT  # noqa: E402


def best_time(fn, repeats: int = 3, calls: int = 5) -> float:
    """Seconds per call: the best over ``repeats`` runs of ``calls`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return min(times)


def explicit_attention(q, k, v):
    weights = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return weights.softmax(dim=-1) @ v


def attention() -> None:
    sizes = [("DiT-S/2, 256 px", 8, 6, 256, 64), ("DiT-XL/2, 512 px", 2, 16, 1024, 72),
             ("VAR-d16, all scales", 4, 16, 680, 64)]
    print("| shape (B, heads, L, d) | model | pass | softmax(q k^T) v | fused | speed-up |")
    print("|---|---|---|---|---|---|")
    for model, B, H, L, d in sizes:
        q, k, v = (torch.randn(B, H, L, d) for _ in range(3))
        for backward in (False, True):
            inputs = [x.clone().requires_grad_(backward) for x in (q, k, v)]

            def step(fn):
                def run():
                    out = fn(*inputs)
                    if backward:
                        out.sum().backward()
                return run

            slow, fast = best_time(step(explicit_attention)), best_time(step(F.scaled_dot_product_attention))
            print(f"| ({B}, {H}, {L}, {d}) | {model} | {'forward + backward' if backward else 'forward'} | "
                  f"{slow * 1000:.0f} ms | {fast * 1000:.0f} ms | {slow / fast:.2f}x |", flush=True)


def dit_training_step(compiled: bool):
    """A small DiT (16x16x3 images, patch 2, width 128, depth 4: 64 tokens, 1.27 M parameters; larger
    than chapter 5's cpu-budget model), one AdamW step on 64 images."""
    torch.manual_seed(0)
    model = DiT(input_size=16, patch_size=2, in_channels=3, hidden_size=128, depth=4, num_heads=4,
                num_classes=10, learn_sigma=False)
    process = GaussianDiffusion(beta_schedule("linear", 1000))

    def loss_fn(model, x, y):
        return process.training_loss(model, x, dict(y=y))

    loss_fn = torch.compile(loss_fn) if compiled else loss_fn
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))

    def step():
        loss = loss_fn(model, x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


def compile_() -> None:
    print("| DiT training step, batch 64 | first step | later steps | images/s |")
    print("|---|---|---|---|")
    for compiled in (False, True):
        step = dit_training_step(compiled)
        start = time.perf_counter()
        step()
        first = time.perf_counter() - start
        per_step = best_time(step, repeats=3, calls=5)
        print(f"| {'torch.compile' if compiled else 'eager'} | {first:.1f} s | {per_step * 1000:.0f} ms | "
              f"{64 / per_step:.0f} |", flush=True)


def channels_last() -> None:
    print("| small-kl-vae, batch 32 | training step | encode + decode |")
    print("|---|---|---|")
    for memory_format in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        vae = zoo.build("small-kl-vae").to(memory_format=memory_format)
        x = torch.randn(32, 3, 32, 32).to(memory_format=memory_format)
        optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)

        def train_step():
            posterior = vae.encode(x)
            loss = (vae.decode(posterior.sample()) - x).abs().mean() + 1e-6 * posterior.kl().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        def round_trip():
            with torch.no_grad():
                vae.decode(vae.encode(x).mode())

        name = "channels-last" if memory_format == torch.channels_last else "contiguous (default)"
        print(f"| {name} | {best_time(train_step, calls=3) * 1000:.0f} ms | "
              f"{best_time(round_trip) * 1000:.0f} ms |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=["attention", "compile", "channels-last"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)\n")
    {"attention": attention, "compile": compile_, "channels-last": channels_last}[args.experiment]()


if __name__ == "__main__":
    main()
