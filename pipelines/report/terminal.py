"""Show a run's cost report in the terminal: the headline and a per-stage table."""

from __future__ import annotations

import tempfile
from typing import Any

from rich.console import Console
from rich.table import Table

from labelnext.ops.io import storage
from labelnext.pipelines.commit import COST_REPORT, HTML_REPORT, MANIFEST
from labelnext.pipelines.config import StorageConfig
from labelnext.pipelines.report.format import stages_in_order, usd


def load_run_report(run_uri: str, storage_cfg: StorageConfig | None = None) -> dict[str, Any]:
    """A committed run's cost report from a local folder or an s3:// prefix (standard AWS settings)."""
    fs, path = storage.filesystem_for(run_uri.rstrip("/"), storage_cfg or StorageConfig())
    if storage.read_json(fs, f"{path}/{MANIFEST}") is None:
        raise FileNotFoundError(f"{run_uri}: no {MANIFEST}; the run is missing or was not committed")
    cost = storage.read_json(fs, f"{path}/{COST_REPORT}")
    if cost is None:
        raise FileNotFoundError(f"{run_uri}: committed but {COST_REPORT} is missing")
    return cost


def local_html_report(run_uri: str, storage_cfg: StorageConfig | None = None) -> str:
    """A path on this machine holding the run's ``report.html``: the run's own file for a local run, a
    temporary copy for an s3:// run."""
    uri = run_uri.rstrip("/")
    fs, path = storage.filesystem_for(uri, storage_cfg or StorageConfig())
    if not storage.exists(fs, f"{path}/{HTML_REPORT}"):
        raise FileNotFoundError(f"{run_uri}: committed but {HTML_REPORT} is missing")
    if not storage.is_s3(uri):
        return f"{path}/{HTML_REPORT}"
    name = "-".join(part.split("=", 1)[-1] for part in path.split("/")[-2:])
    with fs.open_input_stream(f"{path}/{HTML_REPORT}") as src, tempfile.NamedTemporaryFile(
            "wb", prefix=f"labelnext-{name}-", suffix=".html", delete=False) as dst:
        dst.write(src.read())
    return dst.name


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def stage_table(cost: dict[str, Any]) -> Table:
    table = Table(title="cost per stage", title_justify="left")
    for col in ("stage", "wall s", "docs", "reused", "tokens", "cpu s", "accel s", "usd"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for name, st in stages_in_order(cost["stages"]):
        table.add_row(
            name, _fmt(st.get("wall_s"), ".1f"), _fmt(st.get("docs"), ","), _fmt(st.get("reused"), ","),
            _fmt(st.get("tokens"), ","), _fmt(st.get("cpu_s"), ".1f"), _fmt(st.get("accelerator_s"), ".1f"),
            usd(st.get("usd")),
        )
    table.add_row("total", _fmt(cost.get("total_wall_s"), ".1f"), "", "", "", "", "", usd(cost.get("total_usd")))
    return table


def counterfactual_table(cost: dict[str, Any]) -> Table:
    cf = cost["counterfactuals"]
    table = Table(title="counterfactuals (same corpus)", title_justify="left")
    table.add_column("what")
    table.add_column("usd", justify="right")
    table.add_row("this run", usd(cost.get("total_usd")))
    table.add_row("scoring model over every document", usd(cf.get("full_pass_scoring_model_usd")))
    table.add_row("70B-class model over every document", usd(cf.get("full_pass_70b_usd")))
    table.add_row("annotating the selection", usd(cf.get("annotation_usd")))
    return table


def print_report(cost: dict[str, Any], console: Console) -> None:
    console.print(f"\n[bold]{cost.get('headline', '')}[/bold]")
    console.print(stage_table(cost))
    console.print(counterfactual_table(cost))
