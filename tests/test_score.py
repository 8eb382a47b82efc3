"""Score stage with the real bundled SmolLM2 (transformers backend), inputs/packing, and model preparation."""

from __future__ import annotations

import math
import multiprocessing as mp
import random
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from labelnext.ops.core import model_prep
from labelnext.ops.score.scorer import SCORE_COLUMNS, Scorer, count_tokens, docs_per_batch, score_dataset
from labelnext.ops.score.backend_hf import HFBackend, _packed_layout, _static_rows
from labelnext.ops.score.inputs import encode, pack_by_tokens, pack_rows, split_by_tokens, truncate
from labelnext.ops.score.settings import batch_tokens_for
from labelnext.pipelines.config import BUNDLED_ENCODER, BUNDLED_LLM, ScoreConfig

FLUENT = ("The city council approved the new budget on Tuesday, setting aside more money for schools, "
          "road repairs and public parks over the next two years.")
DOCS = [
    FLUENT,
    "Stocks fell sharply in early trading after the central bank raised interest rates again.",
    "def add(a, b):\n    return a + b\n",
    "Le chat dort sur le canapé pendant que la pluie tombe dehors.",
    "| year | revenue |\n| 2021 | 4.2 |\n| 2022 | 5.1 |",
    "Hi.",
]


@lru_cache(maxsize=None)
def scorer(**overrides) -> Scorer:
    return Scorer(ScoreConfig(backend="transformers", **overrides), device="cpu")


def _batch(texts, **extra) -> dict[str, np.ndarray]:
    batch = {"doc_id": np.array([f"d{i}" for i in range(len(texts))], dtype=object),
             "text": np.array(texts, dtype=object)}
    batch.update(extra)
    return batch


# -- pure input handling -------------------------------------------------------------------------------
def test_truncate_head_and_head_tail():
    ids = list(range(10))
    assert truncate(ids, 20, "head") == (ids, False)
    assert truncate(ids, 4, "head") == ([0, 1, 2, 3], True)
    assert truncate(ids, 5, "head_tail") == ([0, 1, 2, 8, 9], True)
    assert truncate(ids, 4, "head_tail") == ([0, 1, 8, 9], True)


def test_pack_by_tokens_bounds_padding_and_covers_everything():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(200)] + [5000]
    groups = pack_by_tokens(lengths, batch_tokens=1024)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        width = max(lengths[i] for i in g)
        real = sum(lengths[i] for i in g)
        assert len(g) == 1 or (len(g) * width <= 1024 and len(g) * width <= 1.25 * real)
    assert [5000] in [[lengths[i] for i in g] for g in groups]


def test_split_by_tokens_keeps_order_and_closes_groups_at_the_budget():
    lengths = [100, 900, 50, 2000, 10, 10]
    groups = split_by_tokens(lengths, group_tokens=1000)
    assert groups == [[0, 1], [2, 3], [4, 5]]
    assert split_by_tokens([], 1000) == []
    assert split_by_tokens([5000], 1000) == [[0]]


def test_docs_per_batch_scales_with_token_budget():
    assert docs_per_batch(ScoreConfig()) >= 32
    assert docs_per_batch(ScoreConfig(batch_tokens=65536, max_tokens=512)) == 512


def test_batch_tokens_auto_is_sized_per_device():
    assert batch_tokens_for(ScoreConfig(), "cpu") == 8192
    assert batch_tokens_for(ScoreConfig(), "cuda") == 65536
    assert batch_tokens_for(ScoreConfig(batch_tokens=1000), "cuda") == 1000
    # A GPU call carries 16 budgets of full-window documents (4 on CPU): real documents are mostly shorter.
    assert docs_per_batch(ScoreConfig(max_tokens=512), "cuda") == 2048
    with pytest.raises(ValueError, match="batch_tokens"):
        ScoreConfig(batch_tokens=0)


def test_pack_rows_first_fit_decreasing():
    rng = random.Random(2)
    lengths = [rng.randint(2, 512) for _ in range(300)] + [700]
    rows = pack_rows(lengths, 512)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 512 for r in rows if r != [300])
    assert [300] in rows  # longer than a row: a row of its own
    # First-fit decreasing stays within 11/9 OPT + 1 rows; the real-token bound is a lower bound on OPT.
    assert len(rows) <= 11 / 9 * (-(-sum(lengths[:300]) // 512)) + 2
    assert pack_rows([], 512) == []


def test_packed_layout_restarts_positions_and_maps_every_token():
    seqs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    rows = [[0, 1], [2]]  # documents 0 and 1 share a row of width 6
    order = [0, 1, 2]
    ids, positions, flat = _packed_layout(rows, [3, 2, 4], [seqs[i] for i in order], 3, 6)
    assert ids.tolist() == [[5, 6, 7, 8, 9, 0], [10, 11, 12, 13, 0, 0], [0] * 6]
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1], [0, 1, 2, 3, 4, 5]]
    assert ids.reshape(-1)[flat].tolist() == [t for s in seqs for t in s]
    assert [_static_rows(n, 16) for n in (1, 2, 3, 5, 9, 16)] == [1, 2, 4, 8, 16, 16]


