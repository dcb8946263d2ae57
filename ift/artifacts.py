"""The on-disk artifacts: a prepared dataset, a run directory and a final model.

Every file name and constant that more than one stage reads is defined here once. A
stage that writes an artifact and a stage that reads it both spell its layout through
this module:

    prepared dataset   <dir>/manifest.json + parquet shards            (ift data prepare)
    run directory      <train.output>/<run_name>/run.json, config.yaml,
                       checkpoint_NNNNNNN/, final/                      (ift train)
    final model        adapter_config.json + adapter weights, or an HF model dir, with
                       the tokenizer, ift_lineage.json and ift_prompt_format.json
                                                                       (ift train, ift merge)

A final model records its prompt format (`PromptFormat`): the template the training data
was rendered with, the same template as jinja (the tokenizer's `chat_template`), the
end-of-turn tokens generation stops at and how a system prompt is used. Serve, eval,
predict and chat read it with `read_prompt_format`; a merged model's tokenizer carries
the jinja too, so any other server builds the same prompt.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

# ift.storage (pyarrow.fs) is imported where a path is joined or read: ift.config imports
# this module and the CLI imports ift.config; at the top it would double `ift --help`
# (0.11 s -> 0.22 s).

# ---------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------

IGNORE_INDEX = -100
"""Label of a token no loss is taken on (PyTorch's cross-entropy default)."""

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
"""ChatML turn markers."""

SAMPLE_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_data")
"""The bundled sample data, wherever ift is installed."""
SAMPLE_PREFIX = "@sample/"
"""A source path starting with this names a file under SAMPLE_DATA_DIR."""
BUNDLED_DATA = {SAMPLE_PREFIX: "sample_data", "@quickstart/": "quickstart_data"}
"""Prefix -> folder inside the ift package: the bundled data, wherever ift is installed or,
in a Ray job, unpacked with the working dir."""


def bundled_path(path: str) -> str:
    """`@sample/NAME` / `@quickstart/NAME` -> the bundled file; other paths as given."""
    for prefix, folder in BUNDLED_DATA.items():
        if path.startswith(prefix):
            return os.path.join(os.path.dirname(os.path.abspath(__file__)), folder,
                                path[len(prefix):])
    return path

MANIFEST_FILE = "manifest.json"
RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
FINAL_DIR = "final"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
"""PEFT's own adapter files, in final/ and in every adapter checkpoint."""
MODEL_CONFIG = "config.json"
"""A transformers model directory's config (a base or merged model)."""
LINEAGE_FILE = "ift_lineage.json"
PROMPT_FORMAT_FILE = "ift_prompt_format.json"
REF_LOGPS_DIR = "ref_logps"
"""Beside a prepared preference dataset: DPO reference log-probs, one folder per key
(ift.train.ref_logps)."""
REF_LOGPS_DONE = "done.json"

# A sweep's folder (ift.tune): SWEEP_FILE (the space and the parent MLflow run), TRIALS_FILE
# (status per trial), RUNS_DIR/<trial>/ (each trial's run dir, with its TRIAL_FILE).
SWEEP_FILE = "sweep.json"
TRIALS_FILE = "trials.json"
RUNS_DIR = "runs"
TRIAL_FILE = "trial.json"

SYSTEM_POLICIES = ("optional", "replaces_preamble", "template")


# ---------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------


def _join(*parts: str) -> str:
    from ift import storage

    return storage.join(*parts)


@dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset directory (local or s3://)."""

    path: str

    @property
    def manifest(self) -> str:
        return _join(self.path, MANIFEST_FILE)


@dataclass(frozen=True)
class RunDir:
    """A training run's directory: `run.json`, `config.yaml`, checkpoints and `final/`."""

    path: str

    @property
    def run_file(self) -> str:
        return _join(self.path, RUN_FILE)

    @property
    def config_file(self) -> str:
        return _join(self.path, CONFIG_FILE)

    @property
    def final(self) -> FinalModel:
        return FinalModel(_join(self.path, FINAL_DIR))


@dataclass(frozen=True)
class FinalModel:
    """A model ift wrote: an adapter (PEFT format) or a full/merged HF model dir."""

    path: str

    @property
    def adapter_config(self) -> str:
        return _join(self.path, ADAPTER_CONFIG)

    @property
    def lineage(self) -> str:
        return _join(self.path, LINEAGE_FILE)

    @property
    def prompt_format(self) -> str:
        return _join(self.path, PROMPT_FORMAT_FILE)

    def is_adapter(self) -> bool:
        from ift import storage

        return storage.exists(self.adapter_config)

    def is_model(self) -> bool:
        """A full HF model dir (its config.json)."""
        from ift import storage

        return storage.exists(_join(self.path, MODEL_CONFIG))

    def adapter_settings(self) -> dict[str, Any] | None:
        """adapter_config.json (peft_type, base_model_name_or_path, ...); None when the dir
        holds no adapter."""
        from ift import storage

        if not self.is_adapter():
            return None
        return json.loads(storage.read_text(self.adapter_config))


# ---------------------------------------------------------------------------------------
# The prompt format
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptFormat:
    """How a model's prompts are written and where its replies end, as it was trained."""

    template: str
    """The template the training data was rendered with: chatml, alpaca, human_assistant
    or tokenizer (the tokenizer's own jinja, kept in chat_template)."""
    chat_template: str
    """The same prompt as a jinja chat template (what `apply_chat_template` renders)."""
    stop_tokens: list[str] = field(default_factory=list)
    """End-of-turn tokens: generation stops at the first of them."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Their ids in the model's tokenizer."""
    system_policy: str = "optional"
    """optional: a system prompt becomes a system turn when given; replaces_preamble: a
    given system prompt replaces default_system; template: the jinja decides."""
    default_system: str = ""
    """The text in place of a system prompt when none is given (replaces_preamble)."""

    def __post_init__(self) -> None:
        if self.system_policy not in SYSTEM_POLICIES:
            raise ValueError(f"system_policy={self.system_policy!r} "
                             f"(allowed: {', '.join(SYSTEM_POLICIES)})")
        if len(self.stop_tokens) != len(self.stop_token_ids):
            raise ValueError(f"stop_tokens {self.stop_tokens} and stop_token_ids "
                             f"{self.stop_token_ids} differ in length")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "prompt format") -> PromptFormat:
        """Checked: a missing or unknown key, or a wrong type, names the key and `where`."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(known))})")
        for key in ("template", "chat_template"):
            if not isinstance(d.get(key), str) or not d[key]:
                raise ValueError(f"{where}: {key} must be a non-empty string, got {d.get(key)!r}")
        tokens, ids = d.get("stop_tokens", []), d.get("stop_token_ids", [])
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ValueError(f"{where}: stop_tokens must be a list of strings, got {tokens!r}")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                for i in ids):
            raise ValueError(f"{where}: stop_token_ids must be a list of integers, got {ids!r}")
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e


def write_prompt_format(model_dir: str, fmt: PromptFormat) -> str:
    """Write fmt into a model dir (local or s3://); returns the file's path."""
    from ift import storage

    path = _join(model_dir, PROMPT_FORMAT_FILE)
    storage.write_text(path, json.dumps(fmt.to_dict(), indent=2, ensure_ascii=False))
    return path


def read_prompt_format(model_dir: str) -> PromptFormat | None:
    """The prompt format recorded in an adapter or model dir (local or s3://); None when
    the dir has no record (a model ift did not train). A broken record is an error that
    names the file."""
    from ift import storage

    path = _join(model_dir, PROMPT_FORMAT_FILE)
    if not storage.exists(path):
        return None
    try:
        data = json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e.msg} at line {e.lineno}") from e
    return PromptFormat.from_dict(data, where=path)
