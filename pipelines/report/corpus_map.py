"""The corpus map: centroids and a document sample on the centroids' two principal axes, as inline SVG.

Circle area follows cluster size; selected documents are drawn as red rings on top. Every point carries
its data in the markup (cluster, size, selected count), so the page needs no script.
"""

from __future__ import annotations

import html

import numpy as np

from labelnext.pipelines.report.data import ReportView

WIDTH, HEIGHT, PAD = 760, 520, 28
MAX_RADIUS = 22.0
LABELLED = 12  # largest clusters labelled with their id on the map


def cluster_hue(cluster_id: int) -> int:
    """A stable hue per cluster (golden-angle steps keep neighbouring ids apart)."""
    return int(cluster_id * 137.508) % 360


class _Frame:
    """Data coordinates to SVG pixels, one scale for both axes so distances are not distorted."""

    def __init__(self, points: np.ndarray):
        finite = points[np.isfinite(points).all(axis=1)] if len(points) else points
        lo = finite.min(axis=0) if len(finite) else np.zeros(2)
        hi = finite.max(axis=0) if len(finite) else np.ones(2)
        span = np.maximum(hi - lo, 1e-9)
        self.scale = min((WIDTH - 2 * PAD) / span[0], (HEIGHT - 2 * PAD) / span[1])
        self.lo = lo
        self.offset = np.array([(WIDTH - span[0] * self.scale) / 2, (HEIGHT - span[1] * self.scale) / 2])

    def __call__(self, xy: np.ndarray) -> np.ndarray:
        px = (np.asarray(xy, dtype=np.float64) - self.lo) * self.scale + self.offset
        px[:, 1] = HEIGHT - px[:, 1]  # SVG's y grows downwards
        return px


def _xy(table) -> np.ndarray:
    if table.num_rows == 0:
        return np.zeros((0, 2))
    return np.column_stack([table.column("x").to_numpy(), table.column("y").to_numpy()]).astype(np.float64)


def corpus_map_svg(view: ReportView) -> str:
    sizes = view.sizes
    used = np.flatnonzero(sizes > 0)
    centroids = view.centroids_xy[used] if len(used) else np.zeros((0, 2))
    docs, chosen = _xy(view.docs), _xy(view.map_selected)
    frame = _Frame(np.vstack([centroids, docs, chosen]))
    parts = [
        f'<svg id="corpus-map" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
        f'height="{HEIGHT}" role="img" data-clusters="{len(used)}" data-docs="{view.docs.num_rows}" '
        f'data-selected="{view.map_selected.num_rows}" aria-label="map of the corpus: clusters, a sample of '
        f'documents and the selected documents">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#fbfcfe" stroke="#dde2ea"/>',
    ]
    if len(docs):
        parts.append('<g class="docs" fill-opacity=".55">')
        clusters = view.docs.column("cluster_id").to_numpy()
        for (x, y), c in zip(frame(docs), clusters):
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="1.6" fill="hsl({cluster_hue(int(c))},55%,55%)"/>')
        parts.append("</g>")
    if len(used):
        radius = 3.0 + (MAX_RADIUS - 3.0) * np.sqrt(sizes[used] / sizes[used].max())
        parts.append('<g class="clusters" fill-opacity=".22" stroke-opacity=".8">')
        for (x, y), c, r in sorted(zip(frame(centroids), used, radius), key=lambda t: -t[2]):
            hue = cluster_hue(int(c))
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}" fill="hsl({hue},60%,50%)" '
                f'stroke="hsl({hue},60%,35%)" data-cluster="{int(c)}"><title>cluster {int(c)}: {int(sizes[c]):,} '
                f'docs, {int(view.selected_per_cluster[c]):,} selected</title></circle>')
        parts.append("</g>")
    if len(chosen):
        parts.append('<g class="selected" fill="none" stroke="#d62728" stroke-width="1.4">')
        parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.2"/>' for x, y in frame(chosen))
        parts.append("</g>")
    for c in view.shown_clusters[:LABELLED]:
        x, y = frame(view.centroids_xy[[c]])[0]
        parts.append(f'<text x="{x + 4:.1f}" y="{y - 4:.1f}" class="lbl">#{int(c)}</text>')
    parts.append(_legend(view))
    parts.append("</svg>")
    return "".join(parts)


def _legend(view: ReportView) -> str:
    shown = view.map_selected.num_rows
    selected = f"{shown:,} selected" if shown == view.n_selected else f"{shown:,} of {view.n_selected:,} selected"
    items = [
        ('<circle cx="10" cy="0" r="7" fill="hsl(210,60%,50%)" fill-opacity=".22" stroke="hsl(210,60%,35%)"/>',
         "cluster (area = size)"),
        ('<circle cx="10" cy="0" r="1.8" fill="hsl(210,55%,55%)"/>',
         f"{view.docs.num_rows:,} sampled documents of {view.n_docs:,}"),
        ('<circle cx="10" cy="0" r="3.2" fill="none" stroke="#d62728" stroke-width="1.4"/>', selected),
    ]
    rows = "".join(f'<g transform="translate(10,{16 + 18 * i})">{mark}<text x="24" y="4">{html.escape(label)}</text></g>'
                   for i, (mark, label) in enumerate(items))
    return f'<g class="legend">{rows}</g>'
