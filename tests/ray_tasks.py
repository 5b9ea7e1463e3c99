"""Functions the tests hand to Ray tasks. Every worker that runs a task, and every actor that deserializes a
dataset holding one, imports the function's module: here that costs nothing, where a test module would import
torch and sentence-transformers into each of those processes."""

from __future__ import annotations

import time


def held_back(batch: dict, late_id: str) -> dict:
    """Finishes the block holding `late_id` last, as a slow read task on a busy node would."""
    if late_id in batch["id"]:
        time.sleep(3)
    return batch
