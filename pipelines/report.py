"""Show a run's cost report in the terminal: the headline and a per-stage table."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from labelnext.ops import storage
from labelnext.pipelines.commit import COST_REPORT, MANIFEST
from labelnext.pipelines.config import StorageConfig


def load_run_report(run_uri: str, storage_cfg: StorageConfig | None = None) -> dict[str, Any]:
    """A committed run's cost report from a local folder or an s3:// prefix (standard AWS settings)."""
    fs, path = storage.filesystem_for(run_uri.rstrip("/"), storage_cfg or StorageConfig())
    if storage.read_json(fs, f"{path}/{MANIFEST}") is None:
        raise FileNotFoundError(f"{run_uri}: no {MANIFEST}; the run is missing or was not committed")
    cost = storage.read_json(fs, f"{path}/{COST_REPORT}")
    if cost is None:
        raise FileNotFoundError(f"{run_uri}: committed but {COST_REPORT} is missing")
    return cost


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def stage_table(cost: dict[str, Any]) -> Table:
    table = Table(title="cost per stage", title_justify="left")
    for col in ("stage", "wall s", "docs", "reused", "tokens", "cpu s", "accel s", "usd"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for name, st in cost["stages"].items():
        table.add_row(
            name, _fmt(st.get("wall_s"), ".1f"), _fmt(st.get("docs"), ","), _fmt(st.get("reused"), ","),
            _fmt(st.get("tokens"), ","), _fmt(st.get("cpu_s"), ".1f"), _fmt(st.get("accelerator_s"), ".1f"),
            _fmt(st.get("usd"), ".5f"),
        )
    table.add_row("total", _fmt(cost.get("total_wall_s"), ".1f"), "", "", "", "", "",
                  _fmt(cost.get("total_usd"), ".5f"))
    return table


def counterfactual_table(cost: dict[str, Any]) -> Table:
    cf = cost["counterfactuals"]
    table = Table(title="counterfactuals (same corpus)", title_justify="left")
    table.add_column("what")
    table.add_column("usd", justify="right")
    table.add_row("this run", _fmt(cost.get("total_usd"), ".5f"))
    table.add_row("scoring model over every document", _fmt(cf.get("full_pass_scoring_model_usd"), ".5f"))
    table.add_row("70B-class model over every document", _fmt(cf.get("full_pass_70b_usd"), ".2f"))
    table.add_row("annotating the selection", _fmt(cf.get("annotation_usd"), ".2f"))
    return table


def print_report(cost: dict[str, Any], console: Console) -> None:
    console.print(f"\n[bold]{cost.get('headline', '')}[/bold]")
    console.print(stage_table(cost))
    console.print(counterfactual_table(cost))
