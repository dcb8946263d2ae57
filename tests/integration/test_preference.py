"""Preference tuning end to end on a local Ray cluster and a tiny llama: `ift data prepare`
with data.kind=preference (rejects, duplicates, the manifest), DPO on the bundled
concise-vs-rambling pairs (loss from ln 2 down, reward accuracy up), 1 worker with
accumulation against 2 workers, a killed worker resuming at the same step, and the
SFT -> DPO chain through model.adapter."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from test_train_resume import WorkerKiller

from ift.config import load_config
from ift.data.pipeline import prepare
from ift.eval.run import evaluate, evaluate_run
from ift.lineage import read_record, record_stages
from ift.train import driver
from ift.train.loop import read_metrics

BAD_ROWS = [
    {"instruction": "What is 1 plus 1?", "chosen": "2.", "rejected": "2."},
    {"instruction": "What is 1 plus 2?", "chosen": "", "rejected": "Well, 3."},
    {"instruction": "", "chosen": "A.", "rejected": "B."},
    {"instruction": "What is 2 plus 2?", "chosen": "4."},
]


@pytest.fixture(scope="module")
def pairs(ray_cluster, tiny_model, sample_data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    extra = root / "extra.jsonl"
    dup = json.loads((sample_data_dir / "pref_concise_train.jsonl").read_text().splitlines()[0])
    extra.write_text("".join(json.dumps(r) + "\n" for r in [*BAD_ROWS, dup]))
    cfg = load_config(None, [
        f"model.name_or_path={tiny_model}", f"data.output={root}/prepared", "data.kind=preference",
        "data.max_seq_len=96", "data.val_ratio=0.15", "tracking.enabled=false",
        f"data.sources.0.path={sample_data_dir / 'pref_concise_train.jsonl'}",
        f"data.sources.1.path={extra}", "data.sources.1.format=auto",
    ])
    return prepare(cfg), f"{root}/prepared", root


def test_prepare_counts_pairs_rejects_duplicates_and_lengths(pairs):
    manifest, prepared, _ = pairs
    assert manifest["kind"] == "preference"
    main, extra = manifest["sources"]["pref_concise_train"], manifest["sources"]["extra"]
    assert main["rows_read"] == 200 and main["rows_rejected"] == 0
    assert main["rows_kept"] == 200 and main["rows_duplicate"] == 0
    assert extra["rows_read"] == 5 and extra["rows_rejected"] == 4
    assert extra["rows_duplicate"] == 1 and extra["rows_kept"] == 0
    rejects = [json.loads(x) for x in open(f"{prepared}/rejects/extra.jsonl")]
    assert [r["line"] for r in rejects] == [1, 2, 3, 4]
    assert [r["reason"].split(":")[0] for r in rejects] == [
        "chosen equals rejected", "empty reply", "chosen", "missing field 'rejected'"]
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["pairs"] + val["pairs"] == 200 - main["rows_dropped"] and val["pairs"] > 10
    # Rambling rejected replies are longer than concise chosen ones.
    assert train["rejected_reply_length"]["mean"] > 5 * train["chosen_reply_length"]["mean"]
    rows = pads.dataset(f"{prepared}/train", format="parquet").to_table().to_pylist()
    assert len(rows) == train["rows"]
    for r in rows[:20]:
        n = r["prompt_tokens"]
        assert r["input_ids"][:n] == r["rejected_input_ids"][:n]
        assert set(r["labels"][:n]) == {-100} and set(r["rejected_labels"][:n]) == {-100}
        assert r["num_trainable"] == sum(1 for x in r["labels"] if x != -100)


def _cfg(tiny_model, prepared, root, name, *extra):
    return load_config(None, [
        f"model.name_or_path={tiny_model}", f"train.data={prepared}",
        f"train.output={root}/runs", f"train.run_name={name}", f"storage.root={root}/work",
        "tracking.enabled=false", "peft.dropout=0.0", "peft.r=8", "train.objective=dpo",
        "train.beta=0.1", "train.micro_batch_size=4", "train.lr=1e-2", "train.warmup_ratio=0",
        "train.scheduler=constant", "train.eval_every=0", "train.eval_max_batches=4",
        "train.checkpoint_every=0", *extra,
    ])


def _mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


def test_dpo_learns_the_preference(pairs, tiny_model):
    _, prepared, root = pairs
    cfg = _cfg(tiny_model, prepared, root, "dpo", "train.max_steps=24", "train.grad_accum=2",
               "eval.max_samples=4", "eval.max_new_tokens=8")
    summary = driver.train(cfg)
    rows = read_metrics(summary["run_dir"])
    assert [r["step"] for r in rows] == list(range(1, 25))
    # Step 1: the new adapter is zero, so the policy is the reference.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)
    first, last = rows[:4], rows[-4:]
    assert _mean(last, "loss") < _mean(first, "loss") - 0.2
    assert _mean(last, "rewards/accuracy") > max(_mean(first, "rewards/accuracy"), 0.9)
    assert _mean(last, "rewards/margin") > 0.5
    assert rows[-1]["eval_rewards/accuracy"] > 0.9
    final = os.path.join(summary["run_dir"], "final")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(final))
    assert read_record(final)["objective"] == "dpo"
    # ift eval on the raw held-out pairs (another layout, prompts unseen in training).
    held = str(Path(__file__).resolve().parents[2] / "ift" / "sample_data"
               / "pref_concise_heldout.jsonl")
    trained = evaluate_run(cfg, summary["run_dir"], data=held, output=f"{root}/eval-dpo")
    base = evaluate(cfg, model_dir=tiny_model, data=held, output=f"{root}/eval-base")
    assert trained["data_kind"] == {"kind": "preference", "skipped": 0}
    assert trained["metrics"]["pref_pairs"] == base["metrics"]["pref_pairs"] == 40
    assert trained["metrics"]["reward_accuracy"] > 0.9
    assert trained["metrics"]["pref_accuracy"] > max(base["metrics"]["pref_accuracy"], 0.9)
    assert "reward_accuracy" not in base["metrics"]


def test_one_worker_with_accumulation_on_packed_pairs_matches_two_workers(pairs, tiny_model):
    """Same global batch (4 pairs × 2 workers = 4 × 1 worker × 2 accumulation); the one
    worker trains on the same pairs prepared with data.pack=true, so each micro-batch is
    one row of 8 sequences without padding, and matches the padded run."""
    manifest, prepared, root = pairs
    cfg = load_config(None, [
        f"model.name_or_path={tiny_model}", f"data.output={root}/prepared-packed",
        "data.kind=preference", "data.pack=true", "data.max_seq_len=96", "data.val_ratio=0.15",
        "tracking.enabled=false",
        f"data.sources.0.path={manifest['sources']['pref_concise_train']['path']}"])
    packed = prepare(cfg)
    assert packed["packed"] is True and packed["padding_waste"]["packed"] == 0.0
    for split in ("train", "val"):  # the same pairs, in the same split
        assert packed["splits"][split]["pairs"] == manifest["splits"][split]["pairs"]
    runs = [driver.train(_cfg(tiny_model, data, root, name, "train.max_steps=4", *extra))
            for name, data, extra in (("w2", prepared, ["train.num_workers=2"]),
                                      ("w1", f"{root}/prepared-packed", ["train.grad_accum=2"]))]
    a, b = (read_metrics(s["run_dir"]) for s in runs)
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=2e-4), (ra, rb)
        assert ra["rewards/margin"] == pytest.approx(rb["rewards/margin"], abs=2e-4)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=2e-3, abs=1e-5)
    assert a[-1]["eval_loss"] == pytest.approx(b[-1]["eval_loss"], abs=2e-4)


def test_killed_worker_resumes_at_the_same_step(pairs, tiny_model):
    _, prepared, root = pairs
    cfg = _cfg(tiny_model, prepared, root, "dpo-killed", "train.max_steps=9",
               "train.checkpoint_every=3", "train.max_failures=1")
    killer = WorkerKiller(driver.run_dir_of(cfg), after_step=4)
    killer.start()
    summary = driver.train(cfg)
    killer.join(timeout=5)
    assert killer.error is None and killer.pid is not None
    lines = read_metrics(summary["run_dir"], latest_per_step=False)
    resumed = [r for r in lines if r["resumed_from"] == 3]
    assert resumed and resumed[0]["step"] == 4
    by_step: dict[int, list[float]] = {}
    for r in lines:
        by_step.setdefault(r["step"], []).append(r["loss"])
    assert max(by_step) == 9
    for losses in by_step.values():  # a step taken again has the same loss
        assert max(losses) - min(losses) < 1e-4


def test_precomputed_reference_logps_train_like_the_live_reference(pairs, tiny_model):
    """train.precompute_ref_logps: one Ray task scores every pair with the reference (here
    the SFT-free base, adapter disabled) before training, stored beside the prepared data
    under its key and reused; the steps' losses and rewards equal the live reference's."""
    from ift.artifacts import REF_LOGPS_DIR, REF_LOGPS_DONE

    _, prepared, root = pairs
    live = driver.train(_cfg(tiny_model, prepared, root, "ref-live", "train.max_steps=4",
                             "train.eval_every=2"))
    pre = driver.train(_cfg(tiny_model, prepared, root, "ref-pre", "train.max_steps=4",
                            "train.eval_every=2", "train.precompute_ref_logps=true"))
    keys = os.listdir(os.path.join(prepared, REF_LOGPS_DIR))
    assert len(keys) == 1
    done = json.loads(open(os.path.join(prepared, REF_LOGPS_DIR, keys[0], REF_LOGPS_DONE)).read())
    manifest = json.loads(open(os.path.join(prepared, "manifest.json")).read())
    assert done["pairs"] == {"train": manifest["splits"]["train"]["rows"],
                             "val": manifest["splits"]["val"]["rows"]}
    a, b = read_metrics(live["run_dir"]), read_metrics(pre["run_dir"])
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    # logps/* are sums over a sequence (hundreds in size): compared relative to that. The
    # rewards are beta x differences of such sums, scored in another pass and batch, so
    # float32 rounding of the sums (1e-6 of 400) reaches them at about 1e-5: they get
    # 1e-4, still far below what a wrong reference moves them by (a reference equal to the
    # policy makes every reward 0; here the margins are about 0.66).
    tolerance = {"loss": 5e-5, "rewards/chosen": 1e-4, "rewards/margin": 1e-4,
                 "logps/rejected": 1e-5}
    for ra, rb in zip(a, b):
        for k, tol in tolerance.items():
            assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=tol), (k, ra, rb)
    assert b[-1]["eval_loss"] == pytest.approx(a[-1]["eval_loss"], abs=1e-5)
    # A second run with the same data, base and reference reuses the stored values.
    mtime = os.path.getmtime(os.path.join(prepared, REF_LOGPS_DIR, keys[0], REF_LOGPS_DONE))
    driver.train(_cfg(tiny_model, prepared, root, "ref-pre2", "train.max_steps=1",
                      "train.precompute_ref_logps=true"))
    assert os.listdir(os.path.join(prepared, REF_LOGPS_DIR)) == keys
    assert os.path.getmtime(os.path.join(prepared, REF_LOGPS_DIR, keys[0],
                                         REF_LOGPS_DONE)) == mtime


@pytest.fixture(scope="module")
def chain(pairs, tiny_model, sample_data_dir, tmp_path_factory):
    """SFT on conversations (its own prepared dataset), then DPO on the pairs from that
    SFT adapter."""
    _, prepared, root = pairs
    sft_data = str(tmp_path_factory.mktemp("sft-data") / "prepared")
    sft_manifest = prepare(load_config(None, [
        f"model.name_or_path={tiny_model}", f"data.output={sft_data}", "data.max_seq_len=96",
        "data.val_ratio=0.1", "tracking.enabled=false",
        f"data.sources.0.path={sample_data_dir / 'alpaca_en.json'}"]))
    sft = driver.train(_cfg(tiny_model, sft_data, root, "served-sft", "train.objective=sft",
                            "train.max_steps=4"))
    parent = os.path.join(sft["run_dir"], "final")
    cfg = _cfg(tiny_model, prepared, root, "served-dpo", f"model.adapter={parent}",
               "train.max_steps=4", "eval.max_samples=4", "eval.max_new_tokens=8")
    dpo = driver.train(cfg)
    pref_hash = json.loads(open(os.path.join(prepared, "manifest.json")).read())["hash"]
    return {"cfg": cfg, "run_dir": dpo["run_dir"], "final": os.path.join(dpo["run_dir"], "final"),
            "parent": parent, "sft_hash": sft_manifest["hash"], "pref_hash": pref_hash,
            "root": root}


def test_sft_then_dpo_from_the_sft_adapter(chain):
    rows = read_metrics(chain["run_dir"])
    # The reference is the SFT adapter frozen: the policy starts equal to it.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert abs(rows[0]["logps/chosen"]) > 0
    final, parent = chain["final"], chain["parent"]
    assert not os.path.exists(os.path.join(final, "reference"))
    record = read_record(final)
    assert record["parent_adapter"]["path"] == parent
    assert record["parent_adapter"]["lineage"]["run_name"] == "served-sft"
    kinds = [s["stage"] for s in record_stages(record, final)]
    assert kinds.count("adapter") == 2 and kinds.count("run") == 2


def test_dpo_adapter_lineage_names_base_sft_and_dpo_with_both_datasets(chain, tiny_model):
    final = chain["final"]
    stages = record_stages(read_record(final), final)
    assert [s["hash"] for s in stages if s["stage"] == "prepared"] == [
        chain["sft_hash"], chain["pref_hash"]]
    assert [s["run_name"] for s in stages if s["stage"] == "run"] == ["served-sft", "served-dpo"]
    adapters = [s for s in stages if s["stage"] == "adapter"]
    assert [s["path"] for s in adapters] == [chain["parent"], final]
    assert {s["base_model"] for s in adapters} == {tiny_model}


def test_dpo_adapter_through_merge_serve_and_eval_unchanged(chain, tiny_model):
    """The DPO run's final/ is an ordinary adapter: merged, it computes what the adapter
    does; served, it answers HTTP requests (as itself and merged, the same greedy reply);
    `ift eval` scores it (and the merged model) on held-out pairs."""
    import socket

    import requests
    import torch
    from peft import PeftModel
    from ray import serve
    from transformers import AutoModelForCausalLM

    from ift.config import build_config
    from ift.merge import merge
    from ift.serve.app import start

    final, root = chain["final"], chain["root"]
    merged = str(root / "served-dpo-merged")
    merge(tiny_model, final, merged)
    assert read_record(merged)["merged_from"]["adapter"] == final
    x = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                         final)(input_ids=x).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(input_ids=x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = start(build_config({"serve": {
        "base_model": tiny_model, "port": port, "adapters": {"dpo": final},
        "merged_models": {"dpo-merged": merged}, "max_tokens_limit": 16,
        "cpus_per_replica": 0.25}}))
    try:
        replies = {}
        for model in ("dpo", "dpo-merged"):
            r = requests.post(url + "/v1/chat/completions", timeout=300, json={
                "model": model, "temperature": 0, "max_tokens": 8,
                "messages": [{"role": "user", "content": "What is 6 times 7?"}]})
            assert r.status_code == 200, r.text
            replies[model] = r.json()["choices"][0]["message"]["content"]
        assert replies["dpo"] == replies["dpo-merged"]
    finally:
        serve.shutdown()

    held = str(Path(__file__).resolve().parents[2] / "ift" / "sample_data"
               / "pref_concise_heldout.jsonl")
    cfg = chain["cfg"]
    adapter = evaluate_run(cfg, chain["run_dir"], data=held, output=f"{root}/eval-served-dpo")
    whole = evaluate(cfg, model_dir=merged, data=held, output=f"{root}/eval-served-merged")
    assert adapter["metrics"]["pref_pairs"] == whole["metrics"]["pref_pairs"] == 40
    assert adapter["metrics"]["pref_accuracy"] == whole["metrics"]["pref_accuracy"]
    assert adapter["metrics"]["pref_margin"] == pytest.approx(whole["metrics"]["pref_margin"],
                                                              abs=1e-4)
    assert "reward_accuracy" in adapter["metrics"]
