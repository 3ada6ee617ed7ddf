"""Device choice and the default memory budget."""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

from .errors import TracInError


def resolve_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """Return a concrete device; ``"auto"`` picks cuda, then mps, then cpu."""
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise TracInError(f"Unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TracInError(f"Device {device!r} was asked for but CUDA is not available here; use --device cpu or auto.")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TracInError(f"Device {device!r} was asked for but MPS is not available here; use --device cpu or auto.")
    return dev


def available_memory(device: torch.device) -> int:
    """Bytes free on ``device`` now (host RAM for cpu/mps); a conservative guess where unknown."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def default_memory_budget(device: torch.device, budget: Optional[int] = None) -> int:
    """The working-memory budget in bytes: ``budget`` if given, else half the free memory
    (a quarter on host memory, which other programs share), capped at 16 GiB on the host."""
    if budget is not None:
        if budget <= 0:
            raise TracInError(f"memory_budget must be a positive number of bytes, got {budget}.")
        return int(budget)
    free = available_memory(device)
    if device.type == "cuda":
        return free // 2
    return min(free // 4, 16 * 2**30)
