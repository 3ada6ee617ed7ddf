"""report.html for the results of ``tracin text``: the image report's sections and navigation, with every example
shown as its text (escaped; the page loads nothing from the network)."""
from __future__ import annotations

from html import escape
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .html import NAV, STYLE, files_section, findings_and_dashboard, page_head, table, tests_page
from .load import Results

TEXT_STYLE = """
.tcard{border:1px solid #d0d7de;border-radius:6px;padding:6px 8px;margin:4px 0;font-size:13px;background:#fafbfc}
.tcard .m{color:#57606a;font-size:11px;margin-top:3px} .tpair{display:grid;grid-template-columns:1fr 1fr 1fr;gap:14px;
border-bottom:1px solid #eee;padding:10px 0} .ttest{font-size:14px} .flag{color:#cf222e;font-weight:bold}
"""


def text_card(text: str, meta: str, suspect: bool = False) -> str:
    """One example as a box: its text, then a line of what is known about it."""
    flag = " <span class='flag'>likely mislabelled</span>" if suspect else ""
    return f"<div class='tcard'><div>{escape(text or '')}</div><div class='m'>{escape(meta)}{flag}</div></div>"


def _label_words(res: Optional[Results], label: str, predicted: str) -> str:
    if res is not None and not res.class_names:  # a language model: completions
        return f"completion: {label} · model: {predicted}"
    return f"label {label} · model says {predicted}"


def test_blocks(tests: Sequence[Dict[str, Any]], language_model: bool) -> List[str]:
    """One block per test text: the text with its label (completion) and prediction, its top proponents and opponents."""
    parts = []
    for t in tests:
        said = (f"completion: {t['label']}<br>model: {t['predicted']}" if language_model
                else f"label {t['label']}<br>predicted {t['predicted']}")
        lists = []
        for key, title, cls in (("pro", "Proponents", "pro"), ("opp", "Opponents", "opp")):
            cards = "".join(text_card(text or "", f"{'completion' if language_model else 'label'} {lab} · score {s:+.3g}", flag)
                            for _, lab, s, flag, text in t[key])
            lists.append(f"<div><b class='{cls}'>{title}</b>{cards}</div>")
        head = f"<div class='ttest'><b>{escape(t['text'] or '')}</b><div class='m'>{escape(t['file'])}</div>"
        parts.append(f"<div class='tpair'>{head}<p>{_escaped_lines(said)}</p></div>{''.join(lists)}</div>")
    return parts


def _escaped_lines(text: str) -> str:
    return "<br>".join(escape(line) for line in text.split("<br>"))


def render_tests_page(tests: Sequence[Dict[str, Any]], title: str, root: Optional[Path], language_model: bool = False) -> str:
    """A page of more test texts (report_tests_N.html), linked from report.html."""
    return tests_page(title, test_blocks(tests, language_model), STYLE + TEXT_STYLE)


def _with_text(rows: Sequence[Dict[str, Any]], res: Results, key: str = "train_index", split: str = "train") -> List[Dict[str, Any]]:
    """``rows`` with each example's text beside its other columns."""
    lookup = res.train if split == "train" else res.test
    return [{**r, "text": lookup.get(r[key], {}).get("text", "")} for r in rows]


def _summary(ctx: Dict[str, Any], res: Results) -> List[str]:
    parts = [f"<h2 id='summary'>Summary</h2><p class='band'>Health score {ctx['health']:.1f}% — {escape(ctx['band'])}</p>",
             f"<p>{escape(ctx['findings'][0])}</p>"]
    flagged = [r for r in ctx["mislabels"] if r["train_index"] in ctx.get("suspects", set())][:12]
    if flagged:
        parts.append("<h3>Suspected mislabels (highest self-influence first)</h3>" + "".join(
            text_card(res.train[r["train_index"]].get("text", ""), f"{r['file']} · {_label_words(res, r['label'], r['predicted'])}")
            for r in flagged))
    wrong = [t for t in ctx["tests"] if not t["correct"]][:6]
    if wrong:
        parts.append("<h3>Wrong test predictions and their strongest opponents</h3>")
        parts += test_blocks([{**t, "pro": []} for t in wrong], not res.class_names)
    return parts


