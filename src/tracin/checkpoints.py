"""Checkpoints: model weights plus the learning rate in force when they were saved.

File format (what :func:`save_checkpoint` writes and :meth:`Checkpoint.discover` reads):

* ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin``: a ``torch.save``'d dict with the weights under
  ``"model_state_dict"`` (``"state_dict"`` is accepted too) and the metadata beside them:
  ``"learning_rate"`` (``"lr"`` is accepted), ``"epoch"``, ``"step"`` and any other plain values.
  A bare state dict (every value a tensor) is accepted as well; it carries no learning rate.
* ``.safetensors``: the weights as tensors, the metadata as strings in the file's header
  (``learning_rate``, ``epoch``, ``step``).

Files are loaded with ``torch.load(..., weights_only=True)``: a file that needs arbitrary
pickled code to load is refused with a :class:`~tracin.errors.CheckpointError`.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch

from .errors import CheckpointError
from .io import write_bytes

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
WEIGHT_KEYS = ("model_state_dict", "state_dict", "model")
PREFIXES = ("module.", "model.", "_orig_mod.")  # DataParallel/DDP, Lightning, torch.compile
LR_KEYS = ("learning_rate", "lr")

PathLike = Union[str, "os.PathLike[str]"]


def _number(value: Any, what: str, kind: type) -> Any:
    """``value`` as a ``kind`` (float or int), or one clear error naming ``what`` was not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str, torch.Tensor)):
        raise CheckpointError(f"{what} is {value!r}, not a number; re-save the checkpoint with a numeric value.")
    try:
        number = kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError, OverflowError):
        raise CheckpointError(f"{what} is {value!r}, not a number; re-save the checkpoint with a numeric value.") from None
    if kind is int and float(value) != number:
        raise CheckpointError(f"{what} is {value!r}, not a whole number; re-save the checkpoint with a whole number.")
    return number


def _optimizer_rate(meta: Mapping[str, Any]) -> Optional[Any]:
    """The learning rate of the first parameter group of a stored optimizer state (PyTorch Lightning's
    ``optimizer_states``, or an ``optimizer_state_dict``), if there is one."""
    states = meta.get("optimizer_states") or ([meta["optimizer_state_dict"]] if isinstance(meta.get("optimizer_state_dict"), Mapping) else [])
    try:
        return states[0]["param_groups"][0]["lr"]
    except (KeyError, IndexError, TypeError):
        return None


def natural_key(text: str) -> list:
    """Sort key that orders ``ckpt_2`` before ``ckpt_10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _read_file(path: Path, trust: bool = False) -> Dict[str, Any]:
    """Load a checkpoint file into a dict: weights only, unless ``trust`` allows pickled code."""
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a weights file; give the weights file in it (or the folder as "
                              "--checkpoint_dir).")
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file {path} does not exist; check the path.")
    if path.suffix == ".safetensors":
        try:
            from safetensors import safe_open
            from safetensors.torch import load_file
        except ImportError as exc:  # pragma: no cover - safetensors is a dependency
            raise CheckpointError("Reading .safetensors needs the safetensors package; pip install safetensors.") from exc
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
        except Exception as exc:
            raise CheckpointError(f"Checkpoint file {path} is not a readable safetensors file ({exc}); re-save it.") from exc
        out: Dict[str, Any] = {"model_state_dict": tensors}
        for key, value in meta.items():
            try:
                out[key] = json.loads(value)
            except (json.JSONDecodeError, TypeError):
                out[key] = value
        return out
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if trust:  # the user vouched for the file: a full load, whose own failure is named
            return _read_pickled(path)
        if "Unsupported global" in text or _pickles_code(path):  # a class or function to import
            raise CheckpointError(
                f"Checkpoint file {path} needs pickled Python code to load, which could run arbitrary code; "
                "tracin only loads weights (torch.load weights_only=True): re-save it as a state dict or .safetensors, "
                "or pass --trust_checkpoint (trust=True) if you trust its source."
            ) from exc
        first = text.splitlines()[0][:120] if text else ""
        why = type(exc).__name__ if not first or "weights_only" in first or first.isdigit() else first  # not torch's advice
        raise CheckpointError(f"Checkpoint file {path} is corrupt or not a PyTorch checkpoint ({why}); re-save it.") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"Checkpoint file {path} holds a {type(obj).__name__}, not a dict of weights; save model.state_dict() instead.")
    return dict(obj)


_IMPORT_OPS = {"GLOBAL", "STACK_GLOBAL", "INST"}  # opcodes that import a class or function


def _pickles_code(path: Path) -> bool:
    """Whether ``path`` is a well-formed pickle (plain, or the data.pkl inside a torch.save zip) that imports a class
    or function: read to its end with pickletools, which executes nothing (text that happens to start like a pickle
    is not well formed, so it is a corrupt file, not pickled code)."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(name) if name else b""
        else:
            data = path.read_bytes()
        ops = [op.name for op, _, _ in pickletools.genops(data)]  # raises unless the whole pickle is well formed
        return any(name in _IMPORT_OPS for name in ops)
    except Exception:  # not a pickle at all: a corrupt file, not pickled code
        return False


