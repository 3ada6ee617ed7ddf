"""Knowledge-graph embeddings (PyKEEN): triples files, the per-triple 1-N loss, model loading.

Per-triple loss (the default way ConvE is trained, 1-N scoring): the model scores the triple's
(head, relation) against every entity as tail, and the loss is the binary cross-entropy of those
N scores against the one-hot target of the true tail, averaged over the N entities (PyKEEN's
BCEAfterSigmoidLoss with label smoothing ``label_smoothing``). With ``direction="both"`` the head
side is added the same way: for models trained with inverse triples, where PyKEEN scores heads as
the tails of the inverse relation.

The candidate tails are passed to PyKEEN as explicit indices ``[B, N]``, so every entity-embedding
row a triple touches is an ordinary per-example lookup: hooks see it and the embedding kernel
scores it exactly (densely, since each triple looks up every row). Scoring all tails through the
embedding *weight* directly, as ``score_t`` does without indices, would hide those gradient
paths from per-example capture.
"""
from __future__ import annotations

import gzip
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..checkpoints import Checkpoint, save_checkpoint
from ..errors import CheckpointError, DataError, TracInError
from .base import Batch, Task

COLUMNS = {"head": 0, "relation": 1, "tail": 2}


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _lines(path: Path, what: str) -> List[List[str]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist; check the path.")
    try:
        with _open_text(path) as handle:
            return [line.rstrip("\n").split("\t") for line in handle if line.strip()]
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DataError(f"{what} file {path} cannot be read as (gzipped) UTF-8 text ({type(exc).__name__}); re-export it.") from exc


def read_mapping(path: Path, what: str = "entity_to_id") -> Dict[str, int]:
    """A PyKEEN ``*_to_id.tsv[.gz]`` file (``id<TAB>label`` rows, header optional) as {label: id}."""
    rows = _lines(path, what)
    if rows and rows[0][:2] == ["id", "label"]:
        rows = rows[1:]
    mapping: Dict[str, int] = {}
    for number, row in enumerate(rows, start=1):
        if len(row) != 2 or not row[0].strip().isdigit():
            raise DataError(f"{what} file {path} row {number} is not 'id<TAB>label'; use PyKEEN's mapping files.")
        mapping[row[1]] = int(row[0])
    if not mapping:
        raise DataError(f"{what} file {path} is empty; it must list every {what.split('_')[0]} with its id.")
    if sorted(mapping.values()) != list(range(len(mapping))):
        raise DataError(f"{what} file {path} has ids that are not 0..{len(mapping) - 1} without gaps; use PyKEEN's mapping files.")
    return mapping


def read_triples(path: Path, entity_to_id: Dict[str, int], relation_to_id: Dict[str, int], what: str = "Triples") -> torch.Tensor:
    """A TSV of labelled triples ``head<TAB>relation<TAB>tail`` (gzipped or not) as ids [n, 3]."""
    rows = _lines(path, what)
    out = []
    for number, row in enumerate(rows, start=1):
        if len(row) != 3:
            raise DataError(f"{what} file {path} line {number} has {len(row)} fields, not head<TAB>relation<TAB>tail; fix that line.")
        for label, mapping, kind in ((row[0], entity_to_id, "entity"), (row[1], relation_to_id, "relation"), (row[2], entity_to_id, "entity")):
            if label not in mapping:
                raise DataError(f"{what} file {path} line {number} names {kind} {label!r}, which the {kind}_to_id mapping lacks; "
                                "remove that triple or use the mappings the model was trained with.")
        out.append((entity_to_id[row[0]], relation_to_id[row[1]], entity_to_id[row[2]]))
    if not out:
        raise DataError(f"{what} file {path} holds no triples; give one head<TAB>relation<TAB>tail per line.")
    return torch.tensor(out, dtype=torch.long)


class TripleData(Dataset):
    """Triples as ids [n, 3]; items are LongTensor [3] (head, relation, tail)."""

    def __init__(self, triples: torch.Tensor):
        self.triples = triples

    def __len__(self) -> int:
        return self.triples.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.triples[i]


def _triples(batch: Batch) -> torch.Tensor:
    """The [B, 3] ids of a batch from TripleData (a tensor) or a TensorDataset (a 1-tuple)."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


class KGETask(Task):
    """Per-triple 1-N BCE loss of a PyKEEN model (see the module docstring); batches are [B, 3] ids.

    ``strata`` keys: ``"relation"``, ``"head"``, ``"tail"`` (and ``"label"``, the relation)."""

    def __init__(self, num_entities: int, direction: str = "tail", label_smoothing: float = 0.0):
        if direction not in ("tail", "both"):
            raise TracInError(f"direction must be 'tail' or 'both', got {direction!r}.")
        self.num_entities, self.direction, self.label_smoothing = num_entities, direction, label_smoothing

    def _side(self, scores: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
        target = F.one_hot(true, self.num_entities).to(scores.dtype)
        if self.label_smoothing:
            target = target * (1 - self.label_smoothing) + self.label_smoothing / self.num_entities
        return F.binary_cross_entropy_with_logits(scores, target, reduction="none").mean(dim=1)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        triples = _triples(batch)
        B = triples.shape[0]
        every = torch.arange(self.num_entities, device=triples.device).expand(B, -1)
        # clones: with inverse triples PyKEEN rewrites relation ids of the batch it is given in place
        loss = self._side(model.score_t(triples[:, :2].clone(), tails=every), triples[:, 2])
        if self.direction == "both":
            if not getattr(model, "use_inverse_triples", False):
                raise TracInError("direction='both' needs a model trained with inverse triples (create_inverse_triples=True): "
                                  "without them PyKEEN scores heads by running the model once per candidate, which per-example "
                                  "capture cannot split; use direction='tail'.")
            loss = loss + self._side(model.score_h_inverse(triples[:, 1:].clone(), heads=every), triples[:, 0])
        return loss

    def labels(self, batch: Batch) -> Optional[torch.Tensor]:
        return self.strata(batch, "relation")

    def strata(self, batch: Batch, key: str) -> Optional[torch.Tensor]:
        column = COLUMNS.get("relation" if key == "label" else key)
        return None if column is None else _triples(batch)[:, column]


def build_pykeen_model(model_class: str, num_entities: int, num_relations: int, model_kwargs: Dict,
                       create_inverse_triples: bool = False) -> nn.Module:
    """A PyKEEN model by class name over a graph of this size (its weights are loaded separately)."""
    try:
        import pykeen.models
        from pykeen.triples import CoreTriplesFactory
    except ImportError as exc:
        raise TracInError("Knowledge-graph models need PyKEEN: pip install 'tracin[kge]'.") from exc
    cls = getattr(pykeen.models, model_class, None)
    if cls is None:
        raise CheckpointError(f"PyKEEN has no model class {model_class!r}; the checkpoint names a model this PyKEEN lacks.")
    factory = CoreTriplesFactory(torch.zeros(0, 3, dtype=torch.long), num_entities=num_entities, num_relations=num_relations,
                                 create_inverse_triples=create_inverse_triples)
    quiet = logging.getLogger("pykeen")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # construction-time advice (seeds, inverse triples) is not ours to print
    try:
        return cls(triples_factory=factory, **model_kwargs)
    finally:
        quiet.setLevel(level)


def save_kge_checkpoint(path: Path, model: nn.Module, learning_rate: float, model_class: str, model_kwargs: Dict,
                        num_entities: int, num_relations: int, create_inverse_triples: bool = False, **meta) -> Path:
    """A weights-only checkpoint that names the PyKEEN class and its arguments (safe to load)."""
    return save_checkpoint(path, model.state_dict(), learning_rate, model_class=model_class, model_kwargs=model_kwargs,
                           num_entities=num_entities, num_relations=num_relations,
                           create_inverse_triples=create_inverse_triples, **meta)


def load_kge(model_path: Path, learning_rate: Optional[float] = None, trust: bool = False) -> Tuple[nn.Module, List[Checkpoint]]:
    """The model and its checkpoints from a checkpoint file, a folder of them, or (with ``trust``)
    a whole pickled PyKEEN model such as the pipeline's ``trained_model.pkl``."""
    path = Path(model_path)
    if path.is_dir():
        checkpoints = Checkpoint.discover(path, learning_rate=learning_rate, trust=trust)
    else:
        if not path.is_file():
            raise CheckpointError(f"Model file {path} does not exist; check --model_path.")
        whole = _pickled_model(path, trust)
        if whole is not None:
            if learning_rate is None:
                warnings.warn(f"{path.name} is a whole pickled model with no learning rate; its one checkpoint is weighted 1.0 "
                              "(the ranking does not change; pass --learning_rate for the scale).", stacklevel=2)
            return whole, [Checkpoint(whole.state_dict(), learning_rate=1.0 if learning_rate is None else learning_rate, name=path.name)]
        checkpoints = [Checkpoint(path, learning_rate=learning_rate, trust=trust)]
    meta = checkpoints[-1].metadata
    if "model_class" not in meta:
        raise CheckpointError(f"Checkpoint {checkpoints[-1].name} does not name its PyKEEN model (no model_class inside); "
                              "save it with tracin.tasks.kge.save_kge_checkpoint, or pass a whole pickled model with --trust_checkpoint.")
    model = build_pykeen_model(meta["model_class"], int(meta["num_entities"]), int(meta["num_relations"]),
                               dict(meta.get("model_kwargs", {})), bool(meta.get("create_inverse_triples", False)))
    return model, checkpoints


def _pickled_model(path: Path, trust: bool) -> Optional[nn.Module]:
    """A whole pickled model (loaded only with ``trust``), or None when the file holds weights."""
    try:
        with warnings.catch_warnings():  # torch's own pickle-protocol warnings: tracin says what matters once, below
            warnings.simplefilter("ignore")
            torch.load(str(path), map_location="cpu", weights_only=True)
        return None
    except Exception as exc:  # noqa: BLE001 - any refusal of the weights-only loader
        if not trust:
            raise CheckpointError(
                f"Model file {path} is a pickled object, and unpickling it could run arbitrary code from the file; "
                "re-save the weights with tracin.tasks.kge.save_kge_checkpoint, or pass --trust_checkpoint if you trust its source."
            ) from exc
    warnings.warn(f"Loading {path} with full pickle (--trust_checkpoint): this runs any code the file contains.", stacklevel=3)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"Model file {path} could not be unpickled ({exc}); re-save the weights with tracin.tasks.kge.save_kge_checkpoint.") from exc
    if not isinstance(obj, nn.Module):
        raise CheckpointError(f"Model file {path} holds a {type(obj).__name__}, not a PyKEEN model.")
    return obj


