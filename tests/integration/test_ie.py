"""IE end to end on a local Ray cluster: the synthetic Chinese IE corpus -> `ift data
prepare` (schemas, a schema split counted in the manifest) -> a few LoRA steps -> `ift eval`
on the held-out IE files writes every IE metric to eval.json, the per-type tables and MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ift.config import load_config
from ift.corpora.ie_synthetic import write_corpus
from ift.data.pipeline import prepare
from ift.eval.ie import COLUMNS
from ift.eval.run import evaluate_run
from ift.models import init_tiny

IE_METRICS = ("ie_ner_precision", "ie_ner_recall", "ie_ner_f1", "ie_re_precision",
              "ie_re_recall", "ie_re_f1", "ie_ee_trigger_precision", "ie_ee_trigger_recall",
              "ie_ee_trigger_f1", "ie_ee_argument_precision", "ie_ee_argument_recall",
              "ie_ee_argument_f1", "ie_ner_unparseable", "ie_re_unparseable",
              "ie_ee_unparseable", "ie_unparseable")


@pytest.fixture(scope="module")
def ie_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ie")
    corpus = tmp / "corpus"
    write_corpus(str(corpus), n_train=40, n_heldout=8, seed=1)
    model = init_tiny(str(tmp / "model"), arch="llama", data=[str(corpus / "train")],
                      vocab_size=1024, hidden_size=32, layers=2, heads=4, max_positions=1024,
                      seed=0)
    train, held = corpus / "train", corpus / "heldout"
    overrides = [
        f"storage.root={tmp / 'work'}", f"model.name_or_path={model}", "data.output=data",
        "data.max_seq_len=768", "data.val_ratio=0.1",
        f"data.sources.0.path={train / 'duie.jsonl'}",
        f"data.sources.0.schema={corpus / 'duie_schema.json'}",
        "data.sources.0.max_labels=3", "data.sources.0.schema_split=true",
        f"data.sources.1.path={train / 'duee.jsonl'}",
        f"data.sources.1.schema={corpus / 'duee_schema.json'}",
        f"data.sources.2.path={train / 'cluener.jsonl'}",
        f"data.sources.2.schema={corpus / 'ner_types.json'}",
        f"eval.data={held / 'duie.jsonl'},{held / 'duee.jsonl'},{held / 'cluener.jsonl'}",
        "eval.max_samples=100", "eval.max_new_tokens=24", "eval.batch_size=8",
        "train.output=runs", "train.run_name=ie", "train.max_steps=4",
        "train.micro_batch_size=4", "train.eval_every=0", "train.checkpoint_every=0",
        "train.lr=0.01", "train.warmup_ratio=0.0", "peft.r=4", "peft.alpha=8",
        "tracking.experiment=ie-test",
    ]
    return tmp, load_config(None, overrides)


def test_ie_prepare_train_eval(ie_setup, ray_cluster):
    from ift.train.driver import train

    tmp, cfg = ie_setup
    manifest = prepare(cfg)
    src = manifest["sources"]
    assert src["duie"]["format"] == ["duie"] and src["duee"]["format"] == ["duee"]
    assert src["cluener"]["format"] == ["cluener"]
    for name in ("duie", "duee", "cluener"):
        assert src[name]["rows_read"] == 40 and src[name]["rows_rejected"] == 0
    # 6 relations in chunks of 3: two records per DuIE row, the second counted as a chunk
    assert src["duie"]["rows_schema_chunks"] == 40
    assert src["duie"]["rows_kept"] + src["duie"]["rows_duplicate"] == 80
    assert src["duee"]["rows_schema_chunks"] == 0

    summary = train(cfg)
    result = evaluate_run(cfg, summary["run_dir"])
    m = result["metrics"]
    for k in IE_METRICS:
        assert k in m, k
    assert m["ie_ner_sentences"] == 8 and m["ie_ee_sentences"] == 8
    assert m["ie_re_sentences"] == 16  # two schema chunks per sentence
    assert 0 <= m["ie_unparseable"] <= 32
    run_dir = Path(summary["run_dir"])
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved["metrics"]["ie_re_f1"] == m["ie_re_f1"]
    md = (run_dir / "ie_scores.md").read_text()
    assert "| ee_argument | (all) |" in md and "| re | (all) |" in md
    assert (run_dir / "ie_scores.csv").read_text().splitlines()[0] == ",".join(COLUMNS)
    samples = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert {s["ie_task"] for s in samples} == {"ner", "re", "ee"}
    assert all("ie_pred" in s for s in samples)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'work'}/mlflow.db")
    run = client.get_run(summary["mlflow_run_id"])
    for k in ("ie_re_f1", "ie_ner_f1", "ie_ee_trigger_f1", "ie_ee_argument_f1"):
        assert run.data.metrics[f"heldout/{k}"] == pytest.approx(m[k])
    names = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/ie_scores.md", "eval/ie_scores.csv"} <= names
