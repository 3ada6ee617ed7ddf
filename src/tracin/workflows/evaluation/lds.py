"""The linear datamodeling score (LDS; Park et al. 2023, the TRAK paper's protocol, also dattri's and kronfluence's):
how well an attribution method predicts what retraining on a subset of the training data does.

``subsets`` random halves of the training set are each retrained from scratch with ``seeds`` seeds (all at once
with ``torch.func``: stacked parameters and vmap); a test example's target on a half is its margin (true logit minus
the logsumexp of the others) averaged over the seeds. A method's LDS for a test example is the Spearman
correlation, over the halves, between the sum of its scores over the half's examples and that target; the table
gives the mean over the test examples, a 95% bootstrap interval and the scoring seconds.

The attributed model is one full training run with a checkpoint per epoch (optimizer state included); every
method scores it in the same process on the same data. The retrained targets are cached (an ``.npz`` of numbers
keyed by the setting), so methods can be added without retraining.

    from tracin.workflows.evaluation.lds import LDSSetting, evaluate
    rows = evaluate(LDSSetting(data="digits", model="mlp"), {"plain": {"precondition": "none"}}, cache_dir="lds_cache")
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import TensorDataset

from ...api import TracIn
from ...checkpoints import Checkpoint
from ...engine.inrun import InRun
from ...errors import DataError, TracInError
from ...tasks.classification import class_margin
from ...io import write_bytes, write_csv

Tensors = Tuple[torch.Tensor, torch.Tensor]  # inputs [N, ...], labels [N]
DATA = ("digits", "mnist1d")
MODELS = ("mlp", "cnn")
OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class LDSSetting:
    """One LDS setting: the data, the model, how every model is trained and how many retrainings are averaged."""

    data: str = "digits"
    model: str = "mlp"
    optimizer: str = "sgd"  # sgd: momentum 0.9; adamw: torch's defaults (weight decay 0.01)
    epochs: int = 20
    learning_rate: Optional[float] = None  # None: 0.05 for sgd, 0.003 for adamw
    batch_size: int = 64
    subsets: int = 100
    seeds: int = 3
    n_test: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        for name, allowed in (("data", DATA), ("model", MODELS), ("optimizer", OPTIMIZERS)):
            if getattr(self, name) not in allowed:
                raise TracInError(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}.")
        for name in ("epochs", "batch_size", "subsets", "seeds", "n_test"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (2 if name == "subsets" else 1):
                raise TracInError(f"{name} must be a positive integer (subsets at least 2), got {getattr(self, name)!r}.")
        if self.learning_rate is not None and not (0 < self.learning_rate < float("inf")):
            raise TracInError(f"--learning_rate must be a positive number, got {self.learning_rate}.")

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else (0.05 if self.optimizer == "sgd" else 0.003)

    def key(self) -> str:
        """A short hash of every field that changes the retrained targets."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def load_data(setting: LDSSetting) -> Tuple[Tensors, Tensors]:
    """(train, test) tensors: digits (scikit-learn, 1,200 train) or mnist1d (generated offline, 4,000 train);
    inputs shaped for the model ([N, 1, 8, 8] or [N, 1, 40] for a CNN); the first ``n_test`` test examples."""
    if setting.data == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
        y = torch.tensor(digits.target)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(setting.seed))
        x, y = x[order], y[order]
        train, test = (x[:1200], y[:1200]), (x[1200:], y[1200:])
        shape: Tuple[int, ...] = (1, 8, 8)
    else:
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError:
            raise DataError("data='mnist1d' needs the mnist1d package (it generates the data offline): pip install mnist1d.") from None
        raw = make_dataset(get_dataset_args())
        train = (torch.tensor(raw["x"], dtype=torch.float32), torch.tensor(raw["y"]).long())
        test = (torch.tensor(raw["x_test"], dtype=torch.float32), torch.tensor(raw["y_test"]).long())
        shape = (1, 40)
    if setting.model == "cnn":
        train, test = (train[0].view(-1, *shape), train[1]), (test[0].view(-1, *shape), test[1])
    if setting.n_test > len(test[0]):
        raise TracInError(f"--n_test {setting.n_test} is more than the {len(test[0])} test examples of {setting.data}; "
                          f"use --n_test {len(test[0])} or less.")
    return train, (test[0][: setting.n_test], test[1][: setting.n_test])


