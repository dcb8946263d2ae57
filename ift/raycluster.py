"""Joining or starting Ray: one function every command calls before it touches Ray."""

from __future__ import annotations

import logging
import os
import warnings

import ray

# Variables the driver's environment passes on to every Ray worker (S3 endpoint and
# credentials, MLflow, offline switches), so a job behaves the same on one laptop and on
# a cluster whose nodes were started elsewhere.
FORWARDED_PREFIXES = ("AWS_", "MLFLOW_", "HF_", "TRANSFORMERS_", "IFT_")


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES)}


# Loggers whose warnings say nothing a user can act on. Ray Train's placement-group
# cleaner asks the state API (served by the dashboard, which a local cluster here does not
# start) every few seconds whether the controller lives, and warns each time it cannot;
# bitsandbytes warns on import, on CPUs with bf16 support, that an optional kernel package
# is missing.
QUIET_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
                 "bitsandbytes.backends.cpu.ops")
# Loggers whose INFO lines repeat what ift's own progress lines say: Ray Data announces
# every dataset it starts and finishes reading, in every worker, once per epoch. Ray Data
# sets its logger's level when it is imported, from RAY_DATA_LOG_LEVEL if that is set.
QUIET_INFO = ("ray.data",)
# Deprecation notices raised inside transformers and peft themselves.
QUIET_WARNINGS = (r".*is_gradient_checkpointing.*",)


def quiet_logs() -> None:
    """Raise QUIET_LOGGERS to ERROR and QUIET_INFO to WARNING, and ignore QUIET_WARNINGS
    (also the worker process setup hook of every Ray worker ift starts)."""
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")  # a user's own level wins
    for name in QUIET_INFO:
        logging.getLogger(name).setLevel(os.environ["RAY_DATA_LOG_LEVEL"])
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)


def runtime_env() -> dict:
    """The job-level runtime env of every ift driver: forwarded variables, quiet logs."""
    return {"env_vars": forwarded_env(), "worker_process_setup_hook": "ift.raycluster.quiet_logs"}


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Join `address` (or RAY_ADDRESS) when given, else start a local cluster."""
    if ray.is_initialized():
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict = {
        "address": address,
        "logging_level": logging.WARNING,
        "runtime_env": runtime_env(),
    }
    if address is None:
        # A local cluster: no dashboard (it costs a CPU's worth of memory and time on a laptop).
        kwargs["include_dashboard"] = False
        if num_cpus:
            kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)
