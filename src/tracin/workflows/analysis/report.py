"""``tracin report``: every figure, table and folder of the analysis, from a results directory."""
from __future__ import annotations

import os
from functools import partial
import shutil
import sys
from collections import Counter
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import numpy as np

from ...errors import TracInError
from ...io import clear_path, write_bytes, write_csv, write_json
from . import figures, html, text_page
from ..results_dir import REPORT_SUMMARY, report_outputs
from .load import Results, load_results
from .metrics import (Health, class_influencers, class_summary, confusion_pairs, cross_analysis, false_predictions, harmful_images,
                      cross_pairs, health, influence_summary, misprediction_influence, suspects,
                      mean_influence_per_test, mislabel_candidates, opponent_share)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "_"


def _folder_names(class_names: List[str]) -> Dict[str, str]:
    """A distinct file-system-safe name per class (``a b`` and ``a_b`` would otherwise share one folder and one
    summary; case is ignored, as some file systems do)."""
    names: Dict[str, str] = {}
    taken: set = set()
    for name in class_names:
        base = candidate = _safe(name).lstrip(".") or "_"
        n = 2
        while candidate.lower() in taken:
            candidate, n = f"{base}_{n}", n + 1
        taken.add(candidate.lower())
        names[name] = candidate
    return names


def _train_lookup(res: Results) -> Tuple[Dict[int, str], Dict[int, str]]:
    """({train index: file}, {train index: label}) of the scored training images."""
    return {i: r["file"] for i, r in res.train.items()}, {i: r["label"] for i, r in res.train.items()}


def _summed_over(manifest: Dict[str, Any]) -> str:
    """'3 checkpoints', or for an in-run record (tracin train --in_run) 'every step (N)'."""
    if manifest["checkpoints"] or "in_run" not in manifest:
        return f"{len(manifest['checkpoints'])} checkpoints"
    return f"every training step ({manifest['in_run'].get('steps', 0)}, in-run)"


def _rates(rates: List[float]) -> str:
    """'0.02 (all 6)' or '0.1, 0.05, ...' shortened to fit the overview."""
    if len(set(rates)) == 1:
        return f"{rates[0]:g} (all {len(rates)})"
    text = ", ".join(f"{r:g}" for r in rates)
    return text if len(text) <= 28 else text[:25] + "..."


@dataclass
class _Analysis:
    """What the report's sections compute from the results, shared by the findings, the dashboard and the page."""

    res: Results
    data_health: Health
    opp_share: float
    false_rows: List[Dict[str, Any]]
    cross_rows: List[Dict[str, Any]]
    propagation: float
    mislabels: List[Dict[str, Any]]
    class_rows: List[Dict[str, Any]] = field(default_factory=list)


