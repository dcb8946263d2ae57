"""jobs/runtime_env.yaml: the pins a submitted job installs are the project's own."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_ENV = ROOT / "jobs" / "runtime_env.yaml"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _name(requirement: str) -> str:
    return _norm(re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0])


def _lock() -> dict[str, str]:
    out = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, _, version = line.partition("==")
            out[_norm(name)] = version.strip()
    return out


def _pins() -> dict[str, str]:
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    pins = {}
    for req in env["pip"]["packages"]:
        assert req.count("==") == 1, f"{RUNTIME_ENV.name}: {req!r} is not pinned with =="
        pins[_name(req)] = req.split("==", 1)[1].strip()
    return pins


def test_pins_equal_the_lock_and_the_installed_versions():
    lock = _lock()
    for name, version in _pins().items():
        assert name in lock, f"{RUNTIME_ENV.name}: {name} is not in requirements.lock"
        assert version == lock[name], (
            f"{RUNTIME_ENV.name}: {name}=={version} but requirements.lock has {lock[name]}")
        assert metadata.version(name) == version, (
            f"{RUNTIME_ENV.name}: {name}=={version} but {metadata.version(name)} is installed")


def test_every_dependency_is_pinned_except_torch():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    # torch is left to each node: the CUDA or CPU build that fits its hardware.
    wanted = {_name(d) for d in deps} - {"torch"}
    assert wanted == set(_pins())


def test_working_dir_excludes_and_env_vars():
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    # The virtualenv, git history and local outputs never travel with a job.
    assert {".venv", ".git", "ift-work", "runs"} <= set(env["excludes"])
    assert env["env_vars"]["RAY_TRAIN_V2_ENABLED"] == "1"
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    # Only keys Ray's runtime_env knows; working_dir comes from `--working-dir .`.
    assert set(env) <= {"pip", "excludes", "env_vars", "working_dir", "py_modules"}


def test_working_dir_package_is_small_and_complete(tmp_path):
    """The zip `ray job submit --working-dir .` uploads (built by Ray's own packaging,
    nothing started): the code, configs and bundled data, far below Ray's 512 MiB limit."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    env = yaml.safe_load(RUNTIME_ENV.read_text())
    out = tmp_path / "pkg.zip"
    create_package(str(ROOT), out, include_parent_dir=False, excludes=env["excludes"],
                   include_gitignore=True)
    names = zipfile.ZipFile(out).namelist()
    tops = {n.split("/", 1)[0] for n in names}
    assert {"ift", "jobs", "configs", "pyproject.toml"} <= tops
    assert "ift/sample_data/alpaca_en.json" in names and "jobs/train.py" in names
    assert not tops & {".venv", ".git", "ift-work", "runs"}
    assert out.stat().st_size < 20 * 2**20


def test_bundled_data_resolves_in_any_job_config():
    """`@sample/` paths (configs/quickstart-tiny.yaml) name the bundled data for every command,
    not only `ift quickstart`, so the README's `ray job submit ... -c configs/quickstart-tiny.yaml`
    finds them in the job's copy of the working dir."""
    from ift.config import load_config

    cfg = load_config(str(ROOT / "configs" / "quickstart-tiny.yaml"))
    for src in cfg.data.sources:
        assert Path(src.path).is_file(), src.path
        assert Path(src.path).parent == ROOT / "ift" / "sample_data"