def test_device_dtype_and_backend_resolution(monkeypatch):
    import torch

    from labelnext.ops.score import backend_vllm as score_vllm
    from labelnext.ops.score import scorer as score

    assert score.resolve_dtype("auto", "cpu") == torch.float32
    assert score.resolve_dtype("auto", "cuda") == torch.bfloat16
    assert score.resolve_dtype("float16", "cpu") == torch.float16
    assert score.resolve_device("cpu") == "cpu"
    assert score.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert score.choose_backend("transformers") == "transformers"
    monkeypatch.setattr(score_vllm, "vllm_available", lambda: False)
    assert score.choose_backend("auto") == "transformers"
    monkeypatch.setattr(score_vllm, "vllm_available", lambda: True)
    assert score.choose_backend("auto") == "vllm"


# -- real model ----------------------------------------------------------------------------------------
def test_scores_real_sentences():
    s = scorer()
    out = s(_batch(DOCS))
    assert s.backend == "transformers"
    for col in SCORE_COLUMNS:
        assert len(out[col]) == len(DOCS)
    assert np.all(np.isfinite(out["uncertainty"])) and np.all(out["uncertainty"] > 0)
    assert np.all(out["max_entropy"] >= out["uncertainty"])
    # SmolLM2's vocabulary has 49152 entries: entropy is bounded by log(V).
    assert np.all(out["max_entropy"] <= math.log(49152) + 1e-3)
    assert not out["truncated"].any()
    # BOS is prepended, so every text token is predicted: n_tokens equals the tokenizer-only count.
    assert out["n_tokens"].tolist() == count_tokens(DOCS, s.cfg)
    assert out["n_tokens"].dtype == np.int64 and out["truncated"].dtype == bool