def _findings(a: _Analysis) -> List[str]:
    res, opp_share, false_rows, h = a.res, a.opp_share, a.false_rows, a.data_health
    propagation, cross_rows, class_rows, mislabels = a.propagation, a.cross_rows, a.class_rows, a.mislabels
    n_test, n_train = len(res.test), len(res.train)
    images = "texts" if res.text else "images"
    wrong_test = sum(1 for r in false_rows if r["split"] == "test")
    wrong_train = sum(1 for r in false_rows if r["split"] == "train")
    out = [f"Health score {h.score:.1f}% ({h.band}): {h.scored - h.flagged} of the {h.scored} scored training {images} are not "
           f"flagged as likely mislabelled; {h.flagged} are flagged because {h.rule}. The top-{res.opp_values.shape[1]} "
           f"opponents carry {opp_share:.1f}% of the combined proponent+opponent mass."]
    out.append(f"The final model gets {wrong_test} of {n_test} test {images} and {wrong_train} of {n_train} training {images} wrong.")
    scored = [r for r in class_rows if r["n_test"] > 0]
    if scored:
        worst = min(scored, key=lambda r: r["test_accuracy"])
        least = min(scored, key=lambda r: r["proponent_label_agreement"] if r["proponent_label_agreement"] == r["proponent_label_agreement"] else 1.0)
        out.append(f"Weakest class on test: {worst['class']} ({worst['test_accuracy']:.0%} accuracy). Class whose test {images} are "
                   f"least supported by their own class: {least['class']} ({least['proponent_label_agreement']:.0%} of its proponents share its label).")
    appearing = sum(1 for r in cross_rows if r["test_topk_appearances"] > 0)
    out.append(f"{appearing} mispredicted training {images} appear in test top-k proponent lists; error-propagation rate {propagation:.1%}.")
    if mislabels:
        top = mislabels[: max(1, len(mislabels) // 20)]
        disagree = sum(1 for r in top if r["model_disagrees"])
        out.append(f"In the top 5% by self-influence ({len(top)} {images}) the model disagrees with the given label for {disagree}: "
                   "inspect mislabel_candidates.csv from the top.")
    else:
        out.append(f"Self-influence was not computed: re-run 'tracin {'text' if res.text else 'influence'}' with --self_influence to rank mislabel candidates.")
    if h.band in ("FAIR", "NEEDS ATTENTION"):
        out.append(f"Recommendation: many training {images} look mislabelled; review mislabel_candidates.csv from the top (or the "
                   "suspected mislabels at the top of this page), relabel or remove them, and retrain.")
    if propagation > 0.2:
        out.append(f"Recommendation: mispredicted training {images} propagate their errors; relabel or remove those in mispredicted_training_images.csv and retrain.")
    elif wrong_train:
        out.append(f"Recommendation: check the mispredicted training {images} in false_predictions.csv for label errors before retraining.")
    return out


def build_report(results_dir: Path, top_n: int = 10, html_tests: int = 100, gradcam: int = 0,
                 progress: bool = False) -> Dict[str, Any]:
    """Write the report files into ``results_dir`` and return a summary (also in report_summary.json).
    ``gradcam`` > 0 adds Grad-CAM overlays for that many test images (needs the grad-cam package); ``progress``
    says each step on standard error. Results of ``tracin text`` get the same sections with the texts shown."""
    say = (lambda step: print(f"tracin: report: {step}", file=sys.stderr, flush=True)) if progress else (lambda step: None)  # noqa: E731
    if top_n < 1 or html_tests < 0 or gradcam < 0:
        raise TracInError(f"--top_n must be at least 1 and --html_tests and --gradcam 0 or more, got {top_n}, {html_tests} "
                          f"and {gradcam}.")
    res = load_results(Path(results_dir))
    if res.text and gradcam:
        raise TracInError(f"--gradcam draws heat maps on images, and {results_dir} holds texts; drop --gradcam.")
    out = res.directory
    before, previous = set(os.listdir(out)), set(report_outputs(out))
    cams = []
    if gradcam > 0:
        say(f"Grad-CAM overlays of {gradcam} test images")
        from .gradcam import gradcam_overlays

        cams = gradcam_overlays(res, gradcam)
    say("tables (false predictions, cross-analysis, mislabel candidates, influence summary, confusion pairs)")
    analysis = _tables(res)
    say(f"{len(res.class_names)} class summaries" + ("" if res.text else " and image folders"))
    class_figures = _class_texts(analysis, top_n) if res.text else _class_sections(analysis, top_n)
    findings = _findings(analysis)
    say("dashboard and report.html")
    dash = _dashboard(analysis, findings)
    tests = _test_rows(res)
    first = max(html_tests, sum(not r["correct"] for r in res.test.values()))
    pages = _test_pages(res, tests[first:], max(html_tests, 1), first) if html_tests else []
    m = res.manifest
    data = m["data"]
    source = f"{Path(data['train_file']).name} and {Path(data['test_file']).name}" if res.text else html.shown(str(data["data_dir"]), out)
    context = {
        "root": out, "subtitle": f"{data['arch']} on {source} — {_summed_over(m)}, created {m['created']}",
        "health": analysis.data_health.score, "band": analysis.data_health.band, "findings": findings, "dashboard": dash,
        "suspects": suspects(res), "files": sorted(p.name for p in out.iterdir() if p.suffix in (".csv", ".png", ".json")),
        "class_rows": analysis.class_rows, "class_figures": class_figures, "mislabels": analysis.mislabels,
        "false_rows": analysis.false_rows, "propagation": analysis.propagation, "cross_rows": analysis.cross_rows,
        "tests": tests[:first], "pages": pages, "n_test": len(res.test_indices), "gradcam": cams,
    }
    page = text_page.render(context, res) if res.text else html.render(context)
    write_bytes(out / "report.html", page.encode("utf-8"))
    return _summary(analysis, findings, out, before, previous)


def _summary(analysis: "_Analysis", findings: List[str], out: Path, before: set, previous: set) -> Dict[str, Any]:
    """report_summary.json: the health, the findings and every file this report wrote."""
    false_rows = analysis.false_rows
    summary = {"health_score": analysis.data_health.score, "band": analysis.data_health.band,
               "flagged_as_mislabelled": analysis.data_health.flagged, "health_rule": analysis.data_health.rule,
               "opponent_share": analysis.opp_share,
               "error_propagation_rate": analysis.propagation,
               "false_predictions": {"train": sum(r["split"] == "train" for r in false_rows), "test": sum(r["split"] == "test" for r in false_rows)},
               "findings": findings, "report": str(out / "report.html")}
    after = set(os.listdir(out))  # what this report wrote, and what an earlier one wrote and this one rewrote
    summary["outputs"] = sorted(((after - before) | (previous & after)) - {REPORT_SUMMARY})
    write_json(out / REPORT_SUMMARY, summary)
    return summary


def _tables(res: Results) -> _Analysis:
    """Health, false predictions, the misprediction cross-analysis and mislabel candidates, with their CSVs and figure."""
    out = res.directory
    false_rows = false_predictions(res)
    write_csv(out / "false_predictions.csv", false_rows, ["split", "index", "file", "label", "predicted", "confidence"])
    if not res.text:
        figures.image_grid(out / "false_predictions.png", [(r["file"], f"{r['split']} {r['label']}→{r['predicted']}") for r in false_rows],
                           f"False predictions of the final model ({len(false_rows)}, first 100 shown)")
    cross_rows, propagation = cross_analysis(res)
    write_csv(out / "mispredicted_training_images.csv", cross_rows,
              ["train_index", "file", "label", "predicted", "test_topk_appearances", "same_way_mispredicted_tests"])
    write_csv(out / "misprediction_cross_analysis.csv", cross_pairs(res),
              ["test_idx", "test_true", "test_pred", "train_idx", "train_true", "train_pred", "influence", "rank", "same_error"])
    write_csv(out / "influence_summary.csv", influence_summary(res),
              ["test_index", "file", "label", "predicted", "mean_influence", "positive_count", "negative_count",
               "positive_mass", "negative_mass", "proponent_label_agreement"])
    write_csv(out / "misprediction_influence_analysis.csv", misprediction_influence(res),
              ["test_index", "file", "label", "predicted", "confidence", "proponents_of_predicted_class",
               "proponents_of_true_class", "score_toward_predicted", "score_toward_true", "strongest_wrong_class_proponent",
               "its_score"])
    write_csv(out / "confusion_pairs.csv", confusion_pairs(res),
              ["test_label", "test_predicted", "test_images", "train_index", "file", "train_label", "appearances", "summed_score"])
    mislabels = mislabel_candidates(res)
    if mislabels:
        write_csv(out / "mislabel_candidates.csv", mislabels,
                  ["rank", "train_index", "file", "label", "predicted", "self_influence", "model_disagrees"]
                  + [k for k in ("summed_loss", "summed_loss_rank") if k in mislabels[0]])
    return _Analysis(res, health(res), opponent_share(res.pro_values, res.opp_values), false_rows, cross_rows, propagation, mislabels)


def _class_sections(a: _Analysis, top_n: int) -> List[Tuple[str, Any]]:
    """Per class: the helpful/harmful folders under top_influences/ and the summary figure; fills ``a.class_rows``."""
    res = a.res
    out = res.directory
    path_of, label_of = _train_lookup(res)
    influencers_of = class_influencers(res, top_n)
    a.class_rows = class_summary(res)
    class_figures = []
    folder = out / "top_influences"
    clear_path(folder)  # a link planted there is removed, never followed
    _copy_negative(res, path_of, label_of)
    safe = _folder_names(res.class_names)
    for row in a.class_rows:
        name = row["class"]
        picks = influencers_of[name]
        for kind in ("helpful", "harmful"):
            target = folder / safe[name] / kind
            target.mkdir(parents=True, exist_ok=True)
            for rank, (j, score) in enumerate(picks[kind], start=1):
                src = Path(path_of[j])
                shutil.copy2(src, target / f"{rank:02d}_{_safe(label_of[j])}_{src.name}")
        mix = Counter(label_of[j] for r, t in enumerate(res.test_indices.tolist()) if res.test[int(t)]["label"] == name
                      for j in res.pro_indices[r].tolist())
        fig = figures.class_summary_figure(
            out / f"{safe[name]}_summary.png", name,
            {k: v for k, v in row.items() if k != "class"},
            [(path_of[j], f"{label_of[j]} {s:+.3g}") for j, s in picks["helpful"]],
            [(path_of[j], f"{label_of[j]} {s:+.3g}") for j, s in picks["harmful"]],
            {c: mix.get(c, 0) for c in res.class_names})
        class_figures.append((name, fig))
    return class_figures


def _class_texts(a: _Analysis, top_n: int) -> List[Tuple[str, Any]]:
    """Per class of a text classifier: its ``top_n`` helpful and harmful training texts as (class, {"helpful": [(train
    index, score)], "harmful": [...]}) for the page; fills ``a.class_rows``."""
    a.class_rows = class_summary(a.res)
    influencers_of = class_influencers(a.res, top_n)
    return [(row["class"], influencers_of[row["class"]]) for row in a.class_rows]


def _copy_negative(res: Results, path_of: Dict[int, str], label_of: Dict[int, str]) -> None:
    """negative/: the training images that hurt the test predictions most (summed opponent scores), to review."""
    folder = res.directory / "negative"
    clear_path(folder)
    folder.mkdir()
    for rank, (j, score) in enumerate(harmful_images(res), start=1):
        src = Path(path_of[j])
        shutil.copy2(src, folder / f"{rank:02d}_{_safe(label_of[j])}_{score:+.3g}_{src.name}")


def _dashboard(a: _Analysis, findings: List[str]) -> Any:
    """analysis_dashboard.png: the overview, score distributions, mean influence and the most helpful images."""
    res = a.res
    path_of, label_of = _train_lookup(res)
    totals: Dict[int, float] = {}
    for row in range(res.pro_values.shape[0]):
        for j, v in zip(res.pro_indices[row].tolist(), res.pro_values[row].tolist()):
            totals[j] = totals.get(j, 0.0) + v
    top_helpful = sorted(totals.items(), key=lambda kv: -kv[1])[:10]
    m = res.manifest
    noun = "texts" if res.text else "images"
    overview = {f"Training {noun}": f"{m['data']['n_train']} of {m['data']['n_train_total']}",
                f"Test {noun}": f"{m['data']['n_test']} of {m['data']['n_test_total']}",
                "Classes": len(res.class_names), "Checkpoints": _summed_over(m),
                "Learning rates": _rates([c["learning_rate"] for c in m["checkpoints"]]) if m["checkpoints"] else "each step's",
                "Layers / params": f"{len(m['scope'])} / {m['num_parameters']:,}", "Top-k": res.pro_values.shape[1],
                "Health score": a.data_health.score, "Band": a.data_health.band}
    helpful = [] if res.text else [(path_of[j], f"{label_of[j]} {s:+.3g}") for j, s in top_helpful]
    return figures.dashboard(res.directory / "analysis_dashboard.png", overview, res.pro_values, res.opp_values,
                             (mean_influence_per_test(res), np.array([not res.test[int(t)]["correct"] for t in res.test_indices])),
                             helpful, findings)


def _test_pages(res: Results, rest: List[Dict[str, Any]], size: int, offset: int) -> List[Tuple[str, str]]:
    """report_tests_N.html pages of ``size`` test images each, so every test image is reachable from report.html;
    (file name, "first-last") of each. Old pages are removed first."""
    out = res.directory
    render = partial(text_page.render_tests_page, language_model=not res.class_names) if res.text else html.render_tests_page
    noun = "Test texts" if res.text else "Test images"
    for old in out.glob("report_tests_*.html"):
        clear_path(old)
    pages = []
    for n, start in enumerate(range(0, len(rest), size), start=2):
        chunk = rest[start:start + size]
        span = f"{offset + start + 1}-{offset + start + len(chunk)}"
        name = f"report_tests_{n}.html"
        write_bytes(out / name, render(chunk, f"{noun} {span}", out).encode("utf-8"))
        pages.append((name, span))
    return pages


def _test_rows(res: Results) -> List[Dict[str, Any]]:
    """Every test image with its top-5 proponents and opponents for the pages, mispredicted ones first. Each listed
    training example: (file, label, score, flagged as a likely mislabel, its text or None)."""
    path_of, label_of = _train_lookup(res)
    flagged = suspects(res)
    order = sorted(range(len(res.test_indices)), key=lambda r: res.test[int(res.test_indices[r])]["correct"])
    tests = []
    for row in order:
        test = res.test[int(res.test_indices[row])]
        pick = lambda idx, vals: [(path_of[j], label_of[j], v, j in flagged, res.train[j].get("text"))  # noqa: E731
                                  for j, v in zip(idx[row][:5].tolist(), vals[row][:5].tolist())]
        tests.append({"file": test["file"], "text": test.get("text"), "label": test["label"], "predicted": test["predicted"],
                      "correct": test["correct"],
                      "pro": pick(res.pro_indices, res.pro_values), "opp": pick(res.opp_indices, res.opp_values)})
    return tests
