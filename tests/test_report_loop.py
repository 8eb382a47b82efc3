"""report.html's "Label loop" section (``task_model.loop``): the learning curve with its intervals, the rules'
shares night by night with tonight's split, the skipped nights; absent on nights without the loop."""

from __future__ import annotations

import copy
import html
import re
import xml.etree.ElementTree as ET

import pytest

from labelnext.ops.select.bandit import RuleEvidence
from labelnext.pipelines.commit import json_safe
from labelnext.pipelines.loop_plan import LoopPlan
from labelnext.pipelines.report.html import render_html
from tests.headless import dump_dom_and_console
from tests.test_report_html import _cost

HOSTILE_RUN = "<script>alert(1)</script>"
HOSTILE_RULE = '"><img src=x onerror=alert(1)>'
NIGHT2 = {"run_date": "2026-11-24", "run_id": HOSTILE_RUN, "labels_before": 40, "audit_n": 5,
          "accuracy": 0.6, "accuracy_low": 0.23, "accuracy_high": 0.88,
          "macro_f1": 0.51, "macro_f1_low": 0.2, "macro_f1_high": 0.8, "confidence": 0.9}
NIGHT3 = {"run_date": "2026-11-25", "run_id": "n3", "labels_before": 80, "audit_n": 6,
          "accuracy": 0.833, "accuracy_low": None, "accuracy_high": None,  # an interval that is not there
          "macro_f1": 0.7, "macro_f1_low": 0.55, "macro_f1_high": 0.85, "confidence": 0.9}
LOOP = {
    "rules": ["cluster_margin", "margin", "coverage"],
    "shares": {"cluster_margin": 0.5, "margin": 0.2, "coverage": 0.3},
    "planned": {"cluster_margin": 19, "margin": 8, "coverage": 11},
    "evidence": {
        "cluster_margin": {"rule": "cluster_margin", "labels": 14, "left_out": 7, "audit": 11, "gain": 0.09,
                           "se": 0.04, "z": 2.25},
        "margin": {"rule": "margin", "labels": 7, "left_out": 7, "audit": 11, "gain": None, "se": None, "z": 0.0},
        "coverage": {"rule": "coverage", "labels": 3, "left_out": 3, "audit": 11, "gain": 0.01, "se": 0.05,
                     "z": 0.2}},
    "learning_curve": [NIGHT2, NIGHT3],
    "rules_by_night": [
        {"run_date": "2026-11-23", "run_id": "n1", "picked": {"cold_start": 40}},  # a cold start: no audit
        {"run_date": "2026-11-24", "run_id": HOSTILE_RUN,
         "picked": {"audit": 5, "cluster_margin": 12, "margin": 12, "coverage": 11}},
        {"run_date": "2026-11-25", "run_id": "n3",
         "picked": {"audit": 6, "cluster_margin": 14, "margin": 10, "coverage": 10, HOSTILE_RULE: 2}}],
    "skipped_nights": 2,
}
SELECTED_BY_RULE = {"audit": 2, "cluster_margin": 19, "margin": 8, "coverage": 11}


def _page(loop=LOOP, selected_by_rule=SELECTED_BY_RULE, run_id: str = HOSTILE_RUN) -> str:
    cost = _cost()
    cost["task_model"] = {"status": "trained", "labels_used": 80, "selected_by_rule": selected_by_rule}
    if loop is not None:
        cost["task_model"]["loop"] = copy.deepcopy(loop)
    return render_html(cost, {"selected": 40}, run_id, "2026-11-26")


def _section(page: str) -> str:
    found = re.search(r'<section id="label-loop">.*?</section>', page, re.S)
    assert found, "no label loop section"
    return found.group(0)


def _svg(page: str, svg_id: str) -> ET.Element:
    found = re.search(rf'<svg id="{svg_id}".*?</svg>', page, re.S)
    assert found, f"no {svg_id} chart"
    return ET.fromstring(found.group(0))  # well-formed: every text and attribute escaped


def _tag(el: ET.Element) -> str:
    return el.tag.split("}")[-1]


