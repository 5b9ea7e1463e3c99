"""LEAF end to end as one Ray job: teacher stage -> training -> evaluation -> export -> report.

    python jobs/distill.py [--config configs/quickstart.yaml] [key.path=value ...]
    ray job submit --working-dir . -- python jobs/distill.py --config configs/leaf-ir-cpu.yaml

With no running cluster named (ray.address / RAY_ADDRESS) it starts a local Ray instance. Rerunning a
run name reuses the teacher cache and resumes training from the last checkpoint; a finished run is
never overwritten.
"""

import logging

from leaf_ray.bench import measure_encoders
from leaf_ray.config import parse_args
from leaf_ray.data import build_mix
from leaf_ray.errors import run_job
from leaf_ray.evaluate import beir_dataset, build_sources, run_evaluation
from leaf_ray.inputs import training_inputs
from leaf_ray.models import load_sentence_transformer
from leaf_ray.report import headline, write_report
from leaf_ray.runs import RunFolder
from leaf_ray.runtime import init_ray
from leaf_ray.student import read_manifest, update_manifest
from leaf_ray.train import train_student


def serving_throughput(cfg, student_path) -> dict:
    """Teacher vs leaf docs/s, queries/s and batch-1 latency on a sample of the first eval dataset."""
    n = cfg.evaluate.throughput_samples
    if not n or not cfg.evaluate.datasets:
        return {}
    sample = beir_dataset(cfg.data, cfg.evaluate.datasets[0], cfg.evaluate.split, max_corpus=n, max_queries=n)
    encoders = {"teacher": load_sentence_transformer(cfg.teacher.model, cfg.storage.local_cache_path(),
                                                     max_length=cfg.teacher.max_length, allow_hub=cfg.allow_hub),
                "student": load_sentence_transformer(str(student_path))}
    return measure_encoders(encoders, sample.query_texts, sample.corpus_texts[:n],
                            latency_queries=min(50, n))


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    cfg, _ = parse_args(argv, description=__doc__)
    run = RunFolder(cfg)
    run.refuse_if_finished()
    run.check_writable()
    init_ray(cfg.ray)

    with run.stage("teacher"):
        texts, mix = build_mix(cfg.data)
        inputs = training_inputs(cfg, texts)
    with run.stage("train"):
        trained = train_student(cfg, inputs)
    with run.stage("evaluate"):
        sources = build_sources(str(trained.student_path), cfg.teacher, cfg.storage.local_cache_path(),
                                cfg.evaluate.batch_size, cfg.allow_hub, teacher_cache=cfg.storage.cache_location())
        evaluation = run_evaluation(cfg.evaluate, sources, cfg.data)
    with run.stage("throughput"):
        speed = serving_throughput(cfg, trained.student_path)

    manifest = read_manifest(trained.student_path)
    student = run.location / "student"
    summary = {"run": cfg.name, "student": str(student), "params": manifest.get("param_counts"),
               "text_mix": mix.as_dict(), "train": trained.metrics, "throughput": speed,
               "stage_seconds": run.stage_seconds, "headline": headline(evaluation.records)}
    update_manifest(trained.student_path, results=summary)
    run.publish("student/leaf_manifest.json")
    paths = write_report(run.location, evaluation.records, f"LEAF run {cfg.name}: {cfg.teacher.model} -> leaf",
                         summary, evaluation.notes(), plot_metrics=("ndcg_at_10", "cosine_spearman"))
    run.mark_finished(summary)

    print(f"\n[leaf] run {cfg.name} finished; stages (s): {run.stage_seconds}")
    print(f"[leaf] student:  {student}")
    print(f"[leaf] report:   {paths['markdown']}\n[leaf] results:  {paths['json']}")
    for line in summary["headline"]:
        print(f"[leaf] {line}")
    return summary


if __name__ == "__main__":
    run_job(main)