def _read_pickled(path: Path) -> Dict[str, Any]:
    """Full pickle load, only for files the user said to trust (it executes code inside the file)."""
    warnings.warn(f"Loading {path} with full pickle (--trust_checkpoint): this runs any code the file contains.", stacklevel=3)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"Checkpoint file {path} could not be unpickled ({exc}); re-save it as a state dict.") from exc
    if isinstance(obj, torch.nn.Module):
        return {"model_state_dict": obj.state_dict()}
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"Checkpoint file {path} holds a {type(obj).__name__}, not a model or a dict of weights.")
    out = dict(obj)
    for key in ("model", "net"):
        if isinstance(out.get(key), torch.nn.Module):
            out["model_state_dict"] = out.pop(key).state_dict()
    return out


def _split_payload(payload: Mapping[str, Any], origin: str) -> "tuple[Dict[str, torch.Tensor], Dict[str, Any]]":
    """Separate the weights from the metadata in a loaded checkpoint dict."""
    for key in WEIGHT_KEYS:
        if key in payload and isinstance(payload[key], Mapping):
            weights = dict(payload[key])
            meta = {k: v for k, v in payload.items() if k != key}
            break
    else:
        if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            weights, meta = dict(payload), {}
        else:
            raise CheckpointError(
                f"Checkpoint {origin} has no weights: expected a state dict or a dict with a 'model_state_dict' entry."
            )
    bad = [k for k, v in weights.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"Checkpoint {origin} has non-tensor entries in its state dict: {bad[:5]}.")
    return weights, meta


