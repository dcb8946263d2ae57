"""The sweep's scheduler and its fit check, from the sections they are given."""

from __future__ import annotations

import pytest
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from ift.config import ConfigError, DuringTrainingConfig, TrainConfig, TuneConfig
from ift.tune import driver


def test_scheduler_from_the_tune_train_and_during_training_sections():
    assert isinstance(driver._scheduler(TuneConfig(scheduler="none"), TrainConfig(eval_every=0),
                                        DuringTrainingConfig()), FIFOScheduler)
    asha = driver._scheduler(TuneConfig(grace_period=2), TrainConfig(eval_every=5),
                             DuringTrainingConfig())
    assert isinstance(asha, ASHAScheduler)
    assert (asha._metric, asha._mode, asha._time_attr) == ("eval_loss", "min", "step")
    # the first rung: two evaluations of five steps
    assert asha._brackets[0]._rungs[-1][0] == 10 and asha._reduction_factor == 2
    with pytest.raises(ConfigError, match="train.eval_every >= 1"):
        driver._scheduler(TuneConfig(), TrainConfig(eval_every=0), DuringTrainingConfig())
    with pytest.raises(ConfigError, match="tune.reduction_factor=1"):
        driver._scheduler(TuneConfig(reduction_factor=1), TrainConfig(), DuringTrainingConfig())


def test_check_fits_compares_a_trials_workers_with_the_cluster(monkeypatch, capsys):
    monkeypatch.setattr(driver.ray, "cluster_resources", lambda: {"CPU": 4.0})
    driver._check_fits(TrainConfig(num_workers=2, cpus_per_worker=2), TuneConfig())
    assert capsys.readouterr().out == ""
    driver._check_fits(TrainConfig(num_workers=2, cpus_per_worker=1),
                       TuneConfig(max_concurrent_trials=3))
    assert "3 concurrent trials × 2 CPUs exceed the cluster's 4.0" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="num_workers × train.cpus_per_worker = 6"):
        driver._check_fits(TrainConfig(num_workers=3, cpus_per_worker=2), TuneConfig())
