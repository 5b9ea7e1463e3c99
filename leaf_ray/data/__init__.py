"""Text sources -> one seeded, deduplicated mix of `{id, text, kind}` rows, as a materialized Ray Dataset.

The readers (`sources`) and the mix (`mix`) both run on Ray Data, so the driver never holds the texts; this
module re-exports their public names.
"""

from __future__ import annotations

from leaf_ray.data.mix import MixReport, build_mix, read_sources
from leaf_ray.data.sources import (KINDS, SCHEMA, DataError, Fields, parse_json_lines, read_beir_corpus,
                                   read_jsonl)

__all__ = ["KINDS", "SCHEMA", "DataError", "Fields", "MixReport", "build_mix", "parse_json_lines",
           "read_beir_corpus", "read_jsonl", "read_sources"]