def test_token_counts_without_transformers_match_the_transformers_tokenizer():
    from labelnext.ops.score.scorer import fast_token_counter, load_tokenizer
    from labelnext.ops.score.inputs import bos_prefix, text_token_ids

    cfg = ScoreConfig(model=BUNDLED_LLM, backend="transformers")
    model_dir = model_prep.prepare_model(cfg.model)
    docs = [*DOCS, "", "  leading and trailing spaces  ", "emoji 🎉 and CJK 漢字", "<|im_start|> in text", "x" * 3000]
    tokenizer = load_tokenizer(model_dir)
    expected = [max(0, len(bos_prefix(tokenizer)) + len(ids) - 1) for ids in text_token_ids(tokenizer, docs)]
    assert fast_token_counter(model_dir) is not None
    assert count_tokens(docs, cfg) == expected
    # The driver's path: a fresh interpreter counts tokens without importing transformers.
    code = ("import sys; from labelnext.ops.score.scorer import count_tokens; from labelnext.pipelines.config import "
            f"ScoreConfig; print(count_tokens({docs!r}, ScoreConfig(model={BUNDLED_LLM!r})), "
            "'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"{expected} False"


def test_fluent_text_is_less_surprising_than_shuffled_words():
    words = FLUENT.split()
    shuffled = " ".join(random.Random(1).sample(words, len(words)))
    out = scorer()(_batch([FLUENT, shuffled]))
    assert out["nll"][0] < out["nll"][1] - 0.5


def test_empty_and_missing_text_get_zero_tokens_and_nan():
    out = scorer()(_batch(["", None, "Hello there, how are you today?"]))
    assert out["n_tokens"].tolist()[:2] == [0, 0]
    assert np.isnan(out["uncertainty"][:2]).all() and np.isnan(out["nll"][:2]).all()
    assert np.isnan(out["max_entropy"][:2]).all()
    assert out["n_tokens"][2] > 0 and np.isfinite(out["uncertainty"][2])


def test_truncation_flags_and_head_tail():
    long_doc = " ".join(DOCS[:4]) * 3
    head = scorer(max_tokens=24)
    out = head(_batch([long_doc, DOCS[-1]]))
    assert out["truncated"].tolist() == [True, False]
    assert out["n_tokens"][0] == 23  # 24 model positions including BOS -> 23 predicted tokens

    tail = scorer(max_tokens=24, truncation="head_tail")
    out_ht = tail(_batch([long_doc]))
    assert out_ht["truncated"].tolist() == [True] and out_ht["n_tokens"][0] == 23
    assert out_ht["uncertainty"][0] != pytest.approx(out["uncertainty"][0])

    full = tail.tokenizer(long_doc, add_special_tokens=False)["input_ids"]
    enc = encode(tail.tokenizer, [long_doc], window=24, truncation="head_tail")
    assert enc.ids[0] == [tail.tokenizer.bos_token_id] + full[:12] + full[-11:]


def test_order_is_preserved_across_length_sorted_batches():
    texts = [DOCS[i % len(DOCS)] * (1 + (i * 5) % 3) for i in range(7)]
    small_batches = scorer(batch_tokens=96)
    out = small_batches(_batch(texts))
    one_by_one = [small_batches(_batch([t])) for t in texts]
    for col in ("uncertainty", "max_entropy", "nll", "n_tokens"):
        expected = np.array([o[col][0] for o in one_by_one])
        np.testing.assert_allclose(out[col], expected, rtol=1e-4, atol=1e-4, err_msg=col)


def test_packed_rows_score_like_length_buckets():
    texts = [DOCS[i % len(DOCS)] * (1 + (i * 5) % 3) for i in range(9)] + [""]
    packed, bucketed = scorer(packing="on", batch_tokens=128), scorer(packing="off", batch_tokens=128)
    assert packed.engine.packed and not bucketed.engine.packed
    a, b = packed(_batch(texts)), bucketed(_batch(texts))
    assert a["n_tokens"].tolist() == b["n_tokens"].tolist()
    for col in ("uncertainty", "max_entropy", "nll"):
        np.testing.assert_allclose(a[col], b[col], rtol=0, atol=1e-4, equal_nan=True, err_msg=col)


def test_per_document_backends_are_grouped_and_score_the_same():
    """The vLLM backend's interface yields one hidden state per document; the Scorer groups them for the head."""
    import copy

    texts = [DOCS[i % len(DOCS)] * (1 + i % 3) for i in range(8)]
    batched = scorer(batch_tokens=128)
    expected = batched(_batch(texts))

    class PerDocument:
        head = batched.engine.head

        def hidden_states(self, seqs):
            for group, hidden in batched.engine.hidden_batches(seqs):
                yield from zip(group, hidden.split([len(seqs[i]) for i in group]))

    per_doc = copy.copy(batched)
    per_doc.engine, per_doc.chunk = PerDocument(), 16  # groups of >= 64 positions: several per call
    got = per_doc(_batch(texts))
    assert got["n_tokens"].tolist() == expected["n_tokens"].tolist()
    for col in ("uncertainty", "max_entropy", "nll"):
        np.testing.assert_allclose(got[col], expected[col], rtol=0, atol=1e-5, err_msg=col)


def _tiny_model(tmp_path, kind: str) -> str:
    import torch
    from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=128))
    else:  # ALiBi: positions come from the attention mask, position ids are ignored
        model = BloomForCausalLM(BloomConfig(vocab_size=300, hidden_size=64, n_layer=2, n_head=4))
    model.save_pretrained(tmp_path / kind)
    return str(tmp_path / kind)


def _all_hidden(backend: HFBackend, seqs) -> dict[int, "torch.Tensor"]:
    out = {}
    for group, hidden in backend.hidden_batches(seqs):
        for i, h in zip(group, hidden.split([len(seqs[i]) for i in group])):
            out[i] = h
    return out


