"""`ift data inspect DIR`: the manifest summary and decoded samples with trained spans marked."""

from __future__ import annotations

import itertools
import sys

import numpy as np

from ift import storage
from ift.data.dataset import PrepareError, iter_split_rows, read_manifest
from ift.models import load_tokenizer

TRAIN_OPEN, TRAIN_CLOSE = "\u27e6", "\u27e7"  # ⟦ trained ⟧ when the terminal has no colour
GREEN, RESET = "\x1b[32m", "\x1b[0m"


def summary(manifest: dict) -> str:
    """A plain-text table of the manifest: sources, splits, padding waste, rejects."""
    lines = [
        f"prepared dataset  hash {manifest['hash'][:16]}  template {manifest.get('template')}  "
        f"max_seq_len {manifest.get('max_seq_len')}  packed {manifest.get('packed')}",
        f"tokenizer         {manifest['tokenizer'].get('name_or_path')} "
        f"(vocab {manifest['tokenizer'].get('vocab_size')}, sha {manifest['tokenizer']['sha256'][:12]})",
        "",
        f"{'source':<24}{'read':>9}{'kept':>9}{'reject':>8}{'dup':>7}{'drop':>6}{'sampled':>9}{'val':>6}  tags",
    ]
    for name, s in manifest["sources"].items():
        lines.append(
            f"{name[:23]:<24}{s.get('rows_read', 0):>9}{s.get('rows_kept', 0):>9}"
            f"{s.get('rows_rejected', 0):>8}{s.get('rows_duplicate', 0):>7}{s.get('rows_dropped', 0):>6}"
            f"{s.get('rows_sampled', 0):>9}{s.get('rows_val', 0):>6}  {','.join(s.get('tags', []))}"
        )
    lines.append("")
    lines.append(f"{'split':<8}{'rows':>9}{'samples':>9}{'tokens':>11}{'trainable':>11}"
                 f"{'mean':>8}{'p50':>7}{'p95':>7}{'max':>6}")
    for split, s in manifest["splits"].items():
        ln = s["length"]
        lines.append(f"{split:<8}{s['rows']:>9}{s['samples']:>9}{s['tokens']:>11}"
                     f"{s['trainable_tokens']:>11}{ln['mean']:>8.1f}{ln['p50']:>7.0f}"
                     f"{ln['p95']:>7.0f}{ln['max']:>6}")
    pw = manifest.get("padding_waste", {})
    packed = pw.get("packed")
    lines.append("")
    lines.append(f"padding waste: unpacked {pw.get('unpacked', 0):.1%}"
                 + (f", packed {packed:.1%}" if packed is not None else " (packing off)"))
    rj = manifest.get("rejects", {})
    if rj.get("total"):
        lines.append(f"rejected rows: {rj['total']} (see {', '.join(rj.get('files', []))})")
    return "\n".join(lines)


def mark_trained(tokenizer, input_ids: list[int], labels: list[int], color: bool = False) -> str:
    """Decode a sample, wrapping each run of trained tokens (label != -100) in markers."""
    op, cl = (GREEN, RESET) if color else (TRAIN_OPEN, TRAIN_CLOSE)
    out, run, trained = [], [], None
    for tid, lab in zip(input_ids, labels):
        t = lab != -100
        if trained is not None and t != trained:
            text = tokenizer.decode(run, skip_special_tokens=False)
            out.append(f"{op}{text}{cl}" if trained else text)
            run = []
        run.append(tid)
        trained = t
    if run:
        text = tokenizer.decode(run, skip_special_tokens=False)
        out.append(f"{op}{text}{cl}" if trained else text)
    return "".join(out)


def inspect_cmd(args) -> int:
    try:
        manifest = read_manifest(args.dir)
    except PrepareError as e:
        print(f"ift data inspect: {e}", file=sys.stderr)
        return 2
    print(summary(manifest))
    tok_name = args.tokenizer or manifest["tokenizer"]["name_or_path"]
    tokenizer = load_tokenizer(storage.local_copy(tok_name))
    rows = itertools.islice(iter_split_rows(args.dir, args.split), max(args.num_samples, 0))
    color = sys.stdout.isatty()
    for i, row in enumerate(rows):
        ids, labels = row["input_ids"], row["labels"]
        trained = int(np.sum(np.array(labels) != -100))
        print(f"\n--- {args.split} sample {i}: id {row['id']}  source {row['source']}  "
              f"{len(ids)} tokens, {trained} trained "
              f"{'(green)' if color else f'(inside {TRAIN_OPEN} {TRAIN_CLOSE})'}")
        print(mark_trained(tokenizer, ids, labels, color=color))
    return 0
