"""ops.entropy and the fused head against independent references (scipy / numpy / float64 torch), edge
distributions, chunking, and the Scorer on packed rows with the fused head on and off."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import log_softmax as sp_log_softmax
from scipy.stats import entropy as sp_entropy

from labelnext.ops.score.entropy import DocStats, hidden_entropy_nll, reduce_doc, segment_stats, token_entropy_nll
from labelnext.ops.score.fused_head import Tiles, fused_entropy_nll, tiles_for
from labelnext.ops.score.head import OutputHead


def _scipy_reference(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits = logits.astype(np.float64)
    probs = np.exp(sp_log_softmax(logits, axis=-1))
    ent = sp_entropy(probs, axis=-1)  # natural log: nats
    nll = -sp_log_softmax(logits, axis=-1)[np.arange(len(targets)), targets]
    return ent, nll


@pytest.mark.parametrize("scale", [0.1, 1.0, 8.0])
def test_matches_scipy_on_random_logits(scale):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((37, 1000)) * scale).astype(np.float32)
    targets = rng.integers(0, 1000, size=37)
    ent, nll = token_entropy_nll(logits, targets)
    ref_ent, ref_nll = _scipy_reference(logits, targets)
    np.testing.assert_allclose(ent.numpy(), ref_ent, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(nll.numpy(), ref_nll, rtol=1e-4, atol=1e-5)


def test_uniform_is_log_v_and_one_hot_is_zero():
    v = 49152
    uniform = torch.zeros(3, v)
    ent, nll = token_entropy_nll(uniform, torch.tensor([0, 5, v - 1]))
    np.testing.assert_allclose(ent.numpy(), math.log(v), rtol=1e-6)
    np.testing.assert_allclose(nll.numpy(), math.log(v), rtol=1e-6)

    one_hot = torch.full((2, v), -1e4)
    one_hot[0, 7] = 0.0
    one_hot[1, 9] = 0.0
    ent, nll = token_entropy_nll(one_hot, torch.tensor([7, 9]))
    assert ent.abs().max().item() < 1e-6
    assert nll.abs().max().item() < 1e-6


def test_masked_vocabulary_entries_do_not_make_nan():
    logits = torch.tensor([[0.0, 0.0, -math.inf, -math.inf]])
    ent, nll = token_entropy_nll(logits, torch.tensor([1]))
    assert ent.item() == pytest.approx(math.log(2), rel=1e-6)
    assert nll.item() == pytest.approx(math.log(2), rel=1e-6)


def test_log_probs_give_the_same_as_logits():
    rng = np.random.default_rng(1)
    logits = torch.tensor(rng.standard_normal((5, 300)), dtype=torch.float32)
    targets = torch.tensor(rng.integers(0, 300, 5))
    a = token_entropy_nll(logits, targets)
    b = token_entropy_nll(torch.log_softmax(logits, -1), targets)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_low_precision_logits_are_computed_in_float32():
    rng = np.random.default_rng(2)
    logits = torch.tensor(rng.standard_normal((8, 500)) * 4, dtype=torch.bfloat16)
    targets = torch.tensor(rng.integers(0, 500, 8))
    ent, nll = token_entropy_nll(logits, targets)
    assert ent.dtype == torch.float32
    ref_ent, ref_nll = _scipy_reference(logits.float().numpy(), targets.numpy())
    np.testing.assert_allclose(ent.numpy(), ref_ent, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(nll.numpy(), ref_nll, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 16, 1000])
def test_chunking_equals_unchunked(chunk):
    rng = np.random.default_rng(3)
    hidden = torch.tensor(rng.standard_normal((50, 24)), dtype=torch.float32)
    weight = torch.tensor(rng.standard_normal((700, 24)), dtype=torch.float32)
    targets = torch.tensor(rng.integers(0, 700, 50))
    full_ent, full_nll = token_entropy_nll(hidden @ weight.T, targets, chunk=10_000)
    ent, nll = hidden_entropy_nll(hidden, targets, head=lambda h: h @ weight.T, chunk=chunk)
    torch.testing.assert_close(ent, full_ent, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nll, full_nll, rtol=1e-5, atol=1e-5)


def test_shape_errors_are_reported():
    with pytest.raises(ValueError, match="expected logits"):
        token_entropy_nll(torch.zeros(4, 10), torch.zeros(3, dtype=torch.long))


def test_reduce_doc_stats_and_empty():
    stats = reduce_doc(torch.tensor([1.0, 3.0, 2.0]), torch.tensor([0.5, 1.5, 1.0]))
    assert stats == DocStats(mean_entropy=2.0, max_entropy=3.0, nll=1.0, n_tokens=3)
    empty = reduce_doc(torch.zeros(0), torch.zeros(0))
    assert empty.n_tokens == 0
    assert math.isnan(empty.mean_entropy) and math.isnan(empty.max_entropy) and math.isnan(empty.nll)
    ent, nll = hidden_entropy_nll(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), head=lambda h: h)
    assert ent.shape == (0,) and nll.shape == (0,)


def test_large_vocabulary_blocks_match_scipy():
    # V large enough that the CPU path splits a chunk into cache-sized row blocks.
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((30, 60_000)) * 3).astype(np.float32)
    targets = rng.integers(0, 60_000, size=30)
    ent, nll = token_entropy_nll(logits, targets)
    ref_ent, ref_nll = _scipy_reference(logits, targets)
    np.testing.assert_allclose(ent.numpy(), ref_ent, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(nll.numpy(), ref_nll, rtol=1e-5, atol=1e-4)


def test_segment_stats_match_per_document_reduction():
    rng = np.random.default_rng(5)
    lengths = torch.tensor([1, 7, 3, 12])
    entropy = torch.tensor(rng.random(int(lengths.sum())) * 5, dtype=torch.float32)
    nll = torch.tensor(rng.random(int(lengths.sum())) * 9, dtype=torch.float32)
    got = segment_stats(entropy, nll, lengths)
    assert got.shape == (4, 3) and got.dtype == torch.float64
    for d, (e, n) in enumerate(zip(entropy.split(lengths.tolist()), nll.split(lengths.tolist()))):
        ref = reduce_doc(e, n)
        np.testing.assert_allclose(got[d].numpy(), [ref.mean_entropy, ref.max_entropy, ref.nll], rtol=1e-12)


# -- fused output head + entropy (vocabulary in chunks, online log-sum-exp) ---------------------------------
FUSED_TOL_NATS = 1e-3  # float32 accumulation against the float64 reference


def _head_reference(hidden, targets, head: OutputHead) -> tuple[np.ndarray, np.ndarray]:
    """float64 logits through the same transforms, then textbook log-softmax entropy and NLL."""
    logits = hidden.double() @ head.weight.double().T
    if head.bias is not None:
        logits = logits + head.bias.double()
    logits = logits * head.scale
    if head.softcap is not None:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    logp = torch.log_softmax(logits, dim=-1)
    ent = -(logp.exp() * logp).sum(-1)
    nll = -logp.gather(-1, torch.as_tensor(targets).long().unsqueeze(-1)).squeeze(-1)
    return ent.numpy(), nll.numpy()


def _fused_against_reference(hidden, targets, head: OutputHead, tiles=None) -> tuple[torch.Tensor, torch.Tensor]:
    ent, nll = fused_entropy_nll(hidden, targets, head, tiles)
    ref_ent, ref_nll = _head_reference(hidden.float(), targets, head)
    assert np.isfinite(ent.numpy()).all() and np.isfinite(nll.numpy()).all()
    assert np.abs(ent.numpy() - ref_ent).max() <= FUSED_TOL_NATS
    assert np.abs(nll.numpy() - ref_nll).max() <= FUSED_TOL_NATS
    return ent, nll


def _random_head(rng, vocab: int, width: int, *, bias=False, scale=1.0, softcap=None, spread=0.3) -> OutputHead:
    weight = torch.tensor(rng.standard_normal((vocab, width)) * spread, dtype=torch.float32)
    b = torch.tensor(rng.standard_normal(vocab) * 2, dtype=torch.float32) if bias else None
    return OutputHead(weight, b, scale=scale, softcap=softcap)


@pytest.mark.parametrize("vocab,tiles", [
    (1000, Tiles(rows=7, vocab=128)),     # 8 vocabulary chunks, the last one 104 wide; 8 position blocks
    (1000, Tiles(rows=64, vocab=1000)),   # one chunk
    (4099, Tiles(rows=50, vocab=512)),    # a prime vocabulary: the last chunk is 3 wide
    (300, Tiles(rows=1, vocab=1)),        # one entry per chunk: every step rescales
])
@pytest.mark.parametrize("transform", [
    {}, {"bias": True}, {"scale": 0.0625}, {"scale": 3.0, "bias": True}, {"softcap": 30.0},
    {"softcap": 5.0, "bias": True},
])
def test_fused_head_matches_float64_reference(vocab, tiles, transform):
    rng = np.random.default_rng(vocab)
    head = _random_head(rng, vocab, 48, **transform)
    hidden = torch.tensor(rng.standard_normal((50, 48)), dtype=torch.float32)
    targets = torch.tensor(rng.integers(0, vocab, 50))
    ent, nll = _fused_against_reference(hidden, targets, head, tiles)
    assert ent.dtype == nll.dtype == torch.float32 and ent.shape == nll.shape == (50,)
    # The same numbers as today's path (the head's whole logit rows per chunk of positions).
    old_ent, old_nll = hidden_entropy_nll(hidden, targets, head=head, chunk=16)
    torch.testing.assert_close(ent, old_ent, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(nll, old_nll, rtol=1e-5, atol=2e-5)


def test_fused_head_when_the_max_moves_late_and_far():
    """Logits rising across the vocabulary: every chunk raises the running max (by up to ~100 nats), so the
    running sums are rescaled at each step; peaked and flat rows and targets in the first and last chunks."""
    rng = np.random.default_rng(7)
    vocab, width = 3001, 16
    head = _random_head(rng, vocab, width, spread=1.0)
    head.bias = torch.linspace(-60.0, 60.0, vocab)
    hidden = torch.tensor(rng.standard_normal((40, width)) * np.geomspace(0.01, 30, 40)[:, None], dtype=torch.float32)
    targets = torch.tensor([0, vocab - 1] * 20)
    _fused_against_reference(hidden, targets, head, Tiles(rows=16, vocab=256))


def test_fused_head_uniform_and_empty():
    head = OutputHead(torch.zeros(5000, 8))
    ent, nll = fused_entropy_nll(torch.randn(3, 8), torch.tensor([0, 17, 4999]), head, Tiles(rows=2, vocab=999))
    np.testing.assert_allclose(ent.numpy(), math.log(5000), rtol=1e-6)
    np.testing.assert_allclose(nll.numpy(), math.log(5000), rtol=1e-6)
    ent, nll = fused_entropy_nll(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long), head)
    assert ent.shape == nll.shape == (0,)
    with pytest.raises(ValueError, match="expected hidden"):
        fused_entropy_nll(torch.zeros(4, 8), torch.zeros(3, dtype=torch.long), head)


def test_fused_head_on_bf16_hidden_states():
    """bf16 hidden states (a bf16 model body) are cast to float32 per block: exact for the values they hold."""
    rng = np.random.default_rng(11)
    head = _random_head(rng, 2500, 64, bias=True)
    hidden = torch.tensor(rng.standard_normal((33, 64)), dtype=torch.bfloat16)
    targets = torch.tensor(rng.integers(0, 2500, 33))
    _fused_against_reference(hidden, targets, head, Tiles(rows=8, vocab=300))


def test_default_tiles_cover_the_whole_vocabulary():
    assert tiles_for("cpu").rows * tiles_for("cpu").vocab * 4 <= 1 << 26  # no [chunk_T, V] matrix on CPU
    rng = np.random.default_rng(12)
    head = _random_head(rng, tiles_for("cpu").vocab * 2 + 5, 8)
    hidden = torch.tensor(rng.standard_normal((tiles_for("cpu").rows + 3, 8)), dtype=torch.float32)
    targets = torch.tensor(rng.integers(0, head.vocab_size, hidden.shape[0]))
    _fused_against_reference(hidden, targets, head)  # the device's default tiles


def test_scorer_on_packed_rows_scores_the_same_fused_or_not():
    """The bundled model (49,152-entry vocabulary: 12 chunks of the CPU tile) on packed rows holding several
    documents each: the fused head and today's path agree, and both match float64 entropy of each document's
    own forward (a document's last position predicts nothing; a one-token document scores NaN)."""
    from transformers import AutoModelForCausalLM

    from labelnext.ops.score.scorer import Scorer
    from labelnext.ops.score.settings import ScoreConfig

    texts = ["The council approved the budget on Tuesday.", "Stocks fell after the bank raised rates again.",
             "def add(a, b):\n    return a + b\n", "", "Le chat dort sur le canapé.", "Hi."] * 2
    base = ScoreConfig(backend="transformers", packing="on", batch_tokens=64)
    fused = Scorer(base.model_copy(update={"fused_head": "on"}), device="cpu")
    assert fused.engine.packed
    plain = Scorer(base.model_copy(update={"fused_head": "off"}), device="cpu")
    enc = fused.tokenize(texts)
    assert max(map(len, enc.ids)) < 64 // 2  # several documents per 64-token row
    a, b = fused.score_texts(texts), plain.score_texts(texts)
    assert a["n_tokens"].tolist() == b["n_tokens"].tolist()
    model = AutoModelForCausalLM.from_pretrained(fused.model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        for i, ids in enumerate(enc.ids):
            for col in ("uncertainty", "max_entropy", "nll"):
                assert abs(a[col][i] - b[col][i]) <= 1e-4 or (np.isnan(a[col][i]) and np.isnan(b[col][i])), col
            if len(ids) < 2:
                assert np.isnan(a["uncertainty"][i]) and a["n_tokens"][i] == 0
                continue
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), dim=-1)
            ent = -(logp.exp() * logp).sum(-1)
            nll = -logp.gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)
            assert abs(a["uncertainty"][i] - ent.mean().item()) <= FUSED_TOL_NATS
            assert abs(a["max_entropy"][i] - ent.max().item()) <= FUSED_TOL_NATS
            assert abs(a["nll"][i] - nll.mean().item()) <= FUSED_TOL_NATS
    fused.close()
    plain.close()
