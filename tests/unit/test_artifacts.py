"""The artifact records spell each layout once: where a stage finds what another wrote."""

from __future__ import annotations

import ast
import json
import pathlib

from ift import artifacts
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
    (tmp_path / "empty").mkdir()
    adapter, model, empty = (FinalModel(str(tmp_path / d)) for d in ("a", "m", "empty"))
    assert adapter.is_adapter() and not model.is_adapter() and not empty.is_adapter()
    assert model.is_model() and not adapter.is_model() and not empty.is_model()
    assert adapter.adapter_settings() == {"peft_type": "LORA"}
    assert model.adapter_settings() is None and empty.adapter_settings() is None


def _ift_modules():
    root = pathlib.Path(artifacts.__file__).parent
    for path in sorted(root.rglob("*.py")):
        if path.name != "artifacts.py":
            yield path.relative_to(root.parent), ast.parse(path.read_text(encoding="utf-8"))


# The artifacts' constants no other module assigns again, and the file names (and ChatML
# tokens) no other module spells as a whole string literal. Folder names such as "final"
# and "runs" are left out of the literal check: they are also summary keys and words.
OWNED = {k: v for k, v in vars(artifacts).items()
         if k.isupper() and isinstance(v, (str, int)) and k not in ("REF_LOGPS_DIR",
                                                                      "SAMPLE_PREFIX")}


def test_constants_have_one_owner():
    values = {v: k for k, v in OWNED.items()
              if isinstance(v, str) and ("." in v or v.startswith("<|"))}
    spelled, redefined = [], []
    for path, tree in _ift_modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                    and node.value in values:
                spelled.append(f"{path}:{node.lineno} {node.value!r} "
                               f"(artifacts.{values[node.value]})")
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id in OWNED:
                        redefined.append(f"{path}:{node.lineno} {target.id}")
    assert not spelled, spelled
    assert not redefined, redefined
    assert IGNORE_INDEX == -100 and SAMPLE_DATA_DIR.endswith("ift/sample_data")
