"""``labelnext submit / status / logs``: run the pipeline as a Ray job on a cluster.

``register(app)`` adds the three commands to the main typer app (pipelines/cli.py calls it).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any, List, Optional
from urllib.parse import urlparse

import typer
import yaml
from rich.console import Console

from labelnext.pipelines.config import ConfigError, load_config, packaged_configs
from labelnext.pipelines.jobs import JobsError, exit_code

# The source checkout when running from one (an installed wheel has no pyproject.toml two levels up).
PROJECT_ROOT = Path(__file__).resolve().parent.parent
err = Console(stderr=True)
out = Console()

AddressOpt = typer.Option(None, "--address", help="Ray dashboard URL, e.g. http://HEAD:8265 (default: $RAY_ADDRESS)")
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def _fail(message: str, code: int = 2) -> None:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def default_working_dir() -> Optional[Path]:
    """The source checkout this code runs from, if it is one (an installed wheel ships no pyproject.toml)."""
    return PROJECT_ROOT if (PROJECT_ROOT / "pyproject.toml").is_file() else None


def _is_uri(path: str) -> bool:
    return "://" in path


def _job_path(path: str, address: Optional[str]) -> str:
    """Local paths become absolute (the job does not run in the caller's directory)."""
    if _is_uri(path):
        return path
    host = urlparse(address if address and "://" in address else f"http://{address or ''}").hostname
    if host and host not in _LOCAL_HOSTS:
        err.print(f"[yellow]warning:[/yellow] {path} is a local path; every node of the cluster must see it "
                  "(use s3:// for a remote cluster)", highlight=False, soft_wrap=True)
    return str(Path(path).expanduser().resolve())


def _config_arg(config: str, working_dir: Optional[Path]) -> str:
    """The --config value as the job sees it: a packaged name as given, a file relative to the uploaded
    working_dir, or as given for an image."""
    if not Path(config).expanduser().is_file() and config in packaged_configs():
        return config
    if working_dir is None:
        return str(config)
    resolved, root = Path(config).expanduser().resolve(), working_dir.resolve()
    if not resolved.is_relative_to(root):
        raise JobsError(f"--config {config} is outside the working dir {root} that is uploaded with the job; "
                        "move it under that folder, or pass --working-dir")
    return resolved.relative_to(root).as_posix()


def _runtime_env_file(path: Optional[Path]) -> Optional[dict[str, Any]]:
    if path is None:
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise JobsError(f"--runtime-env {path}: {exc}") from None
    if not isinstance(data, dict):
        raise JobsError(f"--runtime-env {path} must hold a mapping (YAML or JSON)")
    return data


def submit_cmd(
    corpus: str = typer.Option(..., "--corpus", help="Parquet file, folder or s3:// prefix"),
    output: str = typer.Option(..., "--output", help="output folder or s3:// prefix"),
    budget: int = typer.Option(..., "--budget", help="number of documents to select"),
    config: Optional[str] = typer.Option(None, "--config", help="run config: a packaged name (local, cluster-h100, "
                                         "nightly) or a YAML file (default: local)"),
    run_id: Optional[str] = typer.Option(None, "--run-id", help="run id (default: a new id)"),
    run_date: Optional[str] = typer.Option(None, "--run-date", help="YYYY-MM-DD (default: today)"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override a config key (repeatable)"),
    address: Optional[str] = AddressOpt,
    wait: bool = typer.Option(False, "--wait", help="stream the job's logs and exit with its outcome"),
    working_dir: Optional[Path] = typer.Option(
        None, "--working-dir", help="source folder uploaded with the job (default: this checkout)"),
    no_upload: bool = typer.Option(False, "--no-upload", help="upload no source: run the code in the cluster's image"),
    runtime_env: Optional[Path] = typer.Option(None, "--runtime-env", help="YAML/JSON runtime_env merged into the job's"),
    submission_id: Optional[str] = typer.Option(None, "--submission-id", help="job id (default: labelnext-<run id>-<random>)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Submit `labelnext run` to a Ray cluster as a Ray job; prints the job id."""
    from labelnext.ops.io.storage import validate_run_date, validate_run_id
    from labelnext.pipelines import jobs
    from labelnext.pipelines.selection import RunRequest

    try:
        load_config(config, set_ or [])  # a bad config fails here, not minutes later on the cluster
        if budget < 1:
            raise ValueError(f"--budget must be a positive integer, got {budget}")
        if run_id is not None:
            validate_run_id(run_id)
        if run_date is not None:
            validate_run_date(run_date)
    except (ConfigError, ValueError) as exc:
        _fail(str(exc))

    # Fix the run id and date now so the caller knows where the output will land.
    req = RunRequest(corpus=corpus, output=output, budget=budget, run_id=run_id, run_date=run_date).resolved()
    upload = None if no_upload else (working_dir or default_working_dir())
    submitted: list[str] = []

    def announce(job: str) -> None:
        submitted.append(job)
        err.print(f"submitted job {job} (run_date={req.run_date} run_id={req.run_id})", highlight=False,
                  soft_wrap=True)

    try:
        run_args = ["--corpus", _job_path(corpus, address), "--output", _job_path(output, address),
                    "--budget", str(budget), "--run-id", req.run_id, "--run-date", req.run_date]
        if config is not None:
            run_args += ["--config", _config_arg(config, upload)]
        for item in set_ or []:
            run_args += ["--set", item]
        if verbose:
            run_args.append("--verbose")
        job_id, state = jobs.submit(
            address, run_args, working_dir=upload, runtime_env_extra=_runtime_env_file(runtime_env),
            # Job ids are unique per cluster for its lifetime, and rerunning a run id is legitimate.
            wait=wait, submission_id=submission_id or f"labelnext-{req.run_id}-{uuid.uuid4().hex[:6]}",
            metadata={"labelnext_run_id": req.run_id, "labelnext_run_date": req.run_date},
            on_submitted=announce,
        )
    except JobsError as exc:
        _fail(str(exc), code=1)
    except KeyboardInterrupt:
        if submitted:
            err.print(f"stopped following the logs; job {submitted[0]} keeps running "
                      f"(`labelnext status {submitted[0]}`, `ray job stop {submitted[0]}`)", soft_wrap=True)
        raise typer.Exit(130)
    out.print(f"job {job_id}: {state.value}", highlight=False, soft_wrap=True)
    if wait:
        raise typer.Exit(exit_code(state))


def status_cmd(
    job_id: str = typer.Argument(..., help="job (submission) id printed by `labelnext submit`"),
    address: Optional[str] = AddressOpt,
    as_json: bool = typer.Option(False, "--json", help="print the job's details as JSON"),
) -> None:
    """Print a job's status."""
    from labelnext.pipelines import jobs

    try:
        info = jobs.status(address, job_id)
    except JobsError as exc:
        _fail(str(exc), code=1)
    if as_json:
        out.print_json(json.dumps(_as_dict(info), default=str))
        return
    out.print(f"{job_id}: {info.status.value}", highlight=False, soft_wrap=True)
    if info.message:
        out.print(f"  {info.message}", highlight=False, soft_wrap=True)
    out.print(f"  entrypoint: {info.entrypoint}", highlight=False, soft_wrap=True)


def _as_dict(info: Any) -> dict[str, Any]:
    if hasattr(info, "model_dump"):
        return info.model_dump()
    if dataclasses.is_dataclass(info):
        return dataclasses.asdict(info)
    return info.dict()


def logs_cmd(
    job_id: str = typer.Argument(..., help="job (submission) id printed by `labelnext submit`"),
    address: Optional[str] = AddressOpt,
    follow: bool = typer.Option(False, "--follow", "-f", help="follow until the job ends; exit with its outcome"),
) -> None:
    """Print a job's logs."""
    from labelnext.pipelines import jobs

    try:
        state = jobs.logs(address, job_id, follow)
    except JobsError as exc:
        _fail(str(exc), code=1)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    if follow:
        raise typer.Exit(exit_code(state))


def register(app: typer.Typer) -> None:
    app.command("submit")(submit_cmd)
    app.command("status")(status_cmd)
    app.command("logs")(logs_cmd)
