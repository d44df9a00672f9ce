"""Run budgets: one notebook, three sizes.

Every chapter trains and samples real models, but a chapter has to run in about
a minute under the tests (``ci``), in a few minutes on a reader's laptop
(``cpu``) and as a real experiment on a Colab GPU (``gpu``). A notebook never
hard-codes its sizes; it asks this module::

    cfg = choose(ci=dict(steps=60, width=64), cpu=dict(steps=800, width=96),
                 gpu=dict(steps=4000, width=256))
    cfg.steps, cfg.width

The budget comes from the environment variable ``MINILIB_BUDGET``; without it
the default is ``gpu`` when CUDA is available and ``cpu`` otherwise. The test
suite and CI set ``MINILIB_BUDGET=ci``.

**Miniature runs.** ``MINILIB_MINIATURE=1`` keeps the chosen budget's settings
(model sizes, image sizes, data pipeline) but caps the amount of work, so that
the ``gpu`` configuration can be executed end to end on a CPU in seconds: every
setting named ``steps`` or ``*_steps`` (and the step counts in lists and digit
strings under such names) is capped at :data:`MINIATURE_STEPS`, every
``*samples*``/``*per_class``/``*per_prompt``/``*per_set``/``*_sets`` count at
:data:`MINIATURE_SAMPLES`, and every batch size (``batch_size``, ``*_batch_size``,
``*_batch``, ``*_per_batch``) at :data:`MINIATURE_BATCH`. No code path depends on
the batch size, but the cost does: one training step of chapter 5's latent DiT at
its ``gpu`` batch of 256 takes 6.3 s of CPU time (book/performance.md), and the
pixel DiT beside it several times more. Training stays in float32: bfloat16 autocast on a
CPU without bf16 instructions is about 12 times slower (one training step of
chapter 4's autoencoder on 64 images: 40 s instead of 3.4 s), so the bf16 code
path is tested by ``tests/test_autocast.py`` instead, on small inputs.
``tools/make.py book --budget gpu --miniature`` runs every notebook this way, on
tiny stand-in datasets (:func:`~minilib.datasets.write_miniature_files`); the
numbers such a run prints mean nothing, but every code path of the ``gpu``
budget is executed.
"""

from __future__ import annotations

import os
import random
import sys
from types import SimpleNamespace

import numpy as np
import torch

BUDGETS = ("ci", "cpu", "gpu")
ENV_VAR = "MINILIB_BUDGET"
MINIATURE_ENV = "MINILIB_MINIATURE"
MINIATURE_STEPS = 2
MINIATURE_SAMPLES = 4
MINIATURE_BATCH = 8


def current_budget() -> str:
    """The active budget name: ``MINILIB_BUDGET`` if set, else ``gpu``/``cpu``."""
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if not name:
        return "gpu" if torch.cuda.is_available() else "cpu"
    if name not in BUDGETS:
        raise ValueError(f"{ENV_VAR}={name!r} is not a budget; expected one of {BUDGETS}")
    return name


