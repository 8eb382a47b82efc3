"""Tokenize stage: the encoder's own input ids, computed without the encoder, as an Arrow column and on Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from labelnext.ops.embed import tokenize as tok
from labelnext.ops.core.columns import TOKEN_IDS
from labelnext.ops.embed.encoder import EmbedConfig, Embedder

TEXTS = ["Rates rose.", "  Leading and trailing spaces  ", "UPPER case Words",
         "Ünïcödé naïve café – emoji 🎉",
         " ".join(["The committee debated the budget line by line late into the night."] * 40), "x"]


@pytest.fixture(scope="module")
def embedder():
    return Embedder(EmbedConfig(), device="cpu")


def test_ids_are_the_encoders_own_preprocessing(embedder):
    stage = tok.EncoderTokenizer.for_encoder(EmbedConfig().model, EmbedConfig().max_seq_length)
    features = embedder.model.preprocess(TEXTS)
    expected = [row[mask.bool()].tolist() for row, mask in zip(features["input_ids"], features["attention_mask"])]
    got = stage(TEXTS)
    assert [g.tolist() for g in got] == expected
    assert all(g.dtype == np.int32 for g in got)
    assert len(got[4]) == stage.max_length == 256  # truncated to the encoder's limit, [SEP] kept
    assert stage([]) == []


def test_embed_max_seq_length_caps_the_ids():
    short = tok.EncoderTokenizer.for_encoder(EmbedConfig().model, 16)
    assert short.max_length == 16 and max(len(i) for i in short(TEXTS)) == 16


def test_tokenize_batch_adds_a_list_column_and_meets_its_contract():
    table = pa.table({"doc_id": ["a", "b", "c"], "text": TEXTS[:3]})
    out = tok.tokenize_batch(table, EmbedConfig())
    tok.CONTRACT.check_output(out.column_names)
    assert out.schema.field(TOKEN_IDS).type == pa.list_(pa.int32())
    expected = tok.EncoderTokenizer.for_encoder(EmbedConfig().model, 256)(TEXTS[:3])
    assert out.column(TOKEN_IDS).to_pylist() == [e.tolist() for e in expected]
    assert out.column("doc_id").to_pylist() == ["a", "b", "c"]


def test_ids_array_handles_empty_rows_and_batches():
    arr = tok.ids_array([np.array([1, 2], np.int32), np.array([], np.int32), np.array([7], np.int32)])
    assert arr.to_pylist() == [[1, 2], [], [7]]
    assert tok.ids_array([]).to_pylist() == []


@pytest.mark.slow
def test_tokenize_tasks_feed_the_encoder_actors_on_ray(ray_local, embedder):
    from ray.data import ActorPoolStrategy

    rows = [{"doc_id": f"d{i}", "text": t} for i, t in enumerate(TEXTS)]
    cfg = EmbedConfig()
    ds = tok.tokenize_dataset(ray_local.data.from_items(rows), cfg, batch_size=4).map_batches(
        Embedder, fn_constructor_kwargs={"cfg": cfg, "device": "cpu"}, batch_size=4,
        compute=ActorPoolStrategy(size=1), batch_format="numpy")
    out = ds.to_pandas().set_index("doc_id")
    assert TOKEN_IDS not in out.columns
    got = np.stack([out.loc[f"d{i}", "embedding"] for i in range(len(TEXTS))])
    np.testing.assert_allclose(got, embedder.encode(TEXTS), atol=1e-5)
