"""Numbers the report shows: health score, false predictions, misprediction cross-analysis,
per-class helpful/harmful training images, mislabel candidates. Pure functions of :class:`Results`."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import numpy as np

from .load import Results

# each band holds scores above its threshold: 10% of the labels wrong is a badly damaged data set (curated benchmarks hold a few %), so
# it reads NEEDS ATTENTION, not GOOD
BANDS = ((98.0, "EXCELLENT"), (95.0, "GOOD"), (90.0, "FAIR"), (-1.0, "NEEDS ATTENTION"))


@dataclass
class Health:
    """The data's health: the share (in %) of scored training images not flagged as likely mislabelled, its band
    (> 98 EXCELLENT, 95-98 GOOD, 90-95 FAIR, 90 or less NEEDS ATTENTION), how many were flagged, and the rule used."""

    score: float
    band: str
    flagged: int
    scored: int
    rule: str


def health(res: Results) -> Health:
    """Flag a training image when the final model predicts another class than its label and, with self-influence
    computed, its self-influence is above the median (a surprising example the model also disagrees with); the
    health score is the share not flagged. It falls as label noise rises (docs/report.md)."""
    wrong = ("the final model predicts another class than the label" if res.class_names else
             "the final model does not reproduce the completion")
    if res.self_influence:
        median = float(np.median([r["score"] for r in res.self_influence]))
        flagged = len(suspects(res))
        scored = len(res.self_influence)
        rule = f"{wrong} and the self-influence is above the median ({median:.3g})"
    else:
        flagged = sum(1 for r in res.train.values() if not r["correct"])
        scored = len(res.train)
        rule = f"{wrong} (self-influence not computed)"
    score = 100.0 * (1 - flagged / scored) if scored else 0.0
    band = next(name for threshold, name in BANDS if score > threshold)
    return Health(score, band, flagged, scored, rule)


def suspects(res: Results) -> set:
    """Training indices flagged by :func:`health`'s rule (empty without self-influence)."""
    if not res.self_influence:
        return set()
    median = float(np.median([r["score"] for r in res.self_influence]))
    return {r["train_index"] for r in res.self_influence if not _correct(res, r) and r["score"] > median}


def _correct(res: Results, row: Dict[str, Any]) -> bool:
    """Whether the final model gets a self-influence row's training example right (its prediction table says; the
    row's own label and prediction where the table lacks it)."""
    known = res.train.get(row["train_index"])
    return bool(known["correct"]) if known is not None else row["label"] == row["predicted"]


def opponent_share(pro_values: np.ndarray, opp_values: np.ndarray) -> float:
    """Share (in %) of the top-k opponents' absolute mass in the top-k proponents' + opponents' mass:
    how strongly the most harmful training examples pull against the most helpful ones."""
    neg = float(np.abs(np.clip(opp_values, None, 0)).sum())
    pos = float(np.clip(pro_values, 0, None).sum())
    return 100.0 * neg / (pos + neg) if pos + neg > 0 else 0.0


def mean_influence_per_test(res: Results) -> np.ndarray:
    """[n_test] mean of each test example's top-k proponent and opponent scores (net pull)."""
    return np.concatenate([res.pro_values, res.opp_values], axis=1).mean(axis=1)


def false_predictions(res: Results) -> List[Dict[str, Any]]:
    """Every scored test and training image the final model gets wrong, test images first."""
    rows = []
    for split, table in (("test", res.test), ("train", res.train)):
        for r in table.values():
            if not r["correct"]:
                rows.append({"split": split, "index": r["index"], "file": r["file"], "label": r["label"],
                             "predicted": r["predicted"], "confidence": r["confidence"]})
    return rows


