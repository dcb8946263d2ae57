"""Task metrics during training (eval.during_training): on 2 DDP workers, rank 0 generates
on a fixed held-out sample at every evaluation step; exact match, MC accuracy and ROUGE-L
land in metrics.jsonl and MLflow at those steps, and equal `ift eval` on the final model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ift.config import load_config
from ift.eval.run import evaluate_run
from ift.train.loop import read_metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train_support import build_prepared, make_tiny_model  # noqa: E402

HELDOUT = ("What is 2 plus 3?\t5\t2 + 3 = 5.\n"
           "How many legs do 2 cats have?\t8\t2 * 4 = 8.\n"
           "Pick the prime:\\nOptions:\\n(A) 4\\n(B) 7\\n(C) 9\t(B)\t7 has no divisors.\n"
           "What is 10 minus 4?\t6\t10 - 4 = 6.\n"
           "What is 3 times 3?\t9\t3 * 3 = 9.\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_cluster):
    from ift.train.driver import train

    tmp = tmp_path_factory.mktemp("during")
    model = make_tiny_model(str(tmp / "model"))
    prepared = build_prepared(str(tmp / "prepared"), model, n_train=32, n_val=8)
    heldout = tmp / "heldout.tsv"
    heldout.write_text(HELDOUT)
    cfg = load_config(None, [
        f"storage.root={tmp / 'work'}", f"model.name_or_path={model}",
        f"train.data={prepared}", "train.output=runs", "train.run_name=d1",
        "train.max_steps=4", "train.micro_batch_size=4", "train.eval_every=2",
        "train.num_workers=2", "train.cpus_per_worker=1", "train.checkpoint_every=0",
        "train.lr=0.01", "train.warmup_ratio=0.0", "peft.r=4", "peft.alpha=8",
        "tracking.experiment=during-test", f"eval.during_training.data={heldout}",
        "eval.during_training.max_samples=4", "eval.during_training.max_new_tokens=6",
    ])
    summary = train(cfg)
    return {"tmp": tmp, "cfg": cfg, "summary": summary, "heldout": str(heldout)}


def test_heldout_metrics_at_the_evaluation_steps(trained):
    rows = read_metrics(trained["summary"]["run_dir"])
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    with_heldout = [r["step"] for r in rows if "heldout/exact_match" in r]
    assert with_heldout == [2, 4]
    for r in rows:
        if r["step"] in (2, 4):
            for k in ("heldout/exact_match", "heldout/mc_accuracy", "heldout/rouge_l",
                      "heldout/answered"):
                assert 0.0 <= r[k] <= 1.0, (k, r)
            assert "eval_loss" in r
        else:
            assert not any(k.startswith("heldout/") for k in r)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{trained['tmp'] / 'work'}/mlflow.db")
    run_id = trained["summary"]["mlflow_run_id"]
    for key in ("heldout/exact_match", "heldout/mc_accuracy", "heldout/rouge_l"):
        hist = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in hist) == [2, 4], key
        last = next(m.value for m in hist if m.step == 4)
        assert last == pytest.approx(rows[-1][key])


def test_final_heldout_metrics_equal_ift_eval_on_the_final_model(trained, tmp_path):
    """The last step's metrics were computed on the model that final/ holds: `ift eval` on
    the same 4 held-out rows, through the same engine, agrees."""
    cfg = load_config(None, [f"model.name_or_path={trained['cfg'].model.name_or_path}",
                             "tracking.enabled=false", "eval.max_samples=4",
                             "eval.max_new_tokens=6", f"eval.output={tmp_path / 'ev'}"])
    ev = evaluate_run(cfg, trained["summary"]["run_dir"], data=trained["heldout"])
    last = read_metrics(trained["summary"]["run_dir"])[-1]
    for k in ("exact_match", "mc_accuracy", "rouge_l", "answered"):
        assert last[f"heldout/{k}"] == pytest.approx(ev["metrics"][k]), k
    samples = [json.loads(x) for x in (tmp_path / "ev" / "samples.jsonl").read_text()
               .splitlines()]
    assert len(samples) == 4 and samples[2]["options"] == {"A": "4", "B": "7", "C": "9"}
