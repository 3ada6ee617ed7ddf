"""Setting up an image-folder run: the checkpoints of one ``tracin train`` run (with its metadata), or a model the
user trained themselves (:class:`OwnModel`: an architecture, its weights files, a learning rate), the scanned folders
with the classes, and a fresh model."""
from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch

from ...checkpoints import CHECKPOINT_SUFFIXES, Checkpoint, checkpoint_at, checkpoint_source
from ...errors import CheckpointError, TracInError
from .folders import ImageDataset, image_transform, scan_split
from .models import build_model, checkpoint_metadata, normalization
from .train import CHECKPOINT_PATTERN


@dataclass
class ImageSetup:
    """Checkpoints of one `tracin train` run, its metadata, the scanned image folders and a fresh model."""

    checkpoints: List[Checkpoint]
    arch: str
    class_names: List[str]
    image_size: int
    train_split: Any
    test_split: Any
    train: ImageDataset
    test: ImageDataset
    model: torch.nn.Module
    prediction_file: Optional[Path] = None  # the weights whose predictions are reported (None: the run's own choice)


@dataclass
class OwnModel:
    """A model trained outside ``tracin train``: ``arch`` (smallcnn, a torchvision classification model name, or
    ``module:callable`` returning the model, given ``num_classes=`` when it takes it), the weights file used for
    predictions (and as the one checkpoint when no checkpoint folder is given), the learning rate of files that store
    none, the input size, the number of outputs (default: the class folders), and the normalisation (default:
    ImageNet statistics, 0.5 for smallcnn)."""

    arch: str
    model_path: Optional[Path] = None
    learning_rate: Optional[float] = None
    image_size: int = 224
    num_classes: Optional[int] = None
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None


def image_setup(data_dir: Path, checkpoint_dir: Optional[Path], trust: bool = False, own: Optional[OwnModel] = None) -> ImageSetup:
    """Discover the checkpoints, check they come from one run, scan the folders with its classes; with ``own``, the
    user's model and weights files instead (:func:`own_model_setup`)."""
    if own is not None:
        return own_model_setup(data_dir, checkpoint_dir, trust, own)
    if checkpoint_dir is None:
        raise TracInError("Give --checkpoint_dir (checkpoints of 'tracin train'), or --arch and --model_path for a model "
                          "you trained yourself.")
    _from_tracin_train(Path(checkpoint_dir))
    checkpoints = Checkpoint.discover(checkpoint_dir, pattern=CHECKPOINT_PATTERN + ".*", trust=trust)
    arch, class_names, image_size = checkpoint_metadata(checkpoints[-1].metadata, checkpoints[-1].name or "")
    for ck in checkpoints:
        other = checkpoint_metadata(ck.metadata, ck.name or "")
        if other != (arch, class_names, image_size):
            raise CheckpointError(
                f"Checkpoint {ck.name} was trained as {other[0]} on {len(other[1])} classes but {checkpoints[-1].name} as "
                f"{arch} on {len(class_names)}; keep one training run per --checkpoint_dir."
            )
    data_dir = Path(data_dir).resolve()  # paths in the outputs then work from any folder
    train_split, _ = scan_split(data_dir, "train", class_names)
    train_split = without_validation(train_split, data_dir, checkpoints[-1].metadata.get("validation_files", []))
    test_split, _ = scan_split(data_dir, "test", class_names)
    transform = image_transform(image_size, normalization(arch))
    return ImageSetup(checkpoints, arch, class_names, image_size, train_split, test_split,
                      ImageDataset(train_split, transform), ImageDataset(test_split, transform),
                      build_model(arch, len(class_names), image_size))


def _from_tracin_train(folder: Path) -> None:
    """Refuse, with what to add, a folder of weights files that 'tracin train' did not write (a model of the user's)."""
    if not folder.is_dir() or any(folder.glob(CHECKPOINT_PATTERN + ".*")):
        return
    others = sorted(p.name for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES or p.name.startswith("checkpoint-"))
    if others:
        raise TracInError(f"{folder} holds weights files ({', '.join(others[:3])}{' ...' if len(others) > 3 else ''}) but none "
                          "written by 'tracin train'; for a model you trained yourself add --arch (its architecture) and "
                          "--learning_rate if the files store none.")


def without_validation(split, data_dir: Path, validation_files) -> Any:
    """The training split less the images 'tracin train' held out for validation (never trained on, so no
    training example of the run: they are not scored)."""
    held = {str(Path(data_dir) / f) for f in validation_files}
    if not held:
        return split
    keep = [i for i, path in enumerate(split.paths) if str(path) not in held]
    return type(split)([split.paths[i] for i in keep], [split.labels[i] for i in keep], split.skipped)


