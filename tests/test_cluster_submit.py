"""`labelnext submit/status/logs`: unit tests of the job plumbing, then a real two-node Ray cluster on
127.0.0.1 with token authentication on, driven through the CLI (marked slow).

The cluster is two `ray start --block` processes, each in its own session, torn down by signalling exactly
those processes and their children (never `ray stop`, which stops every Ray process on the machine,
including other people's). Each node gets its own temp dir and explicit ports, so tests running beside it
with their own local Ray are not disturbed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 900
NODE_CPUS = 3


@dataclass
class Cluster:
    dashboard: str
    gcs: str
    token_path: Path
    node_env: dict[str, str]
    client_env: dict[str, str]
    root: Path

    @property
    def token(self) -> str:
        return self.token_path.read_text().strip()

    def get(self, path: str) -> dict:
        req = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def alive_node_ids(self) -> set[str]:
        nodes = self.get("/nodes?view=summary")["data"]["summary"]
        return {n["raylet"]["nodeId"] for n in nodes if n["raylet"].get("state") == "ALIVE"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    names = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
    return [f"--{name}={_free_port()}" for name in names]


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen([str(BIN / "ray"), "start", "--block", *args], env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _stop(procs: list[subprocess.Popen]) -> None:
    import psutil

    tree: list[psutil.Process] = []
    for proc in procs:
        try:
            parent = psutil.Process(proc.pid)
            tree += [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    for proc in reversed(procs):  # worker first, then head
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=30)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def _wait(what: str, check, procs: list[subprocess.Popen], logs: list[Path], timeout: float = START_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, ValueError, KeyError) as exc:
            last = exc
        time.sleep(1)
    tails = "\n".join(f"--- {log.name}\n" + log.read_text(errors="replace")[-3000:] for log in logs if log.exists())
    pytest.fail(f"{what} did not happen within {timeout}s (last error: {last})\n{tails}")


# -- unit: no cluster -----------------------------------------------------------------------------------------

def test_token_precedence_matches_ray(tmp_path, monkeypatch):
    from labelnext.pipelines.jobs import JobsError, resolve_auth_token

    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_auth_token({}) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert resolve_auth_token({}) == "from-home"
    (tmp_path / "tok").write_text("from-path")
    assert resolve_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}) == "from-path"
    assert resolve_auth_token({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}) == "from-env"
    with pytest.raises(JobsError, match="cannot be read"):  # Ray treats a bad path as fatal, not a fallback
        resolve_auth_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")})


def test_address_resolution(monkeypatch):
    from labelnext.pipelines.jobs import JobsError, resolve_address

    assert resolve_address("http://h:8265", {}) == "http://h:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "http://e:8265"}) == "http://e:8265"
    assert resolve_address(None, {"RAY_API_SERVER_ADDRESS": "http://a:8265", "RAY_ADDRESS": "x"}) == "http://a:8265"
    assert resolve_address("http://h:8265/", {"RAY_ADDRESS": "http://h:8265"}) == "http://h:8265/"
    with pytest.raises(JobsError, match="conflicts with RAY_ADDRESS"):
        resolve_address("http://h:8265", {"RAY_ADDRESS": "http://other:8265"})
    with pytest.raises(JobsError, match="no cluster address"):
        resolve_address(None, {})


def test_entrypoint_quotes_every_argument():
    from labelnext.pipelines.jobs import build_entrypoint

    args = ["--corpus", "s3://b/my corpus/", "--set", "select.rule=round_robin", "--set", "x=$(rm -rf /)"]
    entry = build_entrypoint(args)
    assert shlex.split(entry) == ["labelnext", "run", *args]


def test_runtime_env_ships_source_without_local_state(tmp_path):
    from labelnext.pipelines.jobs import build_runtime_env

    env = build_runtime_env(tmp_path, {"excludes": ["data/"], "env_vars": {"A": "1"}, "pip": ["x"]})
    assert env["working_dir"] == str(tmp_path.resolve())
    assert {".venv/", "runs/", ".git/", "bench/out/", "__pycache__/", "data/"} <= set(env["excludes"])
    assert env["env_vars"] == {"A": "1"} and env["pip"] == ["x"]
    assert build_runtime_env(None, None) == {}
    assert build_runtime_env(None, {"image_uri": "img"}) == {"image_uri": "img"}


def test_exit_code_maps_only_success_to_zero():
    from ray.job_submission import JobStatus

    from labelnext.pipelines.jobs import exit_code

    assert exit_code(JobStatus.SUCCEEDED) == 0
    assert {exit_code(s) for s in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.PENDING)} == {1}


def test_config_path_is_rewritten_relative_to_the_uploaded_folder(tmp_path):
    from labelnext.pipelines.jobs import JobsError
    from labelnext.pipelines.jobs_cli import _config_arg

    (tmp_path / "configs").mkdir()
    cfg = tmp_path / "configs" / "x.yaml"
    cfg.write_text("{}")
    assert _config_arg(cfg, tmp_path) == "configs/x.yaml"
    assert _config_arg(Path("configs/x.yaml"), None) == "configs/x.yaml"
    with pytest.raises(JobsError, match="outside the working dir"):
        _config_arg(cfg, tmp_path / "configs" / "sub")


def test_submit_rejects_a_bad_config_before_contacting_a_cluster():
    proc = subprocess.run([str(BIN / "labelnext"), "submit", "--address", "http://127.0.0.1:9", "--corpus", "c",
                           "--output", "o", "--budget", "5", "--set", "embed.nope=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown config key: embed.nope" in proc.stderr


# -- a real two-node cluster ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    if not (BIN / "ray").exists() or not (BIN / "labelnext").exists():
        pytest.fail(f"ray and labelnext must be on {BIN}: run the tests with the project's venv (make test)")
    # Short root: Ray's unix socket paths under the temp dir must stay below ~107 characters.
    root = Path(tempfile.mkdtemp(prefix="lnx-ray-", dir="/tmp"))
    token_path = root / "auth_token"
    token_path.write_text(uuid.uuid4().hex)
    token_path.chmod(0o600)
    base = {k: v for k, v in os.environ.items()
            if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE",
                         "RAY_AUTH_TOKEN_PATH")}
    base["PATH"] = f"{BIN}{os.pathsep}{base.get('PATH', '')}"  # the job's entrypoint finds `labelnext` here
    base["RAY_USAGE_STATS_ENABLED"] = "0"
    # Token auth on explicitly, with a private token file (not ~/.ray/auth_token, which others share).
    node_env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    # The submitting side knows only where the token is, like a laptop with the cluster's token file.
    client_env = {**base, "RAY_AUTH_TOKEN_PATH": str(token_path)}
    gcs_port, dash_port = _free_port(), _free_port()
    # 3 logical CPUs per node: one 2-CPU embed actor per node, and a CPU left on each for the Ray Data tasks
    # that feed the actors (a pool holding every CPU starves its own input).
    common = ["--node-ip-address=127.0.0.1", f"--num-cpus={NODE_CPUS}", "--num-gpus=0", "--disable-usage-stats",
              "--object-store-memory=400000000"]
    head_log, worker_log = root / "head.log", root / "worker.log"
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_start(["--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash_port}", f"--ray-client-server-port={_free_port()}",
                             f"--temp-dir={root / 'h'}", *common, *_node_ports()], node_env, head_log))
        c = Cluster(dashboard=f"http://127.0.0.1:{dash_port}", gcs=f"127.0.0.1:{gcs_port}", token_path=token_path,
                    node_env=node_env, client_env=client_env, root=root)
        _wait("head node start", lambda: len(c.alive_node_ids()) == 1, procs, [head_log])
        procs.append(_start([f"--address={c.gcs}", f"--temp-dir={root / 'w'}", *common, *_node_ports()],
                            node_env, worker_log))
        _wait("second node joining", lambda: len(c.alive_node_ids()) == 2, procs, [head_log, worker_log])
        yield c
    finally:
        _stop(procs)
        shutil.rmtree(root, ignore_errors=True)


def _labelnext(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "labelnext"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_requests_without_the_token_are_refused(cluster):
    req = urllib.request.Request(cluster.dashboard + "/api/jobs/")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=10)
    assert info.value.code == 401


@pytest.mark.slow
def test_status_without_a_token_names_the_fix(cluster):
    env = {k: v for k, v in cluster.client_env.items() if k != "RAY_AUTH_TOKEN_PATH"}
    env["HOME"] = str(cluster.root)  # no ~/.ray/auth_token either
    proc = _labelnext(["status", "nope", "--address", cluster.dashboard], env, timeout=60)
    assert proc.returncode == 1
    assert "RAY_AUTH_TOKEN" in proc.stderr


@pytest.mark.slow
def test_plumbing_job_sees_both_nodes_and_the_venv(cluster, monkeypatch):
    """Auth + PATH + cluster shape, with a trivial entrypoint (independent of the pipeline)."""
    from labelnext.pipelines import jobs

    for name in jobs.ADDRESS_ENV_VARS:  # Ray's client would let these override the address
        monkeypatch.delenv(name, raising=False)

    client = jobs.make_client(cluster.dashboard, token=cluster.token)
    script = ("import ray, shutil, json; ray.init(); "
              "print('LNX', json.dumps({'nodes': sorted(n['NodeID'] for n in ray.nodes() if n['Alive']), "
              "'labelnext': shutil.which('labelnext')}))")
    job_id = client.submit_job(entrypoint=f"python -c {json.dumps(script)}")
    with open(os.devnull, "w") as sink:
        out = jobs.follow_logs(client, job_id, sink)
    logs = client.get_job_logs(job_id)
    assert jobs.exit_code(out) == 0, logs
    seen = json.loads(next(line for line in logs.splitlines() if line.startswith("LNX ")).split(" ", 1)[1])
    assert set(seen["nodes"]) == cluster.alive_node_ids()
    assert Path(seen["labelnext"]).parent == BIN


@pytest.mark.slow
def test_submit_wait_runs_the_pipeline_across_both_nodes(cluster, tmp_path):
    import pyarrow.parquet as pq

    from labelnext.pipelines.sample_corpus import write_sample_corpus

    table = pq.read_table(write_sample_corpus(tmp_path / "sample.parquet", 300, 7))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    step = -(-table.num_rows // 6)
    for i in range(6):
        pq.write_table(table.slice(i * step, step), corpus / f"part-{i}.parquet")
    out_dir = tmp_path / "out"
    args = [
        "submit", "--address", cluster.dashboard, "--wait",
        "--corpus", str(corpus), "--output", str(out_dir), "--budget", "5",
        "--run-id", "cluster-test", "--run-date", "2026-01-02",
        # Two 2-CPU embed actors cannot share a 3-CPU node, and small batches give both of them work, so
        # both nodes must show up in the run's node list.
        "--set", "resources.embed.concurrency=2", "--set", "resources.embed.num_cpus=2", "--set", "resources.embed.device=cpu",
        "--set", "embed.batch_size=4",
        "--set", "resources.score.device=cpu", "--set", "resources.score.concurrency=1", "--set", "score.max_tokens=64",
        "--set", "cost.token_sample=32",
    ]
    proc = _labelnext(args, cluster.client_env, timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-3000:]}"

    run_dir = out_dir / "run_date=2026-01-02" / "run_id=cluster-test"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "committed"
    assert manifest["counts"]["selected"] == 5
    cost = json.loads((run_dir / "cost_report.json").read_text())
    assert set(cost["cluster"]["nodes"]) == cluster.alive_node_ids()

    (job_id,) = re.findall(r"^job (labelnext-cluster-test-\w+): SUCCEEDED$", proc.stdout, flags=re.M)
    assert f"submitted job {job_id}" in proc.stderr  # announced before the logs, so it can be followed elsewhere
    status = _labelnext(["status", job_id, "--address", cluster.dashboard], cluster.client_env, timeout=60)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    logs = _labelnext(["logs", job_id, "--address", cluster.dashboard], cluster.client_env, timeout=60)
    assert logs.returncode == 0 and "committed" in logs.stdout
