"""Typed run configuration: YAML file + dotted ``--set`` overrides, validated at load.

Every section forbids unknown keys so that a typo fails loudly with the key's dotted path.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, field_validator

from labelnext.ops.cluster.candidates import CandidatesConfig
from labelnext.ops.cluster.kmeans import ClusterConfig
from labelnext.ops.embed.settings import EmbedConfig
from labelnext.ops.core.model_prep import BUNDLED_ENCODER, BUNDLED_LLM
from labelnext.ops.io.read import InputConfig
from labelnext.ops.io.s3 import StorageConfig
from labelnext.ops.score.settings import ScoreConfig
from labelnext.ops.select.selector import SelectConfig
from labelnext.ops.core.settings import StageSettings

__all__ = [
    "BUNDLED_ENCODER", "BUNDLED_LLM", "CandidatesConfig", "ClusterConfig", "ConfigError", "CostConfig",
    "EmbedConfig", "InputConfig", "OutputConfig", "RayConfig", "ResourcesConfig", "RunConfig", "ScoreConfig",
    "SelectConfig", "StorageConfig", "load_config", "packaged_configs",
]

DEFAULT_CONFIG = "local"
CONFIG_PACKAGE = "labelnext.configs"


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


_Section = StageSettings


class StageResources(_Section):
    """Where one actor pool runs. Only the job layer (``labelnext.pipelines.placement``) reads these."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: the cluster's GPUs when it has some, else CPU; cuda: stop with an error "
        "when the cluster shows no GPU; cpu: never ask for GPUs")
    num_gpus: float = Field(default=1.0, ge=0, description="GPUs per actor when the cluster has GPUs")
    num_cpus: float = Field(default=1.0, gt=0, description="CPUs per actor")
    concurrency: Optional[int] = Field(default=None, gt=0, description="actor pool size; derived from the "
                                       "cluster's resources when unset")


class EmbedResources(StageResources):
    num_gpus: float = Field(default=0.25, ge=0, description="GPUs per embed actor when the cluster has GPUs")


class ScoreResources(StageResources):
    tensor_parallel_size: int = Field(default=1, gt=0, description="GPUs one scoring engine spans (vLLM); an "
                                      "actor takes num_gpus x tensor_parallel_size")


class ClusterResources(_Section):
    use_gpu: Literal["auto", "never"] = Field(default="auto", description="auto: faiss trains k-means on a GPU "
                                              "index when the training task's node has one; never: on CPU")


class ResourcesConfig(_Section):
    """``resources``: device, GPUs, CPUs and pool sizes of every stage, in one place."""

    embed: EmbedResources = Field(default_factory=EmbedResources, description="the encoder actors")
    cluster: ClusterResources = Field(default_factory=ClusterResources, description="the k-means training task")
    score: ScoreResources = Field(default_factory=ScoreResources, description="the scoring LLM's actors")


class OutputConfig(_Section):
    """``output``: what a run writes besides the selection."""

    write_assignments: bool = Field(default=True, description="write assignments/: doc_id, cluster_id and "
                                    "distance of every accepted document")
    include_text: bool = Field(default=False, description="keep the text in selected/ (else readers join the "
                               "corpus on doc_id)")
    ledger: bool = Field(default=True, description="record the selected ids in OUTPUT/ledger/; runs with a later "
                         "run date exclude them before embedding")


class CostConfig(_Section):
    """``cost``: the prices and assumptions of cost_report.json."""

    gpu_hour_usd: float = Field(default=3.0, ge=0, description="price of one GPU for an hour")
    cpu_hour_usd: float = Field(default=0.05, ge=0, description="price of one CPU for an hour")
    label_usd: float = Field(default=0.10, ge=0, description="price of one annotation (the annotation "
                             "counterfactual: budget x label_usd)")
    reference_params: float = Field(default=70e9, gt=0, description="parameter count of the big-model counterfactual")
    reference_gpu_tflops: float = Field(default=989.0, gt=0, description="dense bf16 peak TFLOP/s of the GPU priced "
                                        "at gpu_hour_usd (H100 SXM: 989), for the big-model counterfactual")
    reference_mfu: float = Field(default=0.4, gt=0, le=1, description="model FLOPs utilisation the big-model "
                                 "counterfactual assumes for a prefill-only pass")
    token_sample: int = Field(default=256, gt=0, description="documents drawn at random (seeded) to estimate corpus tokens")


class RayConfig(_Section):
    """``ray``: which Ray to join or start."""

    address: Optional[str] = Field(default=None, description="Ray cluster to join; unset: RAY_ADDRESS, else a "
                                   "local Ray is started")
    num_cpus: Optional[int] = Field(default=None, gt=0, description="local Ray only: CPUs it may use; unset: all")
    log_to_driver: bool = Field(default=False, description="forward Ray workers' stdout and stderr to the "
                                "driver's console")
    include_dashboard: Optional[bool] = Field(
        default=None, description="local Ray only: start the dashboard; unset: Ray's default (on when its packages "
        "are installed); false saves a second or two and a process per run where nobody watches it")
    spill_dir: Optional[str] = Field(
        default=None, description="local Ray only: local directory Ray spills objects to when its object store is "
        "full; unset: Ray's temporary directory (RAY_TMPDIR, else the system's)")
    object_store_memory: Optional[int] = Field(
        default=None, ge=78_643_200, description="local Ray only: object store size in bytes (at least 75 MiB); "
        "unset: Ray's default (30% of the machine's memory)")
    spill_headroom: float = Field(
        default=2.0, gt=0, description="local Ray only: copies of the corpus's vectors the run may hold at once "
        "(the embed output and the cluster assignment overlap); the run stops before any compute when the object "
        "store plus the spill directory's free disk cannot hold rows x dim x 4 bytes x this")
    assumed_dim: int = Field(
        default=384, gt=0, description="embedding dimension the spill preflight assumes when neither "
        "input.embedding_column nor the encoder's files give one")


