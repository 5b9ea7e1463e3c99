"""Ray Tune sweeps over students, and the quality / speed / bytes-per-vector Pareto report.

Users want the smallest, fastest leaf that is good enough for their index budget. A sweep trains one student
per point of `sweep.students` x `sweep.grid`, evaluates each at every Matryoshka dims x quantization
(derived from one encoding: no retraining per variant), times them, and reports which (student, dims,
quantization) points no other point beats on quality, speed and bytes per vector at once.

How it runs on Ray. Each trial is a Tune function trainable (`trial.run_trial`) that builds and fits the Ray Train
TorchTrainer of leaf_ray.train (Train V2's pattern; `Tuner(trainer)` no longer exists) and gets the trainer's
validation reports through Tune's TuneReportCallback, on which ASHA stops trials whose alignment (cosine to
the teacher on held-out mix rows) trails. The teacher cache of the text mix is built once by the driver
before the tuner starts; trials receive its rows through the object store and never run the teacher. The
teacher's vectors of the validation texts are cached up front as well, so trials only read them.

Model selection never sees test data: trials are scored on `sweep.validation_split` (SciFact's train queries
and qrels); `evaluate.split` (test) is used only for the final report of the Pareto-optimal students.

Layout under `<storage.runs_root>/<name>/` (a local directory or shared file system):

    sweep_config.json   what the sweep was started with (a restart under another config is refused)
    tune/               Ray Tune's experiment; a restart restores it, so finished trials are not rerun
    trials/<trial id>/  one LEAF run per trial (init_student, checkpoints, metrics.jsonl, student/, trial.json)
    pareto/<trial id>/  the Pareto-optimal students, exported like any run: student/, results.json/.md, plots/
    sweep.json, sweep.md, pareto.png   the report

Resume: an interrupted sweep (Ctrl+C, a lost driver) continues when the same command runs again: Tune restores
the experiment, finished trials keep their results, and an unfinished trial's training resumes from its
latest Ray Train checkpoint.

Modules: space (the grid, trial configs, checks, the folder, resources per trial), validation (what trials are
scored by), trial (the Tune trainable; the only module that imports Ray Tune at the top, so importing this
package does not), tuner (the Tuner, trial rows, placement groups), pareto (speed, the front, its export),
report (sweep.json, sweep.md, pareto.png).
"""

from leaf_ray.sweep.pareto import export_front, front_of, measure_speed, pareto_front, sweep_points
from leaf_ray.sweep.report import write_sweep_report
from leaf_ray.sweep.space import (
    FRONT_DIR,
    SweepError,
    absolute_paths,
    check_sweep,
    concurrent_trials,
    grid_points,
    pin_config,
    trial_config,
    trial_resources,
)
from leaf_ray.sweep.tuner import SweepInterrupted, run_trials
from leaf_ray.sweep.validation import teacher_validation

__all__ = [
    "FRONT_DIR",
    "SweepError",
    "SweepInterrupted",
    "absolute_paths",
    "check_sweep",
    "concurrent_trials",
    "export_front",
    "front_of",
    "grid_points",
    "measure_speed",
    "pareto_front",
    "pin_config",
    "run_trials",
    "sweep_points",
    "teacher_validation",
    "trial_config",
    "trial_resources",
    "write_sweep_report",
]
