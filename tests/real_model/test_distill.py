"""The quickstart's self-distilled general data is what the base model answers."""

from __future__ import annotations

import json
from pathlib import Path


def test_bundled_general_data_is_the_base_models_own_answers(smollm2):
    """The first bundled rows again from the imported model (fp32, greedy): the same text."""
    from ift.corpora.distill import GENERAL_PROMPTS, self_distill
    from ift.corpora.synthetic import quickstart_data_dir

    bundled = json.loads((Path(quickstart_data_dir()) / "general.json")
                         .read_text(encoding="utf-8"))[:2]
    accepted = dict(GENERAL_PROMPTS)
    again = self_distill(smollm2, [(r["instruction"], accepted[r["instruction"]])
                                   for r in bundled])
    assert again == bundled
