from pathlib import Path

import yaml

from ift.config import load_config
from ift.quickstart import QUICKSTART_YAML, quickstart_config

ROOT = Path(__file__).resolve().parents[2]


def test_shipped_yaml_equals_embedded_defaults():
    shipped = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    assert shipped == yaml.safe_load(QUICKSTART_YAML)
    load_config(str(ROOT / "configs" / "quickstart.yaml"))  # valid as a job config too


def test_quickstart_config_resolves_bundled_data_and_workdir(tmp_path):
    cfg = quickstart_config(str(tmp_path), ["train.epochs=1"])
    assert cfg.storage.root == str(tmp_path)
    assert cfg.train.epochs == 1 and cfg.train.num_workers == 2 and cfg.peft.method == "lora"
    for src in cfg.data.sources:
        assert Path(src.path).is_file(), src.path
    assert {t for s in cfg.data.sources for t in s.tags} >= {"en", "zh", "cot", "multiturn"}
