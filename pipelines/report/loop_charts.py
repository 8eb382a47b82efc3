"""report.html's "Label loop" section, drawn from ``task_model.loop`` (``LoopPlan.summary``) as inline SVG.

Two charts and a table: the learning curve (labels each earlier night's model trained on against its audited
macro-F1 and accuracy, with their intervals), the rules' shares night by night with tonight's planned split,
and tonight's split with each rule's evidence. ``pipelines/history.py`` says what each field means; the
terminal's version is ``labelnext history`` (``history_table.py``).
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any, Optional

from labelnext.ops.select.audit import AUDIT
from labelnext.pipelines.report.charts import LEFT, TOP, WIDTH
from labelnext.pipelines.report.format import finite

COLD_START = "cold_start"
MAX_NIGHTS = 60  # bars drawn in the shares chart (the latest nights); the curve draws every point
MAX_CURVE_ROWS = 30  # rows of the curve's table (the latest nights)
F1_COLOUR, ACCURACY_COLOUR = "#2f6fdf", "#e08a2c"
_RULE_COLOURS = {AUDIT: "#6b7a8f", COLD_START: "#9db4d8", "cluster_margin": "#2f6fdf", "margin": "#e08a2c",
                 "coverage": "#2ca02c", "llm": "#9467bd", "unattributed": "#c7ccd6"}
_SPARE_COLOURS = ("#8c564b", "#e377c2", "#bcbd22", "#17becf", "#d62728", "#7f7f7f")
_CURVE_H, _CURVE_BOTTOM, _BARS_H, _BARS_BOTTOM = 290, 46, 250, 40


def _e(value: Any) -> str:
    return html.escape(str(value))


def _count(value: Any) -> str:
    v = finite(value)
    return "n/a" if v is None else f"{v:,.0f}"


def _score(value: Any) -> str:
    v = finite(value)
    return "n/a" if v is None else f"{v:.3f}"


def _interval(value: Any, low: Any, high: Any) -> str:
    if finite(value) is None:
        return "n/a"
    if finite(low) is None or finite(high) is None:
        return _score(value)
    return f"{_score(value)} [{_score(low)}, {_score(high)}]"


def _percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def _and(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _dicts(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def rule_order(loop: dict[str, Any], extra: Iterable[str] = ()) -> list[str]:
    """Every rule the section names, in one order: the audit, the cold start, ``select.rules``, then the rest as
    they first appear (e.g. ``unattributed``)."""
    seen: dict[str, None] = {}
    configured = [str(r) for r in loop.get("rules") or []]
    for rule in [AUDIT, COLD_START, *configured, *(str(r) for r in _mapping(loop.get("shares"))), *extra]:
        seen.setdefault(rule, None)
    for night in _dicts(loop.get("rules_by_night")):
        for rule in _mapping(night.get("picked")):
            seen.setdefault(str(rule), None)
    return list(seen)


def rule_colours(rules: Sequence[str]) -> dict[str, str]:
    """One colour per rule for the whole page; known rules keep theirs, others take spare colours in turn."""
    spare = iter(_SPARE_COLOURS * (1 + len(rules) // len(_SPARE_COLOURS)))
    return {r: _RULE_COLOURS.get(r) or next(spare) for r in rules}


def _ticks(top: float, wanted: int = 5) -> list[float]:
    """Round whole-number tick values from 0 to at least ``top`` (> 0)."""
    step = max(1, 10 ** math.floor(math.log10(top / wanted)))
    for m in (1, 2, 5, 10):
        if top / (step * m) <= wanted:
            step *= m
            break
    return [i * step for i in range(int(math.ceil(top / step - 1e-9)) + 1)]


# -- the learning curve -----------------------------------------------------------------------------------------
def curve_points(loop: dict[str, Any]) -> list[dict[str, Any]]:
    """The learning curve's drawable points (an audited macro-F1), in order of labels."""
    points = [p for p in _dicts(loop.get("learning_curve")) if finite(p.get("macro_f1")) is not None]
    return sorted(points, key=lambda p: (finite(p.get("labels_before")) or 0.0, str(p.get("run_date"))))


