"""Search spaces as plain data: expanding `tune.space` into trial points, and the mixture
each point trains on. No Ray here.

`tune.space` maps axes to values:

    space:
      train.lr: [1.0e-4, 3.0e-4]              # grid: a list of values
      peft.r: [8, 16]
      mix.alpaca_en: [0.5, 1.0]               # a source's sampling weight
      exclude_tags: [[], [cot], [zh]]         # ablation arms: drop sources by tag
      include_tags: [[en], [en, cot]]         # or keep only sources with a tag
      train.warmup_ratio: {min: 0.0, max: 0.1}            # random search: uniform
      train.lr: {min: 1.0e-5, max: 1.0e-3, log: true}     # random search: log-uniform
      peft.r: {values: [4, 8, 16]}                        # random search: a choice

Any dotted config key is an axis (train.lr, train.epochs, peft.method, peft.r, peft.alpha,
peft.dropout, ...); `mix.<source>`, `exclude_tags` and `include_tags` are the mixture axes.
Grid search takes the cartesian product of lists (in the order the axes are written),
repeated `num_samples` times; random search draws `num_samples` points, deterministically
from the sweep name. Every point is trained once per seed in `tune.seeds` (train.seed).
"""

from __future__ import annotations

import itertools
import json
import math
import random
from typing import Any

from ift.config import ConfigError, TuneConfig, apply_override, build_config
from ift.data import mix

MIX_PREFIX = "mix."
TAG_AXES = ("exclude_tags", "include_tags")
# Keys a point may not set: the sweep owns them.
RESERVED = ("train.seed", "train.run_name", "train.output", "train.data")


def is_mixture_axis(key: str) -> bool:
    return key.startswith(MIX_PREFIX) or key in TAG_AXES


def _is_range(value: Any) -> bool:
    return isinstance(value, dict) and ("min" in value or "max" in value)


def _check_axes(space: dict[str, Any], search: str) -> None:
    for key, value in space.items():
        where = f"tune.space.{key}"
        if key in RESERVED:
            raise ConfigError(f"{where}: {key} is set by the sweep itself (seeds come from "
                              "tune.seeds); remove this axis")
        if key.startswith(MIX_PREFIX) and not key[len(MIX_PREFIX):]:
            raise ConfigError(f"{where}: name a source, e.g. mix.alpaca_en")
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"{where}: empty list of values")
            if key in TAG_AXES and not all(isinstance(v, list) for v in value):
                raise ConfigError(f"{where}={value!r}: expected a list of tag lists, "
                                  "e.g. [[], [cot]]")
            continue
        if isinstance(value, dict):
            if search == "grid":
                raise ConfigError(f"{where}={value!r}: grid search needs a list of values "
                                  "(ranges and choices are for tune.search=random)")
            if "values" in value:
                if not isinstance(value["values"], list) or not value["values"]:
                    raise ConfigError(f"{where}.values: expected a non-empty list")
                continue
            if not _is_range(value) or "min" not in value or "max" not in value:
                raise ConfigError(f"{where}={value!r}: expected {{min, max[, log, int]}} "
                                  "or {values: [...]}")
            lo, hi = value["min"], value["max"]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       for v in (lo, hi)) or lo > hi:
                raise ConfigError(f"{where}: need numbers with min <= max, got {lo!r}, {hi!r}")
            if value.get("log") and lo <= 0:
                raise ConfigError(f"{where}: log ranges need min > 0, got {lo!r}")
            extra = set(value) - {"min", "max", "log", "int"}
            if extra:
                raise ConfigError(f"{where}: unknown key(s) {sorted(extra)} "
                                  "(allowed: min, max, log, int)")
            continue
        raise ConfigError(f"{where}={value!r}: expected a list of values"
                          + (" or a {min, max} range" if search == "random" else ""))


def _draw(rng: random.Random, value: Any) -> Any:
    if isinstance(value, list):
        return value[rng.randrange(len(value))]
    if "values" in value:
        return value["values"][rng.randrange(len(value["values"]))]
    lo, hi = float(value["min"]), float(value["max"])
    x = math.exp(rng.uniform(math.log(lo), math.log(hi))) if value.get("log") \
        else rng.uniform(lo, hi)
    if value.get("int"):
        return int(round(x))
    return float(f"{x:.6g}")  # readable in tables and run names


