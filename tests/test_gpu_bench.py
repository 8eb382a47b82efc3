"""bench/gpu.py runs where only torch, transformers and sentence-transformers are installed.

Ray, FAISS and vLLM are blocked (``sys.modules[name] = None`` makes any import of them fail), so these tests
fail if the script or a stage module it imports pulls one of them in.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BLOCKED = ("ray", "faiss", "vllm")
_RUN = ("import runpy, sys; sys.modules.update({name: None for name in %r}); sys.argv[0] = 'bench/gpu.py'; "
        "runpy.run_module('bench.gpu', run_name='__main__', alter_sys=True)") % (BLOCKED,)


def _bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _RUN, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_blocking_really_blocks():
    proc = subprocess.run([sys.executable, "-c", _RUN.split("sys.argv")[0] + "import ray"], capture_output=True,
                          text=True)
    assert proc.returncode != 0 and "import of ray halted" in proc.stderr


def test_help_without_ray_faiss_vllm():
    proc = _bench("--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--random-weights", "--encoder-dir", "--llm-dir", "--export-configs", "--smoke"):
        assert flag in proc.stdout


@pytest.mark.slow
def test_smoke_run_on_cpu_with_random_weights(tmp_path):
    inputs = tmp_path / "inputs"
    proc = _bench("--export-configs", str(inputs), "--embed-docs", "40", "--score-docs", "40")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (inputs / "encoder" / "config.json").is_file() and (inputs / "llm" / "tokenizer.json").is_file()
    assert not list(inputs.rglob("*.safetensors"))  # configs and tokenizers only
    assert len((inputs / "docs.jsonl").read_text().splitlines()) == 40

    out = tmp_path / "gpu.md"
    proc = _bench("--smoke", "--device", "cpu", "--random-weights", "--encoder-dir", str(inputs / "encoder"),
                  "--llm-dir", str(inputs / "llm"), "--data", str(inputs / "docs.jsonl"), "--out", str(out),
                  timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for row in ("embed stage: tokenize workers -> Embedder.encode_ids", "tokenisation, one fast-tokenizer call",
                "bare SentenceTransformer.encode", "ceiling: pre-tokenised", "Scorer (product defaults",
                "Scorer.score_ids, pre-tokenised", "score stage: tokenize workers -> Scorer.score_ids",
                "Scorer, before: batch_tokens 8,192", "naive loop", "ceiling: packed 64 x 64 forward"):
        assert row in text, row
    # float32 on CPU: the product's vectors equal the float32 ones, and the scores the float64 reference.
    assert "embed min cosine to float32 >= 0.999: yes" in text
    assert "score float32 max |delta| <= 0.001 nats: yes" in text