def cross_analysis(res: Results) -> Tuple[List[Dict[str, Any]], float]:
    """For each mispredicted training image: in how many test top-k proponent lists it appears, and
    for how many of those the test image is mispredicted the same way (the test's (label, predicted)
    pair equals the training image's pair, or its reverse). The error-propagation rate is the sum of
    the latter over the sum of the former (0 when no mispredicted training image is a proponent)."""
    wrong_train = {i: r for i, r in res.train.items() if not r["correct"]}
    appearances: Dict[int, int] = defaultdict(int)
    same_way: Dict[int, int] = defaultdict(int)
    for row, t in enumerate(res.test_indices.tolist()):
        test = res.test[int(t)]
        pair = (test["label"], test["predicted"])
        for j in set(res.pro_indices[row].tolist()):
            if j in wrong_train:
                appearances[j] += 1
                tr = wrong_train[j]
                if not test["correct"] and pair in ((tr["label"], tr["predicted"]), (tr["predicted"], tr["label"])):
                    same_way[j] += 1
    rows = [{"train_index": i, "file": r["file"], "label": r["label"], "predicted": r["predicted"],
             "test_topk_appearances": appearances[i], "same_way_mispredicted_tests": same_way[i]}
            for i, r in sorted(wrong_train.items(), key=lambda kv: -appearances[kv[0]])]
    total = sum(appearances.values())
    return rows, (sum(same_way.values()) / total if total else 0.0)


def cross_pairs(res: Results) -> List[Dict[str, Any]]:
    """The original tools' cross-analysis table: one row per (mispredicted test image, mispredicted training image among
    its top-k proponents), with the proponent's score and rank and whether both made the same error (same predicted class)."""
    rows = []
    for row, t in enumerate(res.test_indices.tolist()):
        test = res.test[int(t)]
        if test["correct"]:
            continue
        for rank, (j, v) in enumerate(zip(res.pro_indices[row].tolist(), res.pro_values[row].tolist()), start=1):
            tr = res.train[j]
            if not tr["correct"]:
                rows.append({"test_idx": int(t), "test_true": test["label"], "test_pred": test["predicted"], "train_idx": j,
                             "train_true": tr["label"], "train_pred": tr["predicted"], "influence": float(v), "rank": rank,
                             "same_error": tr["predicted"] == test["predicted"]})
    return rows


