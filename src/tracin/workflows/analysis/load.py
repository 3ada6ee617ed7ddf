"""Reading a complete ``tracin influence`` results directory into arrays and tables."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from ...errors import DataError
from .. import results_dir as names
from ..results_dir import ResultsDir


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
    folder = ResultsDir(Path(directory))
    manifest = folder.manifest()
    needed = folder.missing([names.TOP_VALUES, names.TOP_INDICES, names.OPP_VALUES, names.OPP_INDICES, names.TEST_INDICES,
                             names.predictions_csv("train"), names.predictions_csv("test")])
    if needed:
        raise DataError(f"{folder.path} lacks {needed}; re-run 'tracin influence' into it.")
    self_rows = None
    if not folder.missing([names.SELF_CSV]):
        self_rows = [{**r, "train_index": int(r["train_index"]), "score": float(r["score"]), "rank": int(r["rank"]),
                      **({"summed_loss": float(r["summed_loss"]), "summed_loss_rank": int(r["summed_loss_rank"])}
                         if r.get("summed_loss") not in (None, "") else {})}
                     for r in folder.table(names.SELF_CSV)]
    return Results(
        directory=folder.path, manifest=manifest, class_names=list(manifest["data"]["class_names"]),
        test_indices=folder.array(names.TEST_INDICES),
        pro_values=folder.array(names.TOP_VALUES), pro_indices=folder.array(names.TOP_INDICES),
        opp_values=folder.array(names.OPP_VALUES), opp_indices=folder.array(names.OPP_INDICES),
        train=_typed(folder.table(names.predictions_csv("train"))), test=_typed(folder.table(names.predictions_csv("test"))),
        self_influence=self_rows,
    )
