"""Training: one small loop for every model in the book, EMA, and safe checkpoints.

Each chapter writes only its loss, ``loss_fn(model, batch) -> scalar``, and hands
it to :func:`train`::

    def loss_fn(model, batch):
        images, labels = batch
        return diffusion_loss(model, images, labels)

    history = train(model, loss_fn, infinite_batches(data, 64), steps=cfg.steps,
                    lr=3e-4, ema_decay=0.999)
    plot_curves({"loss": history}, smooth=50)
    sampler_model = history.ema.model      # the averaged weights sample better

Checkpoints are safetensors files (plain tensors, no pickle, nothing executes
when loading), so :func:`load_or_train` lets a chapter load weights instead of
retraining.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from .validation import check_number

# ---------------------------------------------------------------------------
# Exponential moving average of the weights
# ---------------------------------------------------------------------------


class EMA:
    """An exponential moving average of a model's weights, as in DiT, MAR and VAR.

    After every optimiser step, ``update`` moves each averaged parameter a little
    towards the live one::

        ema = decay * ema + (1 - decay) * param

    so the average remembers about ``1 / (1 - decay)`` recent steps (0.9999: the
    last ~10k). Sampling with the averaged weights gives smoother, better images
    than the noisy latest weights.

    Args:
        model: the model being trained; ``self.model`` is a frozen copy of it.
        decay: in [0, 1); 0 copies the live weights at every update.

    Attributes:
        model: the averaged model, in eval mode, ready to sample from.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of ``ema = decay * ema + (1 - decay) * param``; buffers are copied."""
        # named_parameters/named_buffers, not state_dict: non-persistent buffers
        # (fixed position embeddings, say) must be followed too.
        ema_params, ema_buffers = dict(self.model.named_parameters()), dict(self.model.named_buffers())
        live_params, live_buffers = dict(model.named_parameters()), dict(model.named_buffers())
        if ema_params.keys() != live_params.keys() or ema_buffers.keys() != live_buffers.keys():
            raise ValueError("EMA.update got a model with different parameters than the one "
                             "the EMA was made from")
        # ema + (1 - decay) * (param - ema) is the same average; one fused call for all tensors.
        torch._foreach_lerp_([ema_params[name] for name in live_params],
                             [param.detach() for param in live_params.values()], 1 - self.decay)
        for name, buffer in live_buffers.items():
            ema_buffers[name].copy_(buffer)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s weights with the averaged ones."""
        model.load_state_dict(self.model.state_dict())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, with the same keys as the model's state dict."""
        return self.model.state_dict()

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state_dict)


# ---------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------


class History(list):
    """The loss of every step, as a plain list of floats, plus what else train() saw.

    Attributes:
        grad_norms: gradient norm of each step, before clipping.
        learning_rates: learning rate of each step.
        seconds: wall-clock time of the whole run.
        ema: the :class:`EMA` if ``train`` kept one, else None.
    """

    def __init__(self, losses: Iterable[float] = ()):
        super().__init__(losses)
        self.grad_norms: list[float] = []
        self.learning_rates: list[float] = []
        self.seconds = 0.0
        self.ema: EMA | None = None

    def smoothed(self, window: int = 50) -> np.ndarray:
        """Trailing moving average of the losses (see :func:`moving_average`)."""
        return moving_average(self, window)

    def __repr__(self) -> str:
        if not self:
            return "History(no steps)"
        last = self.smoothed(min(50, len(self)))[-1]
        return (f"History({len(self)} steps, first loss {self[0]:.4g}, "
                f"last {last:.4g} (mean of last {min(50, len(self))}), {self.seconds:.1f} s)")


