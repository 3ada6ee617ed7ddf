"""Image classifier architectures for the image workflow, built without downloading anything."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ...errors import CheckpointError, TracInError

class SmallCNN(nn.Module):
    """Two conv blocks (conv, batch norm, ReLU, max-pool), global pooling to 4x4, two linear layers."""

    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def torchvision_classifiers() -> List[str]:
    """The names of torchvision's image-classification models (``torchvision.models.get_model`` builds them)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def build_model(arch: str, num_classes: int, image_size: int = 224) -> nn.Module:
    """A freshly initialised ``arch`` with ``num_classes`` outputs (no weights are downloaded): ``smallcnn`` or any
    torchvision classification model by name; vision transformers are built for ``image_size`` pixels."""
    if num_classes < 2:
        raise TracInError(f"A classifier needs at least 2 classes, found {num_classes}; add class folders.")
    if arch == "smallcnn":
        return SmallCNN(num_classes)
    names = torchvision_classifiers()
    if arch not in names:
        timm_model = _timm_model(arch, num_classes, image_size)
        if timm_model is not None:
            return timm_model
        raise TracInError(f"Unknown architecture {arch!r}; choose smallcnn, a torchvision classification model "
                          f"({', '.join(n for n in names if n in ('resnet18', 'resnet50', 'vit_b_16', 'efficientnet_b0'))}, ...) "
                          "or, with timm installed, a timm model name.")
    import torchvision

    extra = {"image_size": image_size} if arch.startswith("vit_") else {}
    try:
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **extra)
    except (AssertionError, ValueError) as exc:
        reason = str(exc) or "a size it does not accept"
        raise TracInError(f"torchvision cannot build {arch} for {image_size}-pixel images ({reason}); choose an "
                          "--image_size it accepts (a multiple of a ViT's patch size).") from None


def _timm_model(arch: str, num_classes: int, image_size: int) -> Optional[nn.Module]:
    """``arch`` from timm (no pretrained weights) when timm is installed and knows the name, else None."""
    try:
        import timm
    except ImportError:
        return None
    if arch not in timm.list_models():
        return None
    extra = {"img_size": image_size} if "vit" in arch or "deit" in arch else {}
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, **extra)
    except (TypeError, AssertionError, ValueError) as exc:
        raise TracInError(f"timm cannot build {arch} for {image_size}-pixel images ({exc}); choose another --image_size.") from None


def load_pretrained(model: nn.Module, path: Path) -> Tuple[List[str], List[str]]:
    """Copy weights from a local file into ``model`` where names and shapes match (the classifier
    head of an ImageNet model is skipped when the class count differs). Returns (loaded, skipped)."""
    from ...checkpoints import Checkpoint

    try:
        source = Checkpoint(path, learning_rate=0.0).state_dict()
    except CheckpointError as exc:
        if "--trust_checkpoint" not in str(exc):
            raise
        raise CheckpointError(f"Pretrained file {path} needs pickled Python code to load, and tracin train reads weights "
                              "only; re-save it as model.state_dict() or .safetensors.") from None
    target = model.state_dict()
    loaded = [k for k, v in source.items() if k in target and target[k].shape == v.shape]
    skipped = [k for k in source if k not in loaded]
    if not loaded:
        raise CheckpointError(f"Pretrained file {path} shares no weights with this architecture; check --arch.")
    model.load_state_dict({**target, **{k: source[k] for k in loaded}})
    return loaded, skipped


def normalization(arch: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel (mean, std): ImageNet statistics for ResNets, 0.5 for the small CNN."""
    if arch == "smallcnn":
        return (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    from .folders import IMAGENET_MEAN, IMAGENET_STD

    return IMAGENET_MEAN, IMAGENET_STD


def checkpoint_metadata(meta: Dict[str, object], name: str) -> Tuple[str, List[str], int]:
    """(arch, class names, image size) stored in an image-workflow checkpoint."""
    missing = [k for k in ("arch", "class_names", "image_size") if k not in meta]
    if missing:
        raise CheckpointError(
            f"Checkpoint {name} lacks {missing}; it was not written by 'tracin train' (use the Python API for other checkpoints)."
        )
    names, size = meta["class_names"], meta["image_size"]
    if not isinstance(names, (list, tuple)) or not names or isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise CheckpointError(f"Checkpoint {name} stores class_names {str(names)[:60]!r} and image_size {size!r}; it needs a "
                              "non-empty list of class names and a whole number of pixels: re-save it with 'tracin train'.")
    return str(meta["arch"]), [str(c) for c in names], size
