"""Every command answers bad input with one line, `ift <command>: ...`, naming the file,
line or field, and exit status 2; the traceback only with `ift --debug`.

Each command runs once as `python -m ift ...` on a broken input that fails before any Ray
cluster starts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_ift(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "ift", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def broken(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("broken")
    (d / "bad_list.json").write_text('[{"instruction": "x" "output": "y"},\n'
                                     '{"instruction": "a", "output": "b"}]\n')
    (d / "bad_data.yaml").write_text(
        f"storage: {{root: {d}/work}}\nmodel: {{name_or_path: {tiny_model}}}\n"
        f"data: {{output: data, sources: [{{path: {d}/bad_list.json}}]}}\n")
    (d / "no_model.yaml").write_text(
        f"storage: {{root: {d}/work}}\nmodel: {{name_or_path: {d}/no-such-model}}\n")
    (d / "syntax.yaml").write_text("data: [unclosed\n  sources: 1\n")
    return d


# (command as typed, arguments, what the one line must name)
CASES = [
    ("data prepare", ["-c", "{d}/bad_data.yaml"], "{d}/bad_list.json"),
    ("data inspect", ["{d}/nothing"], "{d}/nothing"),
    ("model init-tiny", ["--data", "{d}/nothing.jsonl", "--out", "{d}/tiny"],
     "{d}/nothing.jsonl"),
    ("train", ["-c", "{d}/no_model.yaml"], "train.data={d}/work/"),
    ("eval", ["--run", "{d}/nothing"], "{d}/nothing"),
    ("tune", ["-c", "{d}/bad_data.yaml"], "{d}/bad_list.json"),
    ("tune report", ["{d}/nothing"], "{d}/nothing"),
    ("quickstart", ["--workdir", "{d}/qs", "train.lr=fast"], "train.lr"),
    ("serve", ["-c", "{d}/no_model.yaml"], "{d}/no-such-model"),
    ("merge", ["--base", "{d}/no-such-model", "--adapter", "{d}/nothing", "--out", "{d}/m",
               "--no-mlflow"], "{d}/nothing"),
    ("predict", ["-c", "{d}/no_model.yaml", "predict.max_tokens=0"], "predict.max_tokens"),
    ("chat", ["--model-path", "{d}/no-such-model"], "{d}/no-such-model"),
    ("config", ["-c", "{d}/syntax.yaml"], "{d}/syntax.yaml: not valid YAML: line 2 column"),
]


@pytest.mark.parametrize("command,args,names", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(broken, command, args, names):
    d = str(broken)
    proc = run_ift(*command.split(), *(a.format(d=d) for a in args), cwd=broken)
    err = proc.stderr
    assert proc.returncode == 2, (proc.stdout[-2000:], err[-4000:])
    assert "Traceback" not in err, err[-4000:]
    ours = [line for line in err.splitlines() if line.startswith("ift ")]
    assert len(ours) == 1 and ours[0].startswith(f"ift {command}: "), err[-2000:]
    assert names.format(d=d) in ours[0], ours[0]


def test_debug_shows_the_traceback(broken):
    proc = run_ift("--debug", "config", "-c", str(broken / "syntax.yaml"), cwd=broken)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    assert "ConfigError" in proc.stderr


def test_lineage_of_a_missing_path_is_one_line(broken):
    # lineage keeps its own exit status 1 for chains it cannot follow (a path or a server).
    proc = run_ift("lineage", str(broken / "nothing"), "--no-mlflow", cwd=broken)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"ift lineage: {broken}/nothing")
