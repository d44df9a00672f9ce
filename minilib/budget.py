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


def current_budget() -> str:
    """The active budget name: ``MINILIB_BUDGET`` if set, else ``gpu``/``cpu``."""
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if not name:
        return "gpu" if torch.cuda.is_available() else "cpu"
    if name not in BUDGETS:
        raise ValueError(f"{ENV_VAR}={name!r} is not a budget; expected one of {BUDGETS}")
    return name


def choose(ci: dict, cpu: dict, gpu: dict, budget: str | None = None) -> SimpleNamespace:
    """Pick the settings of the active budget.

    The three dicts must have the same keys, so that a setting cannot silently
    exist in one budget only. Returns a namespace with one attribute per key
    plus ``budget`` (the name that was chosen).
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
    return SimpleNamespace(budget=name, **options[name])


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
        if running_on_colab() and device.type != "cuda":
            print("No GPU runtime is selected, so this notebook runs the small 'cpu' budget.\n"
                  "For the full-size experiments choose Runtime > Change runtime type > "
                  "T4 GPU (or better), then Runtime > Run all.")
    return device
