"""What the evaluations share: data with known label noise, training runs, per-checkpoint scores
of every training image, cross-validated probabilities, and the detection metrics."""
from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ...api import TracIn
from ..image.digits import write_digits_folder
from ..image.folders import ImageDataset, check_augment, image_transform, scan_split
from ..image.noise import inject_label_noise, place
from ..image.shapes import write_shapes_folder
from ...device import resolve_device
from ...errors import DataError, TracInError
from ...io import read_csv
from ...tasks.classification import checkpoint_probabilities, label_losses, predict_proba
from ..image.setup import image_setup
from ..results_dir import ResultsDir
from ...layers.precondition import check_precondition
from ...engine.scope import resolve_layers
from ..image.train import ImageTraining, epoch_learning_rates, train_image_classifier
from ..image.models import build_model, normalization

FRACTIONS = (0.05, 0.10, 0.15, 0.20, 0.30)


@dataclass
class Training(ImageTraining):
    """How every model of an evaluation is trained (the demo's settings, but a checkpoint every epoch; the
    seed is each run's own), where it is trained, and the layers and preconditioning of its self-influence."""

    arch: str = "smallcnn"
    epochs: int = 12
    learning_rate: float = 0.02
    image_size: int = 16
    val_fraction: float = 0.0  # every training image is trained on and scored (the final test accuracy is reported)
    device: str = "auto"
    layers: object = "last"
    precondition: str = "none"

    def __post_init__(self) -> None:
        check_augment(self.augment)
        epoch_learning_rates(self.learning_rate, self.epochs, self.lr_schedule)  # refuses an unknown schedule
        if self.precondition != "none":  # refuse a scope K-FAC does not cover now, not after the first training
            check_precondition(self.precondition, resolve_layers(build_model(self.arch, 2), self.layers))

    def fit(self, data_dir: Path, checkpoint_dir: Path, seed: int, save_every: Optional[int] = None):
        run = replace(self, seed=seed, save_every=save_every if save_every is not None else self.save_every)
        return train_image_classifier(data_dir, checkpoint_dir, run, resolve_device(self.device), progress=False)


def clean_source(data: str, workdir: Path) -> Path:
    """The clean image folder to inject noise into: ``"digits"`` writes scikit-learn's digits,
    ``"shapes"`` a generated folder of five shapes (tracin.workflows.image.shapes); anything else is a folder."""
    if data in ("digits", "shapes"):
        folder = workdir / f"{data}_clean"
        if not (folder / "train").is_dir():
            if data == "digits":
                write_digits_folder(folder, noise_rate=0.0, seed=0)
            else:
                write_shapes_folder(folder)
        return folder
    folder = Path(data)
    if not (folder / "train").is_dir() or not (folder / "test").is_dir():
        raise DataError(f"--data {data} is neither 'digits', 'shapes' nor a folder with train/<class>/ and test/<class>/.")
    return folder


def noisy_copy(source: Path, target: Path, noise_rate: float, seed: int, kind: str, flip_map):
    """Inject noise into a copy; returns the flipped mask [n_train] in the copy's scan order, and the
    copy's (given) training labels [n_train] and class names."""
    if target.exists():
        shutil.rmtree(target)
    records = inject_label_noise(source, target, noise_rate, seed, kind, flip_map)
    split, classes = scan_split(target, "train")
    flipped = {str(target / r["file"]) for r in records}
    return np.array([str(p) in flipped for p in split.paths]), split.labels, classes


def final_test_accuracy(log_csv: Path) -> float:
    """Test accuracy after the last epoch (the best epoch would peek at the test set)."""
    return float(read_csv(log_csv)[-1]["test_accuracy"])


Variant = Tuple[object, str]  # (layers, precondition) of a self-influence score


def variant_key(variant: Variant) -> str:
    """``"last"``, ``"all"``, ... with ``"+kfac"`` appended for a K-FAC-preconditioned score."""
    layers, precondition = variant
    return str(layers) + ("+kfac" if precondition == "kfac" else "")