def _point_title(p: dict[str, Any]) -> str:
    labels = finite(p.get("labels_before"))
    return _e(f"{p.get('run_date')} {p.get('run_id')}: "
              f"{'cold start' if labels is None else f'{labels:,.0f} labels'}, {_count(p.get('audit_n'))} audited; "
              f"macro-F1 {_interval(p.get('macro_f1'), p.get('macro_f1_low'), p.get('macro_f1_high'))}, "
              f"accuracy {_interval(p.get('accuracy'), p.get('accuracy_low'), p.get('accuracy_high'))}")


def learning_curve_svg(points: list[dict[str, Any]]) -> str:
    """Audited macro-F1 (circles, line, interval band and bars) and accuracy (squares, dashed) against the labels
    each night's model trained on; one circle per audited night."""
    plot_w, plot_h = WIDTH - LEFT - 20, _CURVE_H - _CURVE_BOTTOM - TOP
    xs = [finite(p.get("labels_before")) or 0.0 for p in points]
    x_ticks = _ticks(max(max(xs), 1.0))
    x_top = x_ticks[-1]
    values = [finite(p.get(k)) for p in points for k in ("macro_f1", "macro_f1_low", "macro_f1_high", "accuracy",
                                                            "accuracy_low", "accuracy_high")]
    values = [v for v in values if v is not None]
    lo = max(0.0, math.floor(min(values) * 10 - 1e-9) / 10)
    hi = min(1.0, math.ceil(max(values) * 10 + 1e-9) / 10)
    lo, hi = (lo, hi) if hi - lo >= 0.2 else (max(0.0, min(lo, hi - 0.2)), max(hi, min(1.0, lo + 0.2)))

    def x(v: float) -> float:
        return LEFT + plot_w * v / x_top

    def y(v: float) -> float:
        return TOP + plot_h * (hi - min(max(v, lo), hi)) / (hi - lo)

    parts = [f'<svg id="learning-curve" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {_CURVE_H}" '
             f'width="{WIDTH}" height="{_CURVE_H}" role="img" aria-label="audited macro-F1 and accuracy against '
             f'the labels each night&#x27;s model trained on">']
    step = 0.05 if hi - lo <= 0.3 else 0.1
    for i in range(int(round((hi - lo) / step)) + 1):
        v = lo + i * step
        parts.append(f'<line x1="{LEFT}" y1="{y(v):.1f}" x2="{LEFT + plot_w}" y2="{y(v):.1f}" stroke="#dde2ea"/>'
                     f'<text x="{LEFT - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>')
    for v in x_ticks:
        parts.append(f'<text x="{x(v):.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{v:,.0f}</text>')
    parts.append(f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{LEFT + plot_w}" y2="{TOP + plot_h}" stroke="#8a93a5"/>'
                 f'<text x="{LEFT + plot_w / 2:.1f}" y="{_CURVE_H - 8}" text-anchor="middle">labels the night&#x27;s '
                 f'model trained on</text>')
    parts.append(f'<line x1="{LEFT}" y1="27" x2="{LEFT + 18}" y2="27" stroke="{F1_COLOUR}" stroke-width="2"/>'
                 f'<text x="{LEFT + 24}" y="31">audited macro-F1 (band and bars: its interval)</text>'
                 f'<line x1="{LEFT + 330}" y1="27" x2="{LEFT + 348}" y2="27" stroke="{ACCURACY_COLOUR}" '
                 f'stroke-width="2" stroke-dasharray="4 3"/><text x="{LEFT + 354}" y="31">audited accuracy</text>')
    for key, colour, dx, dash in (("macro_f1", F1_COLOUR, 0, ""), ("accuracy", ACCURACY_COLOUR, 5,
                                                                   ' stroke-dasharray="4 3"')):
        pts = [(x(xv) + dx, p) for xv, p in zip(xs, points) if finite(p.get(key)) is not None]
        bounded = [(px, finite(p.get(f"{key}_low")), finite(p.get(f"{key}_high"))) for px, p in pts]
        bounded = [(px, low, high) for px, low, high in bounded if low is not None and high is not None]
        if key == "macro_f1" and len(bounded) > 1:
            ring = [f"{px:.1f},{y(high):.1f}" for px, _, high in bounded]
            ring += [f"{px:.1f},{y(low):.1f}" for px, low, _ in reversed(bounded)]
            parts.append(f'<polygon class="band" points="{" ".join(ring)}" fill="{colour}" fill-opacity="0.12"/>')
        for px, low, high in bounded:
            parts.append(f'<path class="bar-{key}" d="M{px:.1f},{y(low):.1f}V{y(high):.1f}M{px - 4:.1f},'
                         f'{y(low):.1f}h8M{px - 4:.1f},{y(high):.1f}h8" stroke="{colour}" fill="none"/>')
        if len(pts) > 1:
            line = " ".join(f"{px:.1f},{y(finite(p.get(key)) or 0.0):.1f}" for px, p in pts)
            parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        for px, p in pts:
            py = y(finite(p.get(key)) or 0.0)
            shape = (f'<circle class="curve-point" cx="{px:.1f}" cy="{py:.1f}" r="4.5" fill="{colour}">'
                     if key == "macro_f1" else
                     f'<rect class="accuracy-point" x="{px - 3.5:.1f}" y="{py - 3.5:.1f}" width="7" height="7" '
                     f'fill="{colour}">')
            parts.append(f'{shape}<title>{_point_title(p)}</title></{"circle" if key == "macro_f1" else "rect"}>')
    parts.append("</svg>")
    return "".join(parts)


