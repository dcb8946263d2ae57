"""ift.tracking against the embedded sqlite store (the default), read back with MlflowClient."""

from __future__ import annotations

import os
import re

import pytest

from ift import tracking
from ift.config import TrackingConfig, build_config


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return build_config({"storage": {"root": str(tmp_path / "work")},
                         "tracking": {"experiment": "unit"}})


def client(cfg):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking.resolve_uri(cfg.tracking, cfg.storage.root))


def test_resolve_uri_order(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "root"
    cfg = build_config({"storage": {"root": str(root)}})
    assert tracking.resolve_uri(cfg.tracking, cfg.storage.root) == f"sqlite:///{root}/mlflow.db"
    assert root.is_dir()  # created so that sqlite can open the file

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert tracking.resolve_uri(cfg.tracking, cfg.storage.root) == "http://127.0.0.1:1"

    cfg = build_config({"storage": {"root": str(root)}, "tracking": {"uri": "http://h:5000"}})
    assert tracking.resolve_uri(cfg.tracking, cfg.storage.root) == "http://h:5000"


def test_resolve_uri_s3_root_keeps_db_local(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = build_config({"storage": {"root": "s3://bucket/prefix"}})
    uri = tracking.resolve_uri(cfg.tracking, cfg.storage.root)
    assert uri == f"sqlite:///{tmp_path}/ift-work/mlflow.db"
    assert tracking._artifact_location(cfg.tracking, cfg.storage.root, uri) == \
        "s3://bucket/prefix/mlartifacts"


def test_local_root_is_the_storage_root_or_a_local_folder_for_s3(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking._local_root("work") == str(tmp_path / "work")
    assert tracking._local_root(str(tmp_path / "abs")) == str(tmp_path / "abs")
    assert tracking._local_root("s3://bucket/prefix") == str(tmp_path / "ift-work")


def test_artifact_location_from_the_tracking_section_and_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = str(tmp_path / "work")
    sqlite = f"sqlite:///{root}/mlflow.db"
    assert tracking._artifact_location(TrackingConfig(), root, sqlite) == \
        (tmp_path / "work" / "mlartifacts").as_uri()
    assert tracking._artifact_location(TrackingConfig(), root, "http://h:5000") is None
    given = TrackingConfig(artifact_location="s3://bucket/mlflow")
    assert tracking._artifact_location(given, root, "http://h:5000") == "s3://bucket/mlflow"
    local = TrackingConfig(artifact_location="arts")
    assert tracking._artifact_location(local, root, sqlite) == (tmp_path / "arts").as_uri()


def test_flatten_nested_dicts_and_lists():
    flat = tracking.flatten({
        "train": {"lr": 1e-4, "use_gpu": False, "data": ""},
        "peft": {"target_modules": ["q_proj", "v_proj"], "prompt_init_text": None},
        "data": {"sources": [{"path": "a.json", "tags": ["cot"]}, {"path": "b.json"}],
                 "placeholders": {}},
    })
    assert flat == {
        "train.lr": "0.0001",
        "train.use_gpu": "false",
        "train.data": "",
        "peft.target_modules": '["q_proj", "v_proj"]',
        "peft.prompt_init_text": "null",
        "data.sources.0.path": "a.json",
        "data.sources.0.tags": '["cot"]',
        "data.sources.1.path": "b.json",
        "data.placeholders": "{}",
    }
    assert tracking.flatten({"a": 1}, prefix="cfg") == {"cfg.a": "1"}


def test_params_metrics_artifacts_roundtrip(cfg, tmp_path):
    run_id = tracking.start_run(cfg.tracking, cfg.storage.root, "roundtrip", tags={"kind": "train"})
    assert re.fullmatch(r"[0-9a-f]{32}", run_id)

    long_value = "x" * 7000
    tracking.log_params(run_id, {**cfg.to_dict(), "note": long_value})
    for step in range(1, 4):
        tracking.log_metrics(run_id, {"loss": 3.0 / step, "lr": 1e-4, "skipped": None}, step)

    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1}\n')
    adapter = tmp_path / "final_adapter"
    (adapter / "sub").mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "sub" / "w.bin").write_bytes(b"\0" * 16)
    tracking.log_artifact(run_id, str(f))
    tracking.log_artifact(run_id, str(adapter))
    tracking.log_artifact(run_id, str(f), artifact_path="logs")
    tracking.end_run(run_id)

    c = client(cfg)
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "roundtrip"
    assert run.data.tags["kind"] == "train"
    assert run.data.tags[tracking.CODE_TAG] == tracking.code_version()
    p = run.data.params
    assert p["train.lr"] == "0.0002"
    assert p["peft.method"] == "lora"
    assert p["tracking.experiment"] == "unit"
    assert len(p["note"]) == tracking.MAX_PARAM_VALUE and p["note"].endswith("...")
    assert "skipped" not in run.data.metrics

    hist = c.get_metric_history(run_id, "loss")
    assert [(m.step, round(m.value, 4)) for m in sorted(hist, key=lambda m: m.step)] == [
        (1, 3.0), (2, 1.5), (3, 1.0)]

    top = {a.path for a in c.list_artifacts(run_id)}
    assert top == {"metrics.jsonl", "final_adapter", "logs"}
    assert {a.path for a in c.list_artifacts(run_id, "final_adapter")} == {
        "final_adapter/adapter_config.json", "final_adapter/sub"}
    assert [a.path for a in c.list_artifacts(run_id, "logs")] == ["logs/metrics.jsonl"]
    # Artifacts of the sqlite default live under the storage root.
    exp = c.get_experiment(run.info.experiment_id)
    assert exp.name == "unit"
    assert exp.artifact_location == (tmp_path / "work" / "mlartifacts").as_uri()
    assert (tmp_path / "work" / "mlartifacts").is_dir()


def test_metric_that_is_not_a_number_names_its_key(cfg):
    run_id = tracking.start_run(cfg.tracking, cfg.storage.root, "bad-metric")
    with pytest.raises(ValueError, match="'acc'"):
        tracking.log_metrics(run_id, {"acc": "high"}, step=0)


def test_missing_artifact_is_a_clear_error(cfg, tmp_path):
    run_id = tracking.start_run(cfg.tracking, cfg.storage.root, "missing")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        tracking.log_artifact(run_id, str(tmp_path / "nope.txt"))


def test_parent_and_children(cfg):
    parent = tracking.start_run(cfg.tracking, cfg.storage.root, "sweep")
    kids = [tracking.start_run(cfg.tracking, cfg.storage.root, f"trial-{i}", parent_run_id=parent)
            for i in range(2)]
    other = tracking.start_run(cfg.tracking, cfg.storage.root, "unrelated")
    c = client(cfg)
    exp = c.get_experiment_by_name("unit")
    found = c.search_runs([exp.experiment_id],
                          filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_id for r in found) == sorted(kids)
    assert other not in {r.info.run_id for r in found}
    assert {r.info.run_name for r in found} == {"trial-0", "trial-1"}


def test_resume_keeps_run_id_and_relogs_params(cfg, caplog):
    run_id = tracking.start_run(cfg.tracking, cfg.storage.root, "resumable")
    tracking.log_params(run_id, {"train": {"lr": 1e-4, "max_steps": 10}})
    tracking.log_metrics(run_id, {"loss": 2.0}, step=5)
    tracking.end_run(run_id, status="KILLED")

    again = tracking.start_run(cfg.tracking, cfg.storage.root, "resumable", run_id=run_id)
    assert again == run_id
    c = client(cfg)
    assert c.get_run(run_id).info.status == "RUNNING"
    # Same values: skipped silently. A changed value cannot overwrite an MLflow param; it is
    # kept as a tag instead of failing the resumed job.
    tracking.log_params(run_id, {"train": {"lr": 1e-4, "max_steps": 20, "seed": 1}})
    tracking.log_metrics(run_id, {"loss": 1.0}, step=6)
    tracking.end_run(run_id)

    run = c.get_run(run_id)
    assert run.data.params == {"train.lr": "0.0001", "train.max_steps": "10", "train.seed": "1"}
    assert run.data.tags["param_changed.train.max_steps"] == "20"
    assert sorted(m.step for m in c.get_metric_history(run_id, "loss")) == [5, 6]
    assert run.info.status == "FINISHED"
    assert len(c.search_runs([run.info.experiment_id])) == 1


def test_resume_of_unknown_run_starts_a_new_one(cfg):
    new = tracking.start_run(cfg.tracking, cfg.storage.root, "lost", run_id="0" * 32)
    assert new and new != "0" * 32
    assert client(cfg).get_run(new).info.run_name == "lost"


def test_disabled_tracking_is_a_noop(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = build_config({"storage": {"root": str(tmp_path / "off")},
                        "tracking": {"enabled": False}})
    run_id = tracking.start_run(cfg.tracking, cfg.storage.root, "off")
    assert run_id == ""
    tracking.log_params(run_id, {"a": 1})
    tracking.log_metrics(run_id, {"loss": 1.0}, step=1)
    tracking.set_tags(run_id, {"t": 1})
    tracking.log_artifact(run_id, str(tmp_path / "does-not-matter"))
    tracking.end_run(run_id)
    assert not (tmp_path / "off").exists()


def test_set_tags(cfg):
    run_id = tracking.start_run(cfg.tracking, cfg.storage.root, "tags")
    tracking.set_tags(run_id, {"dataset_hash": "abc", "packed": True, "n": 3})
    tags = client(cfg).get_run(run_id).data.tags
    assert (tags["dataset_hash"], tags["packed"], tags["n"]) == ("abc", "true", "3")


def test_loss_curve_png(tmp_path):
    history = [{"step": s, "loss": 3.0 / s} for s in range(1, 21)]
    history[9]["eval_loss"] = 0.5
    history[19]["eval_loss"] = 0.4
    out = tracking.loss_curve_png(history, str(tmp_path / "plots" / "loss.png"))
    assert out == str(tmp_path / "plots" / "loss.png")
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000

    # An empty history still gives a valid (placeholder) image rather than an exception.
    empty = tracking.loss_curve_png([], str(tmp_path / "empty.png"))
    assert os.path.getsize(empty) > 0


def test_code_version_names_the_checkout():
    import subprocess
    from pathlib import Path

    repo = Path(tracking.__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    v = tracking.code_version()
    if head.returncode != 0:
        from ift import __version__

        assert v == __version__
    else:
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", v)
        assert v.split("-")[0] == head.stdout.strip()



def test_run_from_another_process_is_found_through_the_environment(cfg, monkeypatch):
    # A Ray worker gets the run id and MLFLOW_TRACKING_URI from the driver, not the run.
    run_id = tracking.start_run(cfg.tracking, cfg.storage.root, "driver-made")
    monkeypatch.setattr(tracking, "_RUN_URIS", {})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.resolve_uri(cfg.tracking, cfg.storage.root))
    tracking.log_metrics(run_id, {"loss": 0.25}, step=7)
    hist = client(cfg).get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in hist] == [(7, 0.25)]


def test_artifact_location_is_the_experiments(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    where = tmp_path / "elsewhere"
    cfg = build_config({"storage": {"root": str(tmp_path / "work")},
                        "tracking": {"experiment": "placed", "artifact_location": str(where)}})
    run_id = tracking.start_run(cfg.tracking, cfg.storage.root, "placed")
    note = tmp_path / "note.txt"
    note.write_text("x")
    tracking.log_artifact(run_id, str(note))
    tracking.end_run(run_id)
    run = client(cfg).get_run(run_id)
    assert run.info.artifact_uri == f"{where.as_uri()}/{run_id}/artifacts"
    assert (where / run_id / "artifacts" / "note.txt").read_text() == "x"
    assert not (tmp_path / "work" / "mlartifacts").exists()

    # MLflow fixes the location when the experiment is created: a new one is ignored, loudly.
    cfg.tracking.artifact_location = str(tmp_path / "moved")
    with caplog.at_level("WARNING", logger="ift.tracking"):
        second = tracking.start_run(cfg.tracking, cfg.storage.root, "again")
    assert client(cfg).get_run(second).info.artifact_uri.startswith(where.as_uri())
    assert "artifact_location" in caplog.text and "placed" in caplog.text