def per_checkpoint_scores(data_dir: Path, checkpoint_dir: Path, training: Training,
                          also: Sequence[Variant] = ()) -> Dict[str, np.ndarray]:
    """For every checkpoint c: ``self_influence`` [C, n] (lr_c * g_c^T P g_c, exact, over
    ``training.layers`` with P the identity or, with ``training.precondition="kfac"``, K-FAC fitted on
    the training images at c; ``self_influence:<variant_key>`` for each of ``also``) and ``loss`` [C, n]
    (cross-entropy with the given label). Sums over any subset of rows are the scores of that subset
    of checkpoints; ``lr`` [C] and ``epoch`` [C]; ``predicted`` [n] by the last checkpoint."""
    setup = image_setup(data_dir, checkpoint_dir)
    device = resolve_device(training.device)
    main = (training.layers, training.precondition)
    variants = [main] + [v for v in also if variant_key(v) != variant_key(main)]
    self_inf: Dict[str, List[np.ndarray]] = {variant_key(v): [] for v in variants}
    for ck in setup.checkpoints:
        for layers, precondition in variants:
            tr = TracIn(setup.model, [ck], layers=layers, device=device, batch_size=256, progress=False, precondition=precondition)
            self_inf[variant_key((layers, precondition))].append(tr.self_influence(setup.train).numpy())
    labels = setup.train_split.labels
    losses = []
    for probs in checkpoint_probabilities(setup.model, setup.checkpoints, setup.train, device, 256):
        losses.append(label_losses(probs, labels))
    predicted = probs.argmax(1).numpy()  # by the last checkpoint
    extra = {f"self_influence:{variant_key(v)}": np.stack(self_inf[variant_key(v)]) for v in variants[1:]}
    return {"self_influence": np.stack(self_inf[variant_key(main)]), **extra, "loss": np.stack(losses),
            "lr": np.array([ck.learning_rate for ck in setup.checkpoints]),
            "epoch": np.array([ck.epoch or 0 for ck in setup.checkpoints]),
            "predicted": predicted, "labels": np.array(labels)}


@dataclass
class NoisyRun:
    """One seed of an evaluation: the noisy copy, which labels were flipped [n], the training run's
    summary and the per-checkpoint scores of :func:`per_checkpoint_scores`."""

    seed: int
    work: Path
    noisy: Path
    flipped: np.ndarray
    summary: object
    scores: Dict[str, np.ndarray]


def check_folds(labels: Sequence[int], classes: Sequence[str], folds: int, where: Path) -> None:
    """Refuse a cross-validation with fewer than 2 folds, or with a class of fewer training images
    (``labels`` [n] of the folder ``where``) than folds: some fold would hold none of it out, or
    train without it."""
    if folds < 2:
        raise TracInError(f"--cv_folds must be at least 2, got {folds}.")
    counts = np.bincount(np.array(labels, dtype=np.int64), minlength=len(classes))
    if counts.min() < folds:
        c = int(counts.argmin())
        raise DataError(f"Class '{classes[c]}' has {counts[c]} training images in {where}, fewer than --cv_folds {folds}; "
                        "lower --cv_folds, add images or pass --no_cleanlab.")


@dataclass
class Noise:
    """The label noise of an evaluation: the data (digits, shapes or a folder), the rate, the seeds, the kind
    (uniform | asymmetric) and, for asymmetric noise, the class map (None: the default map)."""

    data: str = "digits"
    rate: float = 0.1
    seeds: Sequence[int] = (0,)
    kind: str = "uniform"
    flip_map: Optional[Dict[str, str]] = None


def note(progress: bool, message: str) -> None:
    """One progress line on standard error (long evaluations say what they are doing)."""
    if progress:
        print(f"tracin: {message}", file=sys.stderr, flush=True)


def noisy_runs(setting: Noise, output_dir: Path, training: Training, also: Sequence[Variant] = (),
               cv_folds: Optional[int] = None, require_flips: bool = False, progress: bool = False) -> Iterator[NoisyRun]:
    """For each seed: flip labels in a copy of the data, train with checkpoints, score every training
    image per checkpoint. ``output_dir`` is marked incomplete first; the copies go to ``output_dir/work``.
    With ``cv_folds``, the clean data (and each noisy copy) must allow that many folds (:func:`check_folds`);
    with ``require_flips``, every seed must flip at least one label (else there is nothing to detect)."""
    data, noise_rate, seeds, noise, flip_map = setting.data, setting.rate, setting.seeds, setting.kind, setting.flip_map
    out = Path(output_dir)
    ResultsDir(out).mark_incomplete()
    work = out / "work"
    source = clean_source(data, work)
    if cv_folds is not None:
        split, classes = scan_split(source, "train")
        check_folds(split.labels, classes, cv_folds, source)
    for seed in seeds:
        noisy = work / f"noisy_seed{seed}"
        flipped, labels, classes = noisy_copy(source, noisy, noise_rate, seed, noise, flip_map)
        if require_flips and not flipped.any():
            raise DataError(f"{noise.capitalize()} noise at rate {noise_rate} flipped no label of the {len(flipped)} training "
                            f"images (seed {seed}), so there is nothing to detect; raise --noise_rate.")
        if cv_folds is not None:
            check_folds(labels, classes, cv_folds, noisy)  # the noise moved images between classes
        note(progress, f"seed {seed}: {int(flipped.sum())} of {len(flipped)} labels flipped; training {training.arch} for "
                       f"{training.epochs} epochs")
        summary = training.fit(noisy, noisy / "checkpoints", seed)
        note(progress, f"seed {seed}: scoring self-influence at every checkpoint")
        yield NoisyRun(seed, work, noisy, flipped, summary,
                       per_checkpoint_scores(noisy, noisy / "checkpoints", training, also))


