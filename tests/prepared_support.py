"""A minimal prepared dataset directory for tests that read one (manifest, marker and a
shard per split), written the way `ift data prepare` lays it out (ift.data.dataset)."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from ift import storage
from ift.artifacts import MANIFEST_FILE


def write_prepared(d, rows: dict[str, list[dict]] | None = None, *, complete: bool = True,
                   marker: str = "", **manifest) -> str:
    """A prepared dir at `d`: a version-2 manifest with `manifest`'s fields over the
    required ones, one parquet shard per split of `rows`, and the completion marker
    (holding `marker`) unless `complete` is False. Returns the path."""
    d = str(d)
    fields = {"version": 2, "hash": "h", "tokenizer": {}, "splits": {}, "sources": {},
              **manifest}
    storage.write_text(os.path.join(d, MANIFEST_FILE), json.dumps(fields))
    for split, split_rows in (rows or {}).items():
        os.makedirs(os.path.join(d, split), exist_ok=True)
        pq.write_table(pa.Table.from_pylist(split_rows),
                       os.path.join(d, split, "part-0.parquet"))
    if complete:
        storage.mark_complete(d, marker)
    return d