def miniature() -> bool:
    """True when ``MINILIB_MINIATURE`` is set to 1 (a capped run of a budget's configuration)."""
    value = os.environ.get(MINIATURE_ENV, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise ValueError(f"{MINIATURE_ENV}={value!r}: expected 1 (a miniature run) or 0")


def _cap(value, limit: int):
    """``value`` with every count in it capped at ``limit``: ints, digit strings, lists of ints."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return min(value, limit)
    if isinstance(value, str) and value.isdigit():
        return str(min(int(value), limit))
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and not isinstance(v, bool)
                                                          for v in value):
        capped = list(dict.fromkeys(min(v, limit) for v in value))
        return type(value)(capped)
    return value


def miniaturise(settings: dict) -> dict:
    """The settings of a miniature run: step counts capped at :data:`MINIATURE_STEPS`, sample
    counts at :data:`MINIATURE_SAMPLES`, batch sizes at :data:`MINIATURE_BATCH`, everything else
    (model and image sizes, data, rates) unchanged."""
    capped = {}
    for key, value in settings.items():
        if key == "steps" or key.endswith("_steps") or key.endswith("step_counts") or key.endswith("step_sweep"):
            value = _cap(value, MINIATURE_STEPS)
        elif "samples" in key or key.endswith(("per_class", "per_prompt", "per_set", "per_pair", "_sets")):
            value = _cap(value, MINIATURE_SAMPLES)
        elif key == "batch_size" or key.endswith(("_batch_size", "_batch", "_per_batch")):
            value = _cap(value, MINIATURE_BATCH)
        capped[key] = value
    return capped


def choose(ci: dict, cpu: dict, gpu: dict, budget: str | None = None) -> SimpleNamespace:
    """Pick the settings of the active budget.

    The three dicts must have the same keys, so that a setting cannot silently
    exist in one budget only. Returns a namespace with one attribute per key
    plus ``budget`` (the name that was chosen) and ``miniature`` (whether the
    run is capped, see :func:`miniaturise`).
    """
    options = {"ci": ci, "cpu": cpu, "gpu": gpu}
    keys = set(ci)
    for name, settings in options.items():
        if set(settings) != keys:
            raise ValueError(
                f"budget {name!r} has keys {sorted(settings)}, but 'ci' has {sorted(keys)}; "
                "every budget must set the same keys")
    name = budget or current_budget()
    if name not in options:
        raise ValueError(f"budget {name!r} is not one of {BUDGETS}")
    settings = options[name]
    small = miniature()
    if small:
        settings = miniaturise(settings)
    return SimpleNamespace(budget=name, miniature=small, **settings)


def default_device() -> torch.device:
    """CUDA if present, then Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so reruns print the same numbers."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def running_on_colab() -> bool:
    return "google.colab" in sys.modules


def budget_mismatch(budget: str, device: torch.device) -> str | None:
    """A warning when the budget does not suit the device, or None when it does.

    ``gpu`` without CUDA trains the full-size models on a CPU, which takes hours
    per chapter; ``cpu`` on a CUDA machine runs the small settings and leaves
    the GPU idle.
    """
    if miniature():
        return None
    if budget == "gpu" and device.type != "cuda":
        return (f"MINILIB_BUDGET is 'gpu' but the device is {device.type}: the gpu settings train "
                f"models 10-50x larger for 5-10x more steps than 'cpu', hours per chapter on a CPU "
                f"instead of minutes. Switch with `%env {ENV_VAR}=cpu` (or unset {ENV_VAR}) and "
                f"restart the kernel, or run on a GPU.")
    if budget == "cpu" and device.type == "cuda":
        return (f"MINILIB_BUDGET is 'cpu' but a GPU is present: the notebook runs the small laptop "
                f"settings (tiny data, short training) and the GPU idles. For the full-size "
                f"experiments on real datasets use `%env {ENV_VAR}=gpu` (or unset {ENV_VAR}) and "
                f"restart the kernel; a chapter then takes a few minutes on a T4.")
    return None


def setup_notebook(seed: int = 0, verbose: bool = True) -> torch.device:
    """What every chapter's first cell calls after making sure minilib is installed.

    Seeds everything, picks the device, and says in plain words which budget
    and device the notebook will use. On Colab without a GPU runtime it tells
    the reader how to switch one on.
    """
    seed_everything(seed)
    device = default_device()
    budget = current_budget()
    if verbose:
        print(f"minilib budget: {budget!r}   device: {device}   torch {torch.__version__}")
        if device.type == "cuda":
            print(f"GPU: {torch.cuda.get_device_name(0)}")
        mismatch = budget_mismatch(budget, device)
        if mismatch:
            print("Warning: " + mismatch)
        if miniature():
            print(f"{MINIATURE_ENV}=1: a miniature run (every step count capped at {MINIATURE_STEPS}); "
                  f"its numbers mean nothing")
        if running_on_colab() and device.type != "cuda":
            print("No GPU runtime is selected, so this notebook runs the small 'cpu' budget.\n"
                  "For the full-size experiments choose Runtime > Change runtime type > "
                  "T4 GPU (or better), then Runtime > Run all.")
    return device