@pytest.mark.parametrize("kind, packs", [("llama", True), ("bloom", False)])
def test_packing_is_used_only_where_the_model_honours_position_ids(tmp_path, kind, packs):
    import torch

    path = _tiny_model(tmp_path, kind)
    rng = random.Random(3)
    seqs = [[rng.randrange(300) for _ in range(rng.randint(2, 60))] for _ in range(23)]
    eager = HFBackend(path, device="cpu", dtype=torch.float32, batch_tokens=256, window=64, packing=True)
    assert eager.packed is packs
    bucketed = HFBackend(path, device="cpu", dtype=torch.float32, batch_tokens=256, window=64, packing=False)
    got, ref = _all_hidden(eager, seqs), _all_hidden(bucketed, seqs)
    assert sorted(got) == list(range(len(seqs)))
    for i in range(len(seqs)):
        torch.testing.assert_close(got[i], ref[i], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_packed_forward_matches_eager(tmp_path):
    import torch

    path = _tiny_model(tmp_path, "llama")
    rng = random.Random(4)
    seqs = [[rng.randrange(300) for _ in range(rng.randint(2, 60))] for _ in range(11)]
    args = dict(device="cpu", dtype=torch.float32, batch_tokens=256, window=64, packing=True)
    compiled = HFBackend(path, compile=True, **args)
    got, ref = _all_hidden(compiled, seqs), _all_hidden(HFBackend(path, **args), seqs)
    assert compiled.compiled  # compiled without falling back to eager
    for i in range(len(seqs)):
        torch.testing.assert_close(got[i], ref[i], rtol=1e-4, atol=1e-4)


def test_passthrough_columns_are_unchanged():
    extra = {"label": np.array([3, 1, 4], dtype=np.int64), "source": np.array(["a", "b", None], dtype=object)}
    batch = _batch(DOCS[:3], **extra)
    out = scorer()(dict(batch))
    assert out["doc_id"].tolist() == batch["doc_id"].tolist()
    assert out["text"].tolist() == DOCS[:3]
    assert out["label"].tolist() == [3, 1, 4] and out["source"].tolist() == ["a", "b", None]


def test_parameter_count_of_the_bundled_model():
    # SmolLM2-135M: ~134.5M parameters with the output head tied to the input embedding.
    assert 130e6 < model_prep.parameter_count(ScoreConfig()) < 140e6


def test_resolve_encoder_path():
    path = Path(model_prep.resolve_encoder_path(BUNDLED_ENCODER))
    assert path.is_dir() and path.name == "model"
    assert model_prep.resolve_encoder_path("sentence-transformers/foo") == "sentence-transformers/foo"


def test_unknown_references_fail_with_a_clear_message(tmp_path):
    with pytest.raises(model_prep.ModelPrepError, match="unknown bundled model"):
        model_prep.prepare_model("bundled:nope")
    with pytest.raises(model_prep.ModelPrepError, match="not a checkpoint"):
        model_prep.prepare_model(str(tmp_path))
    with pytest.raises(model_prep.ModelPrepError, match="local Hugging Face cache"):
        model_prep.prepare_model("no-such-org/no-such-model-xyz")


# -- model preparation: concurrent-safe, idempotent -----------------------------------------------------
def _prepare_racer(cache_dir: str, barrier, results) -> None:
    converted = []
    original = model_prep._convert_gguf

    def counting(gguf, out):
        converted.append(1)
        original(gguf, out)

    model_prep._convert_gguf = counting
    barrier.wait()
    path = model_prep.prepare_model(BUNDLED_LLM, cache_dir)
    results.put((path, len(converted)))


@pytest.mark.slow
def test_model_prep_races_produce_one_valid_checkpoint(tmp_path):
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_prepare_racer, args=(str(tmp_path), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    paths = {path for path, _ in got}
    assert len(paths) == 1 and sum(n for _, n in got) == 1  # both see one checkpoint; one converted it
    target = Path(paths.pop())
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [target.name]  # no temp dirs left
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in target.iterdir()}

    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(target).architectures == ["LlamaForCausalLM"]
    weights = target / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert model_prep.prepare_model(BUNDLED_LLM, str(tmp_path)) == str(target)  # idempotent, no rewrite
    assert weights.stat().st_mtime_ns == before
    # A prepared checkpoint directory is itself a valid reference.
    assert model_prep.prepare_model(str(target)) == str(target)


# -- Ray wrapper ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_score_dataset_on_local_ray(ray_local):
    cfg = ScoreConfig(backend="transformers", max_tokens=64)
    rows = [{"doc_id": f"d{i}", "text": t, "label": i} for i, t in enumerate(DOCS)]
    # Tokenised in CPU tasks ahead of the actors, as on GPU (the inline path runs in every end-to-end test).
    out = score_dataset(ray_local.data.from_items(rows), cfg, use_gpu=False, concurrency=1,
                        tokenize_in_tasks=True).to_pandas()
    assert sorted(out["doc_id"]) == sorted(r["doc_id"] for r in rows)
    assert set(SCORE_COLUMNS) | {"doc_id", "text", "label"} <= set(out.columns)
    out = out.set_index("doc_id")
    local = scorer(max_tokens=64)(_batch(DOCS))
    for i, doc_id in enumerate(local["doc_id"]):
        assert out.loc[doc_id, "label"] == i
        assert out.loc[doc_id, "n_tokens"] == local["n_tokens"][i]
        assert out.loc[doc_id, "uncertainty"] == pytest.approx(float(local["uncertainty"][i]), abs=1e-4)


def test_ids_tokenised_in_a_task_score_like_text():
    import pyarrow as pa

    from labelnext.ops.core.columns import SCORE_IDS, SCORE_TRUNCATED
    from labelnext.ops.score.scorer import score_tokenize_batch

    cfg = ScoreConfig(backend="transformers", max_tokens=16, truncation="head_tail")
    texts = DOCS + ["", None]
    table = score_tokenize_batch(pa.table({"doc_id": [f"d{i}" for i in range(len(texts))], "text": texts}), cfg)
    assert table.column(SCORE_TRUNCATED).to_pylist()[0] is True  # FLUENT is longer than 16 tokens
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    s = scorer(max_tokens=16, truncation="head_tail")
    from_ids, from_text = s(dict(batch)), s(_batch(texts))
    assert SCORE_IDS not in from_ids and SCORE_TRUNCATED not in from_ids
    for col in SCORE_COLUMNS:
        np.testing.assert_array_equal(from_ids[col], from_text[col])
