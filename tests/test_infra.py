"""The deployment manifests parse and agree with each other, with the CLI and with the config schema."""

from __future__ import annotations

import datetime as dt
import json
import re
import shlex
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from labelnext.pipelines.config import load_config, packaged_configs

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
CLUSTER_YAML = INFRA / "ray-cluster-aws-h100.yaml"
RAYJOB = INFRA / "kuberay" / "rayjob.yaml"
NIGHTLY = INFRA / "kuberay" / "rayjob-nightly.yaml"
CRONJOB = INFRA / "kuberay" / "nightly-cronjob.yaml"
SERVICE_ACCOUNT = INFRA / "kuberay" / "serviceaccount.yaml"
DOCKERFILE = INFRA / "image" / "Dockerfile"
POLICY = INFRA / "iam" / "labelnext-s3-policy.json"
RAY_VERSION = "2.60.0"
P5_GPUS = 8
SAMPLE_DATE = "2026-01-02"


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def one(path: Path, kind: str) -> dict[str, Any]:
    (found,) = [d for d in docs(path) if d.get("kind") == kind]
    return found


def cron_template() -> dict[str, Any]:
    cm = one(CRONJOB, "ConfigMap")
    return yaml.safe_load(cm["data"]["rayjob.yaml"].replace("__RUN_DATE__", SAMPLE_DATE))


def rayjob_specs() -> dict[str, dict[str, Any]]:
    """Every RayJob spec we ship: the one-off, the RayCronJob template and the CronJob fallback's template."""
    return {
        "rayjob": one(RAYJOB, "RayJob")["spec"],
        "rayjob-nightly": one(NIGHTLY, "RayCronJob")["spec"]["jobTemplate"],
        "nightly-cronjob": cron_template()["spec"],
    }