@dataclass
class Checkpoint:
    """Model weights at one point of training and the learning rate in force then.

    Args:
        source: a state dict (``{name: tensor}``) or the path of a checkpoint file.
        learning_rate: the step size used around this checkpoint; read from the file when omitted.
        epoch, step: optional bookkeeping, read from the file when omitted.
        name: a label used in messages and manifests (the file name by default).
        trust: allow a file that needs pickled code (a whole pickled model, custom classes) to load.
            Unpickling runs code from the file: only for files from a source you trust.
    """

    source: Union[Mapping[str, torch.Tensor], PathLike]
    learning_rate: Optional[float] = None
    epoch: Optional[int] = None
    step: Optional[int] = None
    name: Optional[str] = None
    metadata: Dict[str, Any] = field(default_factory=dict, repr=False)
    trust: bool = field(default=False, repr=False)
    default_learning_rate: Optional[float] = field(default=None, repr=False)  # for a file that stores no rate
    _weights: Optional[Dict[str, torch.Tensor]] = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.source, Mapping):
            weights, meta = _split_payload(self.source, self.name or "state dict")
            self._weights = weights
            self.name = self.name or "state_dict"
        else:
            path = Path(self.source)
            self.source = path
            self.name = self.name or path.name
            payload = _read_file(path, self.trust)
            weights, meta = _split_payload(payload, str(path))
            self._weights = weights  # kept: loaded once per run, reused for every tile
        self.metadata = {**meta, **self.metadata}
        self._read_metadata(meta)

    def _read_metadata(self, meta: Mapping[str, Any]) -> None:
        """Learning rate, epoch and step from ``meta`` where not given, each checked for its type and range."""
        if self.learning_rate is not None:
            self.metadata.setdefault("learning_rate_source", "given")
        else:
            key = next((k for k in LR_KEYS if meta.get(k) is not None), None)
            stored = meta[key] if key is not None else _optimizer_rate(meta)
            if stored is None and self.default_learning_rate is None:
                raise CheckpointError(
                    f"Checkpoint {self.name} has no learning rate: none is stored under 'learning_rate' and none was given; "
                    "pass learning_rate=... (or --learning_rate)."
                )
            self.metadata["learning_rate_source"] = "file" if stored is not None else "given"
            self.learning_rate = _number(stored if stored is not None else self.default_learning_rate,
                                         f"Checkpoint {self.name}'s stored {key or 'learning rate'}", float)
        rate = _number(self.learning_rate, f"Checkpoint {self.name}'s learning rate", float)
        if not math.isfinite(rate) or rate < 0 or rate >= MAX_LEARNING_RATE:
            raise CheckpointError(f"Checkpoint {self.name} has an invalid learning rate {self.learning_rate}; it must be a "
                                  f"finite, non-negative number below {MAX_LEARNING_RATE:g} (check the stored value, or pass "
                                  "--learning_rate).")
        self.learning_rate = rate
        if self.epoch is None and meta.get("epoch") is not None:
            self.epoch = _number(meta["epoch"], f"Checkpoint {self.name}'s stored epoch", int)
        if self.step is None and meta.get("step") is not None:
            self.step = _number(meta["step"], f"Checkpoint {self.name}'s stored step", int)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The weights ``{name: tensor}`` (on the CPU unless given otherwise)."""
        assert self._weights is not None
        return self._weights

    @classmethod
    def discover(
        cls,
        directory: PathLike,
        pattern: str = "*",
        learning_rate: Optional[float] = None,
        trust: bool = False,
        default_learning_rate: Optional[float] = None,
        weight_files: bool = True,
    ) -> List["Checkpoint"]:
        """All checkpoints in ``directory``: files matching ``pattern``, and Hugging Face Trainer folders.

        Files ending in .pt, .pth, .ckpt (PyTorch Lightning's included), .bin or .safetensors are taken, whatever
        their names; ``checkpoint-N/`` folders with ``model.safetensors`` or ``pytorch_model.bin`` are Hugging Face
        Trainer checkpoints (learning rate from their ``trainer_state.json``), as is any other sub-folder holding them
        (``save_pretrained`` folders). Order: by the stored epoch (or step)
        when every checkpoint has one, else natural order of the names (``ckpt_2`` before ``ckpt_10``). The learning
        rate of each is read from the file (or a stored optimizer state); ``learning_rate`` overrides every file's,
        ``default_learning_rate`` serves only files that store none. ``weight_files=False`` takes the sub-folders alone (a
        ``save_pretrained`` folder whose own weights are the final model, not a checkpoint).
        """
        folder = Path(directory)
        if not folder.is_dir():
            raise CheckpointError(f"Checkpoint directory {folder} does not exist; check --checkpoint_dir.")
        files = [p for p in folder.glob(pattern) if weight_files and p.is_file() and p.suffix in CHECKPOINT_SUFFIXES] + _trainer_folders(folder)
        if not files:
            raise CheckpointError(
                f"No checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)}) matching {pattern!r} in {folder}; train first or fix the path."
            )
        found = [trainer_checkpoint(p, learning_rate, default_learning_rate) if p.is_dir()
                 else cls(p, learning_rate=learning_rate, trust=trust, default_learning_rate=default_learning_rate)
                 for p in sorted(files, key=lambda p: natural_key(p.name))]
        check_one_run(found, f"Checkpoint folder {folder}")
        found = distinct_weights(found)
        for key in ("epoch", "step"):
            if all(getattr(c, key) is not None for c in found):
                return sorted(found, key=lambda c: getattr(c, key))
        return found


MAX_LEARNING_RATE = 1e6  # far above any optimizer's; larger stored values are corrupt and would overflow float32 scores
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _trainer_weights(path: Path) -> Optional[Path]:
    """The weights file of a Hugging Face Trainer ``checkpoint-N/`` folder, or None when ``path`` is not one."""
    return next((path / w for w in HF_WEIGHTS if (path / w).is_file()), None) if path.is_dir() else None


def checkpoint_source(path: PathLike) -> Path:
    """The file :func:`checkpoint_at` reads for ``path``: the weights inside a Trainer folder, else ``path`` itself."""
    path = Path(path)
    return _trainer_weights(path) or path


def checkpoint_at(path: PathLike, trust: bool = False, learning_rate: Optional[float] = None,
                  default_learning_rate: Optional[float] = None) -> "Checkpoint":
    """The checkpoint at ``path``: a weights file, or a Hugging Face Trainer ``checkpoint-N/`` folder (its weights and
    the learning rate its trainer_state.json logged)."""
    path = Path(path)
    if _trainer_weights(path) is not None:
        return trainer_checkpoint(path, learning_rate, default_learning_rate)
    return Checkpoint(path, learning_rate=learning_rate, trust=trust, default_learning_rate=default_learning_rate)


def _trainer_folders(folder: Path) -> List[Path]:
    """Hugging Face checkpoint folders in ``folder``: Trainer ``checkpoint-N/`` folders and any other sub-folder
    holding a model's weights (``save_pretrained`` output, e.g. ``epoch_1/``)."""
    return [p for p in folder.iterdir() if _trainer_weights(p) is not None]


def trainer_checkpoint(path: Path, learning_rate: Optional[float], default: Optional[float]) -> "Checkpoint":
    """A Hugging Face Trainer folder as a :class:`Checkpoint`: its weights (weights-only), the step in its name, and
    the learning rate its ``trainer_state.json`` logged last at or before that step."""
    weights = _trainer_weights(path)
    assert weights is not None, "callers pass Trainer folders"
    step = int(path.name.split("-")[-1]) if path.name.split("-")[-1].isdigit() else None
    rate = learning_rate
    state_file = path / "trainer_state.json"
    if rate is None and state_file.is_file():
        rate = _logged_rate(state_file, step)
    checkpoint = Checkpoint(weights, learning_rate=rate, step=step, name=path.name, default_learning_rate=default)
    if rate is not None and learning_rate is None:
        checkpoint.metadata["learning_rate_source"] = "file"
    return checkpoint


def _logged_rate(state_file: Path, step: Optional[int]) -> Optional[float]:
    """The learning rate a Trainer's ``trainer_state.json`` logged last at or before ``step`` (None when it logged none);
    a file that is not the Trainer's JSON is one clear error."""
    try:
        history = json.loads(state_file.read_text(encoding="utf-8")).get("log_history", [])
    except (ValueError, AttributeError):  # not JSON, not UTF-8, or not an object
        raise CheckpointError(f"{state_file} is not a Trainer state (JSON with a log_history list); restore it or pass "
                              "--learning_rate.") from None
    if not isinstance(history, list):
        raise CheckpointError(f"{state_file}'s log_history is a {type(history).__name__}, not a list; restore it or pass "
                              "--learning_rate.")

    def number(value: Any) -> Optional[float]:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    rate = None
    for entry in history:
        logged = number(entry.get("learning_rate")) if isinstance(entry, dict) else None
        at = number(entry.get("step", 0)) if isinstance(entry, dict) else None
        if logged is not None and (step is None or (at is not None and at <= step)):
            rate = logged  # the last one logged at or before the step
    return rate


def weights_digest(checkpoint: "Checkpoint") -> str:
    """A SHA-256 of a checkpoint's weights (names, dtypes, shapes and values), whatever file format holds them."""
    digest = hashlib.sha256()
    for name, tensor in sorted(checkpoint.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def distinct_weights(checkpoints: List["Checkpoint"]) -> List["Checkpoint"]:
    """``checkpoints`` less copies: one whose weights equal an earlier one's at the same (or an unrecorded) epoch and
    step, such as ``best_model.pt`` beside the epoch file it copies, which would double that checkpoint's share of every
    score. Each drop is warned about; equal weights saved at different epochs are kept (training may not have moved)."""
    seen: Dict[str, List["Checkpoint"]] = {}
    kept = []
    for ck in checkpoints:
        twins = seen.setdefault(weights_digest(ck), [])
        copy_of = next((t for t in twins if all(None in (getattr(t, k), getattr(ck, k)) or getattr(t, k) == getattr(ck, k)
                                                 for k in ("epoch", "step"))), None)
        if copy_of is not None:
            warnings.warn(f"{ck.name} holds the same weights as {copy_of.name}; counting them once.", stacklevel=3)
            continue
        twins.append(ck)
        kept.append(ck)
    return kept


def check_one_run(checkpoints: List["Checkpoint"], where: str) -> None:
    """Refuse checkpoints from different training runs (by the ``run_id`` that ``tracin train`` stores), which
    would be summed as if they were one run."""
    runs: Dict[str, List[str]] = {}
    for ck in checkpoints:
        runs.setdefault(str(ck.metadata.get("run_id", "without a run id")), []).append(str(ck.name))
    if len(runs) > 1 and any("run_id" in ck.metadata for ck in checkpoints):
        listing = "; ".join(f"run {run}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}" for run, names in runs.items())
        raise CheckpointError(f"{where} mixes checkpoints of {len(runs)} training runs ({listing}); keep one run per folder, "
                              "or pass the checkpoint files you mean one by one.")


def save_checkpoint(path: PathLike, state_dict: Mapping[str, torch.Tensor], learning_rate: float, **metadata: Any) -> Path:
    """Write a checkpoint that :class:`Checkpoint` reads back with its learning rate.

    The file is written through :func:`tracin.io.write_bytes` (a fresh temporary file renamed into place),
    so a crash never leaves a half-written checkpoint under the final name and no planted link is followed.
    """
    path = Path(path)
    weights = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        meta = {"learning_rate": json.dumps(float(learning_rate))}
        meta.update({k: json.dumps(v) for k, v in metadata.items()})
        return write_bytes(path, save(weights, metadata=meta))
    buffer = io.BytesIO()
    torch.save({"model_state_dict": weights, "learning_rate": float(learning_rate), **metadata}, buffer)
    return write_bytes(path, buffer.getvalue())


def _unprefixed(weights: Dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``weights`` with a wrapper's prefix removed (``module.`` from DataParallel, ``model.`` from Lightning,
    ``_orig_mod.`` from torch.compile), repeatedly, while the model's own names do not start with it."""
    while weights and not any(k in expected for k in weights):
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in weights)), None)
        if prefix is None:
            break
        weights = {k[len(prefix):]: v for k, v in weights.items()}
    return weights


