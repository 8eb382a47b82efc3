"""Select stage time at the cluster config's size: budget 20,000 from 100,000 scored candidates, 384-d vectors.

The ``Selector`` (default rule) runs on synthetic candidates twice in the same process: with its near-duplicate
check (``labelnext.ops.select.near_duplicates.NearDuplicates``) and with the former one (the candidates' vectors built
with ``to_pylist()``, then every try compared with a copy of every selected vector in float32). Two vector sets:

- ``random``: unit vectors with no structure; hardly any candidate is a near-duplicate.
- ``near-duplicate-heavy``: one fifth of the candidates are originals around 4,000 topic centres, each with
  four near copies (cosine about 0.97) in its cluster, so many tries are rejected.

Printed: wall seconds (and the process's CPU seconds, which a busy shared machine inflates less) for each, their
ratio, whether both picked the same documents in the same order, and the verdict against the 10 s target
(wall time), computed from the figures.

    python -m bench.select           # budget 20,000 from 100,000 (the baseline takes minutes)
    python -m bench.select --quick   # budget 4,000 from 20,000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import OUT, log, machine_description, markdown_table, setup_env, stopwatch  # noqa: E402

DIM = 384
K = 4000
COPIES = 5
TARGET_S = 10.0


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def vectors(kind: str, n: int, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, cluster ids) for ``n`` candidates."""
    if kind == "random":
        return _unit(rng.standard_normal((n, DIM))), rng.integers(0, k, n)
    centres = _unit(rng.standard_normal((k, DIM)))
    originals = n // COPIES
    topic = rng.integers(0, k, originals)
    base = _unit(centres[topic] + rng.standard_normal((originals, DIM)) * 0.06)  # cosine ~0.5 to the centre
    copies = _unit(np.repeat(base, COPIES, axis=0) + rng.standard_normal((originals * COPIES, DIM)) * 0.01)
    return copies[:n], np.repeat(topic, COPIES)[:n]


def candidates(kind: str, n: int, k: int, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    from labelnext.ops.core.columns import CLUSTER_ID, DISTANCE, RAND_KEY

    rng = np.random.default_rng(seed)
    emb, clusters = vectors(kind, n, k, rng)
    scores = {name: rng.gamma(2.0, scale, n) for name, scale in (("uncertainty", 1.0), ("max_entropy", 2.0),
                                                                  ("nll", 1.5))}
    table = pa.table({
        "doc_id": [f"d{i:07d}" for i in range(n)],
        CLUSTER_ID: clusters.astype(np.int32),
        DISTANCE: rng.random(n).astype(np.float32),
        RAND_KEY: rng.integers(0, 2**53, n),
        **scores,
        "n_tokens": rng.integers(5, 500, n),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), DIM),
    })
    sizes = np.bincount(clusters, minlength=k) * 100  # clusters hold more documents than their candidates
    return table, sizes


def former_selector():
    """The select stage before the near-duplicate check: vectors via ``to_pylist()``, float32 copies per try."""
    from functools import partial

    from labelnext.ops.select.near_duplicates import ExhaustiveNearDuplicates
    from labelnext.ops.select.selector import Selector

    class Former(Selector):
        near_duplicates = partial(ExhaustiveNearDuplicates, dtype=np.float32)

        def select(self, candidates, sizes, budget):
            np.asarray(candidates.column("embedding").to_pylist(), dtype=np.float32)  # the former conversion
            return super().select(candidates, sizes, budget)

    return Former


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="budget 4,000 from 20,000 candidates")
    args = parser.parse_args(argv)
    setup_env()
    from labelnext.ops.select.selector import SelectConfig, Selector

    budget, n = (4000, 20_000) if args.quick else (20_000, 100_000)
    cfg = SelectConfig()
    rows, ok = [], True
    for kind in ("random", "near-duplicate-heavy"):
        table, sizes = candidates(kind, n, K)
        log(f"{kind}: select {budget} from {n} with the near-duplicate check")
        cpu = time.process_time()
        with stopwatch() as new_s:
            new = Selector(cfg).select(table, sizes, budget)
        new_cpu, cpu = time.process_time() - cpu, time.process_time()
        log(f"{kind}: {new_s[0]:.1f}s; now the former check")
        with stopwatch() as old_s:
            old = former_selector()(cfg).select(table, sizes, budget)
        old_cpu = time.process_time() - cpu
        same = new.column("doc_id").equals(old.column("doc_id"))
        fills = sum(r == "fill" for r in new.column("reason").to_pylist())
        ok = ok and new_s[0] < TARGET_S and same
        rows.append([kind, f"{budget:,} / {n:,}", f"{new_s[0]:.2f} ({new_cpu:.2f})", f"{old_s[0]:.1f} ({old_cpu:.1f})",
                     f"{old_s[0] / max(new_s[0], 1e-9):.0f}x", "yes" if same else "NO", fills])
    table_md = markdown_table(
        ["vectors", "budget / candidates", "select s (CPU s)", "former select s (CPU s)", "speed-up",
         "same selection", "fill picks"], rows)
    verdict = (f"select under {TARGET_S:.0f} s with the same selection: "
               + ("yes" if ok else "NO") + f" ({machine_description()})")
    text = f"{table_md}\n\n{verdict}\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / ("select-quick.md" if args.quick else "select.md")).write_text(text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