def _classes(ctx: Dict[str, Any], res: Results) -> List[str]:
    if not res.class_names:
        return ["<h2 id='classes'>Classes</h2><p>A language model's completions have no classes; see the test texts below.</p>"]
    parts = ["<h2 id='classes'>Classes</h2>" + table(ctx["class_rows"], ["class", "n_test", "test_accuracy", "mean_influence",
                                                                        "proponent_label_agreement"], limit=1000)]
    for name, picks in ctx["class_figures"]:
        lists = []
        for kind, cls in (("helpful", "pro"), ("harmful", "opp")):
            cards = "".join(text_card(res.train[j].get("text", ""), f"label {res.train[j]['label']} · summed score {v:+.3g}")
                            for j, v in picks[kind])
            lists.append(f"<div><b class='{cls}'>Most {kind} for {escape(name)} test texts</b>{cards}</div>")
        parts.append(f"<h3>{escape(name)}</h3><div class='tpair' style='grid-template-columns:1fr 1fr'>{''.join(lists)}</div>")
    return parts


def render(ctx: Dict[str, Any], res: Results) -> str:
    """The whole page from the report context built by :func:`tracin.workflows.analysis.report.build_report`."""
    lm = not res.class_names
    parts: List[str] = [page_head("TracIn report", STYLE + TEXT_STYLE), "<h1>TracIn influence report</h1>",
                        f"<p>{escape(ctx['subtitle'])}</p>", NAV.replace("Test images", "Test texts")]
    parts += _summary(ctx, res)
    parts += findings_and_dashboard(ctx)
    parts += _classes(ctx, res)
    if ctx["mislabels"]:
        parts.append("<h2 id='mislabels'>Mislabel candidates (highest self-influence first)</h2>"
                     + table(_with_text(ctx["mislabels"], res), ["rank", "file", "text", "label", "predicted", "self_influence"], limit=40))
    else:
        parts.append("<h2 id='mislabels'>Mislabel candidates</h2><p>Self-influence was not computed: run <code>tracin text "
                     "--self_influence</code>.</p>")
    false_rows = [{**r, "text": (res.test if r["split"] == "test" else res.train)[r["index"]].get("text", "")} for r in ctx["false_rows"]]
    parts.append(f"<h2 id='false'>False predictions ({len(false_rows)}, test texts first)</h2>"
                 + table(false_rows, ["split", "file", "text", "label", "predicted", "confidence"], limit=60))
    parts.append(f"<h2 id='cross'>Misprediction cross-analysis</h2><p>Error-propagation rate: {ctx['propagation']:.1%} of the test "
                 "top-k appearances of mispredicted training texts land on test texts mispredicted the same way.</p>"
                 + table(_with_text(ctx["cross_rows"], res), ["file", "text", "label", "predicted", "test_topk_appearances",
                                                              "same_way_mispredicted_tests"], limit=40))
    shown, pages = ctx["tests"], ctx.get("pages", [])
    more = "".join(f" <a href='{escape(name)}'>{escape(span)}</a>" for name, span in pages)
    parts.append(f"<h2 id='tests'>Test texts: top proponents and opponents</h2><p>Showing {len(shown)} of {ctx['n_test']} test "
                 f"texts, every mispredicted one first; the others:{more or ' none'}. All are in top_k_influences.csv.</p>"
                 "<p>A <b>proponent</b> is a training text whose training steps lowered this test text's loss (it helped the "
                 "prediction of its label); an <b>opponent</b> raised it.</p>")
    parts += test_blocks(shown, lm)
    parts += files_section(ctx)
    return "\n".join(parts)
