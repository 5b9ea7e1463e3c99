"""Sweep students (size, kind, learning rate, ...) with Ray Tune against one teacher cache, and report the
Pareto front of validation quality vs speed vs bytes per vector, with test scores of the students on it.

    python jobs/sweep.py --config configs/sweep.yaml [key.path=value ...]

Rerunning the same command after an interruption continues the sweep (finished trials are kept); a
finished sweep is never overwritten. See leaf_ray/sweep/__init__.py for the layout of `<runs_root>/<name>/`.
"""

import logging

from leaf_ray.config import parse_args
from leaf_ray.errors import run_job
from leaf_ray.recipe import LeafRun
from leaf_ray.sweep import (
    FRONT_DIR,
    SweepInterrupted,
    absolute_paths,
    export_front,
    front_of,
    measure_speed,
    pin_config,
    run_trials,
    sweep_points,
    teacher_validation,
    write_sweep_report,
)
from leaf_ray.tracking import metric_values


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    cfg, _ = parse_args(argv, description=__doc__)
    cfg = absolute_paths(cfg)
    run = LeafRun(cfg).start(before_ray=pin_config)

    with run.stage("teacher"):  # the only stage that runs the teacher: trials read its caches
        texts, mix = run.text_mix()
        inputs = run.inputs(texts)
        reference = teacher_validation(cfg)
    with run.stage("tune"):
        try:
            trials, leftover = run_trials(cfg, inputs)
        except SweepInterrupted as exc:
            raise SystemExit(f"[leaf] {exc}") from None
    with run.stage("throughput"):
        speed = measure_speed(run, trials)
    points = sweep_points(cfg, trials, speed)
    front = front_of(points)
    with run.stage("test"):
        tested = export_front(run, trials, points, front if cfg.sweep.test_scores == "front" else range(len(points)),
                              speed)

    meta = {"teacher": cfg.teacher.model, "text_mix": mix.as_dict(), "trials": len(trials),
            "evaluated": sum(t["status"] == "evaluated" for t in trials),
            "pareto_students": len({points[i]["trial_id"] for i in front}), "tested_students": len(tested),
            "placement_groups_left": leftover, "stage_seconds": run.stage_seconds}
    paths = write_sweep_report(cfg, trials, reference, speed, points, front, tested, meta)
    if run.tracked is not None:
        run.tracked.end_children()
        run.tracked.finish(metric_values(meta), {"meta": meta, "trials": trials})
    run.folder.mark_finished(meta)
    print(f"\n[leaf] sweep {cfg.name} finished; stages (s): {run.stage_seconds}")
    print(f"[leaf] report:  {paths['markdown']}\n[leaf] Pareto:  {paths['plot']}")
    for trial in tested:
        print(f"[leaf] Pareto-optimal student: {run.folder.path / FRONT_DIR / trial / 'student'}")
    return meta


if __name__ == "__main__":
    run_job(main)
