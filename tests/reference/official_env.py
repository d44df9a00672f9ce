"""Make the official repositories importable for the reference scripts (never imported by the tests).

The reference scripts ``make_official_*.py`` run the authors' own code (VAR, MAR, DiT,
the SD3.5 reference) on small random-weight configurations and save what it computes
into ``tests/reference/official/``. They need, beside this project's ``.venv``:

* a checkout of each official repository at the commit named in ``OFFICIAL_COMMITS``;
* ``timm`` and ``pillow`` without their dependencies, and an older ``huggingface_hub``
  (VAR's model class inherits its hub mixin) with them:
  ``.venv/bin/pip install --target DEPS --no-deps timm pillow`` and
  ``.venv/bin/pip install --target DEPS "huggingface_hub<0.27"``.

timm imports torchvision at import time, for data transforms and a frozen batch norm
that none of the official models used here touches. There is no CPU build of
torchvision for the pinned torch, so ``stub_packages`` puts an empty stand-in in
``sys.modules``: any attribute of it is a placeholder class (a new one per name), which is enough for
``import`` and ``class X(Placeholder)`` to succeed. Nothing of it is ever called.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from pathlib import Path

OFFICIAL_COMMITS = {
    "VAR": "78b95394fc5896192e3a003e4b295f8ea743c48f",  # FoundationVision/VAR
    "mar": "fe470ac24afbee924668d8c5c83e9fec60af3a73",  # LTH14/mar
    "DiT": "ed81ce2229091fd4ecc9a223645f95cf379d582b",  # facebookresearch/DiT
    "sd3.5": "fbf8f483f992d8d6ad4eaaeb23b1dc5f523c3b3a",  # Stability-AI/sd3.5
}

# Imported by the official code but never used on the paths the reference scripts run:
# torchvision by timm (data transforms), transformers by the SD3.5 reference (its text
# encoders' tokenizers; the reference scripts feed the MM-DiT its context directly).
STUBBED_PACKAGES = ("torchvision", "transformers")

OUTPUT_DIR = Path(__file__).resolve().parent / "official"


def _placeholder_attribute(owner, name: str) -> type:
    """``owner.name`` for a stand-in module or class: a new placeholder class, kept on ``owner``."""
    if name.startswith("__"):
        raise AttributeError(name)
    value = _PlaceholderMeta(name, (_Placeholder,), {})
    setattr(owner, name, value)
    return value


class _PlaceholderMeta(type):
    __getattr__ = _placeholder_attribute  # attributes of a placeholder class are placeholders too


class _Placeholder(metaclass=_PlaceholderMeta):
    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__} is a stand-in (see official_env.py); this path needs the real package")


class _StubModule(types.ModuleType):
    __getattr__ = _placeholder_attribute


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in STUBBED_PACKAGES:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0+stub"
        return module

    def exec_module(self, module):
        pass


def stub_packages() -> None:
    """Let ``import torchvision...`` and ``import transformers...`` succeed with placeholders."""
    if not any(isinstance(finder, _StubFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _StubFinder())


def use_official(repo_dir: str | Path, deps_dir: str | Path | None = None) -> Path:
    """Put an official checkout (and the no-deps packages) first on ``sys.path``; return the checkout."""
    repo_dir = Path(repo_dir).resolve()
    if not repo_dir.is_dir():
        raise SystemExit(f"no official checkout at {repo_dir}")
    stub_packages()
    for folder in [deps_dir, repo_dir]:
        if folder is not None and str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    return repo_dir
