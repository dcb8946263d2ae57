"""`ift config`: the resolved configuration, every field with its docstring."""

from __future__ import annotations

import yaml

from ift.config import describe, load_config


def config_cmd(args) -> int:
    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True))
    print("# fields")
    for key, default, doc in describe():
        print(f"# {key} (default {default}): {doc}")
    return 0