def expand(tune: TuneConfig) -> list[dict[str, Any]]:
    """The sweep's trial points, in a stable order: each {index, name, params, seed}.

    `params` maps axis -> value (dotted config keys and mixture axes); `name` is
    `t<index>` (stable across resumes: it names the trial's run directory).
    """
    space = dict(tune.space)
    _check_axes(space, tune.search)
    if not tune.seeds:
        raise ConfigError("tune.seeds: list at least one seed")
    if len(set(tune.seeds)) != len(tune.seeds):
        raise ConfigError(f"tune.seeds={tune.seeds}: seeds repeat")
    if tune.num_samples < 1:
        raise ConfigError(f"tune.num_samples={tune.num_samples}: must be >= 1")
    keys = list(space)
    combos: list[dict[str, Any]] = []
    if tune.search == "grid":
        grid = [dict(zip(keys, values)) for values in itertools.product(*(space[k] for k in keys))]
        for _ in range(tune.num_samples):
            combos.extend(dict(c) for c in grid)
    else:
        rng = random.Random(f"ift-tune-{tune.name}")
        for _ in range(tune.num_samples):
            combos.append({k: _draw(rng, space[k]) for k in keys})
    points = []
    for params in combos:
        for seed in tune.seeds:
            i = len(points)
            points.append({"index": i, "name": f"t{i:03d}", "params": params, "seed": int(seed)})
    return points


def split_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config overrides by dotted key, mixture axes) of a point's params."""
    overrides = {k: v for k, v in params.items() if not is_mixture_axis(k)}
    mixture = {k: v for k, v in params.items() if is_mixture_axis(k)}
    return overrides, mixture


def _yaml_scalar(value: Any) -> str:
    # JSON is valid YAML flow syntax: lists, numbers, strings and booleans replay exactly.
    return json.dumps(value)


def trial_config(base: dict[str, Any], point: dict[str, Any],
                 sets: dict[str, Any] | None = None):
    """The Config of one trial: the sweep's config (as a dict) with the point's overrides,
    its seed as train.seed, and `sets` (dotted key -> value) on top."""
    raw = json.loads(json.dumps(base))  # a deep copy that stays plain data
    overrides, _ = split_params(point["params"])
    items = {**overrides, "train.seed": point["seed"], **(sets or {})}
    for key, value in items.items():
        apply_override(raw, f"{key}={_yaml_scalar(value)}")
    try:
        return build_config(raw)
    except ConfigError as e:
        raise ConfigError(f"trial {point['name']} ({describe(point)}): {e}") from e


def mixture_request(point: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of `ift.data.pipeline.remix` for a point: weights by source,
    include_tags and exclude_tags (None where the point does not set them)."""
    _, mixture = split_params(point["params"])
    weights = {k[len(MIX_PREFIX):]: (None if v is None else float(v))
               for k, v in mixture.items() if k.startswith(MIX_PREFIX)}
    return {
        "weights": weights or None,
        "include_tags": list(mixture["include_tags"]) if "include_tags" in mixture else None,
        "exclude_tags": list(mixture["exclude_tags"]) if "exclude_tags" in mixture else None,
    }


def mixture_sources(sources: dict[str, dict[str, Any]], request: dict[str, Any]
                    ) -> dict[str, dict[str, Any]]:
    """Which prepared sources a mixture keeps and with what weight or count.

    `sources` is a prepared manifest's `sources` block (name -> {tags, weight, count, ...});
    the rules are `ift.data.mix.select`'s, which `ift.data.pipeline.remix` applies too.
    Raises ConfigError for an unknown
    source or a mixture that keeps nothing or gives every kept source weight 0.
    """
    weights = dict(request.get("weights") or {})
    include = request.get("include_tags") or []
    exclude = request.get("exclude_tags") or []
    unknown = sorted(set(weights) - set(sources))
    if unknown:
        raise ConfigError(f"tune.space: mix.{unknown[0]} names no prepared source "
                          f"(sources: {', '.join(sorted(sources))})")
    kept = {name: {"weight": w, "count": c} for name, (w, c) in mix.select(
        sources, weights=weights, include_tags=include, exclude_tags=exclude).items()}
    if not kept:
        raise ConfigError(f"the mixture include_tags={include or None} "
                          f"exclude_tags={exclude or None} keeps none of the sources "
                          f"{ {n: s.get('tags') for n, s in sources.items()} }")
    if all(v["weight"] == 0 or v["count"] == 0 for v in kept.values()):
        raise ConfigError(f"the mixture {request} gives every kept source weight 0")
    return kept


def describe(point: dict[str, Any]) -> str:
    """A short label: axis=value pairs and the seed."""
    parts = [f"{k}={_short(v)}" for k, v in point["params"].items()]
    parts.append(f"seed={point['seed']}")
    return " ".join(parts)


def group_key(point: dict[str, Any]) -> str:
    """What a point is apart from its seed (points differing only by seed share it)."""
    return " ".join(f"{k}={_short(v)}" for k, v in point["params"].items()) or "(base)"


def _short(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(_short(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def varying_axes(points: list[dict[str, Any]]) -> list[str]:
    """Axes whose value differs between points (the ones worth a plot), in axis order."""
    axes: list[str] = []
    for p in points:
        for k in p["params"]:
            if k not in axes:
                axes.append(k)
    return [k for k in axes
            if len({json.dumps(p["params"].get(k), sort_keys=True) for p in points}) > 1]