class RunConfig(_Section):
    input: InputConfig = Field(default_factory=InputConfig,
        description="the corpus: id and text columns, exclusions, labels, precomputed vectors")
    embed: EmbedConfig = Field(default_factory=EmbedConfig, description="the sentence encoder and its batching")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig,
        description="k-means: number of clusters, training sample and seeding")
    candidates: CandidatesConfig = Field(default_factory=CandidatesConfig,
        description="how many documents per selected one the LLM scores")
    score: ScoreConfig = Field(default_factory=ScoreConfig,
        description="the scoring LLM, its backend, batching and task prompt")
    select: SelectConfig = Field(default_factory=SelectConfig,
        description="the selection rule, quotas and the task model")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig,
        description="device, GPUs, CPUs and pool sizes of every stage")
    output: OutputConfig = Field(default_factory=OutputConfig, description="what a run writes besides the selection")
    cost: CostConfig = Field(default_factory=CostConfig, description="prices and assumptions of the cost report")
    storage: StorageConfig = Field(default_factory=StorageConfig,
        description="object store endpoint, encryption, retries and run claims")
    ray: RayConfig = Field(default_factory=RayConfig, description="which Ray to join or start")

    @field_validator("select")
    @classmethod
    def _llm_rule_needs_a_task(cls, v: SelectConfig, info: ValidationInfo) -> SelectConfig:
        score = info.data.get("score")
        if "llm" in v.rules and score is not None and not score.task.prompted:
            raise ValueError("select.rules has the llm rule, which needs the task prompt: set score.task.template "
                             "(its choices default to the classes of input.labels)")
        return v

    @field_validator("input")
    @classmethod
    def _distinct_columns(cls, v: InputConfig) -> InputConfig:
        if v.id_column == v.text_column:
            raise ValueError("input.id_column and input.text_column must differ")
        return v


def _format_validation_error(err: ValidationError, source: str) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{key}: {msg}")
    return f"invalid config ({source}): " + "; ".join(parts)


def _parse_scalar(raw: str) -> Any:
    """Parse a ``--set`` value with YAML rules so ``64``, ``true``, ``null`` and ``[a, b]`` work.

    A mapping only when written as one (``{a: 1}``): ``Topic of {title}: {text}`` is a prompt, not a mapping."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    return raw if isinstance(value, dict) and not raw.lstrip().startswith("{") else value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.path=value`` overrides to a nested dict, rejecting paths the schema does not know."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        path = key.split(".")
        if not key or any(not p for p in path):
            raise ConfigError(f"--set has an empty key in {item!r}")
        model: type[BaseModel] = RunConfig
        node = data
        for i, part in enumerate(path):
            fields = model.model_fields
            if part not in fields:
                raise ConfigError(f"unknown config key: {'.'.join(path[: i + 1])}")
            annotation = fields[part].annotation
            last = i == len(path) - 1
            if last:
                node[part] = _parse_scalar(raw)
            else:
                if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                    raise ConfigError(f"config key {'.'.join(path[: i + 1])} has no sub-keys")
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"config key {'.'.join(path[: i + 1])} must be a mapping")
                model = annotation
    return data


def packaged_configs() -> dict[str, Path]:
    """The configs shipped inside the package, by name (``local``, ``cluster-h100``, ``nightly``).

    ``labelnext.configs`` is a data-only namespace package (the repo's ``configs/``), so its folders are read
    from the import spec rather than through ``importlib.resources``.
    """
    spec = importlib.util.find_spec(CONFIG_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    found: dict[str, Path] = {}
    for folder in folders:
        for f in sorted(Path(folder).glob("*.yaml")):
            found.setdefault(f.stem, f)
    return found


def resolve_config(ref: Optional[str | Path]) -> tuple[str, str]:
    """``(source, yaml text)`` for a config name or path; a path that exists wins over a name."""
    ref = str(ref) if ref is not None else DEFAULT_CONFIG
    path = Path(ref).expanduser()
    if path.is_file():
        return str(path), path.read_text()
    named = packaged_configs()
    if ref in named:
        return f"{ref} (packaged {named[ref].name})", named[ref].read_text()
    if path.suffix in (".yaml", ".yml") or "/" in ref:
        raise ConfigError(f"config file not found: {ref}")
    raise ConfigError(f"unknown config {ref!r}: give a YAML file or one of {', '.join(sorted(named))}")


def load_config(ref: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Load a config by name (default ``local``) or path, apply ``--set`` overrides and validate."""
    source, text = resolve_config(ref)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {source} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {source} must hold a mapping at the top level")
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None
