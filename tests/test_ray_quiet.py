"""The driver-side Ray warnings a run drops, and only where they are harmless (no Ray cluster needed)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from labelnext.pipelines.label_loop import no_accuracy_reason, selection_rule
from labelnext.pipelines.ray_quiet import AUTH_LOGGER, AuthEnabled, NothingToSchedule, quiet_ray_driver

NO_CPUS = ("Warning: The Ray cluster currently does not have any available CPUs. The Dataset job will hang unless "
           "more CPUs are freed up.")


class _Plan:
    def __init__(self, dag):
        self.dag = dag


class _Dataset:
    def __init__(self, dag):
        self._logical_plan = _Plan(dag)

    def _execute(self, record: logging.LogRecord) -> bool:
        """Where Ray Data logs the warning: the filter looks for this frame and its ``self``."""
        return NothingToSchedule().filter(record)


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("ray.data.dataset", logging.WARNING, "dataset.py", 1, message, None, None)


def test_no_cpus_warning_dropped_only_when_the_dataset_is_already_computed():
    from ray.data._internal.logical.operators import InputData, Limit

    computed = _Dataset(InputData(input_data=[]))  # what materialize() executes once its work is done
    pending = _Dataset(Limit(1, input_dependencies=[InputData(input_data=[])]))  # work still to schedule
    assert computed._execute(_record(NO_CPUS)) is False
    assert pending._execute(_record(NO_CPUS)) is True
    assert computed._execute(_record("some other warning")) is True
    assert NothingToSchedule().filter(_record(NO_CPUS)) is True  # not inside an execution: kept


def test_only_the_auth_enabled_notice_is_dropped():
    enabled = "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."
    disabled = "Token authentication is disabled for this Ray cluster. Anyone with network access ..."
    assert AuthEnabled().filter(_record(enabled)) is False
    assert AuthEnabled().filter(_record(disabled)) is True


def test_filters_install_once():
    quiet_ray_driver(progress_bars=True)
    quiet_ray_driver(progress_bars=True)
    assert sum(isinstance(f, AuthEnabled) for f in logging.getLogger(AUTH_LOGGER).filters) == 1
    assert sum(isinstance(f, NothingToSchedule) for f in logging.getLogger("ray.data.dataset").filters) == 1


def test_no_accuracy_names_the_classes_with_a_single_label():
    reason = no_accuracy_reason(np.array(["a", "a", "b", "c", "c"]))
    assert reason == "n/a: class 'b' has a single label, and each fold needs two of every class"
    assert "classes 'b', 'd' have" in no_accuracy_reason(np.array(["a", "a", "b", "d"]))


@pytest.mark.parametrize("columns, rule, expected", [
    (["doc_id", "distance"], "cluster_only", "rule cluster_only"),
    (["doc_id", "distance", "margin"], "cluster_only", "Cluster-Margin: the task model's margin within cluster"),
    (["doc_id", "margin"], "round_robin", "rule round_robin over the task model's margin"),
])
def test_the_log_names_the_rule_that_chose(columns, rule, expected):
    from labelnext.ops.select.selector import SelectConfig

    assert selection_rule(SelectConfig(rule=rule), columns).startswith(expected)