def class_influencers(res: Results, per_class: int = 10) -> Dict[str, Dict[str, List[Tuple[int, float]]]]:
    """Per test class: the training images with the largest summed proponent score over that class's
    test images ("helpful") and the most negative summed opponent score ("harmful"): (train index, score)."""
    helpful: Dict[str, Dict[int, float]] = defaultdict(lambda: defaultdict(float))
    harmful: Dict[str, Dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for row, t in enumerate(res.test_indices.tolist()):
        label = res.test[int(t)]["label"]
        for j, v in zip(res.pro_indices[row].tolist(), res.pro_values[row].tolist()):
            helpful[label][j] += v
        for j, v in zip(res.opp_indices[row].tolist(), res.opp_values[row].tolist()):
            harmful[label][j] += v
    out = {}
    for name in res.class_names:
        out[name] = {
            "helpful": sorted(helpful[name].items(), key=lambda kv: -kv[1])[:per_class],
            "harmful": sorted(harmful[name].items(), key=lambda kv: kv[1])[:per_class],
        }
    return out


def class_summary(res: Results) -> List[Dict[str, Any]]:
    """Per class: test count, test accuracy, mean net influence, share of proponents with the same label."""
    mean_inf = mean_influence_per_test(res)
    rows = []
    for name in res.class_names:
        rows_of = [row for row, t in enumerate(res.test_indices.tolist()) if res.test[int(t)]["label"] == name]
        same = [res.train[j]["label"] == name for row in rows_of for j in res.pro_indices[row].tolist() if j in res.train]
        rows.append({
            "class": name, "n_test": len(rows_of),
            "test_accuracy": float(np.mean([res.test[int(res.test_indices[r])]["correct"] for r in rows_of])) if rows_of else float("nan"),
            "mean_influence": float(mean_inf[rows_of].mean()) if rows_of else float("nan"),
            "proponent_label_agreement": float(np.mean(same)) if same else float("nan"),
        })
    return rows


def mislabel_candidates(res: Results) -> List[Dict[str, Any]]:
    """Training images by self-influence, highest first, with the final model's prediction."""
    if res.self_influence is None:
        return []
    return [{"rank": r["rank"], "train_index": r["train_index"], "file": r["train_file"], "label": r["label"],
             "predicted": r["predicted"], "self_influence": r["score"], "model_disagrees": not _correct(res, r),
             **{k: r[k] for k in ("summed_loss", "summed_loss_rank") if k in r}}
            for r in sorted(res.self_influence, key=lambda r: r["rank"])]


def influence_summary(res: Results) -> List[Dict[str, Any]]:
    """Per test image, from its top-k proponents and opponents: mean influence, positive and negative counts and
    mass, and the share of proponents with the test image's label."""
    rows = []
    for row, t in enumerate(res.test_indices.tolist()):
        test = res.test[int(t)]
        scores = np.concatenate([res.pro_values[row], res.opp_values[row]])
        same = [res.train[j]["label"] == test["label"] for j in res.pro_indices[row].tolist() if j in res.train]
        rows.append({"test_index": int(t), "file": test["file"], "label": test["label"], "predicted": test["predicted"],
                     "mean_influence": float(scores.mean()), "positive_count": int((scores > 0).sum()),
                     "negative_count": int((scores < 0).sum()), "positive_mass": float(scores[scores > 0].sum()),
                     "negative_mass": float(scores[scores < 0].sum()),
                     "proponent_label_agreement": float(np.mean(same)) if same else float("nan")})
    return rows


def harmful_images(res: Results, n: int = 20) -> List[Tuple[int, float]]:
    """The training images with the most negative summed opponent score over every test image: (train index, score)."""
    total: Dict[int, float] = defaultdict(float)
    for row in range(res.opp_values.shape[0]):
        for j, v in zip(res.opp_indices[row].tolist(), res.opp_values[row].tolist()):
            total[j] += v
    return sorted(((j, v) for j, v in total.items() if v < 0), key=lambda kv: kv[1])[:n]


def confusion_pairs(res: Results, per_pair: int = 10) -> List[Dict[str, Any]]:
    """For each confusion among the test images (label -> predicted), most frequent first: the training images that
    appear most often among those test images' proponents (the ones that drive the confusion)."""
    pairs: Dict[Tuple[str, str], List[int]] = defaultdict(list)
    for row, t in enumerate(res.test_indices.tolist()):
        test = res.test[int(t)]
        if not test["correct"]:
            pairs[(test["label"], test["predicted"])].append(row)
    out = []
    for (label, predicted), rows in sorted(pairs.items(), key=lambda kv: -len(kv[1])):
        count: Dict[int, int] = defaultdict(int)
        mass: Dict[int, float] = defaultdict(float)
        for row in rows:
            for j, v in zip(res.pro_indices[row].tolist(), res.pro_values[row].tolist()):
                count[j] += 1
                mass[j] += v
        for j in sorted(count, key=lambda j: (-count[j], -mass[j]))[:per_pair]:
            r = res.train[j]
            out.append({"test_label": label, "test_predicted": predicted, "test_images": len(rows), "train_index": j,
                        "file": r["file"], "train_label": r["label"], "appearances": count[j], "summed_score": mass[j]})
    return out


def misprediction_influence(res: Results) -> List[Dict[str, Any]]:
    """Per mispredicted test image: how many of its top-k proponents carry the predicted class (they pull towards
    the error) or the true one, their summed scores, and the strongest proponent of the wrong class."""
    rows = []
    for row, t in enumerate(res.test_indices.tolist()):
        test = res.test[int(t)]
        if test["correct"]:
            continue
        pros = list(zip(res.pro_indices[row].tolist(), res.pro_values[row].tolist()))
        toward = [(j, v) for j, v in pros if res.train[j]["label"] == test["predicted"]]
        true = [(j, v) for j, v in pros if res.train[j]["label"] == test["label"]]
        top = max(toward, key=lambda jv: jv[1], default=None)
        rows.append({"test_index": int(t), "file": test["file"], "label": test["label"], "predicted": test["predicted"],
                     "confidence": test["confidence"], "proponents_of_predicted_class": len(toward),
                     "proponents_of_true_class": len(true), "score_toward_predicted": float(sum(v for _, v in toward)),
                     "score_toward_true": float(sum(v for _, v in true)),
                     "strongest_wrong_class_proponent": res.train[top[0]]["file"] if top else "",
                     "its_score": float(top[1]) if top else float("nan")})
    return rows
