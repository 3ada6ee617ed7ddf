"""The ``tracin kge`` job: which training triples made a PyKEEN model believe each test triple."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Subset

from ..api import TracIn
from ..config import ScoringConfig
from ..errors import TracInError
from ..tasks.kge import KGETask, TripleData, load_kge, read_mapping, read_triples, triple_labels
from . import results_dir as names
from .results_dir import pass_stats, ResultsDir, RunRecord, job_parameters

KGE_JSON, KGE_CSV = "kge_influence.json", "kge_influence.csv"


@dataclass
class KGEJob:
    """A ``tracin kge`` run: the model, triples and mappings, what to explain, and the scoring settings."""

    model_path: Path
    train: Path
    test: Path
    entity_to_id: Path
    relation_to_id: Path
    output: Path
    mode: str = "batch"
    test_indices: Optional[List[int]] = None
    top_k: int = 10
    self_influence: bool = False
    direction: str = "tail"
    label_smoothing: float = 0.0
    learning_rate: Optional[float] = None
    device: str = "auto"
    trust_checkpoint: bool = False
    scoring: ScoringConfig = field(default_factory=lambda: ScoringConfig(batch_size=64))


def run_kge(job: KGEJob) -> Dict[str, Any]:
    """Top-k proponents and opponents among the training triples for each chosen test triple
    (``mode="single"``: one test triple per pass, least memory; ``"batch"``: all in one pass; the
    scores are the same), optionally the self-influence of every training triple."""
    start = time.perf_counter()
    if Path(job.output).suffix.lower() in (".json", ".csv", ".npy", ".txt") and not Path(job.output).is_dir():
        raise TracInError(f"--output {job.output} is the folder the results go into (kge_influence.json and more); give a "
                          "folder name, e.g. kge_results.")
    if job.mode not in ("single", "batch"):
        raise TracInError(f"--mode must be single or batch, got {job.mode!r}.")
    entities, relations = read_mapping(job.entity_to_id, "entity_to_id"), read_mapping(job.relation_to_id, "relation_to_id")
    train = read_triples(job.train, entities, relations, "Training triples")
    test = read_triples(job.test, entities, relations, "Test triples")
    model, checkpoints = load_kge(job.model_path, job.learning_rate, job.trust_checkpoint)
    n_ent = model.num_entities
    if n_ent != len(entities) or model.num_relations != len(relations):
        raise TracInError(f"The model knows {n_ent} entities and {model.num_relations} relations but the mappings list "
                          f"{len(entities)} and {len(relations)}; use the mapping files the model was trained with.")
    chosen = list(range(len(test))) if job.test_indices is None else list(job.test_indices)
    bad = [i for i in chosen if not 0 <= i < len(test)]
    if bad:
        raise TracInError(f"--test_indices {bad[0]} is outside the {len(test)} test triples (0..{len(test) - 1}).")
    if job.top_k < 1 or job.top_k > len(train):
        raise TracInError(f"--top_k {job.top_k} must be between 1 and the {len(train)} training triples.")
    task = KGETask(n_ent, job.direction, job.label_smoothing)
    tr = TracIn(model, checkpoints, task=task, device=job.device, config=job.scoring)
    train_set, test_set = TripleData(train), TripleData(test)
    groups = [[i] for i in chosen] if job.mode == "single" else [chosen]
    parts = [tr.influence(train_set, Subset(test_set, g), top_k=job.top_k) for g in groups]
    pro_v = torch.cat([p.proponents.values for p in parts]).numpy()
    pro_i = torch.cat([p.proponents.indices for p in parts]).numpy()
    opp_v = torch.cat([p.opponents.values for p in parts]).numpy()
    opp_i = torch.cat([p.opponents.indices for p in parts]).numpy()

    with ResultsDir(Path(job.output)) as out:
        train_labels, test_labels = triple_labels(train, entities, relations), triple_labels(test, entities, relations)
        _write_explanations(out, chosen, (pro_v, pro_i, opp_v, opp_i), train_labels, test_labels)
        if job.self_influence:
            out.self_influence_tables([_key(t) for t in train_labels], tr.self_influence(train_set).numpy())
        data = {"n_train": len(train), "n_test": len(test), "test_indices": chosen, "num_entities": n_ent,
                "num_relations": model.num_relations, "model_class": type(model).__name__}
        record = RunRecord(job_parameters(job), data, {"total_s": time.perf_counter() - start}, pass_stats(tr))
        return out.finish("kge", tr, record)


def _key(triple: Sequence[str]) -> str:
    """"head|relation|tail"."""
    return "|".join(triple)


def _write_explanations(out: ResultsDir, chosen: List[int], lists: Tuple[np.ndarray, ...],
                        train_labels: List[Sequence[str]], test_labels: List[Sequence[str]]) -> None:
    """The top-k arrays, ``kge_influence.json`` (keyed by test triple) and ``kge_influence.csv``."""
    pro_v, pro_i, opp_v, opp_i = lists
    explained: Dict[str, Any] = {}
    rows = []
    for row, t in enumerate(chosen):
        entry: Dict[str, Any] = {"test_index": t, "triple": list(test_labels[t])}
        for kind, vals, idxs in (("proponents", pro_v, pro_i), ("opponents", opp_v, opp_i)):
            entry[kind] = [{"train_index": int(j), "triple": list(train_labels[j]), "score": float(v)}
                           for v, j in zip(vals[row], idxs[row])]
            rows += [{"test_index": t, "test_triple": _key(test_labels[t]), "kind": kind[:-1], "rank": r + 1,
                      "train_index": int(j), "train_triple": _key(train_labels[j]), "score": float(v)}
                     for r, (v, j) in enumerate(zip(vals[row], idxs[row]))]
        explained[_key(test_labels[t])] = entry
    for name, array in ((names.TOP_VALUES, pro_v), (names.TOP_INDICES, pro_i), (names.OPP_VALUES, opp_v),
                        (names.OPP_INDICES, opp_i), (names.TEST_INDICES, np.asarray(chosen, dtype=np.int64))):
        out.npy(name, array)
    out.json(KGE_JSON, explained)
    out.csv(KGE_CSV, rows, ["test_index", "test_triple", "kind", "rank", "train_index", "train_triple", "score"])
