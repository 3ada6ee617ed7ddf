"""Reading a complete ``tracin influence`` results directory into arrays and tables."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ..errors import DataError
from ..outputs import read_csv, read_manifest


@dataclass
class Results:
    """Everything the report needs. Test rows follow ``test_indices``; train indices are positions
    in the full training list.

    pro_values, pro_indices, opp_values, opp_indices: [n_test, k].
    train / test: one dict per scored example (index, file, label, predicted, confidence, correct).
    self_influence: rows of self_influence.csv (rank order) or None.
    """

    directory: Path
    manifest: Dict[str, Any]
    class_names: List[str]
    test_indices: np.ndarray
    pro_values: np.ndarray
    pro_indices: np.ndarray
    opp_values: np.ndarray
    opp_indices: np.ndarray
    train: Dict[int, Dict[str, Any]]
    test: Dict[int, Dict[str, Any]]
    self_influence: Optional[List[Dict[str, Any]]]


def _typed(rows: List[Dict[str, str]]) -> Dict[int, Dict[str, Any]]:
    out = {}
    for r in rows:
        out[int(r["index"])] = {**r, "index": int(r["index"]), "confidence": float(r["confidence"]), "correct": r["correct"] == "1"}
    return out


def load_results(directory: Path) -> Results:
    directory = Path(directory)
    manifest = read_manifest(directory)
    needed = [f for f in ("top_k_influences_values.npy", "top_k_influences_indices.npy", "top_k_opponents_values.npy",
                          "top_k_opponents_indices.npy", "test_indices.npy", "predictions_train.csv", "predictions_test.csv")
              if not (directory / f).is_file()]
    if needed:
        raise DataError(f"{directory} lacks {needed}; re-run 'tracin influence' into it.")
    self_rows = None
    if (directory / "self_influence.csv").is_file():
        self_rows = [{**r, "train_index": int(r["train_index"]), "score": float(r["score"]), "rank": int(r["rank"]),
                      **({"summed_loss": float(r["summed_loss"]), "summed_loss_rank": int(r["summed_loss_rank"])}
                         if r.get("summed_loss") not in (None, "") else {})}
                     for r in read_csv(directory / "self_influence.csv")]
    return Results(
        directory=directory, manifest=manifest, class_names=list(manifest["data"]["class_names"]),
        test_indices=np.load(directory / "test_indices.npy"),
        pro_values=np.load(directory / "top_k_influences_values.npy"), pro_indices=np.load(directory / "top_k_influences_indices.npy"),
        opp_values=np.load(directory / "top_k_opponents_values.npy"), opp_indices=np.load(directory / "top_k_opponents_indices.npy"),
        train=_typed(read_csv(directory / "predictions_train.csv")), test=_typed(read_csv(directory / "predictions_test.csv")),
        self_influence=self_rows,
    )
