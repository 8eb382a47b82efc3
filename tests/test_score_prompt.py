"""The task prompt: exact choice probabilities and answer entropy against a float64 reference, both backends.

The reference shares no code with the Scorer: a fresh HF model in float64 runs every prompt + choice sequence
whole (no key/value reuse), ``log_softmax`` gives each choice token's log-probability, and the sums are
normalised over the choices (then divided by the content-free distribution for calibration).
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

from labelnext.ops.score.choices import LLM_LABEL, LLM_MARGIN, LLM_PROBS
from labelnext.ops.score.prompt import PromptFormat, TaskPrompt
from labelnext.ops.score.scorer import Scorer, score_columns
from labelnext.ops.score.settings import ScoreConfig
from labelnext.pipelines.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-3

DOCS = [
    "The striker scored twice in the second half and the home side won the cup final.",
    "Shares of the chip maker rose after it reported record quarterly revenue and raised its forecast.",
    "Researchers described a new battery chemistry that charges in minutes and lasts for years.",
    "Leaders of the two countries signed a ceasefire after weeks of talks hosted by their neighbour.",
    # Longer than the window below: the document is truncated, the instruction and answer position survive.
    "The committee met again on Thursday to discuss the proposal in detail. " * 30,
]
# Multi-token choices, and one that is a prefix of another: only whole sequences (EOS included) tell them apart.
CHOICES = ["Sports", "Sports news from abroad", "Business and finance", "Science and technology", "World politics"]
TEMPLATE = "Which topic is this article about? Answer with one of: {choices}.\n\nArticle: {text}"
CFG = dict(model="bundled:SmolLM2-135M-Instruct", max_tokens=160, truncation="head")


def _cfg(**task) -> ScoreConfig:
    return ScoreConfig(**CFG, backend="transformers", dtype="float32",
                       task=TaskPrompt(template=TEMPLATE, choices=CHOICES, **task))


def _reference_logprobs(scorer: Scorer, texts: list[str]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(scorer.model_dir, dtype=torch.float64).eval()
    prompts = scorer.tokenize(texts).ids
    out = np.zeros((len(texts), len(CHOICES)))
    with torch.inference_mode():
        for i, prompt in enumerate(prompts):
            for c, choice in enumerate(scorer.tokenize.prompt.choices):
                seq = torch.tensor([list(prompt) + list(choice)])
                logp = torch.log_softmax(model(seq).logits[0], dim=-1)
                positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(choice))
                out[i, c] = logp[positions, torch.tensor(choice)].sum().item()
    return out


def _normalise(logp: np.ndarray) -> np.ndarray:
    p = np.exp(logp - logp.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def scorer() -> Scorer:
    return Scorer(_cfg(), device="cpu")


@pytest.fixture(scope="module")
def reference(scorer) -> dict[str, np.ndarray]:
    return {"docs": _reference_logprobs(scorer, DOCS),
            "content_free": _reference_logprobs(scorer, [scorer.cfg.task.content_free])}


def test_choices_are_multi_token_and_the_long_document_is_truncated(scorer):
    lengths = [len(c) for c in scorer.tokenize.prompt.choices]
    assert min(lengths) >= 2 and max(lengths) >= 4  # name tokens + EOS
    enc = scorer.tokenize(DOCS)
    assert enc.truncated == [False] * 4 + [True]
    # The window holds the prompt and every choice token but the last (a target only).
    assert max(len(ids) for ids in enc.ids) + max(lengths) - 1 <= scorer.window
    assert all(ids[-len(scorer.tokenize.prompt.tail):] == scorer.tokenize.prompt.tail for ids in enc.ids)


def test_choice_probabilities_match_float64_reference(scorer, reference):
    got = scorer({"doc_id": np.arange(len(DOCS)), "text": np.array(DOCS, dtype=object)})
    calibration = _normalise(reference["content_free"])[0]
    expected = _normalise(np.log(_normalise(reference["docs"])) - np.log(calibration))
    np.testing.assert_allclose(np.stack(got[LLM_PROBS]), expected, atol=TOL, rtol=0)
    assert got[LLM_LABEL].tolist() == [CHOICES[i] for i in expected.argmax(axis=1)]
    entropy = -(expected * np.log(expected)).sum(axis=1)
    np.testing.assert_allclose(got["uncertainty"], entropy, atol=TOL, rtol=0)
    top = -np.sort(-expected, axis=1)
    np.testing.assert_allclose(got[LLM_MARGIN], top[:, 0] - top[:, 1], atol=TOL, rtol=0)
    assert got["n_tokens"].tolist() == [len(i) + scorer.tokenize.prompt.choice_tokens for i in scorer.tokenize(DOCS).ids]
    assert set(score_columns(scorer.cfg)) <= set(got)


def test_uncalibrated_probabilities_and_the_packed_path_match_the_reference(reference):
    # Packed rows run whole prompt + choice sequences (the GPU and vLLM path) instead of reusing the prompt's cache.
    packed = Scorer(ScoreConfig(**{**_cfg(calibrate=False).model_dump(), "packing": "on"}), device="cpu")
    assert packed.engine.packed
    np.testing.assert_allclose(packed.choice_logprobs(packed.tokenize(DOCS).ids), reference["docs"], atol=TOL, rtol=0)
    got = packed.score_texts(DOCS)
    np.testing.assert_allclose(got[LLM_PROBS], _normalise(reference["docs"]), atol=TOL, rtol=0)


def test_generative_prompt_scores_the_first_answer_token(scorer):
    from transformers import AutoModelForCausalLM

    gen = Scorer(ScoreConfig(**CFG, backend="transformers", dtype="float32",
                             task=TaskPrompt(template="Summarise in one sentence: {text}")), device="cpu")
    assert score_columns(gen.cfg) == score_columns(ScoreConfig())  # no choice columns
    got = gen.score_texts(DOCS)
    model = AutoModelForCausalLM.from_pretrained(gen.model_dir, dtype=torch.float64).eval()
    with torch.inference_mode():
        ref = [torch.distributions.Categorical(logits=model(torch.tensor([ids])).logits[0, -1]).entropy().item()
               for ids in gen.tokenize(DOCS).ids]
    np.testing.assert_allclose(got["uncertainty"], ref, atol=TOL, rtol=0)
    assert np.isnan(got["nll"]).all()


@pytest.mark.parametrize("overrides, key, words", [
    (["score.task.template=Topic of this article?"], "score.task.template", "no {text}"),
    (["score.task.template=Topic of {title}: {text}"], "score.task.template", "unknown placeholder {title}"),
    (["score.task.template=Topic: {text}", "score.task.choices=[]"], "score.task.choices", "empty"),
    (["score.task.template=Topic: {text}", "score.task.choices=[World, Sports, World]"], "score.task.choices",
     "duplicate choice 'World'"),
    (["score.task.choices=[World, Sports]"], "score.task", "need a template"),
])
def test_bad_task_prompt_names_the_key(overrides, key, words):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert "\n" not in message and f"{key}" in message and words in message, message


def test_bad_template_stops_the_cli_before_compute(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "labelnext.pipelines.cli", "run", "--corpus", str(tmp_path / "none"),
                           "--output", str(tmp_path / "out"), "--budget", "5", "--set",
                           "score.task.template=Topic?"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "score.task.template" in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_prompt_too_long_for_the_window_is_a_clear_error(scorer):
    tiny = PromptFormat.build(scorer.tokenizer, scorer.cfg.task)
    with pytest.raises(ValueError, match="score.max_tokens"):
        tiny.encode(scorer.tokenizer, ["x"], window=tiny.overhead, truncation="head")


_VLLM_SCRIPT = textwrap.dedent("""
    import json, sys

    if __name__ == "__main__":
        from labelnext.ops.core.quiet import quiet_third_party
        quiet_third_party()
        import numpy as np
        from labelnext.ops.score.scorer import Scorer
        from labelnext.ops.score.settings import ScoreConfig

        job = json.load(open(sys.argv[1]))
        scorer = Scorer(ScoreConfig(**job["cfg"]), device="cpu")
        ids = scorer.tokenize(job["texts"]).ids
        out = {"backend": scorer.backend, "logprobs": scorer.choice_logprobs(ids).tolist(),
               "probs": np.stack(scorer.score_texts(job["texts"])["llm_probs"]).tolist()}
        scorer.close()
        json.dump(out, open(sys.argv[2], "w"))
