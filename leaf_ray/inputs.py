"""What a training run reads: train and validation rows with teacher vectors, from the cache or the live stream.

Nothing here gathers the mix on the driver. Validation rows are those whose id hashes below a fraction
(leaf_ray.hashing.held_out), so the split is made block by block and is the same on every rerun; only the
validation rows themselves (about `data.validation_size` of them) come to the driver, for the workers to
evaluate on.
In cache mode training streams the cache's parquet parts through Ray Data (every epoch re-reads them, nothing is
re-embedded) in a block order reshuffled each epoch; in stream mode the teacher actors' output feeds the workers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from leaf_ray.config import RunConfig
from leaf_ray.errors import LeafRayError
from leaf_ray.hashing import held_out
from leaf_ray.runs import RunFolder
from leaf_ray.runtime import DATA_TASK_CPUS

if TYPE_CHECKING:  # importing torch would cost every Ray Data worker that runs `_side` seconds per epoch
    from leaf_ray.student import TeacherRows


class InputsError(LeafRayError, ValueError):
    """Training inputs that cannot be made; the message names the config field."""


@dataclass
class TrainingInputs:
    train: object  # a Ray Dataset of (id, text, kind, embedding) rows: the cache's parts, or the teacher's stream
    val: pa.Table | TeacherRows  # held-out rows with teacher vectors
    teacher_dim: int
    train_rows: int

    @classmethod
    def in_memory(cls, train: pa.Table, val: pa.Table | TeacherRows, teacher_dim: int, seed: int = 0) -> TrainingInputs:
        """Inputs from a table of cached rows (small sets, tests, benchmarks), shuffled with `seed` and put in the
        object store."""
        from leaf_ray.teacher.stage import as_dataset

        shuffled = train.take(np.random.default_rng(seed).permutation(len(train)))
        return cls(as_dataset(shuffled), val, teacher_dim, len(train))


def validation_fraction(size: int, rows: int) -> float:
    """The share of ids held out for `size` validation rows (at most a tenth of the mix)."""
    return min(size, max(rows // 10, 1)) / rows if size > 0 and rows else 0.0


def _side(batch: dict, fraction: float, seed: int, validation: bool) -> dict:
    mask = held_out([str(i) for i in batch["id"]], fraction, seed)
    return {name: column[mask if validation else ~mask] for name, column in batch.items()}


def split_by_id(ds, fraction: float, seed: int):
    """(train, validation) halves of a Ray Dataset, by a seeded hash of each row's id: lazy, distributed."""
    def half(validation: bool):
        return ds.map_batches(_side, fn_kwargs={"fraction": fraction, "seed": seed, "validation": validation},
                              batch_format="numpy", num_cpus=DATA_TASK_CPUS)

    return half(False), half(True)


def collect(ds) -> pa.Table:
    """A small Dataset as one table (the validation rows)."""
    import ray

    tables = [t for t in ray.get(ds.to_arrow_refs()) if len(t)]
    return pa.concat_tables(tables) if tables else ds.schema().base_schema.empty_table()


def reshuffled_each_epoch(ds, seed: int):
    """A materialised `ds` in a block order that is seeded but new on every execution: Ray Train runs the dataset
    once per epoch, so each epoch sees the blocks in another order (rows within a block keep theirs; the workers'
    local shuffle buffer mixes them)."""
    from ray.data import RandomSeedConfig

    return ds.randomize_block_order(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))


def training_inputs(cfg: RunConfig, texts) -> TrainingInputs:
    """Split the text mix (a Ray Dataset or table of text rows) into train/validation by id hash and attach
    teacher vectors: `train.mode: cache` embeds the whole mix into the reusable cache and streams its parts;
    `stream` caches only the validation rows and streams the training rows through the teacher actors while
    the workers train. An unwritable run folder or cache root fails here, before the teacher stage, not after it."""
    from leaf_ray.teacher import build_cache, embed_dataset
    from leaf_ray.teacher.stage import as_dataset

    RunFolder(cfg).check_writable()
    cache_root, models, seed = cfg.storage.cache_location(), cfg.model_store(), cfg.data.seed
    rows = len(texts) if isinstance(texts, pa.Table) else texts.count()
    fraction = validation_fraction(cfg.data.validation_size, rows)
    if cfg.train.mode == "cache":
        # Parts hold random samples of the mix in random row order, read in a new part order each epoch; the
        # workers' local shuffle buffer mixes rows across the parts in flight.
        cache = build_cache(texts, cfg.teacher, cache_root, models)
        train, val = split_by_id(cache.dataset(shuffle_seed=cfg.train.seed), fraction, seed)
        val = collect(val)
        return TrainingInputs(train, val, cache.dim, cache.manifest["rows"] - len(val))
    train_texts, val_texts = split_by_id(reshuffled_each_epoch(as_dataset(texts), cfg.train.seed), fraction, seed)
    val_cache = build_cache(val_texts, cfg.teacher, cache_root, models)
    if val_cache.dim is None:
        raise InputsError(f"train.mode: stream learns the teacher's dimension from the validation rows, and none of "
                          f"the {rows} rows was held out; raise data.validation_size")
    stream = embed_dataset(train_texts, cfg.teacher, models)
    return TrainingInputs(stream, val_cache.read_table(), val_cache.dim, rows - val_cache.manifest["rows"])


def split_table(table: pa.Table, size: int, seed: int) -> tuple[pa.Table, pa.Table]:
    """(train, validation) of an in-memory table by the same id-hash rule as `split_by_id`."""
    mask = held_out(table.column("id").to_pylist(), validation_fraction(size, len(table)), seed)
    return table.filter(pa.array(~mask)), table.filter(pa.array(mask))
