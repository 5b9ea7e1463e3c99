"""LEAF end to end as one Ray job: teacher stage -> training -> evaluation -> export -> report.

    python jobs/distill.py [--config configs/quickstart.yaml] [key.path=value ...]
    ray job submit --working-dir . -- python jobs/distill.py --config configs/leaf-ir-cpu.yaml

With no running cluster named (ray.address / RAY_ADDRESS) it starts a local Ray instance. Rerunning a
run name reuses the teacher cache and resumes training from the last checkpoint; a finished run is
never overwritten.
"""

import logging

from leaf_ray.config import parse_args
from leaf_ray.errors import run_job
from leaf_ray.recipe import LeafRun
from leaf_ray.report import headline
from leaf_ray.student import read_manifest


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    cfg, _ = parse_args(argv, description=__doc__)
    run = LeafRun(cfg).start()

    with run.stage("teacher"):
        texts, mix = run.text_mix()
        inputs = run.inputs(texts)
    with run.stage("train"):
        trained = run.train(inputs)
    with run.stage("evaluate"):
        evaluation = run.evaluate(trained.student_path)
    with run.stage("throughput"):
        speed = run.throughput({"student": trained.student_path})

    manifest = read_manifest(trained.student_path)
    student = run.folder.location / "student"
    summary = {"run": cfg.name, "student": str(student), "params": manifest.get("param_counts"),
               "text_mix": mix.as_dict(), "train": trained.metrics, "throughput": speed,
               "stage_seconds": run.stage_seconds, "headline": headline(evaluation.records)}
    paths = run.finish(evaluation, f"LEAF run {cfg.name}: {cfg.teacher.model} -> leaf", summary)

    print(f"\n[leaf] run {cfg.name} finished; stages (s): {run.stage_seconds}")
    print(f"[leaf] student:  {student}")
    if "asymmetric" in paths:
        print(f"[leaf] asym:     {paths['asymmetric']}")
    print(f"[leaf] report:   {paths['markdown']}\n[leaf] results:  {paths['json']}")
    for line in summary["headline"]:
        print(f"[leaf] {line}")
    return summary


if __name__ == "__main__":
    run_job(main)
