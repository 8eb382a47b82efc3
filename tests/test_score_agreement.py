"""Both scoring backends (vLLM, transformers) against each other and against an independent reference.

The reference is the textbook computation: the HF model's full ``model(ids).logits`` per document and
``torch.distributions.Categorical(logits=...).entropy()``, with no code shared with ``labelnext.ops.score.entropy`` or the
Scorer's output head. vLLM spawns engine processes, so it runs in a subprocess script (``__main__`` guard).

Tolerance: 1e-3 nats on per-document mean/max entropy and mean NLL. Both backends compute in float32 on
CPU; the measured gap is ~2e-5 (different kernels, padding), so 1e-3 leaves room for other CPUs without
hiding a real error (a wrong position shift or a missing final norm moves scores by >0.1 nats).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from labelnext.ops.score.scorer import SCORE_COLUMNS, Scorer
from labelnext.ops.score.inputs import encode
from labelnext.pipelines.config import ScoreConfig

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-3

DOCS = [
    "The city council approved the new budget on Tuesday, setting aside more money for schools, road repairs "
    "and public parks over the next two years.",
    "Stocks fell sharply in early trading after the central bank raised interest rates for the third time "
    "this year, and analysts warned that further increases could follow.",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "Le chat dort sur le canapé pendant que la pluie tombe doucement dehors.",
    "| year | revenue | margin |\n| 2021 | 4.2 | 11% |\n| 2022 | 5.1 | 13% |",
    "qzx vlorp 88 ##!! mmmk tarn 0x1f",
    "",
    # Longer than the window below: exercises truncation identically in both backends.
    "In the spring of that year the expedition left the coast and followed the river inland. " * 12,
]
# batch_tokens 256: several HF batches and several vLLM request groups (the prefetching path) per call.
CFG = dict(model="bundled:SmolLM2-135M-Instruct", max_tokens=128, truncation="head_tail", batch_tokens=256)

_VLLM_SCRIPT = textwrap.dedent("""
    import json, sys

    if __name__ == "__main__":
        from labelnext.ops.core.quiet import quiet_third_party
        quiet_third_party()
        import numpy as np
        from labelnext.ops.score.scorer import SCORE_COLUMNS, Scorer
        from labelnext.pipelines.config import ScoreConfig

        job = json.load(open(sys.argv[1]))
        scorer = Scorer(ScoreConfig(**job["cfg"]), device="cpu")
        texts = job["texts"]
        out = scorer({"doc_id": np.arange(len(texts)), "text": np.array(texts, dtype=object)})
        result = {c: out[c].tolist() for c in SCORE_COLUMNS}
        result["backend"] = scorer.backend
        # The GPU path: ids from score_tokenize_batch (a CPU task) instead of text.
        import pyarrow as pa
        from labelnext.ops.score.scorer import score_tokenize_batch
        table = score_tokenize_batch(pa.table({"doc_id": list(range(len(texts))), "text": texts}),
                                     ScoreConfig(**job["cfg"]))
        from_ids = scorer({n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names})
        result["from_ids"] = {c: from_ids[c].tolist() for c in SCORE_COLUMNS}
        scorer.close()
        json.dump(result, open(sys.argv[2], "w"))
