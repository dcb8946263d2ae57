"""ift.raycluster: what every Ray worker ift starts is set up with."""

from __future__ import annotations

import logging
import os
import warnings

from ift import raycluster


def test_quiet_logs_silences_only_the_listed_loggers_and_warnings(monkeypatch):
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    monkeypatch.setenv("RAY_DATA_LOG_LEVEL", "unset")  # restored after the test
    monkeypatch.delenv("RAY_DATA_LOG_LEVEL")
    for name in (*raycluster.QUIET_LOGGERS, *raycluster.QUIET_INFO):
        logging.getLogger(name).setLevel(logging.NOTSET)
    raycluster.quiet_logs()
    for name in raycluster.QUIET_LOGGERS:
        assert logging.getLogger(name).getEffectiveLevel() == logging.ERROR
    # Ray Data keeps its warnings, loses its per-dataset INFO lines
    data = logging.getLogger("ray.data._internal.execution.streaming_executor")
    assert data.getEffectiveLevel() == logging.WARNING
    assert os.environ["RAY_DATA_LOG_LEVEL"] == "WARNING"  # kept when Ray Data configures it
    assert logging.getLogger("ray.train").getEffectiveLevel() < logging.ERROR
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        raycluster.quiet_logs()
        warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning, stacklevel=1)
        warnings.warn("something else", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["something else"]


def test_every_worker_runs_the_hook(monkeypatch):
    import importlib

    monkeypatch.setenv("IFT_EXAMPLE", "1")
    env = raycluster.runtime_env()
    assert env["env_vars"]["IFT_EXAMPLE"] == "1"
    module, _, func = env["worker_process_setup_hook"].rpartition(".")
    assert getattr(importlib.import_module(module), func) is raycluster.quiet_logs
