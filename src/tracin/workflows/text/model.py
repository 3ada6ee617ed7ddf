"""A user's Hugging Face model, tokenizer and checkpoints, from local folders only (nothing is downloaded).

``--model_dir`` is a ``save_pretrained`` folder or a Trainer output folder (``config.json`` there or in its
``checkpoint-N/`` folders). The checkpoints scored are ``--checkpoint_dir``'s (weights files, ``checkpoint-N/`` or
``save_pretrained`` sub-folders), else the ``checkpoint-N/`` folders inside ``--model_dir``, else the model alone.
Predictions are the model's own weights in ``--model_dir`` when it holds them, else the last checkpoint's.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

from torch import nn

from ...checkpoints import HF_WEIGHTS, Checkpoint, checkpoint_at, natural_key
from ...errors import CheckpointError, DataError, TracInError
from ...tasks.hf import KINDS, causal_name

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model")
ONE_MODEL_RATE = 1.0  # the model alone: one checkpoint, whose rate only scales every score alike


@dataclass
class TextModel:
    """The model to score, its tokenizer, its task kind and classes, and the checkpoints."""

    model: nn.Module
    tokenizer: Any
    kind: str  # "sequence" | "causal_lm"
    label_names: List[str]  # a classifier's classes in output order; empty for a language model
    checkpoints: List[Checkpoint]
    prediction: Checkpoint  # the weights whose predictions are reported
    max_positions: Optional[int]  # the longest input the model takes (its position table), when it has one


def load_text_model(model_dir: Path, checkpoint_dir: Optional[Path], kind: str, learning_rate: Optional[float],
                    trust: bool) -> TextModel:
    """Everything ``tracin text`` scores with, or one clear error naming the folder and the fix."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never reach for the network
    try:
        import transformers
    except ImportError:
        raise TracInError("tracin text needs the transformers package: pip install -e '.[hf]'.") from None
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise DataError(f"--model_dir {model_dir} is not a folder; give the folder save_pretrained or the Trainer wrote.")
    inner = sorted(_weight_folders(model_dir), key=lambda p: natural_key(p.name))
    config_dir = next((d for d in [model_dir] + inner[::-1] if (d / "config.json").is_file()), None)
    if config_dir is None:
        raise DataError(f"--model_dir {model_dir} has no config.json (nor do its checkpoint folders); give the folder "
                        "save_pretrained or the Trainer wrote.")
    config = transformers.AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    kind = _kind(config, kind)
    auto = transformers.AutoModelForCausalLM if kind == "causal_lm" else transformers.AutoModelForSequenceClassification
    try:
        model = auto.from_config(config)
    except ValueError as exc:
        raise DataError(f"The model in {config_dir} is not a {'causal language model' if kind == 'causal_lm' else 'sequence classifier'} "
                        f"({exc}); check --task.") from None
    checkpoints = _checkpoints(model_dir, inner, checkpoint_dir, learning_rate, trust)
    own = next((model_dir / w for w in HF_WEIGHTS if (model_dir / w).is_file()), None)
    prediction = checkpoint_at(own, trust=trust, learning_rate=0.0) if own is not None else checkpoints[-1]
    names = [str(config.id2label.get(i, i)) for i in range(config.num_labels)] if kind == "sequence" else []
    return TextModel(model.eval(), _tokenizer(model_dir, inner), kind, names, checkpoints, prediction,
                     getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None))


def _kind(config: Any, kind: str) -> str:
    """--task: as given, or (auto) a causal language model when the config's architecture is one."""
    if kind not in KINDS or kind == "token":
        raise TracInError(f"--task {kind!r} is not one of auto, sequence, causal_lm.")
    archs = [str(a) for a in getattr(config, "architectures", None) or []]
    found = "causal_lm" if any(causal_name(a) for a in archs) else "sequence" if archs else None
    if kind != "auto" and found is not None and found != kind:
        raise DataError(f"--task {kind}, but the saved model is a {archs[0]} (config.json's architectures), a "
                        f"{'causal language model' if found == 'causal_lm' else 'sequence classifier'}; give --task {found} "
                        "or drop --task.")
    return kind if kind != "auto" else found or "sequence"


def _weight_folders(folder: Path) -> List[Path]:
    return [p for p in folder.iterdir() if p.is_dir() and any((p / w).is_file() for w in HF_WEIGHTS)]


def _checkpoints(model_dir: Path, inner: List[Path], checkpoint_dir: Optional[Path], learning_rate: Optional[float],
                 trust: bool) -> List[Checkpoint]:
    if checkpoint_dir is not None:
        folder = Path(checkpoint_dir)
        # a Trainer output folder: its own model.safetensors is the final model, the checkpoints are its folders
        trainer_output = folder.is_dir() and bool(_weight_folders(folder)) and any((folder / w).is_file() for w in HF_WEIGHTS)
        return Checkpoint.discover(folder, trust=trust, default_learning_rate=learning_rate, weight_files=not trainer_output)
    if inner:
        return Checkpoint.discover(model_dir, trust=trust, default_learning_rate=learning_rate, weight_files=False)
    own = next((model_dir / w for w in HF_WEIGHTS if (model_dir / w).is_file()), None)
    if own is None:
        raise CheckpointError(f"--model_dir {model_dir} holds no weights (model.safetensors or pytorch_model.bin) and no "
                              "checkpoint folders; give --checkpoint_dir.")
    checkpoint = checkpoint_at(own, trust=trust, learning_rate=learning_rate or ONE_MODEL_RATE)
    checkpoint.metadata["learning_rate_source"] = "given" if learning_rate else "assumed (one checkpoint: it scales every score alike)"
    return [checkpoint]


def _tokenizer(model_dir: Path, inner: List[Path]) -> Any:
    """The tokenizer saved in --model_dir, else in its newest checkpoint folder holding one; one clear error when none
    is saved."""
    from transformers import AutoTokenizer

    for folder in [model_dir] + inner[::-1]:
        if any((folder / f).is_file() for f in TOKENIZER_FILES):
            try:
                return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            except (OSError, ValueError) as exc:
                raise DataError(f"The tokenizer in {folder} cannot be loaded ({exc}); save it again with "
                                "tokenizer.save_pretrained.") from None
    raise DataError(f"--model_dir {model_dir} has no tokenizer (tokenizer.json or vocabulary files); save it there with "
                    "tokenizer.save_pretrained(...) or pass processing_class=tokenizer to the Trainer.")
