"""Per-cluster sections of the report: size, what was selected, and example texts, largest clusters first."""

from __future__ import annotations

import html
from typing import Any

from labelnext.pipelines.report.data import EXAMPLES_PER_CLUSTER, SELECTED_PER_CLUSTER, ReportView
from labelnext.pipelines.report.format import finite
from labelnext.pipelines.report.corpus_map import cluster_hue

# Shown for each quoted selection when the column exists (label columns come with runs that have labels).
_OPTIONAL = (("predicted_label", "predicted label"), ("margin", "margin"))


def _text(value: Any) -> str:
    return '<span class="sub">(text not available)</span>' if value is None else html.escape(str(value))


def _number(value: Any, spec: str = ".3f") -> str:
    v = finite(value)
    return "&ndash;" if v is None else format(v, spec)


def _label(value: Any) -> str:
    return "&ndash;" if value is None else html.escape(str(value))


def _selected_table(rows: list[dict], columns: list[str]) -> str:
    extra = [(key, label) for key, label in _OPTIONAL if key in columns]
    head = "".join(f"<th>{label}</th>" for _, label in extra)
    body = []
    for row in rows:
        cells = "".join(f"<td>{_number(row.get(k)) if k == 'margin' else _label(row.get(k))}</td>" for k, _ in extra)
        body.append(f"<tr><td>{html.escape(str(row.get('rank', '')))}</td><td>{_number(row.get('uncertainty'))}</td>"
                    f"{cells}<td>{html.escape(str(row.get('reason') or ''))}</td>"
                    f"<td class='txt'>{_text(row.get('text'))}</td></tr>")
    return (f"<table class='sel'><thead><tr><th>rank</th><th>uncertainty</th>{head}<th>reason</th><th>text</th>"
            f"</tr></thead><tbody>{''.join(body)}</tbody></table>")


def cluster_sections(view: ReportView) -> str:
    if not len(view.shown_clusters):
        return '<p class="sub">No clusters in this run.</p>'
    total = max(view.n_docs, 1)
    parts = []
    for c in (int(c) for c in view.shown_clusters):
        size, chosen = int(view.sizes[c]), int(view.selected_per_cluster[c])
        examples = view.examples.get(c, [])
        quoted = view.quoted.get(c, [])
        ex_html = "".join(f"<li>{_text(e.get('text'))} <span class='sub'>(distance {_number(e.get('distance'))})"
                          f"</span></li>" for e in examples) or "<li class='sub'>no candidate near the centroid</li>"
        sel_html = (_selected_table(quoted, view.selected_columns) if quoted
                    else "<p class='sub'>Nothing selected from this cluster.</p>")
        more = f" (the {len(quoted)} most uncertain shown)" if chosen > len(quoted) else ""
        parts.append(
            f"<section class='cluster' id='cluster-{c}'>"
            f"<h3><span class='sw' style='background:hsl({cluster_hue(c)},60%,50%)'></span>Cluster {c}</h3>"
            f"<p class='stats'>{size:,} documents ({100 * size / total:.1f}% of the corpus) &middot; "
            f"{chosen:,} selected &middot; {int(view.scored_per_cluster[c]):,} scored by the LLM</p>"
            f"<h4>Nearest the centroid</h4><ul class='examples'>{ex_html}</ul>"
            f"<h4>Selected{more}</h4>{sel_html}</section>")
    k = int((view.sizes > 0).sum())
    note = (f"<p class='sub'>The {len(view.shown_clusters)} largest of {k:,} clusters; up to "
            f"{EXAMPLES_PER_CLUSTER} examples nearest each centroid and {SELECTED_PER_CLUSTER} selected documents "
            f"each.</p>")
    return note + "".join(parts)
