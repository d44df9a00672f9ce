"""Official checkpoints: download, read safely, map keys, load strictly.

Chapter 13 of the book. Every full-size configuration in :mod:`minilib.zoo` has
exactly the official module tree, so the authors' published weights load into
it with ``strict=True``::

    from minilib.pretrained import from_pretrained
    dit = from_pretrained("dit-xl-2", device="cuda")   # 2.7 GB, cached after the first time

What happens, step by step:

1. ``checkpoint_path(name)``: where the file lives in the cache folder
   (``$MINILIB_CACHE``, default ``~/.cache/minilib``). A file already there is
   used as it is, so a reader without network can download it elsewhere and
   copy it in.
2. ``download_checkpoint(name)``: fetch the published file with
   :func:`minilib.datasets.download_file` (a progress bar, a unique temporary
   file renamed only when complete, a lock so that two processes never
   download the same file at once, short timeouts). A web page served instead
   of the file is refused, and the size and SHA-256 are checked where the
   registry knows them (see below). With ``MINILIB_OFFLINE=1``, or when the
   host cannot be reached, it fails at once with a message naming the URL and
   the cache path. A cached file that is clearly wrong (not a checkpoint at
   all, or the wrong size) is moved aside to ``<file>.damaged`` and fetched
   again.
3. ``read_state_dict(path, ...)``: read it safely by what its bytes are, not by
   its name: ``safetensors``, or ``torch.load(weights_only=True)`` for torch's
   zip and pickle formats (no arbitrary code from a pickle); anything else (an
   HTML error page, a Git LFS pointer) gets a diagnosis. Then take the state
   dict out of its wrapper (MAR: ``"model_ema"``, DiT: ``"ema"`` when present)
   and strip a prefix (SD3's single file holds several models).
4. ``load_official_state_dict(model, state_dict)``: compare keys, shapes and
   kinds of dtype with the model first and raise a readable report of what is
   missing, unexpected or misshapen; only then ``load_state_dict(strict=True)``.

What is checked for each file. Every entry gets steps 2-4 (format, keys,
shapes, dtypes: a wrong or damaged file cannot load silently). A SHA-256 is
recorded only where a published value was found, never guessed:

- ``var-vqvae``: SHA-256 and size (436,075,834 bytes) of
  ``vae_ch160v4096z32.pth`` in Hugging Face's ``FoundationVision/var``, as
  quoted from the file's Git LFS pointer (``oid sha256:`` and ``size``) by a
  public project that pins it; a second, unrelated project records the same
  SHA-256 for its copy of the official file.
- ``var-d16``: SHA-256 of ``var_d16.pth`` as recorded by that second project,
  which pins its copies of the official files (its hash of the VQ-VAE agrees
  with the LFS pointer above). No exact size was found for it.
- every other entry: no published hash or exact size was available when this
  was written; the key/shape/dtype check of step 4 is their safeguard, with
  the completeness (Content-Length) and format checks of step 2.
"""

from __future__ import annotations

import argparse
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .datasets import CONNECT_TIMEOUT, OFFLINE_ENV, DownloadError, download_file, is_offline
from .training import NOT_A_CHECKPOINT, checkpoint_report, file_format, format_report, move_aside

CACHE_ENV, TOKEN_ENV = "MINILIB_CACHE", "HF_TOKEN"


@dataclass(frozen=True)
class Checkpoint:
    """Where a zoo entry's official weights are published and how the file is laid out.

    Attributes:
        url: the authors' download link.
        filename: the file's name in the cache folder.
        wrapper_key: the entry of the file that holds the state dict (``None``: the
            file *is* the state dict). A tuple tries each key in turn.
        prefix: a prefix on every key of this model in the file, removed on loading;
            keys without it belong to other models and are dropped.
        ignore: prefixes of keys that are not weights of the model (e.g. the EMA
            bookkeeping ``model_ema.decay`` in Stable Diffusion's VAE file); dropped.
        sha256: the file's SHA-256, checked after download, where a published
            value is known (``None`` otherwise: never a guess).
        size: the file's exact size in bytes, where known; checked after download
            and on every use of the cached file (cheap, unlike the SHA-256).
        size_mb: the approximate download size, shown before downloading.
        gated: the host requires a login (a Hugging Face token in ``$HF_TOKEN``
            after accepting the model's licence on its page).
        note: one line for tables.
    """

    url: str
    filename: str
    wrapper_key: str | tuple[str, ...] | None = None
    prefix: str = ""
    ignore: tuple[str, ...] = ()
    sha256: str | None = None
    size: int | None = None
    size_mb: int | None = None
    gated: bool = False
    note: str = ""
    headers: dict = field(default_factory=dict)