def own_model_setup(data_dir: Path, checkpoint_dir: Optional[Path], trust: bool, own: OwnModel) -> ImageSetup:
    """The user's model: classes from the training folders, every weights file of ``checkpoint_dir`` (whatever its
    name) or ``own.model_path`` alone as the checkpoints, images resized to ``own.image_size`` and normalised."""
    if checkpoint_dir is None and own.model_path is None:
        raise TracInError("--arch needs --model_path (one model) or --checkpoint_dir (its training checkpoints).")
    data_dir = Path(data_dir).resolve()
    train_split, class_names = scan_split(data_dir, "train")
    test_split, _ = scan_split(data_dir, "test", class_names)
    if own.num_classes is not None and own.num_classes < 1:
        raise TracInError(f"--num_classes must be at least 1 (the model's outputs), got {own.num_classes}.")
    if not 1 <= own.image_size <= 8192:
        raise TracInError(f"--image_size must be between 1 and 8192 pixels (the size the model was trained on), got "
                          f"{own.image_size}.")
    outputs = own.num_classes if own.num_classes is not None else len(class_names)
    if outputs < len(class_names):
        raise TracInError(f"--num_classes {outputs} is fewer than the {len(class_names)} class folders; give at least "
                          f"{len(class_names)}.")
    checkpoints = (Checkpoint.discover(checkpoint_dir, trust=trust, default_learning_rate=own.learning_rate) if checkpoint_dir
                   else [checkpoint_at(own.model_path, trust=trust, default_learning_rate=own.learning_rate)])
    mean, std = normalization(own.arch)
    mean, std = tuple(own.mean or mean), tuple(own.std or std)
    if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(v) for v in mean + std) or not all(s > 0 for s in std):
        raise TracInError("--mean and --std take finite numbers (one, or three: one per colour channel), the std positive.")
    transform = image_transform(own.image_size, (mean, std))
    return ImageSetup(checkpoints, own.arch, class_names, own.image_size, train_split, test_split,
                      ImageDataset(train_split, transform), ImageDataset(test_split, transform),
                      pickled_model(own.model_path) if own.arch == PICKLED else own_model(own.arch, outputs, own.image_size),
                      own.model_path)


PICKLED = "pickled"  # OwnModel.arch of a --model_path that holds the whole model (read with --trust_checkpoint)


def pickled_model(path: Optional[Path]) -> torch.nn.Module:
    """The whole model a trusted ``--model_path`` file holds (an ``nn.Module``, or a dict with one under ``model`` or
    ``net``), used as the architecture; its weights are read again as the checkpoint."""
    assert path is not None
    obj = torch.load(str(checkpoint_source(path)), map_location="cpu", weights_only=False)  # trusted by the caller
    if isinstance(obj, dict):
        obj = next((obj[k] for k in ("model", "net") if isinstance(obj.get(k), torch.nn.Module)), obj)
    if not isinstance(obj, torch.nn.Module):
        raise TracInError(f"--model_path {path} holds weights, not a whole model, so the architecture is unknown; add "
                          "--arch (smallcnn, a torchvision name, or module:callable).")
    return obj


def own_model(arch: str, num_classes: int, image_size: int) -> torch.nn.Module:
    """``arch`` built fresh: ``module:callable`` imports and calls the user's own builder, anything else
    :func:`build_model`."""
    if ":" not in arch:
        return build_model(arch, num_classes, image_size)
    builder = _user_builder(arch)
    takes_classes = "num_classes" in _parameters(builder)
    try:
        model = builder(num_classes=num_classes) if takes_classes else builder()
    except Exception as exc:  # the user's own code: its failure named in one line
        raise TracInError(f"--arch {arch}: building the model failed ({type(exc).__name__}: {exc}).") from None
    if not isinstance(model, torch.nn.Module):
        raise TracInError(f"--arch {arch} returned a {type(model).__name__}, not a torch.nn.Module.")
    return model


def _user_builder(arch: str):
    """The callable ``module:callable`` names. The module is imported with the current folder at the end of the
    import path, for that import only, so it never shadows an installed package (importing it runs its code)."""
    module_name, _, attr = arch.partition(":")
    if not module_name or not attr:
        raise TracInError(f"--arch {arch!r} names no module or no callable; give module:callable, e.g. mymodels:build.")
    added = os.getcwd() not in sys.path
    if added:
        sys.path.append(os.getcwd())
    try:
        builder = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise TracInError(f"--arch {arch}: cannot import {attr} from {module_name} ({exc}); give module:callable of an "
                          "importable module (the current folder is searched after the installed packages).") from None
    finally:
        if added:
            sys.path.remove(os.getcwd())
    if not callable(builder):
        raise TracInError(f"--arch {arch}: {attr} is a {type(builder).__name__}, not a callable that builds the model.")
    return builder


def _parameters(builder) -> Sequence[str]:
    """The names ``builder`` takes (none known for a callable whose signature cannot be read)."""
    try:
        return list(inspect.signature(builder).parameters)
    except (TypeError, ValueError):
        return []


def parse_triple(text: str) -> Tuple[float, float, float]:
    """'0.5,0.5,0.5' -> (0.5, 0.5, 0.5), and one number for all three channels ('0.5'), for --mean and --std."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    values = values * 3 if len(values) == 1 else values
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise TracInError(f"{text!r} is not one or three comma-separated finite numbers (one per colour channel).")
    return values  # type: ignore[return-value]
