"""`ift tune` under ASHA on an IE metric, on SmolLM2-135M-Instruct: the held-out NER F1
computed during training (`heldout/ie_ner_f1`) decides which trial is stopped."""

from __future__ import annotations

import json

from tune_support import sweep_lr_under_asha


def test_asha_stops_a_trial_on_an_ie_metric(tmp_path, smollm2):
    """tune.metric heldout/ie_ner_f1 (mode max), computed during training on held-out
    CLUENER rows read with the source's schema: every sentence names one place, 北京, which
    a LoRA on SmolLM2 learns to extract in a few steps (at the first step it answers with
    the whole clause as the entity); the near-zero learning rate trial lags and is
    stopped."""
    words = ["小明", "老王", "阿花", "大伟", "小李", "老张", "阿强", "小美"]

    def rows(lo: int, hi: int) -> str:
        out = []
        for i in range(lo, hi):
            who = f"{words[i % 8]}{i}"
            out.append({"text": f"{who}住在北京。",
                        "label": {"地点": {"北京": [[len(who) + 2, len(who) + 3]]}}})
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out)

    (tmp_path / "train.jsonl").write_text(rows(0, 64), encoding="utf-8")
    (tmp_path / "heldout.jsonl").write_text(rows(100, 104), encoding="utf-8")
    (tmp_path / "types.json").write_text('["地点", "人物"]', encoding="utf-8")
    _, got = sweep_lr_under_asha(
        tmp_path, smollm2, "asha-ie", "heldout/ie_ner_f1",
        {"path": str(tmp_path / "train.jsonl"), "name": "ner",
         "schema": str(tmp_path / "types.json")}, tmp_path / "heldout.jsonl",
        {"max_steps": 6, "eval_every": 2}, max_new_tokens=24, lrs=(2.0e-3, 1.0e-7))
    learned = {s: (r["heldout/ie_ner_f1"], r["heldout/ie_unparseable"])
               for s, r in got["t000"].items()}
    lagging = {s: r["heldout/ie_ner_f1"] for s, r in got["t001"].items()}
    assert sorted(learned) == [2, 4, 6]
    assert learned[6] == (1.0, 0.0), learned
    last = max(lagging)
    assert last < 6 and lagging[last] < learned[last][0], (learned, lagging)