@dataclass
class KGETraining:
    """How :func:`train_kge` trains: Adam epochs, step size and batch size, a checkpoint every ``save_every``
    epochs, the seed of the batch order, label smoothing of the 1-N loss, and a loss line per epoch."""

    epochs: int = 20
    learning_rate: float = 0.01
    batch_size: int = 128
    save_every: int = 5
    seed: int = 0
    label_smoothing: float = 0.0
    progress: bool = False


def train_kge(model: nn.Module, train: torch.Tensor, checkpoint_dir: Path, model_class: str, model_kwargs: Dict,
              training: Optional[KGETraining] = None) -> List[Path]:
    """Train a PyKEEN ``model`` (built by :func:`build_pykeen_model` from ``model_class`` and ``model_kwargs``) on
    ``train`` triples [n, 3] with Adam on the per-triple 1-N loss of :class:`KGETask` (the loss TracIn scores),
    saving a checkpoint every ``save_every`` epochs and after the last, each with the learning rate in force."""
    s = training or KGETraining()
    epochs, learning_rate, batch_size, save_every = s.epochs, s.learning_rate, s.batch_size, s.save_every
    num_entities, num_relations = model.num_entities, model.num_relations
    task = KGETask(num_entities, label_smoothing=s.label_smoothing)
    opt = torch.optim.Adam(model.parameters(), lr=learning_rate)
    gen = torch.Generator().manual_seed(s.seed)
    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for epoch in range(1, epochs + 1):
        model.train()
        total = 0.0
        for idx in torch.randperm(train.shape[0], generator=gen).split(batch_size):
            opt.zero_grad()
            loss = task.loss(model, train[idx]).mean()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        if s.progress:
            print(f"epoch {epoch}: loss {total / train.shape[0]:.4f}")
        if epoch % save_every == 0 or epoch == epochs:
            paths.append(save_kge_checkpoint(checkpoint_dir / f"checkpoint_epoch_{epoch}.pt", model, learning_rate, model_class,
                                             model_kwargs, num_entities, num_relations, epoch=epoch))
    model.eval()
    return paths


def triple_labels(triples: torch.Tensor, entity_to_id: Dict[str, int], relation_to_id: Dict[str, int]) -> List[Sequence[str]]:
    """Ids [n, 3] back to (head, relation, tail) labels."""
    entities = {v: k for k, v in entity_to_id.items()}
    relations = {v: k for k, v in relation_to_id.items()}
    return [(entities[h], relations[r], entities[t]) for h, r, t in triples.tolist()]