def _rows(section: str, table_class: str) -> list[list[str]]:
    table = re.search(rf'<table class="{table_class}">.*?</table>', section, re.S).group(0)
    return [[html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<td>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", table, re.S) if "<td>" in row]


# -- the learning curve ---------------------------------------------------------------------------------------
def test_one_point_per_audited_night_placed_by_labels_and_macro_f1_with_its_interval():
    page = _page()
    curve = _svg(page, "learning-curve")
    circles = [e for e in curve.iter() if _tag(e) == "circle"]
    assert len(circles) == len(LOOP["learning_curve"]) == 2  # the cold-start night has no audit, so no point
    cx = [float(c.get("cx")) for c in circles]
    cy = [float(c.get("cy")) for c in circles]
    assert cx[0] < cx[1] and cy[1] < cy[0]  # more labels to the right, higher macro-F1 higher up
    bars = [e.get("d") for e in curve.iter() if e.get("class") == "bar-macro_f1"]
    assert len(bars) == 2
    for d, y, point in zip(bars, cy, (NIGHT2, NIGHT3)):
        low_y, high_y = (float(v) for v in re.match(r"M[\d.]+,([\d.]+)V([\d.]+)", d).groups())
        # the bar spans the interval and the point sits inside it where its macro-F1 says
        share = (low_y - y) / (low_y - high_y)
        expected = (point["macro_f1"] - point["macro_f1_low"]) / (point["macro_f1_high"] - point["macro_f1_low"])
        assert share == pytest.approx(expected, abs=0.01)
    spans = [float(re.match(r"M[\d.]+,([\d.]+)V([\d.]+)", d).group(1)) -
             float(re.match(r"M[\d.]+,([\d.]+)V([\d.]+)", d).group(2)) for d in bars]
    assert spans[0] / spans[1] == pytest.approx((0.8 - 0.2) / (0.85 - 0.55), rel=0.02)
    # accuracy: a square for each night, a bar only where the interval is known
    assert sum(_tag(e) == "rect" and e.get("class") == "accuracy-point" for e in curve.iter()) == 2
    assert sum(e.get("class") == "bar-accuracy" for e in curve.iter()) == 1
    section = _section(page)
    assert _rows(section, "curve") == [
        [f"2026-11-24 {HOSTILE_RUN}", "40", "5", "0.510 [0.200, 0.800]", "0.600 [0.230, 0.880]"],
        ["2026-11-25 n3", "80", "6", "0.700 [0.550, 0.850]", "0.833"]]
    caption = html.unescape(re.sub(r"<[^>]+>", "", section))
    assert "uniform random sample" in caption and "unbiased" in caption
    assert "rest on 5 and 6 audit labels" in caption and "90% confidence intervals" in caption


def test_no_point_yet_says_when_the_curve_starts():
    loop = {**LOOP, "rules": ["cluster_margin"], "shares": {"cluster_margin": 1.0}, "planned": {"cluster_margin": 38},
            "evidence": {}, "learning_curve": [], "rules_by_night": [], "skipped_nights": 0}
    section = _section(_page(loop))
    assert '<svg id="learning-curve"' not in section and "<circle" not in section
    assert "starts once a night&#x27;s audit comes back labelled" in section
    assert _rows(section, "split") == [["cluster_margin", "100%", "38", "19", "n/a", "n/a"]]
    assert "Lowest share" not in section and "left out" not in section  # one rule; no skipped night
    shares = _svg(section, "rule-shares")
    assert [e.get("data-night") for e in shares.iter() if _tag(e) == "g"] == ["tonight (planned)"]


# -- the rules' shares ----------------------------------------------------------------------------------------
def _bars(svg: ET.Element) -> dict[str, dict[str, tuple[float, str]]]:
    """night -> rule -> (height, fill) of the stacked bars."""
    return {g.get("data-night"): {r.get("data-rule"): (float(r.get("height")), r.get("fill"))
                                  for r in g if r.get("data-rule") is not None}
            for g in svg.iter() if _tag(g) == "g"}


def test_a_stacked_bar_per_night_and_tonight_each_rule_in_one_colour():
    page = _page()
    bars = _bars(_svg(page, "rule-shares"))
    assert list(bars) == ["2026-11-23 n1", f"2026-11-24 {HOSTILE_RUN}", "2026-11-25 n3", "tonight (planned)"]
    expected = {night["run_date"]: night["picked"] for night in LOOP["rules_by_night"]}
    expected["tonight"] = {"audit": 2, **LOOP["planned"]}
    full = sum(h for h, _ in bars["2026-11-23 n1"].values())
    for (night, segments), picked in zip(bars.items(), expected.values()):
        assert set(segments) == set(picked)  # audit and cold start included
        total = sum(picked.values())
        for rule, (height, _) in segments.items():
            assert height / full == pytest.approx(picked[rule] / total, abs=0.01), (night, rule)
    colours: dict[str, set[str]] = {}
    for segments in bars.values():
        for rule, (_, fill) in segments.items():
            colours.setdefault(rule, set()).add(fill)
    assert all(len(fills) == 1 for fills in colours.values())
    assert len({next(iter(f)) for f in colours.values()}) == len(colours)  # and no two rules share one
    section = _section(page)
    for rule in LOOP["rules"]:  # the table's swatch is the bars' colour
        assert f'style="background:{next(iter(colours[rule]))}"></span>{rule}</td>' in section


def test_tonights_split_table_and_the_lowest_share():
    section = _section(_page())
    assert _rows(section, "split") == [["cluster_margin", "50%", "19", "19", "14", "+2.25"],
                                       ["margin", "20%", "8", "8", "7", "n/a"],  # no gain: z is not evidence
                                       ["coverage", "30%", "11", "11", "3", "+0.20"]]
    text = html.unescape(re.sub(r"<[^>]+>", "", section))
    assert "evidence is weak" in text and "gets less of the budget" in text
    assert "Lowest share tonight: margin (20%)." in text
    assert "2 earlier nights were left out of this history because their ledger files were missing or corrupt" in text


@pytest.mark.parametrize("shares, sentence", [
    ({"cluster_margin": 0.4, "margin": 0.3, "coverage": 0.3}, "Lowest shares tonight: margin and coverage (30% each)."),
    ({"cluster_margin": 0.25, "margin": 0.25}, "Tonight every rule has the same share (25%)."),
])
def test_lowest_share_names_ties(shares, sentence):
    text = html.unescape(_section(_page({**LOOP, "rules": list(shares), "shares": shares})))
    assert sentence in text


def test_text_from_the_history_is_escaped_and_bad_values_do_not_break_the_page():
    page = _page()
    assert "<script>" not in page and "<img" not in page
    assert html.escape(HOSTILE_RUN) in page and html.escape(HOSTILE_RULE) in page
    broken = {**LOOP, "learning_curve": [{**NIGHT2, "labels_before": None, "macro_f1_low": float("nan")},
                                         {**NIGHT3, "macro_f1": None}],
              "rules_by_night": [{"run_date": "d", "run_id": "r", "picked": None}, "not a night"],
              "shares": {"cluster_margin": None, "margin": 0.5}, "planned": None, "evidence": None,
              "skipped_nights": None}
    section = _section(_page(broken, selected_by_rule=None))
    curve = _svg(section, "learning-curve")
    assert sum(_tag(e) == "circle" for e in curve.iter()) == 1  # no macro-F1: no point
    assert _rows(section, "curve") == [[f"2026-11-24 {HOSTILE_RUN}", "cold start", "5", "0.510",
                                        "0.600 [0.230, 0.880]"]]
    assert "left out" not in section


def test_no_loop_no_section():
    for page in (_page(loop=None), render_html(_cost(), {"selected": 3}, "r", "2026-11-26")):
        assert "Label loop" not in page and 'id="label-loop"' not in page
        assert 'id="learning-curve"' not in page and 'id="rule-shares"' not in page


def test_the_plans_summary_renders_with_its_confidence_level():
    """What a night writes (``LoopPlan.summary`` through the report's JSON) draws the curve and the split."""
    nights = [{"kind": "night", "run_date": "2026-11-24", "run_id": "n2", "rule": rule, "picked": picked,
               "labels_before": 40, **({k: v for k, v in NIGHT2.items() if k not in ("run_date", "run_id")}
                                       if rule == "audit" else {})}
              for rule, picked in (("audit", 5), ("cluster_margin", 12), ("margin", 12))]
    evidence = {"cluster_margin": RuleEvidence("cluster_margin", 12, 6, 5, 0.1, 0.05, 2.0),
                "margin": RuleEvidence("margin", 12, 6, 5, float("nan"), float("nan"), 0.0)}
    plan = LoopPlan(["cluster_margin", "margin"], {"cluster_margin": 0.7, "margin": 0.3}, evidence, nights, 0.1)
    plan.counts(20)
    loop = json_safe(plan.summary())
    assert [p["confidence"] for p in loop["learning_curve"]] == [0.9]
    section = _section(_page(loop))
    assert "90% confidence intervals" in section and section.count("<circle") == 1
    assert _rows(section, "split") == [["cluster_margin", "70%", "14", "19", "12", "+2.00"],
                                       ["margin", "30%", "6", "8", "12", "n/a"]]
    assert "Lowest share tonight: margin (30%)." in section


# -- in a browser ---------------------------------------------------------------------------------------------
def test_browser_renders_the_section_without_console_errors(tmp_path):
    page = tmp_path / "report.html"
    page.write_text(_page(), encoding="utf-8")
    dom, console = dump_dom_and_console(page)
    assert console == []
    section = _section(dom)
    assert section.count("<circle") == 2 and section.count("data-rule=") == 1 + 4 + 5 + 4
    bad = tmp_path / "bad.html"  # the check sees an error when there is one
    bad.write_text("<!doctype html><p>x</p><script>console.error('broken-page')</script>", encoding="utf-8")
    assert any("broken-page" in line for line in dump_dom_and_console(bad)[1])
