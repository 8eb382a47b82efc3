"""ops.entropy against independent references (scipy / numpy), edge distributions and chunking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import log_softmax as sp_log_softmax
from scipy.stats import entropy as sp_entropy

from labelnext.ops.score.entropy import DocStats, hidden_entropy_nll, reduce_doc, segment_stats, token_entropy_nll


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
