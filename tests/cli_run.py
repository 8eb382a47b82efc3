"""Run ``labelnext`` the way a user does: a subprocess with its own environment, output captured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
# Small, quick pipeline runs on a shared 2-core machine: the transformers scorer and two Ray CPUs.
QUICK = ("--set", "score.backend=transformers", "--set", "ray.num_cpus=2", "--set", "ray.include_dashboard=false")
# The default cold start picks cluster representatives without the LLM; tests of the scoring path pin a rule
# that ranks candidates by the LLM's uncertainty.
LLM_RULE = ("--set", "select.rule=typical_uncertain", "--set", "select.quota=size")


def cli_env(extra: Optional[dict] = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(extra or {})
    return env


def cli_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "labelnext.pipelines.cli", *args]


def labelnext(*args: str, env: Optional[dict] = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cli_args(*args), cwd=REPO, env=cli_env(env), capture_output=True, text=True,
                          timeout=timeout)


def run_dir(output: Path, run_id: str, run_date: str = "2026-11-25") -> Path:
    return output / f"run_date={run_date}" / f"run_id={run_id}"


def selected_ids(run: Path) -> list[str]:
    return pq.read_table(run / "selected").column("doc_id").to_pylist()


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The user-facing error: the last non-empty stderr line (logs may come before it)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""