def _confidence_phrase(points: list[dict[str, Any]]) -> str:
    levels = sorted({c for c in (finite(p.get("confidence")) for p in points) if c is not None})
    if not levels:
        return "confidence intervals at the level of select.audit_confidence"
    return f"{_and([f'{100 * c:g}%' for c in levels])} confidence intervals"


def _audit_phrase(points: list[dict[str, Any]]) -> str:
    ns = [_count(p.get("audit_n")) for p in points]
    if len(ns) == 1:
        return f"The point rests on {ns[0]} audit labels."
    if len(ns) <= 6:
        return f"The points rest on {_and(ns)} audit labels, left to right."
    known = [finite(p.get("audit_n")) for p in points]
    known = [n for n in known if n is not None]
    if not known:
        return "The points' audit sizes are not recorded."
    span = f"{min(known):,.0f}" if min(known) == max(known) else f"{min(known):,.0f} to {max(known):,.0f}"
    return f"The points rest on {span} audit labels each."


def curve_table(points: list[dict[str, Any]]) -> str:
    shown = sorted(points, key=lambda p: (str(p.get("run_date")), str(p.get("run_id"))))[-MAX_CURVE_ROWS:]
    rows = "".join(
        f"<tr><td>{_e(p.get('run_date'))} {_e(p.get('run_id'))}</td>"
        f"<td>{'cold start' if finite(p.get('labels_before')) is None else _count(p.get('labels_before'))}</td>"
        f"<td>{_count(p.get('audit_n'))}</td>"
        f"<td>{_interval(p.get('macro_f1'), p.get('macro_f1_low'), p.get('macro_f1_high'))}</td>"
        f"<td>{_interval(p.get('accuracy'), p.get('accuracy_low'), p.get('accuracy_high'))}</td></tr>"
        for p in shown)
    note = (f'<p class="sub">The latest {len(shown)} of {len(points)} audited nights.</p>'
            if len(shown) < len(points) else "")
    return (f'<table class="curve"><thead><tr><th>night</th><th>labels before</th><th>audit labels</th>'
            f'<th>macro-F1 [interval]</th><th>accuracy [interval]</th></tr></thead><tbody>{rows}</tbody></table>'
            f"{note}")


def learning_curve_block(loop: dict[str, Any]) -> str:
    points = curve_points(loop)
    if not points:
        return ('<p id="learning-curve" class="sub">No learning curve yet: it starts once a night&#x27;s audit '
                'comes back labelled (each point is an earlier night&#x27;s model scored on its own audit '
                'sample).</p>')
    return (f"{learning_curve_svg(points)}\n<p class=\"sub\">Each point is an earlier night&#x27;s task model "
            f"scored on that night&#x27;s audit: a uniform random sample of its documents, labelled since, so the "
            f"estimate is unbiased for the corpus (unlike accuracy on the documents the rules chose). "
            f"{_e(_audit_phrase(points))} Band and bars: {_e(_confidence_phrase(points))} (macro-F1 by "
            f"bootstrap, accuracy by Wilson).</p>\n{curve_table(points)}")


