"""Range checks that do not stall a GPU.

Checking that integer inputs (labels, timesteps) lie in range needs their
values. On the CPU that is free, and a bad value gets a clear ``ValueError``
naming the range and what was found. On a GPU, reading the values back makes
the host wait for the device to finish its queue; inside a sampling loop that
would happen at every step. There the check is queued on the device instead
(``torch._assert_async``) and fails, a little later, with the same message.
"""

from __future__ import annotations

import torch


def check_range(values: torch.Tensor, low: int, high: int, what: str) -> None:
    """Raise unless every entry of the integer tensor ``values`` lies in ``[low, high]`` (inclusive)."""
    if values.numel() == 0:
        return
    message = f"{what} must lie in [{low}, {high}]"
    if values.device.type == "cpu":
        if values.min() < low or values.max() > high:
            raise ValueError(f"{message}, got min {values.min().item()} max {values.max().item()}")
    else:
        torch._assert_async(((values >= low) & (values <= high)).all(), message)
