"""Submit ``labelnext run`` to a Ray cluster through the Ray Jobs API, and follow it.

Token authentication (on by default for clusters started by Ray >= 2.59): the cluster's token is sent as
``Authorization: Bearer <token>`` on every request. It is found the way Ray itself finds it:
``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``. Ray's own
client only attaches the token when the *client* process runs with ``RAY_AUTH_MODE=token``; this module
attaches it whenever one is found, so submitting from a laptop works with just the token file in place.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, TextIO, TypeVar

ENTRYPOINT = ("labelnext", "run")
# Uploaded with the job when the project's source is shipped as the working_dir. Patterns follow
# .gitignore syntax, relative to the working_dir.
WORKING_DIR_EXCLUDES = [
    ".venv/", "runs/", ".git/", "bench/out/", "__pycache__/", "*.pyc", ".pytest_cache/", ".hypothesis/",
    "*.egg-info/", "build/", ".cache/", "shared/",
]
ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
# Where Ray unpacks a job's working_dir on a node (inside the node's session folder).
_RAY_WORKING_DIRS = f"{os.sep}runtime_resources{os.sep}working_dir_files{os.sep}"
log = logging.getLogger("labelnext")
_POLL_S = 1.0
T = TypeVar("T")


class JobsError(RuntimeError):
    """A submission problem with a one-line, user-facing message."""


def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def resolve_auth_token(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The cluster token from the environment or the default file, in Ray's precedence order."""
    env = os.environ if env is None else env
    token = env.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path_var = env.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path_var:
        path = Path(path_var).expanduser()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise JobsError(f"RAY_AUTH_TOKEN_PATH={path_var} cannot be read: {exc.strerror}") from None
        if not token:
            raise JobsError(f"RAY_AUTH_TOKEN_PATH={path_var} is empty")
        return token
    path = default_token_path()
    if path.is_file():
        return path.read_text().strip() or None
    return None