""")


def _start_vllm(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    script, job, result = tmp_path / "score_vllm.py", tmp_path / "job.json", tmp_path / "result.json"
    script.write_text(_VLLM_SCRIPT)
    job.write_text(json.dumps({"cfg": {**CFG, "backend": "vllm"}, "texts": DOCS}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log = open(tmp_path / "vllm.log", "w")
    proc = subprocess.Popen([sys.executable, str(script), str(job), str(result)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    return proc, result


def _wait_vllm(proc: subprocess.Popen, result: Path) -> dict:
    try:
        code = proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (result.parent / "vllm.log").read_text()
    assert code == 0, log[-4000:]
    return json.loads(result.read_text())


def _reference(scorer: Scorer) -> dict[str, np.ndarray]:
    """Full logits from a fresh HF model; entropy via torch.distributions, NLL via cross_entropy."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(scorer.model_dir, dtype=torch.float32).eval()
    enc = encode(scorer.tokenizer, DOCS, window=scorer.window, truncation=CFG["truncation"])
    cols = {"uncertainty": [], "max_entropy": [], "nll": [], "n_tokens": []}
    with torch.inference_mode():
        for ids in enc.ids:
            if len(ids) < 2:
                for c in ("uncertainty", "max_entropy", "nll"):
                    cols[c].append(np.nan)
                cols["n_tokens"].append(0)
                continue
            logits = model(torch.tensor([ids])).logits[0, :-1].double()
            ent = torch.distributions.Categorical(logits=logits).entropy()
            nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
            cols["uncertainty"].append(ent.mean().item())
            cols["max_entropy"].append(ent.max().item())
            cols["nll"].append(nll.mean().item())
            cols["n_tokens"].append(len(ids) - 1)
    return {c: np.array(v) for c, v in cols.items()}


@pytest.mark.slow
def test_vllm_and_transformers_agree_with_reference(tmp_path):
    # The vLLM engine starts in its own process while the transformers side runs here.
    proc, result = _start_vllm(tmp_path)
    try:
        hf_scorer = Scorer(ScoreConfig(**CFG, backend="transformers"), device="cpu")
        hf = hf_scorer({"doc_id": np.arange(len(DOCS)), "text": np.array(DOCS, dtype=object)})
        ref = _reference(hf_scorer)
    finally:
        vllm = _wait_vllm(proc, result)

    assert vllm.pop("backend") == "vllm"
    from_ids = vllm.pop("from_ids")
    # Ids tokenised in a task score as the text does: token counts and flags exactly, scores up to vLLM's own
    # call-to-call noise (a few 1e-6 nats on CPU); a different tokenisation would move them by far more.
    assert from_ids["n_tokens"] == vllm["n_tokens"] and from_ids["truncated"] == vllm["truncated"]
    for col in ("uncertainty", "max_entropy", "nll"):
        np.testing.assert_allclose(np.array(from_ids[col], dtype=float), np.array(vllm[col], dtype=float),
                                   atol=1e-4, rtol=0, equal_nan=True, err_msg=f"vllm from ids {col}")
    vllm = {c: np.array(v, dtype=float) for c, v in vllm.items()}
    assert hf["truncated"].tolist() == vllm["truncated"].astype(bool).tolist() == [False] * 7 + [True]
    assert hf["n_tokens"].tolist() == vllm["n_tokens"].astype(int).tolist() == ref["n_tokens"].tolist()
    assert ref["n_tokens"][-1] == CFG["max_tokens"] - 1 and ref["n_tokens"][-2] == 0

    for col in ("uncertainty", "max_entropy", "nll"):
        for name, got in (("transformers", hf[col]), ("vllm", vllm[col])):
            np.testing.assert_allclose(got, ref[col], atol=TOL, rtol=0, equal_nan=True,
                                       err_msg=f"{name} {col} vs reference")
        np.testing.assert_allclose(vllm[col], hf[col], atol=TOL, rtol=0, equal_nan=True,
                                   err_msg=f"vllm vs transformers {col}")
    assert set(SCORE_COLUMNS) <= set(hf)


@pytest.mark.parametrize("packing", ["on", "off"])
def test_transformers_packed_and_bucketed_agree_with_reference(packing):
    """float32 on CPU: packed rows (the GPU default) and length buckets, within 1e-3 nats of float64."""
    scorer = Scorer(ScoreConfig(**CFG, backend="transformers", dtype="float32", packing=packing), device="cpu")
    assert scorer.engine.packed is (packing == "on")
    got = scorer({"doc_id": np.arange(len(DOCS)), "text": np.array(DOCS, dtype=object)})
    ref = _reference(scorer)
    assert got["n_tokens"].tolist() == ref["n_tokens"].tolist()
    for col in ("uncertainty", "max_entropy", "nll"):
        np.testing.assert_allclose(got[col], ref[col], atol=TOL, rtol=0, equal_nan=True, err_msg=col)
