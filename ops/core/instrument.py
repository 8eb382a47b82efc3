"""Instrument a Ray Data actor class: which node and actor ran each batch, and how long the work took."""

from __future__ import annotations

import time

import numpy as np

NODE_ID = "_node_id"
BUSY_S = "_busy_s"
ACTOR_ID = "_actor_id"


def instrumented(cls: type) -> type:
    """Subclass ``cls`` so every output batch carries ``_node_id``, ``_actor_id`` and ``_busy_s`` columns.

    ``_busy_s`` spreads the batch's compute seconds over its rows, so summing the column gives the actor
    pool's busy time (the throughput behind the cost report's full-pass counterfactual).
    """

    class Instrumented(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            from labelnext.ops.core.quiet import quiet_third_party

            quiet_third_party()
            super().__init__(*args, **kwargs)
            import ray

            context = ray.get_runtime_context()
            self._node = context.get_node_id()
            self._actor = context.get_actor_id() or ""

        def __call__(self, batch):
            start = time.perf_counter()
            out = super().__call__(batch)
            n = len(out["doc_id"])
            out[NODE_ID] = np.full(n, self._node, dtype=object)
            out[ACTOR_ID] = np.full(n, self._actor, dtype=object)
            out[BUSY_S] = np.full(n, (time.perf_counter() - start) / max(n, 1), dtype=np.float64)
            return out

    Instrumented.__name__ = cls.__name__
    Instrumented.__qualname__ = cls.__qualname__
    return Instrumented