# -- the rules' shares --------------------------------------------------------------------------------------------
def _bars(loop: dict[str, Any], selected_by_rule: dict[str, Any]) -> list[tuple[str, str, dict[str, float], bool]]:
    """(label, title, documents per rule, tonight?) per bar: the latest earlier nights, then tonight's plan."""
    bars = []
    for night in _dicts(loop.get("rules_by_night"))[-MAX_NIGHTS:]:
        picked = {str(r): v for r, v in _mapping(night.get("picked")).items()}
        bars.append((str(night.get("run_date")), f"{night.get('run_date')} {night.get('run_id')}", picked, False))
    tonight = {str(r): v for r, v in _mapping(loop.get("planned")).items()}
    if finite(selected_by_rule.get(AUDIT)):
        tonight = {AUDIT: selected_by_rule[AUDIT], **tonight}
    bars.append(("tonight", "tonight (planned)", tonight, True))
    return [(label, title, {r: v for r, v in ((r, finite(v)) for r, v in docs.items()) if v and v > 0}, now)
            for label, title, docs, now in bars]


def shares_svg(loop: dict[str, Any], selected_by_rule: dict[str, Any], colours: dict[str, str]) -> str:
    """A 100% stacked bar per night (each rule's share of the night's documents), the last one tonight's plan."""
    bars = _bars(loop, selected_by_rule)
    order = [r for r in colours if any(r in docs for _, _, docs, _ in bars)]
    per_row = max(1, (WIDTH - LEFT) // 130)
    legend_rows = max(1, math.ceil(len(order) / per_row))
    top = 18 * legend_rows + 20
    height = _BARS_H + top - TOP
    plot_w, plot_h = WIDTH - LEFT - 10, height - _BARS_BOTTOM - top
    slot = plot_w / len(bars)
    width = min(slot * 0.7, 48)
    parts = [f'<svg id="rule-shares" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" '
             f'width="{WIDTH}" height="{height}" role="img" aria-label="each rule&#x27;s share of the documents, '
             f'night by night, and tonight&#x27;s planned split">']
    for i, rule in enumerate(order):
        lx, ly = LEFT + 130 * (i % per_row), 8 + 18 * (i // per_row)
        parts.append(f'<rect x="{lx}" y="{ly}" width="10" height="10" fill="{colours[rule]}"/>'
                     f'<text x="{lx + 14}" y="{ly + 10}">{_e(rule)}</text>')
    for v in (0.0, 0.5, 1.0):
        yv = top + plot_h * (1 - v)
        parts.append(f'<line x1="{LEFT}" y1="{yv:.1f}" x2="{LEFT + plot_w}" y2="{yv:.1f}" stroke="#dde2ea"/>'
                     f'<text x="{LEFT - 6}" y="{yv + 4:.1f}" text-anchor="end">{_percent(v)}</text>')
    step = max(1, math.ceil(len(bars) / 8))
    for i, (label, title, docs, now) in enumerate(bars):
        bx, total, y = LEFT + i * slot + (slot - width) / 2, sum(docs.values()), float(top + plot_h)
        faded, bold = (' fill-opacity="0.75"', ' class="lbl"') if now else ("", "")
        parts.append(f'<g class="night{" tonight" if now else ""}" data-night="{_e(title)}">')
        for rule in order:
            if rule not in docs:
                continue
            h = plot_h * docs[rule] / total
            y -= h
            parts.append(f'<rect data-rule="{_e(rule)}" x="{bx:.1f}" y="{y:.1f}" width="{width:.1f}" '
                         f'height="{h:.1f}" fill="{colours[rule]}"{faded}>'
                         f'<title>{_e(title)}: {_e(rule)} {docs[rule]:,.0f} of {total:,.0f} '
                         f'({_percent(docs[rule] / total)})</title></rect>')
        if now:
            parts.append(f'<rect x="{bx:.1f}" y="{top}" width="{width:.1f}" height="{plot_h}" fill="none" '
                         f'stroke="#1d2330" stroke-dasharray="4 3"/>')
        parts.append("</g>")
        if now or i % step == 0:
            parts.append(f'<text x="{bx + width / 2:.1f}" y="{top + plot_h + 16}" text-anchor="middle"{bold}>'
                         f'{_e(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def split_table(loop: dict[str, Any], selected_by_rule: dict[str, Any], colours: dict[str, str]) -> str:
    shares, planned = _mapping(loop.get("shares")), _mapping(loop.get("planned"))
    evidence = _mapping(loop.get("evidence"))
    rows = []
    for rule in [r for r in colours if r in shares]:
        ev = _mapping(evidence.get(rule))
        z = finite(ev.get("z")) if finite(ev.get("gain")) is not None else None
        share = finite(shares.get(rule))
        rows.append(f'<tr><td><span class="sw" style="background:{colours[rule]}"></span>{_e(rule)}</td>'
                    f"<td>{'n/a' if share is None else _percent(share)}</td><td>{_count(planned.get(rule))}</td>"
                    f"<td>{_count(selected_by_rule.get(rule))}</td><td>{_count(ev.get('labels'))}</td>"
                    f"<td>{'n/a' if z is None else f'{z:+.2f}'}</td></tr>")
    return ('<table class="split"><thead><tr><th>rule</th><th>share</th><th>planned</th><th>selected</th>'
            f'<th>labelled picks so far</th><th>evidence z</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


def lowest_share_sentence(loop: dict[str, Any]) -> str:
    shares = {str(r): finite(v) for r, v in _mapping(loop.get("shares")).items()}
    shares = {r: v for r, v in shares.items() if v is not None}
    if len(loop.get("rules") or []) < 2 or len(shares) < 2:
        return ""
    low = min(shares.values())
    lowest = [r for r, v in shares.items() if v <= low + 1e-9]
    if len(lowest) == len(shares):
        return f"Tonight every rule has the same share ({_percent(low)})."
    several = len(lowest) > 1
    return f"Lowest share{'s' if several else ''} tonight: {_and(lowest)} ({_percent(low)}{' each' if several else ''})."


def shares_block(loop: dict[str, Any], selected_by_rule: dict[str, Any]) -> str:
    colours = rule_colours(rule_order(loop, selected_by_rule))
    shown = len(_dicts(loop.get("rules_by_night")))
    latest = f" (the latest {MAX_NIGHTS} of {shown})" if shown > MAX_NIGHTS else ""
    return (f"{shares_svg(loop, selected_by_rule, colours)}\n<p class=\"sub\">Each bar is one earlier night"
            f"{latest}: the share of its documents each rule picked (the audit and cold-start picks included); "
            f"the dashed bar is tonight&#x27;s planned split.</p>\n<h3>Tonight&#x27;s split</h3>\n"
            f"{split_table(loop, selected_by_rule, colours)}\n<p class=\"sub\">A rule whose evidence is weak (leaving "
            f"its recent labelled picks out of the training set costs the model little audited accuracy) gets less "
            f"of the budget; every rule keeps a small share so it goes on being measured. Evidence z is n/a where "
            f"there is no evidence yet (no labelled picks of the rule, no labelled audit, or a single rule). "
            f"{_e(lowest_share_sentence(loop))}</p>")


def skipped_line(loop: dict[str, Any]) -> str:
    n = finite(loop.get("skipped_nights"))
    if not n or n <= 0:
        return ""
    return (f'<p class="sub skipped">{n:,.0f} earlier night{"s were" if n != 1 else " was"} left out of this '
            f"history because {'their' if n != 1 else 'its'} ledger files were missing or corrupt.</p>")


def loop_section(cost: dict[str, Any]) -> str:
    """The "Label loop" section; empty unless the run has ``task_model.loop``."""
    task = _mapping(cost.get("task_model"))
    loop: Optional[dict[str, Any]] = task.get("loop") if isinstance(task.get("loop"), dict) else None
    if loop is None:
        return ""
    selected_by_rule = _mapping(task.get("selected_by_rule"))
    return (f'<section id="label-loop">\n<h2>Label loop</h2>\n<h3>Learning curve</h3>\n'
            f"{learning_curve_block(loop)}\n<h3>The rules&#x27; shares, night by night</h3>\n"
            f"{shares_block(loop, selected_by_rule)}\n{skipped_line(loop)}</section>\n")
