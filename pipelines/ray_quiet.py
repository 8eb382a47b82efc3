"""Ray's driver-side warnings that a run cannot act on, each dropped only where it is provably harmless.

* Ray Data's "the Ray cluster currently does not have any available CPUs ... will hang" is checked on every
  execution, including the one ``materialize()`` runs on its own finished output to fill a cache: that
  dataset is already computed, so nothing is scheduled and nothing can hang, but the actor pool that just
  produced it is still handing its CPUs back, so the check sees none free. The warning is dropped only then;
  before real work it still shows.
* "Progress bars disabled": a run turns them off itself when stderr is not a terminal (the per-stage log lines
  carry progress).
* "Token authentication is enabled for this Ray cluster": the local cluster a run starts takes Ray's secure
  default, nothing to act on. (Naming the mode in ``RAY_AUTH_MODE`` instead would also silence it, but only
  when set before ``ray`` is imported.) The warning that authentication is *disabled* still shows.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

NO_CPUS = "The Ray cluster currently does not have any available CPUs"
PROGRESS_LOGGER = "ray.data._internal.progress"
AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
AUTH_ENABLED = "Token authentication is enabled for this Ray cluster"


def _computed(dataset: Any) -> bool:
    """Whether executing ``dataset`` schedules nothing: its plan is a source that already holds its blocks (the
    test ``Dataset._execute`` itself uses to skip execution)."""
    try:
        from ray.data._internal.logical.interfaces import SourceOperator

        dag = dataset._logical_plan.dag
        return isinstance(dag, SourceOperator) and dag.output_data() is not None
    except Exception:  # another Ray version's internals: keep the warning
        return False


class NothingToSchedule(logging.Filter):
    """Drops the "no available CPUs ... will hang" warning when the dataset being executed is already computed."""

    def filter(self, record: logging.LogRecord) -> bool:
        if NO_CPUS not in record.getMessage():
            return True
        frame = sys._getframe()
        while frame is not None:
            if frame.f_code.co_name == "_execute" and "self" in frame.f_locals:
                return not _computed(frame.f_locals["self"])
            frame = frame.f_back
        return True


class AuthEnabled(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(AUTH_ENABLED)


def quiet_ray_driver(progress_bars: bool) -> None:
    """Install the filters (once each; before ``ray.init``); silence the progress-bar notice when they are off."""
    for name, kind in (("ray.data.dataset", NothingToSchedule), (AUTH_LOGGER, AuthEnabled)):
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())
    if not progress_bars:
        logging.getLogger(PROGRESS_LOGGER).setLevel(logging.ERROR)
