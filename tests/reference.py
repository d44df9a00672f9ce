"""The official module trees in ``tests/reference/`` and helpers to compare against them.

Each ``tests/reference/*.json`` (see its README.md) lists every state-dict key of an
official model with its shape and kind (``param`` or ``buffer``). The files are
copies of ``shared/reference/`` kept in the repository so that the tests never
read outside it.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


def load_reference(name: str) -> dict:
    """The parsed JSON ``tests/reference/<name>`` (for example ``"var_d16.json"``)."""
    path = REFERENCE_DIR / name
    if not path.is_file():
        known = sorted(p.name for p in REFERENCE_DIR.glob("*.json"))
        raise FileNotFoundError(f"no reference file {path}; known: {known}")
    return json.loads(path.read_text())


def reference_tree(reference: dict, prefix: str = "") -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, kind)}`` for the reference keys under ``prefix``, with the prefix removed."""
    return {key[len(prefix):]: (tuple(entry["shape"]), entry["kind"])
            for key, entry in reference["state_dict"].items() if key.startswith(prefix)}


def module_tree(module: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{key: (shape, kind)}`` for a module's state dict, in the reference files' format."""
    params = dict(module.named_parameters())
    return {key: (tuple(value.shape), "param" if key in params else "buffer")
            for key, value in module.state_dict().items()}


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