def model_factory(setting: LDSSetting) -> Callable[[], nn.Module]:
    """A builder of the setting's model: an MLP (digits 64-128-10, mnist1d 40-100-100-10) or a small CNN without
    normalisation layers (two conv-ReLU-pool blocks and two linear layers; 2-D on digits, 1-D on mnist1d)."""
    if setting.model == "mlp":
        if setting.data == "digits":
            return lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        return lambda: nn.Sequential(nn.Linear(40, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
    conv, pool, flat = (nn.Conv2d, nn.MaxPool2d, 32 * 2 * 2) if setting.data == "digits" else (nn.Conv1d, nn.MaxPool1d, 32 * 10)
    k = 3 if setting.data == "digits" else 5
    return lambda: nn.Sequential(conv(1, 16, k, padding=k // 2), nn.ReLU(), pool(2), conv(16, 32, k, padding=k // 2), nn.ReLU(), pool(2),
                                 nn.Flatten(), nn.Linear(flat, 64), nn.ReLU(), nn.Linear(64, 10))


def _optimizer(setting: LDSSetting, params) -> torch.optim.Optimizer:
    if setting.optimizer == "sgd":
        return torch.optim.SGD(params, lr=setting.lr, momentum=0.9)
    return torch.optim.AdamW(params, lr=setting.lr)


def train_full(setting: LDSSetting, build: Callable[[], nn.Module], train: Tensors, in_run_queries: Optional[Tensors] = None,
               precondition: str = "none") -> Tuple[nn.Module, List[Checkpoint], Optional[torch.Tensor]]:
    """The attributed run on the whole training set: a checkpoint (weights, learning rate, optimizer state) per epoch;
    with ``in_run_queries``, also in-run TracIn of every training example on them over every step (the queries'
    gradients at every step's weights, every layer, ``precondition`` "none" or "kfac"): [n_queries, n_train], else None."""
    torch.manual_seed(setting.seed)
    model = build()
    opt = _optimizer(setting, model.parameters())
    x, y = train
    g = torch.Generator().manual_seed(setting.seed)
    recorder = InRun(model, opt, len(x), queries=TensorDataset(*in_run_queries), query_batch_size=500,
                     precondition=precondition) \
        if in_run_queries is not None else None
    checkpoints = []
    for epoch in range(setting.epochs):
        for idx in torch.randperm(len(x), generator=g).split(setting.batch_size):
            opt.zero_grad()
            if recorder is not None:
                recorder.backward(nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="none"), idx)
            else:
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        payload = {"model_state_dict": {k: v.clone() for k, v in model.state_dict().items()}}
        if setting.optimizer == "adamw":
            payload["optimizer_state_dict"] = copy.deepcopy(opt.state_dict())
        checkpoints.append(Checkpoint(payload, learning_rate=setting.lr, epoch=epoch))
    if recorder is None:
        return model, checkpoints, None
    recorder.remove()
    return model, checkpoints, recorder.influence_matrix().float()


class _Stepper:
    """One optimizer step for stacked parameters {name: [M, ...]}: SGD with momentum 0.9, or AdamW as torch does it."""

    def __init__(self, setting: LDSSetting, params: Dict[str, torch.Tensor]):
        self.setting = setting
        self.state = {k: (torch.zeros_like(v), torch.zeros_like(v)) for k, v in params.items()}
        self.t = 0

    def __call__(self, params: Dict[str, torch.Tensor], grads: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        lr, self.t = self.setting.lr, self.t + 1
        out = {}
        for k, p in params.items():
            m, v = self.state[k]
            if self.setting.optimizer == "sgd":
                m = 0.9 * m + grads[k]
                out[k] = p - lr * m
            else:
                m, v = 0.9 * m + 0.1 * grads[k], 0.999 * v + 0.001 * grads[k] ** 2
                step = (m / (1 - 0.9 ** self.t)) / ((v / (1 - 0.999 ** self.t)).sqrt() + 1e-8)
                out[k] = p * (1 - lr * 0.01) - lr * step
            self.state[k] = (m, v)
        return out


def train_many(setting: LDSSetting, build: Callable[[], nn.Module], train: Tensors, masks: torch.Tensor, seed: int) -> Dict[str, torch.Tensor]:
    """Stacked parameters {name: [M, ...]} of one model per row of ``masks`` [M, n_train] (the examples it trains
    on), trained at once with vmap; each model draws its own batches from its own examples."""
    torch.manual_seed(seed)
    template = build()
    if any(True for _ in template.buffers()):
        raise TracInError("LDS retraining stacks parameters with torch.func and cannot train models with buffers "
                          "(e.g. batch norm); use a model without them.")
    models = [build() for _ in range(masks.shape[0])]
    params = {k: torch.stack([dict(m.named_parameters())[k].detach() for m in models]) for k, _ in template.named_parameters()}
    x, y = train
    members = [torch.nonzero(m).flatten() for m in masks]
    size = min(len(m) for m in members)
    g = torch.Generator().manual_seed(seed)

    def loss(p, xb, yb):
        return nn.functional.cross_entropy(functional_call(template, p, (xb,)), yb)

    step, stepper = vmap(grad(loss)), _Stepper(setting, params)
    for _ in range(setting.epochs):
        orders = torch.stack([m[torch.randperm(len(m), generator=g)[:size]] for m in members])  # [M, size]
        for start in range(0, size, setting.batch_size):
            idx = orders[:, start:start + setting.batch_size]
            params = stepper(params, step(params, x[idx], y[idx]))
    return params


def margins(build: Callable[[], nn.Module], params: Dict[str, torch.Tensor], test: Tensors) -> torch.Tensor:
    """[M, n_test] true logit minus the logsumexp of the other logits, for each stacked model."""
    template = build()
    x, y = test
    with torch.no_grad():
        logits = vmap(lambda p: functional_call(template, p, (x,)))(params)  # [M, n_test, classes]
    return class_margin(logits, y)


def targets(setting: LDSSetting, data: Tuple[Tensors, Tensors], cache_dir: Optional[Path] = None,
            log: Callable[[str], None] = print) -> Tuple[torch.Tensor, torch.Tensor]:
    """(masks [subsets, n_train] bool, target margins [subsets, n_test]) on ``data`` (:func:`load_data`'s train and
    test), retrained or read from ``cache_dir``."""
    path = Path(cache_dir) / f"lds_{setting.data}_{setting.model}_{setting.optimizer}_{setting.key()}.npz" if cache_dir else None
    train, test = data
    cached = _read_cache(path, (setting.subsets, len(train[0])), (setting.subsets, len(test[0])), log) if path else None
    if cached is not None:
        return cached
    build = model_factory(setting)
    masks = torch.rand(setting.subsets, len(train[0]), generator=torch.Generator().manual_seed(setting.seed + 1)) < 0.5
    start = time.perf_counter()
    target = torch.stack([margins(build, train_many(setting, build, train, masks, 1000 + s), test) for s in range(setting.seeds)]).mean(0)
    log(f"retrained {setting.subsets} halves x {setting.seeds} seeds in {time.perf_counter() - start:.0f} s")
    if not bool(torch.isfinite(target).all()):
        raise TracInError(f"Retraining diverged: {int((~torch.isfinite(target)).sum())} target margins are NaN or infinite, "
                          "so no LDS can be measured; lower --learning_rate or --epochs.")
    if path is not None:
        buffer = io.BytesIO()
        np.savez(buffer, masks=masks.numpy(), targets=target.numpy())
        write_bytes(path, buffer.getvalue())
    return masks, target


def _read_cache(path: Path, masks_shape: Tuple[int, int], target_shape: Tuple[int, int],
                log: Callable[[str], None]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """(masks, targets) from the retraining cache at ``path`` when it holds arrays of these shapes with finite targets;
    None (retrain) when it is missing, and, said in the log, when it is unreadable or does not fit."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as cached:
            masks, target = torch.from_numpy(cached["masks"]), torch.from_numpy(cached["targets"])
    except (OSError, ValueError, KeyError, EOFError) as exc:
        log(f"retraining: the cache {path} cannot be read ({type(exc).__name__})")
        return None
    if tuple(masks.shape) != masks_shape or tuple(target.shape) != target_shape or masks.dtype != torch.bool \
            or not bool(torch.isfinite(target).all()):
        log(f"retraining: the cache {path} holds masks {tuple(masks.shape)} and targets {tuple(target.shape)}, not "
            f"{masks_shape} and {target_shape} of finite numbers")
        return None
    return masks, target


def spearman_per_column(predicted: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """[n_test] Spearman correlations between the columns of predicted and target ([S, n_test] each)."""
    from scipy.stats import spearmanr

    return np.array([spearmanr(predicted[:, j].numpy(), target[:, j].numpy()).statistic for j in range(target.shape[1])])


def lds_values(scores: torch.Tensor, masks: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Per test example, the LDS of ``scores`` [n_test, n_train] (higher: the training example helps the test one)."""
    predicted = masks.double() @ scores.double().T  # [S, n_test]
    return spearman_per_column(predicted, target.double())


def bootstrap_interval(values: np.ndarray, seed: int = 0) -> Tuple[float, float]:
    """95% bootstrap interval of the mean of ``values`` (NaNs, from constant scores, count as 0)."""
    values = np.nan_to_num(values)
    rng = np.random.default_rng(seed)
    means = rng.choice(values, (1000, len(values))).mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


@dataclass
class LDSRow:
    method: str
    lds: float
    low: float
    high: float
    seconds: float


@dataclass
class LDSRun:
    """One setting's data, retrained targets and attributed run (a checkpoint per epoch), shared by every method
    scored on it."""

    setting: LDSSetting
    train: Tensors
    test: Tensors
    masks: torch.Tensor  # [subsets, n_train] bool
    target: torch.Tensor  # [subsets, n_test] margins
    model: nn.Module
    checkpoints: List[Checkpoint]
    in_run: Optional[torch.Tensor] = None  # [n_test, n_train] in-run TracIn of the attributed run, when asked for

    def row(self, method: str, scores: torch.Tensor, seconds: float) -> LDSRow:
        """The LDS row of ``scores`` [n_test, n_train] (higher: the training example helps the test one)."""
        values = lds_values(scores, self.masks, self.target)
        return LDSRow(method, float(np.nan_to_num(values).mean()), *bootstrap_interval(values), seconds)

    def model_at(self, index: int) -> nn.Module:
        """A fresh model holding checkpoint ``index``'s weights, in eval mode (for tools that take a model)."""
        model = model_factory(self.setting)()
        model.load_state_dict(self.checkpoints[index].source["model_state_dict"])
        return model.eval()

    def warm_up(self) -> None:
        """Score the first checkpoint once, untimed, at full size: a process's first scoring of each shape pays one-time
        costs (kernel selection, thread pools; about 1-2 s on the digits CNN) that would otherwise land on whichever
        method is timed first."""
        for keywords in ({}, {"precondition": "none"}):
            TracIn(self.model, self.checkpoints[:1], progress=False, batch_size=500, **keywords).influence_matrix(
                TensorDataset(*self.train), TensorDataset(*self.test))


def prepare(setting: LDSSetting, cache_dir: Optional[Path] = None, log: Callable[[str], None] = print,
            in_run: Optional[str] = None) -> LDSRun:
    """Load the data (once), retrain the targets or read them from ``cache_dir``, and train the attributed run (with
    ``in_run`` "none" or "kfac": recording in-run TracIn so preconditioned on the test examples while it trains)."""
    train, test = load_data(setting)
    masks, target = targets(setting, (train, test), cache_dir, log)
    model, checkpoints, recorded = train_full(setting, model_factory(setting), train, test if in_run else None,
                                              in_run or "none")
    return LDSRun(setting, train, test, masks, target, model, checkpoints, recorded)


def evaluate(setting: LDSSetting, methods: Dict[str, Dict], cache_dir: Optional[Path] = None,
             log: Callable[[str], None] = print) -> List[LDSRow]:
    """The LDS of each method (a name -> :class:`tracin.TracIn` keywords; ``"checkpoints": "final"`` scores the
    last checkpoint only) on ``setting``; retrained targets from ``cache_dir`` when there."""
    asked = [k["in_run"] for k in methods.values() if k.get("in_run")]
    if len(set(asked)) > 1:
        raise TracInError("One LDS evaluation records one in-run variant (its attributed run trains once); score in_run "
                          "and in_run_kfac in separate runs.")
    run = prepare(setting, cache_dir, log, in_run=asked[0] if asked else None)
    run.warm_up()
    rows = []
    for name, keywords in methods.items():
        keywords = dict(keywords)
        if keywords.pop("in_run", False):  # recorded while the attributed run trained (its cost is in training)
            assert run.in_run is not None
            rows.append(run.row(name, run.in_run, 0.0))
            log(format_row(rows[-1]))
            continue
        used = run.checkpoints[-1:] if keywords.pop("checkpoints", "all") == "final" else run.checkpoints
        begin = time.perf_counter()
        tr = TracIn(run.model, used, progress=False, **{"batch_size": 500, **keywords})
        scores = tr.influence_matrix(TensorDataset(*run.train), TensorDataset(*run.test))
        rows.append(run.row(name, scores, time.perf_counter() - begin))
        log(format_row(rows[-1]))
    return rows


def format_row(row: LDSRow) -> str:
    return f"| {row.method} | {row.lds:.3f} | [{row.low:.3f}, {row.high:.3f}] | {row.seconds:.2f} |"


PRESETS: Dict[str, Dict] = {
    "default": {},
    "plain": {"precondition": "none"},
    "kfac": {"precondition": "kfac", "layers": "all"},
    "kfac_last": {"precondition": "kfac", "layers": "last"},
    "plain_last": {"precondition": "none", "layers": "last"},
    "cosine": {"precondition": "none", "normalize": "cosine"},
    "margin": {"measurement": "margin"},
    "final": {"checkpoints": "final"},
    "plain_final": {"precondition": "none", "checkpoints": "final"},
    "in_run": {"in_run": "none"},  # in-run TracIn over every step of the attributed run (tracin.InRun), every layer
    "in_run_kfac": {"in_run": "kfac"},  # the same, K-FAC preconditioned in-run (moving-average Fisher)
}


def run_lds(setting: LDSSetting, methods: List[str], output_dir: Path, log: Callable[[str], None] = print) -> str:
    """``tracin evaluate lds``: score the named :data:`PRESETS` on ``setting``, write ``lds.csv`` (and the retraining
    cache) under ``output_dir``, return the table as Markdown."""
    unknown = [m for m in methods if m not in PRESETS]
    if unknown:
        raise TracInError(f"Unknown LDS method {unknown[0]!r}; choose from {', '.join(PRESETS)}.")
    output_dir = Path(output_dir)
    rows = evaluate(setting, {m: PRESETS[m] for m in methods}, output_dir / "cache", log)
    write_csv(output_dir / "lds.csv", [asdict(r) for r in rows], ["method", "lds", "low", "high", "seconds"])
    head = (f"LDS on {setting.data} with a {setting.model.upper()} ({setting.optimizer}, {setting.epochs} epochs), "
            f"{setting.subsets} halves x {setting.seeds} seeds, {setting.n_test} test examples\n"
            "| method | LDS | 95% interval | seconds |\n|---|---|---|---|")
    return "\n".join([head] + [format_row(r) for r in rows])
