"""What the driver held during a run: rows pulled to the driver, its peak RSS, and the object store's peak.

The cost report records them at its top level (``driver.rows_collected``, ``driver.peak_rss_bytes``,
``object_store.peak_bytes``) so a real run shows whether the driver stayed bounded by the budget.
Rows are counted in one place, :func:`count_driver_rows`, which ``labelnext.pipelines.dataflow`` calls for
everything it brings to the driver; the run's :class:`DriverTelemetry` is found through a context variable,
so nothing is counted outside a run.
"""

from __future__ import annotations

import logging
import resource
import sys
import threading
from contextvars import ContextVar
from typing import Any, Optional

log = logging.getLogger("labelnext")

_CURRENT: ContextVar[Optional["DriverTelemetry"]] = ContextVar("labelnext_driver_telemetry", default=None)


def count_driver_rows(n: int) -> None:
    """Record ``n`` rows that reached the driver (a no-op outside a run)."""
    telemetry = _CURRENT.get()
    if telemetry is not None:
        telemetry.rows_collected += int(n)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # Linux reports KiB, macOS bytes


class ObjectStoreProbe:
    """Bytes in use in Ray's object store, summed over the cluster's nodes (one raylet RPC per call).

    Ray has no public API for it; this is what ``ray memory --stats-only`` and Ray Data's spill statistics use.
    """

    def __init__(self):
        import ray
        from ray._private.internal_api import get_state_from_address

        self._state = get_state_from_address(ray.get_runtime_context().gcs_address)

    def used_bytes(self) -> int:
        from ray._private.internal_api import get_memory_info_reply

        return int(get_memory_info_reply(self._state, timeout_seconds=10).store_stats.object_store_bytes_used)


class DriverTelemetry:
    """Context manager around a run: counts driver rows and samples the object store on a daemon thread."""

    def __init__(self, interval_s: float = 1.0):
        self.interval_s = interval_s
        self.rows_collected = 0
        self.object_store_peak: Optional[int] = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._token = None

    def __enter__(self) -> "DriverTelemetry":
        self._token = _CURRENT.set(self)
        try:
            probe = ObjectStoreProbe()
        except Exception as exc:  # telemetry must never fail a run
            log.warning("object store usage will not be sampled: %s", exc)
        else:
            self._thread = threading.Thread(target=self._sample, args=(probe,), name="object-store-sampler",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        _CURRENT.reset(self._token)

    def _sample(self, probe: ObjectStoreProbe) -> None:
        while True:
            try:
                used = probe.used_bytes()
            except Exception as exc:
                log.debug("object store sample failed: %s", exc)
            else:
                self.samples += 1
                self.object_store_peak = max(self.object_store_peak or 0, used)
            if self._stop.wait(self.interval_s):
                return

    def report(self) -> dict[str, Any]:
        """The cost report's top-level ``driver`` and ``object_store`` sections."""
        return {
            "driver": {"rows_collected": self.rows_collected, "peak_rss_bytes": peak_rss_bytes()},
            "object_store": {"peak_bytes": self.object_store_peak, "samples": self.samples,
                             "interval_s": self.interval_s},
        }
