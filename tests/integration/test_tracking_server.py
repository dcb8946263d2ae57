"""ift.tracking against a real `mlflow server` process on loopback."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

from conftest_mlflow import mlflow_server  # noqa: F401 - the fixture

from ift import tracking
from ift.config import build_config


def rest(url: str, endpoint: str, **query) -> dict:
    q = urllib.parse.urlencode(query)
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{endpoint}?{q}", timeout=30) as r:
        return json.loads(r.read())


def test_run_logged_through_the_server(mlflow_server, tmp_path, monkeypatch):  # noqa: F811
    url = mlflow_server
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = build_config({"storage": {"root": str(tmp_path / "work")},
                        "tracking": {"uri": url, "experiment": "server-it"}})
    assert tracking.resolve_uri(cfg.tracking, cfg.storage.root) == url

    parent = tracking.start_run(cfg.tracking, cfg.storage.root, "sweep")
    run_id = tracking.start_run(cfg.tracking, cfg.storage.root, "trial-0", parent_run_id=parent,
                                tags={"seed": 42})
    tracking.log_params(run_id, {"train": {"lr": 2e-4, "micro_batch_size": 4},
                                 "peft": {"target_modules": ["q_proj", "v_proj"]}})
    for step in range(1, 6):
        tracking.log_metrics(run_id, {"loss": 2.0 / step, "tokens_per_s": 100.0 * step}, step)
    report = tmp_path / "report.json"
    report.write_text('{"eval_loss": 0.5}')
    adapter = tmp_path / "final_adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    tracking.log_artifact(run_id, str(report))
    tracking.log_artifact(run_id, str(adapter))
    tracking.end_run(run_id)
    tracking.end_run(parent)

    # Nothing was written locally: the store is the server's.
    assert not (tmp_path / "work" / "mlflow.db").exists()

    # Read back over plain REST, independent of ift and of MlflowClient.
    run = rest(url, "runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    assert run["info"]["run_name"] == "trial-0"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params == {"train.lr": "0.0002", "train.micro_batch_size": "4",
                      "peft.target_modules": '["q_proj", "v_proj"]'}
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["mlflow.parentRunId"] == parent
    assert tags["seed"] == "42"
    hist = rest(url, "metrics/get-history", run_id=run_id, metric_key="loss")["metrics"]
    assert sorted((m["step"], m["value"]) for m in hist) == [
        (1, 2.0), (2, 1.0), (3, 2.0 / 3), (4, 0.5), (5, 0.4)]

    # And through MlflowClient over HTTP: children of the parent, artifacts.
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=url)
    exp = c.get_experiment_by_name("server-it")
    kids = c.search_runs([exp.experiment_id],
                         filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert [r.info.run_id for r in kids] == [run_id]
    assert {a.path for a in c.list_artifacts(run_id)} == {"report.json", "final_adapter"}
    got = c.download_artifacts(run_id, "final_adapter", str(tmp_path / "dl"))
    assert json.loads(open(f"{got}/adapter_config.json").read()) == {"r": 8}
    # Artifacts went through the server's proxy, not to a path this process wrote to.
    assert c.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:")


def test_resume_through_the_server(mlflow_server, tmp_path, monkeypatch):  # noqa: F811
    url = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # the environment is the second choice
    cfg = build_config({"storage": {"root": str(tmp_path / "work")},
                        "tracking": {"experiment": "server-resume"}})
    run_id = tracking.start_run(cfg.tracking, cfg.storage.root, "resumable")
    tracking.log_params(run_id, {"a": 1})
    tracking.log_metrics(run_id, {"loss": 1.0}, step=1)
    tracking.end_run(run_id, status="FAILED")

    assert tracking.start_run(cfg.tracking, cfg.storage.root, "resumable", run_id=run_id) == run_id
    tracking.log_params(run_id, {"a": 1, "b": 2})
    tracking.log_metrics(run_id, {"loss": 0.5}, step=2)
    tracking.end_run(run_id)
    run = rest(url, "runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    assert {p["key"]: p["value"] for p in run["data"]["params"]} == {"a": "1", "b": "2"}


def test_s3_storage_root_keeps_db_local_and_artifacts_in_s3(s3_bucket, tmp_path, monkeypatch):
    from ift import storage

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    root = f"{s3_bucket}/work"
    cfg = build_config({"storage": {"root": root}, "tracking": {"experiment": "s3-root"}})
    run_id = tracking.start_run(cfg.tracking, cfg.storage.root, "on-s3")
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    tracking.log_artifact(run_id, str(f))
    # A run directory on S3 is logged by copying it down first.
    storage.write_text(f"{root}/runs/r1/final_adapter/adapter_config.json", '{"r": 4}')
    tracking.log_artifact(run_id, f"{root}/runs/r1/final_adapter")
    tracking.end_run(run_id)

    assert (tmp_path / "ift-work" / "mlflow.db").is_file()
    keys = [k for k in storage.walk_files(f"{root}/mlartifacts")]
    assert any(k.endswith(f"{run_id}/artifacts/notes.txt") for k in keys), keys
    assert any(k.endswith(f"{run_id}/artifacts/final_adapter/adapter_config.json")
               for k in keys), keys


def _log_many(root: str, run_id: str, key: str, n: int) -> None:
    from ift import tracking as t
    from ift.config import build_config as bc

    cfg = bc({"storage": {"root": root}, "tracking": {"experiment": "unit"}})
    # a process that did not create the run
    t.start_run(cfg.tracking, cfg.storage.root, "shared", run_id=run_id)
    for step in range(n):
        t.log_metrics(run_id, {key: float(step)}, step)


def test_concurrent_processes_share_the_sqlite_store(tmp_path, monkeypatch):
    # Tune trials log from separate processes into one mlflow.db at the same time.
    import multiprocessing as mp

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = build_config({"storage": {"root": str(tmp_path / "work")},
                        "tracking": {"experiment": "unit"}})
    run_id = tracking.start_run(cfg.tracking, cfg.storage.root, "shared")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_log_many, args=(cfg.storage.root, run_id, f"m{i}", 40))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=tracking.resolve_uri(cfg.tracking, cfg.storage.root))
    for i in range(2):
        assert sorted(m.step for m in c.get_metric_history(run_id, f"m{i}")) == list(range(40))
