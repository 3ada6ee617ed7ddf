"""report.html: one self-contained page (images inlined as base64), every name escaped."""
from __future__ import annotations

import base64
import io
import os
from html import escape
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from PIL import Image

from .figures import thumbnail

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#1f2328;max-width:1400px}
h1{margin-bottom:4px} h2{border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #d0d7de;padding:3px 6px;text-align:left}
.band{font-weight:bold;font-size:20px} .pro{color:#1a7f37} .opp{color:#cf222e}
.cards{display:flex;flex-wrap:wrap;gap:6px} .card{font-size:11px;text-align:center;width:100px}
.pair{display:grid;grid-template-columns:130px 1fr 1fr;gap:12px;align-items:start;border-bottom:1px solid #eee;padding:8px 0}
img.full{max-width:100%}
"""


def data_uri_png(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def shown(path: str, root: Optional[Path]) -> str:
    """How the page names a file: relative to the results folder ``root`` (no absolute local paths)."""
    if root is None:
        return Path(path).name
    try:
        return os.path.relpath(path, root)
    except ValueError:  # another drive
        return Path(path).name


def thumb_tag(path: str, size: int = 96, title: str = "", root: Optional[Path] = None) -> str:
    buffer = io.BytesIO()
    Image.fromarray(thumbnail(path, size)).save(buffer, format="PNG")
    src = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    image = (f'<img src="{src}" width="{size}" height="{size}" alt="{escape(Path(path).name)}" '
             f'title="{escape(title or shown(path, root))}">')
    if root is None:
        return image
    return f'<a href="{escape(Path(shown(path, root)).as_posix())}">{image}</a>'  # the full-size image, relative to the page


def card(path: str, caption: str, root: Optional[Path] = None, suspect: bool = False) -> str:
    flag = "<br><b class='opp'>likely mislabelled</b>" if suspect else ""
    return f'<div class="card">{thumb_tag(path, root=root)}<br>{escape(caption)}{flag}</div>'


def table(rows: Sequence[Dict[str, Any]], columns: Sequence[str], limit: int = 50, image_column: str = "",
          root: Optional[Path] = None) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in ([image_column and "image"] if image_column else []) + list(columns))
    body = []
    for r in rows[:limit]:
        cells = [f"<td>{thumb_tag(str(r[image_column]), 48, root=root)}</td>"] if image_column else []
        for c in columns:
            v = r.get(c, "")
            text = shown(str(v), root) if c == image_column else f"{v:.4g}" if isinstance(v, float) else str(v)
            cells.append(f"<td>{escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    more = f"<p>{len(rows) - limit} more rows in the CSV.</p>" if len(rows) > limit else ""
    return f"<table><tr>{head}</tr>{''.join(body)}</table>{more}"


NAV = ("<nav><a href='#summary'>Summary</a> · <a href='#findings'>Findings</a> · <a href='#dashboard'>Dashboard</a> · "
       "<a href='#classes'>Classes</a> · <a href='#mislabels'>Mislabel candidates</a> · <a href='#false'>False predictions</a> · "
       "<a href='#cross'>Cross-analysis</a> · <a href='#tests'>Test images</a> · <a href='#files'>Files</a></nav>")


def _summary(ctx: Dict[str, Any], root: Optional[Path]) -> List[str]:
    """The top of the page: the health score, the suspected mislabels and the wrong test predictions with the
    training images that pulled against them."""
    parts = [f"<h2 id='summary'>Summary</h2><p class='band'>Health score {ctx['health']:.1f}% — {escape(ctx['band'])}</p>",
             f"<p>{escape(ctx['findings'][0])}</p>"]
    flagged = [r for r in ctx["mislabels"] if r["train_index"] in ctx.get("suspects", set())][:12]
    if flagged:
        parts.append("<h3>Suspected mislabels (highest self-influence first)</h3><div class='cards'>"
                     + "".join(card(r["file"], f"label {r['label']}, model says {r['predicted']}", root) for r in flagged) + "</div>")
    wrong = [t for t in ctx["tests"] if t["label"] != t["predicted"]][:6]
    if wrong:
        parts.append("<h3>Wrong test predictions and their strongest opponents</h3>")
        for t in wrong:
            parts.append(f"<div class='pair'><div>{thumb_tag(t['file'], 96, root=root)}<br>label {escape(t['label'])}, predicted "
                         f"{escape(t['predicted'])}</div><div class='cards'>"
                         + "".join(card(p, f"label {lab}, score {s:+.3g}", root, flag) for p, lab, s, flag, _ in t["opp"][:4])
                         + "</div><div></div></div>")
    return parts


def test_pairs(tests: Sequence[Dict[str, Any]], root: Optional[Path]) -> List[str]:
    """One block per test image: the image, its label and prediction, its top proponents and opponents."""
    parts = []
    for t in tests:
        pro = "".join(card(p, f"label {lab}, score {s:+.3g}", root, flag) for p, lab, s, flag, _ in t["pro"])
        opp = "".join(card(p, f"label {lab}, score {s:+.3g}", root, flag) for p, lab, s, flag, _ in t["opp"])
        parts.append(
            f"<div class='pair'><div>{thumb_tag(t['file'], 120, root=root)}<br>{escape(Path(t['file']).name)}<br>label {escape(t['label'])}"
            f"<br>predicted {escape(t['predicted'])}</div><div><b class='pro'>Proponents</b><div class='cards'>{pro}</div></div>"
            f"<div><b class='opp'>Opponents</b><div class='cards'>{opp}</div></div></div>"
        )
    return parts


def page_head(title: str, style: str = STYLE) -> str:
    """The start of a page, up to its opened body."""
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title><style>{style}</style></head><body>"


def tests_page(title: str, blocks: List[str], style: str = STYLE) -> str:
    """A page of more test examples (report_tests_N.html) from their rendered blocks, linked back to report.html."""
    head = page_head(title, style) + f"<h1>{escape(title)}</h1><p><a href='report.html'>Back to the report</a></p>"
    return "\n".join([head] + blocks + ["</body></html>"])


def findings_and_dashboard(ctx: Dict[str, Any]) -> List[str]:
    """The findings list and the dashboard figure of a report page."""
    return ["<h2 id='findings'>Key findings and recommendations</h2><ul>" + "".join(f"<li>{escape(f)}</li>" for f in ctx["findings"])
            + "</ul>", f"<h2 id='dashboard'>Dashboard</h2><img class='full' src='{data_uri_png(ctx['dashboard'])}' alt='dashboard'>"]


def files_section(ctx: Dict[str, Any]) -> List[str]:
    """The links to the results folder's files, and the page's end."""
    return ["<h2 id='files'>Files</h2><ul>" + "".join(f"<li><a href='{escape(f)}'>{escape(f)}</a></li>" for f in ctx.get("files", []))
            + "</ul>", "</body></html>"]


def render_tests_page(tests: Sequence[Dict[str, Any]], title: str, root: Optional[Path]) -> str:
    """A page of more test images (report_tests_N.html), linked from report.html."""
    return tests_page(title, test_pairs(tests, root))


def render(ctx: Dict[str, Any]) -> str:
    """The whole page from the report context built by :func:`tracin.workflows.analysis.report.build_report`."""
    root = ctx.get("root")
    parts: List[str] = [page_head("TracIn report")]
    parts.append("<h1>TracIn influence report</h1>")
    parts.append(f"<p>{escape(ctx['subtitle'])}</p>")
    parts.append(NAV)
    parts += _summary(ctx, root)
    parts += findings_and_dashboard(ctx)
    parts.append("<h2 id='classes'>Classes</h2>" + table(ctx["class_rows"], ["class", "n_test", "test_accuracy", "mean_influence", "proponent_label_agreement"], limit=1000))
    for name, fig in ctx["class_figures"]:
        parts.append(f"<h3>{escape(name)}</h3><img class='full' src='{data_uri_png(fig)}' alt='{escape(name)} summary'>")
    if ctx["mislabels"]:
        parts.append("<h2 id='mislabels'>Mislabel candidates (highest self-influence first)</h2>")
        parts.append(table(ctx["mislabels"], ["rank", "file", "label", "predicted", "self_influence"], limit=40, image_column="file", root=root))
    else:
        parts.append("<h2 id='mislabels'>Mislabel candidates</h2><p>Self-influence was not computed: run <code>tracin influence --self_influence</code>.</p>")
    parts.append(f"<h2 id='false'>False predictions ({len(ctx['false_rows'])}, test images first)</h2>")
    parts.append(table(ctx["false_rows"], ["split", "file", "label", "predicted", "confidence"], limit=60, image_column="file",
                       root=root))
    parts.append(f"<h2 id='cross'>Misprediction cross-analysis</h2><p>Error-propagation rate: {ctx['propagation']:.1%} of the test top-k "
                 "appearances of mispredicted training images land on test images mispredicted the same way.</p>")
    parts.append(table(ctx["cross_rows"], ["file", "label", "predicted", "test_topk_appearances", "same_way_mispredicted_tests"], limit=40, image_column="file",
                       root=root))
    if ctx.get("gradcam"):
        parts.append("<h2>Grad-CAM</h2>" + "".join(f"<img class='full' src='{data_uri_png(p)}' alt='Grad-CAM'>" for p in ctx["gradcam"]))
    shown, pages = ctx["tests"], ctx.get("pages", [])
    more = "".join(f" <a href='{escape(name)}'>{escape(span)}</a>" for name, span in pages)
    parts.append(f"<h2 id='tests'>Test images: top proponents and opponents</h2><p>Showing {len(shown)} of {ctx['n_test']} test "
                 f"images, every mispredicted one first; the others:{more or ' none'}. All are in top_k_influences.csv.</p>"
                 "<p>A <b>proponent</b> is a training image whose training step lowered this test image's loss (it helped the "
                 "prediction of its label); an <b>opponent</b> raised it. An opponent often shares the test image's label: "
                 "an atypical or mislabelled image of the same class pulls the model elsewhere, so opponents are where to "
                 "look for training images that work against the class, whatever their label.</p>")
    parts += test_pairs(shown, root)
    parts += files_section(ctx)
    return "\n".join(parts)