def cross_validated_probabilities(data_dir: Path, workdir: Path, training: Training, folds: int, seed: int) -> np.ndarray:
    """Out-of-fold class probabilities [n_train, classes]: the same architecture trained the same way
    on ``folds - 1`` folds predicts the held-out fold (stratified by the given label)."""

    split, classes = scan_split(data_dir, "train")
    labels = np.array(split.labels)
    rng = np.random.default_rng(seed)
    fold_of = np.empty(len(labels), dtype=int)
    for c in range(len(classes)):
        members = rng.permutation(np.flatnonzero(labels == c))
        fold_of[members] = np.arange(len(members)) % folds
    probs = np.zeros((len(labels), len(classes)))
    for k in range(folds):
        fold_dir = workdir / f"fold{k}"
        if fold_dir.exists():
            shutil.rmtree(fold_dir)
        for i, path in enumerate(split.paths):
            place(Path(path), fold_dir / ("test" if fold_of[i] == k else "train") / classes[labels[i]] / Path(path).name)
        for part in ("train", "test"):
            for c in classes:
                (fold_dir / part / c).mkdir(parents=True, exist_ok=True)
        summary = training.fit(fold_dir, fold_dir / "checkpoints", seed, save_every=training.epochs)
        setup = image_setup(fold_dir, fold_dir / "checkpoints")
        setup.model.load_state_dict(setup.checkpoints[-1].state_dict())
        held = np.flatnonzero(fold_of == k)
        dataset = ImageDataset(type(split)([split.paths[i] for i in held], [split.labels[i] for i in held]),
                               image_transform(training.image_size, normalization(training.arch)))
        probs[held] = predict_proba(setup.model, dataset, resolve_device(training.device), 256).numpy()
        del summary
        shutil.rmtree(fold_dir)
    return probs


def cleanlab_scores(labels: np.ndarray, pred_probs: np.ndarray) -> np.ndarray:
    """1 - cleanlab's label-quality score (self-confidence by default): higher = more suspect."""
    try:
        from cleanlab.rank import get_label_quality_scores
    except ImportError as exc:
        raise DataError("The cleanlab baseline needs cleanlab: pip install cleanlab (or pass --no_cleanlab).") from exc
    return 1.0 - get_label_quality_scores(labels, pred_probs)


def recall_at(scores: np.ndarray, positive: np.ndarray, fractions: Sequence[float] = FRACTIONS) -> Dict[str, float]:
    """Share of the positives among the ``fraction`` highest scores, for each fraction."""
    order = np.argsort(-scores, kind="stable")
    found = np.cumsum(positive[order])
    total = max(1, int(positive.sum()))
    return {f"{int(round(f * 100))}%": float(found[max(0, int(round(f * len(scores))) - 1)] / total) if round(f * len(scores)) else 0.0
            for f in fractions}


def recall_curve(scores: np.ndarray, positive: np.ndarray, points: int = 101) -> np.ndarray:
    """Recall after inspecting 0..100% of the data, at ``points`` evenly spaced fractions."""
    found = np.concatenate([[0], np.cumsum(positive[np.argsort(-scores, kind="stable")])])
    return found[np.round(np.linspace(0, 1, points) * len(scores)).astype(int)] / max(1, int(positive.sum()))


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` separating ``positive`` (Mann-Whitney U, ties averaged)."""
    pos, neg = int(positive.sum()), int((~positive).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


def summarise(values: List[float]) -> Dict[str, float]:
    """Mean, standard deviation, min and max over seeds."""
    a = np.asarray(values, dtype=float)
    return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}
