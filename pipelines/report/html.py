"""The report people read: one self-contained HTML page (inline CSS and SVG, no scripts, no fetches).

What was selected and why (corpus map, per-cluster sections, distributions; see ``report_data``) comes
first when the run provides it, then the label loop on nights run with labels (``loop_charts``), then what the
run cost.
"""

from __future__ import annotations

import html
import math
from typing import Any, Optional

from labelnext.pipelines.report.charts import cluster_size_chart, uncertainty_chart
from labelnext.pipelines.report.clusters import cluster_sections
from labelnext.pipelines.report.data import ReportView
from labelnext.pipelines.report.format import finite, stages_in_order, usd
from labelnext.pipelines.report.loop_charts import loop_section
from labelnext.pipelines.report.corpus_map import corpus_map_svg

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:60rem;color:#1d2330;padding:0 1rem}
h1{font-size:1.4rem;margin-bottom:.2rem} .sub{color:#5b6475;margin-top:0}
.lead{font-size:1.15rem;background:#eef4ff;border-left:4px solid #2f6fdf;padding:.8rem 1rem}
table{border-collapse:collapse;margin:1rem 0;font-variant-numeric:tabular-nums}
th,td{padding:.3rem .8rem;border-bottom:1px solid #dde2ea;text-align:right} th:first-child,td:first-child{text-align:left}
tr.total td{font-weight:600;border-top:2px solid #8a93a5} svg text{font-size:12px;fill:#1d2330}
svg .lbl{font-size:11px;font-weight:600} .cluster{border-top:1px solid #dde2ea;margin-top:1.2rem}
.cluster h3{margin-bottom:.2rem} .stats{margin-top:0;color:#5b6475}
.sw{display:inline-block;width:.8rem;height:.8rem;border-radius:50%;margin-right:.4rem;opacity:.7}
table.sel td,table.sel th{text-align:left;vertical-align:top} td.txt{max-width:34rem}
ul.examples li{margin:.25rem 0}
"""
_BARS = (
    ("this run (labelnext)", "total", "#2f6fdf"),
    ("scoring model over every document", "full_pass_scoring_model_usd", "#e08a2c"),
    ("70B-class model over every document", "full_pass_70b_usd", "#c0392b"),
    ("annotating the selection", "annotation_usd", "#6b7a8f"),
)


def _cell(value: Any, spec: str) -> str:
    v = finite(value)
    return "&ndash;" if v is None else format(v, spec)


def savings_sentence(cost: dict[str, Any]) -> str:
    ratio = finite(cost.get("savings_ratio"))
    full = finite(cost.get("counterfactuals", {}).get("full_pass_scoring_model_usd"))
    if ratio is None or full is None:
        big, total = finite(cost.get("counterfactuals", {}).get("full_pass_70b_usd")), finite(cost.get("total_usd"))
        if big and total:
            return (f"No document went through the LLM in this run (its selection rule does not use it). "
                    f"A 70B-class model over every document would have cost {usd(big)}; this run cost "
                    f"{usd(total)} in all, {big / total:,.1f}x less.")
        return "No document went through the LLM in this run, so there is no full-pass comparison."
    return (f"Scoring every document with the same LLM would have cost {usd(full)}; this run cost "
            f"{usd(cost.get('total_usd'))} in all, {ratio:,.1f}x less.")


def counterfactual_svg(cost: dict[str, Any]) -> str:
    """Horizontal bars on a log scale (the 70B pass is orders of magnitude above the run)."""
    cf = cost.get("counterfactuals", {})
    values = [(label, finite(cost.get("total_usd")) if key == "total" else finite(cf.get(key)), color)
              for label, key, color in _BARS]
    positive = [v for _, v, _ in values if v is not None and v > 0]
    left, width, row, top = 250, 380, 34, 24
    height = top + row * len(values) + 28
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 110}" height="{height}" '
             f'role="img" aria-label="cost of this run against the counterfactuals, log scale">']
    if positive:
        lo = 10 ** math.floor(math.log10(min(positive)))
        hi = 10 ** math.ceil(math.log10(max(positive)))
        hi = hi * 10 if hi <= lo else hi
        span = math.log10(hi) - math.log10(lo)

        def x(v: float) -> float:
            return left + width * (math.log10(v) - math.log10(lo)) / span

        decade = lo
        while decade <= hi * 1.0001:
            xd = x(decade)
            parts.append(f'<line x1="{xd:.1f}" y1="{top - 6}" x2="{xd:.1f}" y2="{height - 22}" stroke="#dde2ea"/>')
            parts.append(f'<text x="{xd:.1f}" y="{height - 8}" text-anchor="middle">{html.escape(usd(decade))}</text>')
            decade *= 10
    for i, (label, value, color) in enumerate(values):
        y = top + i * row
        parts.append(f'<text x="{left - 10}" y="{y + 17}" text-anchor="end">{html.escape(label)}</text>')
        if positive and value is not None and value > 0:
            end = x(value)
            parts.append(f'<rect x="{left}" y="{y + 4}" width="{max(end - left, 2):.1f}" height="{row - 10}" '
                         f'fill="{color}" rx="2"/>')
            parts.append(f'<text x="{max(end, left + 2) + 6:.1f}" y="{y + 17}">{html.escape(usd(value))}</text>')
        else:
            parts.append(f'<text x="{left + 6}" y="{y + 17}" fill="#5b6475">n/a</text>')
    parts.append("</svg>")
    return "".join(parts)


def stage_rows(cost: dict[str, Any]) -> str:
    rows = []
    for name, st in stages_in_order(cost.get("stages", {})):
        reused = st.get("reused")
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{_cell(st.get('wall_s'), '.1f')}</td>"
            f"<td>{_cell(st.get('docs'), ',.0f')}</td><td>{_cell(reused, ',.0f')}</td>"
            f"<td>{_cell(st.get('tokens'), ',.0f')}</td><td>{_cell(st.get('cpu_s'), '.1f')}</td>"
            f"<td>{_cell(st.get('accelerator_s'), '.1f')}</td><td>{html.escape(usd(st.get('usd')))}</td></tr>"
        )
    rows.append(f"<tr class='total'><td>total</td><td>{_cell(cost.get('total_wall_s'), '.1f')}</td>"
                f"<td></td><td></td><td></td><td></td><td></td><td>{html.escape(usd(cost.get('total_usd')))}</td></tr>")
    return "".join(rows)


def count_rows(counts: dict[str, Any]) -> str:
    return "".join(f"<tr><td>{html.escape(str(k).replace('_', ' '))}</td><td>{_cell(v, ',.0f')}</td></tr>"
                   for k, v in counts.items())


def selection_sections(view: Optional[ReportView]) -> str:
    if view is None:
        return ""
    return f"""<h2>What was selected</h2>
<p class="sub">Each circle is a cluster (area = number of documents) on the two principal axes of the cluster
centroids; small dots are a seeded sample of documents, red rings the selected documents.</p>
{corpus_map_svg(view)}
<h2>Uncertainty: scored candidates and the selection</h2>
{uncertainty_chart(view)}
<h2>Cluster sizes</h2>
{cluster_size_chart(view)}
<h2>Clusters, largest first</h2>
{cluster_sections(view)}
"""


def render_html(cost: dict[str, Any], counts: dict[str, Any], run_id: str, run_date: str,
                view: Optional[ReportView] = None) -> str:
    title = f"labelnext run {run_id} ({run_date})"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="sub">{html.escape(str(cost.get("headline", "")))}</p>
<p class="lead">{html.escape(savings_sentence(cost))}</p>
{selection_sections(view)}
{loop_section(cost)}
<h2>What the same selection would have cost otherwise</h2>
{counterfactual_svg(cost)}
<p class="sub">Log scale. Full passes are extrapolated from the throughput measured in this run; the 70B-class
model is scaled by parameter count.</p>
<h2>Cost per stage</h2>
<table><thead><tr><th>stage</th><th>wall s</th><th>docs</th><th>reused</th><th>tokens</th><th>CPU s</th>
<th>accelerator s</th><th>USD</th></tr></thead><tbody>{stage_rows(cost)}</tbody></table>
<h2>Documents</h2>
<table><tbody>{count_rows(counts)}</tbody></table>
</body></html>
"""
