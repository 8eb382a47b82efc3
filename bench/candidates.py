"""Candidates stage on local Ray: the per-cluster merge as the pipeline runs it vs Ray Data's hash-shuffle groupby.

``labelnext.pipelines.dataflow.per_cluster_candidates`` keeps each block's possible candidates, merges each
cluster's survivors with a sort-based shuffle over Ray tasks, then fetches the picked rows. The baseline runs
the same block step and merge function through Ray Data's default groupby (a hash shuffle with a pool of
aggregator actors per call, the former pipeline). Both run in the same process on the same blocks, in phases
(the stage, the baseline, the stage again), best of each; the picks must be identical.

    python -m bench.candidates            # 300 documents (a small nightly run) and 250,000 at budget 20,000
    python -m bench.candidates --quick    # 300 and 25,000 at budget 2,000
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import OUT, log, machine_description, markdown_table, publish, setup_env  # noqa: E402

ROWS_PER_BLOCK = 10_000
# (documents, clusters, budget): a small run as the tests and demo have it, and the scale runs' shape.
FULL = ((300, 12, 12), (250_000, 4_000, 20_000))
QUICK = ((300, 12, 12), (25_000, 400, 2_000))


def assigned_blocks(ray, n: int, k: int, seed: int = 0):
    """A materialised dataset of the candidate keys: doc_id, cluster_id, distance, rand_key."""
    from labelnext.ops.cluster.kmeans import rand_keys
    from labelnext.ops.core.columns import CLUSTER_ID, DISTANCE, DOC_ID, RAND_KEY

    rng = np.random.default_rng(seed)
    ids = [f"d{i:08d}" for i in range(n)]
    table = pa.table({
        DOC_ID: ids,
        CLUSTER_ID: rng.zipf(1.5, n).clip(1, k).astype(np.int32) - 1,
        DISTANCE: rng.random(n).astype(np.float32),
        RAND_KEY: rand_keys(ids, seed),
    })
    rows = min(ROWS_PER_BLOCK, max(1, math.ceil(n / 4)))
    return ray.data.from_arrow([table.slice(i, rows) for i in range(0, n, rows)]).materialize(), table


def hash_groupby_picks(assigned, plan) -> pa.Table:
    """The former merge: Ray Data's default groupby (hash shuffle) over the same survivors."""
    from labelnext.ops.cluster.candidates import block_candidates, merge_candidates
    from labelnext.ops.core.columns import CANDIDATE_REASON, CLUSTER_ID, DOC_ID
    from labelnext.pipelines.dataflow import CANDIDATE_KEYS, CANDIDATES_PER_PARTITION, collect

    partial = assigned.select_columns(list(dict.fromkeys((*CANDIDATE_KEYS, plan.near_key)))).map_batches(
        block_candidates, fn_kwargs={"plan": plan}, batch_format="pyarrow")
    partitions = max(1, min(200, math.ceil(plan.total / CANDIDATES_PER_PARTITION)))
    merged = partial.groupby(CLUSTER_ID, num_partitions=partitions).map_groups(
        merge_candidates, fn_kwargs={"plan": plan}, batch_format="pyarrow")
    return collect(merged.select_columns([DOC_ID, CANDIDATE_REASON]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 and 25,000 documents")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    setup_env()
    import ray

    from labelnext.ops.cluster.candidates import CandidatesConfig, cluster_sizes, plan_candidates
    from labelnext.ops.core.columns import CANDIDATE_REASON, CLUSTER_ID, DOC_ID
    from labelnext.pipelines.config import RunConfig
    from labelnext.pipelines.dataflow import CANDIDATE_KEYS, init_ray, per_cluster_candidates

    init_ray(RunConfig.model_validate({"ray": {"num_cpus": 2, "include_dashboard": False}}))
    rows, ok = [], True
    for n, k, budget in (QUICK if args.quick else FULL):
        assigned, table = assigned_blocks(ray, n, k)
        plan = plan_candidates(cluster_sizes(table.column(CLUSTER_ID).to_numpy(), k), budget, CandidatesConfig())
        ours, former = [], []
        # Phases, not alternation: the hash groupby's actors are torn down after each call and the next call
        # would pay for it. Ours before and after the baseline's phase, so warm-up cannot favour either.
        for phase in ("stage", "former", "stage"):
            for r in range(args.repeats):
                start = time.perf_counter()
                if phase == "stage":
                    got = per_cluster_candidates(assigned, plan, list(CANDIDATE_KEYS))
                else:
                    base = hash_groupby_picks(assigned, plan)
                (ours if phase == "stage" else former).append(time.perf_counter() - start)
                log(f"N={n:,} {phase} round {r + 1}: {(ours if phase == 'stage' else former)[-1]:.2f}s")
        key = [(DOC_ID, "ascending")]
        same = (got.select([DOC_ID, CANDIDATE_REASON]).sort_by(key).equals(base.sort_by(key))
                and got.num_rows == plan.total)
        ok = ok and same
        rows.append([f"{n:,}", f"{k:,}", f"{budget:,}", f"{plan.total:,}", f"{min(ours):.2f}", f"{min(former):.2f}",
                     f"{min(former) / min(ours):.1f}x", "yes" if same else "NO"])
    ray.shutdown()
    table_md = markdown_table(
        ["documents", "clusters", "budget", "candidates", "stage s (sort merge + row fetch)",
         "hash-shuffle groupby s (merge only)", "former / stage", "same picks"], rows)
    text = f"{table_md}\n\nbest of {args.repeats} (baseline) and {2 * args.repeats} (stage, before and after it), same process ({machine_description()})\n"
    publish(OUT / ("candidates-quick.md" if args.quick else "candidates.md"), text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