VAR_HOME = "https://huggingface.co/FoundationVision/var/resolve/main"
# MAR's authors publish on Dropbox (util/download.py of the official code); Dropbox
# serves the file itself to a wget-like client.
MAR_HEADERS = {"User-Agent": "Wget/1.16 (linux-gnu)"}
MAR_FILES = {
    "mar-kl16-vae": ("https://www.dropbox.com/scl/fi/hhmuvaiacrarfg28qxhwz/kl16.ckpt"
                     "?rlkey=l44xipsezc8atcffdp4q7mwmh&dl=1", "mar_kl16.ckpt", "model", 254),
    "mar-base": ("https://www.dropbox.com/scl/fi/f6dpuyjb7fudzxcyhvrhk/checkpoint-last.pth"
                 "?rlkey=a6i4bo71vhfo4anp33n9ukujb&dl=1", "mar_base.pth", "model_ema", 1587),
    "mar-large": ("https://www.dropbox.com/scl/fi/pxacc5b2mrt3ifw4cah6k/checkpoint-last.pth"
                  "?rlkey=m48ovo6g7ivcbosrbdaz0ehqt&dl=1", "mar_large.pth", "model_ema", 3650),
    "mar-huge": ("https://www.dropbox.com/scl/fi/1qmfx6fpy3k7j9vcjjs3s/checkpoint-last.pth"
                 "?rlkey=4lae281yzxb406atp32vzc83o&dl=1", "mar_huge.pth", "model_ema", 7191),
}
SD3_FILE = "https://huggingface.co/stabilityai/stable-diffusion-3-medium/resolve/main/sd3_medium.safetensors"

# Published SHA-256 values (see the module docstring for where each comes from).
VAR_SHA256 = {
    "vae_ch160v4096z32.pth": "7c3ec27ae28a3f87055e83211ea8cc8558bd1985d7b51742d074fb4c2fcf186c",
    "var_d16.pth": "4f6151aad91c94e03e224dd7358d8389fa05301c0c291279566998efb54b0ecb",
}

CHECKPOINTS: dict[str, Checkpoint] = {
    "var-vqvae": Checkpoint(f"{VAR_HOME}/vae_ch160v4096z32.pth", "var_vae_ch160v4096z32.pth", size_mb=436,
                            sha256=VAR_SHA256["vae_ch160v4096z32.pth"], size=436_075_834,
                            note="VAR's multi-scale VQ-VAE"),
    **{f"var-d{depth}": Checkpoint(f"{VAR_HOME}/var_d{depth}.pth", f"var_d{depth}.pth", size_mb=size,
                                   sha256=VAR_SHA256.get(f"var_d{depth}.pth"),
                                   note=f"VAR-d{depth}, ImageNet 256")
       for depth, size in [(16, 1250), (20, 2400), (24, 4100), (30, 8000)]},
    **{name: Checkpoint(url, filename, key, size_mb=size, headers=MAR_HEADERS,
                        note="EMA weights" if key == "model_ema" else "MAR's KL-16 VAE")
       for name, (url, filename, key, size) in MAR_FILES.items()},
    "dit-xl-2": Checkpoint("https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt", "DiT-XL-2-256x256.pt",
                           wrapper_key=("ema", None), size_mb=2700, note="DiT-XL/2, ImageNet 256, EMA weights"),
    # DiT decodes its latents with Stable Diffusion's VAE, fine-tuned with EMA (the
    # LDM-format file; the same weights as diffusers' "stabilityai/sd-vae-ft-ema").
    "sd-vae-ft-ema": Checkpoint("https://huggingface.co/stabilityai/sd-vae-ft-ema-original/resolve/main/"
                                "vae-ft-ema-560000-ema-pruned.safetensors", "vae-ft-ema-560000-ema-pruned.safetensors",
                                ignore=("model_ema.", "loss."), size_mb=335, note="the VAE DiT samples with"),
    "sd3-medium-mmdit": Checkpoint(SD3_FILE, "sd3_medium.safetensors", prefix="model.diffusion_model.",
                                   size_mb=4300, gated=True, note="SD3 Medium (licence to accept on Hugging Face)"),
    "sd3-vae": Checkpoint(SD3_FILE, "sd3_medium.safetensors", prefix="first_stage_model.",
                          size_mb=4300, gated=True, note="the VAE inside SD3 Medium's file"),
}


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, or does not fit the model."""


def cache_dir(path: str | Path | None = None) -> Path:
    """The folder for downloaded checkpoints: ``path``, else ``$MINILIB_CACHE``, else ``~/.cache/minilib``."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "minilib")


