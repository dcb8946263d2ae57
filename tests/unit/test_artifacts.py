"""The artifact records spell each layout once: where a stage finds what another wrote."""

from __future__ import annotations

import json

from ift.artifacts import (
    ADAPTER_CONFIG,
    IGNORE_INDEX,
    SAMPLE_DATA_DIR,
    FinalModel,
    PreparedDataset,
    RunDir,
)


def test_records_name_the_files_of_each_artifact(tmp_path):
    run = RunDir(str(tmp_path / "runs" / "r1"))
    assert run.run_file.endswith("runs/r1/run.json")
    assert run.config_file.endswith("runs/r1/config.yaml")
    assert run.final.path.endswith("runs/r1/final")
    assert run.final.lineage.endswith("final/ift_lineage.json")
    assert run.final.prompt_format.endswith("final/ift_prompt_format.json")
    assert PreparedDataset("s3://b/data").manifest == "s3://b/data/manifest.json"
    assert RunDir("s3://b/runs/x").final.adapter_config == "s3://b/runs/x/final/adapter_config.json"


def test_final_model_tells_an_adapter_from_a_full_model(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert FinalModel(str(tmp_path / "a")).is_adapter()
    assert not FinalModel(str(tmp_path / "m")).is_adapter()


def test_constants_have_one_owner():
    from ift.data import pack, tokenize
    from ift.models import SAMPLE_DATA_DIR as MODELS_SAMPLE
    from ift.train import collate, loss

    assert IGNORE_INDEX == -100
    assert tokenize.IGNORE_INDEX is pack.IGNORE_INDEX is loss.IGNORE_INDEX is collate.IGNORE_INDEX
    assert MODELS_SAMPLE == SAMPLE_DATA_DIR and SAMPLE_DATA_DIR.endswith("ift/sample_data")
