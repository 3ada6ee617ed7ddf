"""Device choice and the default memory budget."""
from __future__ import annotations

import os
from typing import Callable, Optional, Union

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


# TF32 (TensorFloat-32: float32 range, 10-bit mantissa in products) is on by default for cuDNN
# convolutions on NVIDIA Ampere and newer GPUs, and matmuls use it when a script has called
# torch.set_float32_matmul_precision("high"). Exact scoring turns it off for its own duration.
_MATH_BACKENDS = (("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"), ("mkldnn", "matmul"), ("mkldnn", "conv"), ("mkldnn", "rnn"))
_TF32_BACKENDS = (("cuda", "matmul"), ("cudnn", "conv"), ("cudnn", "rnn"))


def set_float32_math(mode: Optional[str]) -> Callable[[], None]:
    """Set how float32 matmuls and convolutions run: ``"ieee"`` (full float32 everywhere), ``"tf32"``
    (TensorFloat-32 on CUDA; other backends as they were) or ``None`` (leave the process's settings).
    Returns a function that restores the previous settings exactly.

    Uses the per-backend ``fp32_precision`` settings where torch has them (2.9+), reading and writing
    only those, so the legacy ``allow_tf32`` flags are never mixed in; older torch gets ``allow_tf32``.
    """
    if mode is None:
        return lambda: None
    backends = _MATH_BACKENDS if mode == "ieee" else _TF32_BACKENDS
    targets = []
    for backend, op in backends:
        holder = getattr(getattr(torch.backends, backend, None), op, None)
        if holder is not None and hasattr(holder, "fp32_precision"):
            targets.append(holder)
    if targets:
        attribute, holders = "fp32_precision", targets
        value = mode
    else:  # torch < 2.9
        attribute, holders = "allow_tf32", [torch.backends.cuda.matmul, torch.backends.cudnn]
        value = mode == "tf32"
    saved = [(holder, getattr(holder, attribute)) for holder in holders]
    for holder in holders:
        setattr(holder, attribute, value)

    def restore() -> None:
        for holder, previous in saved:
            setattr(holder, attribute, previous)

    return restore


def cudnn_conv_uses_tf32() -> bool:
    """Whether cuDNN convolutions may use TF32 now (as :func:`set_float32_math` or the process left it)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        value = conv.fp32_precision
        if value == "none":  # inherits cuDNN's, then the generic setting
            value = torch.backends.cudnn.fp32_precision
        return value == "tf32"
    return bool(torch.backends.cudnn.allow_tf32)
