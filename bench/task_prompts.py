"""The task prompt of each labelled dataset (``score.task``): an instruction template and the label names the
scoring LLM chooses between, as a user would write them for their corpus.

The label names are the dataset's own, made readable where they are identifiers (CLINC150's ``book_flight`` is
offered as "book flight"); ``gold_label`` maps a choice back to the dataset's label. CLINC150's 150 names are not
listed in its instruction (they would multiply the prompt's length); the model still chooses between them.

    python -m bench.task_prompts --pool-cap 600    # score every pool document once, cached (the slow part)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import log, setup_env  # noqa: E402


@dataclass(frozen=True)
class DatasetTask:
    template: str
    choices: Optional[tuple[str, ...]] = None  # None: the dataset's labels, made readable
    # The scoring window (score.max_tokens, score.truncation) where the default's 512 tokens would make the CPU
    # run too long for its pool: long articles and reviews are read from their first (and last) tokens.
    max_tokens: Optional[int] = None
    truncation: str = "head"
    # A smaller pool than --pool-cap where every document costs many passes (CLINC150: 150 choices).
    pool_cap: Optional[int] = None

    def names(self, labels: np.ndarray) -> list[str]:
        """The label names offered to the scoring LLM."""
        return list(self.choices or (readable(lab) for lab in sorted(set(np.asarray(labels).astype(str)))))


TASKS = {
    "ag_news_test": DatasetTask("Which topic is this news article about: {choices}?\n\n{text}",
                                ("World", "Sports", "Business", "Sci/Tech")),
    "bbc_sports_politics": DatasetTask("Is this news article about {choices}?\n\n{text}", ("Sports", "Politics"),
                                       max_tokens=192),
    "imdb_reviews_sample": DatasetTask("Is this movie review {choices}?\n\n{text}", ("positive", "negative"),
                                       max_tokens=192, truncation="head_tail"),
    "clinc150_test": DatasetTask("A user said this to a voice assistant. What is the user's intent?\n\n{text}",
                                 pool_cap=300),
}


def readable(label: str) -> str:
    return str(label).replace("_", " ")


def gold_label(choice: str, labels: np.ndarray) -> str:
    """The dataset label a choice stands for."""
    by_name = {readable(lab): str(lab) for lab in set(np.asarray(labels).astype(str))}
    return by_name.get(choice, choice)


def task_config(cfg, dataset: str, labels: np.ndarray):
    """``cfg`` with the dataset's task prompt in ``score.task`` (validated by the product's settings model)."""
    from labelnext.ops.score.prompt import TaskPrompt

    spec = TASKS[dataset]
    task = TaskPrompt(template=spec.template, choices=spec.names(labels))
    window = {"max_tokens": spec.max_tokens, "truncation": spec.truncation} if spec.max_tokens else {}
    return cfg.model_copy(update={"score": cfg.score.model_copy(update={"task": task, **window})})


def task_pool_cap(dataset: str, cap: Optional[int]) -> Optional[int]:
    """``--pool-cap``, lowered to the dataset's own cap where it has one."""
    own = TASKS[dataset].pool_cap if dataset in TASKS else None
    return min(c for c in (cap, own) if c is not None) if (cap or own) else None


def zero_shot_accuracy(ds, cfg) -> tuple[float, float]:
    """Accuracy on the pool's gold labels of the LLM's most probable choice: uncalibrated (zero-shot) and
    calibrated (what the Scorer reports). The uncalibrated probabilities are the calibrated ones times the
    content-free distribution, renormalised (calibration divides by it)."""
    from bench.llm_scores import calibration, llm_scores

    scores = llm_scores(ds, ds.pool, cfg.score)
    probs = np.array(scores.column("llm_probs").to_pylist(), dtype=np.float64)
    content_free = calibration(ds, cfg.score)
    raw = probs * content_free if content_free is not None else probs
    names = np.array([gold_label(c, ds.labels) for c in cfg.score.task.choices], dtype=object)
    gold = ds.labels[ds.pool].astype(str)
    return (float(np.mean(names[np.argmax(raw, axis=1)] == gold)),
            float(np.mean(names[np.argmax(probs, axis=1)] == gold)))


def main(argv: Optional[list[str]] = None) -> int:
    from bench.datasets import discover, load_dataset, split
    from bench.llm_scores import llm_scores

    p = argparse.ArgumentParser(description="Score every pool document with its dataset's task prompt (cached).")
    p.add_argument("--datasets", nargs="*")
    p.add_argument("--pool-cap", type=int)
    args = p.parse_args(argv)
    setup_env()
    from labelnext.pipelines.config import load_config

    base = load_config()
    base = base.model_copy(update={"score": base.score.model_copy(update={"backend": "transformers"})})
    for path in discover(args.datasets):
        if path.stem not in TASKS:
            continue
        ds = split(load_dataset(path), task_pool_cap(path.stem, args.pool_cap), None)
        cfg = task_config(base, ds.name, ds.labels)
        llm_scores(ds, ds.pool, cfg.score)
        log(f"{ds.name}: {len(ds.pool)} pool documents scored with the task prompt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