def moving_average(values, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at every position (fewer at the start).

    ``(T,)`` in, ``(T,)`` out, so the smoothed curve lines up with the raw one.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"expected a 1-d sequence of values, got shape {values.shape}")
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    totals = np.cumsum(np.concatenate([[0.0], values]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (totals[ends] - totals[starts]) / (ends - starts)


def clip_gradients(model: nn.Module, max_norm: float | None) -> float:
    """Scale all gradients down together so their global L2 norm is at most ``max_norm``.

    Returns the norm *before* clipping (worth logging: spikes mean trouble).
    ``max_norm=None`` only measures; otherwise it must be a number > 0.
    """
    check_number(max_norm, "max_norm", 0, low_open=True, allow_none=True)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm is None:
        return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item()
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()


def learning_rate_at(step: int, steps: int, lr: float, warmup_steps: int = 0,
                     schedule: str = "constant") -> float:
    """Linear warm-up over ``warmup_steps``, then constant or a cosine decay to 0."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        progress = (step - warmup_steps) / max(1, steps - warmup_steps)
        return lr * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")


def move_to(batch, device: torch.device):
    """Move a tensor, or the tensors inside a tuple/list/dict, to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(item, device) for item in batch)
    if isinstance(batch, dict):
        return {key: move_to(value, device) for key, value in batch.items()}
    return batch


def train(model: nn.Module, loss_fn: Callable, batches: Iterable, steps: int, lr: float = 1e-3,
          weight_decay: float = 0.0, grad_clip: float | None = 1.0,
          ema_decay: float | None = None, device: torch.device | str | None = None,
          log_every: int = 10, progress: bool = True, betas: tuple[float, float] = (0.9, 0.999),
          warmup_steps: int = 0, schedule: str = "constant", seed: int | None = None,
          mixed_precision: bool = True, ema: EMA | None = None) -> History:
    """Train ``model`` for ``steps`` AdamW steps on the loss ``loss_fn(model, batch)``.

    Each step: take the next batch, compute the loss (in bfloat16 autocast on
    CUDA, full precision elsewhere), backpropagate, clip the gradient norm,
    step the optimiser and update the EMA.

    Args:
        model: the network; moved to ``device`` if given, else trained where it is.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        batches: an iterator of batches (e.g. :func:`minilib.datasets.infinite_batches`);
            it must yield at least ``steps`` batches. Batches are moved to the device.
        steps: number of optimiser steps.
        lr, weight_decay, betas: AdamW settings.
        grad_clip: max global gradient norm, a number > 0, or None for no clipping.
            (0 would stop learning and a negative norm would flip the gradient's
            direction, so both are refused, as is NaN.)
        ema_decay: keep an :class:`EMA` of the weights with this decay (e.g. 0.999),
            or pass an existing ``ema`` to continue it.
        log_every: refresh the progress bar's loss every this many steps.
        progress: show a tqdm progress bar.
        warmup_steps, schedule: learning-rate schedule, see :func:`learning_rate_at`.
        seed: if given, seeds torch first, so a CPU run is exactly repeatable.
        mixed_precision: use bf16 autocast when on CUDA.

    Returns:
        a :class:`History`: the list of per-step losses, with ``.ema`` (the EMA or
        None), ``.grad_norms``, ``.learning_rates`` and ``.seconds``.
    """
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every must be a positive int, got {log_every!r}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {loss_fn!r}")
    check_number(lr, "lr (the learning rate)", 0, low_open=True)
    check_number(weight_decay, "weight_decay", 0)
    check_number(grad_clip, "grad_clip (the largest gradient norm; None: no clipping)", 0,
                 low_open=True, allow_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    if device is not None:
        model.to(device)
    parameters = list(model.parameters())
    if not parameters:
        raise ValueError(f"{type(model).__name__} has no parameters to train")
    device = parameters[0].device
    if ema is None and ema_decay is not None:
        ema = EMA(model, ema_decay)
    # The fused kernel updates every tensor in one pass (the default loops over them in Python).
    optimizer = torch.optim.AdamW(parameters, lr=lr, betas=betas, weight_decay=weight_decay,
                                  fused=device.type in ("cpu", "cuda"))
    use_bf16 = mixed_precision and device.type == "cuda"

    history = History()
    history.ema = ema
    batches = iter(batches)
    was_training = model.training
    model.train()
    start = time.perf_counter()
    bar = _progress_bar(steps, progress)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, steps, lr, warmup_steps, schedule)
        batch = move_to(_next_batch(batches, step, steps), device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = loss_fn(model, batch)
        _check_loss(loss, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = clip_gradients(model, grad_clip)
        optimizer.step()
        if ema is not None:
            ema.update(model)

        history.append(loss.item())
        history.grad_norms.append(grad_norm)
        history.learning_rates.append(optimizer.param_groups[0]["lr"])
        if bar is not None:
            bar.update(1)
            if (step + 1) % log_every == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{np.mean(history[-log_every:]):.4f}")
    if bar is not None:
        bar.close()
    history.seconds = time.perf_counter() - start
    model.train(was_training)
    return history


def _progress_bar(steps: int, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=steps, desc="training", unit="step")


def _next_batch(batches, step: int, steps: int):
    try:
        return next(batches)
    except StopIteration:
        raise ValueError(f"batches ran out after {step} of {steps} steps; pass an endless "
                         f"iterator such as infinite_batches(...)") from None


def _check_loss(loss, step: int) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError(f"loss_fn must return a scalar tensor, got {_describe(loss)}")
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the loss became {loss.item()} at step {step}; try a lower "
                                 f"learning rate or gradient clipping")


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}"
    return f"a {type(x).__name__}"


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------


def save_checkpoint(path: str | Path, model: nn.Module, **metadata) -> Path:
    """Save ``model``'s weights to a safetensors file, with JSON metadata.

    The file is written under a temporary name in the same folder and then
    renamed to ``path`` (``os.replace``, atomic), whatever safetensors version
    is installed: an interrupted save (a full disk, a killed kernel) leaves the
    previous checkpoint, or nothing, at ``path``, never a truncated file.

    Args:
        path: file to write (parent folders are created), usually ``*.safetensors``.
        model: its ``state_dict()`` is saved.
        **metadata: JSON-serialisable values (numbers, strings, lists, dicts), e.g.
            ``steps=2000, config=dict(width=128)``. Each is stored as a JSON string
            in the file's header and comes back from :func:`load_checkpoint`.
    """
    from safetensors.torch import save_file

    path = Path(path)
    header = {}
    for key, value in metadata.items():
        try:
            header[key] = json.dumps(value)
        except TypeError:
            raise TypeError(f"metadata {key!r} must be JSON-serialisable (numbers, strings, "
                            f"lists, dicts), got a {type(value).__name__}") from None
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict entry {name!r} is a {type(tensor).__name__}, not a "
                            f"tensor; safetensors can only store tensors")
        tensor = tensor.detach().cpu().contiguous()
        # safetensors refuses tensors sharing memory (tied weights): store a copy of each repeat.
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        tensors[name] = tensor
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(tensors, temporary, metadata=header)
        with open(temporary, "rb") as written:    # on disk before the rename makes it visible
            os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path


