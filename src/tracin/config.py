"""Every scoring setting, declared once.

:class:`ScoringConfig` is the one place a run setting is named, defaulted, documented and checked.
:class:`tracin.TracIn` builds it from its keywords, the engine reads it, the resume fingerprint, the
gradient-store metadata and every manifest record :meth:`ScoringConfig.to_dict`, and the command line
builds its scoring flags from :func:`fields_with_flags` (names, help and choices from here).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple, Union

from .errors import TracInError

LayerSpec = Union[str, int, Sequence[str]]

KERNELS = ("auto", "ghost", "materialize")
NORMALIZE = ("none", "cosine", "train")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
PROJECTIONS = ("gaussian", "rademacher", "sparse")
PRECONDITIONERS = ("auto", "kfac", "none")
LAYER_WORDS = ("all", "last", "output_bias")  # the layer selections that are words (see tracin.engine.scope)
MEASUREMENTS = ("loss", "margin")  # the measurements that are words; a Task or callable may be given instead


def _setting(default: Any, help: str, flag: Optional[str] = None, choices: Optional[Tuple[str, ...]] = None) -> Any:
    """A dataclass field with its command-line spelling (``flag``; None: not a flag of its own), help and choices."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices})


@dataclass(frozen=True)
class ScoringConfig:
    """The settings of a scoring run (what is scored and how), validated on creation.

    The model, checkpoints, task and device are the run's inputs, not settings, and are given to
    :class:`tracin.TracIn` beside it. Every field is documented in its ``help``; ``TracIn``'s
    docstring gives the longer story of each.
    """

    layers: LayerSpec = _setting(
        "all", "last | all | output_bias | N | comma-separated module or parameter names or glob patterns", "--layers")
    exclude: Sequence[str] = _setting(
        (), "comma-separated module or parameter names or glob patterns to leave out of --layers", "--exclude")
    kernel: str = _setting("auto", "auto picks ghost or materialised per layer from its shapes (both exact)", None, KERNELS)
    precision: str = _setting(
        "fp32", "fp32: exact (TF32 off while scoring); tf32: TF32 tensor cores on NVIDIA GPUs; bf16/fp16: autocast "
        "(all approximate, faster on GPUs)", "--precision", PRECISIONS)
    normalize: str = _setting(
        "none", "cosine: unit-length gradients per checkpoint; train: unit-length training gradients", "--normalize", NORMALIZE)
    projection_dim: Optional[int] = _setting(
        None, "project per-example gradients to about this many dimensions per layer (approximate, unbiased)", "--projection_dim")
    projection: str = _setting("gaussian", "kind of random projection (--projection_type is the older spelling)",
                               "--projection", PROJECTIONS)
    sample_rate: Optional[float] = _setting(
        None, "score a seeded random fraction of the training set (approximate)", "--sample_rate")
    stratify_by: Union[str, Callable, None] = _setting(None, "sample each stratum (e.g. label) at --sample_rate", "--stratify_by")
    precondition: str = _setting(
        "auto", "kfac: gradients preconditioned with a K-FAC inverse Fisher fitted per checkpoint (Linear/Conv layers; "
        "exact for it); auto: kfac over the Linear/Conv layers in scope when they hold at least 95%% of its parameters "
        "(the others, e.g. norm layers, are left out), else none; none: plain TracIn (docs/quality.md)",
        "--precondition", PRECONDITIONERS)
    damping: float = _setting(0.1, "K-FAC damping, a fraction of each factor's mean eigenvalue", "--damping")
    measurement: Union[str, Callable, None] = _setting(
        None, "what the test examples' gradients are of: loss (the task's loss, TracIn's own definition; the default) or "
        "margin (minus the classification margin); the library also takes a Task or a callable (model, batch) -> "
        "per-example values, lower is better", "--measurement", MEASUREMENTS)
    memory_budget: Optional[int] = _setting(
        None, "working memory in GiB on the command line, in bytes in the library (default: from free memory)", "--memory_budget")
    batch_size: int = _setting(256, "examples per forward/backward pass", "--batch_size")
    num_workers: int = _setting(0, "DataLoader worker processes (0: load in this process)", "--num_workers")
    seed: int = _setting(0, "seed of projections and sampling", "--seed")
    progress: bool = _setting(True, "progress bars", None)

    def __post_init__(self) -> None:
        for check in (_check_layers, _check_choices, _check_numbers, _check_sampling, _check_measurement):
            check(self)

    @classmethod
    def from_settings(cls, settings: Dict[str, Any]) -> "ScoringConfig":
        """A config from keyword ``settings`` (the :class:`tracin.TracIn` front), refusing a name that is no setting."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise TracInError(f"{unknown[0]!r} is not a scoring setting; the settings are {', '.join(sorted(known))}.")
        return cls(**settings)

    def replace(self, **changes: Any) -> "ScoringConfig":
        """A copy with ``changes`` applied (and validated)."""
        return ScoringConfig(**{**asdict_shallow(self), **changes})

    def to_dict(self) -> Dict[str, Any]:
        """JSON-able settings (a callable ``stratify_by`` by its name), for manifests and fingerprints."""
        out = asdict_shallow(self)
        for name in ("stratify_by", "measurement"):
            if out[name] is not None and not isinstance(out[name], str):
                out[name] = getattr(out[name], "__name__", type(out[name]).__name__)
        out["layers"] = list(out["layers"]) if isinstance(out["layers"], (list, tuple)) else out["layers"]
        out["exclude"] = [out["exclude"]] if isinstance(out["exclude"], str) else list(out["exclude"])
        return out


def asdict_shallow(config: ScoringConfig) -> Dict[str, Any]:
    """{field name: value}, values as they are (``dataclasses.asdict`` would deep-copy a callable's closure)."""
    return {f.name: getattr(config, f.name) for f in fields(config)}


def fields_with_flags() -> Iterator[Tuple[str, str, Dict[str, Any]]]:
    """(field name, command-line flag, {help, choices, default}) of every setting that is a flag."""
    for f in fields(ScoringConfig):
        if f.metadata.get("flag"):
            yield f.name, f.metadata["flag"], {"help": f.metadata["help"], "choices": f.metadata["choices"], "default": f.default}


def _check_layers(c: ScoringConfig) -> None:
    if not isinstance(c.exclude, (str, list, tuple)) or not all(isinstance(e, str) for e in ([c.exclude] if isinstance(c.exclude, str) else c.exclude)):
        raise TracInError(f"exclude={c.exclude!r} must be module or parameter names or glob patterns (strings).")
    layers = c.layers
    if isinstance(layers, bool) or not isinstance(layers, (str, int, list, tuple)):
        raise TracInError(f"layers={layers!r} is not a layer selection; use 'all', 'last', an int N or a list of module names.")


def _check_choices(c: ScoringConfig) -> None:
    for name, allowed in (("kernel", KERNELS), ("precision", PRECISIONS), ("normalize", NORMALIZE),
                          ("projection", PROJECTIONS), ("precondition", PRECONDITIONERS)):
        value = getattr(c, name)
        if value not in allowed:
            raise TracInError(f"{name}={value!r} is not one of {', '.join(allowed)}.")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_numbers(c: ScoringConfig) -> None:
    if not _positive_int(c.batch_size):
        raise TracInError(f"batch_size must be at least 1, got {c.batch_size}.")
    if not isinstance(c.num_workers, int) or c.num_workers < 0:
        raise TracInError(f"num_workers must be 0 (load in this process) or more, got {c.num_workers}.")
    if c.projection_dim is not None and not _positive_int(c.projection_dim):
        raise TracInError(f"projection_dim must be a positive integer, got {c.projection_dim!r}.")
    damping = c.damping
    if not isinstance(damping, (int, float)) or isinstance(damping, bool) or not damping > 0 or math.isinf(damping):
        raise TracInError(f"damping must be a positive number (0.1 is Kronfluence's heuristic), got {damping!r}.")
    budget = c.memory_budget
    if budget is not None and (not isinstance(budget, (int, float)) or not budget > 0 or math.isinf(budget)):
        raise TracInError(f"memory_budget must be a positive, finite number of bytes, got {budget!r}.")


def _check_measurement(c: ScoringConfig) -> None:
    m = c.measurement
    if isinstance(m, str) and m not in MEASUREMENTS:
        raise TracInError(f"measurement={m!r} is not one of {', '.join(MEASUREMENTS)}, a Task or a callable "
                          "(model, batch) -> per-example values.")
    if m is not None and not isinstance(m, str) and not callable(m) and not callable(getattr(m, "loss", None)):
        raise TracInError(f"measurement must be 'loss', 'margin', a Task or a callable (model, batch) -> per-example "
                          f"values, got {type(m).__name__}.")


def _check_sampling(c: ScoringConfig) -> None:
    if c.sample_rate is not None and not (isinstance(c.sample_rate, (int, float)) and 0 < c.sample_rate <= 1):
        raise TracInError(f"sample_rate must be in (0, 1], got {c.sample_rate}.")
    if c.stratify_by is not None and not isinstance(c.stratify_by, str) and not callable(c.stratify_by):
        raise TracInError(f"stratify_by must be a key the task provides (e.g. 'label') or a callable batch -> keys, got {c.stratify_by!r}.")
