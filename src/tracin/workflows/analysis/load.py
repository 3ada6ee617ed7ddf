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
    train / test: one dict per scored example (index, file, label, predicted, confidence, correct; text for texts).
    class_names: empty for a language model's results (its labels are completions).
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

    @property
    def text(self) -> bool:
        """Whether the examples are texts (``tracin text``) rather than images."""
        return self.manifest.get("data", {}).get("modality") == "text"


def _typed(rows: List[Dict[str, str]]) -> Dict[int, Dict[str, Any]]:
    out = {}
    for r in rows:
        out[int(r["index"])] = {**r, "index": int(r["index"]), "confidence": float(r["confidence"]), "correct": r["correct"] == "1"}
    return out


def load_results(directory: Path) -> Results:
    """The results in ``directory``, checked for consistency: a folder whose files were changed by hand (missing
    columns, values of the wrong type, arrays that disagree) is one clear error, not a traceback later."""
    try:
        res = _load(ResultsDir(Path(directory)))
        _check(res)
    except (KeyError, ValueError, TypeError, IndexError, OSError, EOFError) as exc:
        raise DataError(f"The results in {directory} are damaged or were changed ({type(exc).__name__}: {exc}); re-run "
                        "'tracin influence' into a new folder.") from None
    return res


def _check(res: Results) -> None:
    """Raise ValueError when the arrays and tables of ``res`` disagree."""
    n, k = res.pro_values.shape
    if res.test_indices.shape != (n,) or res.pro_indices.shape != (n, k) or res.opp_values.shape != res.opp_indices.shape \
            or res.opp_values.shape[0] != n:
        raise ValueError("the top-k arrays and test_indices.npy have different shapes")
    if not (np.isfinite(res.pro_values).all() and np.isfinite(res.opp_values).all()):
        raise ValueError("the top-k scores hold NaN or infinite values")
    unknown_test = set(res.test_indices.tolist()) - set(res.test)
    unknown_train = (set(res.pro_indices.ravel().tolist()) | set(res.opp_indices.ravel().tolist())) - set(res.train)
    if unknown_test or unknown_train:
        raise ValueError(f"indices missing from the prediction tables: test {sorted(unknown_test)[:3]}, train {sorted(unknown_train)[:3]}")
    classes = set(res.class_names)
    if classes and any(r["label"] not in classes or r["predicted"] not in classes for r in list(res.train.values()) + list(res.test.values())):
        raise ValueError("a label or prediction is not one of the manifest's classes")
    if res.text and any("text" not in r for r in list(res.train.values()) + list(res.test.values())):
        raise ValueError("a text result's prediction table has no text column")


def _load(folder: ResultsDir) -> Results:
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
