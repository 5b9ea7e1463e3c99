"""A LEAF run as one recipe object: set up once from a RunConfig, then the stages the jobs are made of (text mix
-> teacher vectors and training inputs -> training -> vector sources and evaluation -> serving throughput ->
export, report, finish), each a call into the module that owns it.

The jobs read top to bottom over these methods, and the sweep and its trials call the same ones, so each step has
one implementation and one place that says which run folder, model store and caches it uses (torchtune's recipe
shape: setup, stages, finish).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from leaf_ray.bench import measure_encoders
from leaf_ray.config import RunConfig, TeacherConfig
from leaf_ray.data import build_mix
from leaf_ray.evaluate import (EvaluationResult, VectorSource, beir_dataset, build_sources, run_evaluation,
                               student_prompts)
from leaf_ray.inputs import TrainingInputs, training_inputs
from leaf_ray.progress import bars_shown
from leaf_ray.report import write_report
from leaf_ray.runs import RunFolder
from leaf_ray.runtime import init_ray
from leaf_ray.teacher import TeacherCache, build_cache
from leaf_ray.tracking import TrackedRun, score_metrics

if TYPE_CHECKING:  # torch and sentence-transformers: imported by the stages that need them (not embed_teacher.py)
    from leaf_ray.train import TrainResult

PLOT_METRICS = ("ndcg_at_10", "cosine_spearman")  # a report's plots: retrieval and STS quality against dims


class LeafRun:
    """The config, its run folder and its model store, and the stages over them."""

    def __init__(self, cfg: RunConfig, tracking_parent: str | None = None):
        """`tracking_parent`: the run folder whose MLflow run this run's is nested under (a sweep's trials)."""
        self.cfg = cfg
        self.models = cfg.model_store()
        self.tracking_parent = tracking_parent

    @cached_property
    def folder(self) -> RunFolder:
        """Built when first used: resolving an object-store runs_root may reach the store, which
        jobs/evaluate.py with --out never needs."""
        return RunFolder(self.cfg)

    def start(self, before_ray: Callable[[RunConfig], None] | None = None) -> LeafRun:
        """Fail before any work on what would fail after it: a finished run (never overwritten) or a run folder
        or cache root that cannot be written; `before_ray` checks more (a sweep pins its config). Then start or
        join Ray."""
        self.folder.refuse_if_finished()
        self.folder.check_writable()
        if self.tracked is not None:  # opened now: a missing MLflow or a refusing store fails before any work
            print(f"[leaf] MLflow: run {self.tracked.run_id} in experiment {self.cfg.tracking.experiment!r}")
        if before_ray is not None:
            before_ray(self.cfg)
        init_ray(self.cfg.ray)
        return self

    @cached_property
    def tracked(self) -> TrackedRun | None:
        """The run folder's MLflow run (leaf_ray.tracking) when `tracking.mlflow` is on."""
        if not self.cfg.tracking.mlflow:
            return None
        return TrackedRun(self.cfg, str(self.folder.location), self.tracking_parent)

    def stage(self, name: str):
        """A context that times a stage of the job and says when it starts and ends."""
        return self.folder.stage(name)

    @property
    def stage_seconds(self) -> dict[str, float]:
        return self.folder.stage_seconds

    # -- the stages ------------------------------------------------------------------------------------------

    def text_mix(self):
        """The configured text mix (a Ray Dataset of text rows) and its MixReport."""
        return build_mix(self.cfg.data)

    def teacher_cache(self, texts) -> TeacherCache:
        """The complete teacher cache of `texts`, computing only its missing chunks."""
        return build_cache(texts, self.cfg.teacher, self.cfg.storage.cache_location(), self.models)

    def inputs(self, texts) -> TrainingInputs:
        """Train and validation rows of `texts` with teacher vectors (leaf_ray.inputs): the teacher stage."""
        return training_inputs(self.cfg, texts)

    def train(self, inputs: TrainingInputs, callbacks=()) -> TrainResult:
        """Train (or resume) the run's student on `inputs` and export it into the run folder."""
        from leaf_ray.train import train_student

        return train_student(self.cfg, inputs, callbacks=callbacks,
                             tracking=self.tracked.target if self.tracked else None)

    def sources(self, student: Path | str, teacher: TeacherConfig | None = None) -> dict[str, VectorSource]:
        """Vector sources of `student` (a directory or model id) and of `teacher` (default: the run's), the
        teacher's through the run's teacher cache."""
        return build_sources(str(student), teacher or self.cfg.teacher, self.cfg.storage.cache_location(),
                             self.models, self.cfg.evaluate.batch_size)

    def evaluate(self, student: Path | str, teacher: TeacherConfig | None = None,
                 progress: bool | None = None) -> EvaluationResult:
        """The evaluate section's datasets, modes, dims and quantizations for `student` against `teacher`, with
        progress bars (`progress`) by default on a terminal only."""
        return run_evaluation(self.cfg.evaluate, self.sources(student, teacher), self.cfg.data,
                              progress=bars_shown(progress))

    def throughput(self, students: Mapping[str, Path | str], split: str | None = None, rounds: int = 2,
                   latency_queries: int = 50) -> dict[str, dict]:
        """docs/s, queries/s and batch-1 query latency of the teacher and `students` (name -> directory), each
        with its prompts, timed side by side in one call (compare them as ratios, never across calls) on
        `evaluate.throughput_samples` queries and documents of `split` (default: evaluate.split) of the first
        evaluation dataset; {} when there is nothing to time."""
        from leaf_ray.student import teacher_prompts

        n, teacher = self.cfg.evaluate.throughput_samples, self.cfg.teacher
        if not n or not self.cfg.evaluate.datasets:
            return {}
        sample = beir_dataset(self.cfg.data, self.cfg.evaluate.datasets[0], split or self.cfg.evaluate.split,
                              max_corpus=n, max_queries=n, seed=self.cfg.evaluate.seed)
        encoders = {"teacher": self.models.load(teacher.model, max_length=teacher.max_length,
                                                trust_remote_code=teacher.trust_remote_code,
                                                allow_pickle_weights=teacher.allow_pickle_weights)}
        prompts = {"teacher": teacher_prompts(teacher)}
        for name, path in students.items():
            encoders[name] = self.models.load(str(path))
            prompts[name] = student_prompts(encoders[name], teacher)
        return measure_encoders(encoders, sample.query_texts, sample.corpus_texts[:n], prompts, rounds=rounds,
                                latency_queries=min(latency_queries, n))

    # -- the finish ------------------------------------------------------------------------------------------

    def report(self, folder, evaluation: EvaluationResult, title: str, meta: dict) -> dict[str, Path | str]:
        """results.json, results.md and plots of `evaluation` in `folder` (a local directory or an object-store
        location); returns their paths."""
        return write_report(folder, evaluation.records, title, meta, evaluation.notes(), plot_metrics=PLOT_METRICS)

    def export(self, student: Path, folder, evaluation: EvaluationResult, title: str,
               summary: dict) -> dict[str, Path | str]:
        """Record `summary` as the results in the manifest of `student` (a directory in the run folder's local
        copy; published when the folder is remote), write its model card from them and the evaluation's records,
        and write the report of its evaluation into `folder`: what a finished run holds, and each student a sweep
        exports from its Pareto front."""
        from leaf_ray.model_card import write_leaf_card
        from leaf_ray.student import MANIFEST_NAME, update_manifest

        update_manifest(student, results=summary)
        card = write_leaf_card(student, evaluation.records, self.cfg.data, self.cfg.export.license)
        for path in (student / MANIFEST_NAME, card):
            self.folder.publish(path.relative_to(self.folder.path).as_posix())
        return self.report(folder, evaluation, title, summary)

    def asymmetric(self, student: Path, evaluation: EvaluationResult) -> Path | str:
        """The leaf `student` and the run's teacher as one model in the run folder (leaf_ray.asym), with its model
        card; returns where it is published."""
        from leaf_ray.asym import ASYM_DIR, export_asymmetric

        export_asymmetric(student, self.cfg.teacher, self.folder.path / ASYM_DIR, self.models, evaluation.records,
                          self.cfg.data, self.cfg.export.license)
        self.folder.publish(ASYM_DIR)
        return (self.folder.location / ASYM_DIR).native()

    def finish(self, evaluation: EvaluationResult, title: str, summary: dict) -> dict[str, Path | str]:
        """Export the run's student with its report (and, with export.asymmetric, the asymmetric pair) into the
        run folder and mark the run finished, so a rerun of its name is refused."""
        student = self.folder.path / "student"
        paths = self.export(student, self.folder.location, evaluation, title, summary)
        if self.cfg.export.asymmetric:
            paths["asymmetric"] = self.asymmetric(student, evaluation)
        if self.tracked:
            self.tracked.finish(score_metrics(evaluation.records), {"meta": summary, "records": evaluation.records},
                                student)
        self.folder.mark_finished(summary)
        return paths
