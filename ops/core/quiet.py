"""Keep third-party libraries from flooding the run's log (driver and Ray workers alike)."""

from __future__ import annotations

import logging
import os
import warnings

_ENV_DEFAULTS = {
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "VLLM_CONFIGURE_LOGGING": "1",
    "VLLM_LOGGING_STREAM": "ext://sys.stderr",
    "RAY_DEDUP_LOGS": "1",
}
_NOISY_LOGGERS = ("transformers", "sentence_transformers", "vllm", "faiss", "urllib3", "botocore", "filelock")


def quiet_third_party() -> None:
    """Set quiet defaults without overriding anything the user set explicitly."""
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")


def worker_env() -> dict[str, str]:
    """Environment for Ray workers (runtime_env env_vars) with the same quiet defaults."""
    return {key: os.environ.get(key, value) for key, value in _ENV_DEFAULTS.items()}
