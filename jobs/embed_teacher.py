"""Embed the configured text mix with the teacher into the parquet cache (reused by later jobs).

    python jobs/embed_teacher.py [--config configs/quickstart.yaml] [key.path=value ...]
"""

import logging

from leaf_ray.config import parse_args
from leaf_ray.errors import run_job
from leaf_ray.recipe import LeafRun
from leaf_ray.runtime import init_ray


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg, _ = parse_args(argv, description=__doc__)
    run = LeafRun(cfg)
    init_ray(cfg.ray)
    texts, report = run.text_mix()
    print(f"text mix: {report.as_dict()}")
    cache = run.teacher_cache(texts)
    print(f"teacher cache: {cache.path}  ({cache.manifest['rows']} rows, dim {cache.dim}, "
          f"last run {cache.manifest.get('last_run')})")


if __name__ == "__main__":
    run_job(main)