def checkpoint_info(name: str) -> Checkpoint:
    """The :class:`Checkpoint` of a zoo name; an unknown name lists those that have one."""
    if name not in CHECKPOINTS:
        raise KeyError(f"no published checkpoint is known for {name!r}; these have one: "
                       f"{', '.join(sorted(CHECKPOINTS))}")
    return CHECKPOINTS[name]


def checkpoint_path(name: str, cache: str | Path | None = None) -> Path:
    """Where ``name``'s file is (or will be) in the cache folder."""
    return cache_dir(cache) / checkpoint_info(name).filename


def download_checkpoint(name: str, cache: str | Path | None = None, timeout: float = CONNECT_TIMEOUT) -> Path:
    """The local path of ``name``'s official file, downloading it first if it is not cached.

    A cached file is checked cheaply before use: its first bytes must be a
    checkpoint format and its size the published one (where known). One that
    fails is moved aside to ``<file>.damaged`` (with a warning saying so) and
    downloaded again. A download is checked the same way, plus its SHA-256
    where known, before it is stored; a refused download is deleted.

    Raises:
        DownloadError: offline (``MINILIB_OFFLINE=1``, or the host cannot be
            reached within ``timeout`` seconds), refused (a gated file without a
            token), a wrong checksum or size, not a checkpoint (a web page), or
            a cache folder that cannot be written. The message names the URL and
            the path where a manually downloaded copy can be placed.
    """
    info, path = checkpoint_info(name), checkpoint_path(name, cache)
    if path.is_file():
        problem = _problem_with(path, info)
        if problem is None:
            return path
        damaged = move_aside(path, f"{name}: the cached {path} {problem}", DownloadError)
        warnings.warn(f"{name}: the cached {path} {problem}; moved it to {damaged} (delete it when you "
                      f"like) and fetching the file again", stacklevel=2)
    place = f"download {info.url} yourself and put the file at {path}"
    headers = dict(info.headers)
    if info.gated and not is_offline():
        token = os.environ.get(TOKEN_ENV)
        if not token:
            raise DownloadError(f"{name}: {info.url} is gated: accept the licence on its Hugging Face page, "
                                f"then set {TOKEN_ENV} to an access token; or {place}.")
        headers["Authorization"] = f"Bearer {token}"
    size = f" (about {info.size_mb:,} MB)" if info.size_mb else ""
    if not is_offline():
        print(f"downloading {name}{size} from {info.url}\n  to {path}")

    def must_be_a_checkpoint(downloaded: Path) -> None:
        problem = _problem_with(downloaded, info)
        if problem is not None:
            raise DownloadError(f"{info.url} gave a file that {problem}; it was deleted. Open the URL in a "
                                f"browser to see what the server sends")

    try:
        return download_file(info.url, path, sha256=info.sha256, size=info.size, timeout=timeout,
                             headers=headers, check=must_be_a_checkpoint,
                             folder_hint=f" (set ${CACHE_ENV} to another folder, or pass cache=...)")
    except DownloadError as error:
        raise DownloadError(f"{name}: {error}") from None


def _problem_with(path: Path, info: Checkpoint) -> str | None:
    """Why the file at ``path`` cannot be ``info``'s checkpoint, in words; None if it may be."""
    kind = file_format(path)
    if kind in NOT_A_CHECKPOINT:
        return f"is not a checkpoint (it looks like {NOT_A_CHECKPOINT[kind]})"
    found = path.stat().st_size
    if info.size is not None and found != info.size:
        return f"has {found:,} bytes, but the official file has {info.size:,} (incomplete or another file)"
    return None


