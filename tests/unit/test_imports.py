"""What the stages import: the corpus generators (ift.corpora) are not part of any stage,
the pure training and dataset modules load without Ray, and every module imports on its
own (no import cycles)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import ift

STAGES = ("ift.cli", "ift.data.pipeline", "ift.train.driver",
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


def _all_modules() -> list[str]:
    """Every module of the package but ift.__main__, which runs the CLI when imported."""
    return sorted(m.name for m in pkgutil.walk_packages(ift.__path__, "ift.")
                  if m.name != "ift.__main__")


def test_every_module_imports_first():
    """Each module imported with no other ift module loaded, as the first import of a
    process is: a cycle fails whichever of its modules is imported first. One fresh
    interpreter drops the ift modules between imports (torch and Ray stay loaded, so the
    walk takes seconds, not a fresh start of each)."""
    modules = _all_modules()
    assert "ift.train.driver" in modules and "ift.corpora.synthetic" in modules
    code = ("import importlib, sys\n"
            "failed = []\n"
            f"for m in {modules!r}:\n"
            "    for k in [k for k in sys.modules if k == 'ift' or k.startswith('ift.')]:\n"
            "        del sys.modules[k]\n"
            "    try:\n"
            "        importlib.import_module(m)\n"
            "    except Exception as e:\n"
            "        failed.append(f'{m}: {type(e).__name__}: {e}')\n"
            "print('\\n'.join(failed))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not out.stdout.strip(), f"modules that fail to import first:\n{out.stdout}"
