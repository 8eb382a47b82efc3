"""`labelnext submit/status/logs`: unit tests of the job plumbing, then a real two-node Ray cluster on
127.0.0.1 with token authentication on, driven through the CLI (marked slow).

The cluster is two `ray start --block` processes, each in its own session, torn down by signalling exactly
those processes and their children (never `ray stop`, which stops every Ray process on the machine,
including other people's). Both nodes share one private temp dir, as two plain `ray start` on one host share
`/tmp/ray` (the setup a user tries first), with explicit ports, so tests running beside it with their own
local Ray are not disturbed.
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
START_TIMEOUT_S = 180
JOB_TIMEOUT_S = 1200
NODE_CPUS = 3


@dataclass
class Cluster:
    dashboard: str
    gcs: str
    token_path: Path
    node_env: dict[str, str]
    client_env: dict[str, str]
    root: Path
    common: list[str]
    procs: list[subprocess.Popen]

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
    # `ray start --block` stops its node on SIGTERM; what is left after that (idle workers, agents that
    # ignore SIGTERM) is killed rather than waited for.
    _, alive = psutil.wait_procs(tree, timeout=10)
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


def test_local_paths_are_refused_on_several_hosts_unless_shared():
    from labelnext.pipelines.paths import SharedPathError, check_shared, local_paths

    one_host = [{"Alive": True, "NodeManagerAddress": "10.0.0.1"}] * 2
    two_hosts = [*one_host, {"Alive": True, "NodeManagerAddress": "10.0.0.2"}, {"Alive": False}]
    paths = local_paths("/data/c.parquet", "/runs/out", embed_cache=True, model_cache=None)
    check_shared(paths, one_host, shared_filesystem=False)  # one machine: one filesystem
    check_shared(paths, two_hosts, shared_filesystem=True)
    with pytest.raises(SharedPathError, match=r"--corpus /data/c.parquet is a local path .* 3 nodes on 2 hosts"):
        check_shared(paths, two_hosts, shared_filesystem=False)
    remote = local_paths("s3://b/c", "s3://b/out", embed_cache=True, model_cache="/cache")
    with pytest.raises(SharedPathError, match="score.cache_dir /cache"):
        check_shared(remote, two_hosts, shared_filesystem=False)
    check_shared(local_paths("s3://b/c", "s3://b/out", embed_cache=True, model_cache=None), two_hosts, False)


def test_the_job_driver_leaves_a_working_dir_that_ray_may_replace(tmp_path):
    """Ray can delete and re-create a job's unpacked working_dir under its driver (two nodes sharing one
    session folder); torch's MKL then aborts the driver on import. The driver moves out first."""
    work = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_x"
    work.mkdir(parents=True)
    script = (
        "import os, shutil, sys\n"
        "from labelnext.pipelines.jobs import leave_job_working_dir\n"
        "paths = leave_job_working_dir('data/c.parquet', 's3://b/o', None)\n"
        f"assert paths == ({str(work / 'data' / 'c.parquet')!r}, 's3://b/o', None), paths\n"
        "shutil.rmtree(sys.argv[1])  # what the other node's runtime-env agent does\n"
        "import torch\n"
        "print('torch', torch.ones(2).sum().item())\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(work)], cwd=work, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "torch 2.0" in proc.stdout, proc.stdout + proc.stderr
    assert "oneMKL" not in proc.stdout + proc.stderr


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
    # 3 logical CPUs per node, as in the user's report; one temp dir for both nodes, as two plain `ray start`
    # on one host share /tmp/ray (and with it each job's unpacked working_dir).
    common = [f"--num-cpus={NODE_CPUS}", "--num-gpus=0", "--disable-usage-stats",
              "--object-store-memory=400000000", f"--temp-dir={root / 'ray'}"]
    head_log, worker_log = root / "head.log", root / "worker.log"
    procs: list[subprocess.Popen] = []
    try:
        procs.append(_start(["--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
                             f"--ray-client-server-port={_free_port()}", *common, *_node_ports()], node_env, head_log))
        c = Cluster(dashboard=f"http://127.0.0.1:{dash_port}", gcs=f"127.0.0.1:{gcs_port}", token_path=token_path,
                    node_env=node_env, client_env=client_env, root=root, common=common, procs=procs)
        _wait("head node start", lambda: len(c.alive_node_ids()) == 1, procs, [head_log])
        procs.append(_start([f"--address={c.gcs}", "--node-ip-address=127.0.0.1", *common, *_node_ports()],
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
def test_a_plain_submit_with_the_default_config_commits_on_two_nodes(cluster, tmp_path):
    """What a user runs first: default config, one Parquet file, local paths on one host, no overrides."""
    from labelnext.pipelines.sample_corpus import write_sample_corpus

    corpus = write_sample_corpus(tmp_path / "corpus.parquet", 600, 7)
    out_dir = tmp_path / "out"
    args = ["submit", "--address", cluster.dashboard, "--wait", "--corpus", str(corpus), "--output", str(out_dir),
            "--budget", "20", "--run-id", "cluster-test", "--run-date", "2026-01-02"]
    proc = _labelnext(args, cluster.client_env, timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "oneMKL" not in proc.stdout and "Segmentation fault" not in proc.stdout

    run_dir = out_dir / "run_date=2026-01-02" / "run_id=cluster-test"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "committed"
    assert manifest["counts"]["selected"] == 20
    cost = json.loads((run_dir / "cost_report.json").read_text())
    assert set(cost["cluster"]["nodes"]) <= cluster.alive_node_ids()
    # The bill is what both nodes held for the run, not the sum of what the stages reserved.
    assert (cost["held"]["nodes"], cost["held"]["cpus"]) == (2, 2 * NODE_CPUS)
    assert cost["total_usd"] == cost["held"]["usd"] >= cost["reserved_usd"] > 0

    (job_id,) = re.findall(r"^job (labelnext-cluster-test-\w+): SUCCEEDED$", proc.stdout, flags=re.M)
    assert f"submitted job {job_id}" in proc.stderr  # announced before the logs, so it can be followed elsewhere
    status = _labelnext(["status", job_id, "--address", cluster.dashboard], cluster.client_env, timeout=60)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    logs = _labelnext(["logs", job_id, "--address", cluster.dashboard], cluster.client_env, timeout=60)
    assert logs.returncode == 0 and "committed" in logs.stdout


@pytest.mark.slow
def test_local_paths_on_nodes_of_several_hosts_fail_before_any_compute(cluster, tmp_path):
    """A node on a second address (another host, as far as Ray can tell) joins: local paths are refused."""
    from labelnext.pipelines.sample_corpus import write_sample_corpus

    log = cluster.root / "other-host.log"
    other = _start([f"--address={cluster.gcs}", "--node-ip-address=127.0.0.2", *cluster.common, *_node_ports()],
                   cluster.node_env, log)
    try:
        _wait("a node on 127.0.0.2 joining", lambda: len(cluster.alive_node_ids()) == 3, [*cluster.procs, other], [log])
        corpus = write_sample_corpus(tmp_path / "corpus.parquet", 50, 7)
        out_dir = tmp_path / "out"
        proc = _labelnext(["submit", "--address", cluster.dashboard, "--wait", "--corpus", str(corpus),
                           "--output", str(out_dir), "--budget", "5"], cluster.client_env, timeout=600)
    finally:
        _stop([other])
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert f"--corpus {corpus} is a local path but the Ray cluster has 3 nodes on 2 hosts" in proc.stdout
    assert "storage.shared_filesystem=true" in proc.stdout
    assert "read: started" not in proc.stdout and not list(out_dir.rglob("manifest.json"))
