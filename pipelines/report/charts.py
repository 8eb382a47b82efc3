"""Distribution charts of the report as inline SVG: uncertainty of scored vs selected, cluster sizes."""

from __future__ import annotations

import html
import math
from typing import Sequence

import numpy as np

from labelnext.pipelines.report.data import ReportView

WIDTH, HEIGHT = 760, 230
LEFT, BOTTOM, TOP = 48, 30, 44


def bar_chart_svg(chart_id: str, bins: Sequence[str], series: Sequence[tuple[str, str, np.ndarray]],
                  y_label: str, percent: bool) -> str:
    """Grouped bars: one group per bin, one bar per series; ``series`` is (name, colour, height per bin)."""
    top = max((float(np.max(v)) for _, _, v in series if len(v)), default=0.0) or 1.0
    plot_w, plot_h = WIDTH - LEFT - 10, HEIGHT - BOTTOM - TOP
    group = plot_w / max(len(bins), 1)
    bar = group * 0.8 / max(len(series), 1)
    parts = [f'<svg id="{chart_id}" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
             f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{html.escape(y_label)}">',
             f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{WIDTH - 10}" y2="{TOP + plot_h}" stroke="#8a93a5"/>',
             f'<text x="{LEFT}" y="14">{html.escape(y_label)} (max {_fmt(top, percent)})</text>']
    for s, (name, colour, values) in enumerate(series):
        for i, v in enumerate(values):
            h = plot_h * float(v) / top
            x = LEFT + i * group + group * 0.1 + s * bar
            parts.append(f'<rect x="{x:.1f}" y="{TOP + plot_h - h:.1f}" width="{max(bar - 1, 1):.1f}" '
                         f'height="{h:.1f}" fill="{colour}"><title>{html.escape(name)}, {html.escape(bins[i])}: '
                         f'{_fmt(float(v), percent)}</title></rect>')
        lx = LEFT + 220 * s
        parts.append(f'<rect x="{lx}" y="22" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{lx + 14}" y="32">{html.escape(name)}</text>')
    step = max(1, math.ceil(len(bins) / 10))
    for i in range(0, len(bins), step):
        x = LEFT + (i + 0.5) * group
        parts.append(f'<text x="{x:.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{html.escape(bins[i])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _fmt(value: float, percent: bool) -> str:
    return f"{100 * value:.1f}%" if percent else f"{value:,.0f}"


def uncertainty_chart(view: ReportView, n_bins: int = 20) -> str:
    scored, chosen = view.uncertainty_scored, view.uncertainty_selected
    if not len(scored) and not len(chosen):
        return ('<p id="uncertainty-chart" class="sub">No LLM scores in this run (its rule does not score '
                'candidates), so no uncertainty distribution.</p>')
    both = np.concatenate([scored, chosen])
    lo, hi = float(both.min()), float(both.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, n_bins + 1)

    def shares(values: np.ndarray) -> np.ndarray:
        counts = np.histogram(values, bins=edges)[0].astype(np.float64)
        return counts / counts.sum() if counts.sum() else counts

    labels = [f"{(a + b) / 2:.2f}" for a, b in zip(edges[:-1], edges[1:])]
    return bar_chart_svg("uncertainty-chart", labels, [
        (f"scored candidates ({len(scored):,})", "#9db4d8", shares(scored)),
        (f"selected ({len(chosen):,})", "#d62728", shares(chosen)),
    ], "share of documents per uncertainty bin (mean token entropy, nats)", percent=True)


def cluster_size_chart(view: ReportView) -> str:
    sizes = view.sizes[view.sizes > 0]
    if not len(sizes):
        return ""
    top = int(math.ceil(math.log2(int(sizes.max()) + 1)))
    edges = [2 ** i for i in range(top + 1)]
    counts = np.histogram(sizes, bins=edges + [edges[-1] * 2])[0]
    labels = [f"{a:,}" if b - a <= 1 else f"{a:,}-{b - 1:,}" for a, b in zip(edges, edges[1:] + [edges[-1] * 2])]
    while len(counts) > 1 and counts[-1] == 0:
        counts, labels = counts[:-1], labels[:-1]
    return bar_chart_svg("cluster-size-chart", labels, [("clusters", "#6b7a8f", counts.astype(np.float64))],
                         "clusters per size bin (documents per cluster)", percent=False)
