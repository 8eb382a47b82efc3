"""``labelnext`` command line: run the pipeline, read a run's report, submit to a Ray cluster."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape

from labelnext.pipelines.config import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Pick the next documents to annotate.")
err = Console(stderr=True)
out = Console()

CorpusOpt = typer.Option(..., "--corpus", help="Parquet file, folder or s3:// prefix")
OutputOpt = typer.Option(..., "--output", help="output folder or s3:// prefix")
BudgetOpt = typer.Option(..., "--budget", help="number of documents to select")
ConfigOpt = typer.Option(None, "--config", help="run config: a packaged name (local, cluster-h100, nightly) or a "
                         "YAML file (default: local)")
RunIdOpt = typer.Option(None, "--run-id", help="run id (default: a new id)")
RunDateOpt = typer.Option(None, "--run-date", help="YYYY-MM-DD (default: today)")
LabelsOpt = typer.Option(None, "--labels", help="labels returned so far: Parquet file or prefix, local or s3:// "
                         "(columns input.label_id_column, input.label_column); same as --set input.labels=...")
SetOpt = typer.Option(None, "--set", help="override a config key: --set cluster.k=64 (repeatable)")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def fail(message: str, code: int = 2) -> None:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def root_cause(exc: BaseException) -> BaseException:
    """The error a user can act on: a Ray task's exception arrives wrapped in ``RayTaskError``."""
    try:
        from ray.exceptions import RayTaskError
    except ImportError:  # pragma: no cover - ray is a dependency
        return exc
    for _ in range(10):
        inner = getattr(exc, "cause", None) if isinstance(exc, RayTaskError) else None
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (no colour codes), or its type name."""
    for line in _ANSI.sub("", str(exc)).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def _hide_ray_data_tracebacks(verbose: bool) -> None:
    """Keep Ray Data's console copy of a failed task's stack off stderr; the user gets one line from us.

    Ray Data logs the failing task's traceback (and an ERROR banner) before the exception reaches the
    driver. The session's ``ray-data.log`` keeps every record, and ``-v`` shows them on the console too.
    """
    if verbose:
        return

    def keep(record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR or record.exc_info
                    or "Traceback (most recent call last)" in record.getMessage())

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(keep)


@app.command()
def run(
    corpus: str = CorpusOpt,
    output: str = OutputOpt,
    budget: int = BudgetOpt,
    config: Optional[str] = ConfigOpt,
    run_id: Optional[str] = RunIdOpt,
    run_date: Optional[str] = RunDateOpt,
    set_: Optional[List[str]] = SetOpt,
    labels: Optional[str] = LabelsOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run the selection pipeline and commit its outputs."""
    from labelnext.pipelines.placement import PlacementError
    from labelnext.ops.io.read import CorpusError
    from labelnext.ops.io.storage import StorageError, validate_run_date, validate_run_id
    from labelnext.pipelines.selection import PipelineError, RunRequest, run_pipeline

    from labelnext.pipelines.stderr_filter import filter_stderr

    filter_stderr()
    _setup_logging(verbose)
    _hide_ray_data_tracebacks(verbose)
    try:
        cfg = load_config(config, set_ or [])
        if labels is not None:
            cfg.input.labels = labels
        if budget < 1:
            raise ValueError(f"--budget must be a positive integer, got {budget}")
        if run_id is not None:
            validate_run_id(run_id)
        if run_date is not None:
            validate_run_date(run_date)
    except (ConfigError, ValueError) as exc:
        fail(one_line(exc))
    from labelnext.pipelines.jobs import leave_job_working_dir

    corpus, output, cfg.input.labels = leave_job_working_dir(corpus, output, cfg.input.labels)
    request = RunRequest(corpus=corpus, output=output, budget=budget, run_id=run_id, run_date=run_date)
    expected = (ConfigError, CorpusError, PipelineError, PlacementError, StorageError, ValueError, OSError)
    try:
        result = run_pipeline(cfg, request)
    except Exception as exc:  # noqa: BLE001 - mapped to one line below; unexpected errors go on to main()
        cause = root_cause(exc)
        if not isinstance(cause, expected):
            raise
        # OSError covers storage failures (pyarrow/boto3 name the bucket and key) and missing local files.
        fail(one_line(cause), code=1)
    from labelnext.pipelines.report.terminal import print_report

    out.print(f"\n[bold green]committed[/bold green] {result.run_uri}", soft_wrap=True)
    out.print(f"  selected: {result.manifest['counts']['selected']} documents in {result.run_uri}/selected/",
              soft_wrap=True)
    print_report(result.cost_report, out)


