"""``tracin report``: every figure, table and folder of the analysis, from a results directory."""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List


from ..errors import TracInError
from ..outputs import write_csv, write_json
from . import figures, html
from .load import Results, load_results
from .metrics import (class_influencers, class_summary, cross_analysis, false_predictions, health_score,
                      mean_influence_per_test, mislabel_candidates, opponent_share)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "_"


def _rates(rates: List[float]) -> str:
    """'0.02 (all 6)' or '0.1, 0.05, ...' shortened to fit the overview."""
    if len(set(rates)) == 1:
        return f"{rates[0]:g} (all {len(rates)})"
    text = ", ".join(f"{r:g}" for r in rates)
    return text if len(text) <= 28 else text[:25] + "..."


def _findings(res: Results, health: float, band: str, opp_share: float, false_rows, propagation: float,
              cross_rows, class_rows, mislabels) -> List[str]:
    n_test, n_train = len(res.test), len(res.train)
    wrong_test = sum(1 for r in false_rows if r["split"] == "test")
    wrong_train = sum(1 for r in false_rows if r["split"] == "train")
    out = [f"Health score {health:.1f}% ({band}): that share of the top-{res.pro_values.shape[1]} proponent mass is positive; "
           f"the top-{res.opp_values.shape[1]} opponents carry {opp_share:.1f}% of the combined proponent+opponent mass."]
    out.append(f"The final model gets {wrong_test} of {n_test} test images and {wrong_train} of {n_train} training images wrong.")
    scored = [r for r in class_rows if r["n_test"] > 0]
    if scored:
        worst = min(scored, key=lambda r: r["test_accuracy"])
        least = min(scored, key=lambda r: r["proponent_label_agreement"] if r["proponent_label_agreement"] == r["proponent_label_agreement"] else 1.0)
        out.append(f"Weakest class on test: {worst['class']} ({worst['test_accuracy']:.0%} accuracy). Class whose test images are "
                   f"least supported by their own class: {least['class']} ({least['proponent_label_agreement']:.0%} of its proponents share its label).")
    appearing = sum(1 for r in cross_rows if r["test_topk_appearances"] > 0)
    out.append(f"{appearing} mispredicted training images appear in test top-k proponent lists; error-propagation rate {propagation:.1%}.")
    if mislabels:
        top = mislabels[: max(1, len(mislabels) // 20)]
        disagree = sum(1 for r in top if r["model_disagrees"])
        out.append(f"In the top 5% by self-influence ({len(top)} images) the model disagrees with the given label for {disagree}: "
                   "inspect mislabel_candidates.csv from the top.")
    else:
        out.append("Self-influence was not computed: re-run 'tracin influence' with --self_influence to rank mislabel candidates.")
    if band in ("FAIR", "NEEDS ATTENTION"):
        out.append("Recommendation: many top proponents pull against their test images; review the harmful folders in top_influences/.")
    if propagation > 0.2:
        out.append("Recommendation: mispredicted training images propagate their errors; relabel or remove those in misprediction_cross_analysis.csv and retrain.")
    elif wrong_train:
        out.append("Recommendation: check the mispredicted training images in false_predictions.csv for label errors before retraining.")
    return out


def build_report(results_dir: Path, top_n: int = 10, html_tests: int = 100, gradcam: int = 0) -> Dict[str, Any]:
    """Write the report files into ``results_dir`` and return a summary (also in report_summary.json).
    ``gradcam`` > 0 adds Grad-CAM overlays for that many test images (needs the grad-cam package)."""
    if top_n < 1 or html_tests < 0 or gradcam < 0:
        raise TracInError(f"--top_n must be at least 1 and --html_tests and --gradcam 0 or more, got {top_n}, {html_tests} "
                          f"and {gradcam}.")
    res = load_results(Path(results_dir))
    out = res.directory
    cams = []
    if gradcam > 0:
        from .gradcam import gradcam_overlays

        cams = gradcam_overlays(res, gradcam)
    health, band = health_score(res.pro_values)
    opp_share = opponent_share(res.pro_values, res.opp_values)
    path_of = {i: r["file"] for i, r in res.train.items()}
    label_of = {i: r["label"] for i, r in res.train.items()}

    false_rows = false_predictions(res)
    write_csv(out / "false_predictions.csv", false_rows, ["split", "index", "file", "label", "predicted", "confidence"])
    figures.image_grid(out / "false_predictions.png", [(r["file"], f"{r['split']} {r['label']}→{r['predicted']}") for r in false_rows],
                       f"False predictions of the final model ({len(false_rows)}, first 100 shown)")
    cross_rows, propagation = cross_analysis(res)
    write_csv(out / "misprediction_cross_analysis.csv", cross_rows,
              ["train_index", "file", "label", "predicted", "test_topk_appearances", "same_way_mispredicted_tests"])
    mislabels = mislabel_candidates(res)
    if mislabels:
        write_csv(out / "mislabel_candidates.csv", mislabels,
                  ["rank", "train_index", "file", "label", "predicted", "self_influence", "model_disagrees"]
                  + [k for k in ("summed_loss", "summed_loss_rank") if k in mislabels[0]])

    influencers = class_influencers(res, top_n)
    class_rows = class_summary(res)
    class_figures = []
    folder = out / "top_influences"
    shutil.rmtree(folder, ignore_errors=True)
    for row in class_rows:
        name = row["class"]
        picks = influencers[name]
        for kind in ("helpful", "harmful"):
            target = folder / _safe(name) / kind
            target.mkdir(parents=True, exist_ok=True)
            for rank, (j, score) in enumerate(picks[kind], start=1):
                src = Path(path_of[j])
                shutil.copy2(src, target / f"{rank:02d}_{_safe(label_of[j])}_{src.name}")
        mix = Counter(label_of[j] for r, t in enumerate(res.test_indices.tolist()) if res.test[int(t)]["label"] == name
                      for j in res.pro_indices[r].tolist())
        fig = figures.class_summary_figure(
            out / f"{_safe(name)}_summary.png", name,
            {k: v for k, v in row.items() if k != "class"},
            [(path_of[j], f"{label_of[j]} {s:+.3g}") for j, s in picks["helpful"]],
            [(path_of[j], f"{label_of[j]} {s:+.3g}") for j, s in picks["harmful"]],
            {c: mix.get(c, 0) for c in res.class_names})
        class_figures.append((name, fig))

    findings = _findings(res, health, band, opp_share, false_rows, propagation, cross_rows, class_rows, mislabels)
    totals: Dict[int, float] = {}
    for row in range(res.pro_values.shape[0]):
        for j, v in zip(res.pro_indices[row].tolist(), res.pro_values[row].tolist()):
            totals[j] = totals.get(j, 0.0) + v
    top_helpful = sorted(totals.items(), key=lambda kv: -kv[1])[:10]
    m = res.manifest
    overview = {"Training images": f"{m['data']['n_train']} of {m['data']['n_train_total']}",
                "Test images": f"{m['data']['n_test']} of {m['data']['n_test_total']}",
                "Classes": len(res.class_names), "Checkpoints": len(m["checkpoints"]),
                "Learning rates": _rates([c["learning_rate"] for c in m["checkpoints"]]),
                "Layers / params": f"{len(m['scope'])} / {m['num_parameters']:,}", "Top-k": res.pro_values.shape[1],
                "Health score": health, "Band": band}
    dash = figures.dashboard(out / "analysis_dashboard.png", overview, res.pro_values, res.opp_values,
                             mean_influence_per_test(res), [(path_of[j], f"{label_of[j]} {s:+.3g}") for j, s in top_helpful], findings)

    tests = []
    for row, t in enumerate(res.test_indices.tolist()[:html_tests]):
        test = res.test[int(t)]
        tests.append({"file": test["file"], "label": test["label"], "predicted": test["predicted"],
                      "pro": [(path_of[j], label_of[j], v) for j, v in zip(res.pro_indices[row][:5].tolist(), res.pro_values[row][:5].tolist())],
                      "opp": [(path_of[j], label_of[j], v) for j, v in zip(res.opp_indices[row][:5].tolist(), res.opp_values[row][:5].tolist())]})
    page = html.render({
        "subtitle": f"{m['data']['arch']} on {m['data']['data_dir']} — {len(m['checkpoints'])} checkpoints, created {m['created']}",
        "health": health, "band": band, "findings": findings, "dashboard": dash, "class_rows": class_rows,
        "class_figures": class_figures, "mislabels": mislabels, "false_rows": false_rows, "propagation": propagation,
        "cross_rows": cross_rows, "tests": tests, "n_test": len(res.test_indices), "gradcam": cams,
    })
    tmp = out / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out / "report.html")
    summary = {"health_score": health, "band": band, "opponent_share": opp_share, "error_propagation_rate": propagation,
               "false_predictions": {"train": sum(r["split"] == "train" for r in false_rows), "test": sum(r["split"] == "test" for r in false_rows)},
               "findings": findings, "report": str(out / "report.html")}
    write_json(out / "report_summary.json", summary)
    return summary


