"""`ift eval` on a tiny adapter trained with Ray Train: held-out loss matches training's own
evaluation, generation is the same batched (left padding) as one by one, files and MLflow
hold the results, raw held-out files give gold answers."""

from __future__ import annotations

import json
import math
import os
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from ift.config import load_config
from ift.eval import metrics
from ift.eval.run import eval_cmd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_support import build_prepared, make_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, ray_cluster):
    """A 6-step LoRA run on the toy repeat-the-words data, tracked in sqlite MLflow."""
    from ift.train.driver import train

    tmp = tmp_path_factory.mktemp("eval-run")
    model = make_tiny_model(str(tmp / "model"))
    prepared = build_prepared(str(tmp / "prepared"), model, n_train=32, n_val=10)
    cfg = load_config(None, [
        f"storage.root={tmp / 'work'}", f"model.name_or_path={model}",
        f"train.data={prepared}", "train.output=runs", "train.run_name=r1",
        "train.max_steps=6", "train.micro_batch_size=4", "train.eval_every=3",
        "train.checkpoint_every=0", "train.lr=0.01", "train.warmup_ratio=0.0",
        "peft.r=4", "peft.alpha=8", "tracking.experiment=eval-test",
    ])
    summary = train(cfg)
    return {"tmp": tmp, "model": model, "prepared": prepared, "summary": summary, "cfg": cfg}


def _args(**kw) -> Namespace:
    base = {"config": None, "overrides": [], "address": None, "run": None, "adapter": None,
            "data": None}
    base.update(kw)
    return Namespace(**base)


def _samples(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_eval_run_on_prepared_val(trained_run, tmp_path):
    run_dir = Path(trained_run["summary"]["run_dir"])
    out = tmp_path / "ev"
    assert eval_cmd(_args(run=str(run_dir), overrides=[
        "eval.max_samples=6", "eval.max_new_tokens=8", "eval.batch_size=4",
        f"eval.output={out}"])) == 0
    ev = json.loads((out / "eval.json").read_text())
    m = ev["metrics"]
    # Loss over the same val split as training's last evaluation: the same number.
    assert m["loss"] == pytest.approx(trained_run["summary"]["eval_loss"], rel=1e-4)
    assert m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-6)
    assert m["loss_rows"] == 10 and m["samples"] == 6
    assert ev["adapter"].endswith("final") and ev["base"] == trained_run["model"]
    samples = _samples(out / "samples.jsonl")
    assert len(samples) == 6
    for s in samples:
        assert s["prompt"].rstrip().endswith("assistant")  # ends at the reply's start
        assert s["prompt"].count("Repeat:") == 1
        assert s["reference"] and s["reference"].endswith(".")
        assert s["rouge_l"] == pytest.approx(metrics.rouge_l(s["output"], s["reference"])["f1"])
    # MLflow: the training run received the held-out metrics and files.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{trained_run['tmp'] / 'work'}/mlflow.db")
    run = client.get_run(trained_run["summary"]["mlflow_run_id"])
    assert run.data.metrics["heldout/loss"] == pytest.approx(m["loss"])
    assert "heldout/rouge_l" in run.data.metrics
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/eval.json", "eval/samples.jsonl"} <= arts
    assert ev["mlflow_run_id"] == run.info.run_id


def test_batched_generation_equals_one_by_one(trained_run, tmp_path):
    run_dir = Path(trained_run["summary"]["run_dir"])
    outs = {}
    for bs in (1, 5):
        out = tmp_path / f"bs{bs}"
        eval_cmd(_args(run=str(run_dir), overrides=[
            "eval.max_samples=10", "eval.max_new_tokens=10", f"eval.batch_size={bs}",
            f"eval.output={out}", "tracking.enabled=false"]))
        outs[bs] = [s["output"] for s in _samples(out / "samples.jsonl")]
    assert outs[1] == outs[5]
    assert len(set(outs[1])) >= 1 and all(isinstance(o, str) for o in outs[1])


def test_eval_adapter_on_raw_heldout_files(trained_run, tmp_path):
    heldout = tmp_path / "heldout.tsv"
    heldout.write_text(
        "What is 2 plus 3?\t5\t2 + 3 = 5.\n"
        "How many legs do 2 cats have?\t8\t2 * 4 = 8.\n"
        "Pick the prime:\\nOptions:\\n(A) 4\\n(B) 7\\n(C) 9\t(B)\t7 has no divisors.\n")
    adapter = Path(trained_run["summary"]["run_dir"]) / "final"
    out = tmp_path / "raw"
    assert eval_cmd(_args(adapter=str(adapter), data=str(heldout), overrides=[
        f"model.name_or_path={trained_run['model']}", f"storage.root={tmp_path / 'w'}",
        "eval.max_new_tokens=6", f"eval.output={out}", "tracking.experiment=eval-raw"])) == 0
    ev = json.loads((out / "eval.json").read_text())
    m = ev["metrics"]
    assert m["samples"] == 3 and m["exact_match_n"] == 3 and m["mc_n"] == 1
    assert m["loss_rows"] == 3 and m["loss"] > 0
    samples = _samples(out / "samples.jsonl")
    assert [s["gold"] for s in samples] == ["5", "8", "(B)"]
    assert samples[2]["options"] == {"A": "4", "B": "7", "C": "9"}
    for s in samples:
        # the prompt is the CoT template around the question, rendered for generation
        assert s["prompt"].startswith("<|im_start|>user\n")
        assert s["prompt"].endswith("<|im_start|>assistant\n")
        assert s["correct"] == metrics.exact_match(s["output"], s["gold"])
    assert "2 + 3 = 5." in samples[0]["reference"]
    # a new MLflow run (no training run to attach to) carries the metrics
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'w'}/mlflow.db")
    run = client.get_run(ev["mlflow_run_id"])
    assert run.data.tags["ift.command"] == "eval"
    assert run.data.metrics["heldout/exact_match"] == m["exact_match"]


def test_eval_errors_name_the_problem(trained_run, tmp_path):
    from ift.config import ConfigError

    with pytest.raises(ConfigError, match="does not exist"):
        eval_cmd(_args(overrides=[f"model.name_or_path={trained_run['model']}",
                                  "tracking.enabled=false"],
                       adapter=str(tmp_path / "missing-adapter"),
                       data=str(trained_run["prepared"])))
    with pytest.raises(ConfigError, match="no config.yaml"):
        eval_cmd(_args(run=str(tmp_path)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "hi", "output": "hello"}\n{not json}\n')
    adapter = Path(trained_run["summary"]["run_dir"]) / "final"
    with pytest.raises(ConfigError, match=r"bad.jsonl:2"):
        eval_cmd(_args(adapter=str(adapter), data=str(bad), overrides=[
            f"model.name_or_path={trained_run['model']}", "tracking.enabled=false",
            f"eval.output={tmp_path / 'o'}"]))
    assert not os.path.exists(tmp_path / "o" / "eval.json")
