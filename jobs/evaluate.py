"""Evaluate a student against its teacher through mteb on local BEIR / STS folders: teacher, student and
asymmetric mode (student queries, teacher documents) at every configured Matryoshka dim and quantization.

    python jobs/evaluate.py --student runs/quickstart/student [--teacher ID_OR_PATH] [--datasets scifact ...]
                            [--out DIR] [--config configs/quickstart.yaml] [key.path=value ...]

The teacher comes from the student's leaf_manifest.json unless --teacher names one; its vectors go through
the teacher cache. Writes results.json, results.md and plots/*.png (default: <runs_root>/<name>/evaluate).
"""

import argparse
import logging
from pathlib import Path

from leaf_ray.config import DEFAULT_CONFIG, load_config
from leaf_ray.errors import run_job
from leaf_ray.evaluate import resolve_teacher
from leaf_ray.recipe import LeafRun
from leaf_ray.runtime import init_ray
from leaf_ray.storage import resolve


def main(argv=None) -> dict[str, Path | str]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", required=True, help="student directory (with leaf_manifest.json) or model id")
    parser.add_argument("--teacher", help="teacher model id or path (default: the one the student manifest names)")
    parser.add_argument("--datasets", nargs="+", help="BEIR folders, under the data root or absolute "
                                                      "(default: evaluate.datasets)")
    parser.add_argument("--out", help="output folder, a local path or an s3:// / gs:// URI "
                                      "(default: <storage.runs_root>/<name>/evaluate)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. evaluate.dims=[256,128]")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.datasets:
        cfg.evaluate.datasets = args.datasets

    teacher = resolve_teacher(Path(args.student), args.teacher, cfg.teacher)
    init_ray(cfg.ray)
    run = LeafRun(cfg)
    result = run.evaluate(args.student, teacher)

    meta = {"student": args.student, "teacher": teacher.model, "teacher_query_prompt": teacher.query_prompt,
            "teacher_document_prompt": teacher.document_prompt, "data": result.datasets, "timings_s": result.timings}
    out = (resolve(args.out, "--out", cfg.storage.endpoint_override) if args.out
           else run.folder.location / "evaluate")
    paths = run.report(out, result, f"LEAF evaluation: {args.student} vs teacher {teacher.model}", meta)
    for note in result.notes():
        print(f"note: {note}")
    for name, path in paths.items():
        print(f"{name}: {path}")
    return paths


if __name__ == "__main__":
    run_job(main)