# What the first bytes of a file say it is. Checkpoints come as safetensors
# (8-byte little-endian header length, then a JSON header starting with "{"),
# zip archives (torch.save's format since PyTorch 1.6) or bare pickles (older
# torch.save files start with the pickle protocol marker 0x80 and a version).
NOT_A_CHECKPOINT = {
    "html": "an HTML page (an error or login page saved in place of the file?)",
    "git-lfs-pointer": "a Git LFS pointer (a small text file that stands for the real one)",
    "text": "a text file",
    "gzip": "a gzip archive",
    "empty": "an empty file",
    "unknown": "no checkpoint format known to minilib",
}


def file_format(path: str | Path) -> str:
    """What a file holds, judged by its first bytes, never by its name.

    Returns one of ``"safetensors"``, ``"torch-zip"`` (``torch.save``),
    ``"pickle"`` (the older ``torch.save`` format), or a kind that is not a
    checkpoint at all: ``"html"``, ``"git-lfs-pointer"``, ``"text"``,
    ``"gzip"``, ``"empty"`` or ``"unknown"`` (see :data:`NOT_A_CHECKPOINT`).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(1024)
    if not head:
        return "empty"
    if len(head) > 9:
        header_length = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" and 8 + header_length <= size:
            return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in text:
        return "html"
    if text.startswith(b"version https://git-lfs"):
        return "git-lfs-pointer"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:    # not just a character cut off at the end of the 1 KB
            return "unknown"
    return "text"


def move_aside(path: Path, problem: str, error_type: type[Exception] = ValueError) -> Path:
    """Rename a damaged file to ``<name>.damaged``, kept for a look but never read again; return that path.

    ``problem`` says what is wrong with it (it starts the error message if the file
    cannot be moved, which then tells the reader to delete it by hand).
    """
    damaged = path.with_name(path.name + ".damaged")
    try:
        os.replace(path, damaged)
    except OSError as error:
        raise error_type(f"{problem}, and it could not be moved aside ({error.strerror or error}): "
                         f"delete {path} and try again") from None
    return damaged


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the decoded metadata of a checkpoint file, on the CPU.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a readable safetensors file; the message says
            what it looks like instead (an HTML page, a torch.save file, ...).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    kind = file_format(path)
    if kind != "safetensors":
        what = NOT_A_CHECKPOINT.get(kind, f"a {kind} file (torch.save), not safetensors")
        raise ValueError(f"{path} is not a readable safetensors checkpoint: it looks like {what}")
    try:
        tensors = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{path} is not a readable safetensors checkpoint: {error}; it may be "
                         f"damaged or incomplete") from None
    metadata = {}
    for key, text in header.items():
        try:
            metadata[key] = json.loads(text)
        except json.JSONDecodeError:    # written by another tool: keep the raw string
            metadata[key] = text
    return tensors, metadata


def compare_state_dicts(expected: dict[str, torch.Tensor],
                        found: dict[str, torch.Tensor]) -> dict[str, list]:
    """What differs between a model's state dict and a checkpoint's tensors.

    Returns:
        ``{"missing": keys the model has but the checkpoint lacks,
        "unexpected": keys the checkpoint has but the model lacks,
        "shape_mismatch": (key, model shape, checkpoint shape) triples}``.
        (:func:`checkpoint_report` adds the dtype check.)
    """
    return {
        "missing": sorted(expected.keys() - found.keys()),
        "unexpected": sorted(found.keys() - expected.keys()),
        "shape_mismatch": sorted((key, tuple(expected[key].shape), tuple(found[key].shape))
                                 for key in expected.keys() & found.keys()
                                 if expected[key].shape != found[key].shape),
    }


def dtype_kind(dtype: torch.dtype) -> str:
    """``"bool"``, ``"integer"``, ``"floating"`` or ``"complex"``."""
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating"
    return "integer"


def compare_dtypes(expected: dict[str, torch.Tensor],
                   found: dict[str, torch.Tensor]) -> list[tuple[str, torch.dtype, torch.dtype]]:
    """``(key, model dtype, checkpoint dtype)`` for the common keys whose kinds of number differ.

    ``load_state_dict`` copies values into the model's tensors and converts
    them silently: integer or bool tensors into float weights, floats into
    integer buffers (truncated). Such a pair means the file does not hold what
    the model expects, so it is reported. A different *precision* of the same
    kind (a float16 file into a float32 model, as SD3's official file is, or
    int32 into int64) is an exact or rounding conversion and is allowed.
    """
    return sorted((key, expected[key].dtype, found[key].dtype)
                  for key in expected.keys() & found.keys()
                  if dtype_kind(expected[key].dtype) != dtype_kind(found[key].dtype))


def checkpoint_report(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> dict[str, list]:
    """:func:`compare_state_dicts` plus ``"dtype_mismatch"`` (:func:`compare_dtypes`): every check before loading."""
    return {**compare_state_dicts(expected, found), "dtype_mismatch": compare_dtypes(expected, found)}


def format_report(report: dict[str, list], limit: int = 20) -> str:
    """A readable list of a :func:`checkpoint_report` (or :func:`compare_state_dicts`), ``limit`` lines per kind."""
    lines = []
    titles = {"missing": "missing from the checkpoint (the model has them)",
              "unexpected": "unexpected in the checkpoint (the model lacks them)",
              "shape_mismatch": "shape mismatches (model vs checkpoint)",
              "dtype_mismatch": "dtype mismatches (model vs checkpoint; loading would convert "
                                "the values silently)"}
    for kind, title in titles.items():
        entries = report.get(kind, [])
        if not entries:
            continue
        lines.append(f"{len(entries)} key(s) {title}:")
        for entry in entries[:limit]:
            if kind == "shape_mismatch":
                key, model_shape, file_shape = entry
                entry = f"{key}: model {model_shape}, checkpoint {file_shape}"
            elif kind == "dtype_mismatch":
                key, model_dtype, file_dtype = entry
                entry = f"{key}: model {model_dtype}, checkpoint {file_dtype}"
            lines.append(f"    {entry}")
        if len(entries) > limit:
            lines.append(f"    ... and {len(entries) - limit} more")
    return "\n".join(lines)


def load_checkpoint(path: str | Path, model: nn.Module, strict: bool = True) -> dict:
    """Load a :func:`save_checkpoint` file into ``model``; return its metadata.

    Before touching the model, the checkpoint's keys, shapes and dtypes are
    compared with the model's (:func:`checkpoint_report`). Shape and dtype
    mismatches (e.g. an integer tensor for a float weight) are always an error.
    Missing or unexpected keys are an error when ``strict`` (the default);
    otherwise they are printed and the matching tensors are loaded.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a safetensors file, or the report lists problems.
    """
    tensors, metadata = read_checkpoint(path)
    report = checkpoint_report(model.state_dict(), tensors)
    problems = (report["shape_mismatch"] or report["dtype_mismatch"]
                or (strict and (report["missing"] or report["unexpected"])))
    if problems:
        raise ValueError(f"checkpoint {path} does not fit {type(model).__name__}:\n"
                         + format_report(report)
                         + ("" if not strict else "\n(strict=False loads the matching keys)"))
    if report["missing"] or report["unexpected"]:
        print(f"loading {path} with strict=False:\n{format_report(report)}")
    with torch.no_grad():
        model.load_state_dict(tensors, strict=False)
    return metadata


def load_or_train(path: str | Path, model: nn.Module, train_fn: Callable[[], object],
                  **metadata):
    """Load ``model`` from ``path`` if the checkpoint exists, else train it and save.

    This lets a chapter skip a long training run when a checkpoint is at hand
    (delete the file to retrain). If ``train_fn()`` returns a :class:`History`,
    its losses are saved with the weights and a History is returned either way,
    so the loss curve can still be drawn after loading.

    What happens when something is wrong:

    - **A damaged file** (not a readable safetensors file: truncated, an HTML
      page, ...) is moved aside to ``<path>.damaged`` with a warning, and the
      model is trained and saved anew: nothing is lost, and the notebook goes on.
    - **A readable file that does not fit the model** (the settings changed
      since it was saved) is an error that lists the differences and says to
      delete the file (or use another path) to retrain.
    - **A folder that cannot be written** (read-only, full): the trained weights
      are saved in a fallback folder under the system's temporary folder
      instead, with a warning naming the file, so a finished run is never lost.

    Args:
        path: the checkpoint file.
        model: the model that ``train_fn`` trains (in place).
        train_fn: trains ``model``, e.g. ``lambda: train(model, loss_fn, batches, steps)``.
            If it keeps an EMA and you want the averaged weights saved, have it
            copy them into ``model`` before returning.
        **metadata: JSON-serialisable values saved with the weights.

    Returns:
        whatever ``train_fn`` returned, or, after loading, the saved History (or
        None if none was saved).
    """
    path = Path(path)
    if path.is_file():
        try:
            tensors, saved = read_checkpoint(path)
        except ValueError as error:
            damaged = move_aside(path, str(error))
            warnings.warn(f"{error}.\nMoved it to {damaged} and training again.", stacklevel=2)
        else:
            _load_fitting(path, model, tensors)
            print(f"loaded {path} instead of training (delete the file to retrain)")
            if "history" not in saved:
                return None
            history = History(saved["history"]["losses"])
            history.seconds = saved["history"].get("seconds", 0.0)
            return history
    result = train_fn()
    if isinstance(result, History):
        metadata["history"] = {"losses": list(result), "seconds": result.seconds}
    try:
        save_checkpoint(path, model, **metadata)
        print(f"saved {path}")
    except OSError as error:
        fallback = Path(tempfile.gettempdir()) / "minilib-checkpoints" / path.name
        save_checkpoint(fallback, model, **metadata)
        warnings.warn(f"could not save {path} ({error.strerror or error}); the trained weights are in "
                      f"{fallback} instead. Copy that file to a folder you can write to, or pass "
                      f"another path.", stacklevel=2)
    return result


def _load_fitting(path: Path, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load ``tensors`` strictly, or raise saying how to retrain."""
    report = checkpoint_report(model.state_dict(), tensors)
    if any(report.values()):
        raise ValueError(f"checkpoint {path} does not fit {type(model).__name__} (were the settings "
                         f"changed since it was saved?):\n{format_report(report)}\nDelete {path} "
                         f"(or pass another path) to train again with the current settings.")
    with torch.no_grad():
        model.load_state_dict(tensors, strict=True)
