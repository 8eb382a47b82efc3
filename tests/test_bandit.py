"""The split of a night's budget between rules: evidence from the audit, shares that follow it, whole counts, and
the multi-rule selection that spends them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from labelnext.ops.cluster.kmeans import rand_keys
from labelnext.ops.core.columns import CLUSTER_ID, DISTANCE, DOC_ID, EMBEDDING, MARGIN, PREDICTED_LABEL, RAND_KEY
from labelnext.ops.select.audit import AUDIT
from labelnext.ops.select.bandit import Z_CAP, allocate, rule_evidence, split_shares
from labelnext.ops.select.selector import SelectConfig
from labelnext.ops.select.split import rules_picked, select_split
from labelnext.ops.select.task_model import TaskModel

RULES = ("helpful", "harmful", "idle")


def fit(x, y):
    return TaskModel.fit(x, y, c=1.0)


def labelled_world(seed: int = 0):
    """Two Gaussian classes. ``helpful`` picked correctly labelled documents from both classes; ``harmful``
    picked documents of class a that came back labelled b (a systematic annotation error); ``idle`` picked
    nothing. The audit is a correctly labelled uniform sample."""
    rng = np.random.default_rng(seed)
    d = 8

    def draw(n, cls):
        centre = np.zeros(d)
        centre[0] = 1.5 if cls == "a" else -1.5
        return centre + rng.normal(size=(n, d))

    parts = [(draw(30, "a"), "a", AUDIT), (draw(30, "b"), "b", AUDIT),
             (draw(20, "a"), "a", "helpful"), (draw(20, "b"), "b", "helpful"),
             (draw(40, "a"), "b", "harmful")]
    x = np.vstack([p[0] for p in parts]).astype(np.float32)
    y = np.concatenate([[p[1]] * len(p[0]) for p in parts])
    rule_of = np.concatenate([[p[2]] * len(p[0]) for p in parts])
    recency = np.zeros(len(y))
    return x, y, rule_of, recency


def test_a_rule_whose_labels_hurt_the_audited_accuracy_loses_its_share():
    x, y, rule_of, recency = labelled_world()
    ev = rule_evidence(x, y, rule_of, recency, RULES, fit, folds=5, seed=0)
    assert ev["helpful"].left_out == ev["harmful"].left_out == 40  # the same m for every rule that picked
    assert ev["harmful"].gain < 0 < ev["harmful"].gain + 1  # leaving them out makes the model better
    assert ev["harmful"].z < 0 <= ev["helpful"].z
    assert ev["idle"].labels == 0 and ev["idle"].z == 0.0 and np.isnan(ev["idle"].gain)
    assert all(e.audit == 60 for e in ev.values())
    shares = split_shares(RULES, ev, explore=0.2)
    assert shares["helpful"] > shares["idle"] > shares["harmful"]
    assert sum(shares.values()) == pytest.approx(1.0)
    assert min(shares.values()) >= 0.2 / 3 - 1e-12  # exploration keeps every rule measured


def test_the_evidence_is_deterministic_and_needs_an_audit():
    x, y, rule_of, recency = labelled_world()
    one = rule_evidence(x, y, rule_of, recency, RULES, fit, seed=4)
    np.testing.assert_equal({r: e.as_dict() for r, e in one.items()},
                            {r: e.as_dict() for r, e in rule_evidence(x, y, rule_of, recency, RULES, fit, seed=4).items()})
    no_audit = np.where(rule_of == AUDIT, "unattributed", rule_of)
    none = rule_evidence(x, y, no_audit, recency, RULES, fit)
    assert all(e.z == 0.0 for e in none.values())
    assert split_shares(RULES, none, explore=0.2) == pytest.approx({r: 1 / 3 for r in RULES})


def test_only_the_most_recent_picks_are_left_out():
    x, y, rule_of, recency = labelled_world()
    # the harmful rule's picks were made on an early night, then it picked correct ones more recently
    extra_x = np.vstack([x[rule_of == "helpful"]])
    x2 = np.vstack([x, extra_x])
    y2 = np.concatenate([y, y[rule_of == "helpful"]])
    rule2 = np.concatenate([rule_of, ["harmful"] * len(extra_x)])
    recency2 = np.concatenate([np.where(rule_of == "harmful", 0, 1), np.full(len(extra_x), 2)])
    ev = rule_evidence(x2, y2, rule2, recency2, ("helpful", "harmful"), fit, seed=0)
    assert ev["harmful"].left_out == 40 and ev["harmful"].gain >= 0  # its recent (correct) picks


def test_shares_saturate_at_the_cap():
    from labelnext.ops.select.bandit import RuleEvidence

    ev = {"a": RuleEvidence("a", 10, 10, 50, 0.5, 0.01, Z_CAP), "b": RuleEvidence("b", 10, 10, 50, -0.5, 0.01, -Z_CAP)}
    shares = split_shares(["a", "b"], ev, explore=0.0)
    assert shares["a"] / shares["b"] == pytest.approx(np.exp(2 * Z_CAP))


@pytest.mark.parametrize("shares,n", [({"a": 0.5, "b": 0.5}, 7), ({"a": 0.2, "b": 0.3, "c": 0.5}, 10),
                                      ({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 100), ({"a": 0.9, "b": 0.1}, 0)])
def test_allocate_gives_whole_counts_summing_to_n(shares, n):
    counts = allocate(shares, n)
    assert sum(counts.values()) == n and list(counts) == list(shares)
    for rule, share in shares.items():
        assert abs(counts[rule] - share * n) < 1


def candidates(n: int = 60, k: int = 6, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = [f"c{i:03d}" for i in range(n)]
    emb = rng.normal(size=(n, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)  # the encoder's unit vectors: no near-duplicates here
    return pa.table({DOC_ID: ids, CLUSTER_ID: pa.array(np.arange(n) % k, pa.int32()),
                     DISTANCE: pa.array(rng.random(n), pa.float32()), RAND_KEY: pa.array(rand_keys(ids, 0)),
                     EMBEDDING: pa.array(emb.tolist(), pa.list_(pa.float32())),
                     MARGIN: pa.array(rng.random(n)), PREDICTED_LABEL: pa.array(rng.choice(["x", "y"], n))})


def test_select_split_spends_each_rule_its_count_after_the_audit():
    table = candidates()
    sizes = np.full(6, 100)
    audit = table.slice(0, 3)
    rest = table.slice(3)
    out = select_split(rest, sizes, {"cluster_margin": 5, "margin": 4, "coverage": 3}, SelectConfig(), audit=audit)
    assert out.column("rank").to_pylist() == list(range(1, 16))
    assert out.column("rule").to_pylist()[:3] == [AUDIT] * 3
    assert out.column(DOC_ID).to_pylist()[:3] == audit.column(DOC_ID).to_pylist()
    assert rules_picked(out) == {AUDIT: 3, "cluster_margin": 5, "margin": 4, "coverage": 3}
    assert len(set(out.column(DOC_ID).to_pylist())) == 15
    # the margin rule takes the lowest margins left after cluster_margin; coverage keeps the rows' margins
    margin_rows = out.filter(pa.compute.equal(out.column("rule"), "margin"))
    left = set(rest.column(DOC_ID).to_pylist()) - set(out.column(DOC_ID).to_pylist()[:8])
    lowest = sorted((m, d) for d, m in zip(rest.column(DOC_ID).to_pylist(), rest.column(MARGIN).to_pylist())
                    if d in left)[:4]
    assert sorted(margin_rows.column(DOC_ID).to_pylist()) == sorted(d for _, d in lowest)
    coverage = out.filter(pa.compute.equal(out.column("rule"), "coverage"))
    assert coverage.column(MARGIN).null_count == 0 and coverage.column(PREDICTED_LABEL).null_count == 0
    assert len(set(coverage.column(CLUSTER_ID).to_pylist())) == 3  # one per cluster first


def test_a_rule_that_cannot_fill_passes_the_rest_on():
    table = candidates(n=12)
    out = select_split(table, np.full(6, 100), {"cluster_margin": 10, "margin": 5}, SelectConfig())
    assert out.num_rows == 12  # every candidate, none twice
    assert rules_picked(out) == {"cluster_margin": 10, "margin": 2}


def test_the_first_rule_leads_until_another_shows_more_evidence_than_its_head_start():
    from labelnext.ops.select.bandit import RuleEvidence

    def ev(z_a, z_b):
        return {"a": RuleEvidence("a", 10, 10, 50, 0.0, 0.01, z_a), "b": RuleEvidence("b", 10, 10, 50, 0.0, 0.01, z_b)}

    no_evidence = split_shares(["a", "b"], {}, explore=0.05, lead=3.0)
    assert no_evidence["a"] > 0.9 and no_evidence["b"] >= 0.025
    assert split_shares(["a", "b"], ev(0.0, 3.0), explore=0.05, lead=3.0) == pytest.approx({"a": 0.5, "b": 0.5})
    overtaken = split_shares(["a", "b"], ev(-Z_CAP, Z_CAP), explore=0.05, lead=3.0)
    assert overtaken["b"] > 0.9  # evidence beyond the head start moves the budget
