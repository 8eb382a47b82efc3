"""The loop's LLM features (bench/llm_features.py) with the bundled scoring model: each document's mean final
hidden state from the Scorer's engine, packed batches included, and the on-disk cache."""

from __future__ import annotations

import numpy as np
import torch

from bench import llm_features
from labelnext.ops.score.scorer import ScoreConfig, ScoreTokenizer
from labelnext.ops.core.model_prep import prepare_model

TEXTS = ["what is my credit card's interest rate", "",
         "Stocks fell on Monday as oil prices climbed to a record, and investors sold technology shares.",
         "play some jazz"]


def test_features_are_each_documents_mean_hidden_state_and_empty_text_gives_zeros():
    from transformers import AutoModel

    cfg = ScoreConfig(backend="transformers")
    features = llm_features.pooled_hidden_states(TEXTS, cfg, "t")
    model_dir = prepare_model(cfg.model, cfg.cache_dir)
    ids = ScoreTokenizer(model_dir, cfg)(TEXTS).ids
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert features.shape == (4, model.config.hidden_size) and features.dtype == np.float32
    assert not features[1].any()
    with torch.inference_mode():
        for i in (0, 2, 3):  # each document alone, no packing, no padding
            alone = model(input_ids=torch.tensor([ids[i]])).last_hidden_state[0].mean(0).numpy()
            np.testing.assert_allclose(features[i], alone, rtol=1e-3, atol=1e-3)
    assert not np.allclose(features[0], features[3], atol=1e-2)


def test_features_are_computed_once_per_dataset_content(tmp_path, monkeypatch):
    calls = []

    def pooled(texts, cfg, name=""):
        calls.append(len(texts))
        return np.arange(len(texts) * 3, dtype=np.float32).reshape(len(texts), 3)

    monkeypatch.setattr(llm_features, "CACHE", tmp_path)
    monkeypatch.setattr(llm_features, "pooled_hidden_states", pooled)
    cfg = ScoreConfig(backend="transformers")
    rows = np.array([0, 2, 5])
    first = llm_features.llm_features("ds", "sha", ["a", "b", "c"], rows, cfg)
    again = llm_features.llm_features("ds", "sha", ["a", "b", "c"], rows, cfg)
    other = llm_features.llm_features("ds", "sha2", ["a", "b", "c"], rows, cfg)
    np.testing.assert_array_equal(first, again)
    assert calls == [3, 3] and other.shape == (3, 3)
    assert sorted(p.name.startswith("llmfeat-ds-") for p in tmp_path.iterdir()) == [True, True]