def _with_tied(weights: Dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``weights`` with the model's tied names filled in: a name the file lacks whose tensor in the model is the same
    storage as a name the file holds (GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``; ``save_pretrained``
    writes one of them) gets that name's weights."""
    by_storage: Dict[tuple, str] = {}
    for name, tensor in expected.items():
        if name in weights and tensor.numel():
            by_storage.setdefault((tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride())), name)
    tied = {}
    for name, tensor in expected.items():
        twin = by_storage.get((tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))) if tensor.numel() else None
        if name not in weights and twin is not None:
            tied[name] = weights[twin]
    return {**weights, **tied} if tied else weights


def weights_for(model: torch.nn.Module, checkpoint: Checkpoint) -> Dict[str, torch.Tensor]:
    """``checkpoint``'s weights checked against ``model``'s state dict (same keys and shapes),
    with a clear error naming the differences.

    A wrapper's prefix (``module.``, ``model.``, ``_orig_mod.``) is stripped when the model's names lack it.
    """
    expected = model.state_dict()
    weights = _with_tied(_unprefixed(checkpoint.state_dict(), expected), expected)
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        def show(keys: List[str]) -> str:
            return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "") if keys else "none"

        raise CheckpointError(
            f"Checkpoint {checkpoint.name} does not match the model: missing keys {show(missing)}; "
            f"unexpected keys {show(unexpected)}. Use checkpoints saved from this architecture."
        )
    wrong = [f"{k} {tuple(v.shape)} vs model {tuple(expected[k].shape)}" for k, v in weights.items() if v.shape != expected[k].shape]
    if wrong:
        raise CheckpointError(
            f"Checkpoint {checkpoint.name} does not match the model's shapes: {'; '.join(wrong[:4])}. "
            "Use checkpoints saved from this architecture."
        )
    broken = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise CheckpointError(f"Checkpoint {checkpoint.name} has NaN or infinite weights in {', '.join(broken[:4])}"
                              f"{' and more' if len(broken) > 4 else ''}; training diverged before it was saved: use an "
                              "earlier checkpoint or retrain with a lower learning rate.")
    return weights