def auth_headers(token: Optional[str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def resolve_address(address: Optional[str], env: Optional[Mapping[str, str]] = None) -> str:
    """``--address`` if given, else ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS`` (as Ray's job CLI does)."""
    env = os.environ if env is None else env
    from_env = next(((name, env[name]) for name in ADDRESS_ENV_VARS if env.get(name)), None)
    if address:
        # Ray's JobSubmissionClient lets these variables override its address argument; refuse rather than
        # silently submit somewhere other than where the user pointed.
        if from_env and from_env[1].rstrip("/") != address.rstrip("/"):
            raise JobsError(f"--address {address} conflicts with {from_env[0]}={from_env[1]} in the environment "
                            f"(Ray would use the environment's); unset {from_env[0]} or drop --address")
        return address
    if from_env:
        return from_env[1]
    raise JobsError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")


def make_client(address: Optional[str] = None, *, token: Optional[str] = None):
    """A JobSubmissionClient with the auth header attached; connection errors become JobsError."""
    from ray.job_submission import JobSubmissionClient

    url = resolve_address(address)
    token = token if token is not None else resolve_auth_token()
    try:
        return JobSubmissionClient(url, headers=auth_headers(token))
    except Exception as exc:  # ConnectionError, AuthenticationError, RuntimeError: all one-line messages
        raise JobsError(_first_line(f"cannot reach the Ray job server at {url}: {exc}")
                        + ("" if token else " (no auth token found: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, "
                                            "or copy the cluster's token to ~/.ray/auth_token)")) from None


def build_entrypoint(run_args: list[str]) -> str:
    """The shell command the job runs: ``labelnext run`` with each argument quoted."""
    return shlex.join([*ENTRYPOINT, *run_args])


def build_runtime_env(working_dir: Optional[str | Path], extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """``working_dir`` ships the project source (minus local state); ``extra`` (image, pip, env_vars, ...) wins
    on conflicts except ``excludes``, which are merged."""
    env: dict[str, Any] = {}
    if working_dir is not None:
        env["working_dir"] = str(Path(working_dir).resolve())
        env["excludes"] = list(WORKING_DIR_EXCLUDES)
    for key, value in (extra or {}).items():
        if key == "excludes" and "excludes" in env:
            env["excludes"] = env["excludes"] + [e for e in value if e not in env["excludes"]]
        elif key == "env_vars" and isinstance(env.get("env_vars"), dict):
            env["env_vars"] = {**env["env_vars"], **value}
        else:
            env[key] = value
    return env


def leave_job_working_dir(*paths: Optional[str]) -> tuple[Optional[str], ...]:
    """In a Ray job's driver, move out of the job's unpacked working_dir; returns ``paths`` made absolute.

    Ray unpacks the working_dir into each node's session folder, and a node whose runtime-env agent shares
    that folder with the driver's node (two ``ray start`` on one host share ``/tmp/ray``) replaces the folder
    when its first worker needs it: the driver's current directory is then deleted under it. Anything that
    resolves the current directory afterwards fails: importing torch aborts the process with "Intel oneMKL
    FATAL ERROR: Cannot load .../libtorch_cpu.so" (MKL locates itself through it), and relative paths break.
    The driver resolves its local paths first, then runs from a directory nobody replaces.
    """
    cwd = os.getcwd()
    if _RAY_WORKING_DIRS not in cwd + os.sep:
        return paths
    resolved = tuple(p if p is None or "://" in p else os.path.abspath(os.path.expanduser(p)) for p in paths)
    os.chdir(tempfile.gettempdir())
    log.info("running from %s: Ray may replace the job's working dir %s while the job runs", os.getcwd(), cwd)
    return resolved


def exit_code(status: Any) -> int:
    """Process exit code for a final job status: 0 only for SUCCEEDED."""
    return 0 if getattr(status, "value", status) == "SUCCEEDED" else 1


def submit(
    address: Optional[str],
    run_args: list[str],
    *,
    working_dir: Optional[str | Path],
    runtime_env_extra: Optional[dict[str, Any]] = None,
    wait: bool = False,
    log_stream: Optional[TextIO] = None,
    submission_id: Optional[str] = None,
    metadata: Optional[dict[str, str]] = None,
    token: Optional[str] = None,
    on_submitted: Optional[Callable[[str], None]] = None,
) -> tuple[str, Any]:
    """Submit ``labelnext run <run_args>``; returns (job id, status). With ``wait``, streams the job's logs to
    ``log_stream`` and returns the final status; otherwise the status right after submission.
    ``on_submitted(job_id)`` runs as soon as the cluster accepted the job (before any log streaming)."""
    client = make_client(address, token=token)
    job_id = _call(
        lambda: client.submit_job(
            entrypoint=build_entrypoint(run_args),
            runtime_env=build_runtime_env(working_dir, runtime_env_extra) or None,
            submission_id=submission_id or f"labelnext-{uuid.uuid4().hex[:12]}",
            metadata=metadata,
        )
    )
    if on_submitted is not None:
        on_submitted(job_id)
    if not wait:
        return job_id, client.get_job_status(job_id)
    return job_id, follow_logs(client, job_id, log_stream or sys.stdout)


def status(address: Optional[str], job_id: str, *, token: Optional[str] = None) -> Any:
    """The job's JobDetails/JobInfo (``.status``, ``.message``, ``.start_time``, ``.end_time``, ...)."""
    client = make_client(address, token=token)
    return _call(client.get_job_info, job_id)


def logs(address: Optional[str], job_id: str, follow: bool = False, *, log_stream: Optional[TextIO] = None,
         token: Optional[str] = None) -> Any:
    """Write the job's logs to ``log_stream``; with ``follow``, until the job ends. Returns the job status."""
    stream = log_stream or sys.stdout
    client = make_client(address, token=token)
    if follow:
        return follow_logs(client, job_id, stream)
    stream.write(_call(client.get_job_logs, job_id))
    stream.flush()
    return _call(client.get_job_status, job_id)


def follow_logs(client, job_id: str, stream: TextIO) -> Any:
    """Stream logs until the job is terminal. Uses the log websocket and finishes by polling, which also covers
    a websocket that a proxy in front of the dashboard drops."""
    written = [0]
    try:
        asyncio.run(_tail(client, job_id, stream, written))
    except Exception:  # noqa: BLE001 - any websocket failure falls back to polling below
        pass
    return _poll_logs(client, job_id, stream, already_written=written[0])


async def _tail(client, job_id: str, stream: TextIO, written: list[int]) -> None:
    async for chunk in client.tail_job_logs(job_id):
        stream.write(chunk)
        stream.flush()
        written[0] += len(chunk)


def _poll_logs(client, job_id: str, stream: TextIO, *, already_written: int) -> Any:
    """Print whatever the websocket missed, polling until the job is terminal."""
    written = already_written
    while True:
        job_status = _call(client.get_job_status, job_id)
        text = _call(client.get_job_logs, job_id)
        if len(text) > written:
            stream.write(text[written:])
            stream.flush()
            written = len(text)
        if job_status.is_terminal():
            return job_status
        time.sleep(_POLL_S)


def _call(fn: Callable[..., T], *args: Any) -> T:
    try:
        return fn(*args)
    except (RuntimeError, OSError, ValueError) as exc:  # job server errors, connection errors, bad ids
        raise JobsError(_first_line(str(exc))) from None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text