""")


@pytest.mark.slow
def test_vllm_and_transformers_give_the_same_choice_probabilities(tmp_path, scorer, reference):
    script, job, result = tmp_path / "prompt_vllm.py", tmp_path / "job.json", tmp_path / "result.json"
    script.write_text(_VLLM_SCRIPT)
    job.write_text(json.dumps({"cfg": {**_cfg().model_dump(), "backend": "vllm"}, "texts": DOCS}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with open(tmp_path / "vllm.log", "w") as log:
        proc = subprocess.run([sys.executable, str(script), str(job), str(result)], cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=900)
    assert proc.returncode == 0, (tmp_path / "vllm.log").read_text()[-4000:]
    vllm = json.loads(result.read_text())
    assert vllm["backend"] == "vllm"
    np.testing.assert_allclose(np.array(vllm["logprobs"]), reference["docs"], atol=TOL, rtol=0)
    hf = scorer.score_texts(DOCS)
    np.testing.assert_allclose(np.array(vllm["probs"]), hf[LLM_PROBS], atol=TOL, rtol=0)


def test_choices_default_to_the_classes_of_the_labels():
    import pyarrow as pa

    from labelnext.ops.io.labels import LabelSet
    from labelnext.pipelines.label_loop import LabelLoop

    cfg = load_config(None, ["score.task.template=Topic: {text}"])
    loop = LabelLoop(cfg, layout=None, ledger=None, counts={})
    assert loop.score_settings(cfg.score) is cfg.score  # a cold start: generative, no labels to name the choices
    loop.labels = LabelSet(pa.array(["a", "b", "c"]), pa.array(["sports", "finance", "sports"]))
    assert loop.score_settings(cfg.score).task.choices == ["finance", "sports"]
    named = load_config(None, ["score.task.template=Topic: {text}", "score.task.choices=[x, y]"])
    assert loop.score_settings(named.score).task.choices == ["x", "y"]  # the config's names win
    plain = load_config(None, [])
    assert loop.score_settings(plain.score) is plain.score  # plain-text scoring has no choices


def test_auto_backend_reuses_the_prompt_for_choices(monkeypatch):
    from labelnext.ops.score import backend_vllm
    from labelnext.ops.score.scorer import choose_backend

    monkeypatch.setattr(backend_vllm, "vllm_available", lambda: True)
    assert choose_backend("auto") == "vllm"  # plain text and generative prompts: vLLM when importable
    assert choose_backend("auto", choices=True) == "transformers"  # the prompt once, the choices after it
    assert choose_backend("vllm", choices=True) == "vllm"  # an explicit backend is kept
