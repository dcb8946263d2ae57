"""bench/results/summary.md: every benchmark figure beside its baseline, as a ratio.

    python bench/summary.py [--results bench/results]

Reads the JSON files the benchmark scripts wrote (data_prepare, train_throughput,
serve_load) and writes one markdown table: the figure, ift's value, the baseline's value,
the ratio, the target and whether it was met, plus the load average each file was measured
under (a ratio taken on a busy machine says little). A benchmark without a results file is
listed as not run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
BENCHMARKS = ("data_prepare", "train_throughput", "serve_load")


def _row(bench: str, figure: str, ift: Any, baseline: Any, ratio: Any, target: str,
         met: bool | None, note: str = "") -> dict[str, Any]:
    return {"benchmark": bench, "figure": figure, "ift": ift, "baseline": baseline,
            "ratio": ratio, "target": target, "met": met, "note": note}


def data_prepare_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    sizes = doc.get("sizes") or {}
    t = doc.get("throughput_ratio_ift_over_baseline") or {}
    g = doc.get("ift_peak_rss_ratio") or {}
    big = sizes.get(str(t.get("rows")), {})
    rows = [_row("data_prepare", f"rows/s at {t.get('rows')} rows",
                 (big.get("ift") or {}).get("rows_per_s"),
                 (big.get("baseline") or {}).get("rows_per_s"),
                 t.get("value"), t.get("target", ">= 1.0"), t.get("met"))]
    small, large = (g.get("rows") or [None, None])[1], (g.get("rows") or [None, None])[0]
    rows.append(_row("data_prepare", f"ift peak RSS, {large} rows vs {small} rows (MB)",
                     ((sizes.get(str(large)) or {}).get("ift") or {}).get("peak_rss_mb"),
                     ((sizes.get(str(small)) or {}).get("ift") or {}).get("peak_rss_mb"),
                     g.get("value"), g.get("target", "<= 1.5"), g.get("met"),
                     "baseline column: ift at the smallest size"))
    return rows


def train_throughput_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    arms = doc.get("arms") or {}
    ratios = doc.get("ratios") or {}
    out = []
    for key, num, den, metric in (("a_over_b", "a", "b", "tokens_per_s"),
                                  ("a_packed_over_c", "a_packed", "c",
                                   "trainable_tokens_per_s"),
                                  ("a2_over_a", "a2", "a", "tokens_per_s"),
                                  ("a_bf16_over_a", "a_bf16", "a", "tokens_per_s")):
        r = ratios.get(key) or {}
        if num in ("a2", "a_bf16") and num not in arms:
            continue  # optional arms this run did not include
        note = f"{num} vs {den}"
        if r.get("paired_step_median") is not None:
            note += f"; paired per-step median {r['paired_step_median']}"
        if r.get("note"):
            note += "; inconclusive"
        out.append(_row("train_throughput", f"{metric} ({num} / {den})",
                        (arms.get(num) or {}).get(metric), (arms.get(den) or {}).get(metric),
                        r.get("value"), f">= {r.get('target')}", r.get("pass"), note))
    return out


def serve_load_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    def level(arm: str, c: int) -> dict[str, Any]:
        return next((x for x in doc.get(arm) or [] if x.get("concurrency") == c), {})

    targets = doc.get("targets") or {}
    top = max((x.get("concurrency", 0) for x in doc.get("serve") or []), default=32)
    s = targets.get("tokens_per_s_speedup_at_32") or {}
    p = targets.get("p50_ratio_at_1") or {}
    a = targets.get("eight_adapter_throughput_loss") or {}
    adapters = doc.get("adapters") or {}
    return [
        _row("serve_load", f"tokens/s at concurrency {top}", level("serve", top).get("tokens_per_s"),
             level("baseline", top).get("tokens_per_s"), s.get("value"), s.get("target", ">= 3"),
             s.get("met")),
        _row("serve_load", "p50 latency at concurrency 1 (s)", level("serve", 1).get("p50_s"),
             level("baseline", 1).get("p50_s"), p.get("value"), p.get("target", "<= 1.2"),
             p.get("met")),
        _row("serve_load", "tokens/s, 8 adapters vs 1 (loss)",
             (adapters.get("eight") or {}).get("tokens_per_s"),
             (adapters.get("one") or {}).get("tokens_per_s"), a.get("value"),
             a.get("target", "<= 0.2"), a.get("met"),
             "ratio column: 1 - eight/one; baseline column: one adapter"),
    ]


ROWS = {"data_prepare": data_prepare_rows, "train_throughput": train_throughput_rows,
        "serve_load": serve_load_rows}


def load_avg(doc: dict[str, Any]) -> Any:
    env = doc.get("env") or {}
    if env.get("load_avg_1m") is not None:
        return env["load_avg_1m"]
    start = (doc.get("machine") or {}).get("load_average_at_start")
    return round(start[0], 2) if start else None


def render(docs: dict[str, dict[str, Any] | None]) -> str:
    """The markdown summary of the given results (None: the benchmark was not run)."""

    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.4g}"
        return str(v)

    lines = ["# Benchmark summary", "",
             "Each figure beside its baseline, measured in the same run. Timings mean something "
             "only on an otherwise idle machine: see the load column.", "",
             "| benchmark | figure | ift | baseline | ratio | target | met | load (1 min) | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in BENCHMARKS:
        doc = docs.get(name)
        if doc is None:
            lines.append(f"| {name} | not run | - | - | - | - | - | - | no results file |")
            continue
        for r in ROWS[name](doc):
            met = r["met"]
            met_cell = "inconclusive" if met is None and r["ratio"] is not None else cell(met)
            lines.append("| " + " | ".join([
                r["benchmark"], r["figure"], cell(r["ift"]), cell(r["baseline"]),
                cell(r["ratio"]), r["target"], met_cell, cell(load_avg(doc)), r["note"],
            ]) + " |")
    lines.append("")
    for name in BENCHMARKS:
        doc = docs.get(name)
        if doc is not None:
            when = doc.get("time_utc") or "-"
            commit = ((doc.get("env") or {}).get("code_version") or "-")
            lines.append(f"- `{name}`: measured {when}, code {commit}"
                         + (" (quick smoke run)" if _quick(doc) else ""))
    return "\n".join(lines) + "\n"


def _quick(doc: dict[str, Any]) -> bool:
    return bool(doc.get("quick") or (doc.get("setup") or {}).get("quick")
                or (doc.get("settings") or {}).get("quick"))


def read_results(results_dir: Path) -> dict[str, dict[str, Any] | None]:
    docs: dict[str, dict[str, Any] | None] = {}
    for name in BENCHMARKS:
        path = results_dir / f"{name}.json"
        try:
            docs[name] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            docs[name] = None
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}: not valid JSON ({e})") from e
    return docs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(BENCH_DIR / "results"), help="results folder")
    args = p.parse_args(argv)
    results = Path(args.results)
    text = render(read_results(results))
    results.mkdir(parents=True, exist_ok=True)
    (results / "summary.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {results / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
