"""Lineage records and `ift lineage` on hand-built artifact directories (no Ray)."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading

import pytest

from ift import lineage
from ift.cli import main
from ift.serve.adapters import LINEAGE_FILE, LINEAGE_KEYS, Catalog, read_lineage

TOK = {"name_or_path": "/models/tiny", "class": "PreTrainedTokenizerFast", "vocab_size": 512,
       "sha256": "t" * 64}


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _write_json(path, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def make_prepared(root, name="prepared", digest="h" * 64) -> tuple[str, dict]:
    """A prepared dataset dir as `ift data prepare` leaves it: two sources (one with two
    files), manifest.json, the _COMPLETE marker."""
    src = root / "src"
    src.mkdir(exist_ok=True)
    (src / "a.json").write_text('[{"instruction": "hi", "output": "hello"}]')
    (src / "b1.jsonl").write_text('{"messages": []}\n')
    (src / "b2.jsonl").write_text('{"messages": [{"role": "user"}]}\n')
    manifest = {
        "version": 1, "hash": digest, "created": "2026-01-01T00:00:00Z", "tokenizer": TOK,
        "splits": {"train": {"rows": 10}, "val": {"rows": 2}},
        "sources": {
            "alpaca": {"path": str(src / "a.json"), "tags": [], "weight": None,
                       "files": [{"path": str(src / "a.json"), "format": "alpaca",
                                  "bytes": 40, "sha256": _sha(src / "a.json")}]},
            "chat": {"path": str(src / "b*.jsonl"), "tags": ["chat"], "weight": None,
                     "files": [{"path": str(src / n), "format": "openai", "bytes": 20,
                                "sha256": _sha(src / n)} for n in ("b1.jsonl", "b2.jsonl")]},
        },
    }
    out = root / name
    _write_json(str(out / "manifest.json"), manifest)
    (out / "_COMPLETE").write_text(digest)
    return str(out), manifest


def make_run(root, prepared, manifest, *, with_record=True, run_id="r" * 32,
             tracking_uri="", finished=True) -> str:
    """A run dir as `ift train` leaves it: run.json, config.yaml, final/ with an adapter
    config, the lineage record (unless with_record=False) and the marker."""
    run = root / "runs" / "run-1"
    info = {"run_name": "run-1", "run_dir": str(run), "prepared": prepared,
            "data_hash": manifest["hash"], "method": "lora", "mlflow_run_id": run_id,
            "tracking_uri": tracking_uri, "status": "FINISHED" if finished else "RUNNING",
            "started": "2026-01-01T01:00:00Z"}
    _write_json(str(run / "run.json"), info)
    (run / "config.yaml").write_text("model:\n  name_or_path: /models/tiny\npeft:\n  method: lora\n")
    if finished:
        final = run / "final"
        _write_json(str(final / "adapter_config.json"),
                    {"peft_type": "LORA", "base_model_name_or_path": "/models/tiny"})
        if with_record:
            record = lineage.training_record(
                manifest=manifest, prepared=prepared, run_dir=str(run), run_name="run-1",
                method="lora", base_model="/models/tiny", mlflow_run_id=run_id,
                tracking_uri=tracking_uri)
            _write_json(str(final / LINEAGE_FILE), record)
        (final / "_COMPLETE").write_text("lora")
    return str(run)


def stages_named(stages):
    return [s["stage"] + ("(parent)" if s.get("role") == "parent" else "") for s in stages]


# ---------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------


def test_files_digest_is_the_file_hash_for_one_file_and_order_free_for_many():
    assert lineage.files_digest([]) is None
    assert lineage.files_digest([{"path": "a", "sha256": None}]) is None
    assert lineage.files_digest([{"path": "a", "sha256": "x1"}]) == "x1"
    two = [{"path": "a", "sha256": "x1"}, {"path": "b", "sha256": "x2"}]
    d = lineage.files_digest(two)
    assert d == lineage.files_digest(list(reversed(two))) and len(d) == 64
    assert d != lineage.files_digest([{"path": "a", "sha256": "x1"}, {"path": "b", "sha256": "x3"}])


def test_training_record_names_data_run_and_sources(tmp_path):
    prepared, manifest = make_prepared(tmp_path)
    rec = lineage.training_record(manifest=manifest, prepared=prepared, run_dir="/r/run-1",
                                  run_name="run-1", method="dora", base_model="/models/tiny",
                                  mlflow_run_id="abc", tracking_uri="sqlite:///x.db",
                                  created="2026-02-02T00:00:00Z")
    assert rec["mlflow_run_id"] == "abc" and rec["tracking_uri"] == "sqlite:///x.db"
    assert rec["data_manifest_hash"] == manifest["hash"] and rec["prepared"] == prepared
    assert rec["config"] == "/r/run-1/config.yaml" and rec["method"] == "dora"
    assert rec["base_model"] == "/models/tiny" and rec["created"] == "2026-02-02T00:00:00Z"
    assert rec["tokenizer"] == {"name_or_path": TOK["name_or_path"], "sha256": TOK["sha256"]}
    assert [s["name"] for s in rec["sources"]] == ["alpaca", "chat"]
    alpaca, chat = rec["sources"]
    assert alpaca["hash"] == manifest["sources"]["alpaca"]["files"][0]["sha256"]
    assert [f["path"] for f in chat["files"]] == [str(tmp_path / "src" / n)
                                                  for n in ("b1.jsonl", "b2.jsonl")]
    assert chat["hash"] == lineage.files_digest(chat["files"])
    # Tracking off: no run id, recorded as null rather than "".
    off = lineage.training_record(manifest=manifest, prepared=prepared, run_dir="/r",
                                  run_name="x", method="lora", base_model="m")
    assert off["mlflow_run_id"] is None and off["tracking_uri"] is None


def test_server_reads_the_training_record_keys(tmp_path):
    """What training writes is what /v1/models shows (ift.serve.adapters.read_lineage)."""
    assert lineage.LINEAGE_FILE == LINEAGE_FILE
    prepared, manifest = make_prepared(tmp_path)
    run = make_run(tmp_path, prepared, manifest)
    got = read_lineage(os.path.join(run, "final"))
    assert {k: got[k] for k in LINEAGE_KEYS} == {
        "mlflow_run_id": "r" * 32, "data_manifest_hash": manifest["hash"], "method": "lora",
        "base_model": "/models/tiny"}
    assert got["run_dir"] == run and got["sources"][0]["name"] == "alpaca"


def test_remixed_data_names_its_parent_and_fills_source_files_from_it(tmp_path):
    _, base = make_prepared(tmp_path)
    remix = {**base, "hash": "m" * 64, "parent": {"path": "/data/prepared", "hash": base["hash"]},
             "mixture": {"alpaca": {"weight": 1.0, "count": None}},
             "sources": {"alpaca": {"path": base["sources"]["alpaca"]["path"], "weight": 1.0}}}
    entries = lineage.source_entries(remix, base)
    assert entries == [{"name": "alpaca", "path": base["sources"]["alpaca"]["path"],
                        "files": [{"path": base["sources"]["alpaca"]["files"][0]["path"],
                                   "sha256": base["sources"]["alpaca"]["files"][0]["sha256"]}],
                        "hash": base["sources"]["alpaca"]["files"][0]["sha256"]}]
    rec = lineage.training_record(manifest=remix, parent_manifest=base, prepared="/t/data",
                                  run_dir="/t/run", run_name="t", method="lora",
                                  base_model="m")
    stages = lineage.record_stages(rec, "/t/run/final")
    assert stages_named(stages) == ["sources", "prepared(parent)", "prepared", "run", "adapter"]
    assert stages[1]["hash"] == base["hash"] and stages[2]["hash"] == "m" * 64
    assert stages[2]["mixture"] == remix["mixture"]


def test_merged_record_keeps_the_adapter_record_and_adds_the_merge():
    adapter = {"artifact": "adapter", "mlflow_run_id": "r1", "data_manifest_hash": "h1",
               "method": "lora", "base_model": None, "run_dir": "/r", "created": "T1",
               "sources": [{"name": "s"}]}
    rec = lineage.merged_record(adapter, base="/b", adapter="/r/final", peft_type="LORA",
                                created="T2")
    assert rec["merged_from"] == {"base": "/b", "adapter": "/r/final"}
    assert rec["mlflow_run_id"] == rec["training_run_id"] == "r1"
    assert rec["data_manifest_hash"] == "h1" and rec["sources"] == [{"name": "s"}]
    assert rec["artifact"] == "merged" and rec["base_model"] == "/b"
    assert rec["created"] == "T2" and rec["adapter_created"] == "T1"
    assert adapter["created"] == "T1"  # the input is not changed


def test_save_final_writes_the_record_inside_final_before_the_marker(tmp_path, monkeypatch):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from ift import storage
    from ift.train import checkpoint

    torch.manual_seed(0)
    tiny = LlamaConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(tiny), LoraConfig(r=2, target_modules=["q_proj"]))
    order = []
    real_write = storage.write_text

    def spy(path, text):  # records the order files land in the staging dir
        order.append(os.path.basename(path))
        return real_write(path, text)

    monkeypatch.setattr(storage, "write_text", spy)
    record = {"mlflow_run_id": "r1", "data_manifest_hash": "h1", "method": "lora",
              "base_model": "/models/tiny", "created": "old"}
    final = checkpoint.save_final(str(tmp_path / "run"), model=model, method="lora",
                                  lineage=record)
    assert order.index(LINEAGE_FILE) < order.index("_COMPLETE")
    got = json.load(open(os.path.join(final, LINEAGE_FILE)))
    assert {k: got[k] for k in ("mlflow_run_id", "data_manifest_hash", "method")} == {
        "mlflow_run_id": "r1", "data_manifest_hash": "h1", "method": "lora"}
    assert got["created"] != "old" and got["created"].endswith("Z")
    # Without a record (e.g. a direct call) final/ has none, as before.
    final = checkpoint.save_final(str(tmp_path / "run2"), model=model, method="lora")
    assert not os.path.exists(os.path.join(final, LINEAGE_FILE))


# ---------------------------------------------------------------------------------------
# Resolving paths
# ---------------------------------------------------------------------------------------


def test_chain_of_a_final_dir_and_of_its_run_dir(tmp_path):
    prepared, manifest = make_prepared(tmp_path)
    run = make_run(tmp_path, prepared, manifest)
    final = os.path.join(run, "final")
    for target in (final, run, final + "/"):
        stages = lineage.chain(target, check_mlflow=False)
        assert stages_named(stages) == ["sources", "prepared", "run", "adapter"], target
        assert stages[1]["path"] == prepared and stages[1]["hash"] == manifest["hash"]
        assert stages[2]["path"] == run and stages[2]["mlflow_run_id"] == "r" * 32
        assert stages[2]["config"] == os.path.join(run, "config.yaml")
        assert stages[2]["status"] == "FINISHED"
        assert stages[3]["path"] == final and stages[3]["method"] == "lora"
        assert not any(s.get("notes") for s in stages)


def test_chain_of_a_prepared_dir(tmp_path):
    prepared, manifest = make_prepared(tmp_path)
    stages = lineage.chain(prepared)
    assert stages_named(stages) == ["sources", "prepared"]
    assert stages[1]["hash"] == manifest["hash"] and stages[1]["rows"] == {"train": 10, "val": 2}
    assert [s["name"] for s in stages[0]["sources"]] == ["alpaca", "chat"]


def test_chain_of_a_run_without_records_is_rebuilt_from_run_json(tmp_path):
    prepared, manifest = make_prepared(tmp_path)
    run = make_run(tmp_path, prepared, manifest, with_record=False)
    for target in (run, os.path.join(run, "final")):
        stages = lineage.chain(target, check_mlflow=False)
        assert stages_named(stages) == ["sources", "prepared", "run", "adapter"]
        assert stages[1]["hash"] == manifest["hash"]
        assert stages[3]["base_model"] == "/models/tiny"


def test_chain_of_an_unfinished_run_says_final_is_missing(tmp_path):
    prepared, manifest = make_prepared(tmp_path)
    run = make_run(tmp_path, prepared, manifest, finished=False)
    stages = lineage.chain(run, check_mlflow=False)
    assert stages_named(stages) == ["sources", "prepared", "run"]
    assert stages[-1]["status"] == "RUNNING"
    assert any("final is not written" in n for n in stages[-1]["notes"])


def test_chain_notes_data_that_changed_or_went_away(tmp_path):
    prepared, manifest = make_prepared(tmp_path)
    run = make_run(tmp_path, prepared, manifest)
    manifest["hash"] = "z" * 64
    _write_json(os.path.join(prepared, "manifest.json"), manifest)
    stages = lineage.chain(os.path.join(run, "final"), check_mlflow=False)
    assert any("now has hash " + "z" * 64 in n for n in stages[1]["notes"])
    os.unlink(os.path.join(prepared, "manifest.json"))
    stages = lineage.chain(os.path.join(run, "final"), check_mlflow=False)
    assert any("not readable here" in n for n in stages[1]["notes"])


def test_chain_of_a_merged_dir_goes_through_its_adapter(tmp_path):
    prepared, manifest = make_prepared(tmp_path)
    run = make_run(tmp_path, prepared, manifest)
    final = os.path.join(run, "final")
    merged = tmp_path / "merged"
    rec = lineage.merged_record(read_lineage(final), base="/models/tiny", adapter=final)
    rec["merge_run_id"] = "m" * 32
    _write_json(str(merged / LINEAGE_FILE), rec)
    _write_json(str(merged / "config.json"), {"model_type": "llama"})
    stages = lineage.chain(str(merged), check_mlflow=False)
    assert stages_named(stages) == ["sources", "prepared", "run", "adapter", "merged"]
    assert stages[3]["path"] == final and stages[4]["path"] == str(merged)
    assert stages[4]["merge_run_id"] == "m" * 32 and stages[4]["base"] == "/models/tiny"
    text = lineage.render(stages, str(merged))
    assert f"mlflow merge run {'m' * 32}" in text and f"manifest hash {manifest['hash']}" in text


def test_adapter_without_a_record_is_one_stage_with_a_note(tmp_path):
    d = tmp_path / "loose"
    _write_json(str(d / "adapter_config.json"), {"peft_type": "LORA", "use_dora": True})
    stages = lineage.chain(str(d), check_mlflow=False)
    assert stages_named(stages) == ["adapter"] and stages[0]["method"] == "dora"
    assert "no ift_lineage.json recorded" in stages[0]["notes"][0]


def test_unknown_and_missing_paths_are_errors_naming_the_path(tmp_path, capsys):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(lineage.LineageError, match=r"junk: not an artifact ift knows"):
        lineage.chain(str(tmp_path / "junk"))
    with pytest.raises(lineage.LineageError, match=r"nope: no such file or directory.*--url"):
        lineage.chain(str(tmp_path / "nope"))
    assert main(["lineage", str(tmp_path / "junk")]) == 1
    err = capsys.readouterr().err
    assert f"ift lineage: {tmp_path / 'junk'}: not an artifact ift knows" in err


# ---------------------------------------------------------------------------------------
# MLflow
# ---------------------------------------------------------------------------------------


def test_mlflow_run_status_found_missing_and_unreachable(tmp_path):
    from ift import tracking
    from ift.config import build_config

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = build_config({"tracking": {"uri": uri}, "storage": {"root": str(tmp_path)}})
    run_id = tracking.start_run(cfg.tracking, cfg.storage.root, "run-1")
    tracking.end_run(run_id)
    found = lineage.mlflow_run_status(run_id, uri)
    assert found["status"] == "found" and found["run_status"] == "FINISHED"
    assert found["run_name"] == "run-1"
    assert lineage.mlflow_run_status("0" * 32, uri)["status"] == "missing"
    gone = lineage.mlflow_run_status(run_id, f"sqlite:///{tmp_path}/elsewhere/mlflow.db")
    assert gone["status"] == "unreachable" and "does not exist" in gone["detail"]
    assert not (tmp_path / "elsewhere").exists()  # no empty store was created
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = lineage.mlflow_run_status(run_id, f"http://127.0.0.1:{port}")
    assert down["status"] == "unreachable"
    assert lineage.mlflow_run_status(None, uri)["status"] == "unknown"

    # The CLI says what MLflow answered, and a store that is gone does not fail it.
    prepared, manifest = make_prepared(tmp_path)
    run = make_run(tmp_path, prepared, manifest, run_id=run_id, tracking_uri=uri)
    stages = lineage.chain(run)
    assert stages[2]["mlflow"]["status"] == "found"
    assert "[found in MLflow, FINISHED]" in lineage.render(stages)
    os.rename(f"{tmp_path}/mlflow.db", f"{tmp_path}/moved.db")
    stages = lineage.chain(run)
    assert stages[2]["mlflow"]["status"] == "unreachable"
    assert "[MLflow unreachable:" in lineage.render(stages)


# ---------------------------------------------------------------------------------------
# A server's /v1/models
# ---------------------------------------------------------------------------------------


@pytest.fixture
def models_server(tmp_path):
    """An HTTP server answering GET /v1/models with the rows a real Catalog lists for
    hand-built dirs, plus the serving info the ingress adds."""
    prepared, manifest = make_prepared(tmp_path)
    run = make_run(tmp_path, prepared, manifest)
    final = os.path.join(run, "final")
    gone = tmp_path / "gone-adapter"  # served from a path this machine cannot read
    _write_json(str(gone / "adapter_config.json"), {"peft_type": "LORA"})
    _write_json(str(gone / LINEAGE_FILE), json.load(open(os.path.join(final, LINEAGE_FILE))))
    rows = Catalog("base", "/models/tiny", adapters={"trained": final, "remote": str(gone)}
                   ).list_models()
    import shutil

    shutil.rmtree(gone)
    for r in rows:
        r["metadata"]["serving"] = {"url": "http://serve.example/v1", "app": "ift",
                                    "deployment": "llm-base"}
    body = json.dumps({"object": "list", "data": rows}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path != "/v1/models":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield {"url": f"http://127.0.0.1:{httpd.server_address[1]}", "final": final,
           "manifest": manifest, "run": run}
    httpd.shutdown()


def test_chain_of_a_served_model_id(models_server, capsys):
    url = models_server["url"]
    stages = lineage.chain("trained", url=url, check_mlflow=False)
    assert stages_named(stages) == ["sources", "prepared", "run", "adapter", "serving"]
    assert stages[3]["path"] == models_server["final"]
    assert stages[4] == {"stage": "serving", "model_id": "trained", "type": "adapter",
                         "url": "http://serve.example/v1", "app": "ift",
                         "deployment": "llm-base", "path": models_server["final"]}
    # A path is matched to the id serving it; /v1 in the URL is accepted.
    by_path = lineage.chain(models_server["final"], url=url + "/v1", check_mlflow=False)
    assert by_path[-1]["model_id"] == "trained"
    # Files not readable here: the chain comes from the server's copy of the record.
    remote = lineage.chain("remote", url=url, check_mlflow=False)
    assert stages_named(remote) == ["sources", "prepared", "run", "adapter", "serving"]
    assert remote[2]["mlflow_run_id"] == "r" * 32
    assert any("not readable here" in n for n in remote[3]["notes"])
    base = lineage.chain("base", url=url, check_mlflow=False)
    assert stages_named(base) == ["model", "serving"] and base[0]["role"] == "base"

    with pytest.raises(lineage.LineageError, match=r"nope: not a model served at .*/v1 "
                                                   r"\(it serves: base, remote, trained\)"):
        lineage.chain("nope", url=url)
    assert main(["lineage", "trained", "--url", url, "--json", "--no-mlflow"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["target"] == "trained"
    assert [s["stage"] for s in out["stages"]] == ["sources", "prepared", "run", "adapter",
                                                    "serving"]
    assert main(["lineage", "trained", "--url", url, "--no-mlflow"]) == 0
    text = capsys.readouterr().out
    assert "model 'trained' (adapter) at http://serve.example/v1" in text
    assert f"mlflow run {'r' * 32}" in text


def test_unreachable_server_is_a_clear_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(lineage.LineageError, match=rf"GET http://127.0.0.1:{port}/v1/models: "
                                                   "cannot reach the server"):
        lineage.chain("x", url=f"http://127.0.0.1:{port}")


def test_render_prints_every_stage_in_order(tmp_path):
    prepared, manifest = make_prepared(tmp_path)
    run = make_run(tmp_path, prepared, manifest)
    text = lineage.render(lineage.chain(run, check_mlflow=False), run)
    lines = text.splitlines()
    assert lines[0] == f"lineage of {run}"
    heads = [ln.split()[0] for ln in lines if ln.startswith("  ") and not ln.startswith("    ")]
    assert heads == ["sources", "prepared", "training", "adapter"]
    assert f"alpaca: {tmp_path / 'src' / 'a.json'}  sha256 " in text
    assert str(tmp_path / "src" / "b2.jsonl") in text
    assert f"config {run}/config.yaml" in text
    assert "(run-1, lora, FINISHED)" in text


def test_driver_record_for_remixed_data_reads_the_parent_manifest(tmp_path):
    """A sweep trial trains on re-mixed data: the record names the parent dataset, and
    source files the re-mix lacks come from the parent's manifest."""
    from ift.config import load_config
    from ift.train.driver import lineage_record

    base_dir, base = make_prepared(tmp_path)
    remix = {**base, "hash": "m" * 64, "parent": {"path": base_dir, "hash": base["hash"]},
             "mixture": {"chat": {"weight": 1.0, "count": None}},
             "sources": {"chat": {"path": base["sources"]["chat"]["path"], "weight": 1.0}}}
    cfg = load_config(None, ["model.name_or_path=/models/tiny", "peft.method=full",
                             "train.run_name=trial-0", "tracking.enabled=false"])
    rec = lineage_record(cfg, remix, "rel/data", str(tmp_path / "runs" / "trial-0"), "", "")
    assert rec["prepared"] == os.path.abspath("rel/data")
    assert rec["data_parent"] == {"path": base_dir, "hash": base["hash"]}
    assert rec["data_manifest_hash"] == "m" * 64 and rec["artifact"] == "model"
    assert rec["method"] == "full" and rec["run_name"] == "trial-0"
    assert rec["config"] == str(tmp_path / "runs" / "trial-0" / "config.yaml")
    chat = base["sources"]["chat"]["files"]
    assert rec["sources"] == [{"name": "chat", "path": base["sources"]["chat"]["path"],
                               "files": [{"path": f["path"], "sha256": f["sha256"]}
                                         for f in chat],
                               "hash": lineage.files_digest(chat)}]
    # The parent gone: the record still names it, with the files the re-mix carries (none).
    os.unlink(os.path.join(base_dir, "manifest.json"))
    rec = lineage_record(cfg, remix, "rel/data", str(tmp_path / "r"), "", "")
    assert rec["data_parent"]["hash"] == base["hash"] and rec["sources"][0]["files"] == []


def test_a_run_from_a_parent_adapter_lists_the_parent_chain_first():
    from ift.lineage import record_stages, render

    parent = {"run_dir": "/r/sft", "run_name": "sft", "method": "lora", "prepared": "/p1",
              "data_manifest_hash": "h1", "sources": [{"name": "a", "path": "/a.json"}]}
    rec = {"run_dir": "/r/dpo", "run_name": "dpo", "method": "lora", "prepared": "/p2",
           "data_manifest_hash": "h2",
           "parent_adapter": {"path": "/r/sft/final", "lineage": parent}}
    stages = record_stages(rec, "/r/dpo/final")
    assert [(s["stage"], s.get("path")) for s in stages] == [
        ("sources", None), ("prepared", "/p1"), ("run", "/r/sft"), ("adapter", "/r/sft/final"),
        ("prepared", "/p2"), ("run", "/r/dpo"), ("adapter", "/r/dpo/final")]
    unknown = record_stages({**rec, "parent_adapter": {"path": "/q"}}, "/r/dpo/final")
    assert unknown[0]["path"] == "/q" and "parent adapter" in unknown[0]["notes"][0]
    assert "/r/sft/final" in render(stages)