@app.command()
def report(
    run_uri: str = typer.Argument(..., help="a committed run's folder or s3:// prefix"),
    open_: bool = typer.Option(False, "--open", help="write report.html to a local file (the run's own for a "
                               "local run, a temporary file for s3://) and print its path"),
) -> None:
    """Print a committed run's cost headline and per-stage table."""
    from labelnext.ops.io.objects import StorageError
    from labelnext.pipelines.report.terminal import load_run_report, local_html_report, print_report

    try:
        cost = load_run_report(run_uri)
        page = local_html_report(run_uri) if open_ else None
    except (FileNotFoundError, ValueError, StorageError) as exc:
        fail(str(exc), code=1)
    print_report(cost, out)
    if page is not None:
        out.print(f"report: {page}", soft_wrap=True, highlight=False)


@app.command()
def history(
    output: str = typer.Argument(..., help="the output folder or s3:// prefix the nightly runs write to"),
) -> None:
    """Print the label loop's learning curve (audited accuracy and macro-F1 per night) and the rules' shares."""
    from labelnext.ops.io.objects import StorageError
    from labelnext.pipelines.report.history_table import load_history, print_history

    try:
        hist = load_history(output)
    except (FileNotFoundError, ValueError, StorageError, OSError) as exc:
        fail(one_line(exc), code=1)
    print_history(hist, out, output)


@app.command()
def export(
    run_uri: str = typer.Argument(..., help="a committed run's folder or s3:// prefix"),
    format_: str = typer.Option(..., "--format", help="label-studio | argilla | jsonl"),
    output: str = typer.Option(..., "--output", help="file or s3:// key to write"),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="read texts from this corpus instead of the one "
                                         "the manifest records (when the run did not keep texts)"),
) -> None:
    """Write a committed run's selected documents in an annotation tool's import format."""
    from labelnext.ops.io.objects import StorageError
    from labelnext.ops.io.read import CorpusError
    from labelnext.pipelines.export import ExportError, export_run

    try:
        uri, rows = export_run(run_uri, format_, output, corpus)
    except (ExportError, CorpusError, StorageError, OSError) as exc:
        fail(one_line(exc), code=1)
    out.print(f"wrote {rows} documents ({format_}) to {uri}", soft_wrap=True, highlight=False)


@app.command("config")
def config_cmd(
    config: Optional[str] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    explain: Optional[str] = typer.Option(None, "--explain", help="print one key's description, type and default "
                                          "(for a section such as select.task_model: each of its keys)"),
) -> None:
    """Print the effective config (--config, then every --set) as YAML, or explain one key."""
    import yaml

    from labelnext.pipelines.config_reference import explain as explain_key

    try:
        if explain is not None:
            text = explain_key(explain.strip()) + "\n"
        else:
            text = yaml.safe_dump(load_config(config, set_ or []).model_dump(mode="json"), sort_keys=False)
    except ConfigError as exc:
        fail(one_line(exc))
    sys.stdout.write(text)


@app.command("sample-corpus")
def sample_corpus(
    out_path: Path = typer.Option(Path("runs/sample_corpus.parquet"), "--out", help="Parquet file to write"),
    docs: int = typer.Option(2500, "--docs", min=1, help="number of documents"),
    seed: int = typer.Option(7, "--seed"),
) -> None:
    """Write the demo corpus (generated locally, no network)."""
    from labelnext.pipelines.sample_corpus import write_sample_corpus

    path = write_sample_corpus(out_path, docs, seed)
    out.print(f"wrote {path}")


def _register_jobs() -> None:
    try:
        from labelnext.pipelines import jobs_cli
    except ImportError:
        return
    jobs_cli.register(app)


_register_jobs()


def main() -> None:
    """Entry point: expected errors are one line; anything else is one line plus the traceback with -v."""
    verbose = "-v" in sys.argv or "--verbose" in sys.argv
    try:
        app()
    except ConfigError as exc:
        err.print(f"[red]error:[/red] {escape(one_line(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the user gets one line, not a stack
        if verbose:
            raise
        cause = root_cause(exc)
        err.print(f"[red]error:[/red] {escape(type(cause).__name__)}: {escape(one_line(cause))} "
                  "(rerun with -v for the traceback)", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