def pod_specs(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    cluster = spec["rayClusterSpec"]
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


def dockerfile_image() -> str:
    (ref,) = re.findall(r"^# IMAGE=(\S+)$", DOCKERFILE.read_text(), flags=re.M)
    return ref


# -- parsing --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(INFRA.rglob("*.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_yaml_manifests_parse(path):
    assert docs(path)


def test_policy_is_json():
    assert json.loads(POLICY.read_text())["Version"] == "2012-10-17"


@pytest.mark.parametrize("name", ["cluster-h100.yaml", "nightly.yaml"])
def test_cluster_configs_validate(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.resources.embed.device == "cuda" and 0 < cfg.resources.embed.num_gpus < 1  # several encoders share each GPU
    assert cfg.resources.score.device == "cuda" and cfg.cluster.k and cfg.storage.sse == "aws:kms"


def test_nightly_config_makes_the_next_night_cheaper():
    cfg = load_config(REPO / "configs" / "nightly.yaml")
    assert cfg.output.ledger and cfg.embed.cache and cfg.cluster.warm_start


# -- one image, one Ray version ---------------------------------------------------------------------------------

def test_image_reference_is_identical_everywhere():
    ref = dockerfile_image()
    assert yaml.safe_load(CLUSTER_YAML.read_text())["docker"]["image"] == ref
    for name, spec in rayjob_specs().items():
        for group, pod in pod_specs(spec):
            for container in pod["containers"]:
                assert container["image"] == ref, f"{name}/{group}"


def test_ray_version_matches_the_project_pin():
    import ray

    assert ray.__version__ == RAY_VERSION
    assert f"ray[data,default]=={RAY_VERSION}" in (REPO / "pyproject.toml").read_text()
    text = DOCKERFILE.read_text()
    assert re.search(rf"^ARG RAY_IMAGE=rayproject/ray:{re.escape(RAY_VERSION)}-py311-cu12\d$", text, flags=re.M)
    assert f"ray{RAY_VERSION}" in dockerfile_image()
    for name, spec in rayjob_specs().items():
        assert spec["rayClusterSpec"]["rayVersion"] == RAY_VERSION, name


# -- entrypoints are real CLI invocations -----------------------------------------------------------------------

def cli_commands() -> dict[str, set[str]]:
    """Subcommand -> its option names, from the typer app (or the two names the manifests use, if absent)."""
    try:
        import typer.main

        from labelnext.pipelines.cli import app
    except ImportError:
        return {"run": set(), "submit": set()}
    group = typer.main.get_command(app)
    return {name: {o for p in cmd.params for o in p.opts} for name, cmd in group.commands.items()}


def check_entrypoint(entrypoint: str, *, shell_date_ok: bool) -> dict[str, str]:
    argv = shlex.split(entrypoint)
    assert argv[0] == "labelnext", entrypoint
    commands = cli_commands()
    assert argv[1] in commands, f"unknown subcommand {argv[1]!r}"
    options = dict(zip(argv[2::2], argv[3::2]))
    assert len(argv[2:]) == 2 * len(options), f"every option takes one value: {argv[2:]}"
    if commands[argv[1]]:
        assert set(options) <= commands[argv[1]], set(options) - commands[argv[1]]
    for required in ("--corpus", "--output", "--budget", "--config"):
        assert required in options, required
    assert int(options["--budget"]) > 0
    assert options["--corpus"].startswith("s3://") and options["--output"].startswith("s3://")
    assert options["--config"] in packaged_configs(), f"{options['--config']} is not a packaged config name"
    load_config(options["--config"])
    if "--run-date" in options:
        date = options["--run-date"]
        if not (shell_date_ok and date == "$(date -u +%F)"):
            dt.date.fromisoformat(date)
    return options


def test_entrypoints_are_labelnext_commands_with_valid_configs():
    run = check_entrypoint(rayjob_specs()["rayjob"]["entrypoint"], shell_date_ok=False)
    assert run["--config"] == "cluster-h100"
    nightly = check_entrypoint(rayjob_specs()["rayjob-nightly"]["entrypoint"], shell_date_ok=True)
    fallback = check_entrypoint(rayjob_specs()["nightly-cronjob"]["entrypoint"], shell_date_ok=False)
    for opts in (nightly, fallback):
        assert opts["--config"] == "nightly"
        assert opts["--run-id"] == "nightly"  # a retry replaces the night's run instead of adding one
    assert fallback["--run-date"] == SAMPLE_DATE
    assert {k: v for k, v in nightly.items() if k != "--run-date"} == \
        {k: v for k, v in fallback.items() if k != "--run-date"}


def test_jobs_run_in_the_images_project_folder():
    workdir = re.findall(r"^WORKDIR (\S+)$", DOCKERFILE.read_text(), flags=re.M)[-1]
    for name, spec in rayjob_specs().items():
        assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == workdir, name


# -- GPU resources ---------------------------------------------------------------------------------------------

def test_gpu_resource_names_match_each_platform():
    cluster = yaml.safe_load(CLUSTER_YAML.read_text())
    worker_types = {k: v for k, v in cluster["available_node_types"].items() if k != cluster["head_node_type"]}
    assert [t["resources"]["GPU"] for t in worker_types.values()] == [P5_GPUS]
    assert "nvidia.com/gpu" not in CLUSTER_YAML.read_text()
    for name, spec in rayjob_specs().items():
        for group, pod in pod_specs(spec):
            for container in pod["containers"]:
                res = container.get("resources", {})
                for section in ("requests", "limits"):
                    keys = set(res.get(section, {}))
                    assert not keys & {"GPU", "gpu", "nvidia.com/GPU"}, f"{name}/{group}: {keys}"
                gpus = res.get("limits", {}).get("nvidia.com/gpu")
                if group == "head":
                    assert gpus is None
                else:
                    assert gpus == P5_GPUS and res["requests"]["nvidia.com/gpu"] == P5_GPUS, f"{name}/{group}"
                    assert pod["nodeSelector"]["node.kubernetes.io/instance-type"] == "p5.48xlarge"


def _k8s_cpus(value: str) -> float:
    return float(value[:-1]) / 1000 if str(value).endswith("m") else float(value)


def test_cluster_config_places_on_the_shipped_clusters():
    from labelnext.pipelines.placement import plan_placement

    cfg = load_config(REPO / "configs" / "cluster-h100.yaml")
    launcher = yaml.safe_load(CLUSTER_YAML.read_text())
    types = launcher["available_node_types"]
    nodes = [{"Resources": types[launcher["head_node_type"]]["resources"]}]
    nodes += [{"Resources": t["resources"]} for k, t in types.items() if k != launcher["head_node_type"]
              for _ in range(t["min_workers"])]
    worker = one(RAYJOB, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    limits = worker["template"]["spec"]["containers"][0]["resources"]["limits"]
    k8s_nodes = [{"Resources": {"CPU": 0.0}}] + [
        {"Resources": {"CPU": _k8s_cpus(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])}}
    ] * worker["replicas"]
    for shape in (nodes, k8s_nodes):
        totals: dict[str, float] = {}
        for n in shape:
            for k, v in n["Resources"].items():
                totals[k] = totals.get(k, 0.0) + v
        p = plan_placement(totals, cfg.resources, nodes=shape)
        assert p.embed.use_gpu and p.embed.concurrency == P5_GPUS * 4  # 0.25 GPU each
        assert p.score.use_gpu and p.score.concurrency == P5_GPUS
        assert not p.warnings


# -- Kubernetes wiring -----------------------------------------------------------------------------------------

def test_pods_run_as_the_irsa_service_account():
    sa = one(SERVICE_ACCOUNT, "ServiceAccount")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    for name, spec in rayjob_specs().items():
        for group, pod in pod_specs(spec):
            assert pod["serviceAccountName"] == sa["metadata"]["name"], f"{name}/{group}"


def test_jobs_clean_up_and_authenticate():
    for name, spec in rayjob_specs().items():
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0, name
        assert spec["rayClusterSpec"]["authOptions"]["mode"] == "token", name
        assert spec["activeDeadlineSeconds"] < 24 * 3600, name  # a stuck night ends before the next one


def test_nightly_schedules():
    cron = one(NIGHTLY, "RayCronJob")
    assert cron["apiVersion"] == "ray.io/v1" and len(cron["spec"]["schedule"].split()) == 5
    fallback = one(CRONJOB, "CronJob")
    assert fallback["spec"]["schedule"] == cron["spec"]["schedule"]
    assert fallback["spec"]["concurrencyPolicy"] == "Forbid"
    pod = fallback["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    role, binding = one(CRONJOB, "Role"), one(CRONJOB, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"] and "create" in rule["verbs"]
    assert "__RUN_DATE__" in one(CRONJOB, "ConfigMap")["data"]["rayjob.yaml"]
    assert "__RUN_DATE__" in pod["containers"][0]["command"][-1]


# -- IAM -------------------------------------------------------------------------------------------------------

def _as_list(value: Any) -> list[str]:
    return value if isinstance(value, list) else [value]


def _s3_arn(uri: str) -> str:
    return "arn:aws:s3:::" + uri.removeprefix("s3://").rstrip("/")


def test_iam_policy_is_least_privilege():
    statements = json.loads(POLICY.read_text())["Statement"]
    run = check_entrypoint(rayjob_specs()["rayjob"]["entrypoint"], shell_date_ok=False)
    corpus, output = _s3_arn(run["--corpus"]), _s3_arn(run["--output"])
    writes = {"s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"}
    granted: dict[str, set[str]] = {}
    for st in statements:
        assert st["Effect"] == "Allow" and "NotAction" not in st and "NotResource" not in st
        for action in _as_list(st["Action"]):
            assert "*" not in action, f"wildcard action {action}"
            for resource in _as_list(st["Resource"]):
                granted.setdefault(action, set()).add(resource)
                if action in writes or action.startswith("s3:Put") or action.startswith("s3:Delete"):
                    assert resource == output + "/*", f"{action} outside the output prefix: {resource}"
                if action == "s3:ListBucket":
                    prefixes = st["Condition"]["StringLike"]["s3:prefix"]
                    assert prefixes and all(p.strip("/*") for p in _as_list(prefixes)), "ListBucket needs a prefix"
    assert writes <= set(granted)
    assert granted["s3:GetObject"] == {corpus + "/*", output + "/*"}
    assert granted["s3:ListBucket"] == {corpus.split("/")[0], output.split("/")[0]}
    kms_key = load_config(REPO / "configs" / "cluster-h100.yaml").storage.kms_key_id
    assert granted["kms:GenerateDataKey"] == granted["kms:Decrypt"] == {kms_key}
