"""``labelnext`` command line: run the pipeline, read a run's report, submit to a Ray cluster."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from pipelines.config import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Pick the next documents to annotate.")
err = Console(stderr=True)
out = Console()

CorpusOpt = typer.Option(..., "--corpus", help="Parquet file, folder or s3:// prefix")
OutputOpt = typer.Option(..., "--output", help="output folder or s3:// prefix")
BudgetOpt = typer.Option(..., "--budget", help="number of documents to select")
ConfigOpt = typer.Option(None, "--config", help="run config YAML (default configs/local.yaml)")
RunIdOpt = typer.Option(None, "--run-id", help="run id (default: a new id)")
RunDateOpt = typer.Option(None, "--run-date", help="YYYY-MM-DD (default: today)")
SetOpt = typer.Option(None, "--set", help="override a config key: --set cluster.k=64 (repeatable)")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def fail(message: str, code: int = 2) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def run(
    corpus: str = CorpusOpt,
    output: str = OutputOpt,
    budget: int = BudgetOpt,
    config: Optional[Path] = ConfigOpt,
    run_id: Optional[str] = RunIdOpt,
    run_date: Optional[str] = RunDateOpt,
    set_: Optional[List[str]] = SetOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run the selection pipeline and commit its outputs."""
    from ops.placement import PlacementError
    from ops.read import CorpusError
    from ops.storage import StorageError, validate_run_date, validate_run_id
    from pipelines.selection import PipelineError, RunRequest, run_pipeline

    _setup_logging(verbose)
    try:
        cfg = load_config(config, set_ or [])
        if budget < 1:
            raise ValueError(f"--budget must be a positive integer, got {budget}")
        if run_id is not None:
            validate_run_id(run_id)
        if run_date is not None:
            validate_run_date(run_date)
    except (ConfigError, ValueError) as exc:
        fail(str(exc))
    request = RunRequest(corpus=corpus, output=output, budget=budget, run_id=run_id, run_date=run_date)
    try:
        result = run_pipeline(cfg, request)
    except (ConfigError, CorpusError, PipelineError, PlacementError, StorageError, ValueError, FileNotFoundError, PermissionError) as exc:
        fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__, code=1)
    from pipelines.report import print_report

    out.print(f"\n[bold green]committed[/bold green] {result.run_uri}", soft_wrap=True)
    out.print(f"  selected: {result.manifest['counts']['selected']} documents in {result.run_uri}/selected/",
              soft_wrap=True)
    print_report(result.cost_report, out)


@app.command()
def report(run_uri: str = typer.Argument(..., help="a committed run's folder or s3:// prefix")) -> None:
    """Print a committed run's cost headline and per-stage table."""
    from pipelines.report import load_run_report, print_report

    try:
        cost = load_run_report(run_uri)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc), code=1)
    print_report(cost, out)


@app.command("sample-corpus")
def sample_corpus(
    out_path: Path = typer.Option(Path("runs/sample_corpus.parquet"), "--out", help="Parquet file to write"),
    docs: int = typer.Option(2500, "--docs", min=1, help="number of documents"),
    seed: int = typer.Option(7, "--seed"),
) -> None:
    """Write the demo corpus (generated locally, no network)."""
    from pipelines.sample_corpus import write_sample_corpus

    path = write_sample_corpus(out_path, docs, seed)
    out.print(f"wrote {path}")


def _register_jobs() -> None:
    try:
        from pipelines import jobs_cli
    except ImportError:
        return
    jobs_cli.register(app)


_register_jobs()


def main() -> None:
    """Entry point: expected errors are one line; anything else is one line plus the traceback with -v."""
    try:
        app()
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the user gets one line, not a stack
        if "-v" in sys.argv or "--verbose" in sys.argv:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        err.print(f"[red]error:[/red] {type(exc).__name__}: {first} (rerun with -v for the traceback)",
                  highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
