"""What the stages import: the corpus generators (ift.corpora) are not part of any stage,
and the pure training and dataset modules load without Ray."""

from __future__ import annotations

import subprocess
import sys

STAGES = ("ift.cli", "ift.data.pipeline", "ift.data.prepare_pairs", "ift.train.driver",
          "ift.train.worker", "ift.eval.run", "ift.serve.app", "ift.tune.driver",
          "ift.quickstart")


def _loaded(modules: tuple[str, ...]) -> set[str]:
    code = ("import importlib, sys\n"
            f"for m in {list(modules)!r}: importlib.import_module(m)\n"
            "print('\\n'.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)
    return set(out.stdout.split())


def test_no_stage_imports_the_corpus_generators():
    loaded = _loaded(STAGES)
    assert "ift.train.driver" in loaded and "ift.serve.app" in loaded
    assert not {m for m in loaded if m.startswith("ift.corpora")}


def test_the_training_loop_and_dataset_readers_load_without_ray():
    loaded = _loaded(("ift.train.loop", "ift.data.dataset", "ift.data.mix", "ift.data.settle",
                      "ift.eval.metrics"))
    assert "ift.train.loop" in loaded
    assert not {m for m in loaded if m == "ray" or m.startswith("ray.")}
