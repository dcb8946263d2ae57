"""cluster.yaml cannot be launched here; it is parsed and checked against the launcher's rules."""

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def load():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_required_launcher_fields():
    cfg = load()
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type",
                "max_workers", "setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands"):
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    assert cfg["auth"]["ssh_user"]


def test_node_types_exist_and_are_complete():
    cfg = load()
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_workers = []
    for name, t in types.items():
        assert "node_config" in t and t["node_config"]["InstanceType"], name
        assert "resources" in t, name
        if name != cfg["head_node_type"]:
            assert 0 <= t["min_workers"] <= t["max_workers"] <= cfg["max_workers"], name
            if t["resources"].get("GPU", 0) > 0:
                gpu_workers.append(name)
    assert gpu_workers, "a GPU worker group"
    assert types[cfg["head_node_type"]]["resources"].get("GPU", 0) == 0


def test_no_credentials_and_pinned_install():
    text = (ROOT / "cluster.yaml").read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert "aws_secret_access_key" not in text.lower()
    cfg = load()
    for t in cfg["available_node_types"].values():
        assert t["node_config"]["IamInstanceProfile"]["Name"]
    setup = " ".join(cfg["setup_commands"])
    assert "requirements.lock" in setup and "torch==" in setup
    head = " ".join(cfg["head_start_ray_commands"])
    assert "mlflow server" in head and "s3://" in head


def test_every_field_is_commented():
    """Each key line in cluster.yaml is preceded by a comment (or carries one)."""
    lines = (ROOT / "cluster.yaml").read_text().splitlines()
    missing = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z_][\w.]*|\"[^\"]+\"):", line)
        if not m or line.strip().startswith("- "):
            continue
        prev = lines[i - 1].strip() if i else ""
        if "#" not in line and not prev.startswith("#"):
            missing.append(f"{i + 1}: {line.strip()}")
    assert not missing, missing
