"""The ``tracin kge`` job: which training triples made a PyKEEN model believe each test triple."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import Subset

from .api import TracIn
from .errors import TracInError
from .jobs import write_manifest, write_self_influence
from .kge import KGETask, TripleData, load_kge, read_mapping, read_triples, triple_labels
from .outputs import begin_results, write_csv, write_json, write_npy


@dataclass
class KGEJob:
    model_path: Path
    train: Path
    test: Path
    entity_to_id: Path
    relation_to_id: Path
    output: Path
    mode: str = "batch"
    test_indices: Optional[List[int]] = None
    top_k: int = 10
    sample_rate: Optional[float] = None
    stratify_by: Optional[str] = None
    projection_dim: Optional[int] = None
    projection_type: str = "gaussian"
    self_influence: bool = False
    direction: str = "tail"
    label_smoothing: float = 0.0
    learning_rate: Optional[float] = None
    layers: Any = "all"
    batch_size: int = 64
    device: str = "auto"
    seed: int = 0
    trust_checkpoint: bool = False
    progress: bool = True


def run_kge(job: KGEJob) -> Dict[str, Any]:
    """Top-k proponents and opponents among the training triples for each chosen test triple
    (``mode="single"``: one test triple per pass, least memory; ``"batch"``: all in one pass; the
    scores are the same), optionally the self-influence of every training triple."""
    start = time.perf_counter()
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
    tr = TracIn(model, checkpoints, layers=job.layers, task=task, device=job.device, batch_size=job.batch_size,
                progress=job.progress, projection_dim=job.projection_dim, projection=job.projection_type, seed=job.seed,
                sample_rate=job.sample_rate, stratify_by=job.stratify_by)
    train_set, test_set = TripleData(train), TripleData(test)
    groups = [[i] for i in chosen] if job.mode == "single" else [chosen]
    parts = [tr.influence(train_set, Subset(test_set, g), top_k=job.top_k) for g in groups]
    pro_v = torch.cat([p.proponents.values for p in parts]).numpy()
    pro_i = torch.cat([p.proponents.indices for p in parts]).numpy()
    opp_v = torch.cat([p.opponents.values for p in parts]).numpy()
    opp_i = torch.cat([p.opponents.indices for p in parts]).numpy()

    out = Path(job.output)
    begin_results(out)
    train_labels, test_labels = triple_labels(train, entities, relations), triple_labels(test, entities, relations)
    key = lambda triple: "|".join(triple)  # noqa: E731 - "head|relation|tail"
    explained: Dict[str, Any] = {}
    rows = []
    for row, t in enumerate(chosen):
        entry: Dict[str, Any] = {"test_index": t, "triple": list(test_labels[t])}
        for kind, vals, idxs in (("proponents", pro_v, pro_i), ("opponents", opp_v, opp_i)):
            entry[kind] = [{"train_index": int(j), "triple": list(train_labels[j]), "score": float(v)}
                           for v, j in zip(vals[row], idxs[row])]
            rows += [{"test_index": t, "test_triple": key(test_labels[t]), "kind": kind[:-1], "rank": r + 1,
                      "train_index": int(j), "train_triple": key(train_labels[j]), "score": float(v)}
                     for r, (v, j) in enumerate(zip(vals[row], idxs[row]))]
        explained[key(test_labels[t])] = entry
    written = [
        write_npy(out / "top_k_influences_values.npy", pro_v), write_npy(out / "top_k_influences_indices.npy", pro_i),
        write_npy(out / "top_k_opponents_values.npy", opp_v), write_npy(out / "top_k_opponents_indices.npy", opp_i),
        write_npy(out / "test_indices.npy", np.asarray(chosen, dtype=np.int64)),
        write_json(out / "kge_influence.json", explained),
        write_csv(out / "kge_influence.csv", rows, ["test_index", "test_triple", "kind", "rank", "train_index", "train_triple", "score"]),
    ]
    if job.self_influence:
        written += write_self_influence(out, [key(t) for t in train_labels], tr.self_influence(train_set).numpy())
    data = {"n_train": len(train), "n_test": len(test), "test_indices": chosen, "num_entities": n_ent,
            "num_relations": model.num_relations, "model_class": type(model).__name__}
    return write_manifest(out, "kge", vars(job), checkpoints, tr.scope(),
                          tr.num_parameters, tr.device, tr.last_stats, written, data, time.perf_counter() - start)
