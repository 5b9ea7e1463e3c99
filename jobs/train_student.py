"""Distil the configured teacher into a student: text mix -> teacher vectors (cache or live stream) ->
Ray Train DDP -> exported student. Rerunning the same config resumes the run from its latest checkpoint.

    python jobs/train_student.py [--config configs/quickstart.yaml] [key.path=value ...]
"""

import logging

from leaf_ray.config import parse_args
from leaf_ray.errors import run_job
from leaf_ray.recipe import LeafRun
from leaf_ray.runtime import init_ray
from leaf_ray.tracking import metric_values


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg, _ = parse_args(argv, description=__doc__)
    run = LeafRun(cfg)
    init_ray(cfg.ray)
    texts, report = run.text_mix()
    print(f"text mix: {report.as_dict()}")
    result = run.train(run.inputs(texts))
    if run.tracked is not None:
        run.tracked.finish(metric_values(result.metrics), student=result.student_path)
    print(f"student: {run.folder.location / 'student'}\n  steps {result.steps}, {result.samples_per_s:.1f} samples/s, "
          f"val cosine {result.metrics.get('val_cosine', float('nan')):.4f}\n  progress log: {result.history_path}")
    return result


if __name__ == "__main__":
    run_job(main)