def read_state_dict(path: str | Path, wrapper_key: str | tuple[str | None, ...] | None = None,
                    prefix: str = "", ignore: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint file, read without running code from it.

    The format is read from the file's first bytes (:func:`minilib.training.file_format`),
    not from its name, so a safetensors file saved as ``.pt`` still loads.
    Safetensors files are read with safetensors; torch's zip and pickle formats
    with ``torch.load(weights_only=True)``, which only rebuilds tensors and plain
    containers (MAR's files also hold the training ``argparse.Namespace``, which
    is allowed explicitly). Anything else (an HTML error page, a Git LFS
    pointer, text) is reported as not a checkpoint. Then the state dict is
    taken out of ``wrapper_key`` and ``prefix`` is stripped (keys without it are
    dropped), and keys starting with one of ``ignore`` are dropped.

    Raises:
        FileNotFoundError: no file. CheckpointError: not a checkpoint, unreadable
            (damaged), holds non-tensor objects, or lacks the wrapper key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    content = _load_file(path)
    state_dict = _unwrap(content, wrapper_key, path)
    if prefix:
        state_dict = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
        if not state_dict:
            raise CheckpointError(f"{path} has no keys starting with {prefix!r}")
    state_dict = {key: value for key, value in state_dict.items() if not key.startswith(tuple(ignore))}
    not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{path}: entries {not_tensors[:5]} are not tensors; is this a state dict?")
    return state_dict


def _load_file(path: Path):
    kind = file_format(path)
    if kind in NOT_A_CHECKPOINT:
        raise CheckpointError(f"{path} is not a checkpoint: it looks like {NOT_A_CHECKPOINT[kind]}. "
                              f"Delete {path} and download it again.")
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{path} is not a readable safetensors file ({error}); it may be damaged: "
                                  f"delete it and download it again") from None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights_only" not in str(error):
            raise CheckpointError(f"{path} is a damaged PyTorch checkpoint ({str(error)[:200]}): delete it "
                                  f"and download it again") from None
        raise CheckpointError(f"{path} is a PyTorch checkpoint that holds Python objects other than "
                              f"tensors, which weights_only loading refuses to rebuild ({str(error)[:300]}). "
                              f"Only load such a file with torch.load(weights_only=False) if you trust its "
                              f"source") from None
    except Exception as error:  # torch raises many types for a damaged zip or pickle
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: "
                              f"{str(error)[:200]}); it may be damaged or incomplete: delete it and "
                              f"download it again") from None


def _unwrap(content, wrapper_key, path: Path) -> dict:
    if not isinstance(content, dict):
        raise CheckpointError(f"{path} holds a {type(content).__name__}, not a dict of tensors")
    keys = wrapper_key if isinstance(wrapper_key, tuple) else (wrapper_key,)
    for key in keys:
        if key is None:
            return content
        if key in content:
            if not isinstance(content[key], dict):
                raise CheckpointError(f"{path}: entry {key!r} is a {type(content[key]).__name__}, not a state dict")
            return content[key]
    raise CheckpointError(f"{path} has no entry {' or '.join(map(repr, keys))}; its top-level entries are "
                          f"{sorted(content)[:10]}")


def load_official_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """``model.load_state_dict(state_dict, strict=True)`` after a readable check.

    Raises:
        CheckpointError: listing the keys missing from the file, the unexpected
            ones, the shape mismatches and the dtype mismatches (an integer or
            bool tensor for a float weight, ...; :func:`minilib.training.compare_dtypes`),
            so a wrong file or a wrong config is obvious at a glance. A float16
            file for a float32 model is fine: the values are converted.
    """
    report = checkpoint_report(model.state_dict(), state_dict)
    if any(report.values()):
        raise CheckpointError(f"{source} does not fit {type(model).__name__}:\n{format_report(report)}")
    model.load_state_dict(state_dict, strict=True)


def from_pretrained(name: str, device: torch.device | str = "cpu", cache: str | Path | None = None,
                    dtype: torch.dtype | None = None, **build_kwargs) -> nn.Module:
    """The zoo model ``name`` with its official weights, in eval mode.

    Builds the model from :mod:`minilib.zoo`, gets the file
    (:func:`download_checkpoint`), reads it safely (:func:`read_state_dict`) and
    loads it strictly (:func:`load_official_state_dict`); then moves it to
    ``device`` (and ``dtype``, e.g. ``torch.bfloat16`` on a GPU).

    ``build_kwargs`` go to :func:`minilib.zoo.build` for settings that are not
    weights, e.g. ``from_pretrained("var-d16", vae_local=vqvae)`` to give VAR the
    VQ-VAE it samples with.
    """
    from . import zoo

    info = checkpoint_info(name)
    path = download_checkpoint(name, cache)
    state_dict = read_state_dict(path, info.wrapper_key, info.prefix, info.ignore)
    model = zoo.build(name, **build_kwargs)
    load_official_state_dict(model, state_dict, source=str(path))
    return model.to(device=device, dtype=dtype).eval()


def checkpoint_table() -> list[dict]:
    """One row per published checkpoint: zoo name, size, host, note (for the book's tables)."""
    return [dict(name=name, size_mb=info.size_mb, url=info.url, gated=info.gated, note=info.note)
            for name, info in sorted(CHECKPOINTS.items())]
